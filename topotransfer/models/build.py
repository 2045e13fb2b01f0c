"""Build the starting network of a growth run from :class:`~topotransfer.config.ModelConfig`."""

from __future__ import annotations

import math

from torch import nn

from ..errors import ModalityMismatchError
from .residual_cnn import ResidualCNN
from .residual_mlp import ResidualMLP

__all__ = ["MODEL_FAMILIES", "build_model"]

MODEL_FAMILIES = ("mlp", "cnn", "vit")


def build_model(cfg, input_shape: tuple[int, ...], num_outputs: int, depth: int | None = None) -> nn.Module:
    """A ResidualMLP, ResidualCNN or small transformers ViT for inputs of ``input_shape``.

    Args:
        cfg: a :class:`~topotransfer.config.ModelConfig` (``family``, ``width``, ``depth``, ...).
        input_shape: shape of one example, e.g. (2,) or (C, H, W).
        num_outputs: output dimension / number of classes.
        depth: overrides ``cfg.depth`` (the fixed baseline is built at the final depth).

    Raises:
        ModalityMismatchError: ``input_shape == ()``, a text task (strings need a pretrained tokenizer + encoder).
    """
    if len(input_shape) == 0:
        raise ModalityMismatchError(
            "a text task has no tensor inputs to grow a network on: adapt a pretrained text encoder instead "
            "(topotransfer adapt model.name_or_path=<BERT-family dir> data.name=sentiment)"
        )
    depth = cfg.depth if depth is None else depth
    if cfg.family == "mlp":
        return ResidualMLP(math.prod(input_shape), cfg.width, depth, num_outputs)
    if len(input_shape) != 3 and cfg.family in ("cnn", "vit"):
        raise ValueError(f"model.family={cfg.family!r} needs image inputs (C, H, W), got examples of shape {input_shape}")
    if cfg.family == "cnn":
        return ResidualCNN(input_shape[0], cfg.width, depth, num_outputs, kernel_size=cfg.kernel_size)
    if cfg.family == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        if depth < 1:
            raise ValueError("model.family='vit' needs model.depth >= 1 (sites are block boundaries)")
        c, h, w = input_shape
        if h != w or h % cfg.patch_size:
            raise ValueError(f"ViT needs square images divisible by patch_size={cfg.patch_size}, got {h}x{w}")
        config = ViTConfig(
            hidden_size=cfg.width,
            num_hidden_layers=depth,
            num_attention_heads=cfg.num_heads,
            intermediate_size=2 * cfg.width,
            image_size=h,
            patch_size=cfg.patch_size,
            num_channels=c,
            num_labels=num_outputs,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return ViTForImageClassification(config)
    raise ValueError(f"Unknown model.family {cfg.family!r}; choose one of {MODEL_FAMILIES}")
