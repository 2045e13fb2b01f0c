"""Grow a network from scratch (METHOD.md section 5), or run a baseline with the same loop.

    train until the validation loss plateaus -> growth event (derivative, insert, line search)
    -> new optimizer carrying the surviving parameters' state -> train again ... until the epoch
    budget; growth stops at the insertion / depth / parameter budget or when the best TD <= 0.

Every epoch and growth event goes into ``output_dir/history.json``; resumable checkpoints are
written at every growth event, every ``train.checkpoint_every`` epochs and, if set, every
``train.checkpoint_every_steps`` optimizer steps (mid-epoch: the resumed run skips the batches of the
epoch's shuffle already trained on and restores every rank's RNG state). The learning rate follows
``train.lr_schedule`` over the run's global optimizer step, so it continues across growth events. The model with the best
validation loss is evaluated on the test set at the end (``results.json``).

The same code runs on one process or under ``accelerate launch`` (docs/distributed.md).
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from ..config import RunConfig, to_dict
from ..data import load_task, source_options
from ..growth import GrowthEvent, PlateauDetector, count_parameters, grow_once
from ..models.build import build_model
from ..surgery.labels import label_event
from ..training.checkpoint import (
    check_finite,
    check_free_space,
    divergence_error,
    gather_rng_states,
    latest_checkpoint,
    load_checkpoint,
    replay_insertions,
    resume_rng_states,
    save_checkpoint,
    write_json_atomic,
)
from ..training.distributed import (
    all_equal_digest,
    build_accelerator,
    is_fsdp,
    is_sharded,
    plain_model,
    prepare_again,
    shard,
)
from ..training.loop import evaluate, make_loader, train_run_epoch
from ..training.optim import build_optimizer, rebuild_after_growth

__all__ = ["check_output_dir", "run_grow"]


def check_output_dir(path: str | Path) -> Path:
    """Create ``path`` and prove it is writable before any training starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"  # per process: ranks may share the directory
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise OSError(f"Output directory {str(path)!r} is not writable: {e}") from e
    return path


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _losses(kind: str) -> tuple[nn.Module, nn.Module]:
    if kind == "classification":
        return nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    return nn.MSELoss(), nn.MSELoss(reduction="sum")


def _batches(dataset, batch_size: int, limit: int | None = None) -> list:
    loader = make_loader(dataset, batch_size, shuffle=False)
    out = []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        out.append(tuple(batch))
    return out


