"""Adapt a pretrained Hugging Face backbone to a new dataset (METHOD.md section 6), or run a baseline.

    load the backbone with a new head for the target labels, freeze the backbone
    -> train the head (adjoints from a random head are noise)                          head_epochs
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

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..adapter import TopoAdapter, head_module_names, load_adapter, merge_and_save, save_adapter, unwrap_peft
from ..config import AdaptConfig, ConfigError, RunConfig, TrainConfig, to_dict
from ..data import Task, setting_key
from ..errors import CheckpointMismatchError, LabelCountMismatchError
from ..growth import count_parameters, random_site_generator, realized_site
from ..init_rules import probe_site_results
from ..insertion import DEFAULT_EPSILONS, insert_layer, line_search_epsilon
from ..models.hf import load_backbone
from ..preprocess import load_for_backbone
from ..requirements import check_requirements
from ..surgery import get_family
from ..surgery.labels import label_event, label_insertions
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
    all_equal,
    all_equal_digest,
    build_accelerator,
    is_fsdp,
    prepare_again,
    raw_optimizer,
    shard,
    value_digest,
)
from ..training.loop import evaluate, make_loader, train_run_epoch
from .grow import _batches, _losses, check_output_dir

__all__ = [
    "AdaptRun", "apply_lora", "first_local_minimum_epsilon", "load_adapt_checkpoint", "lora_target_modules", "run_adapt",
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


def _set_trainable(model: nn.Module, head: list[str], *, backbone: bool, lora: bool) -> None:
    """Only the head, the inserted layers and (optionally) LoRA / the whole backbone train."""
    base, _ = unwrap_peft(model)
    for name, p in model.named_parameters():
        p.requires_grad_(backbone or (lora and "lora_" in name))
    for name in head:
        base.get_submodule(name).requires_grad_(True)
    for _, layer in get_family(model).inserted(model):
        layer.requires_grad_(True)


def _fast_params(model: nn.Module, head: list[str]) -> set[int]:
    """ids of the head's and inserted layers' parameters (they use ``adapt.lr``)."""
    base, _ = unwrap_peft(model)
    params = [p for name in head for p in base.get_submodule(name).parameters()]
    params += [p for _, layer in get_family(model).inserted(model) for p in layer.parameters()]
    return {id(p) for p in params}


def _optimizer(
    model: nn.Module, head: list[str], cfg: AdaptConfig, train: TrainConfig, old: torch.optim.Optimizer | None = None
) -> torch.optim.Optimizer:
    """Optimizer over the trainable parameters: head + inserted layers at ``lr``, backbone / LoRA at
    ``backbone_lr``. Parameters that survive from ``old`` keep their state (public ``optimizer.state``)."""
    fast_ids = _fast_params(model, head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in fast_ids], "lr": cfg.lr},
        {"params": [p for p in trainable if id(p) not in fast_ids], "lr": cfg.backbone_lr or cfg.lr},
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
    and left the model at 90 % test error. The global-minimum rule of
    :func:`~topotransfer.insertion.line_search_epsilon` is recorded next to it (``eps_global_min``).

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
    family = get_family(model)
    sites = family.sites(model)
    gen = random_site_generator(cfg.seed, event, setting_key(cfg.data))  # per setting
    chosen = None
    if method == "random_site":
        chosen = [sites[int(torch.randint(len(sites), (1,), generator=gen))].name]
    elif method == "last_block":
        chosen = [sites[-1].name]
    results = probe_site_results(
        model, probe, loss_sum, cfg.probe, sites=chosen, accelerator=accelerator,
        progress=cfg.progress and getattr(accelerator, "is_main_process", True),
    )
    scores = {r.site.removeprefix(_PEFT_PREFIX): r.score for r in results}
    best = max(results, key=lambda r: r.score)
    record = {"event": event, "method": method, "scores": scores, "site": None}
    if method == "topo" and best.score <= 0:
        record["stopped"] = "score<=0"  # no insertion lowers the loss to second order
        return record
    grid = tuple(sorted(cfg.adapt.epsilons)) if cfg.adapt.epsilons else DEFAULT_EPSILONS

    def search(result) -> tuple:
        """(eps, held-out loss at eps, the line search) along the site's direction."""
        ls = line_search_epsilon(model, result.site, heldout, loss_sum, result.weight, result.bias, epsilons=grid,
                                 accelerator=accelerator)
        # The derivative vouches for the direction only near eps = 0: take the first local minimum of the
        # held-out loss along the grid, not the global one (see first_local_minimum_epsilon).
        local = first_local_minimum_epsilon(ls.tried)
        return local, dict(ls.tried).get(local, ls.baseline_loss), ls

    if method == "topo" and cfg.adapt.site_selection == "realized":
        def candidate(r):
            local, loss, ls = search(r)
            return loss, (local, ls)

        best, (local, ls), realized = realized_site(results, candidate)
        record["realized"] = {name.removeprefix(_PEFT_PREFIX): loss for name, loss in realized.items()}
    else:
        local, _, ls = search(best)
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


