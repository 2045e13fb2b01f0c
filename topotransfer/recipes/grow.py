"""Grow a network from scratch (docs/method.md section 8), or run a baseline with the same loop.

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
from dataclasses import dataclass, field

from torch import nn

from ..config import RunConfig, to_dict
from ..data import Task, load_task, source_options
from ..growth import PlateauDetector, count_parameters, grow_once
from ..models.build import build_model
from ..training.checkpoint import checkpoint_disk_bytes, replay_insertions, side_copy
from ..training.distributed import is_sharded
from ..training.optim import build_optimizer, rebuild_after_growth
from ..training.run import Run, RunState, check_output_dir, read_manifest
from ..training.run import batches as _batches  # noqa: F401  (recipes/derivative.py imports it from here)
from ..training.run import loss_functions as _losses

__all__ = ["GrowState", "check_output_dir", "load_checkpoint_manifest", "run_grow"]

load_checkpoint_manifest = read_manifest  # the architecture manifest of a checkpoint directory


@dataclass
class GrowState(RunState):
    """The grow recipe's run state (:class:`~topotransfer.training.run.RunState` plus the growth policy's).

    Attributes:
        growth_done: no more growth events (a budget is reached, or the best TD was <= 0).
        last_event_epoch: the epoch of the last insertion (``growth.epochs_per_stage``).
        plateau: the plateau detector's state.
        frozen: names of the parameters that do not train (forward_thinking freezes what was trained).
        best_val, best_epoch, best_insertions: the best validation loss so far, its epoch and the number of
            insertions the model had then (``output_dir/best`` holds its weights).
    """

    growth_done: bool = False
    last_event_epoch: int = 0
    plateau: dict | None = None
    frozen: list[str] = field(default_factory=list)
    best_val: float | None = None
    best_epoch: int | None = None
    best_insertions: int = 0


def run_grow(
    cfg: RunConfig, resume: bool = False, stop_after_epoch: int | None = None, accelerator=None,
    overwrite: bool = False,
) -> dict:
    """Run growth (or a baseline) as configured; returns the results dict also written to disk.

    Runs on one process, or on every process of ``accelerate launch`` / ``torchrun`` (docs/distributed.md):
    each rank trains on every N-th batch of the epoch's (shared) shuffle, DDP (or FSDP) averaging the gradients,
    evaluates and probes its share of the validation / probe batches, and every quantity a decision depends on
    (validation loss, statistics of the derivative, line-search losses) is summed over the ranks first, so all
    ranks grow the same layer. A parameter digest is compared across ranks after every growth event. Only the
    main process writes files. Under FSDP every growth event, checkpoint and best-model copy works on the full
    weights gathered into a plain module (:func:`~topotransfer.training.distributed.plain_model`).

    Args:
        cfg: the run configuration.
        resume: continue from ``output_dir/latest``.
        stop_after_epoch: return right after this many epochs (simulates an interrupted run in tests).
        accelerator: an ``accelerate.Accelerator`` to run under (default: one built from ``cfg.device``
            and ``cfg.train.mixed_precision``, ended when the run finishes).
        overwrite: replace the run that ``output_dir`` holds (otherwise it is refused).

    Raises:
        FloatingPointError: a training / validation loss or a parameter became NaN or inf; nothing is
            written after it, so ``output_dir/latest`` stays the last good checkpoint.
        RunExistsError: ``output_dir`` holds another run and neither ``resume`` nor ``overwrite`` is set.
        NoCheckpointError: ``resume`` but ``output_dir`` holds no checkpoint.
    """
    run = Run(cfg, resume=resume, overwrite=overwrite, accelerator=accelerator)
    g = cfg.growth
    task = _load_task(cfg)
    base_depth = cfg.model.depth + (g.max_insertions if g.method == "fixed" else 0)
    net = _build(cfg, task, base_depth, run)
    loss_mean, loss_sum = _losses(task.kind)
    run.write_config()
    run.check_disk(_checkpoint_bytes(net, base_depth, g.max_insertions))
    net, optimizer, state, manifest, best_model = _start_or_resume(run, task, base_depth, net)
    val_batches = run.batches(task.val, cfg.train.batch_size)
    probe_batches = run.batches(task.train, cfg.probe.batch_size, cfg.probe.batches)
    test_batches = run.batches(task.test, cfg.train.batch_size)
    run.start(net, optimizer, manifest, state, train_set=task.train, val_batches=val_batches,
              epochs=cfg.train.epochs, kind=task.kind, loss=loss_mean, desc=f"grow[{g.method}]", full_batch=True)
    detector = PlateauDetector(g.patience, g.min_delta)
    if state.plateau:
        detector.load_state_dict(state.plateau)

    while state.epoch < cfg.train.epochs:
        depth = base_depth + len(manifest["insertions"])
        val = run.train_epoch(columns={"depth": depth, "params": count_parameters(run.net)})
        if val is None:  # train.max_steps spent
            break
        best_model = _keep_best(run, state, val, best_model)
        grew = _growth_step(run, state, detector, val, probe_batches, val_batches, loss_sum, base_depth)
        if grew or run.checkpoint_due() or state.epoch == cfg.train.epochs:
            run.checkpoint()
        if stop_after_epoch is not None and state.epoch >= stop_after_epoch:
            run.checkpoint()
            run.acc.wait_for_everyone()
            return {"stopped_at_epoch": state.epoch}

    results = _results(run, state, base_depth, best_model, test_batches, task)
    run.say(run.model_line(f"best validation model (epoch {state.best_epoch})", {"test": results["test_error"]},
                           results["best_depth"], results["best_params"]))
    run.say(run.model_line(f"final model (epoch {state.epoch})", {"test": results["final_test_error"]},
                           results["depth"], results["params"]))
    run.finish(results)
    return results


# ---------------------------------------------------------------------------------------------- set-up
def _load_task(cfg: RunConfig) -> Task:
    d = cfg.data
    return load_task(d.name, seed=cfg.seed, num_train=d.num_train, num_val=d.num_val, num_test=d.num_test,
                     grid=d.grid, noise=d.noise, image_size=d.image_size, **source_options(d))


def _build(cfg: RunConfig, task: Task, depth: int, run: Run) -> nn.Module:
    """The starting network at ``depth`` blocks, on the run's device."""
    return build_model(cfg.model, task.input_shape, task.num_outputs, depth=depth).to(run.device)


