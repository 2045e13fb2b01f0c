"""Optimizers built from config, rebuilt after growth with the surviving parameters' state, and the
learning-rate schedule.

The schedule is a pure function of the run's global optimizer step (:func:`lr_factor`), not a stateful
``torch.optim.lr_scheduler`` object: a growth event replaces the optimizer, and a resumed run builds a
new one, and both simply continue on the schedule from the step counter kept in the run state. So there
is no scheduler state to carry across a growth event, to checkpoint, or to keep in step with accelerate's
``AcceleratedScheduler`` (which steps a wrapped scheduler once per *process* per optimizer step).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["build_optimizer", "lr_factor", "rebuild_after_growth", "scale_lr"]


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


def lr_factor(step: int, total_steps: int, cfg) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based, counted over the whole run) of ``total_steps``.

    ``w(step) * s(step)`` with the linear warm-up ``w = min(1, (step + 1) / warmup_steps)`` and the decay
    ``s`` over the steps after the warm-up, progress ``q = (step - warmup) / (total - warmup)`` in [0, 1]:
    constant ``1``, cosine ``(1 + cos(pi q)) / 2``, linear ``1 - q``. (``cfg`` is a TrainConfig.)
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    q = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)))
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * q))
    if cfg.lr_schedule == "linear":
        return 1.0 - q
    raise ValueError(f"Unknown lr_schedule {cfg.lr_schedule!r}")


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every parameter group's learning rate to its base rate times ``factor``.

    The base rate is the group's ``lr`` when it is first scaled, kept as ``initial_lr`` (the key torch's
    schedulers use; it is saved and restored with ``optimizer.state_dict()``), so groups with different
    rates (adapt: head + inserted layers vs LoRA / backbone) keep their ratio.
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor
