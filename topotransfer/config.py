"""Typed run configuration: dataclasses, YAML files and ``key=value`` dotted overrides.

Unknown keys are errors (a typo must not silently fall back to a default), values are type-checked
against the dataclass annotations, and ``__post_init__`` validates ranges. The resolved config is
written next to every run's outputs (``to_dict``), so a run can be reproduced from its directory.

Example::

    cfg = load_config("configs/grow_regression.yaml", ["train.lr=3e-3", "growth.max_insertions=4"])
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ADAPT_METHODS",
    "AdaptConfig",
    "ConfigError",
    "DEFAULT_OUTPUT_DIR",
    "DataConfig",
    "GrowthConfig",
    "ModelConfig",
    "ProbeConfig",
    "RunConfig",
    "TrainConfig",
    "check_runnable",
    "from_dict",
    "load_config",
    "to_dict",
]


class ConfigError(ValueError):
    """A config file or override that cannot be used (unknown key, wrong type, bad value)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


MODEL_FAMILIES = ("mlp", "cnn", "vit")  # the families `grow` builds (models.build.MODEL_FAMILIES)
DEVICES = ("auto", "cpu", "cuda")  # what training.distributed.build_accelerator can honour
DEFAULT_OUTPUT_DIR = "outputs/{config}/{method}-seed{seed}"
"""One directory per (config, method, seed): a baseline or another seed never writes into a finished run."""


def _check_task_name(name: str) -> None:
    """``data.name`` is a built-in task, ``hf:<name>[:<config>]`` or ``imagefolder:<dir>`` (what load_task takes)."""
    from .data import AVAILABLE_TASKS  # lazy: data imports torch, and `topotransfer --help` stays instant

    key = name.strip()
    if key.lower().replace("-", "_") in AVAILABLE_TASKS:
        return
    for prefix, example in (("hf:", "hf:mnist"), ("imagefolder:", "imagefolder:data/my_images"),
                            ("textfile:", "textfile:corpus/")):
        if key.startswith(prefix):
            _check(bool(key[len(prefix):].strip(": ")), f"data.name={name!r} needs a name after {prefix!r}, e.g. {example!r}")
            return
    raise ConfigError(
        f"data.name must be one of {'|'.join(AVAILABLE_TASKS)}, 'hf:<name>[:<config>]', 'imagefolder:<dir>' or "
        f"'textfile:<path>', got {name!r}"
    )


def _check_epsilons(key: str, values: list[float] | None) -> None:
    _check(values is None or (len(values) > 0 and all(v > 0 for v in values)),
           f"{key} must be null or a non-empty list of positive numbers, got {values}")


@dataclass
class ModelConfig:
    """Which network to start from."""

    family: str = field(default="mlp", metadata={"help": "mlp | cnn | vit (grow; adapt reads name_or_path)"})
    width: int = field(default=16, metadata={"help": "hidden width (mlp), channels (cnn), hidden size (vit)"})
    depth: int = field(default=2, metadata={"help": "initial number of hidden residual layers / blocks"})
    kernel_size: int = field(default=3, metadata={"help": "cnn kernel size"})
    num_heads: int = field(default=2, metadata={"help": "vit attention heads"})
    patch_size: int = field(default=4, metadata={"help": "vit patch size"})
    name_or_path: str | None = field(default=None, metadata={"help": "hub name or local save_pretrained dir"})
    revision: str | None = field(default=None, metadata={"help": "hub revision"})

    def __post_init__(self) -> None:
        _check(self.family in MODEL_FAMILIES, f"model.family must be one of {'|'.join(MODEL_FAMILIES)}, got {self.family!r}")
        _check(self.width > 0, f"model.width must be positive, got {self.width}")
        _check(self.depth >= 0, f"model.depth must be >= 0, got {self.depth}")
        _check(self.kernel_size >= 1 and self.kernel_size % 2 == 1,
               f"model.kernel_size must be a positive odd number, got {self.kernel_size}")
        _check(self.num_heads >= 1, f"model.num_heads must be >= 1, got {self.num_heads}")
        _check(self.patch_size >= 1, f"model.patch_size must be >= 1, got {self.patch_size}")
        _check(self.family != "vit" or self.width % self.num_heads == 0,
               f"model.width ({self.width}) must be a multiple of model.num_heads ({self.num_heads}) for vit")


