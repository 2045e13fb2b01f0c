"""Datasets as users have them: any ``datasets.load_dataset`` source as lazily decoded splits.

``load_task("hf:<name>[:<config>]", ...)`` reaches :func:`load_hf_task`: a hub dataset (``hf:imdb``,
``hf:glue:sst2``, ``hf:cifar100``) or a packaged builder over local files (``hf:csv`` / ``hf:json`` /
``hf:parquet`` with ``data_files``, ``hf:imagefolder`` with ``data_dir``). ``datasets`` converts the source
once to memory-mapped Arrow files in its cache; the splits here hold only row indices and labels.

Lazy by construction: a :class:`LazySplit` is a torch ``Dataset`` with ``__getitems__``, so the
``DataLoader`` asks it for a whole batch of rows at once; the rows are read from Arrow, the images decoded
and transformed (or the sentences tokenised) for that batch only, then dropped. Memory therefore does not
grow with the number of examples (``scripts/bench_data_memory.py`` measures it).

Columns: the label column is ``label_column``, else ``label`` / ``labels``, else the one ``ClassLabel``
column; the input is ``image_column`` (an image task), else ``text_column`` (+ ``text_pair_column`` for
sentence pairs; a text task), else the one ``Image`` column, else the one string column. Anything else is
one :class:`~topotransfer.errors.DatasetColumnError` that lists the columns.

Bad examples: every image is opened and decoded once before training (and every text / label checked for
a missing value); the first unreadable one is named (its file, or split and row) in a one-line
:class:`~topotransfer.errors.BadExampleError`, or, with ``skip_bad_examples``, all of them are left out
and counted (``Task.source["skipped"]``).

Augmentation (training split only, :func:`augment_image`): ``flip`` mirrors left-right with p = 1/2;
``crop_flip`` first takes a random crop of 25-100 % of the area with aspect ratio in [3/4, 4/3] (resized
back to the model's size), then flips. Each example's draw comes from a generator seeded by (the epoch's
loader seed, the example's row), so it is the same for every batch size, worker count and process count,
and differs between epochs.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import BadExampleError, DatasetColumnError

__all__ = [
    "AUGMENTATIONS",
    "Columns",
    "ImageTransform",
    "LazySplit",
    "SourceOptions",
    "TextTransform",
    "augment_image",
    "decode_image",
    "detect_columns",
]

AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "crop_flip")
_CROP_SCALE = (0.25, 1.0)  # fraction of the area kept by crop_flip
_CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio (width / height) of the crop
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_LABEL_NAMES = ("label", "labels")
_SPLIT_ALIASES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}


@dataclass(frozen=True)
class SourceOptions:
    """How to read a ``hf:`` source (the ``data.*`` options of the same names).

    Attributes:
        data_files: file(s) of a packaged builder (``csv``, ``json``, ``parquet``...): a path or glob, a
            list, or ``{"train": ..., "test": ...}``.
        data_dir: directory of a builder (``imagefolder``: ``<dir>/<class>/<image>`` or
            ``<dir>/<split>/<class>/<image>``).
        text_column: the sentence column (a text task).
        text_pair_column: the second sentence of a pair (needs ``text_column``).
        image_column: the image column (an image task).
        label_column: the class column.
        skip_bad_examples: leave unreadable examples out (counted) instead of stopping.
        num_workers: ``DataLoader`` worker processes for decoding (0 = in the main process).
        cache_dir: the ``datasets`` cache (None = its default).
    """

    data_files: str | list[str] | dict[str, Any] | None = None
    data_dir: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    skip_bad_examples: bool = False
    num_workers: int = 0
    cache_dir: str | None = None


@dataclass(frozen=True)
class Columns:
    """The columns a task reads.

    Attributes:
        modality: ``"image"`` or ``"text"``.
        inputs: ``(image,)``, ``(text,)`` or ``(text, text_pair)``.
        label: the class column.
    """

    modality: str
    inputs: tuple[str, ...]
    label: str


# ------------------------------------------------------------------------------------------------ columns
def _is_string(feature: Any) -> bool:
    return type(feature).__name__ == "Value" and getattr(feature, "dtype", None) in ("string", "large_string")


def detect_columns(features: Any, options: SourceOptions, where: str) -> Columns:
    """Find the input and label columns of a dataset from its ``features`` (see the module docstring).

    Raises:
        DatasetColumnError: a named column that does not exist, no or several candidates, or a
            ``text_pair_column`` without ``text_column``.
    """
    from datasets import ClassLabel, Image

    names = list(features)
    listing = ", ".join(f"{n} ({type(features[n]).__name__})" for n in names)

    def given(key: str, value: str | None) -> str | None:
        if value is not None and value not in features:
            raise DatasetColumnError(f"{where}: data.{key}={value!r} is not a column; the columns are: {listing}")
        return value

    label = given("label_column", options.label_column)
    image = given("image_column", options.image_column)
    text = given("text_column", options.text_column)
    pair = given("text_pair_column", options.text_pair_column)
    if pair is not None and text is None:
        raise DatasetColumnError(f"{where}: data.text_pair_column needs data.text_column (the first sentence)")
    if image is not None and text is not None:
        raise DatasetColumnError(f"{where}: set data.image_column or data.text_column, not both")
    if label is None:
        found = [n for n in _LABEL_NAMES if n in features] or [n for n in names if isinstance(features[n], ClassLabel)]
        if len(found) != 1:
            what = f"several label column candidates ({', '.join(found)})" if found else (
                "no column named label / labels and no ClassLabel column")
            raise DatasetColumnError(f"{where}: {what}: set data.label_column; the columns are: {listing}")
        label = found[0]
    if text is not None:
        return Columns("text", (text,) if pair is None else (text, pair), label)
    if image is None:
        images = [n for n in names if isinstance(features[n], Image) and n != label]
        if len(images) == 1:
            image = images[0]
        elif len(images) > 1:
            raise DatasetColumnError(f"{where}: several image columns: set data.image_column; the columns are: {listing}")
    if image is not None:
        return Columns("image", (image,), label)
    texts = [n for n in names if _is_string(features[n]) and n != label]
    if len(texts) == 1:
        return Columns("text", (texts[0],), label)
    raise DatasetColumnError(
        f"{where}: {'several' if texts else 'no'} input column candidates: set data.image_column, or "
        f"data.text_column (and data.text_pair_column for sentence pairs); the columns are: {listing}"
    )


# ------------------------------------------------------------------------------------------------- images
def decode_image(value: Any, where: str) -> Any:
    """A PIL image, fully decoded, from a ``datasets`` image cell (``{"bytes", "path"}``) or a PIL image.

    Raises:
        BadExampleError: the file is missing, truncated or not an image; the message names ``where``.
    """
    from PIL import Image as PILImage

    try:
        if isinstance(value, PILImage.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = PILImage.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = PILImage.open(value["path"])
        else:
            raise ValueError(f"no image data ({value!r})")
        image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        msg = " ".join(str(e).split()) or type(e).__name__
        raise BadExampleError(f"{where} cannot be read: {msg}") from None
    return image


def _image_to_tensor(image: Any) -> Tensor:
    """PIL image -> (C, H, W) float32 in [0, 1], C = 1 for gray modes and 3 otherwise (alpha dropped)."""
    mode = "L" if image.mode in _GRAY_MODES else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    arr = np.asarray(image, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).to(torch.float32).div_(255.0)


def _where(value: Any, split: str, row: int) -> str:
    path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
    return f"image {path}" if path else f"{split} example {row}"


def example_generator(epoch_seed: int, row: int) -> torch.Generator:
    """The random stream of one example in one epoch (independent of batching, workers and ranks)."""
    return torch.Generator().manual_seed((epoch_seed * 1_000_003 + row * 7_919 + 17) % (2**63))


def augment_image(image: Tensor, mode: str, gen: torch.Generator) -> Tensor:
    """A random crop and / or left-right flip of one image (see the module docstring); same size out.

    Args:
        image: (C, H, W) float.
        mode: one of :data:`AUGMENTATIONS`.
        gen: this example's random stream.

    Returns:
        (C, H, W): for ``crop_flip`` the crop is resized back to (H, W) (bilinear, antialiased).
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"data.augment must be one of {AUGMENTATIONS}, got {mode!r}")
    if mode == "none":
        return image
    c, h, w = image.shape
    if mode == "crop_flip":
        u = torch.rand(20, generator=gen, dtype=torch.float64).tolist()  # fixed draws: 10 tries of (area, ratio)
        top, left, ch, cw = 0, 0, h, w  # fall back to the whole image
        for area_u, ratio_u in zip(u[0::2], u[1::2], strict=True):
            area = h * w * (_CROP_SCALE[0] + (_CROP_SCALE[1] - _CROP_SCALE[0]) * area_u)
            ratio = math.exp(math.log(_CROP_RATIO[0]) + (math.log(_CROP_RATIO[1]) - math.log(_CROP_RATIO[0])) * ratio_u)
            cw_try, ch_try = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw_try <= w and 0 < ch_try <= h:
                ch, cw = ch_try, cw_try
                top = int(torch.randint(h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(w - cw + 1, (1,), generator=gen))
                break
        crop = image[:, top:top + ch, left:left + cw]
        if (ch, cw) != (h, w):
            crop = torch.nn.functional.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False,
                                                   antialias=True)[0]
        image = crop
    if bool(torch.rand(1, generator=gen) < 0.5):
        image = image.flip(-1)
    return image


