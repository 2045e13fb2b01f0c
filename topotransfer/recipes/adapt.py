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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from ..adapter import TopoAdapter, head_module_names, load_adapter, merge_and_save, save_adapter, unwrap_peft
from ..config import AdaptConfig, ConfigError, RunConfig, TrainConfig, to_dict
from ..data import load_task
from ..derivative.topological import topological_derivative
from ..errors import ImageSizeError, LabelCountMismatchError
from ..growth import count_parameters
from ..insertion import DEFAULT_EPSILONS, insert_layer, line_search_epsilon
from ..models.hf import load_backbone, load_image_normalization
from ..preprocess import backbone_image_size, prepare_task
from ..surgery import get_family
from ..training.checkpoint import write_json_atomic
from ..training.loop import evaluate, make_loader, train_epoch
from .grow import _batches, _device, check_output_dir

__all__ = ["AdaptRun", "apply_lora", "lora_target_modules", "run_adapt"]

INSERTION_METHODS = ("topo", "random_site", "last_block")
NON_IMAGE_TASKS = ("regression",)
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
def _insertion_event(
    model: nn.Module, method: str, probe: list, heldout: list, loss_sum: nn.Module, cfg: RunConfig, event: int
) -> dict:
    """Compute TD, choose the site by ``method``, line-search eps, insert. Returns the event record."""
    family = get_family(model)
    sites = family.sites(model)
    gen = torch.Generator().manual_seed(10_007 * (cfg.seed + 1) + event)
    chosen = None
    if method == "random_site":
        chosen = [sites[int(torch.randint(len(sites), (1,), generator=gen))].name]
    elif method == "last_block":
        chosen = [sites[-1].name]
    p = cfg.probe
    results = topological_derivative(
        model, probe, loss_sum, sites=chosen, rule=p.rule, c=p.c, k=p.k, solver=p.solver, tol=p.tol,
        sample_fraction=p.sample_fraction, max_samples_per_batch=p.max_samples_per_batch,
        progress=cfg.progress,
    )
    scores = {r.site.removeprefix(_PEFT_PREFIX): r.score for r in results}
    best = max(results, key=lambda r: r.score)
    record = {"event": event, "method": method, "scores": scores, "site": None}
    if method == "topo" and best.score <= 0:
        record["stopped"] = "score<=0"  # no insertion lowers the loss to second order
        return record
    grid = tuple(cfg.adapt.epsilons) if cfg.adapt.epsilons else DEFAULT_EPSILONS
    ls = line_search_epsilon(model, best.site, heldout, loss_sum, best.weight, best.bias, epsilons=grid)
    # eps = 0 would give a layer that never trains (sigma'(0) = 0 gives it zero gradient): when no eps
    # lowers the held-out loss, seed with the smallest eps of the grid and record it.
    eps = ls.epsilon if ls.epsilon > 0 else min(grid)
    insert_layer(model, best.site, best.weight, best.bias, epsilon=eps)
    theta = best.weight if best.bias is None else torch.cat([best.weight, best.bias[:, None]], dim=1)
    record.update(
        site=best.site.removeprefix(_PEFT_PREFIX), layer=best.layer_config, score=best.score, k=best.k,
        epsilon=eps, eps_fallback=ls.epsilon == 0, init_norm=eps * float(theta.norm()), eps_tried=ls.tried,
        loss_before=ls.baseline_loss, loss_after=dict(ls.tried).get(eps),
    )
    return record


# ---------------------------------------------------------------------------------------------- the recipe
def _load_data(cfg: RunConfig, backbone_config: object):
    size = backbone_image_size(backbone_config)
    channels = int(getattr(backbone_config, "num_channels", 3))
    d = cfg.data
    if d.image_size is not None and d.image_size != size:
        raise ImageSizeError(
            f"data.image_size={d.image_size} but the backbone takes {size}x{size} images (its position embeddings "
            "are fixed): leave data.image_size unset and the images are resized to the backbone's size"
        )
    if d.name.strip().lower() in NON_IMAGE_TASKS:  # load_task would refuse image_size with a less useful message
        raise ImageSizeError(
            f"task {d.name!r} is not an image classification task: the adapt recipe needs (C, H, W) images with "
            "class labels"
        )
    task = load_task(d.name, seed=cfg.seed, num_train=d.num_train, num_val=d.num_val, num_test=d.num_test,
                     image_size=size)
    norm = load_image_normalization(cfg.model.name_or_path, cfg.model.revision, channels)
    return prepare_task(task, size, channels, norm), norm