@dataclass
class DataConfig:
    """The task: a generated, package-shipped, or user dataset."""

    name: str = field(default="regression", metadata={"help": "regression | digits | mnist | fashion_mnist | sentiment (text) | hf:<name>[:<config>] (any datasets.load_dataset source: hf:csv, hf:json, hf:parquet, hf:imagefolder, hub names) | imagefolder:<dir>"})
    num_train: int | None = field(default=None, metadata={"help": "cap on training examples (None = all)"})
    num_val: int | None = field(default=None, metadata={"help": "validation examples (held out from train)"})
    num_test: int | None = field(default=None, metadata={"help": "cap on test examples"})
    grid: bool = field(default=False, metadata={"help": "regression: grid instead of uniform random samples"})
    noise: float = field(default=0.0, metadata={"help": "regression: std of additive label noise"})
    image_size: int | None = field(default=None, metadata={"help": "resize images to this side"})
    max_length: int | None = field(
        default=None, metadata={"help": "text: most tokens per sentence (None = the backbone's limit, at most 512)"}
    )
    data_files: str | list[str] | dict[str, Any] | None = field(
        default=None, metadata={"help": "hf:csv / hf:json / hf:parquet: file(s), a glob, or {train: ..., test: ...}"}
    )
    data_dir: str | None = field(default=None, metadata={"help": "hf:imagefolder (or another builder): the directory"})
    text_column: str | None = field(default=None, metadata={"help": "hf: sentence column (None = the one string column)"})
    text_pair_column: str | None = field(default=None, metadata={"help": "hf: second sentence of a sentence pair"})
    image_column: str | None = field(default=None, metadata={"help": "hf: image column (None = the one Image column)"})
    label_column: str | None = field(
        default=None, metadata={"help": "hf: class column (None = label / labels / the one ClassLabel column)"}
    )
    augment: str = field(default="none", metadata={"help": "adapt / pretrain images, training split: none | flip | crop_flip (seeded)"})
    num_workers: int = field(default=0, metadata={"help": "hf: DataLoader workers decoding the batches"})
    skip_bad_examples: bool = field(
        default=False, metadata={"help": "hf: leave unreadable examples out (counted) instead of stopping"}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "hf: the datasets cache (None = its default)"})
    source_corpus: str | None = field(
        default=None,
        metadata={"help": "causal LM: a text file / directory of the pretraining domain; its perplexity before and "
                          "after adaptation is the forgetting"},
    )

    def __post_init__(self) -> None:
        for key in ("num_train", "num_val", "num_test"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"data.{key} must be positive, got {v}")
        _check(self.augment in ("none", "flip", "crop_flip"),
               f"data.augment must be none|flip|crop_flip, got {self.augment!r}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.max_length is None or self.max_length >= 2,
               f"data.max_length must be >= 2 (room for the special tokens), got {self.max_length}")
        _check(self.noise >= 0, f"data.noise must be >= 0, got {self.noise}")
        _check(self.image_size is None or self.image_size >= 1, f"data.image_size must be >= 1, got {self.image_size}")
        _check_task_name(self.name)