@dataclass(frozen=True)
class ImageTransform:
    """Decoded image -> model input: (C, H, W) float in [0, 1] -> [augment] -> (C', S, S) ``(x - mean) / std``.

    The resize, channel conversion and normalisation are :func:`topotransfer.preprocess.prepare_images`'s
    (the same as for the in-memory tasks). ``mean = 0, std = 1`` keeps the [0, 1] range.

    Attributes:
        size: S.
        channels: C'.
        mean: (C',) channel means.
        std: (C',) channel standard deviations.
        augment: one of :data:`AUGMENTATIONS`; applied only when the loader passes an epoch seed.
    """

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"

    def __call__(self, columns: list[list[Any]], rows: list[int], split: str, epoch_seed: int | None) -> list[Tensor]:
        from .models.hf import ImageNormalization
        from .preprocess import prepare_images

        norm = ImageNormalization(self.mean, self.std)
        out = []
        for value, row in zip(columns[0], rows, strict=True):
            x = _image_to_tensor(decode_image(value, _where(value, split, row)))
            if self.augment != "none" and epoch_seed is not None:
                x = augment_image(x, self.augment, example_generator(epoch_seed, row))
            out.append(prepare_images(x[None], self.size, self.channels, norm)[0])
        return out


@dataclass(frozen=True)
class TextTransform:
    """Sentences (or sentence pairs) of a batch -> :class:`~topotransfer.preprocess.TextInputs` rows,
    tokenised together and padded to the batch's longest (at most ``max_length`` tokens).

    Attributes:
        tokenizer: the backbone's tokenizer; ``None`` returns the strings (pairs as tuples).
        max_length: the most tokens per example, special tokens included.
    """

    tokenizer: Any = None
    max_length: int = 512

    def __call__(self, columns: list[list[Any]], rows: list[int], split: str, epoch_seed: int | None) -> list[Any]:
        if self.tokenizer is None:
            return list(columns[0]) if len(columns) == 1 else list(zip(*columns, strict=True))
        from .preprocess import TextInputs

        enc = self.tokenizer(*columns, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tensors = {k: v.to(torch.long) for k, v in enc.items() if isinstance(v, Tensor)}
        return [TextInputs({k: v[i] for k, v in tensors.items()}) for i in range(len(rows))]


# ---------------------------------------------------------------------------------------------- the split
class LazySplit(Dataset):
    """Rows of a ``datasets.Dataset`` read, decoded and transformed one batch at a time.

    Item ``i`` is ``(transform(row indices[i]), labels[i])``. The ``DataLoader`` calls
    :meth:`__getitems__` with a whole batch of positions, so one Arrow read and one tokenizer call serve
    the batch. Nothing is cached: memory holds the current batch only.

    Args:
        source: the ``datasets.Dataset`` (input and label columns only, images not decoded).
        rows: (N,) int64 row indices into ``source``.
        labels: (N,) int64 class indices, aligned with ``rows``.
        columns: the :class:`Columns` read.
        transform: ``(input columns of the batch, rows, split name, epoch seed) -> list of N inputs``.
        split: ``"train"`` / ``"val"`` / ``"test"`` (named in errors).
        num_workers: worker processes the recipes' loaders use on this split.
        epoch_seed: the seed of this epoch's augmentation; ``None`` (evaluation, probing) = no augmentation.
    """

    def __init__(self, source: Any, rows: Tensor, labels: Tensor, columns: Columns, transform: Callable,
                 split: str, num_workers: int = 0, epoch_seed: int | None = None) -> None:
        if rows.shape != labels.shape:
            raise ValueError(f"{rows.numel()} rows but {labels.numel()} labels")
        self.source = source
        self.rows = rows.to(torch.int64)
        self.labels = labels.to(torch.int64)
        self.columns = columns
        self.transform = transform
        self.split = split
        self.num_workers = num_workers
        self.epoch_seed = epoch_seed

    def __len__(self) -> int:
        return self.rows.numel()

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[Any, Tensor]]:
        positions = [int(p) for p in positions]
        rows = self.rows[positions].tolist()
        batch = self.source[rows]
        inputs = self.transform([batch[c] for c in self.columns.inputs], rows, self.split, self.epoch_seed)
        return list(zip(inputs, self.labels[positions], strict=True))

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a split of {len(self)} examples")
        return self.__getitems__([index % len(self)])[0]

    def with_transform(self, transform: Callable) -> LazySplit:
        """The same rows with another transform (the source is shared, nothing is copied)."""
        return LazySplit(self.source, self.rows, self.labels, self.columns, transform, self.split, self.num_workers,
                         self.epoch_seed)

    def for_loader(self, epoch_seed: int | None) -> LazySplit:
        """The split as one loader sees it: augmentation seeded by ``epoch_seed`` (None = off)."""
        out = self.with_transform(self.transform)
        out.epoch_seed = epoch_seed
        return out


