"""Typed run configuration: dataclasses, YAML files and ``key=value`` dotted overrides.

Unknown keys are errors (a typo must not silently fall back to a default), values are type-checked
against the dataclass annotations, and ``__post_init__`` validates ranges. The resolved config is
written next to every run's outputs (``to_dict``), so a run can be reproduced from its directory.

Example::

    cfg = load_config("configs/grow_regression.yaml", ["train.lr=3e-3", "growth.max_insertions=4"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "GrowthConfig",
    "ModelConfig",
    "ProbeConfig",
    "RunConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "to_dict",
]


class ConfigError(ValueError):
    """A config file or override that cannot be used (unknown key, wrong type, bad value)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """Which network to start from."""

    family: str = field(default="mlp", metadata={"help": "mlp | cnn | vit (grow); hf name/path for adapt"})
    width: int = field(default=16, metadata={"help": "hidden width (mlp), channels (cnn), hidden size (vit)"})
    depth: int = field(default=2, metadata={"help": "initial number of hidden residual layers / blocks"})
    kernel_size: int = field(default=3, metadata={"help": "cnn kernel size"})
    num_heads: int = field(default=2, metadata={"help": "vit attention heads"})
    patch_size: int = field(default=4, metadata={"help": "vit patch size"})
    name_or_path: str | None = field(default=None, metadata={"help": "hub name or local save_pretrained dir"})
    revision: str | None = field(default=None, metadata={"help": "hub revision"})

    def __post_init__(self) -> None:
        _check(self.width > 0, f"model.width must be positive, got {self.width}")
        _check(self.depth >= 0, f"model.depth must be >= 0, got {self.depth}")


@dataclass
class DataConfig:
    """The task: a generated, package-shipped, or user dataset."""

    name: str = field(default="regression", metadata={"help": "regression | digits | mnist | fashion_mnist | hf:<name> | imagefolder:<dir>"})
    num_train: int | None = field(default=None, metadata={"help": "cap on training examples (None = all)"})
    num_val: int | None = field(default=None, metadata={"help": "validation examples (held out from train)"})
    num_test: int | None = field(default=None, metadata={"help": "cap on test examples"})
    grid: bool = field(default=False, metadata={"help": "regression: grid instead of uniform random samples"})
    noise: float = field(default=0.0, metadata={"help": "regression: std of additive label noise"})
    image_size: int | None = field(default=None, metadata={"help": "resize images to this side"})

    def __post_init__(self) -> None:
        for key in ("num_train", "num_val", "num_test"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"data.{key} must be positive, got {v}")


@dataclass
class ProbeConfig:
    """How the topological derivative is computed."""

    batches: int | None = field(default=None, metadata={"help": "probe batches (None = the whole train set)"})
    batch_size: int = field(default=256, metadata={"help": "probe batch size"})
    solver: str = field(default="auto", metadata={"help": "auto | dense | matrix_free"})
    rule: str = field(default="cluster", metadata={"help": "top1 | cluster | topk"})
    c: float = field(default=0.5, metadata={"help": "cluster rule: keep lambda >= (1-c) lambda_1"})
    k: int | None = field(default=None, metadata={"help": "topk rule: directions summed"})
    tol: float = field(default=1e-6, metadata={"help": "matrix-free relative residual tolerance"})

    def __post_init__(self) -> None:
        _check(self.solver in ("auto", "dense", "matrix_free"), f"probe.solver must be auto|dense|matrix_free, got {self.solver!r}")
        _check(self.rule in ("top1", "cluster", "topk"), f"probe.rule must be top1|cluster|topk, got {self.rule!r}")
        _check(0.0 <= self.c <= 1.0, f"probe.c must lie in [0, 1], got {self.c}")
        _check(self.rule != "topk" or (self.k or 0) >= 1, "probe.rule=topk needs probe.k >= 1")
        _check(self.batch_size > 0, f"probe.batch_size must be positive, got {self.batch_size}")


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
    epsilons: list[float] | None = field(default=None, metadata={"help": "eps grid of the line search (None = default)"})
    random_init_std: float = field(default=0.01, metadata={"help": "std of random_init / random baselines' weights"})

    def __post_init__(self) -> None:
        methods = ("topo", "random_site", "random_init", "net2deeper", "forward_thinking", "fixed")
        _check(self.method in methods, f"growth.method must be one of {methods}, got {self.method!r}")
        _check(self.max_insertions >= 0, f"growth.max_insertions must be >= 0, got {self.max_insertions}")
        _check(self.patience >= 1, f"growth.patience must be >= 1, got {self.patience}")


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

    def __post_init__(self) -> None:
        _check(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _check(self.batch_size > 0, f"train.batch_size must be positive, got {self.batch_size}")
        _check(self.optimizer in ("adam", "adamw", "sgd"), f"train.optimizer must be adam|adamw|sgd, got {self.optimizer!r}")


@dataclass
class RunConfig:
    """A whole run."""

    task: str = field(default="grow", metadata={"help": "grow | adapt"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    output_dir: str = field(default="outputs/run", metadata={"help": "where history, checkpoints and plots go"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(self.task in ("grow", "adapt"), f"task must be grow|adapt, got {self.task!r}")


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
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        tree = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return from_dict(cls, tree)