def run_grow(
    cfg: RunConfig, resume: bool = False, stop_after_epoch: int | None = None, accelerator=None
) -> dict:
    """Run growth (or a baseline) as configured; returns the results dict also written to disk.

    Runs on one process, or on every process of ``accelerate launch`` / ``torchrun`` (docs/distributed.md):
    each rank trains on every N-th batch of the epoch's (shared) shuffle, DDP (or FSDP) averaging the gradients,
    evaluates and probes its share of the validation / probe batches, and every quantity a decision depends on (validation loss,
    statistics of the derivative, line-search losses) is summed over the ranks first, so all ranks grow
    the same layer. A parameter digest is compared across ranks after every growth event. Only the
    main process writes files. Under FSDP every growth event, checkpoint and best-model copy works on
    the full weights gathered into a plain module (:func:`~topotransfer.training.distributed.plain_model`).

    Args:
        cfg: the run configuration.
        resume: continue from ``output_dir/latest`` if it exists.
        stop_after_epoch: return right after this many epochs (simulates an interrupted run in tests).
        accelerator: an ``accelerate.Accelerator`` to run under (default: one built from ``cfg.device``
            and ``cfg.train.mixed_precision``, ended when the run finishes).

    Raises:
        FloatingPointError: a training / validation loss or a parameter became NaN or inf; nothing is
            written after it, so ``output_dir/latest`` stays the last good checkpoint.
    """
    own_accelerator = accelerator is None
    acc = accelerator if accelerator is not None else build_accelerator(cfg.device, cfg.train.mixed_precision)
    main = acc.is_main_process
    out = check_output_dir(cfg.output_dir)
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    device = acc.device
    torch.manual_seed(cfg.seed)
    d = cfg.data
    task = load_task(
        d.name, seed=cfg.seed, num_train=d.num_train, num_val=d.num_val, num_test=d.num_test,
        grid=d.grid, noise=d.noise, image_size=d.image_size, **source_options(d),
    )
    g = cfg.growth
    base_depth = cfg.model.depth + (g.max_insertions if g.method == "fixed" else 0)
    # `net` is the plain module (names, checkpoints, evaluation, surgery); `model` is what accelerate
    # prepared from it (DDP-wrapped when there are several processes) and is used only to train. Under
    # FSDP, `net` is sharded in place: events, checkpoints and best copies use `plain_model` instead.
    net = build_model(cfg.model, task.input_shape, task.num_outputs, depth=base_depth).to(device)
    loss_mean, loss_sum = _losses(task.kind)
    manifest = {
        "format": 1,
        "task": task.name,
        "kind": task.kind,
        "model": to_dict(cfg.model),
        "base_depth": base_depth,
        "input_shape": list(task.input_shape),
        "num_outputs": task.num_outputs,
        "insertions": [],
    }
    if main:  # refuse a disk that cannot take this run's checkpoints, before any training
        check_free_space(out, _checkpoint_bytes(net, base_depth, g.max_insertions))
    state = {"epoch": 0, "steps": 0, "history": [], "events": [], "growth_done": g.method == "fixed",
             "last_event_epoch": 0, "plateau": None, "frozen": [], "best_val": None, "best_epoch": None,
             "best_insertions": 0, "wall_time": 0.0, "epoch_progress": None}
    rng_states = None  # per-rank RNG states of a mid-epoch checkpoint being resumed
    optimizer = build_optimizer(net, cfg.train)
    best_model = copy.deepcopy(net)

    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:  # every rank reads the same checkpoint
        saved = load_checkpoint_manifest(ckpt)
        replay_insertions(net, saved["insertions"])
        manifest = saved
        st = load_checkpoint(ckpt, net)["state"]
        for name, p in net.named_parameters():
            p.requires_grad_(name not in set(st["frozen"]))
        optimizer = build_optimizer(net, cfg.train)
        load_checkpoint(ckpt, net, optimizer)
        state = {"epoch_progress": None, **st}
        rng_states = resume_rng_states(ckpt, state, acc.num_processes)
        best_dir = out / "best"
        best_model = replay_insertions(
            build_model(cfg.model, task.input_shape, task.num_outputs, depth=base_depth).to(device),
            manifest["insertions"][: state["best_insertions"]],
        )
        if (best_dir / "model.safetensors").is_file():
            load_checkpoint(best_dir, best_model)
    model, optimizer = prepare_again(acc, net, optimizer)
    fsdp = is_fsdp(acc)

    detector = PlateauDetector(g.patience, g.min_delta)
    if state["plateau"]:
        detector.load_state_dict(state["plateau"])
    # Each rank evaluates / probes its share of fixed batch lists; the sums are reduced over ranks.
    val_batches = shard(_batches(task.val, cfg.train.batch_size), acc)
    probe_batches = shard(_batches(task.train, cfg.probe.batch_size, cfg.probe.batches), acc)
    test_batches = shard(_batches(task.test, cfg.train.batch_size), acc)
    started = time.perf_counter() - state["wall_time"]

    best_unsaved = {"epoch": None}

    def checkpoint(name: str = "last") -> None:
        if main and best_unsaved["epoch"] is not None:
            save_checkpoint(out, "best", best_model, manifest, None, {"epoch": best_unsaved["epoch"]}, update_latest=False)
            best_unsaved["epoch"] = None
        state["plateau"] = detector.state_dict()
        state["frozen"] = [n for n, p in net.named_parameters() if not p.requires_grad]
        state["wall_time"] = time.perf_counter() - started
        # FSDP: the full weights and optimizer state, gathered on every rank (a collective)
        full_net, full_opt = plain_model(acc, model, optimizer) if fsdp else (net, optimizer)
        check_finite(full_net)
        # mid-epoch: every rank's RNG state (a collective too), so dropout / augmentation draws continue
        rngs = gather_rng_states(acc) if state["epoch_progress"] is not None else None
        if main:
            save_checkpoint(out, name, full_net, manifest, full_opt, state, rng_states=rngs)
            write_json_atomic(out / "history.json", {"epochs": state["history"], "events": state["events"]})

    def diverged(e: Exception, epoch: int) -> FloatingPointError:
        return divergence_error(e, out, epoch)

    # The LR schedule runs over the run's optimizer steps (each rank takes one step per N batches).
    steps_per_epoch = math.ceil(math.ceil(len(task.train) / cfg.train.batch_size) / acc.num_processes)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    # Full batch on one process: a shuffle cannot change the one step, so skip the per-example DataLoader.
    full_batch = ([tuple(task.train.tensors)] if isinstance(task.train, TensorDataset) and acc.num_processes == 1
                  and cfg.train.batch_size >= len(task.train) and cfg.train.checkpoint_every_steps is None else None)
    epochs = range(state["epoch"], cfg.train.epochs)
    if cfg.progress and main:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"grow[{g.method}]", initial=state["epoch"], total=cfg.train.epochs)
    for epoch in epochs:
        steps_left = None if cfg.train.max_steps is None else cfg.train.max_steps - state["steps"]
        if steps_left is not None and steps_left <= 0:
            break
        # Same shuffle on every rank (seeded by epoch); accelerate hands each rank every n-th batch.
        loader = full_batch or acc.prepare_data_loader(
            make_loader(task.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
        )
        try:
            train_loss, _ = train_run_epoch(
                model, loader, optimizer, loss_mean, device, steps_left, accelerator=acc, state=state,
                seed=cfg.seed, epoch=epoch, total_steps=total_steps, train_cfg=cfg.train, rng_states=rng_states,
                checkpoint=checkpoint,
            )
        except FloatingPointError as e:
            raise diverged(e, epoch + 1) from e
        val = evaluate(net, val_batches, task.kind, device, accelerator=acc)
        if not math.isfinite(val["loss"]):
            raise diverged(FloatingPointError(f"Validation loss is {val['loss']}"), epoch + 1)
        state["epoch"] = epoch + 1
        depth = len(manifest["insertions"]) + base_depth
        state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
                                 "val_error": val["error"], "depth": depth, "params": count_parameters(net),
                                 "lr": optimizer.param_groups[0]["lr"], "steps": state["steps"],
                                 "time": time.perf_counter() - started})
        if state["best_val"] is None or val["loss"] < state["best_val"]:
            state["best_val"], state["best_epoch"] = val["loss"], epoch + 1
            state["best_insertions"] = len(manifest["insertions"])
            best_model = plain_model(acc, model)[0] if fsdp else copy.deepcopy(net)
            best_unsaved["epoch"] = epoch + 1  # written with the next checkpoint (full batch improves every epoch)
        since = epoch + 1 - state["last_event_epoch"]  # epochs of this stage
        plateau = detector.update(val["loss"]) if since % g.check_every == 0 else False
        if g.epochs_per_stage is not None:
            plateau = since >= g.epochs_per_stage
        elif g.max_stage_epochs is not None:
            plateau = plateau or since >= g.max_stage_epochs
        grew = False
        if plateau and not state["growth_done"] and epoch + 1 < cfg.train.epochs:
            over = (
                len(manifest["insertions"]) >= g.max_insertions
                or (g.max_depth is not None and depth >= g.max_depth)
                or (g.max_params is not None and count_parameters(net) >= g.max_params)
            )
            if over:
                state["growth_done"] = True
            else:
                # Growth event (STYLE 7.5): sync, unwrap (and drop the autocast wrapper: the derivative
                # and line search run in float32+; under FSDP: gather the full weights and optimizer
                # state into a plain copy), grow in place, new optimizer, re-prepare (re-shard).
                acc.wait_for_everyone()
                net, optimizer = plain_model(acc, model, optimizer)
                ev: GrowthEvent = grow_once(
                    net, g.method, probe_batches, val_batches, loss_sum, event=len(state["events"]),
                    epoch=epoch + 1, seed=cfg.seed, probe_cfg=cfg.probe, epsilons=g.epsilons,
                    setting=d.name, accelerator=acc, both_signs=g.both_signs,
                    fill_inactive=g.fill_inactive, site_selection=g.site_selection,
                )
                record = ev.to_dict()
                if ev.site is None:
                    state["growth_done"] = True
                else:
                    # Identical reduced statistics give identical layers; prove it before DDP's
                    # re-wrap broadcasts rank 0's weights and would hide a divergence (FSDP shards
                    # each rank's own copy, so there a divergence would go on silently).
                    record["param_checksums"] = all_equal_digest(net, acc, "parameters")
                    manifest["insertions"].append({"site": ev.site, "layer": ev.layer, "epoch": epoch + 1})
                    optimizer = rebuild_after_growth(optimizer, net, cfg.train)
                    detector.reset()
                    state["last_event_epoch"] = epoch + 1
                    grew = True
                label_event(record, net, manifest["insertions"])  # the stable names of the sites it scored and chose
                state["events"].append(record)
                acc.free_memory()
                model, optimizer = prepare_again(acc, net, optimizer)
        if grew or (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == cfg.train.epochs:
            checkpoint()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            checkpoint()
            acc.wait_for_everyone()
            return {"stopped_at_epoch": epoch + 1}

    test = evaluate(best_model, test_batches, task.kind, device, accelerator=acc)
    final_test = evaluate(net, test_batches, task.kind, device, accelerator=acc)
    results = {
        "method": g.method,
        "task": task.name,
        "seed": cfg.seed,
        "test_error": test["error"],
        "test_loss": test["loss"],
        "final_test_error": final_test["error"],
        "best_epoch": state["best_epoch"],
        "depth": base_depth + len(manifest["insertions"]),
        "best_depth": base_depth + state["best_insertions"],
        "params": count_parameters(net),
        "insertions": len(manifest["insertions"]),
        "wall_time": time.perf_counter() - started,
        "num_processes": acc.num_processes,
        "distributed": {"type": str(acc.distributed_type.value), "sharded": is_sharded(model)},
        "events": state["events"],
    }
    checkpoint()
    if main:
        write_json_atomic(out / "results.json", results)
    # Every rank reaches here before the process group is torn down (STACK.md: gloo teardown aborts).
    acc.wait_for_everyone()
    if own_accelerator and acc.num_processes > 1:
        acc.end_training()
    return results


def load_checkpoint_manifest(path: Path) -> dict:
    """The architecture manifest of a checkpoint directory."""
    import json

    return json.loads((Path(path) / "manifest.json").read_text())


def _checkpoint_bytes(net: nn.Module, base_depth: int, max_insertions: int) -> int:
    """A generous estimate of the disk the run's checkpoints take at the final depth: ``last`` (weights +
    two Adam moments) and ``best`` (weights), each briefly twice while it is atomically replaced."""
    grown = count_parameters(net) * (base_depth + max_insertions) / max(base_depth, 1)
    return int(2 * 4 * grown * next(net.parameters()).element_size()) + (1 << 20)
