"""Train the starting network briefly (``warmup_epochs``), then print and save the topological derivative at
every site: the quickest way to see where a network wants depth.

The marked site is the one the config's own growth event would insert at: the largest TD for
``growth.site_selection=argmax``, or, for ``realized``, the TD > 0 site whose line-searched layer lowers the
held-out loss most (:func:`~topotransfer.growth.grow_once` on a copy of the network). The table goes to
``output_dir/derivative.{json,csv}`` with ``derivative.md`` explaining the columns.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import load_task
from ..growth import grow_once
from ..init_rules import probe_site_results
from ..models.build import build_model
from ..training.checkpoint import write_json_atomic
from ..training.distributed import build_accelerator, shard
from ..training.loop import evaluate, make_loader, train_run_epoch
from ..training.optim import build_optimizer
from ..training.run import RunState
from .grow import _batches, _losses, check_output_dir

__all__ = ["COLUMNS", "run_derivative"]

#: The columns of ``derivative.csv`` (and of each ``sites`` entry of ``derivative.json``), explained.
COLUMNS = {
    "site": "dotted name of the module whose output state a new layer would follow (depth order)",
    "td": "topological derivative TD = lambda_max(Q_t): the second-order decrease of the training loss per "
          "eps^2/2 when a layer with the best unit direction is inserted there (> 0: inserting helps)",
    "quadratic": "theta^T Q_t theta of the direction the probe rule would insert there: its predicted decrease per "
                 "eps^2/2 (equals td under probe.rule=top1); ranks the sites when probe.score=quadratic",
    "k": "number of eigen directions the probe rule (probe.rule) combined into the layer's initial weights",
    "solver": "eigen-solver used: dense or matrix_free",
    "heldout_loss": "site_selection=realized only: held-out (validation) loss after inserting that site's layer "
                    "with its line-searched eps (empty: site not searched, TD <= 0)",
    "chosen": "1 for the site a growth event of this config would insert at now (site_selection=argmax: the "
              "largest probe.score, td or quadratic)",
}


def run_derivative(cfg: RunConfig, accelerator: object | None = None, warmup_epochs: int | None = None) -> list:
    """Returns the :class:`~topotransfer.derivative.topological.SiteResult` list (printed by the main process).

    Args:
        warmup_epochs: epochs of training before the derivative (default ``train.epochs``; at most that).

    Under ``accelerate launch`` with N processes the warm-up training is data-parallel, and each process
    probes its share of the probe batches; the statistics are summed over processes before the one
    solve, so every process returns the scores a single process gets on all the probe batches.
    """
    own_accelerator = accelerator is None
    acc = accelerator if accelerator is not None else build_accelerator(cfg.device, cfg.train.mixed_precision)
    main = acc.is_main_process
    out = check_output_dir(cfg.output_dir)
    epochs = cfg.train.epochs if warmup_epochs is None else max(0, min(int(warmup_epochs), cfg.train.epochs))
    device = acc.device
    torch.manual_seed(cfg.seed)
    d = cfg.data
    task = load_task(d.name, seed=cfg.seed, num_train=d.num_train, num_val=d.num_val, num_test=d.num_test,
                     grid=d.grid, noise=d.noise, image_size=d.image_size)
    net = build_model(cfg.model, task.input_shape, task.num_outputs).to(device)
    loss_mean, loss_sum = _losses(task.kind)
    model, optimizer = acc.prepare(net, build_optimizer(net, cfg.train))
    # the warm-up follows train.lr_schedule over its own steps (no checkpoints here)
    state = RunState()  # the warm-up's step count (LR schedule); never checkpointed
    steps_per_epoch = math.ceil(math.ceil(len(task.train) / cfg.train.batch_size) / acc.num_processes)
    total_steps = max(1, epochs * steps_per_epoch)
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    bar = None
    if cfg.progress and main and epochs > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc="derivative warm-up", unit="epoch")
    for epoch in range(epochs):
        left = None if cfg.train.max_steps is None else cfg.train.max_steps - state.steps
        if left is not None and left <= 0:
            break
        loader = acc.prepare_data_loader(
            make_loader(task.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
        )
        loss, _ = train_run_epoch(model, loader, optimizer, loss_mean, device, left, accelerator=acc, state=state,
                                  seed=cfg.seed, epoch=epoch, total_steps=total_steps, train_cfg=cfg.train,
                                  rng_states=None, checkpoint=lambda: None)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train_loss=f"{loss:.4g}")
    if bar is not None:
        bar.close()
    val_batches = shard(_batches(task.val, cfg.train.batch_size), acc)
    val = evaluate(net, val_batches, task.kind, device, accelerator=acc)
    p, g = cfg.probe, cfg.growth
    probe_batches = shard(_batches(task.train, p.batch_size, p.batches), acc)
    results = probe_site_results(net, probe_batches, loss_sum, p, accelerator=acc, progress=cfg.progress and main)
    best = max(results, key=lambda r: r.score)
    chosen, realized, event = (best.site if best.score > 0 else None), {}, None
    if g.site_selection == "realized" and best.score > 0:
        # what the config's growth event would do: line-search every TD > 0 site on a copy, keep the best
        ev = grow_once(copy.deepcopy(net), "topo", probe_batches, val_batches, loss_sum, event=0, epoch=epochs,
                       seed=cfg.seed, probe_cfg=p, epsilons=g.epsilons, setting=d.name,
                       accelerator=acc, both_signs=g.both_signs, fill_inactive=g.fill_inactive, init_mix=g.init_mix,
                       site_selection="realized")
        chosen, realized = ev.site, dict(ev.realized)
        event = {"epsilon": ev.epsilon, "loss_before": ev.loss_before, "loss_after": ev.loss_after}
    acc.wait_for_everyone()  # every rank gets here before the process group is torn down (gloo aborts otherwise)
    if own_accelerator and acc.num_processes > 1:
        acc.end_training()
    if not main:
        return results
    rows = [{"site": r.site, "td": r.lambda_max, "quadratic": r.quadratic, "k": r.k, "solver": r.solver,
             "heldout_loss": realized.get(r.site), "chosen": int(r.site == chosen)} for r in results]
    table = {"task": task.name, "model": type(net).__name__, "warmup_epochs": epochs, "val_loss": val["loss"],
             "site_selection": g.site_selection, "score": p.score, "chosen_site": chosen, "event": event,
             "sites": rows, "columns": COLUMNS}
    _save_table(Path(out), table)
    print(f"{task.name}: {type(net).__name__} after {epochs} warm-up epochs, val loss {val['loss']:.4g}")
    extra = f" {'held-out loss':>14s}" if realized else ""
    print(f"{'site':28s} {'TD (lambda_max)':>16s} {'quadratic':>12s} {'k':>4s} {'solver':>12s}{extra}")
    rule = g.site_selection if g.site_selection == "realized" else f"argmax of {'TD' if p.score == 'lambda_max' else p.score}"
    for row in rows:
        mark = f"  <- insert here ({rule})" if row["chosen"] else ""
        loss = row["heldout_loss"]
        col = (f" {loss:14.6g}" if loss is not None else f" {'-':>14s}") if realized else ""
        print(f"{row['site']:28s} {row['td']:16.6g} {row['quadratic']:12.6g} {row['k']:4d} {row['solver']:>12s}{col}{mark}")
    if chosen is None:
        print(f"no site has {'TD' if p.score == 'lambda_max' else p.score} > 0: a growth event would stop here")
    print(f"table: {Path(out) / 'derivative.json'}, {Path(out) / 'derivative.csv'} (columns: {Path(out) / 'derivative.md'})")
    return results


def _save_table(out: Path, table: dict) -> None:
    """``derivative.json`` (everything), ``derivative.csv`` (one row per site) and ``derivative.md`` (columns)."""
    write_json_atomic(out / "derivative.json", table)
    with open(out / "derivative.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in table["sites"]:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    lines = [
        "# derivative.csv / derivative.json",
        "",
        f"Written by `topotransfer derivative`: {table['model']} on {table['task']} after {table['warmup_epochs']} "
        f"warm-up epochs (validation loss {table['val_loss']:.6g}); site selection `{table['site_selection']}`, "
        f"chosen site: `{table['chosen_site']}`.",
        "",
        "| column | meaning |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in COLUMNS.items()],
        "",
    ]
    (out / "derivative.md").write_text("\n".join(lines))
