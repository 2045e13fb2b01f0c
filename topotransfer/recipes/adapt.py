"""Adapt a pretrained Hugging Face backbone to a new dataset (docs/method.md section 9), or run a baseline.

    load the backbone with a new head for the target labels, freeze the backbone
    -> train the head (adjoints from a random head are noise)                          head_epochs
    -> with adapt.lora: LoRA + head (the derivative then sees the adapted model)       lora_warmup_epochs
    -> topo | random_site | last_block, ``insertions`` times:
           TD on target data at every site (or the random / last one) -> TopoLayer with the
           eigenvector direction, eps by line search -> train new layers + head (+ LoRA)  epochs_per_insertion
       linear_probe | full_finetune | lora: train head | everything | LoRA + head for the same budget
    -> final_epochs -> test error -> output_dir/{config.yaml, results.json, adapter/, merged/}

The backbone's weights are fingerprinted before training and checked at the end: they must be bit
identical for every method but ``full_finetune``. The inserted layers, the head and the LoRA matrices
are an adapter over the untouched base (:mod:`topotransfer.adapter`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import TopoAdapter, head_module_names, load_adapter, merge_and_save, save_adapter, unwrap_peft
from ..budget import insert_budgeted, lora_parameter_count, lora_shapes, split_budget
from ..config import AdaptConfig, ConfigError, RunConfig, TrainConfig
from ..data import Task, setting_key
from ..errors import CheckpointMismatchError, LabelCountMismatchError
from ..growth import count_parameters, random_site_generator, realized_site
from ..init_rules import probe_site_results
from ..insertion import DEFAULT_EPSILONS, insert_layer, line_search_epsilon
from ..layers import LowRankTopoLayer
from ..models.hf import load_backbone
from ..preprocess import load_for_backbone
from ..requirements import check_requirements
from ..surgery import get_family
from ..surgery.labels import label_insertions
from ..training.checkpoint import (
    checkpoint_disk_bytes,
    latest_checkpoint,
    load_checkpoint,
    replay_insertions,
    side_copy,
)
from ..training.distributed import is_fsdp
from ..training.run import Run, RunState, read_manifest, trained_tensors
from ..training.run import loss_functions as _losses

__all__ = [
    "AdaptRun", "AdaptState", "apply_lora", "first_local_minimum_epsilon", "load_adapt_checkpoint", "lora_target_modules", "run_adapt",
]

INSERTION_METHODS = ("topo", "random_site", "last_block")
_PEFT_PREFIX = "base_model.model."


@dataclass
class AdaptRun:
    """What :func:`run_adapt` returns.

    Attributes:
        results: the JSON-able results (also in ``output_dir/results.json``).
        model: the adapted model (a peft ``PeftModel`` when LoRA is on), in eval mode.
        insertions: ordered insertion records ``{"site", "layer"}`` (site names relative to the
            transformers model).
    """

    results: dict
    model: nn.Module
    insertions: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- model setup
def lora_target_modules(model: nn.Module, requested: list[str] | None) -> list[str]:
    """LoRA targets: ``requested``, else q_proj/v_proj (transformers 5.x names), else query/value (4.x).

    Raises:
        ConfigError: nothing in the model matches the (requested or default) target names.
    """
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if requested is not None:
        missing = [t for t in requested if t not in leaves]
        if missing:
            raise ConfigError(f"adapt.lora_target_modules {missing} match no module of {type(model).__name__}")
        return list(requested)
    for pair in (["q_proj", "v_proj"], ["query", "value"]):
        if set(pair) <= leaves:
            return pair
    raise ConfigError(f"{type(model).__name__} has neither q_proj/v_proj nor query/value: set adapt.lora_target_modules")


def apply_lora(model: nn.Module, cfg: AdaptConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA (zero-initialised B: the function is unchanged).

    ``get_peft_model`` freezes every non-LoRA parameter; :func:`_set_trainable` re-enables the head and
    the inserted layers afterwards, and :func:`~topotransfer.adapter.save_adapter` saves them itself.
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, cfg.lora_target_modules)
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
    return get_peft_model(model, config)


def _set_trainable(model: nn.Module, head: list[str], *, backbone: bool, lora: bool, freeze_up: bool = False) -> None:
    """Only the head, the inserted layers and (optionally) LoRA / the whole backbone train; with ``freeze_up``
    the U of every rank-k layer stays at its one-hot eigen rows (adapt.lowrank_freeze_up)."""
    base, _ = unwrap_peft(model)
    for name, p in model.named_parameters():
        p.requires_grad_(backbone or (lora and "lora_" in name))
    for name in head:
        base.get_submodule(name).requires_grad_(True)
    for _, layer in get_family(model).inserted(model):
        layer.requires_grad_(True)
        if freeze_up and isinstance(layer, LowRankTopoLayer):
            layer.up.requires_grad_(False)


def _fast_params(model: nn.Module, head: list[str]) -> tuple[set[int], set[int]]:
    """ids of the head's parameters (``adapt.lr``) and of the inserted layers' (``adapt.layer_lr`` or ``adapt.lr``)."""
    base, _ = unwrap_peft(model)
    head_ids = {id(p) for name in head for p in base.get_submodule(name).parameters()}
    layer_ids = {id(p) for _, layer in get_family(model).inserted(model) for p in layer.parameters()}
    return head_ids, layer_ids


def _optimizer(
    model: nn.Module, head: list[str], cfg: AdaptConfig, train: TrainConfig, old: torch.optim.Optimizer | None = None
) -> torch.optim.Optimizer:
    """Optimizer over the trainable parameters: head at ``lr``, inserted layers at ``layer_lr`` (default ``lr``),
    backbone / LoRA at ``backbone_lr``. Parameters that survive from ``old`` keep their state (public
    ``optimizer.state``)."""
    head_ids, layer_ids = _fast_params(model, head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in head_ids], "lr": cfg.lr},
        {"params": [p for p in trainable if id(p) in layer_ids], "lr": cfg.layer_lr or cfg.lr},
        {"params": [p for p in trainable if id(p) not in head_ids | layer_ids], "lr": cfg.backbone_lr or cfg.lr},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("nothing to train: the model has no trainable parameters")
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if train.optimizer in kinds:
        opt = kinds[train.optimizer](groups, weight_decay=train.weight_decay)
    else:
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=train.weight_decay)
    if old is not None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p in old.state:
                    opt.state[p] = old.state[p]
    return opt


def _fingerprint(params: list[tuple[str, nn.Parameter]]) -> dict[str, str]:
    """sha256 of every parameter's bytes (bit-exact comparison without keeping a copy)."""
    out = {}
    for name, p in params:
        data = p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------- one insertion
