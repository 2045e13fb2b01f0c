"""Sites inside pre-norm transformer blocks: the residual stream between the attention and the MLP branch.

A pre-norm block computes ``m = h + A(norm1(h))`` and ``out = m + F(norm2(m))`` (GPT-2, the Llama layout,
DINOv2 with its layer scales inside A and F). The point inside is m, named by the module whose input it is
(``<block>.<mid_norm>``). m has two consumers -- ``norm2`` and the MLP's residual -- so an inserted layer
must replace m for both; no single sub-module sees both. The block's class is therefore swapped for a
same-named subclass whose forward is the block's computation with ``m = topo_mid(m)`` in between
(``mid_forward``, written per family against the transformers 5.x forward). Before the swap is kept it is
checked on a random input that the swapped forward, with a zero layer, reproduces the original forward bit
for bit, so a transformers version whose block computes something else is refused instead of silently
changed. The point after the MLP add is the block boundary, a ``"blocks"`` site already.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..layers import TopoLayer
from .base import Site, first_tensor

__all__ = ["MidBlockSites", "swap_in_mid_layer", "swap_out_mid_layer"]

_MID_CLASSES: dict[tuple[type, Callable], type] = {}


def _mid_class(cls: type, forward: Callable) -> type:
    """A subclass of the block class ``cls`` (same name) whose forward is ``forward`` (applies ``topo_mid``
    mid-block); one per (class, forward), so swapped blocks of one class share their class."""
    if (cls, forward) not in _MID_CLASSES:
        _MID_CLASSES[cls, forward] = type(cls.__name__, (cls,), {"forward": forward, "_topo_base": cls,
                                                                 "__module__": cls.__module__})
    return _MID_CLASSES[cls, forward]


@torch.no_grad()
def swap_in_mid_layer(
    block: nn.Module, layer: nn.Module, forward: Callable, d: int,
    check_call: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda b, x: first_tensor(b(x)),
) -> None:
    """Swap ``block`` to its mid-block class (``forward`` applies ``self.topo_mid`` to m) with ``layer`` as
    ``topo_mid``, after checking on a random (2, 3, d) input that the swapped forward with a zero layer
    reproduces the original forward bit for bit; otherwise the block is left as it was and refused."""
    ref = next(block.parameters())
    x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(ref)
    was_training = block.training
    original = type(block)
    block.eval()
    try:
        expected = check_call(block, x)
        block.topo_mid = TopoLayer(d, norm="layernorm").to(ref)  # zero: the identity
        block.__class__ = _mid_class(original, forward)
        same = torch.equal(check_call(block, x), expected)
    except Exception:
        block.__class__ = original
        block._modules.pop("topo_mid", None)
        raise
    finally:
        block.train(was_training)
    if not same:
        block.__class__ = original
        del block.topo_mid
        raise UnsupportedModelError(
            f"{original.__name__}.forward is not the pre-norm computation the sub-block site assumes "
            "(transformers 5.x layout): cannot insert inside this block"
        )
    block.topo_mid = layer


def swap_out_mid_layer(block: nn.Module, site_name: str) -> nn.Module:
    """Undo :func:`swap_in_mid_layer`: the block's own class back; returns the layer it held."""
    base = getattr(type(block), "_topo_base", None)
    if base is None:
        raise ValueError(f"No inserted TopoLayer at site {site_name!r}")
    layer = block.topo_mid
    del block.topo_mid
    block.__class__ = base
    return layer


class MidBlockSites:
    """Mixin for a :class:`~topotransfer.surgery.base.ChainFamily`: one sub-block site per original block.

    Families set :attr:`mid_norm` (the attribute of the norm fed by m) and :attr:`mid_forward` (the block's
    forward with ``self.topo_mid`` applied to m), and may override :meth:`check_call`.
    """

    mid_norm: str = ""
    mid_forward: Callable | None = None

    def sub_sites(self, model: nn.Module) -> list[Site]:
        if not self.mid_norm:
            return []
        _, container = self.chain(model)
        return [
            Site(f"{container}.{p}.{self.mid_norm}", p + 0.5, container, p, kind="input")
            for p, block in enumerate(model.get_submodule(container))
            if self._is_block(block) and isinstance(getattr(block, self.mid_norm, None), nn.Module)
        ]

    def _block_of(self, model: nn.Module, site: Site) -> nn.Module:
        if not self.mid_norm or site.name != f"{site.container}.{site.position}.{self.mid_norm}":
            raise ValueError(f"{site.name!r} is not a sub-block site of {self.name}")
        return model.get_submodule(site.container)[site.position]

    @torch.no_grad()
    def check_call(self, block: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """The block on a (2, 3, d) input, for the swap check (families add what their blocks need)."""
        return first_tensor(block(x, **kwargs))

    def insert_inside(self, model: nn.Module, site: Site, layer: nn.Module) -> None:
        block = self._block_of(model, site)
        if hasattr(type(block), "_topo_base"):
            raise ValueError(f"site {site.name!r} already holds an inserted layer")
        swap_in_mid_layer(block, layer, type(self).mid_forward, int(model.config.hidden_size), self.check_call)

    def remove_inside(self, model: nn.Module, site: Site) -> nn.Module:
        return swap_out_mid_layer(self._block_of(model, site), site.name)

    def inside_layers(self, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
        _, container = self.chain(model)
        return [
            (f"{container}.{p}.{self.mid_norm}", f"{container}.{p}.topo_mid", block.topo_mid)
            for p, block in enumerate(model.get_submodule(container))
            if hasattr(type(block), "_topo_base")
        ]
