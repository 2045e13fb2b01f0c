"""Capture every site's state h_t and adjoint p_t = -dJ/dh_t in one forward + backward pass.

Forward hooks on the modules that produce h_t store the state (made a grad-requiring leaf when
everything upstream is frozen); after the loss, one ``torch.autograd.grad(J, [h_0, ..., h_T])``
returns every adjoint at once. No backward hooks, nothing written to parameters' ``.grad``, nothing
stashed on user modules; hooks are removed and ``model.training`` restored in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..surgery.base import ChainFamily, Site, hook_state

__all__ = ["CapturedSite", "capture_states", "probe_batch"]

CapturedSite = tuple[torch.Tensor, torch.Tensor]  # (h_t, p_t), both shaped like the state


class _StateHook:
    """Stores the state of site ``name`` (see :func:`~topotransfer.surgery.base.hook_state`)."""

    def __init__(self, store: dict[str, torch.Tensor], name: str) -> None:
        self.store, self.name = store, name

    def __call__(self, h: torch.Tensor) -> None:
        if self.name in self.store:
            raise RuntimeError(f"Site module {self.name!r} ran twice in one forward pass; cannot tell which state to use")
        if not h.requires_grad:
            # Everything upstream is frozen (or the stem has no parameters): make h a leaf that
            # autograd tracks. requires_grad_ is in place, so the downstream graph uses this tensor.
            h.requires_grad_(True)
        self.store[self.name] = h


@contextmanager
def capture_states(
    model: nn.Module, sites: Sequence[Site], family: ChainFamily
) -> Iterator[dict[str, torch.Tensor]]:
    """Register one forward hook per site; yield the dict they fill (site name -> h_t).

    The dict is cleared by the caller between batches. Hooks are removed even if the body raises.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for site in sites:
            handles.append((site, hook_state(model, site, _StateHook(store, site.name), family)))
        yield store
    finally:
        for _, handle in handles:
            handle.remove()
        store.clear()
        for site, handle in handles:  # a leftover probe hook would silently capture in the user's later forwards
            module = model.get_submodule(site.name)
            assert handle.id not in module._forward_hooks and handle.id not in module._forward_pre_hooks, "probe hook leaked"


def default_forward(model: nn.Module, inputs: object) -> torch.Tensor:
    """Call ``model`` on a tensor or a dict of tensors and return its logits / predictions tensor
    (``last_hidden_state`` for a headless transformers encoder)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(getattr(out, "last_hidden_state", None), torch.Tensor):  # a headless encoder (ViTModel)
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"Cannot find predictions in a model output of type {type(out).__name__}; pass forward_fn")


def probe_batch(
    model: nn.Module,
    sites: Sequence[Site],
    family: ChainFamily,
    store: dict[str, torch.Tensor],
    inputs: object,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    forward_fn: Callable[[nn.Module, object], torch.Tensor] = default_forward,
) -> tuple[torch.Tensor, dict[str, CapturedSite]]:
    """One forward + backward on a batch, inside :func:`capture_states`.

    Args:
        store: the dict yielded by :func:`capture_states`.
        loss_fn: ``loss_fn(predictions, targets)`` summed over the batch (J, not its mean).

    Returns:
        The detached loss J of the batch and, per site name, ``(h_t, p_t)`` detached, p_t = -dJ/dh_t.
    """
    store.clear()
    with torch.enable_grad():
        loss = loss_fn(forward_fn(model, inputs), targets)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar (summed) loss, got shape {tuple(loss.shape)}")
        missing = [s.name for s in sites if s.name not in store]
        if missing:
            raise RuntimeError(f"Sites {missing} were not reached by the forward pass")
        states = [store[s.name] for s in sites]
        grads = torch.autograd.grad(loss, states, allow_unused=True)
    out = {}
    for site, h, g in zip(sites, states, grads, strict=True):
        p = torch.zeros_like(h) if g is None else -g  # unused state: J does not depend on it
        out[site.name] = (h.detach(), p.detach())
    store.clear()
    return loss.detach(), out