@dataclass
class ProbeConfig:
    """How the topological derivative is computed."""

    batches: int | None = field(default=None, metadata={"help": "probe batches (None = the whole train set)"})
    batch_size: int = field(default=256, metadata={"help": "probe batch size"})
    solver: str = field(default="auto", metadata={"help": "auto | dense | matrix_free"})
    rule: str = field(
        default="cluster",
        metadata={"help": "top1 | cluster | topk | rowwise (every row's own top eigenvector)"},
    )
    c: float = field(default=0.5, metadata={"help": "cluster rule: keep lambda >= (1-c) lambda_1"})
    k: int | None = field(default=None, metadata={"help": "topk rule: directions summed"})
    row_weighting: str = field(
        default="equal", metadata={"help": "rowwise rule: weight of row r's eigenvector, equal | sqrt | lambda"}
    )
    whiten: bool = field(
        default=False,
        metadata={"help": "rowwise rule: generalised eigenvectors of (Q_r, input second moment): eps = RMS pre-activation"},
    )
    tol: float = field(default=1e-4, metadata={"help": "matrix-free relative residual tolerance"})
    max_cache_gb: float | None = field(
        default=None,
        metadata={"help": "cap on the matrix-free probe cache in GB (the probe stops before exceeding it); "
                          "None = half the memory available when the probe starts, 0 = no cap"},
    )
    score: str = field(
        default="quadratic",
        metadata={"help": "what ranks the sites (site_selection=argmax): quadratic (theta^T Q theta, the predicted "
                          "decrease of the direction inserted) | lambda_max (TD; the same number under rule top1)"},
    )
    sample_fraction: float | None = field(
        default=None, metadata={"help": "keep this fraction of the tokens / pixels of each probe batch (seeded)"}
    )
    max_samples_per_batch: int | None = field(
        default=None, metadata={"help": "keep at most this many tokens / pixels of each probe batch (seeded)"}
    )
    sites: str = field(
        default="blocks",
        metadata={"help": "blocks (block boundaries) | sublayers (points inside transformer blocks) | all"},
    )

    def __post_init__(self) -> None:
        _check(self.sites in ("blocks", "sublayers", "all"), f"probe.sites must be blocks|sublayers|all, got {self.sites!r}")
        _check(self.solver in ("auto", "dense", "matrix_free"), f"probe.solver must be auto|dense|matrix_free, got {self.solver!r}")
        _check(self.rule in ("top1", "cluster", "topk", "rowwise"),
               f"probe.rule must be top1|cluster|topk|rowwise, got {self.rule!r}")
        _check(self.row_weighting in ("equal", "sqrt", "lambda"),
               f"probe.row_weighting must be equal|sqrt|lambda, got {self.row_weighting!r}")
        _check(self.max_cache_gb is None or self.max_cache_gb >= 0,
               f"probe.max_cache_gb must be >= 0, got {self.max_cache_gb}")
        _check(self.score in ("quadratic", "lambda_max"),
               f"probe.score must be quadratic|lambda_max, got {self.score!r}")
        _check(0.0 <= self.c <= 1.0, f"probe.c must lie in [0, 1], got {self.c}")
        _check(self.rule != "topk" or (self.k or 0) >= 1, "probe.rule=topk needs probe.k >= 1")
        _check(self.batch_size > 0, f"probe.batch_size must be positive, got {self.batch_size}")
        _check(self.batches is None or self.batches >= 1, f"probe.batches must be >= 1 or null, got {self.batches}")
        _check(self.k is None or self.k >= 1, f"probe.k must be >= 1 or null, got {self.k}")
        _check(self.tol > 0, f"probe.tol must be positive, got {self.tol}")
        _check(self.sample_fraction is None or 0.0 < self.sample_fraction <= 1.0,
               f"probe.sample_fraction must lie in (0, 1], got {self.sample_fraction}")
        _check(self.max_samples_per_batch is None or self.max_samples_per_batch >= 1,
               f"probe.max_samples_per_batch must be >= 1, got {self.max_samples_per_batch}")


