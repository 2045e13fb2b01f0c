"""Bring a task's inputs to what a pretrained backbone expects.

Images: :func:`~topotransfer.data.load_task` gives float images in [0, 1] of shape (N, C, H, W). A ViT
needs exactly ``config.image_size`` (its position embeddings are fixed), ``config.num_channels`` channels
and the normalisation of its image processor: ``pixel_values = (x - mean) / std``.

Text: sentences are encoded once with the backbone's tokenizer (:func:`prepare_text_task`); an item is
``(TextInputs, label)`` where :class:`TextInputs` is a dict of ``input_ids`` / ``attention_mask`` (/
``token_type_ids``) rows. The default ``DataLoader`` collation stacks them into a :class:`TextInputs` of
(B, L) tensors, which the model is called on as ``model(**inputs)``; the attention mask is what keeps
padding tokens out of the topological-derivative statistics.

``hf:`` tasks (:mod:`topotransfer.hf_data`) are not converted here: their lazy splits get a new per-batch
transform that does the same (images: decode, [augment], resize, normalise; text: tokenise the batch, padded
to its longest sentence), applied when a ``DataLoader`` asks for a batch.

:func:`load_for_backbone` is the whole path from a ``data`` config to the task a backbone takes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .data import NON_IMAGE_TASKS, Task, load_task, source_options
from .errors import EmptyDatasetError, ImageSizeError, ModalityMismatchError
from .hf_data import AUGMENTATIONS, ImageTransform, LazySplit, TextTransform, augment_image, example_generator
from .models.hf import MODALITIES, ImageNormalization, backbone_modality, load_image_normalization, load_tokenizer
from .text_data import TEXT_TASKS

__all__ = [
    "AugmentedImages",
    "TextInputs",
    "TokenizedDataset",
    "backbone_image_size",
    "load_for_backbone",
    "prepare_images",
    "prepare_task",
    "prepare_text_task",
    "text_max_length",
]


def backbone_image_size(config: object) -> int:
    """The square input side of a vision backbone config (``image_size`` int or (H, W) with H == W).

    Raises:
        ImageSizeError: the config has no ``image_size`` or a non-square one.
    """
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ImageSizeError(f"backbone image_size {size} is not square; only square inputs are supported")
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise ImageSizeError(f"the backbone config has no usable image_size (got {size!r}): is it a vision model?")
    return size


def prepare_images(
    images: torch.Tensor, image_size: int, num_channels: int, normalization: ImageNormalization
) -> torch.Tensor:
    """Resize, convert channels and normalise a batch of images.

    Args:
        images: (N, C, H, W) float in [0, 1].
        image_size: S, the backbone's input side.
        num_channels: the backbone's channel count C'. Gray (C = 1) is repeated to C' channels; RGB
            (C = 3) is averaged to gray when C' = 1.
        normalization: per-channel mean / std with C' values.

    Returns:
        (N, C', S, S) float32 ``pixel_values``.

    Raises:
        ImageSizeError: inputs that are not (N, C, H, W) images, or channels that cannot be converted.
    """
    if images.dim() != 4:
        raise ImageSizeError(
            f"inputs of shape {tuple(images.shape)} are not images (N, C, H, W): the adapt recipe needs an image task"
        )
    c = images.shape[1]
    if c != num_channels:
        if c == 1:
            images = images.expand(-1, num_channels, -1, -1)
        elif c == 3 and num_channels == 1:
            images = images.mean(dim=1, keepdim=True)
        else:
            raise ImageSizeError(f"cannot convert {c}-channel images to the backbone's {num_channels} channels")
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(images.float(), size=(image_size, image_size), mode="bilinear", align_corners=False,
                               antialias=True)
    mean = torch.tensor(normalization.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(normalization.std, dtype=torch.float32).reshape(1, -1, 1, 1)
    return ((images.float() - mean) / std).contiguous()


class AugmentedImages(Dataset):
    """An in-memory image split with a seeded training augmentation (:func:`~topotransfer.hf_data.augment_image`).

    Item ``i`` is ``(augment(x_i), y_i)`` with the draw of (the loader's epoch seed, i); a loader that passes
    no seed (evaluation, probing: :meth:`for_loader` with ``None``) sees the images unchanged.

    Args:
        images: a ``TensorDataset`` of (N, C, S, S) inputs and (N,) labels.
        augment: one of :data:`~topotransfer.hf_data.AUGMENTATIONS`.
    """

    def __init__(self, images: TensorDataset, augment: str, epoch_seed: int | None = None) -> None:
        self.images, self.augment, self.epoch_seed = images, augment, epoch_seed
        self.tensors = images.tensors
        self.num_workers = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.images[index]
        if self.epoch_seed is not None:
            x = augment_image(x, self.augment, example_generator(self.epoch_seed, int(index)))
        return x, y

    def for_loader(self, epoch_seed: int | None) -> AugmentedImages:
        """The split as one loader sees it: augmentation seeded by ``epoch_seed`` (None = off)."""
        return AugmentedImages(self.images, self.augment, epoch_seed)


def prepare_task(
    task: Task, image_size: int, num_channels: int, normalization: ImageNormalization, augment: str = "none"
) -> Task:
    """A copy of ``task`` whose train / val / test inputs are the backbone's ``pixel_values``.

    In-memory tasks are converted at once (:func:`prepare_images`); lazy ``hf:`` splits get a per-batch
    :class:`~topotransfer.hf_data.ImageTransform` doing the same.

    Args:
        augment: training-split augmentation, ``none | flip | crop_flip`` (seeded per epoch and example).

    Raises:
        ImageSizeError: the task is not an image classification task, or its images cannot be converted.
        EmptyDatasetError: the training or validation split is empty (training and the eps line search
            need both).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"data.augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if task.kind != "classification" or len(task.input_shape) != 3:
        raise ImageSizeError(
            f"task {task.name!r} ({task.kind}, inputs of shape {task.input_shape}) is not an image classification "
            "task: the adapt recipe needs (C, H, W) images with class labels"
        )
    for split in ("train", "val"):
        if len(getattr(task, split)) == 0:
            raise EmptyDatasetError(
                f"task {task.name!r} has an empty {split} split: adaptation needs training examples and validation "
                "examples (the eps line search and the reported validation error use them)"
            )
    shape = (num_channels, image_size, image_size)
    if isinstance(task.train, LazySplit):
        splits = {
            split: getattr(task, split).with_transform(ImageTransform(
                image_size, num_channels, normalization.mean, normalization.std, augment if split == "train" else "none"
            ))
            for split in ("train", "val", "test")
        }
        return replace(task, input_shape=shape, **splits)
    splits = {}
    for split in ("train", "val", "test"):
        x, y = getattr(task, split).tensors
        splits[split] = TensorDataset(prepare_images(x, image_size, num_channels, normalization), y) if len(y) else (
            TensorDataset(torch.empty(0, num_channels, image_size, image_size), y)
        )
    if augment != "none":
        splits["train"] = AugmentedImages(splits["train"], augment)
    return replace(task, input_shape=shape, **splits)


# ------------------------------------------------------------------------------------------------------ text
class TextInputs(dict):
    """A dict of token tensors (``input_ids``, ``attention_mask``, ...) that moves like a tensor.

    The training and evaluation loops call ``inputs.to(device)`` and then ``model(**inputs)``; a plain dict
    has no ``.to``. ``DataLoader`` collation and accelerate's ``send_to_device`` keep the subclass.
    """

    def to(self, *args: Any, **kwargs: Any) -> TextInputs:
        """Every tensor moved / cast with ``Tensor.to(*args, **kwargs)``."""
        return TextInputs({k: v.to(*args, **kwargs) for k, v in self.items()})


class TokenizedDataset(Dataset):
    """Encoded sentences; item ``i`` is ``(TextInputs of (L,) rows, label)``.

    Args:
        encoding: ``{"input_ids": (N, L), "attention_mask": (N, L), ...}`` int64 tensors, padded to one L.
        labels: (N,) int64 class indices.
    """

    def __init__(self, encoding: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        if "input_ids" not in encoding or "attention_mask" not in encoding:
            raise ValueError(f"an encoding needs input_ids and attention_mask, got keys {sorted(encoding)}")
        if any(v.shape[0] != len(labels) for v in encoding.values()):
            raise ValueError(f"encoding rows {[tuple(v.shape) for v in encoding.values()]} != {len(labels)} labels")
        self.encoding = {k: v.contiguous() for k, v in encoding.items()}
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[TextInputs, torch.Tensor]:
        return TextInputs({k: v[index] for k, v in self.encoding.items()}), self.labels[index]


def text_max_length(tokenizer: Any, config: object, requested: int | None = None) -> int:
    """The longest token sequence to keep: ``requested``, capped by the position embeddings and the tokenizer.

    Raises:
        ValueError: ``requested`` is < 2 (a sequence needs at least [CLS] and [SEP]).
    """
    if requested is not None and requested < 2:
        raise ValueError(f"data.max_length must be >= 2 (room for the special tokens), got {requested}")
    limits = [int(getattr(config, "max_position_embeddings", 512))]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:  # "no limit" is stored as a huge int
        limits.append(model_max)
    if requested is not None:
        limits.append(requested)
    return min(limits)


def prepare_text_task(task: Task, tokenizer: Any, max_length: int) -> Task:
    """A copy of a text ``task`` whose splits are :class:`TokenizedDataset` encodings.

    Each split is padded to its longest sentence (at most ``max_length`` tokens, longer ones truncated):
    the sentences are short, and every padding token is excluded by the attention mask wherever it matters.

    Args:
        task: a task with ``modality == "text"`` (:class:`~topotransfer.text_data.TextDataset` splits).
        tokenizer: the backbone's tokenizer (transformers ``PreTrainedTokenizerBase``).
        max_length: the most tokens per sentence, special tokens included.

    Returns:
        The task with ``input_shape=(L_train,)`` and encoded splits; a lazy ``hf:`` task keeps its splits, each
        batch tokenised when loaded (``input_shape=()``: the length varies by batch).

    Raises:
        ModalityMismatchError: the task is not a text classification task.
        EmptyDatasetError: the training or validation split is empty.
    """
    if task.modality != "text" or task.kind != "classification":
        raise ModalityMismatchError(
            f"task {task.name!r} ({task.kind}, inputs of shape {task.input_shape}) is not a text classification "
            "task: a text backbone needs sentences with class labels (e.g. data.name=sentiment)"
        )
    for split in ("train", "val"):
        if len(getattr(task, split)) == 0:
            raise EmptyDatasetError(
                f"task {task.name!r} has an empty {split} split: adaptation needs training examples and validation "
                "examples (the eps line search and the reported validation error use them)"
            )
    if isinstance(task.train, LazySplit):  # tokenised per batch, padded to the batch's longest example
        transform = TextTransform(tokenizer, max_length)
        return replace(task, input_shape=(), **{s: getattr(task, s).with_transform(transform) for s in ("train", "val", "test")})
    splits = {}
    for split in ("train", "val", "test"):
        data = getattr(task, split)
        if len(data) == 0:
            empty = torch.zeros(0, 2, dtype=torch.long)
            splits[split] = TokenizedDataset({"input_ids": empty, "attention_mask": empty}, data.labels)
            continue
        enc = tokenizer(list(data.texts), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        encoding = {k: v.to(torch.long) for k, v in enc.items() if isinstance(v, torch.Tensor)}
        splits[split] = TokenizedDataset(encoding, data.labels)
    width = splits["train"].encoding["input_ids"].shape[1]
    return replace(task, input_shape=(width,), **splits)


# ------------------------------------------------------------------------------------------- data for a backbone
def load_for_backbone(data_cfg: Any, seed: int, name_or_path: str, revision: str | None,
                      backbone_config: object) -> tuple[Task, dict, Any]:
    """The task of ``data_cfg`` prepared for a backbone: sentences tokenised, or images resized and normalised.

    Args:
        data_cfg: a :class:`~topotransfer.config.DataConfig`.
        seed: the run seed (splits, subsets).
        name_or_path: the backbone (its tokenizer / image processor are read from there).
        revision: hub revision.
        backbone_config: the backbone's transformers config.

    Returns:
        ``(task, preprocessing record for results.json, the tokenizer or None)``.

    Raises:
        UnsupportedModelError: a backbone of no known family (checked before any data is read).
        ModalityMismatchError: a text task for an image backbone, or an image task for a text backbone.
        ImageSizeError: ``data.image_size`` differs from the backbone's, or a task without images.
    """
    d = data_cfg
    modality = backbone_modality(backbone_config)
    builtin = d.name.strip().lower().replace("-", "_")
    model_type = backbone_config.model_type
    user_data = d.name.strip().startswith(("hf:", "imagefolder:"))
    options = source_options(d)
    sizes = {"seed": seed, "num_train": d.num_train, "num_val": d.num_val, "num_test": d.num_test}
    if modality == "text":
        if builtin not in TEXT_TASKS and not user_data:  # refuse before loading a built-in image dataset
            raise ModalityMismatchError(
                f"task {d.name!r} is not a text task but the backbone ({model_type}) is a text encoder: use a text "
                f"task ({', '.join(TEXT_TASKS)}, or an hf: dataset with a text column)"
            )
        if d.image_size is not None:
            raise ModalityMismatchError(f"data.image_size does not apply to the text backbone ({model_type})")
        if d.augment != "none":
            raise ModalityMismatchError(f"data.augment applies to images, not to the text backbone ({model_type})")
        tokenizer = load_tokenizer(name_or_path, revision, backbone_config)
        max_length = text_max_length(tokenizer, backbone_config, d.max_length)
        task = load_task(d.name, **sizes, **(options if user_data else {}))
        if task.modality != "text":
            raise ModalityMismatchError(
                f"task {d.name!r} holds images but the backbone ({model_type}) is a text encoder: set "
                "data.text_column to a text column, or adapt an image backbone"
            )
        task = prepare_text_task(task, tokenizer, max_length)
        lazy = isinstance(task.train, LazySplit)
        record = {"normalization": None, "tokenizer": {
            "class": type(tokenizer).__name__, "max_length": max_length,
            "padded_length": "per batch" if lazy else {
                s: int(getattr(task, s).encoding["input_ids"].shape[1]) for s in ("train", "val", "test")},
        }}
        if task.source is not None:
            record["data_source"] = task.source
        return task, record, tokenizer
    if builtin in TEXT_TASKS:
        raise ModalityMismatchError(
            f"task {d.name!r} is a text task but the backbone ({model_type}) takes images: adapt a text encoder "
            f"({', '.join(t for t, m in MODALITIES.items() if m == 'text')}) to it"
        )
    if d.max_length is not None:
        raise ModalityMismatchError(f"data.max_length applies to text backbones only, not to {model_type}")
    size = backbone_image_size(backbone_config)
    channels = int(getattr(backbone_config, "num_channels", 3))
    if d.image_size is not None and d.image_size != size:
        raise ImageSizeError(
            f"data.image_size={d.image_size} but the backbone takes {size}x{size} images (its position embeddings "
            "are fixed): leave data.image_size unset and the images are resized to the backbone's size"
        )
    if builtin in NON_IMAGE_TASKS:  # load_task would refuse image_size with a less useful message
        raise ImageSizeError(
            f"task {d.name!r} is not an image classification task: the adapt recipe needs (C, H, W) images with "
            "class labels"
        )
    task = load_task(d.name, **sizes, image_size=size, **(options if user_data else {}))
    if task.modality == "text":
        raise ModalityMismatchError(
            f"task {d.name!r} holds text but the backbone ({model_type}) takes images: set data.image_column to an "
            "image column, or adapt a text encoder"
        )
    norm = load_image_normalization(name_or_path, revision, channels)
    record: dict[str, Any] = {"normalization": {"mean": list(norm.mean), "std": list(norm.std), "source": norm.source}}
    if d.augment != "none":
        record["augment"] = d.augment
    if task.source is not None:
        record["data_source"] = task.source
    return prepare_task(task, size, channels, norm, d.augment), record, None
