"""A small residual CNN whose blocks are residual convolutions of one shape.

    h_0 = tanh(conv_stem(x))                       (stem), shape (B, C, H, W)
    h_l = h_{l-1} + sigma(conv(h_{l-1}, W_l) + b_l)  (blocks.{l-1}, each a TopoConv2d)
    y   = Linear(mean_{H,W} h_depth)                (head)

All states between blocks have the same shape (B, C, H, W), so every block boundary is a site where
a residual convolution can be inserted.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import TopoConv2d

__all__ = ["ResidualCNN"]


class ResidualCNN(nn.Module):
    """Residual CNN: stem conv + tanh, ``depth`` TopoConv2d blocks, global average pool, linear head.

    Args:
        in_channels: channels of the input images.
        channels: C, channels of every block.
        depth: number of residual blocks (>= 0).
        num_classes: output dimension.
        kernel_size: k of every convolution (odd).
        stem_stride: stride of the stem convolution (2 halves the resolution the blocks work at).
        init_std: std of the blocks' random weights (default (C k^2)^-1/2).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        depth: int,
        num_classes: int,
        kernel_size: int = 3,
        stem_stride: int = 1,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if min(in_channels, channels, num_classes) <= 0 or depth < 0:
            raise ValueError(
                f"ResidualCNN needs positive sizes and depth >= 0, got in_channels={in_channels}, "
                f"channels={channels}, depth={depth}, num_classes={num_classes}"
            )
        self.channels, self.kernel_size = channels, kernel_size
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size, stride=stem_stride, padding=kernel_size // 2), nn.Tanh()
        )
        self.blocks = nn.ModuleList(TopoConv2d(channels, kernel_size) for _ in range(depth))
        std = init_std if init_std is not None else (channels * kernel_size**2) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.weight, std=std)
            nn.init.normal_(block.bias, std=std)
        self.head = nn.Linear(channels, num_classes)

    @property
    def depth(self) -> int:
        """Current number of residual blocks."""
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, in_channels, H, W). Returns: logits (B, num_classes)."""
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=(2, 3)))