@dataclass
class GrowthConfig:
    """When and where to grow, and the baselines run by the same loop."""

    method: str = field(
        default="topo",
        metadata={"help": "topo | random_site | random_init | net2deeper | forward_thinking | fixed"},
    )
    max_insertions: int = field(default=4, metadata={"help": "budget of inserted layers"})
    max_depth: int | None = field(default=None, metadata={"help": "stop when the block count reaches this"})
    max_params: int | None = field(default=None, metadata={"help": "stop when parameters exceed this"})
    patience: int = field(default=5, metadata={"help": "epochs without val improvement before growing"})
    min_delta: float = field(default=1e-4, metadata={"help": "relative val-loss improvement that counts"})
    epochs_per_stage: int | None = field(default=None, metadata={"help": "grow after exactly this many epochs (overrides patience)"})
    max_stage_epochs: int | None = field(
        default=None,
        metadata={"help": "grow at a plateau (patience) or after this many epochs since the last event, whichever is first"},
    )
    check_every: int = field(default=1, metadata={"help": "epochs between the validation checks that patience counts"})
    both_signs: bool = field(default=True, metadata={"help": "line-search eps along +theta and -theta"})
    epsilons: list[float] | None = field(default=None, metadata={"help": "eps grid of the line search (None = default)"})
    site_selection: str = field(
        default="argmax",
        metadata={"help": "topo: argmax (of probe.score) | realized (line-search every score > 0 site's eigen "
                          "direction, keep the lowest held-out loss)"},
    )
    fill_inactive: float = field(
        default=0.0,
        metadata={"help": "random direction on the rows the eigen direction leaves at zero (they never train "
                          "otherwise), norm relative to the eigen direction's; 0 = off"},
    )
    init_mix: float = field(
        default=0.0,
        metadata={"help": "topo: inserted direction sqrt(1 - m^2) * eigen + m * random, the random part scaled like "
                          "the eigen one (random_init's direction); 0 = the eigen direction, 1 = random_init's"},
    )

    def __post_init__(self) -> None:
        methods = ("topo", "random_site", "random_init", "net2deeper", "forward_thinking", "fixed")
        _check(self.method in methods, f"growth.method must be one of {methods}, got {self.method!r}")
        _check(self.max_insertions >= 0, f"growth.max_insertions must be >= 0, got {self.max_insertions}")
        _check(self.fill_inactive >= 0, f"growth.fill_inactive must be >= 0, got {self.fill_inactive}")
        _check(0.0 <= self.init_mix <= 1.0, f"growth.init_mix must be in [0, 1], got {self.init_mix}")
        _check(self.site_selection in ("argmax", "realized"),
               f"growth.site_selection must be argmax|realized, got {self.site_selection!r}")
        _check(self.patience >= 1, f"growth.patience must be >= 1, got {self.patience}")
        _check(self.check_every >= 1, f"growth.check_every must be >= 1, got {self.check_every}")
        _check(self.max_stage_epochs is None or self.max_stage_epochs >= 1,
               f"growth.max_stage_epochs must be >= 1 or null, got {self.max_stage_epochs}")
        _check(self.max_stage_epochs is None or self.epochs_per_stage is None,
               "growth.max_stage_epochs and growth.epochs_per_stage exclude each other (set one)")
        _check(self.min_delta >= 0, f"growth.min_delta must be >= 0, got {self.min_delta}")
        for key in ("max_depth", "max_params", "epochs_per_stage"):
            v = getattr(self, key)
            _check(v is None or v >= 1, f"growth.{key} must be >= 1 or null, got {v}")
        _check_epsilons("growth.epsilons", self.epsilons)


