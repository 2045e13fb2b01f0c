"""Bring a task's images to what a pretrained backbone expects: size, channels, normalisation.

:func:`~topotransfer.data.load_task` gives float images in [0, 1] of shape (N, C, H, W). A ViT needs
exactly ``config.image_size`` (its position embeddings are fixed), ``config.num_channels`` channels and
the normalisation of its image processor: ``pixel_values = (x - mean) / std``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .data import Task
from .errors import EmptyDatasetError, ImageSizeError
from .models.hf import ImageNormalization

__all__ = ["backbone_image_size", "prepare_images", "prepare_task"]


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
