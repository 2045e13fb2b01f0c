"""Model-family registry: which adapter knows how to find sites in and insert layers into a model."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..layers import build_topo_layer
from .base import ChainFamily, DownstreamUnsupportedError, Site, first_tensor
from .decoder import COPIED_BLOCK_TYPE, CopiedBlock, DecoderFamily, GPT2Family, LlamaFamily
from .encoders import Dinov2Family, DistilBertFamily
from .hf import BertFamily, HFEncoderFamily, TopoBlock, ViTFamily
from .residual import ResidualCNNFamily, ResidualMLPFamily

__all__ = [
    "FAMILIES",
    "BertFamily",
    "ChainFamily",
    "CopiedBlock",
    "DecoderFamily",
    "Dinov2Family",
    "DistilBertFamily",
    "GPT2Family",
    "LlamaFamily",
    "DownstreamUnsupportedError",
    "HFEncoderFamily",
    "Site",
    "TopoBlock",
    "ViTFamily",
    "build_inserted",
    "first_tensor",
    "get_family",
]

#: Registered families in lookup order (name -> adapter).
FAMILIES: dict[str, ChainFamily] = {
    f.name: f
    for f in (
        ResidualMLPFamily(), ResidualCNNFamily(), ViTFamily(), BertFamily(), DistilBertFamily(), Dinov2Family(),
        GPT2Family(), LlamaFamily(),
    )
}


def get_family(model: nn.Module) -> ChainFamily:
    """The adapter of ``model``'s family.

    Raises:
        UnsupportedModelError: no registered family matches; the message lists the supported ones.
    """
    for family in FAMILIES.values():
        if family.matches(model):
            return family
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    detail = f" (config.model_type={model_type!r})" if model_type else ""
    supported = "; ".join(
        f"{name}" + (f" (model_type in {list(f.model_types)})" if isinstance(f, (HFEncoderFamily, DecoderFamily)) else "")
        for name, f in FAMILIES.items()
    )
    raise UnsupportedModelError(
        f"{type(model).__name__}{detail} is not a supported model. Supported families: {supported}."
    )


def build_inserted(model: nn.Module, site: str | Site, config: dict) -> nn.Module:
    """A zero module for an insertion record's ``layer`` entry, ready for ``family.insert(model, site, ...)``.

    TopoLayer / TopoConv2d configs build a zero layer; a copied-block record copies the block its family
    names for ``site`` (:meth:`~.decoder.DecoderFamily.copy_block`), output projections zeroed. Either way
    the caller loads the saved weights afterwards.
    """
    if config.get("type") == COPIED_BLOCK_TYPE:
        family = get_family(model)
        if not isinstance(family, DecoderFamily):
            raise UnsupportedModelError(f"copied blocks are not supported for the {family.name!r} family")
        return family.copy_block(model, site)
    return build_topo_layer(config)