def _start_or_resume(run: Run, task: Task, base_depth: int, net: nn.Module) -> tuple:
    """``(net, optimizer, state, manifest, best model)``: fresh, or rebuilt from ``output_dir/latest``.

    Under FSDP ``net`` is sharded in place once the run prepares it; events, checkpoints and best copies
    then use the full weights (:meth:`~topotransfer.training.run.Run.plain`).
    """
    cfg = run.cfg
    ckpt = run.checkpoint_to_resume()
    if ckpt is None:
        manifest = {
            "format": 1, "task": task.name, "kind": task.kind, "model": to_dict(cfg.model), "base_depth": base_depth,
            "input_shape": list(task.input_shape), "num_outputs": task.num_outputs, "insertions": [],
        }
        state = GrowState(growth_done=cfg.growth.method == "fixed",
                          plateau=PlateauDetector(cfg.growth.patience, cfg.growth.min_delta).state_dict())
        return net, build_optimizer(net, cfg.train), state, manifest, copy.deepcopy(net)
    # every rank reads the same checkpoint: the architecture (replayed insertions), then weights and state
    manifest = read_manifest(ckpt)
    replay_insertions(net, manifest["insertions"])
    state = run.read_state(ckpt, GrowState)
    for name, p in net.named_parameters():
        p.requires_grad_(name not in set(state.frozen))
    optimizer = build_optimizer(net, cfg.train)
    run.load_weights(ckpt, net, optimizer)
    return net, optimizer, state, manifest, _resume_best(run, task, base_depth, net, state, manifest)


def _resume_best(run: Run, task: Task, base_depth: int, net: nn.Module, state: GrowState, manifest: dict) -> nn.Module:
    """The best-validation model of a resumed run: the copy written at ``state.best_epoch`` (``best``, or
    ``best.previous`` when the run stopped between a newer copy and the checkpoint that records its epoch),
    rebuilt with the insertions it had; the loaded ``net`` itself when it is that epoch's model."""
    path = side_copy(run.out, "best", state.best_epoch)
    if path is None and state.best_epoch == state.epoch and state.best_insertions == len(manifest["insertions"]):
        return copy.deepcopy(net)
    if path is None:  # e.g. deleted by hand: lose the copy, not the run
        run.say(f"warning: {run.out} holds no best-validation copy of epoch {state.best_epoch}; the best model is "
                f"tracked again from epoch {state.epoch + 1}")
        state.best_val, state.best_epoch, state.best_insertions = None, None, len(manifest["insertions"])
        return copy.deepcopy(net)
    best_model = replay_insertions(_build(run.cfg, task, base_depth, run), manifest["insertions"][: state.best_insertions])
    run.load_weights(path, best_model)
    return best_model


