"""Families for topotransfer's own reference networks (:class:`ResidualMLP`, :class:`ResidualCNN`).

Their hidden layers already are TopoLayers / TopoConv2d, so an inserted layer goes into the block
list unwrapped; every block boundary is a site because all states share one shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..layers import TopoConv2d, TopoLayer
from ..models import ResidualCNN, ResidualMLP
from .base import ChainFamily, DownstreamUnsupportedError, Site


def _own_forward(model: nn.Module, cls: type) -> None:
    if type(model).forward is not cls.forward:
        raise DownstreamUnsupportedError(
            f"{type(model).__name__} overrides {cls.__name__}.forward: its head is unknown, run the full model"
        )

__all__ = ["ResidualCNNFamily", "ResidualMLPFamily"]


class ResidualMLPFamily(ChainFamily):
    """:class:`ResidualMLP`: stem ``input_layer`` (Linear + tanh), blocks ``layers``."""

    name = "residual_mlp"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ResidualMLP)

    def chain(self, model: nn.Module) -> tuple[str, str]:
        return "input_layer", "layers"

    def new_layer(self, model: nn.Module, site: Site) -> nn.Module:
        return TopoLayer(model.width)

    def head(self, model: nn.Module, inputs: object = None) -> Callable[[torch.Tensor], torch.Tensor]:
        _own_forward(model, ResidualMLP)
        return model.output_layer


class ResidualCNNFamily(ChainFamily):
    """:class:`ResidualCNN`: stem ``stem`` (conv + tanh), blocks ``blocks`` of residual convolutions."""

    name = "residual_cnn"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ResidualCNN)

    def chain(self, model: nn.Module) -> tuple[str, str]:
        return "stem", "blocks"

    def new_layer(self, model: nn.Module, site: Site) -> nn.Module:
        return TopoConv2d(model.channels, model.kernel_size)

    def head(self, model: nn.Module, inputs: object = None) -> Callable[[torch.Tensor], torch.Tensor]:
        _own_forward(model, ResidualCNN)
        return lambda h: model.head(h.mean(dim=(2, 3)))
