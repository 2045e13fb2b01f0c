"""The life cycle every recipe shares, as one small class: :class:`Run`.

A recipe (``recipes/grow.py``, ``recipes/adapt.py``, ...) reads top to bottom as named steps and calls
the skeleton for everything that is not specific to it::

    run = Run(cfg, resume=resume, overwrite=overwrite, accelerator=accelerator)   # output dir, accelerator, seed
    task, net = <load data>, <build model>                                        # recipe
    run.write_config()                                                            # only after set-up succeeded
    ckpt = run.checkpoint_to_resume()                                             # None: a fresh run
    state = MyState() if ckpt is None else run.read_state(ckpt, MyState)          # typed run state
    if ckpt is not None: run.load_weights(ckpt, net, optimizer)                  # after replaying its manifest
    run.start(net, optimizer, manifest, state, train_set=task.train, val_batches=run.batches(task.val, bs),
              epochs=budget, kind=task.kind, loss=loss_mean, desc="myrecipe")
    while state.epoch < budget:
        val = run.train_epoch(columns={...})          # one epoch, validation, history row, divergence check
        if val is None: break                         # train.max_steps spent
        if <event due>:                               # recipe: growth / insertion
            net, optimizer = run.plain()              # synced, unwrapped (full weights under FSDP)
            record = <change net>; optimizer = <new optimizer>
            run.record_event(record, net, optimizer)  # cross-rank digests, manifest, prepared again, event line
        if run.checkpoint_due(): run.checkpoint()
    results = {"test_error": run.evaluate(run.net, test_batches)["error"], ...}
    run.finish(results)                               # last checkpoint, results.json, process group

What the skeleton owns:

- the output directory: writable, and not another run's (results or checkpoints) unless ``resume`` or
  ``overwrite`` (:class:`~topotransfer.errors.RunExistsError`); nothing is written into it before
  :meth:`Run.write_config`;
- the accelerator (built from ``cfg.device`` / ``cfg.train.mixed_precision`` unless given; ended at the end
  when it built it), the global seed, the evaluation / probe batch shards of each rank;
- the typed run state (:class:`RunState`, a recipe subclasses it with its own fields) that a checkpoint's
  ``state.json`` holds, and the resume of it (every rank's RNG states of a mid-epoch checkpoint);
- the epoch: shuffled loader (same shuffle on every rank), the LR schedule over the run's global step,
  mid-epoch checkpoints, NaN / inf detection with a message naming the checkpoint that stays ``latest``,
  validation, the history row, the progress bar;
- events: the synced plain model to change, the digests proving every rank made the same change, the
  manifest of insertions (replayed on resume), the optimizer prepared again, one printed line per event;
- checkpoints (atomic, main process only; a frozen backbone left out), wall time per phase, results.json.

What a recipe supplies: the model and data set-up, which parameters train in which phase (its optimizer),
what an event does, and its results.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from ..config import RunConfig, to_dict
from ..errors import NoCheckpointError, RunExistsError
from ..surgery.labels import label_event
from .checkpoint import (
    check_finite,
    check_free_space,
    divergence_error,
    gather_rng_states,
    latest_checkpoint,
    load_checkpoint,
    resume_rng_states,
    save_checkpoint,
    write_json_atomic,
)
from .distributed import (
    all_equal,
    all_equal_digest,
    build_accelerator,
    is_fsdp,
    plain_model,
    prepare_again,
    raw_optimizer,
    shard,
    value_digest,
)
from .loop import evaluate, make_loader, train_run_epoch

__all__ = [
    "RUN_FILES",
    "Run",
    "RunState",
    "batches",
    "check_output_dir",
    "event_line",
    "loss_functions",
    "read_manifest",
    "trained_tensors",
]

# What marks a directory as holding a run: its results, its history, its checkpoints and exports.
RUN_FILES = ("results.json", "history.json", "latest", "last", "last.previous", "best", "adapter", "merged")

S = TypeVar("S", bound="RunState")


@dataclass
class RunState:
    """The run's position and record: what a checkpoint's ``state.json`` holds (JSON-able fields only).

    A recipe subclasses it with its own fields (growth: plateau detector, best model; adapt: phase).

    Attributes:
        epoch: epochs completed.
        steps: optimizer steps taken over the whole run (the LR schedule's position).
        history: one row per epoch (train loss, validation loss / error, lr, steps, time, recipe columns).
        events: one record per growth / insertion event.
        wall_time: seconds spent up to the last checkpoint (a resumed run adds to it).
        epoch_progress: ``{"batches", "loss_sum", "count"}`` of a mid-epoch checkpoint, else ``None``.
        timings: seconds per phase of the run (training, evaluation, saving, derivative, line search ...).
        cpu_timings: CPU seconds of this process per phase (``time.process_time``, all its threads), the same
            keys: on a shared machine the wall times of two runs are not comparable, their CPU times are.
    """

    epoch: int = 0
    steps: int = 0
    history: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    wall_time: float = 0.0
    epoch_progress: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[S], saved: dict) -> S:
        """The state of a ``state.json`` (keys this class does not know are ignored; missing ones default)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


# ---------------------------------------------------------------------------------------------- helpers
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


def existing_run(path: str | Path) -> list[str]:
    """The names in ``path`` (of :data:`RUN_FILES`) that show it holds a run; empty when it holds none."""
    path = Path(path)
    return [name for name in RUN_FILES if (path / name).exists()]


def loss_functions(kind: str) -> tuple[nn.Module, nn.Module]:
    """(mean-reduced loss to train with, sum-reduced loss for the derivative and the line search)."""
    if kind == "classification":
        return nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    return nn.MSELoss(), nn.MSELoss(reduction="sum")


def batches(dataset, batch_size: int, limit: int | None = None) -> list:
    """The first ``limit`` (all when None) batches of ``dataset`` in order, as a re-iterable list."""
    loader = make_loader(dataset, batch_size, shuffle=False)
    out = []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        out.append(tuple(batch))
    return out


def read_manifest(path: str | Path) -> dict:
    """The architecture manifest of a checkpoint directory."""
    return json.loads((Path(path) / "manifest.json").read_text())


def trained_tensors(model: nn.Module, frozen_ids: set[int]) -> dict[str, torch.Tensor]:
    """The state-dict entries a checkpoint holds: all but the frozen parameters' (ids in ``frozen_ids``)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in frozen_ids}


def event_line(record: dict, depth: int | None = None, params: int | None = None) -> str:
    """One readable line for a growth / insertion event record.

    ``event 2 @ epoch 8: blocks.1 | quadratic blocks.0=1.2e-03 blocks.1=3.4e-03 | eps 0.01 | held-out loss 12.3
    -> 11.9 | depth 3, 1,234 params`` (or ``... stopped: score<=0``). The scores are named by what they are
    (``record["score_kind"]``, ``probe.score``): ``quadratic`` = theta^T Q_t theta of each site's direction,
    ``TD`` = lambda_max(Q_t) (records without a kind: TD, what they held before the kind was recorded).
    """
    scores = " ".join(f"{site}={score:.3g}" for site, score in (record.get("scores") or {}).items())
    head = f"event {record['event'] + 1} @ epoch {record.get('epoch')}"
    parts = [f"{head}: {record['site'] or 'no insertion'}"]
    if scores:
        parts.append(f"{'quadratic' if record.get('score_kind') == 'quadratic' else 'TD'} {scores}")
    if record["site"] is None:
        parts.append(f"stopped: {record.get('stopped')}")
    else:
        if record.get("epsilon") is not None:
            parts.append(f"eps {record['epsilon']:.3g}")
        before, after = record.get("loss_before"), record.get("loss_after")
        if before is not None and after is not None and not (math.isnan(before) or math.isnan(after)):
            parts.append(f"held-out loss {before:.4g} -> {after:.4g}")
        if depth is not None and params is not None:
            parts.append(f"depth {depth}, {params:,} params")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------- the run
class Run:
    """One run's life cycle (module docstring). Attributes a recipe reads:

    Attributes:
        cfg: the run configuration.
        acc: the ``accelerate.Accelerator``; ``main``: whether this is the main process; ``device``.
        out: the output directory.
        net: the plain module (names, evaluation, events, checkpoints). Under FSDP it is sharded in place;
            :meth:`plain` and :meth:`snapshot` give full copies.
        model, optimizer: what the accelerator prepared from ``net`` (the model is used only to train).
        state: the typed run state (:class:`RunState` or a recipe's subclass).
        manifest: the JSON architecture manifest of the checkpoints (``"insertions"`` replayed on resume).
        frozen_ids: ids of parameters that never change and that checkpoints leave out (a frozen backbone).
    """

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, accelerator=None) -> None:
        """Check the output directory (nothing is written into it), build the accelerator, seed torch.

        Raises:
            OSError: the output directory cannot be written.
            RunExistsError: it holds another run and neither ``resume`` nor ``overwrite`` is set.
            NoCheckpointError: ``resume`` but it holds no checkpoint.
        """
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite
        self.out = check_output_dir(cfg.output_dir)
        found = existing_run(self.out)
        if found and not (resume or overwrite):
            raise RunExistsError(
                f"{self.out} already holds a run ({', '.join(found)}): continue it with --resume, replace it "
                "with --overwrite, or choose another output_dir"
            )
        if resume and latest_checkpoint(self.out) is None:
            raise NoCheckpointError(
                f"--resume: {self.out} holds no checkpoint, so there is nothing to resume; start the run without "
                "--resume" + (" (add --overwrite: the directory holds an earlier run's files)" if found else "")
            )
        self.own_accelerator = accelerator is None
        self.acc = accelerator if accelerator is not None else build_accelerator(cfg.device, cfg.train.mixed_precision)
        self.main = self.acc.is_main_process
        self.device = self.acc.device
        self.fsdp = is_fsdp(self.acc)
        self.frozen_ids: set[int] = set()
        self.rng_states: list[dict] | None = None  # every rank's RNG states of a mid-epoch checkpoint being resumed
        self.bar = None
        self._timers: list[list] = []  # open timed() blocks: [key, start, cpu start, nested seconds, nested cpu]
        self._copies: dict[str, tuple] = {}  # side copies (name -> (module, state)) for the next checkpoint
        torch.manual_seed(cfg.seed)

    # ------------------------------------------------------------------------------------------ set-up
    def write_config(self) -> None:
        """Write ``config.yaml`` (after the recipe's data and model set-up succeeded). With ``overwrite``, the
        earlier run's results, history, checkpoints and exports are removed first (they are not this run's)."""
        if not self.main:
            return
        if self.overwrite and not self.resume:
            for name in existing_run(self.out):
                target = self.out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def batches(self, dataset, batch_size: int, limit: int | None = None) -> list:
        """This rank's share of the first ``limit`` batches of ``dataset`` (sums over them are reduced over ranks)."""
        return shard(batches(dataset, batch_size, limit), self.acc)

    def check_disk(self, need_bytes: int) -> None:
        """Refuse a disk that cannot take this run's checkpoints, before any training."""
        if self.main:
            check_free_space(self.out, need_bytes)

    def checkpoint_to_resume(self) -> Path | None:
        """``output_dir/latest`` when resuming (checked to exist when the run was made), else None (fresh)."""
        return latest_checkpoint(self.out) if self.resume else None

    def read_state(self, ckpt: Path, state_cls: type[S]) -> S:
        """The run state of checkpoint ``ckpt`` (and, when it was written mid-epoch, every rank's RNG state)."""
        saved = json.loads((Path(ckpt) / "state.json").read_text())
        state = state_cls.from_dict(saved)
        self.rng_states = resume_rng_states(ckpt, saved, self.acc.num_processes)
        return state

    def load_weights(self, ckpt: Path, net: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Load a checkpoint's weights (all but :attr:`frozen_ids`') and optimizer state into a rebuilt ``net``."""
        keys = set(trained_tensors(net, self.frozen_ids)) if self.frozen_ids else None
        load_checkpoint(ckpt, net, optimizer, keys=keys)

    def start(
        self, net: nn.Module, optimizer: torch.optim.Optimizer, manifest: dict, state: RunState, *, train_set,
        val_batches: list, epochs: int, kind: str, loss: Callable, desc: str, full_batch: bool = False,
    ) -> None:
        """Prepare ``net`` and ``optimizer``, start the clock and the progress bar.

        Args:
            train_set: the training dataset (shuffled per epoch).
            val_batches: this rank's validation batches (:meth:`batches`).
            epochs: the run's epoch budget (the LR schedule runs over its steps, the bar over its epochs).
            kind: "classification" or "regression" (what validation reports).
            loss: the mean-reduced training loss.
            desc: the progress bar's label.
            full_batch: on one process, when one batch holds the whole (tensor) training set, train on it as
                stored, without the per-example DataLoader (a shuffle cannot change the one step).
        """
        self.manifest, self.state, self.kind, self.loss, self.epochs = manifest, state, kind, loss, epochs
        self.train_set, self.val_batches = train_set, val_batches
        self.full_batch = None
        if (full_batch and isinstance(train_set, TensorDataset) and self.acc.num_processes == 1
                and self.cfg.train.batch_size >= len(train_set) and self.cfg.train.checkpoint_every_steps is None):
            self.full_batch = [tuple(train_set.tensors)]
        self.rewrap(net, optimizer)
        # The LR schedule runs over the run's optimizer steps (each rank takes one step per N batches).
        steps_per_epoch = math.ceil(math.ceil(len(self.train_set) / self.cfg.train.batch_size) / self.acc.num_processes)
        self.total_steps = epochs * steps_per_epoch
        if self.cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, self.cfg.train.max_steps)
        self.started = time.perf_counter() - state.wall_time
        if self.cfg.progress and self.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, initial=state.epoch, total=epochs)

    # ------------------------------------------------------------------------------------------ training
    def train_epoch(self, columns: dict | None = None, phase: str | None = None, timing: str = "training") -> dict | None:
        """Train one epoch, validate, append the history row; None when ``train.max_steps`` is spent.

        Args:
            columns: recipe columns of the history row (depth, parameters ...).
            phase: the phase name recorded in the row (omitted when None).
            timing: the :attr:`RunState.timings` key the training time goes to.

        Returns:
            The validation result ``{"loss", "metric", "error"}``.

        Raises:
            FloatingPointError: a training or validation loss became NaN / inf (the message names the
                checkpoint that stays ``latest``).
        """
        cfg, state = self.cfg, self.state
        left = None if cfg.train.max_steps is None else cfg.train.max_steps - state.steps
        if left is not None and left <= 0:
            return None
        epoch = state.epoch
        # Same shuffle on every rank (seeded by epoch); accelerate hands each rank every n-th batch. Dropout
        # draws from the global generator, seeded per (epoch, rank) by train_run_epoch.
        loader = self.full_batch or self.acc.prepare_data_loader(
            make_loader(self.train_set, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
        )
        try:
            with self.timed(timing):
                train_loss, _ = train_run_epoch(
                    self.model, loader, self.optimizer, self.loss, self.device, left, accelerator=self.acc,
                    state=state, seed=cfg.seed, epoch=epoch, total_steps=self.total_steps, train_cfg=cfg.train,
                    rng_states=self.rng_states, checkpoint=self.checkpoint,
                )
        except FloatingPointError as e:
            raise divergence_error(e, self.out, epoch + 1) from e
        state.epoch = epoch + 1
        val = self.evaluate(self.net, self.val_batches)
        if not math.isfinite(val["loss"]):
            raise divergence_error(FloatingPointError(f"Validation loss is {val['loss']}"), self.out, epoch + 1)
        row = {"epoch": epoch + 1, **({} if phase is None else {"phase": phase}), "train_loss": train_loss,
               "val_loss": val["loss"], "val_error": val["error"], **(columns or {}),
               "lr": self.optimizer.param_groups[0]["lr"], "steps": state.steps, "time": self.elapsed()}
        state.history.append(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {train_loss:.4g}, val {self.metric_text(val['error'])}")
        return val

    def evaluate(self, model: nn.Module, data: list) -> dict:
        """Mean loss and error of ``model`` on this rank's ``data`` shard, reduced over the ranks."""
        with self.timed("evaluation"):
            return evaluate(model, data, self.kind, self.device, accelerator=self.acc)

    def checkpoint_due(self) -> bool:
        """Whether the epoch just finished is a ``train.checkpoint_every`` multiple."""
        return self.state.epoch % self.cfg.train.checkpoint_every == 0

    def metric_text(self, error: float | None) -> str:
        """An error as people read it: percent (classification) or MSE (regression)."""
        if error is None:
            return "n/a"
        if self.kind == "causal_lm":  # loop.evaluate's error of a language model is its perplexity
            return f"perplexity {error:.4g}"
        return f"{100 * error:.2f} %" if self.kind == "classification" else f"MSE {error:.4g}"

    def model_line(self, label: str, errors: dict[str, float | None], depth: int, params: int) -> str:
        """``best validation model (epoch 9): test 3.20 % | depth 3, 1,153 params``: one model of the summary."""
        shown = ", ".join(f"{split} {self.metric_text(e)}" for split, e in errors.items())
        return f"{label}: {shown} | depth {depth}, {params:,} params"

    # ------------------------------------------------------------------------------------------ events
    def plain(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Sync the ranks and return the plain model and torch optimizer to change (an event, a new phase).

        Drops the autocast wrapper (the derivative and the line search run in float32+); under FSDP a full
        copy gathered from the shards. Continue training only after :meth:`rewrap` (or :meth:`record_event`).
        """
        self.acc.wait_for_everyone()
        self.net, optimizer = plain_model(self.acc, self.model, self.optimizer)
        return self.net, optimizer

    def rewrap(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Prepare a (changed) plain model and its new optimizer for training (re-wrap, re-shard)."""
        self.acc.free_memory()
        self.net = net
        self.model, self.optimizer = prepare_again(self.acc, net, raw_optimizer(optimizer))

    def record_event(self, record: dict, net: nn.Module, optimizer: torch.optim.Optimizer, *,
                     depth: int | None = None, insertions: list[dict] | None = None) -> None:
        """Book an event that changed ``net`` in place (``record["site"]`` None: nothing was inserted).

        Proves every rank computed the same scores and, after an insertion, holds the same parameters
        (identical reduced statistics give identical layers; checked before DDP's re-wrap broadcasts rank
        0's weights and would hide a divergence, and FSDP shards each rank's own copy); appends the
        insertion to the manifest, the stable site labels to the record (``insertions``: every insertion the
        model holds, in order, this one included; default the manifest's), the record to the events, prints
        the event line, prepares again.
        """
        record["score_checksums"] = all_equal(value_digest(record.get("scores", {})), self.acc, "derivative scores")
        if record["site"] is not None:
            record["param_checksums"] = all_equal_digest(net, self.acc, "parameters")
            for ins in record.get("layers") or [record]:  # an event with a parameter budget inserts several
                self.manifest["insertions"].append({"site": ins["site"], "layer": ins["layer"], "epoch": self.state.epoch})
        label_event(record, net, self.manifest["insertions"] if insertions is None else insertions)
        for key in ("derivative", "line_search"):  # the event's own phases (seconds), see growth.grow_once
            self.add_time(key, record.get("seconds", {}).get(key, 0.0), record.get("cpu_seconds", {}).get(key, 0.0))
        self.state.events.append(record)
        self.say(event_line(record, depth, sum(p.numel() for p in net.parameters())))
        self.rewrap(net, optimizer)

    def say(self, line: str) -> None:
        """Print one line on the main process (under the progress bar when there is one)."""
        if not (self.main and self.cfg.progress):
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def snapshot(self) -> nn.Module:
        """A standalone copy of the current weights (a "best model"); under FSDP gathered from the shards."""
        return plain_model(self.acc, self.model)[0] if self.fsdp else copy.deepcopy(self.net)

    # ------------------------------------------------------------------------------------------ saving
    def checkpoint(self, name: str = "last") -> None:
        """Write the resumable checkpoint ``output_dir/name`` and ``history.json`` (every rank calls it)."""
        state = self.state
        state.wall_time = self.elapsed()
        with self.timed("saving"):
            if self.main:
                for copy_name, (copy_net, copy_state) in self._copies.items():
                    # a copy that shares the frozen backbone's parameters saves only the rest, like `last`
                    kept = trained_tensors(copy_net, self.frozen_ids) if self.frozen_ids else None
                    save_checkpoint(self.out, copy_name, copy_net, self.manifest, None, copy_state,
                                    update_latest=False, tensors=kept)
            self._copies.clear()
            # FSDP: the full weights and optimizer state, gathered on every rank (a collective)
            net, optimizer = plain_model(self.acc, self.model, self.optimizer) if self.fsdp else (self.net, self.optimizer)
            check_finite(net)
            # mid-epoch: every rank's RNG state (a collective too), so dropout / augmentation draws continue
            rngs = gather_rng_states(self.acc) if state.epoch_progress is not None else None
            if self.main:
                tensors = trained_tensors(net, self.frozen_ids) if self.frozen_ids else None
                save_checkpoint(self.out, name, net, self.manifest, raw_optimizer(optimizer), state.to_dict(),
                                tensors=tensors, rng_states=rngs)
                write_json_atomic(self.out / "history.json", {"epochs": state.history, "events": state.events})

    def save_copy(self, name: str, net: nn.Module, state: dict) -> None:
        """A side copy of ``net``'s weights (``output_dir/best``), written with the next :meth:`checkpoint`
        (``latest`` keeps pointing at ``last``); a newer copy of the same name replaces one not yet written."""
        self._copies[name] = (net, state)

    def finish(self, results: dict, export: Callable[[Path], None] | None = None) -> None:
        """Last checkpoint, the recipe's exports (main process), ``results.json`` (with the wall time of each
        phase), then the ranks meet before the process group is torn down."""
        self.checkpoint()
        if self.main and export is not None:
            with self.timed("saving"):
                export(self.out)
        results["phase_times"] = dict(self.state.timings)
        results["phase_cpu_times"] = dict(self.state.cpu_timings)
        if self.main:
            write_json_atomic(self.out / "results.json", results)
        if self.bar is not None:
            self.bar.close()
        # Every rank reaches here before the process group is torn down (gloo aborts a process group whose
        # peer has left).
        self.acc.wait_for_everyone()
        if self.own_accelerator and self.acc.num_processes > 1:
            self.acc.end_training()

    # ------------------------------------------------------------------------------------------ time
    def elapsed(self) -> float:
        """Seconds of this run, earlier sessions of a resumed run included."""
        return time.perf_counter() - self.started

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the seconds (wall and CPU) the block takes to ``state.timings[key]`` / ``state.cpu_timings[key]``,
        less those of blocks timed inside it (a mid-epoch checkpoint is saving, not training)."""
        timer = [key, time.perf_counter(), time.process_time(), 0.0, 0.0]
        self._timers.append(timer)
        try:
            yield
        finally:
            self._timers.pop()
            seconds, cpu = time.perf_counter() - timer[1], time.process_time() - timer[2]
            self.add_time(key, seconds - timer[3], cpu - timer[4])
            if self._timers:
                self._timers[-1][3] += seconds
                self._timers[-1][4] += cpu

    def add_time(self, key: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        """Book ``seconds`` of wall time and ``cpu_seconds`` of this process's CPU time to phase ``key``."""
        if seconds:
            self.state.timings[key] = self.state.timings.get(key, 0.0) + seconds
        if cpu_seconds:
            self.state.cpu_timings[key] = self.state.cpu_timings.get(key, 0.0) + cpu_seconds