def run_adapt(cfg: RunConfig) -> AdaptRun:
    """Adapt ``cfg.model.name_or_path`` to ``cfg.data.name`` with ``cfg.adapt.method``.

    Returns:
        :class:`AdaptRun` (results are also written to ``output_dir/results.json``).

    Raises:
        ConfigError: no ``model.name_or_path``, or LoRA targets that match nothing.
        ImageSizeError: the task's images cannot be fed to the backbone.
        EmptyDatasetError: an empty train or validation split.
        LabelCountMismatchError: ``adapt.adapter_path`` has a head for another number of classes.
        AdapterMismatchError: ``adapt.adapter_path`` was made on another base model.
    """
    from transformers import AutoConfig

    a, name, revision = cfg.adapt, cfg.model.name_or_path, cfg.model.revision
    if not name:
        raise ConfigError("the adapt recipe needs model.name_or_path (a hub name or a local save_pretrained dir)")
    out = check_output_dir(cfg.output_dir)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()

    backbone_config = AutoConfig.from_pretrained(name, revision=revision)
    task, norm = _load_data(cfg, backbone_config)
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

    loss_mean, loss_sum = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    val_batches = _batches(task.val, cfg.train.batch_size)
    probe_batches = _batches(task.train, cfg.probe.batch_size, cfg.probe.batches)
    state = {"epoch": 0, "steps": 0}
    history: list[dict] = []
    events: list[dict] = []

    def train(phase: str, epochs: int, optimizer: torch.optim.Optimizer) -> None:
        for _ in range(epochs):
            left = None if cfg.train.max_steps is None else cfg.train.max_steps - state["steps"]
            if left is not None and left <= 0:
                return
            loader = make_loader(task.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 100_003 + state["epoch"])
            loss, steps = train_epoch(model, loader, optimizer, loss_mean, device, left)
            state["steps"] += steps
            state["epoch"] += 1
            val = evaluate(model, val_batches, "classification", device)
            history.append({"epoch": state["epoch"], "phase": phase, "train_loss": loss, "val_loss": val["loss"],
                            "val_error": val["error"], "trainable_params": count_parameters(model, True),
                            "time": time.perf_counter() - started})

    # 1. the head alone (the backbone's features are what the derivative will probe)
    _set_trainable(model, head, backbone=False, lora=False)
    train("head", a.head_epochs, _optimizer(model, head, a, cfg.train))

    # 2. the method
    budget = a.insertions * a.epochs_per_insertion + a.final_epochs
    use_lora = a.method == "lora" or (a.lora and a.method in INSERTION_METHODS)
    if use_lora and unwrap_peft(model)[1] is None:
        model = apply_lora(model, a)
    full = a.method == "full_finetune"
    _set_trainable(model, head, backbone=full, lora=use_lora)
    optimizer = _optimizer(model, head, a, cfg.train)
    if a.method in INSERTION_METHODS:
        unused = 0
        for event in range(a.insertions):
            record = _insertion_event(model, a.method, probe_batches, val_batches, loss_sum, cfg, event)
            events.append(record)
            if record["site"] is None:  # TD <= 0 everywhere: growth stops, its epochs go to the final phase
                unused = (a.insertions - event) * a.epochs_per_insertion
                break
            records.append({"site": record["site"], "layer": record["layer"]})
            _set_trainable(model, head, backbone=False, lora=use_lora)
            optimizer = _optimizer(model, head, a, cfg.train, old=optimizer)
            train(f"insertion {event + 1}", a.epochs_per_insertion, optimizer)
        train("final", a.final_epochs + unused, optimizer)  # every method gets the same epoch budget
    else:
        train(a.method, budget, optimizer)
    model.eval()

    after = _fingerprint(backbone_params)
    changed = sorted(n for n in before if before[n] != after[n])
    if changed and not full:
        raise RuntimeError(f"backbone weights changed during {a.method} adaptation (a bug): {changed[:5]}")

    val = evaluate(model, val_batches, "classification", device)
    test = {"loss": None, "error": None}
    if len(task.test):
        test = evaluate(model, make_loader(task.test, cfg.train.batch_size), "classification", device)
    base, _ = unwrap_peft(model)
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
        "events": events,
        "depth": base.config.num_hidden_layers,
        "params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "backbone_unchanged": not changed,
        "normalization": {"mean": list(norm.mean), "std": list(norm.std), "source": norm.source},
        "epochs": state["epoch"],
        "steps": state["steps"],
        "history": history,
        "wall_time": time.perf_counter() - started,
    }
    if a.save_adapter and not full:
        save_adapter(model, name, revision, records, out / "adapter", include_head=True)
    if a.save_merged:
        merge_and_save(model, out / "merged", base_name_or_path=name, revision=revision)
    write_json_atomic(Path(out) / "results.json", results)
    return AdaptRun(results=results, model=model, insertions=records)
