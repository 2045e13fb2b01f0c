"""How a model family exposes its chain of states and takes an inserted layer.

Every supported network is a chain ``stem -> blocks[0] -> ... -> blocks[T-1] -> head`` where the
blocks live in one ``nn.ModuleList``. State h_0 is the stem's output and h_t (t >= 1) the output of
``blocks[t-1]``. A *site* is the edge after h_t; it is named by the dotted path of the module that
produces h_t (peft-style module names), and inserting there puts a new block at ``blocks[t]``.

Sub-block sites (``kind="input"``, transformers families only): a point *inside* a block where a
residual layer can be added without changing the function at eps = 0 (e.g. the residual stream after a
pre-LN block's attention add, or the sum a post-LN block feeds to its LayerNorm). Such a site is named
by the module whose first positional *input* is the state; the family inserts the layer inside the
block (:meth:`ChainFamily.insert_inside`) instead of into the block list. Site sets:
``"blocks"`` (the chain boundaries), ``"sublayers"`` (the family's points inside blocks) and ``"all"``.

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

__all__ = ["SITE_SETS", "ChainFamily", "DownstreamUnsupportedError", "Site", "first_tensor", "hook_state"]

#: Site sets a family can list (``probe.sites``).
SITE_SETS = ("blocks", "sublayers", "all")


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
        position: index in the container at which an inserted block goes (= t); for a sub-block
            site, the index of the block that holds it.
        kind: ``"output"`` (h_t is the output of module ``name``: a block boundary) or ``"input"``
            (the state is the first positional input of module ``name``: a point inside a block).

    Sub-block sites have fractional ``index`` values between those of their block's boundaries, so that
    sorting by ``index`` gives the depth order of every site.
    """

    name: str
    index: float
    container: str
    position: int
    kind: str = "output"