def run_adapt(cfg: RunConfig, resume: bool = False, accelerator=None) -> AdaptRun:
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
        resume: continue from ``output_dir/latest`` if it exists (same config).
        accelerator: an ``accelerate.Accelerator`` to run under (default: one built from ``cfg.device``
            and ``cfg.train.mixed_precision``, ended when the run finishes on several processes).

    Returns:
        :class:`AdaptRun` (results are also written to ``output_dir/results.json``).

    Raises:
        FloatingPointError: a training / validation loss or a parameter became NaN or inf; nothing is
            written after it, so ``output_dir/latest`` stays the last good checkpoint.
        CheckpointMismatchError: ``resume`` found a checkpoint of another base model, method or adapter.
        ConfigError: no ``model.name_or_path``, or LoRA targets that match nothing.
        ImageSizeError: the task's images cannot be fed to the backbone.
        ModalityMismatchError: a text task for an image backbone or an image task for a text backbone.
        UnsupportedModelError: a backbone of no supported family (``config.model_type``).
        EmptyDatasetError: an empty train or validation split.
        LabelCountMismatchError: ``adapt.adapter_path`` has a head for another number of classes.
        AdapterMismatchError: ``adapt.adapter_path`` was made on another base model.
    """
    from transformers import AutoConfig

    a, name, revision = cfg.adapt, cfg.model.name_or_path, cfg.model.revision
    if not name:
        raise ConfigError("the adapt recipe needs model.name_or_path (a hub name or a local save_pretrained dir)")
    check_requirements(cfg)  # a missing package (peft for LoRA...) fails now, not after the head phase
    out = check_output_dir(cfg.output_dir)  # before anything slow: an unwritable directory fails at once
    own_accelerator = accelerator is None
    acc = accelerator if accelerator is not None else build_accelerator(cfg.device, cfg.train.mixed_precision)
    if is_fsdp(acc):
        # The backbone is frozen: DDP keeps one copy of it per device and gradients / optimizer state
        # only for the small trained part, which is what FSDP would otherwise save memory on.
        raise ConfigError(
            "the adapt recipe runs under DDP, not FSDP (the frozen backbone takes no gradients or optimizer "
            "state): launch with configs/accelerate/multi_gpu.yaml or cpu_2proc.yaml (FSDP2 is supported by grow)"
        )
    main = acc.is_main_process
    if main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    device = acc.device
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()

    backbone_config = AutoConfig.from_pretrained(name, revision=revision)
    task, preprocessing, tokenizer = _load_data(cfg, backbone_config)
    class_names = task.class_names or [str(i) for i in range(task.num_outputs)]
    id2label = dict(enumerate(class_names))
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
        model = load_backbone(name, revision, id2label=id2label)
    model.to(device)
    base, _ = unwrap_peft(model)
    head = head_module_names(base)
    head_ids = {id(p) for h in head for p in base.get_submodule(h).parameters()}
    inserted_ids = {id(p) for _, layer in get_family(model).inserted(model) for p in layer.parameters()}
    backbone_params = [(n, p) for n, p in model.named_parameters()
                       if id(p) not in head_ids and id(p) not in inserted_ids and "lora_" not in n]
    before = _fingerprint(backbone_params)

    loss_mean, loss_sum = _losses("classification")
    # Each rank evaluates / probes its share of fixed batch lists; the sums are reduced over the ranks.
    val_batches = shard(_batches(task.val, cfg.train.batch_size), acc)
    probe_batches = shard(_batches(task.train, cfg.probe.batch_size, cfg.probe.batches), acc)
    test_batches = shard(_batches(task.test, cfg.train.batch_size), acc) if len(task.test) else None
    use_lora = a.method == "lora" or (a.lora and a.method in INSERTION_METHODS)
    full = a.method == "full_finetune"
    # The frozen backbone never changes: checkpoints hold only the rest (everything for full_finetune).
    frozen_ids = set() if full else {id(p) for _, p in backbone_params}
    base_records = [dict(r) for r in records]  # the insertions of adapt.adapter_path (rebuilt by loading it)
    if main:  # checkpoints: the trained tensors + 2 Adam moments, twice while one is replaced (+ margin)
        trained_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in frozen_ids)
        check_free_space(out, 6 * trained_bytes + (64 << 20))
    manifest = {
        "format": 1,
        "recipe": "adapt",
        "base_model": name,
        "revision": revision,
        "architecture": type(base).__name__,
        "adapter_path": a.adapter_path,
        "method": a.method,
        "use_lora": use_lora,
        "num_labels": task.num_outputs,
        "id2label": {str(k): str(v) for k, v in getattr(base.config, "id2label", {}).items()},
        "base_insertions": base_records,
        "insertions": [],  # this run's, in order: {"site", "layer", "epoch"}
        "lora": None,  # the peft LoRA config once this run applied LoRA
    }
    state = {"epoch": 0, "steps": 0, "phase": "head", "method_started": False, "history": [], "events": [],
             "wall_time": 0.0, "epoch_progress": None}
    rng_states = None  # every rank's RNG state of a mid-epoch checkpoint being resumed

    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:  # every rank reads the same checkpoint
        saved = json.loads((ckpt / "manifest.json").read_text())
        _check_resumable(saved, manifest, ckpt)
        model = _rebuild(model, saved)
        manifest = saved
        state = {"epoch_progress": None, **json.loads((ckpt / "state.json").read_text())}
        rng_states = resume_rng_states(ckpt, state, acc.num_processes)
        records = base_records + [{"site": r["site"], "layer": r["layer"]} for r in manifest["insertions"]]
        started_method = state["method_started"]
        _set_trainable(model, head, backbone=full and started_method, lora=use_lora and started_method)
        optimizer = _optimizer(model, head, a, cfg.train)
        load_checkpoint(ckpt, model, optimizer, keys=set(_trained_tensors(model, frozen_ids)))
    else:
        # 1. the head alone (the backbone's features are what the derivative will probe)
        _set_trainable(model, head, backbone=False, lora=False)
        optimizer = _optimizer(model, head, a, cfg.train)
    # `model` is the plain module (names, checkpoints, evaluation, surgery); `wrapped` is what accelerate
    # prepared from it (DDP-wrapped on several processes) and is used only to train.
    wrapped, optimizer = acc.prepare(model, optimizer)
    started = time.perf_counter() - state["wall_time"]

    # The LR schedule runs over the optimizer steps of the whole run, head phase included (each rank
    # takes one step per N batches); groups keep their ratio (adapt.lr vs adapt.backbone_lr).
    epochs_total = a.head_epochs + a.insertions * a.epochs_per_insertion + a.final_epochs
    steps_per_epoch = math.ceil(math.ceil(len(task.train) / cfg.train.batch_size) / acc.num_processes)
    total_steps = epochs_total * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)

    def checkpoint() -> None:
        state["wall_time"] = time.perf_counter() - started
        check_finite(model)
        # mid-epoch: every rank's RNG state (a collective), so dropout draws continue where they stopped
        rngs = gather_rng_states(acc) if state["epoch_progress"] is not None else None
        if main:
            save_checkpoint(out, "last", model, manifest, raw_optimizer(optimizer), state,
                            tensors=_trained_tensors(model, frozen_ids), rng_states=rngs)
            write_json_atomic(out / "history.json", {"epochs": state["history"], "events": state["events"]})

    def train(phase: str, until_epoch: int) -> None:
        state["phase"] = phase
        while state["epoch"] < until_epoch:
            left = None if cfg.train.max_steps is None else cfg.train.max_steps - state["steps"]
            if left is not None and left <= 0:
                return
            epoch = state["epoch"]
            # Dropout (LoRA's, the backbone's) draws from the global generator: seeded per (epoch, rank),
            # a resumed run draws what the uninterrupted one did. The shuffle is the same on every rank;
            # accelerate hands each rank every N-th batch.
            loader = acc.prepare_data_loader(
                make_loader(task.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
            )
            try:
                loss, steps = train_run_epoch(
                    wrapped, loader, optimizer, loss_mean, device, left, accelerator=acc, state=state,
                    seed=cfg.seed, epoch=epoch, total_steps=total_steps, train_cfg=cfg.train, rng_states=rng_states,
                    checkpoint=checkpoint,
                )
            except FloatingPointError as e:
                raise divergence_error(e, out, epoch + 1) from e
            state["epoch"] = epoch + 1
            val = evaluate(model, val_batches, "classification", device, accelerator=acc)
            if not math.isfinite(val["loss"]):
                raise divergence_error(FloatingPointError(f"Validation loss is {val['loss']}"), out, epoch + 1)
            state["history"].append({"epoch": epoch + 1, "phase": phase, "train_loss": loss, "val_loss": val["loss"],
                                     "val_error": val["error"], "trainable_params": count_parameters(model, True),
                                     "lr": optimizer.param_groups[0]["lr"],
                                     "time": time.perf_counter() - started})
            if (epoch + 1) % cfg.train.checkpoint_every == 0:
                checkpoint()

    if not state["method_started"]:
        train("head", a.head_epochs)
        # 2. the method: LoRA / the backbone join the trainable set -> a fresh optimizer, prepared again
        acc.wait_for_everyone()
        model = acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
        if use_lora and unwrap_peft(model)[1] is None:
            torch.manual_seed(cfg.seed)  # LoRA's A matrices: the same draw on every rank
            model = apply_lora(model, a)
            manifest["lora"] = _lora_config(model)
        _set_trainable(model, head, backbone=full, lora=use_lora)
        optimizer = _optimizer(model, head, a, cfg.train)
        acc.free_memory()
        wrapped, optimizer = prepare_again(acc, model, optimizer)
        state["method_started"] = True

    budget = a.insertions * a.epochs_per_insertion + a.final_epochs
    if a.method in INSERTION_METHODS:
        for event in range(a.insertions):
            if event == len(state["events"]):  # not done before a resume
                # Insertion event: sync, unwrap (and drop the autocast wrapper: the derivative and the
                # line search run in float32+), insert in place, new optimizer carrying the surviving
                # parameters' state, prepare again, checkpoint.
                state["phase"] = f"insertion {event + 1}"
                acc.wait_for_everyone()
                model = acc.unwrap_model(wrapped, keep_fp32_wrapper=False)
                optimizer = raw_optimizer(optimizer)
                record = _insertion_event(model, a.method, probe_batches, val_batches, loss_sum, cfg, event,
                                          accelerator=acc)
                record["epoch"] = state["epoch"]
                record["score_checksums"] = all_equal(value_digest(record["scores"]), acc, "derivative scores")
                if record["site"] is not None:
                    # Identical reduced statistics give identical layers; prove it before DDP's re-wrap
                    # broadcasts rank 0's weights and would hide a divergence.
                    record["param_checksums"] = all_equal_digest(model, acc, "parameters")
                    manifest["insertions"].append({"site": record["site"], "layer": record["layer"],
                                                   "epoch": state["epoch"]})
                    records.append({"site": record["site"], "layer": record["layer"]})
                    _set_trainable(model, head, backbone=False, lora=use_lora)
                    optimizer = _optimizer(model, head, a, cfg.train, old=optimizer)
                label_event(record, model, records)  # the stable names of the sites it scored and chose
                state["events"].append(record)
                acc.free_memory()
                wrapped, optimizer = prepare_again(acc, model, optimizer)
                checkpoint()
            if state["events"][event]["site"] is None:  # TD <= 0 everywhere: growth stops, its epochs go to final
                break
            train(f"insertion {event + 1}", a.head_epochs + (event + 1) * a.epochs_per_insertion)
        train("final", a.head_epochs + budget)  # every method gets the same epoch budget
    else:
        train(a.method, a.head_epochs + budget)
    model.eval()

    after = _fingerprint(backbone_params)
    changed = sorted(n for n in before if before[n] != after[n])
    if changed and not full:
        raise RuntimeError(f"backbone weights changed during {a.method} adaptation (a bug): {changed[:5]}")

    val = evaluate(model, val_batches, "classification", device, accelerator=acc)
    test = {"loss": None, "error": None}
    if test_batches is not None:
        test = evaluate(model, test_batches, "classification", device, accelerator=acc)
    base, _ = unwrap_peft(model)
    records = label_insertions(base, records, strict=False)  # + the stable site_label / label of each
    results = {
        "method": a.method,
        "lora": use_lora,
        "task": task.name,
        "seed": cfg.seed,
        "base_model": name,
        "revision": revision,
        "num_labels": task.num_outputs,
        "num_train": len(task.train),
        "val_error": val["error"],
        "val_loss": val["loss"],
        "test_error": test["error"],
        "test_loss": test["loss"],
        "insertions": len(records),
        "insertion_records": records,
        "events": state["events"],
        "depth": base.config.num_hidden_layers,
        "params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "backbone_unchanged": not changed,
        **preprocessing,  # image normalisation, or the tokenizer and padded lengths
        "epochs": state["epoch"],
        "steps": state["steps"],
        "history": state["history"],
        "num_processes": acc.num_processes,
        "wall_time": time.perf_counter() - started,
    }
    state["phase"] = "done"
    checkpoint()
    if main:
        if a.save_adapter and not full:
            save_adapter(model, name, revision, records, out / "adapter", include_head=True)
        if a.save_merged:
            merge_and_save(model, out / "merged", base_name_or_path=name, revision=revision)
            if tokenizer is not None:  # the export is then self-contained for text too
                tokenizer.save_pretrained(out / "merged")
        write_json_atomic(Path(out) / "results.json", results)
    # Every rank reaches here before the process group is torn down (STACK.md: gloo teardown aborts).
    acc.wait_for_everyone()
    if own_accelerator and acc.num_processes > 1:
        acc.end_training()
    return AdaptRun(results=results, model=model, insertions=records)


# ---------------------------------------------------------------------------------------------- checkpoints
def _trained_tensors(model: nn.Module, frozen_ids: set[int]) -> dict[str, torch.Tensor]:
    """The state-dict entries a checkpoint holds: all but the frozen backbone's (head, inserted, LoRA)."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in frozen_ids}


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
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest["adapter_path"]:
        model = _load_adapter(manifest["base_model"], manifest["adapter_path"])
    else:
        id2label = {int(k): v for k, v in manifest["id2label"].items()} or None
        model = _load_backbone(manifest["base_model"], manifest["revision"], id2label=id2label,
                               architecture=manifest["architecture"])
    frozen = set() if manifest["method"] == "full_finetune" else _backbone_ids(model)
    model = _rebuild(model, manifest)
    load_checkpoint(path, model, keys=set(_trained_tensors(model, frozen)))
    return model.eval()


def _backbone_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of a freshly loaded model that are neither head, inserted layer nor LoRA."""
    base, _ = unwrap_peft(model)
    head = {id(p) for h in head_module_names(base) for p in base.get_submodule(h).parameters()}
    inserted = {id(p) for _, layer in get_family(model).inserted(model) for p in layer.parameters()}
    return {id(p) for n, p in model.named_parameters() if id(p) not in head | inserted and "lora_" not in n}