# ------------------------------------------------------------------------------------------ bad examples
class _ImageCheck(Dataset):
    """Decodes the images of ``source`` rows and reports the unreadable ones (used with a DataLoader)."""

    def __init__(self, source: Any, column: str, split: str, rows: list[int]) -> None:
        self.source, self.column, self.split, self.rows = source, column, split, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[int, str | None]]:
        rows = [self.rows[int(p)] for p in positions]
        out = []
        for value, row in zip(self.source[rows][self.column], rows, strict=True):
            try:
                decode_image(value, _where(value, self.split, row))
                out.append((row, None))
            except BadExampleError as e:
                out.append((row, str(e)))
        return out

    def __getitem__(self, index: int) -> tuple[int, str | None]:
        return self.__getitems__([index])[0]


def missing_values(source: Any, columns: Columns, split: str) -> dict[int, str]:
    """Rows of ``source`` with no text or no label (a column scan: nothing is decoded).

    Returns:
        ``{row: one-line reason}``, rows in increasing order.
    """
    bad: dict[int, str] = {}
    checked = [columns.label] if columns.modality == "image" else [*columns.inputs, columns.label]
    for name in checked:
        values = source.data.column(name)
        if values.null_count:
            for row in np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False)).tolist():
                bad.setdefault(row, f"{split} example {row} has no value in column {name!r}")
    return dict(sorted(bad.items()))


