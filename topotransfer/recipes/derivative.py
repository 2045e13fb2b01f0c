"""Train the starting network for ``train.epochs`` epochs, then print the topological derivative at
every site: the quickest way to see where a network wants depth."""

from __future__ import annotations

import math

import torch

from ..config import RunConfig
from ..data import load_task
from ..init_rules import probe_site_results
from ..models.build import build_model
from ..training.distributed import build_accelerator, shard
from ..training.loop import evaluate, make_loader, train_run_epoch
from ..training.optim import build_optimizer
from .grow import _batches, _losses, check_output_dir

__all__ = ["run_derivative"]


def run_derivative(cfg: RunConfig, accelerator: object | None = None) -> list:
    """Returns the :class:`~topotransfer.derivative.topological.SiteResult` list (printed by the main process).

    Under ``accelerate launch`` with N processes the warm-up training is data-parallel, and each process
    probes its shard of the probe batches; the statistics are summed over processes before the one
    solve, so every process returns the scores a single process gets on all the probe batches.
    """
    own_accelerator = accelerator is None
    acc = accelerator if accelerator is not None else build_accelerator(cfg.device, cfg.train.mixed_precision)
    check_output_dir(cfg.output_dir)
    device = acc.device
    torch.manual_seed(cfg.seed)
    d = cfg.data
    task = load_task(d.name, seed=cfg.seed, num_train=d.num_train, num_val=d.num_val, num_test=d.num_test,
                     grid=d.grid, noise=d.noise, image_size=d.image_size)
    net = build_model(cfg.model, task.input_shape, task.num_outputs).to(device)
    loss_mean, loss_sum = _losses(task.kind)
    model, optimizer = acc.prepare(net, build_optimizer(net, cfg.train))
    # the warm-up training follows train.lr_schedule like the other recipes (no checkpoints here)
    state = {"steps": 0, "epoch_progress": None}
    steps_per_epoch = math.ceil(math.ceil(len(task.train) / cfg.train.batch_size) / acc.num_processes)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    for epoch in range(cfg.train.epochs):
        left = None if cfg.train.max_steps is None else cfg.train.max_steps - state["steps"]
        if left is not None and left <= 0:
            break
        loader = acc.prepare_data_loader(
            make_loader(task.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
        )
        train_run_epoch(model, loader, optimizer, loss_mean, device, left, accelerator=acc, state=state,
                        seed=cfg.seed, epoch=epoch, total_steps=total_steps, train_cfg=cfg.train, rng_states=None,
                        checkpoint=lambda: None)
    val = evaluate(net, shard(_batches(task.val, cfg.train.batch_size), acc), task.kind, device, accelerator=acc)
    p = cfg.probe
    results = probe_site_results(
        net, shard(_batches(task.train, p.batch_size, p.batches), acc), loss_sum, p,
        accelerator=acc, progress=cfg.progress and acc.is_main_process,
    )
    acc.wait_for_everyone()  # every rank gets here before the process group is torn down (STACK.md)
    if own_accelerator and acc.num_processes > 1:
        acc.end_training()
    if not acc.is_main_process:
        return results
    print(f"{task.name}: {type(net).__name__} after {cfg.train.epochs} epochs, val loss {val['loss']:.4g}")
    print(f"{'site':28s} {'TD (lambda_max)':>16s} {'k':>4s} {'solver':>12s}")
    best = max(results, key=lambda r: r.score)
    for r in results:
        mark = "  <- insert here" if r is best and r.score > 0 else ""
        print(f"{r.site:28s} {r.score:16.6g} {r.k:4d} {r.solver:>12s}{mark}")
    return results
