"""Bring a task's inputs to what a pretrained backbone expects.

Images: :func:`~topotransfer.data.load_task` gives float images in [0, 1] of shape (N, C, H, W). A ViT
needs exactly ``config.image_size`` (its position embeddings are fixed), ``config.num_channels`` channels
and the normalisation of its image processor: ``pixel_values = (x - mean) / std``.

Text: sentences are encoded once with the backbone's tokenizer (:func:`prepare_text_task`); an item is
``(TextInputs, label)`` where :class:`TextInputs` is a dict of ``input_ids`` / ``attention_mask`` (/
``token_type_ids``) rows. The default ``DataLoader`` collation stacks them into a :class:`TextInputs` of
(B, L) tensors, which the model is called on as ``model(**inputs)``; the attention mask is what keeps
padding tokens out of the topological-derivative statistics.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .data import Task
from .errors import EmptyDatasetError, ImageSizeError, ModalityMismatchError
from .models.hf import ImageNormalization

__all__ = [
    "TextInputs",
    "TokenizedDataset",
    "backbone_image_size",
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


def prepare_task(task: Task, image_size: int, num_channels: int, normalization: ImageNormalization) -> Task:
    """A copy of ``task`` whose train / val / test inputs are the backbone's ``pixel_values``.

    Raises:
        ImageSizeError: the task is not an image classification task, or its images cannot be converted.
        EmptyDatasetError: the training or validation split is empty (training and the eps line search
            need both).
    """
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
    splits = {}
    for split in ("train", "val", "test"):
        x, y = getattr(task, split).tensors
        splits[split] = TensorDataset(prepare_images(x, image_size, num_channels, normalization), y) if len(y) else (
            TensorDataset(torch.empty(0, num_channels, image_size, image_size), y)
        )
    return replace(task, input_shape=(num_channels, image_size, image_size), **splits)


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
        The task with ``input_shape=(L_train,)`` and encoded splits.

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