def first_tensor(output: object) -> torch.Tensor:
    """The hidden state in a module output: the tensor itself, or element 0 of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        return first_tensor(output.to_tuple())
    raise TypeError(f"Cannot find the hidden state in a module output of type {type(output).__name__}")


def hook_state(model: nn.Module, site: Site, fn: Callable[[torch.Tensor], object], family: ChainFamily) -> object:
    """Register a hook that calls ``fn(h)`` with the state of ``site`` on every forward pass; returns the handle.

    ``"output"`` sites: a forward hook on module ``site.name`` (h = ``family.capture(output)``);
    ``"input"`` sites: a forward pre-hook (h = the first positional argument, the very tensor the block
    goes on using, so an in-place ``requires_grad_`` on it is seen by everything downstream).
    """
    module = model.get_submodule(site.name)
    if site.kind == "input":

        def pre_hook(mod: nn.Module, args: tuple) -> None:
            fn(args[0])

        return module.register_forward_pre_hook(pre_hook)

    def hook(mod: nn.Module, args: tuple, output: object) -> None:
        fn(family.capture(output))

    return module.register_forward_hook(hook)


def block_list_path(model: nn.Module, is_block: Callable[[nn.Module], bool], inserted: tuple[type, ...],
                    block_names: tuple[str, ...]) -> str:
    """Dotted path of the first ``nn.ModuleList`` made of the family's blocks (``is_block``) and of layers this
    project inserted (instances of ``inserted``), holding at least one original block.

    Raises:
        NoSitesFoundError: no such list (the message names the model type and the block classes).
    """
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kids = list(module)
        if any(is_block(k) for k in kids) and all(is_block(k) or isinstance(k, inserted) for k in kids):
            return path
    raise NoSitesFoundError(
        f"{type(model).__name__} (model_type={getattr(model.config, 'model_type', None)!r}) has no nn.ModuleList "
        f"of {'/'.join(block_names)} blocks"
    )


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
        if site.kind != "output":
            raise DownstreamUnsupportedError(f"site {site.name!r} lies inside a block: run the full model")
        blocks = model.get_submodule(site.container)
        h = hidden
        for block in list(blocks)[site.position :]:
            h = self.run_block(model, block, h, inputs)
        return head(h)

    # -- generic ------------------------------------------------------------------------------------
    def sub_sites(self, model: nn.Module) -> list[Site]:
        """Sites inside the blocks (``kind="input"``), in depth order; none by default."""
        return []

    def insert_inside(self, model: nn.Module, site: Site, layer: nn.Module) -> None:
        """Put ``layer`` at the sub-block ``site`` (in place)."""
        raise NotImplementedError(f"{type(self).__name__} has no sites inside blocks")

    def remove_inside(self, model: nn.Module, site: Site) -> nn.Module:
        """Undo :meth:`insert_inside`; returns the layer."""
        raise NotImplementedError(f"{type(self).__name__} has no sites inside blocks")

    def inside_layers(self, model: nn.Module) -> list[tuple[str, str, nn.Module]]:
        """``(site name, module path of the layer, layer)`` of every layer inserted inside a block."""
        return []

    def sites(self, model: nn.Module, which: str = "blocks") -> list[Site]:
        """Sites in depth order. ``which``: ``"blocks"`` (after the stem, then after every block),
        ``"sublayers"`` (the points inside blocks, :meth:`sub_sites`) or ``"all"``."""
        if which not in SITE_SETS:
            raise ValueError(f"site set must be one of {SITE_SETS}, got {which!r}")
        if which == "sublayers":
            subs = self.sub_sites(model)
            if not subs:
                raise NoSitesFoundError(f"{type(model).__name__} ({self.name}) has no sites inside its blocks")
            return subs
        blocks = self._block_sites(model)
        return blocks if which == "blocks" else sorted(blocks + self.sub_sites(model), key=lambda s: s.index)

    def _block_sites(self, model: nn.Module) -> list[Site]:
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
        for site in self.sites(model, "all"):
            if site.name == key:
                return site
        valid = ", ".join(s.name for s in self.sites(model, "all"))
        raise UnknownSiteError(f"{type(model).__name__} has no site {key!r}; its sites are: {valid}")

    def insert(self, model: nn.Module, site: str | Site, layer: nn.Module) -> Site:
        """Insert ``layer`` after the state of ``site`` (in place). Returns the new layer's own site."""
        site = self.site(model, site)
        ref = next(iter(model.parameters()), None)
        if ref is not None:  # the new layer follows the model's dtype and device
            layer = layer.to(device=ref.device, dtype=ref.dtype)
        if site.kind == "input":  # inside a block: the block list and the sites' names do not change
            self.insert_inside(model, site, layer)
            return site
        blocks: nn.ModuleList = model.get_submodule(site.container)
        blocks.insert(site.position, self.wrap(model, layer))
        self.sync_config(model)
        return Site(f"{site.container}.{site.position}", site.index + 1, site.container, site.position + 1)

    def remove(self, model: nn.Module, site: str | Site) -> nn.Module:
        """Remove the inserted layer that directly follows ``site``; returns it. Inverse of :meth:`insert`."""
        site = self.site(model, site)
        if site.kind == "input":
            return self.remove_inside(model, site)
        blocks: nn.ModuleList = model.get_submodule(site.container)
        if site.position >= len(blocks) or self.unwrap(blocks[site.position]) is None:
            raise ValueError(f"No inserted TopoLayer follows site {site.name!r}")
        block = blocks[site.position]
        del blocks[site.position]
        self.sync_config(model)
        return self.unwrap(block)

    def inserted(self, model: nn.Module) -> list[tuple[int | str, nn.Module]]:
        """``(position, layer)`` of every TopoLayer block in the container (original or inserted), then
        ``(module path, layer)`` of every layer inserted inside a block (:meth:`inside_layers`)."""
        _, container = self.chain(model)
        out: list[tuple[int | str, nn.Module]] = []
        for i, block in enumerate(model.get_submodule(container)):
            layer = self.unwrap(block)
            if layer is not None:
                out.append((i, layer))
        out += [(path, layer) for _, path, layer in self.inside_layers(model)]
        return out

    def layer_at(self, model: nn.Module, site: str | Site) -> nn.Module:
        """The inserted layer that directly follows ``site`` (block list or inside a block)."""
        site = self.site(model, site)
        if site.kind == "input":
            for name, _, layer in self.inside_layers(model):
                if name == site.name:
                    return layer
            raise ValueError(f"No inserted TopoLayer at site {site.name!r}")
        blocks = model.get_submodule(site.container)
        layer = self.unwrap(blocks[site.position]) if site.position < len(blocks) else None
        if layer is None:
            raise ValueError(f"No inserted TopoLayer follows site {site.name!r}")
        return layer

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
