"""Pretrained Hugging Face backbones for adaptation: the model with a head for the target labels, and
the input normalisation its image processor expects.

Heavy imports (transformers, huggingface_hub) happen inside the functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

__all__ = ["DEFAULT_IMAGE_MEAN", "DEFAULT_IMAGE_STD", "ImageNormalization", "load_backbone", "load_image_normalization"]

#: ``ViTImageProcessor`` defaults (IMAGENET_STANDARD_MEAN / STD), used when no processor config was saved.
DEFAULT_IMAGE_MEAN: tuple[float, ...] = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD: tuple[float, ...] = (0.5, 0.5, 0.5)
PROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class ImageNormalization:
    """``pixel_values = (x - mean) / std`` per channel, for x in [0, 1].

    Attributes:
        mean: (C,) channel means.
        std: (C,) channel standard deviations.
        source: where the values came from (a processor config path, or ``"defaults"``).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = "defaults"


def load_backbone(
    name_or_path: str,
    revision: str | None = None,
    *,
    id2label: dict[int, str] | None = None,
    architecture: str | None = None,
) -> nn.Module:
    """Load a pretrained transformers model, with a fresh head when the label set differs.

    Args:
        name_or_path: hub name or a local ``save_pretrained`` directory.
        revision: hub revision (branch, tag or commit).
        id2label: target classes ``{index: name}``; the head is re-initialised when their number differs
            from the checkpoint's (``ignore_mismatched_sizes=True``). ``None`` keeps the checkpoint's head.
        architecture: transformers class name to load with (e.g. ``"ViTForImageClassification"``);
            default ``AutoModelForImageClassification``.

    Returns:
        The model in eval mode.

    Raises:
        OSError: the model cannot be found (offline with no local copy, wrong path).
        ValueError: ``architecture`` is not a transformers class.
    """
    import transformers

    cls = transformers.AutoModelForImageClassification
    if architecture is not None:
        cls = getattr(transformers, architecture, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ValueError(f"{architecture!r} is not a transformers model class")
    kwargs: dict = {}
    if id2label is not None:
        labels = {int(k): str(v) for k, v in id2label.items()}
        kwargs = dict(id2label=labels, label2id={v: k for k, v in labels.items()}, ignore_mismatched_sizes=True)
    try:
        model = cls.from_pretrained(name_or_path, revision=revision, **kwargs)
    except OSError as e:
        raise OSError(
            f"Cannot load the backbone {name_or_path!r} (revision {revision!r}): {e}. Pass a local save_pretrained "
            "directory, or a hub name that is cached when HF_HUB_OFFLINE=1."
        ) from e
    return model.eval()


def _processor_config(name_or_path: str, revision: str | None) -> Path | None:
    local = Path(name_or_path)
    if local.is_dir():
        path = local / PROCESSOR_CONFIG
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, PROCESSOR_CONFIG, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError, OSError, ValueError):
        return None  # no processor saved (or unreachable offline): the ViT defaults apply


def load_image_normalization(name_or_path: str, revision: str | None = None, num_channels: int = 3) -> ImageNormalization:
    """The mean / std of the backbone's saved image processor, else the ViT defaults.

    Args:
        name_or_path: hub name or local directory of the backbone.
        revision: hub revision.
        num_channels: C of the backbone (scalars and 3-vectors are broadcast / averaged to C values).

    Returns:
        :class:`ImageNormalization` with C values each. ``do_normalize: false`` gives mean 0, std 1.
    """
    path = _processor_config(name_or_path, revision)
    mean, std, source = DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD, "defaults"
    if path is not None:
        cfg = json.loads(path.read_text())
        source = str(path)
        if cfg.get("do_normalize", True) is False:
            mean, std = (0.0,), (1.0,)
        else:
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    mean = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean]))
    std = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std]))

    def fit(values: tuple[float, ...]) -> tuple[float, ...]:
        if len(values) == num_channels:
            return values
        if len(values) == 1:
            return values * num_channels
        return (sum(values) / len(values),) * num_channels  # e.g. RGB statistics for a gray backbone

    return ImageNormalization(fit(mean), fit(std), source)
