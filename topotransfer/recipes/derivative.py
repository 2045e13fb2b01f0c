"""Train the starting network for ``train.epochs`` epochs, then print the topological derivative at
every site: the quickest way to see where a network wants depth."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..data import load_task
from ..derivative.topological import topological_derivative
from ..models.build import build_model
from ..training.loop import evaluate, make_loader, train_epoch
from ..training.optim import build_optimizer
from .grow import _batches, _device, _losses, check_output_dir

__all__ = ["run_derivative"]


def run_derivative(cfg: RunConfig) -> list:
    """Returns the :class:`~topotransfer.derivative.topological.SiteResult` list (also printed)."""
    check_output_dir(cfg.output_dir)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    d = cfg.data
    task = load_task(d.name, seed=cfg.seed, num_train=d.num_train, num_val=d.num_val, num_test=d.num_test,
                     grid=d.grid, noise=d.noise, image_size=d.image_size)
    model = build_model(cfg.model, task.input_shape, task.num_outputs).to(device)
    loss_mean, loss_sum = _losses(task.kind)
    optimizer = build_optimizer(model, cfg.train)
    for epoch in range(cfg.train.epochs):
        loader = make_loader(task.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
        train_epoch(model, loader, optimizer, loss_mean, device, cfg.train.max_steps)
    val = evaluate(model, _batches(task.val, cfg.train.batch_size), task.kind, device)
    p = cfg.probe
    results = topological_derivative(
        model, _batches(task.train, p.batch_size, p.batches), loss_sum, rule=p.rule, c=p.c, k=p.k,
        solver=p.solver, tol=p.tol, progress=cfg.progress, sample_fraction=p.sample_fraction,
        max_samples_per_batch=p.max_samples_per_batch,
    )
    print(f"{task.name}: {type(model).__name__} after {cfg.train.epochs} epochs, val loss {val['loss']:.4g}")
    print(f"{'site':28s} {'TD (lambda_max)':>16s} {'k':>4s} {'solver':>12s}")
    best = max(results, key=lambda r: r.score)
    for r in results:
        mark = "  <- insert here" if r is best and r.score > 0 else ""
        print(f"{r.site:28s} {r.score:16.6g} {r.k:4d} {r.solver:>12s}{mark}")
    return results
