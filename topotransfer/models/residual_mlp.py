"""The reference network of the method: a tanh input layer, residual hidden layers, a linear output.

    h_0 = tanh(A x + a)                       (input_layer)
    h_l = h_{l-1} + sigma(W_l h_{l-1} + b_l)  (layers.{l-1}, each a TopoLayer), l = 1..depth
    y   = C h_depth + c                       (output_layer)

A hidden layer has exactly the form of an inserted TopoLayer, so growing this network by one layer
is inserting a TopoLayer into ``layers``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import TopoLayer

__all__ = ["ResidualMLP"]


class ResidualMLP(nn.Module):
    """Residual MLP with ``depth`` hidden TopoLayers of width ``width``.

    Args:
        in_features: input dimension.
        width: hidden width d.
        depth: number of residual hidden layers (>= 0).
        out_features: output dimension.
        init_std: standard deviation of the hidden layers' random weights (the input and output layers
            use PyTorch's default initialisation).
    """

    def __init__(self, in_features: int, width: int, depth: int, out_features: int, init_std: float | None = None) -> None:
        super().__init__()
        if min(in_features, width, out_features) <= 0 or depth < 0:
            raise ValueError(
                f"ResidualMLP needs positive sizes and depth >= 0, got in={in_features}, width={width}, "
                f"depth={depth}, out={out_features}"
            )
        self.in_features, self.width, self.out_features = in_features, width, out_features
        self.input_layer = nn.Sequential(nn.Linear(in_features, width), nn.Tanh())
        self.layers = nn.ModuleList(TopoLayer(width) for _ in range(depth))
        std = init_std if init_std is not None else width**-0.5
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=std)
            nn.init.normal_(layer.bias, std=std)
        self.output_layer = nn.Linear(width, out_features)

    @property
    def depth(self) -> int:
        """Current number of hidden residual layers (grows with insertions)."""
        return len(self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, in_features). Returns: (B, out_features)."""
        h = self.input_layer(x.flatten(1))
        for layer in self.layers:
            h = layer(h)
        return self.output_layer(h)
