"""How a model family exposes its chain of states and takes an inserted layer.

Every supported network is a chain ``stem -> blocks[0] -> ... -> blocks[T-1] -> head`` where the
blocks live in one ``nn.ModuleList``. State h_0 is the stem's output and h_t (t >= 1) the output of
``blocks[t-1]``. A *site* is the edge after h_t; it is named by the dotted path of the module that
produces h_t (peft-style module names), and inserting there puts a new block at ``blocks[t]``.

A family adapter owns the facts that differ between model families: where the stem and the block
list are, what a block returns (tensor or tuple), what layer fits (TopoLayer or TopoConv2d, with or
without LayerNorm) and which config fields must follow the depth. Everything else is generic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NoSitesFoundError, UnknownSiteError

__all__ = ["ChainFamily", "DownstreamUnsupportedError", "Site", "first_tensor"]


class DownstreamUnsupportedError(NotImplementedError):
    """The family cannot run the network from a site's state on for this model (an unknown head, an
    attention mask the blocks would need...): callers fall back to a full forward pass."""


@dataclass(frozen=True)
class Site:
    """A place after state h_t where a layer may be inserted.

    Attributes:
        name: dotted path of the module whose output is h_t (e.g. ``"layers.2"``, ``"vit.embeddings"``).
        index: t, the depth order of the site (0 = after the stem).
        container: dotted path of the block ``nn.ModuleList``.
        position: index in the container at which an inserted block goes (= t).
    """

    name: str
    index: int
    container: str
    position: int


def first_tensor(output: object) -> torch.Tensor:
    """The hidden state in a module output: the tensor itself, or element 0 of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        return first_tensor(output.to_tuple())
    raise TypeError(f"Cannot find the hidden state in a module output of type {type(output).__name__}")


class ChainFamily:
    """Base adapter for models that are a stem followed by one ``nn.ModuleList`` of blocks.

    Subclasses set :attr:`name` and implement :meth:`matches`, :meth:`chain` and :meth:`new_layer`;
    they override :meth:`wrap` / :meth:`unwrap` / :meth:`sync_config` when the block list needs a
    wrapper around a TopoLayer or the config records the depth.
    """

    name: str = "chain"

    # -- to implement -------------------------------------------------------------------------------
    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter handles ``model``."""
        raise NotImplementedError

    def chain(self, model: nn.Module) -> tuple[str, str]:
        """Dotted paths ``(stem, container)`` of the stem module and the block ``nn.ModuleList``."""
        raise NotImplementedError

    def new_layer(self, model: nn.Module, site: Site) -> nn.Module:
        """A zero-initialised TopoLayer / TopoConv2d that fits the state at ``site``."""
        raise NotImplementedError

    # -- overridable defaults -----------------------------------------------------------------------
    def wrap(self, model: nn.Module, layer: nn.Module) -> nn.Module:
        """The module to put in the block list for ``layer`` (identity by default)."""
        return layer

    def unwrap(self, block: nn.Module) -> nn.Module | None:
        """The TopoLayer inside a block the adapter inserted, or ``None`` for an original block."""
        return block if hasattr(block, "set_direction") and hasattr(block, "samples") else None

    def sync_config(self, model: nn.Module) -> None:
        """Bring config fields that record the depth up to date after an insertion or removal."""

    def capture(self, output: object) -> torch.Tensor:
        """Extract h_t from the producing module's output."""
        return first_tensor(output)

    def head(self, model: nn.Module, inputs: object = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The part of ``model`` after its last block, as a function of the last state: ``head(h_T)`` must
        equal the predictions of the full forward pass (what ``forward_fn`` / the logits are).

        Raises:
            DownstreamUnsupportedError: this model's head (or these inputs) is not known to the family.
        """
        raise DownstreamUnsupportedError(f"{type(self).__name__} does not know the head of {type(model).__name__}")

    def run_block(self, model: nn.Module, block: nn.Module, hidden: torch.Tensor, inputs: object = None) -> torch.Tensor:
        """One block of the chain applied to a state (the call the model's own forward makes)."""
        return first_tensor(block(hidden))

    def forward_from(self, model: nn.Module, site: str | Site, hidden: torch.Tensor, inputs: object = None) -> torch.Tensor:
        """The predictions of ``model`` computed from the state after ``site`` only.

        Runs ``blocks[site.position:]`` on ``hidden`` (the state h_t, or a layer's output on it) and then
        the model's head, so the upstream part of the network is not evaluated again. With ``hidden`` =
        h_t this equals the full forward pass; with ``hidden = layer(h_t)`` it equals the full forward
        pass of the model with ``layer`` inserted at ``site``.

        Args:
            inputs: the batch's model inputs (some families need them, e.g. for masks).

        Raises:
            DownstreamUnsupportedError: the family cannot do this for ``model`` / ``inputs``; run the
                full model instead.
        """
        head = self.head(model, inputs)  # fail before any work
        site = self.site(model, site)
        blocks = model.get_submodule(site.container)
        h = hidden
        for block in list(blocks)[site.position :]:
            h = self.run_block(model, block, h, inputs)
        return head(h)

    # -- generic ------------------------------------------------------------------------------------
    def sites(self, model: nn.Module) -> list[Site]:
        """All sites in depth order: after the stem, then after every block."""
        stem, container = self.chain(model)
        blocks = model.get_submodule(container)
        sites = [Site(stem, 0, container, 0)]
        sites += [Site(f"{container}.{i}", i + 1, container, i + 1) for i in range(len(blocks))]
        if not sites:
            raise NoSitesFoundError(f"{type(model).__name__} exposes no insertion site")
        return sites

    def site(self, model: nn.Module, name: str | Site) -> Site:
        """Resolve a site name (or pass a :class:`Site` through after checking it still exists)."""
        key = name.name if isinstance(name, Site) else name
        for site in self.sites(model):
            if site.name == key:
                return site
        valid = ", ".join(s.name for s in self.sites(model))
        raise UnknownSiteError(f"{type(model).__name__} has no site {key!r}; its sites are: {valid}")

    def insert(self, model: nn.Module, site: str | Site, layer: nn.Module) -> Site:
        """Insert ``layer`` after the state of ``site`` (in place). Returns the new layer's own site."""
        site = self.site(model, site)
        blocks: nn.ModuleList = model.get_submodule(site.container)
        ref = next(iter(model.parameters()), None)
        if ref is not None:  # the new layer follows the model's dtype and device
            layer = layer.to(device=ref.device, dtype=ref.dtype)
        blocks.insert(site.position, self.wrap(model, layer))
        self.sync_config(model)
        return Site(f"{site.container}.{site.position}", site.index + 1, site.container, site.position + 1)

    def remove(self, model: nn.Module, site: str | Site) -> nn.Module:
        """Remove the inserted layer that directly follows ``site``; returns it. Inverse of :meth:`insert`."""
        site = self.site(model, site)
        blocks: nn.ModuleList = model.get_submodule(site.container)
        if site.position >= len(blocks) or self.unwrap(blocks[site.position]) is None:
            raise ValueError(f"No inserted TopoLayer follows site {site.name!r}")
        block = blocks[site.position]
        del blocks[site.position]
        self.sync_config(model)
        return self.unwrap(block)

    def inserted(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """``(position, layer)`` of every TopoLayer block in the container (original or inserted)."""
        _, container = self.chain(model)
        out = []
        for i, block in enumerate(model.get_submodule(container)):
            layer = self.unwrap(block)
            if layer is not None:
                out.append((i, layer))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
