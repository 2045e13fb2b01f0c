"""Optimizers built from config, and rebuilt after growth with the surviving parameters' state."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["build_optimizer", "rebuild_after_growth"]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the parameters that require grad (``cfg`` is a TrainConfig)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"Unknown optimizer {cfg.optimizer!r}")


def rebuild_after_growth(old: torch.optim.Optimizer, model: nn.Module, cfg) -> torch.optim.Optimizer:
    """A fresh optimizer over the grown model's trainable parameters.

    Parameters that survived the growth event keep their optimizer state (Adam moments, step), through
    the public ``optimizer.state`` mapping; new parameters start with empty state. A prepared optimizer
    is never mutated (appending to ``param_groups`` breaks DDP-prepared optimizers).
    """
    new = build_optimizer(model, cfg)
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
    return new