@dataclass
class TrainConfig:
    """Optimisation."""

    epochs: int = field(default=100, metadata={"help": "total training epochs (across all growth stages)"})
    max_steps: int | None = field(default=None, metadata={"help": "hard cap on optimizer steps (smoke tests)"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    lr: float = field(default=3e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    optimizer: str = field(default="adam", metadata={"help": "adam | adamw | sgd"})
    checkpoint_every: int = field(default=10, metadata={"help": "save a resumable checkpoint every N epochs (and at every growth event)"})
    checkpoint_every_steps: int | None = field(
        default=None,
        metadata={"help": "also save a resumable checkpoint every N optimizer steps, mid-epoch (grow; None = off)"},
    )
    lr_schedule: str = field(
        default="constant",
        metadata={"help": "constant | cosine | linear: LR over the run's optimizer steps, continued across growth events"},
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear LR warm-up over the first N optimizer steps"})
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 (accelerate autocast; the derivative is always computed in float32+)"})

    def __post_init__(self) -> None:
        _check(self.mixed_precision in ("no", "bf16"), f"train.mixed_precision must be no|bf16, got {self.mixed_precision!r}")
        _check(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
               f"train.checkpoint_every_steps must be >= 1 or null, got {self.checkpoint_every_steps}")
        _check(self.lr_schedule in ("constant", "cosine", "linear"),
               f"train.lr_schedule must be constant|cosine|linear, got {self.lr_schedule!r}")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _check(self.batch_size > 0, f"train.batch_size must be positive, got {self.batch_size}")
        _check(self.optimizer in ("adam", "adamw", "sgd"), f"train.optimizer must be adam|adamw|sgd, got {self.optimizer!r}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.max_steps is None or self.max_steps >= 1, f"train.max_steps must be >= 1 or null, got {self.max_steps}")


ADAPT_METHODS = ("topo", "random_site", "last_block", "linear_probe", "full_finetune", "lora",
                 "expand", "interleave", "on_top")
#: Methods of a decoder LM on a text corpus (``recipes/causal_lm.py``); the last three insert copied blocks.
CAUSAL_LM_METHODS = ("topo", "expand", "interleave", "on_top", "lora")


@dataclass
class AdaptConfig:
    """Transfer a pretrained backbone to a new dataset (``topotransfer adapt``; docs/method.md section 9).

    The schedule is ``head_epochs`` of head-only training, then (with ``lora`` on an insertion method)
    ``lora_warmup_epochs`` of LoRA + head, then ``insertions`` x (insert a layer, train ``epochs_per_insertion``
    epochs) and ``final_epochs`` more. Baselines without insertions train for the same total number of epochs. ``train.batch_size``, ``train.optimizer``, ``train.weight_decay`` and
    ``train.max_steps`` apply; ``train.epochs`` and ``train.lr`` do not.
    """

    method: str = field(
        default="topo",
        metadata={"help": "topo | random_site | last_block (insertion) | linear_probe | full_finetune | lora (baselines); "
                          "text corpus (causal LM): topo | expand (copied blocks placed by the derivative) | interleave | "
                          "on_top | lora"},
    )
    head_epochs: int = field(default=2, metadata={"help": "epochs training only the new head before any insertion"})
    insertions: int = field(default=2, metadata={"help": "budget of inserted TopoLayers"})
    epochs_per_insertion: int = field(default=3, metadata={"help": "epochs of training after every insertion"})
    final_epochs: int = field(default=0, metadata={"help": "epochs after the last insertion"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the head and inserted layers"})
    backbone_lr: float | None = field(default=None, metadata={"help": "lr of LoRA / fine-tuned backbone weights (None = lr)"})
    lora: bool = field(default=False, metadata={"help": "also train peft LoRA on the backbone (insertion methods)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_warmup_epochs: int = field(
        default=0,
        metadata={"help": "with adapt.lora (insertion methods): epochs of LoRA + head training after the head warm-up "
                          "and before the first insertion, so the derivative probes the LoRA-adapted model"},
    )
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "LoRA targets; None = ['q_proj', 'v_proj'] (transformers 5.x), else ['query', 'value'] (4.x)"},
    )
    epsilons: list[float] | None = field(default=None, metadata={"help": "eps grid of the line search (None = default)"})
    site_selection: str = field(
        default="argmax",
        metadata={"help": "topo: argmax (of probe.score) | realized (line-search every score > 0 site's direction, "
                          "keep the lowest held-out loss)"},
    )
    param_budget: int | None = field(
        default=None,
        metadata={"help": "topo: trainable parameters of the inserted layers (minus LoRA's with adapt.lora), spent on "
                          "rank-k layers at several sites by eigenvalue per parameter (probe.rule=rowwise); None = "
                          "one full layer per insertion"},
    )
    budget_lora_rank: int | None = field(
        default=None, metadata={"help": "param_budget = LoRA's parameter count at this rank on the LoRA targets"}
    )
    layer_lr: float | None = field(
        default=None, metadata={"help": "lr of the inserted layers (None = adapt.lr, the head's)"}
    )
    lowrank_freeze_up: bool = field(
        default=False,
        metadata={"help": "rank-k layers: keep U at its initial one-hot eigen rows (V and c train; a budget then counts "
                          "d + 1 trained parameters per rank)"},
    )
    budget_min_rank: int = field(default=1, metadata={"help": "budgeted layers: smallest rank of a layer"})
    budget_max_rank: int | None = field(default=None, metadata={"help": "budgeted layers: largest rank of a layer"})
    adapter_path: str | None = field(default=None, metadata={"help": "continue from a saved adapter of the same base"})
    save_adapter: bool = field(default=True, metadata={"help": "write output_dir/adapter (not for full_finetune)"})
    save_merged: bool = field(default=True, metadata={"help": "write output_dir/merged (full export)"})
    lora_match_blocks: bool = field(
        default=True,
        metadata={"help": "causal LM, method lora: rank = the largest whose parameters do not exceed `insertions` copied "
                          "blocks' (alpha = rank); false: adapt.lora_r / lora_alpha"},
    )

    def __post_init__(self) -> None:
        _check(self.method in ADAPT_METHODS, f"adapt.method must be one of {ADAPT_METHODS}, got {self.method!r}")
        for key in ("head_epochs", "lora_warmup_epochs", "insertions", "epochs_per_insertion", "final_epochs"):
            _check(getattr(self, key) >= 0, f"adapt.{key} must be >= 0, got {getattr(self, key)}")
        _check(self.lr > 0, f"adapt.lr must be positive, got {self.lr}")
        _check(self.backbone_lr is None or self.backbone_lr > 0, f"adapt.backbone_lr must be positive, got {self.backbone_lr}")
        _check(self.layer_lr is None or self.layer_lr > 0, f"adapt.layer_lr must be positive, got {self.layer_lr}")
        _check(self.lora_r >= 1, f"adapt.lora_r must be >= 1, got {self.lora_r}")
        _check(self.site_selection in ("argmax", "realized"),
               f"adapt.site_selection must be argmax|realized, got {self.site_selection!r}")
        _check(0.0 <= self.lora_dropout < 1.0, f"adapt.lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        _check(
            not (self.lora and self.method in ("linear_probe", "full_finetune")),
            f"adapt.lora=true does not apply to method {self.method!r} (use method=lora for the LoRA baseline)",
        )
        _check(self.lora_warmup_epochs == 0 or (self.lora and self.method in ("topo", "random_site", "last_block")),
               f"adapt.lora_warmup_epochs={self.lora_warmup_epochs} needs adapt.lora=true on an insertion method "
               f"(topo | random_site | last_block), got method {self.method!r}, lora {self.lora}")
        _check(self.param_budget is None or self.param_budget >= 1, f"adapt.param_budget must be >= 1, got {self.param_budget}")
        _check(self.budget_lora_rank is None or self.budget_lora_rank >= 1,
               f"adapt.budget_lora_rank must be >= 1, got {self.budget_lora_rank}")
        _check(self.param_budget is None or self.budget_lora_rank is None,
               "set adapt.param_budget or adapt.budget_lora_rank, not both")
        _check(self.budget_min_rank >= 1 and (self.budget_max_rank is None or self.budget_max_rank >= self.budget_min_rank),
               f"need 1 <= adapt.budget_min_rank <= adapt.budget_max_rank, got {self.budget_min_rank}, {self.budget_max_rank}")
        _check(self.lora_target_modules is None or len(self.lora_target_modules) > 0,
               "adapt.lora_target_modules must be null or a non-empty list")
        _check(self.lora_alpha > 0, f"adapt.lora_alpha must be positive, got {self.lora_alpha}")
        _check_epsilons("adapt.epsilons", self.epsilons)


@dataclass
class RunConfig:
    """A whole run."""

    task: str = field(default="grow", metadata={"help": "grow | adapt | pretrain"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    output_dir: str = field(
        default=DEFAULT_OUTPUT_DIR,
        metadata={"help": "where history, checkpoints and plots go; {config}, {method}, {seed} and {task} are "
                          "replaced by the config file's name, growth.method (grow) or adapt.method (adapt), seed, task"},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    def __post_init__(self) -> None:
        _check(self.task in ("grow", "adapt", "pretrain"), f"task must be grow|adapt|pretrain, got {self.task!r}")
        _check(self.device in DEVICES, f"device must be one of {'|'.join(DEVICES)}, got {self.device!r}")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(bool(self.output_dir.strip()), "output_dir must not be empty")
        method = {"grow": self.growth.method, "adapt": self.adapt.method}.get(self.task, self.task)
        # {config} is replaced by load_config (it knows the file); a config built in code is "default"
        for key, value in (("config", "default"), ("method", method), ("seed", self.seed), ("task", self.task)):
            self.output_dir = self.output_dir.replace("{" + key + "}", str(value))
        _check((self.adapt.param_budget is None and self.adapt.budget_lora_rank is None) or self.probe.rule == "rowwise",
               f"adapt.param_budget / budget_lora_rank need probe.rule=rowwise (one rank per row), got {self.probe.rule!r}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        _check(isinstance(value, (list, tuple)), f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if _is_dataclass_type(tp):
        _check(isinstance(value, dict), f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, got {value!r}")
        _check(math.isfinite(value), f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), f"{key} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {[prefix + k for k in unknown]}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def to_dict(cfg: Any) -> dict:
    """Nested plain dict of a config dataclass (for YAML / JSON / trackers)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig) -> Any:
    """Read a YAML file (optional), apply ``key=value`` overrides (values parsed as YAML), validate.

    Raises:
        ConfigError: unknown keys, wrong types, bad values, malformed overrides, missing file.
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"Cannot read config file {str(path)!r}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {_yaml_problem(e)}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        tree = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"Override {item!r}: the value is not valid YAML: {_yaml_problem(e)}") from e
        _set_dotted(tree, key.strip(), value)
    if cls is RunConfig:
        out = tree.get("output_dir", DEFAULT_OUTPUT_DIR)
        if isinstance(out, str):
            tree["output_dir"] = out.replace("{config}", Path(path).stem if path is not None else "default")
    return from_dict(cls, tree)


def _check_backbone_source(name: str) -> None:
    """``model.name_or_path`` is a ``save_pretrained`` directory, or something that can only be a hub name.

    A path-like name (``./x``, ``/x``, ``~/x``, ``a/b/c``) that is no directory is a typo, not a hub repo; a
    directory needs the ``config.json`` that ``save_pretrained`` writes.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        _check((path / "config.json").is_file(),
               f"model.name_or_path={name!r} is a directory without config.json: give a directory written by "
               "save_pretrained (config.json + weights)")
        return
    _check(not path.exists(), f"model.name_or_path={name!r} is a file: give the save_pretrained directory holding it")
    path_like = name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1 or "\\" in name
    _check(not path_like,
           f"model.name_or_path={name!r}: no such directory (and not a hub name 'namespace/name'); give a local "
           "save_pretrained directory")


def _yaml_problem(e: Exception) -> str:
    """One line from a PyYAML error: what is wrong and where (its own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def check_runnable(cfg: RunConfig, command: str | None = None) -> None:
    """The checks across sections that the run of ``cfg.task`` (or ``command``) would otherwise fail on later.

    ``topotransfer validate`` and every run command call this before anything is written.

    Args:
        command: "grow", "derivative" or "adapt" (default: ``cfg.task``); grow and derivative need a grow config.

    Raises:
        ConfigError: the config cannot run as ``command``.
    """
    from .text_data import TEXT_TASKS

    command = command or cfg.task
    needs = command if command in ("adapt", "pretrain") else "grow"
    _check(cfg.task == needs,
           f"the config has task={cfg.task!r}: run it with `topotransfer {cfg.task}`, not `topotransfer {command}`")
    builtin = cfg.data.name.strip().lower().replace("-", "_")
    if builtin != "regression":
        _check(not cfg.data.grid and not cfg.data.noise,
               f"data.grid and data.noise apply to the regression task only, not to {cfg.data.name!r}")
    if needs == "pretrain":  # a ViT from scratch on an image task (recipes/pretrain.py)
        _check(cfg.model.family == "vit", f"pretrain builds a ViT: set model.family=vit (got {cfg.model.family!r})")
        _check(builtin not in TEXT_TASKS and builtin != "regression",
               f"pretrain needs an image classification task, not {cfg.data.name!r}")
        return
    if needs == "adapt":
        from .lm_data import is_corpus

        corpus = is_corpus(cfg.data.name)
        _check(not corpus or cfg.adapt.method in CAUSAL_LM_METHODS,
               f"adapt.method={cfg.adapt.method!r} does not apply to a text corpus ({cfg.data.name!r}); use "
               f"{'|'.join(CAUSAL_LM_METHODS)}")
        _check(corpus or cfg.adapt.method not in ("expand", "interleave", "on_top"),
               f"adapt.method={cfg.adapt.method!r} inserts copied blocks of a decoder LM: it needs a text corpus "
               "(data.name=textfile:<path> or hf:text with data.data_files)")
        _check(cfg.data.source_corpus is None or corpus, "data.source_corpus applies to a text corpus (causal LM) only")
        _check(not corpus or cfg.adapt.lora_warmup_epochs == 0,
               "adapt.lora_warmup_epochs applies to classification adapt runs, not to a text corpus (causal LM)")
        _check(bool(cfg.model.name_or_path),
               "the adapt recipe needs model.name_or_path (a hub name or a local save_pretrained dir), "
               "e.g. model.name_or_path=path/to/vit")
        _check_backbone_source(cfg.model.name_or_path)
        return
    _check(builtin not in TEXT_TASKS,
           f"data.name={cfg.data.name!r} is a text task: grow builds networks on tensors; adapt a pretrained text "
           "encoder instead (topotransfer adapt --config adapt_sentiment_minilm model.name_or_path=DIR)")
    if cfg.model.family in ("cnn", "vit"):
        _check(builtin != "regression", f"model.family={cfg.model.family!r} needs an image task, not {cfg.data.name!r}")
    if builtin == "regression":
        _check(cfg.data.image_size is None, "data.image_size does not apply to the regression task")
    if cfg.model.family == "vit":
        _check(cfg.model.depth >= 1, "model.family='vit' needs model.depth >= 1 (sites are block boundaries)")
        size = cfg.data.image_size
        _check(size is None or size % cfg.model.patch_size == 0,
               f"data.image_size={size} must be divisible by model.patch_size={cfg.model.patch_size}")