def _checkpoint_bytes(net: nn.Module, base_depth: int, max_insertions: int) -> int:
    """A generous estimate of the disk the run's checkpoints take at the final depth
    (:func:`~topotransfer.training.checkpoint.checkpoint_disk_bytes` of the grown network's weights)."""
    grown = count_parameters(net) * (base_depth + max_insertions) / max(base_depth, 1)
    return checkpoint_disk_bytes(int(grown * next(net.parameters()).element_size())) + (1 << 20)


# ---------------------------------------------------------------------------------------------- the epoch
def _keep_best(run: Run, state: GrowState, val: dict, best_model: nn.Module) -> nn.Module:
    """The model with the best validation loss so far (written to ``output_dir/best`` with the next checkpoint:
    a full-batch run improves every epoch)."""
    if state.best_val is not None and val["loss"] >= state.best_val:
        return best_model
    state.best_val, state.best_epoch = val["loss"], state.epoch
    state.best_insertions = len(run.manifest["insertions"])
    best_model = run.snapshot()
    run.save_copy("best", best_model, {"epoch": state.epoch})
    return best_model


def _growth_step(run: Run, state: GrowState, detector: PlateauDetector, val: dict, probe_batches: list,
                 val_batches: list, loss_sum: nn.Module, base_depth: int) -> bool:
    """A growth event when the validation loss plateaus (or a stage ends), within the budgets. Returns
    whether a layer was inserted."""
    cfg, g = run.cfg, run.cfg.growth
    since = state.epoch - state.last_event_epoch  # epochs of this stage
    plateau = detector.update(val["loss"]) if since % g.check_every == 0 else False
    state.plateau = detector.state_dict()
    if g.epochs_per_stage is not None:
        plateau = since >= g.epochs_per_stage
    elif g.max_stage_epochs is not None:
        plateau = plateau or since >= g.max_stage_epochs
    if not plateau or state.growth_done or state.epoch >= cfg.train.epochs:
        return False
    if _over_budget(run, base_depth):
        state.growth_done = True
        return False
    # Growth event, a visible step here rather than a callback: sync, unwrap (the derivative and line search run in float32+), grow in
    # place, new optimizer carrying the surviving parameters' state, prepare again (re-shard).
    net, optimizer = run.plain()
    ev = grow_once(
        net, g.method, probe_batches, val_batches, loss_sum, event=len(state.events), epoch=state.epoch,
        seed=cfg.seed, probe_cfg=cfg.probe, epsilons=g.epsilons, setting=cfg.data.name, accelerator=run.acc, both_signs=g.both_signs, fill_inactive=g.fill_inactive, init_mix=g.init_mix, site_selection=g.site_selection,
    )
    if ev.site is None:
        state.growth_done = True
    else:
        optimizer = rebuild_after_growth(optimizer, net, cfg.train)
        detector.reset()
        state.plateau = detector.state_dict()
        state.last_event_epoch = state.epoch
        state.frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    run.record_event(ev.to_dict(), net, optimizer, depth=ev.depth)
    return ev.site is not None


def _over_budget(run: Run, base_depth: int) -> bool:
    """The insertion, depth or parameter budget is reached."""
    g, depth = run.cfg.growth, base_depth + len(run.manifest["insertions"])
    return (
        len(run.manifest["insertions"]) >= g.max_insertions
        or (g.max_depth is not None and depth >= g.max_depth)
        or (g.max_params is not None and count_parameters(run.net) >= g.max_params)
    )


# ---------------------------------------------------------------------------------------------- the end
def _results(run: Run, state: GrowState, base_depth: int, best_model: nn.Module, test_batches: list,
             task: Task) -> dict:
    """Test error of the best-validation model and of the final one, with the depth and size of each."""
    test = run.evaluate(best_model, test_batches)
    final_test = run.evaluate(run.net, test_batches)
    insertions = len(run.manifest["insertions"])
    return {
        "method": run.cfg.growth.method,
        "task": task.name,
        "seed": run.cfg.seed,
        "test_error": test["error"],
        "test_loss": test["loss"],
        "final_test_error": final_test["error"],
        "best_epoch": state.best_epoch,
        "depth": base_depth + insertions,
        "best_depth": base_depth + state.best_insertions,
        "params": count_parameters(run.net),
        "best_params": count_parameters(best_model),
        "insertions": insertions,
        "wall_time": run.elapsed(),
        "num_processes": run.acc.num_processes,
        "distributed": {"type": str(run.acc.distributed_type.value), "sharded": is_sharded(run.model)},
        "events": state.events,
    }