def unreadable_images(source: Any, column: str, split: str, rows: Sequence[int], num_workers: int = 0,
                      batch_size: int = 256) -> dict[int, str]:
    """Rows (of ``rows``) whose image does not open and decode, with ``num_workers`` processes.

    Returns:
        ``{row: one-line reason naming the file (or split and row)}``, rows in increasing order.
    """
    bad: dict[int, str] = {}
    if len(rows):
        check = _ImageCheck(source, column, split, [int(r) for r in rows])
        for chunk in DataLoader(check, batch_size=batch_size, num_workers=num_workers, collate_fn=list):
            bad.update({row: reason for row, reason in chunk if reason is not None})
    return dict(sorted(bad.items()))


def bad_example_error(name: str, found: dict[int, str]) -> BadExampleError:
    """The one-line error for the first of ``found``."""
    row, reason = next(iter(found.items()))
    more = f" ({len(found) - 1} more bad examples)" if len(found) > 1 else ""
    return BadExampleError(f"task {name!r}: {reason}{more}; fix or remove it, or set data.skip_bad_examples=true "
                           "to leave bad examples out")


# ----------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedSource:
    """What :func:`load_source` read: per split the ``datasets.Dataset``, its labels and class names.

    Attributes:
        splits: ``{"train" | "val" | "test": datasets.Dataset}`` (only the columns read; images undecoded).
        labels: ``{split: (N,) int64}`` class indices.
        columns: the columns read.
        class_names: one name per class.
        bad: ``{split: {row: reason}}`` of the examples without text or label left out (``skip_bad_examples``).
        rows: ``{split: (N,) int64}`` the usable rows of each split (all but the bad ones), aligned with
            ``labels``.
        dropped: given splits without labels (e.g. a hub test split labelled -1) that were not used.
    """

    splits: dict[str, Any]
    labels: dict[str, Tensor]
    columns: Columns
    class_names: list[str]
    rows: dict[str, Tensor]
    bad: dict[str, dict[int, str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def _labels(ds: Any, column: str) -> list[Any]:
    return ds.data.column(column).to_pylist()


def load_source(name: str, loader_args: tuple, options: SourceOptions) -> LoadedSource:
    """``datasets.load_dataset`` + column detection + labels + the missing-value check (images are checked
    later, on the rows the splits use: :func:`unreadable_images`).

    Raises:
        DatasetUnavailableError: the source cannot be loaded (offline, missing files); the message says why.
        DatasetColumnError: see :func:`detect_columns`; labels that are not class labels.
        BadExampleError: an unreadable example (unless ``options.skip_bad_examples``).
        ValueError: an empty dataset, or splits of which none is ``train``.
    """
    import datasets

    from .data import DatasetUnavailableError

    kwargs: dict[str, Any] = {"cache_dir": options.cache_dir}
    if options.data_files is not None:
        kwargs["data_files"] = options.data_files
    if options.data_dir is not None:
        kwargs["data_dir"] = str(options.data_dir)
    try:
        loaded = datasets.load_dataset(*loader_args, **kwargs)
    except datasets.data_files.EmptyDatasetError as e:
        raise ValueError(f"task {name!r}: the dataset is empty ({e})") from e
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetsError, ValueError) as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
        msg = " ".join(str(e).split())
        raise DatasetUnavailableError(
            f"task {name!r} could not be loaded: {msg}."
            + (" HF_DATASETS_OFFLINE is set, so only datasets already in the local cache load." if offline else "")
        ) from e
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    chosen = {k: next((s for s in names if s in loaded), None) for k, names in _SPLIT_ALIASES.items()}
    if chosen["train"] is None:
        if len(loaded) != 1:
            raise ValueError(f"task {name!r} has splits {list(loaded)} and none is called 'train'")
        chosen["train"] = next(iter(loaded))
    parts = {k: loaded[s] for k, s in chosen.items() if s is not None}
    if all(len(ds) == 0 for ds in parts.values()):
        raise ValueError(f"task {name!r}: the dataset is empty")
    columns = detect_columns(parts["train"].features, options, f"task {name!r}")
    for split, ds in parts.items():
        missing = [c for c in (*columns.inputs, columns.label) if c not in ds.features]
        if missing:
            raise DatasetColumnError(f"task {name!r}: the {split} split has no column {missing[0]!r} (columns: "
                                     f"{', '.join(ds.features)})")
    keep = [*columns.inputs, columns.label]
    for split in parts:
        ds = parts[split].select_columns(keep)
        if getattr(ds, "_indices", None) is not None:  # rows are read from the Arrow table by position
            ds = ds.flatten_indices()
        if columns.modality == "image" and isinstance(ds.features[columns.inputs[0]], datasets.Image):
            ds = ds.cast_column(columns.inputs[0], datasets.Image(decode=False))
        parts[split] = ds

    label_feature = parts["train"].features[columns.label]
    raw = {k: _labels(ds, columns.label) for k, ds in parts.items()}
    dropped = [k for k in ("val", "test") if k in raw and raw[k] and all(v is None or (isinstance(v, int) and v < 0)
                                                                         for v in raw[k])]
    for k in dropped:  # e.g. GLUE's test splits: every label is -1; carve one from train instead
        del parts[k], raw[k]
    bad: dict[str, dict[int, str]] = {}  # missing texts / labels; images are checked on the rows used
    for split, ds in parts.items():
        found = missing_values(ds, columns, split)
        if found and not options.skip_bad_examples:
            raise bad_example_error(name, found)
        bad[split] = found

    if isinstance(label_feature, datasets.ClassLabel):
        class_names = list(label_feature.names)
        labels = {k: [v for i, v in enumerate(vals) if i not in bad[k]] for k, vals in raw.items()}
    else:
        values = {v for k, vals in raw.items() for i, v in enumerate(vals) if i not in bad[k]}
        if values and all(isinstance(v, str) for v in values):
            class_names = sorted(values)
        elif values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            class_names = [str(i) for i in range(max(values) + 1)]
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise DatasetColumnError(
                f"task {name!r}: label column {columns.label!r} holds {', '.join(kinds)} values; class labels must "
                "be integers or strings (set data.label_column to the class column)"
            )
        index = {c: i for i, c in enumerate(class_names)}
        labels = {k: [index[v] if isinstance(v, str) else v for i, v in enumerate(vals) if i not in bad[k]]
                  for k, vals in raw.items()}
    for split, vals in labels.items():
        if vals and min(vals) < 0:
            raise DatasetColumnError(f"task {name!r}: the {split} split has negative labels (unlabelled examples?); "
                                     "they are not supported")
    keep_rows = {k: torch.tensor([i for i in range(len(ds)) if i not in bad[k]], dtype=torch.int64)
                 for k, ds in parts.items()}
    return LoadedSource(
        splits=parts, labels={k: torch.tensor(v, dtype=torch.int64).reshape(-1) for k, v in labels.items()},
        columns=columns, class_names=class_names, rows=keep_rows, bad={k: v for k, v in bad.items() if v},
        dropped=dropped,
    )


def image_shape(source: Any, column: str, rows: Tensor, image_size: int | None, split: str,
                sample: int = 16) -> tuple[int, int]:
    """(channels, side) of the images of a split, from its first ``sample`` rows.

    Channels: 1 when every sampled image is gray, else 3. Side: ``image_size``, else the first image's side
    (square images only; others need ``image_size``).
    """
    first = rows[:sample].tolist()
    values = source[first][column] if first else []
    images = [decode_image(v, _where(v, split, r)) for v, r in zip(values, first, strict=True)]
    channels = 1 if images and all(img.mode in _GRAY_MODES for img in images) else 3
    if image_size is not None:
        return channels, image_size
    sizes = {img.size for img in images}
    if not images or len(sizes) > 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise ValueError(f"the images are not all square and of one size ({sorted(sizes)[:3]}...): set data.image_size "
                         "to resize them")
    return channels, images[0].size[0]


def replace_transform(task: Any, transforms: dict[str, Callable]) -> Any:
    """A copy of ``task`` whose lazy splits use ``transforms[split]``."""
    return replace(task, **{k: getattr(task, k).with_transform(t) for k, t in transforms.items()})