def first_local_minimum_epsilon(tried: list[tuple[float, float]]) -> float:
    """The eps of the line search's first local minimum along increasing eps (0.0: no eps lowers the loss).

    The topological derivative is a second-order statement about small eps, L(eps) ~ L(0) - eps^2 TD / 2:
    it chooses the site and the direction for the regime where the held-out loss starts to fall. Walking
    the grid upwards from eps = 0, the first eps whose loss rises above its predecessor's ends that regime;
    the best eps before it is kept. A lower loss further out (after the curve went up and came down again)
    belongs to a different basin the derivative says nothing about, and with a few held-out examples per
    class it is as likely an accident of those examples as a real improvement: on Fashion-MNIST with 10
    labels per class such an eps = 10 (an initial layer of norm 36) lowered the 100-example validation loss
    and left the model at 90 % test error.
    The line search stops at that first rise (``stop_at_rise``: the eps above it cannot change this rule's
    choice and are not evaluated), so ``eps_tried`` ends there and the global-minimum rule of
    :func:`~topotransfer.insertion.line_search_epsilon` recorded next to it (``eps_global_min``) is the best of
    the eps tried.

    Args:
        tried: ``[(eps, summed held-out loss), ...]`` as in ``LineSearchResult.tried`` (eps = 0 included).

    Returns:
        The chosen eps; 0.0 when the first grid point already raises (or does not lower) the loss.
    """
    points = sorted(tried)
    if not points or points[0][0] != 0.0:
        raise ValueError("the line search must include eps = 0 (the model without the layer)")
    best_eps, best_loss = points[0]
    previous = best_loss
    for eps, loss in points[1:]:
        if not math.isfinite(loss) or loss > previous:
            break  # the loss turned upwards: the local regime of the derivative ends here
        if loss < best_loss:
            best_eps, best_loss = eps, loss
        previous = loss
    return float(best_eps)


def _insertion_event(
    model: nn.Module, method: str, probe: list, heldout: list, loss_sum: nn.Module, cfg: RunConfig, event: int,
    accelerator=None,
) -> dict:
    """Compute TD, choose the site by ``method``, line-search eps, insert. Returns the event record.

    Under a multi-process ``accelerator``, ``probe`` and ``heldout`` are this rank's shards: the
    statistics and the line-search losses are summed over the ranks, so every rank inserts the same layer.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    results = probe_site_results(
        model, probe, loss_sum, cfg.probe, sites=_method_sites(model, method, cfg, event), accelerator=accelerator,
        progress=cfg.progress and getattr(accelerator, "is_main_process", True),
    )
    def per_site(value) -> dict[str, float]:
        return {r.site.removeprefix(_PEFT_PREFIX): float(value(r)) for r in results}

    # scores = what ranks the sites (probe.score, named by score_kind); both numbers are kept whatever ranks
    record = {"event": event, "method": method, "scores": per_site(lambda r: r.score), "site": None,
              "score_kind": results[0].score_kind if results else "", "lambda_max": per_site(lambda r: r.lambda_max),
              "quadratics": per_site(lambda r: r.quadratic), "seconds": {"derivative": time.perf_counter() - t0},
              "cpu_seconds": {"derivative": time.process_time() - c0}}
    best = max(results, key=lambda r: r.score)
    if method == "topo" and best.score <= 0:
        record["stopped"] = "score<=0"  # no insertion lowers the loss to second order
        return record
    grid = tuple(sorted(cfg.adapt.epsilons)) if cfg.adapt.epsilons else DEFAULT_EPSILONS
    budget = _insertion_budget(model, cfg, event)
    if budget is not None:  # rank-k layers at several sites (docs/method.md section 10)
        return _budgeted_insertion(model, results, record, budget, heldout, loss_sum, grid, cfg, accelerator)
    search = functools.partial(_eps_search, model=model, heldout=heldout, loss_sum=loss_sum, grid=grid,
                               accelerator=accelerator)
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "topo" and cfg.adapt.site_selection == "realized":
        best, (local, ls), realized = realized_site(results, search)
        record["realized"] = {name.removeprefix(_PEFT_PREFIX): loss for name, loss in realized.items()}
    else:
        _, (local, ls) = search(best)
    record["seconds"]["line_search"] = time.perf_counter() - t0
    record["cpu_seconds"]["line_search"] = time.process_time() - c0
    # eps = 0 would give a layer that never trains (sigma'(0) = 0 gives it zero gradient): when no eps
    # lowers the held-out loss, seed with the smallest eps of the grid and record it.
    eps = local if local > 0 else min(grid)
    insert_layer(model, best.site, best.weight, best.bias, epsilon=eps)
    theta = best.weight if best.bias is None else torch.cat([best.weight, best.bias[:, None]], dim=1)
    record.update(
        site=best.site.removeprefix(_PEFT_PREFIX), layer=best.layer_config, score=best.score, k=best.k,
        epsilon=eps, eps_fallback=local == 0, eps_global_min=ls.epsilon, init_norm=eps * float(theta.norm()),
        eps_tried=ls.tried, loss_before=ls.baseline_loss, loss_after=dict(ls.tried).get(eps),
    )
    return record


def _method_sites(model: nn.Module, method: str, cfg: RunConfig, event: int) -> list[str] | None:
    """The sites the method probes: all (topo), a random one (drawn per setting, seed and event), the last one."""
    sites = get_family(model).sites(model)
    if method == "random_site":
        gen = random_site_generator(cfg.seed, event, setting_key(cfg.data))  # per setting
        return [sites[int(torch.randint(len(sites), (1,), generator=gen))].name]
    if method == "last_block":
        return [sites[-1].name]
    return None


def _eps_search(result, *, model: nn.Module, heldout: list, loss_sum: nn.Module, grid: tuple, accelerator) -> tuple:
    """Line search along ``result``'s direction: ``(held-out loss at the chosen eps, (eps, the line search))``.

    The derivative vouches for the direction only near eps = 0: the first local minimum of the held-out loss
    along the grid is taken, not the global one (see :func:`first_local_minimum_epsilon`); the search stops
    after the first eps whose loss rises (the losses of the eps tried are those of a full search).
    """
    ls = line_search_epsilon(model, result.site, heldout, loss_sum, result.weight, result.bias, epsilons=grid,
                             accelerator=accelerator, stop_at_rise=True)
    local = first_local_minimum_epsilon(ls.tried)
    return dict(ls.tried).get(local, ls.baseline_loss), (local, ls)


def _insertion_budget(model: nn.Module, cfg: RunConfig, event: int) -> int | None:
    """Parameters insertion event ``event`` may spend on rank-k layers, or ``None`` without a budget.

    adapt.param_budget (or LoRA's parameter count at adapt.budget_lora_rank on the LoRA targets), minus LoRA's own
    parameters with adapt.lora (the same total budget), split evenly over the insertion events.

    Raises:
        ConfigError: LoRA alone spends the whole budget.
    """
    a = cfg.adapt
    if a.param_budget is None and a.budget_lora_rank is None:
        return None
    base, _ = unwrap_peft(model)
    shapes = lora_shapes(base, lora_target_modules(base, a.lora_target_modules))
    total = a.param_budget if a.param_budget is not None else lora_parameter_count(shapes, a.budget_lora_rank)
    if a.lora:
        total -= lora_parameter_count(shapes, a.lora_r)
    if total <= 0:
        raise ConfigError(f"LoRA rank {a.lora_r} alone spends the parameter budget: {total} left for inserted layers")
    return split_budget(total, max(1, a.insertions))[event]


def _budgeted_insertion(model, results, record, budget, heldout, loss_sum, grid, cfg, accelerator) -> dict:
    """Spend ``budget`` on rank-k layers over the probed sites (:func:`~topotransfer.budget.insert_budgeted`);
    the event record lists them under ``layers`` (``site`` / ``layer`` = the first, for the one-layer fields)."""
    a = cfg.adapt
    t0, c0 = time.perf_counter(), time.process_time()
    layers = insert_budgeted(
        model, results, budget, heldout, loss_sum, epsilons=grid, accelerator=accelerator,
        # eps = 0 gives a layer that never trains (sigma'(0) = 0): the smallest eps of the grid then, as for one layer
        choose_epsilon=lambda ls: first_local_minimum_epsilon(ls.tried) or min(grid),
        min_rank=a.budget_min_rank, max_rank=a.budget_max_rank, train_up=not a.lowrank_freeze_up,
    )
    # the eps line searches of every layer (and the insertions) count as the event's line search, like one layer's
    record["seconds"]["line_search"] = time.perf_counter() - t0
    record["cpu_seconds"]["line_search"] = time.process_time() - c0
    if not layers:
        record["stopped"] = "budget"  # no positive eigenvalue fits the budget
        return record
    for layer in layers:
        layer["site"] = layer["site"].removeprefix(_PEFT_PREFIX)
        layer["eps_fallback"] = dict(layer["eps_tried"])[layer["epsilon"]] >= layer["loss_before"]
    last = layers[-1]
    record.update(site=layers[0]["site"], layer=layers[0]["layer"], layers=layers, budget=budget,
                  parameters=sum(x["parameters"] for x in layers), score=max(r.score for r in results),
                  epsilon=layers[0]["epsilon"], loss_before=layers[0]["loss_before"],
                  loss_after=dict(last["eps_tried"])[last["epsilon"]])
    return record


# ---------------------------------------------------------------------------------------------- the recipe
def _load_data(cfg: RunConfig, backbone_config: object) -> tuple[Task, dict, Any]:
    """The task prepared for the backbone: sentences tokenised, or images resized and normalised.

    Returns:
        ``(task, preprocessing record for results.json, the tokenizer or None)``.

    Raises:
        UnsupportedModelError: a backbone of no known family (checked before any data is read).
        ModalityMismatchError: a text task for an image backbone, or an image task for a text backbone.
    """
    return load_for_backbone(cfg.data, cfg.seed, cfg.model.name_or_path, cfg.model.revision, backbone_config)


def run_adapt(cfg: RunConfig, resume: bool = False, accelerator=None, overwrite: bool = False) -> AdaptRun:
    """Adapt ``cfg.model.name_or_path`` to ``cfg.data.name`` with ``cfg.adapt.method``.

    Runs on one process or on every process of ``accelerate launch`` / ``torchrun`` (docs/distributed.md):
    each rank trains on every N-th batch of the epoch's shared shuffle (DDP averages the gradients),
    evaluates / probes its share of the validation and probe batches, and every sum a decision depends on
    (validation loss, the derivative's statistics, line-search losses) is reduced over the ranks, so all
    ranks insert the same layer; the parameter and score digests of every rank are compared after each
    insertion. Only the main process writes files.

    A resumable checkpoint (``output_dir/last``, :func:`load_adapt_checkpoint`) is written after every
    insertion event, every ``train.checkpoint_every`` epochs and at the end: the trained tensors (head,
    inserted layers, LoRA; everything for ``full_finetune``), the architecture manifest, the optimizer
    state and the schedule position.

    Args:
        cfg: the run configuration.
        resume: continue from ``output_dir/latest`` (same config).
        accelerator: an ``accelerate.Accelerator`` to run under (default: one built from ``cfg.device``
            and ``cfg.train.mixed_precision``, ended when the run finishes on several processes).
        overwrite: replace the run that ``output_dir`` holds (otherwise it is refused).

    Returns:
        :class:`AdaptRun` (results are also written to ``output_dir/results.json``).

    Raises:
        FloatingPointError: a training / validation loss or a parameter became NaN or inf; nothing is
            written after it, so ``output_dir/latest`` stays the last good checkpoint.
        CheckpointMismatchError: ``resume`` found a checkpoint of another base model, method or adapter.
        RunExistsError: ``output_dir`` holds another run and neither ``resume`` nor ``overwrite`` is set.
        NoCheckpointError: ``resume`` but ``output_dir`` holds no checkpoint.
        ConfigError: no ``model.name_or_path``, or LoRA targets that match nothing.
        ImageSizeError: the task's images cannot be fed to the backbone.
        ModalityMismatchError: a text task for an image backbone or an image task for a text backbone.
        UnsupportedModelError: a backbone of no supported family (``config.model_type``).
        EmptyDatasetError: an empty train or validation split.
        LabelCountMismatchError: ``adapt.adapter_path`` has a head for another number of classes.
        AdapterMismatchError: ``adapt.adapter_path`` was made on another base model.
    """
    from ..lm_data import is_corpus

    if is_corpus(cfg.data.name):  # a decoder LM on a text corpus: its own recipe (recipes/causal_lm.py)
        from .causal_lm import run_causal_lm

        return run_causal_lm(cfg, resume=resume, accelerator=accelerator, overwrite=overwrite)
    from transformers import AutoConfig

    a = cfg.adapt
    if not cfg.model.name_or_path:
        raise ConfigError("the adapt recipe needs model.name_or_path (a hub name or a local save_pretrained dir)")
    check_requirements(cfg)  # a missing package (peft for LoRA...) fails now, not after the head phase
    run = Run(cfg, resume=resume, overwrite=overwrite, accelerator=accelerator)  # before anything slow
    _refuse_fsdp(run)
    backbone_config = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision)
    task, preprocessing, tokenizer = _load_data(cfg, backbone_config)
    model, parts = _load_model(cfg, task, run)
    loss_mean, loss_sum = _losses("classification")
    run.write_config()
    val_batches = run.batches(task.val, cfg.train.batch_size)
    probe_batches = run.batches(task.train, cfg.probe.batch_size, cfg.probe.batches)
    test_batches = run.batches(task.test, cfg.train.batch_size) if len(task.test) else None
    # The frozen backbone never changes: checkpoints hold only the rest (everything for full_finetune).
    run.frozen_ids = set() if parts.full else {id(p) for _, p in parts.backbone_params}
    run.check_disk(_checkpoint_bytes(model, run.frozen_ids))
    model, optimizer, state, manifest = _start_or_resume(run, model, parts, task)
    # The LR schedule runs over the optimizer steps of the whole run, head phase included.
    epochs = a.head_epochs + a.lora_warmup_epochs + a.insertions * a.epochs_per_insertion + a.final_epochs
    run.start(model, optimizer, manifest, state, train_set=task.train, val_batches=val_batches, epochs=epochs,
              kind="classification", loss=loss_mean, desc=f"adapt[{a.method}]")

    if not state.method_started:
        _train_phase(run, parts, "head", a.head_epochs)  # adjoints from a random head are noise: train it first
        _start_method(run, parts)
    if a.method in INSERTION_METHODS:
        _insertion_phases(run, parts, probe_batches, val_batches, loss_sum)
    else:
        _train_phase(run, parts, a.method, epochs)  # every method gets the same epoch budget
    run.net.eval()

    results = _results(run, parts, task, preprocessing, val_batches, test_batches)
    run.say(run.model_line(f"final model (epoch {state.epoch}, {results['trainable_params']:,} trained)",
                           {"val": results["val_error"], "test": results["test_error"]}, results["depth"],
                           results["params"]))
    state.phase = "done"
    run.finish(results, export=functools.partial(_export, model=run.net, cfg=cfg, parts=parts, tokenizer=tokenizer))
    return AdaptRun(results=results, model=run.net, insertions=parts.records)


@dataclass
class AdaptState(RunState):
    """The adapt recipe's run state (:class:`~topotransfer.training.run.RunState` plus its phase).

    Attributes:
        phase: "head", the method's name, "insertion k", "final" or "done".
        method_started: the head warm-up is over and the method's trainable set (LoRA, backbone) is on.
        best_val: the epoch of lowest validation loss so far ``{"epoch", "phase", "val_loss", "val_error",
            "trainable_params", "insertions", "lora"}`` (``None`` before the first epoch): ``insertions`` = how
            many of this run's insertions its model had, ``lora`` = LoRA was on; its test error is added at the
            end. Its weights are in ``output_dir/best`` (written with the next checkpoint), so a resumed run
            reports the same best-validation test error as an uninterrupted one.
    """

    phase: str = "head"
    method_started: bool = False
    best_val: dict | None = None


@dataclass
class _Parts:
    """What the recipe knows of its model: which modules are the head, which parameters the backbone.

    Attributes:
        head: module names of the classification head (relative to the transformers model).
        use_lora: LoRA trains (the ``lora`` method, or an insertion method with ``adapt.lora``).
        full: the backbone trains (``full_finetune``).
        backbone_params: ``(name, parameter)`` of the backbone (neither head, inserted layer nor LoRA).
        fingerprint: sha256 of each backbone parameter before training.
        records: insertion records ``{"site", "layer"}``: ``adapt.adapter_path``'s, then this run's.
        base_records: those of ``adapt.adapter_path`` alone.
        best_model: ``(epoch, copy of the model)`` at :attr:`AdaptState.best_val`'s epoch, sharing the frozen
            backbone's parameters with the live model (rebuilt from ``output_dir/best`` on resume).
    """

    head: list[str]
    use_lora: bool
    full: bool
    backbone_params: list[tuple[str, nn.Parameter]]
    fingerprint: dict[str, str]
    records: list[dict]
    base_records: list[dict]
    best_model: tuple[int, nn.Module] | None = None


# ---------------------------------------------------------------------------------------------- set-up
def _refuse_fsdp(run: Run) -> None:
    if is_fsdp(run.acc):
        # The backbone is frozen: DDP keeps one copy of it per device and gradients / optimizer state
        # only for the small trained part, which is what FSDP would otherwise save memory on.
        raise ConfigError(
            "the adapt recipe runs under DDP, not FSDP (the frozen backbone takes no gradients or optimizer "
            "state): launch with configs/accelerate/multi_gpu.yaml or cpu_2proc.yaml (FSDP2 is supported by grow)"
        )


def _load_model(cfg: RunConfig, task: Task, run: Run) -> tuple[nn.Module, _Parts]:
    """The backbone with a new head for the task's labels (or ``adapt.adapter_path`` over it), on the run's device.

    Raises:
        LabelCountMismatchError: ``adapt.adapter_path`` has a head for another number of classes.
    """
    a, name, revision = cfg.adapt, cfg.model.name_or_path, cfg.model.revision
    records: list[dict] = []
    if a.adapter_path is not None:
        previous = TopoAdapter.load(a.adapter_path)
        if previous.num_labels != task.num_outputs:
            raise LabelCountMismatchError(
                f"adapt.adapter_path {a.adapter_path!r} has a head for {previous.num_labels} classes but task "
                f"{task.name!r} has {task.num_outputs}"
            )
        model = load_adapter(name, a.adapter_path)
        records = [dict(r) for r in previous.insertions]
    else:
        class_names = task.class_names or [str(i) for i in range(task.num_outputs)]
        model = load_backbone(name, revision, id2label=dict(enumerate(class_names)))
    model.to(run.device)
    base, _ = unwrap_peft(model)
    head = head_module_names(base)
    head_ids = {id(p) for h in head for p in base.get_submodule(h).parameters()}
    inserted_ids = {id(p) for _, layer in get_family(model).inserted(model) for p in layer.parameters()}
    backbone_params = [(n, p) for n, p in model.named_parameters()
                       if id(p) not in head_ids and id(p) not in inserted_ids and "lora_" not in n]
    parts = _Parts(
        head=head, use_lora=a.method == "lora" or (a.lora and a.method in INSERTION_METHODS),
        full=a.method == "full_finetune", backbone_params=backbone_params, fingerprint=_fingerprint(backbone_params),
        records=records, base_records=[dict(r) for r in records],
    )
    return model, parts


def _checkpoint_bytes(model: nn.Module, frozen_ids: set[int]) -> int:
    """Checkpoints (:func:`~topotransfer.training.checkpoint.checkpoint_disk_bytes` of the trained tensors; the
    best-validation copy saves only those too) + margin."""
    trained_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in frozen_ids)
    return checkpoint_disk_bytes(trained_bytes) + (64 << 20)


def _manifest(cfg: RunConfig, model: nn.Module, parts: _Parts, task: Task) -> dict:
    base, _ = unwrap_peft(model)
    return {
        "format": 1,
        "recipe": "adapt",
        "base_model": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "architecture": type(base).__name__,
        "adapter_path": cfg.adapt.adapter_path,
        "method": cfg.adapt.method,
        "use_lora": parts.use_lora,
        "num_labels": task.num_outputs,
        "id2label": {str(k): str(v) for k, v in getattr(base.config, "id2label", {}).items()},
        "base_insertions": parts.base_records,  # the insertions of adapt.adapter_path (rebuilt by loading it)
        "insertions": [],  # this run's, in order: {"site", "layer", "epoch"}
        "lora": None,  # the peft LoRA config once this run applied LoRA
    }


def _start_or_resume(run: Run, model: nn.Module, parts: _Parts, task: Task) -> tuple:
    """``(model, optimizer, state, manifest)``: the head alone trains (fresh), or rebuilt from ``output_dir/latest``.

    Raises:
        CheckpointMismatchError: the checkpoint belongs to another base model, method or adapter.
    """
    cfg = run.cfg
    manifest = _manifest(cfg, model, parts, task)
    ckpt = run.checkpoint_to_resume()
    if ckpt is None:  # the head alone first: the backbone's features are what the derivative will probe
        _set_trainable(model, parts.head, backbone=False, lora=False)
        return model, _optimizer(model, parts.head, cfg.adapt, cfg.train), AdaptState(), manifest
    saved = read_manifest(ckpt)  # every rank reads the same checkpoint
    _check_resumable(saved, manifest, ckpt)
    state = run.read_state(ckpt, AdaptState)
    # the best copy's architecture may be older than the checkpoint's: it is rebuilt on a copy of the plain base,
    # taken before the rebuild below and only when output_dir/best holds that epoch's copy
    best_path = _best_copy(run, state.best_val)
    plain_base = None if best_path is None else copy.deepcopy(model, _shared_backbone(parts))
    model = _rebuild(model, saved)
    parts.best_model = None if best_path is None else _resume_best(run, plain_base, saved, state.best_val, best_path)
    parts.records += [{"site": r["site"], "layer": r["layer"]} for r in saved["insertions"]]
    started = state.method_started
    _set_trainable(model, parts.head, backbone=parts.full and started, lora=parts.use_lora and started,
                   freeze_up=cfg.adapt.lowrank_freeze_up)
    optimizer = _optimizer(model, parts.head, cfg.adapt, cfg.train)
    run.load_weights(ckpt, model, optimizer)
    return model, optimizer, state, saved


# ---------------------------------------------------------------------------------------------- the phases
def _train_phase(run: Run, parts: _Parts, phase: str, until_epoch: int) -> None:
    """Train until ``until_epoch`` epochs are done (or ``train.max_steps``), checkpointing every
    ``train.checkpoint_every`` epochs; the model of lowest validation loss is kept (:func:`_keep_best`)."""
    run.state.phase = phase
    while run.state.epoch < until_epoch:
        columns = {"trainable_params": count_parameters(run.net, True)}
        if run.train_epoch(columns, phase=phase, timing="head_warmup" if phase == "head" else "training") is None:
            return
        _keep_best(run, parts)
        if run.checkpoint_due():
            run.checkpoint()


def _keep_best(run: Run, parts: _Parts) -> None:
    """After an epoch: when its validation loss is the lowest so far (strictly: ties keep the earlier epoch),
    record it in ``state.best_val`` and keep a copy of the model, whose test error :func:`_results` reports.

    The copy shares the frozen backbone's parameters with the live model (they never change; :func:`_results`
    checks it), so it costs the trained tensors only; ``full_finetune`` copies everything.
    """
    state, row = run.state, run.state.history[-1]
    if state.best_val is not None and not row["val_loss"] < state.best_val["val_loss"]:
        return
    state.best_val = {"epoch": row["epoch"], "phase": row.get("phase"), "val_loss": row["val_loss"],
                      "val_error": row["val_error"], "trainable_params": row["trainable_params"],
                      "insertions": len(parts.records) - len(parts.base_records),
                      "lora": unwrap_peft(run.net)[1] is not None}
    parts.best_model = (row["epoch"], copy.deepcopy(run.net, _shared_backbone(parts)))
    run.save_copy("best", parts.best_model[1], {"epoch": row["epoch"]})


def _shared_backbone(parts: _Parts) -> dict:
    """A deepcopy memo that keeps the frozen backbone's parameters shared (they never change), so a copy of
    the model costs its trained tensors only; ``full_finetune`` copies everything."""
    return {} if parts.full else {id(p): p for _, p in parts.backbone_params}


def _best_copy(run: Run, best_val: dict | None) -> Path | None:
    """The side copy holding ``best_val``'s epoch (``output_dir/best``, or ``best.previous`` when the run stopped
    after writing a newer copy, before the checkpoint that records its epoch); ``None`` when there is no best
    epoch yet or no copy of it."""
    if best_val is None or "insertions" not in best_val:
        return None
    return side_copy(run.out, "best", best_val["epoch"])


def _resume_best(run: Run, plain_base: nn.Module, saved: dict, best_val: dict, path: Path) -> tuple:
    """The best-validation copy of a resumed run: ``plain_base`` (the loaded base, backbone shared) given the
    architecture the model had at the best epoch (LoRA or not, this run's first ``insertions`` insertions) and
    the weights of the side copy ``path`` (:func:`_best_copy`)."""
    arch = {**saved, "insertions": saved["insertions"][: best_val["insertions"]],
            "lora": saved.get("lora") if best_val["lora"] else None}
    best = _rebuild(plain_base, arch)
    run.load_weights(path, best)
    best.eval()
    return best_val["epoch"], best


def _start_method(run: Run, parts: _Parts) -> None:
    """After the head warm-up: LoRA / the backbone join the trainable set -> a fresh optimizer, prepared again."""
    cfg = run.cfg
    model, _ = run.plain()
    if parts.use_lora and unwrap_peft(model)[1] is None:
        torch.manual_seed(cfg.seed)  # LoRA's A matrices: the same draw on every rank
        model = apply_lora(model, cfg.adapt)
        run.manifest["lora"] = _lora_config(model)
    _set_trainable(model, parts.head, backbone=parts.full, lora=parts.use_lora, freeze_up=cfg.adapt.lowrank_freeze_up)
    run.rewrap(model, _optimizer(model, parts.head, cfg.adapt, cfg.train))
    run.state.method_started = True


def _insertion_phases(run: Run, parts: _Parts, probe: list, heldout: list, loss_sum: nn.Module) -> None:
    """``adapt.lora_warmup_epochs`` of LoRA + head (the derivative of the first event then probes the LoRA-adapted
    model, not the one LoRA has not yet moved); ``adapt.insertions`` times: an insertion event, then
    ``epochs_per_insertion`` epochs; then the final epochs. When TD <= 0 everywhere insertion stops and its epochs
    go to the final phase."""
    a, state = run.cfg.adapt, run.state
    start = a.head_epochs + a.lora_warmup_epochs  # the epoch of the first insertion event
    if a.lora_warmup_epochs and not state.events:  # config validation: only with adapt.lora
        _train_phase(run, parts, "lora", start)
    for event in range(a.insertions):
        if event == len(state.events):  # not done before a resume
            _insertion(run, parts, event, probe, heldout, loss_sum)
        if state.events[event]["site"] is None:
            break
        _train_phase(run, parts, f"insertion {event + 1}", start + (event + 1) * a.epochs_per_insertion)
    _train_phase(run, parts, "final", start + a.insertions * a.epochs_per_insertion + a.final_epochs)


def _insertion(run: Run, parts: _Parts, event: int, probe: list, heldout: list, loss_sum: nn.Module) -> None:
    """One insertion event on the synced plain model: TD, site, eps, insert; new optimizer carrying the
    surviving parameters' state; checkpoint."""
    cfg = run.cfg
    run.state.phase = f"insertion {event + 1}"
    model, optimizer = run.plain()
    record = _insertion_event(model, cfg.adapt.method, probe, heldout, loss_sum, cfg, event, accelerator=run.acc)
    record["epoch"] = run.state.epoch
    if record["site"] is not None:
        parts.records.extend({"site": x["site"], "layer": x["layer"]} for x in record.get("layers") or [record])
        _set_trainable(model, parts.head, backbone=False, lora=parts.use_lora, freeze_up=cfg.adapt.lowrank_freeze_up)
        optimizer = _optimizer(model, parts.head, cfg.adapt, cfg.train, old=optimizer)
    run.record_event(record, model, optimizer, depth=unwrap_peft(model)[0].config.num_hidden_layers,
                     insertions=parts.records)
    run.checkpoint()


# ---------------------------------------------------------------------------------------------- the end
def _results(run: Run, parts: _Parts, task: Task, preprocessing: dict, val_batches: list,
             test_batches: list | None) -> dict:
    """Validation and test error of the adapted model; the backbone checked bit-identical (but full_finetune).

    Raises:
        RuntimeError: the frozen backbone's weights changed (a bug).
    """
    cfg, state, model = run.cfg, run.state, run.net
    after = _fingerprint(parts.backbone_params)
    changed = sorted(n for n in parts.fingerprint if parts.fingerprint[n] != after[n])
    if changed and not parts.full:
        raise RuntimeError(f"backbone weights changed during {cfg.adapt.method} adaptation (a bug): {changed[:5]}")
    val = run.evaluate(model, val_batches)
    test = {"loss": None, "error": None} if test_batches is None else run.evaluate(model, test_batches)
    best = None if state.best_val is None else {**state.best_val, "test_error": None, "test_loss": None}
    if best is not None and test_batches is not None and parts.best_model and parts.best_model[0] == best["epoch"]:
        best_test = run.evaluate(parts.best_model[1], test_batches)
        best.update(test_error=best_test["error"], test_loss=best_test["loss"])
    base, _ = unwrap_peft(model)
    parts.records = label_insertions(base, parts.records, strict=False)  # + the stable site_label / label of each
    return {
        "method": cfg.adapt.method,
        "lora": parts.use_lora,
        "task": task.name,
        "seed": cfg.seed,
        "base_model": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "num_labels": task.num_outputs,
        "num_train": len(task.train),
        "val_error": val["error"],
        "val_loss": val["loss"],
        "test_error": test["error"],
        "test_loss": test["loss"],
        "best_val": best,  # the epoch of lowest validation loss and its model's test error
        "insertions": len(parts.records),
        "insertion_records": parts.records,
        "events": state.events,
        "depth": base.config.num_hidden_layers,
        "params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "backbone_unchanged": not changed,
        **preprocessing,  # image normalisation, or the tokenizer and padded lengths
        "epochs": state.epoch,
        "steps": state.steps,
        "history": state.history,
        "num_processes": run.acc.num_processes,
        "wall_time": run.elapsed(),
    }


def _export(out: Path, *, model: nn.Module, cfg: RunConfig, parts: _Parts, tokenizer) -> None:
    """``output_dir/adapter`` (inserted layers, head, LoRA over the untouched base) and ``output_dir/merged``."""
    name, revision = cfg.model.name_or_path, cfg.model.revision
    if cfg.adapt.save_adapter and not parts.full:
        save_adapter(model, name, revision, parts.records, out / "adapter", include_head=True)
    if cfg.adapt.save_merged:
        merge_and_save(model, out / "merged", base_name_or_path=name, revision=revision)
        if tokenizer is not None:  # the export is then self-contained for text too
            tokenizer.save_pretrained(out / "merged")


# ---------------------------------------------------------------------------------------------- checkpoints
def _lora_config(model: nn.Module) -> dict:
    from ..adapter import _json_default

    _, peft_model = unwrap_peft(model)
    return json.loads(json.dumps(peft_model.peft_config["default"].to_dict(), default=_json_default))


def _rebuild(model: nn.Module, manifest: dict) -> nn.Module:
    """Give a freshly loaded base (+ ``adapt.adapter_path``) the checkpoint's architecture: LoRA, then the
    recorded insertions (zero layers) in order. The weights come from the checkpoint afterwards."""
    if manifest.get("lora") is not None and unwrap_peft(model)[1] is None:
        from peft import get_peft_config, get_peft_model

        model = get_peft_model(model, get_peft_config(dict(manifest["lora"])))
    replay_insertions(unwrap_peft(model)[0], manifest["insertions"])
    return model


_RESUME_KEYS = ("recipe", "base_model", "revision", "adapter_path", "method", "use_lora", "num_labels")


def _check_resumable(saved: dict, current: dict, path: Path) -> None:
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {current[k]!r}" for k in _RESUME_KEYS if saved.get(k) != current[k]]
    if diff:
        raise CheckpointMismatchError(
            f"--resume: {path} was written by another run ({'; '.join(diff)}); use the same config or another output_dir"
        )


def load_adapt_checkpoint(path: str | Path) -> nn.Module:
    """The model of an adapt checkpoint (``output_dir/last``, or an ``output_dir`` with a ``latest`` pointer).

    Loads the recorded base (and ``adapt.adapter_path``), applies LoRA and replays the recorded insertions,
    then loads the checkpoint's tensors with an exact key check.

    Returns:
        The model in eval mode (a peft ``PeftModel`` when the run used LoRA).

    Raises:
        RuntimeError: the checkpoint's tensors do not match the rebuilt model.
    """
    from ..adapter import load_adapter as _load_adapter
    from ..models.hf import load_backbone as _load_backbone

    path = Path(path)
    if not (path / "manifest.json").is_file() and latest_checkpoint(path) is not None:
        path = latest_checkpoint(path)
    manifest = read_manifest(path)
    if manifest["adapter_path"]:
        model = _load_adapter(manifest["base_model"], manifest["adapter_path"])
    else:
        id2label = {int(k): v for k, v in manifest["id2label"].items()} or None
        model = _load_backbone(manifest["base_model"], manifest["revision"], id2label=id2label,
                               architecture=manifest["architecture"])
    frozen = set() if manifest["method"] == "full_finetune" else _backbone_ids(model)
    model = _rebuild(model, manifest)
    load_checkpoint(path, model, keys=set(trained_tensors(model, frozen)))
    return model.eval()


def _backbone_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of a freshly loaded model that are neither head, inserted layer nor LoRA."""
    base, _ = unwrap_peft(model)
    head = {id(p) for h in head_module_names(base) for p in base.get_submodule(h).parameters()}
    inserted = {id(p) for _, layer in get_family(model).inserted(model) for p in layer.parameters()}
    return {id(p) for n, p in model.named_parameters() if id(p) not in head | inserted and "lora_" not in n}
