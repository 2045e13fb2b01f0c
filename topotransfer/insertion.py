"""Insert an eigen-initialised TopoLayer and choose its scale eps (METHOD.md section 3).

``insert_layer`` mutates the model in place: W = eps * weight, b = eps * bias. With eps = 0 the new
layer is the identity and the model's outputs are bit-identical. ``line_search_epsilon`` tries a grid
of eps on held-out probe data and never accepts an eps that raises the loss (eps = 0 is admissible).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .derivative.probes import default_forward
from .derivative.topological import ForwardFn, LossFn, SiteResult, _to_device, check_loss_fn, split_batch
from .surgery import get_family
from .surgery.base import Site

__all__ = ["DEFAULT_EPSILONS", "LineSearchResult", "evaluate_loss", "insert_layer", "line_search_epsilon"]

#: Default eps grid: log-spaced from 1e-3 to 10 (the direction has unit norm per eigenvector).
DEFAULT_EPSILONS: tuple[float, ...] = tuple(float(x) for x in torch.logspace(-3, 1, 13, dtype=torch.float64))


def _direction(site: str | Site | SiteResult, weight: torch.Tensor | None, bias: torch.Tensor | None):
    if isinstance(site, SiteResult):
        weight = site.weight if weight is None else weight
        bias = site.bias if bias is None else bias
        site = site.site
    return site, weight, bias


def insert_layer(
    model: nn.Module,
    site: str | Site | SiteResult,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    epsilon: float = 0.0,
) -> nn.Module:
    """Insert a TopoLayer with W = epsilon * weight, b = epsilon * bias after the state at ``site``.

    Args:
        model: a model of a registered family; changed in place.
        site: a site name, a :class:`Site`, or a :class:`SiteResult` (whose weight/bias are used when
            ``weight``/``bias`` are not given).
        weight: (d_out, d_in) direction (for convolutions d_in = C*k*k, or the (C, C, k, k) kernel).
            ``None`` inserts a zero layer.
        bias: (d_out,) direction of the bias.
        epsilon: scale; 0 gives an exact identity layer.

    Returns:
        The same ``model`` object.
    """
    site, weight, bias = _direction(site, weight, bias)
    family = get_family(model)
    resolved = family.site(model, site)
    layer = family.new_layer(model, resolved)
    if weight is not None:
        expected = layer.out_features * layer.in_features
        if weight.numel() != expected:
            raise ValueError(
                f"weight has {tuple(weight.shape)} ({weight.numel()} entries); site {resolved.name!r} needs "
                f"({layer.out_features}, {layer.in_features})"
            )
        ref = layer.weight
        layer.set_direction(
            (epsilon * weight.to(torch.float64)).to(ref),
            None if bias is None else (epsilon * bias.to(torch.float64)).to(ref),
        )
    family.insert(model, resolved, layer)
    return model


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    data: Iterable,
    loss_fn: LossFn,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = None,
    accelerator: object | None = None,
) -> float:
    """Summed loss of ``model`` (eval mode, no grad) over ``data``; ``model.training`` is restored.

    With a multi-process ``accelerator``, ``data`` is this process's shard and the loss is summed over
    processes (every rank gets the same value).
    """
    forward_fn = forward_fn or default_forward
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for batch in data:
            if max_batches is not None and n >= max_batches:
                break
            inputs, targets = split_batch(batch)
            total += float(loss_fn(forward_fn(model, _to_device(inputs, device)), _to_device(targets, device)))
            n += 1
    finally:
        model.train(was_training)
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        sums = torch.tensor([total, n], dtype=torch.float64, device=accelerator.device)
        total, n = (float(v) for v in accelerator.reduce(sums, reduction="sum").cpu())
    if n == 0:
        raise ValueError("The line-search data is empty")
    return total


@dataclass
class LineSearchResult:
    """Outcome of :func:`line_search_epsilon`.

    Attributes:
        epsilon: the chosen eps (0.0 when no candidate lowered the loss).
        loss: loss at the chosen eps.
        baseline_loss: loss at eps = 0 (the model without the layer).
        tried: ``[(eps, loss), ...]`` for every eps evaluated, in order.
    """

    epsilon: float
    loss: float
    baseline_loss: float
    tried: list[tuple[float, float]] = field(default_factory=list)


def line_search_epsilon(
    model: nn.Module,
    site: str | Site | SiteResult,
    data: Iterable,
    loss_fn: LossFn,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = None,
    accelerator: object | None = None,
) -> LineSearchResult:
    """Pick eps for the layer W = eps*weight, b = eps*bias at ``site`` on held-out probe data.

    The layer is inserted temporarily and removed before returning (the model is left as it was);
    insert it for real with :func:`insert_layer` and the returned eps. An eps is accepted only if its
    loss is strictly lower than the loss at eps = 0.

    Args:
        data: re-iterable held-out probe batches (a list or a DataLoader).
        epsilons: candidate scales (> 0).
        accelerator: a multi-process ``accelerate.Accelerator``: ``data`` is this process's shard and
            every loss is summed over processes, so all ranks choose the same eps.

    Returns:
        :class:`LineSearchResult` with every eps tried and its loss.
    """
    check_loss_fn(loss_fn)
    site, weight, bias = _direction(site, weight, bias)
    if weight is None:
        raise ValueError("line_search_epsilon needs a direction: pass a SiteResult or weight/bias")
    if any(e <= 0 for e in epsilons):
        raise ValueError(f"epsilons must be positive (eps = 0 is always tried), got {list(epsilons)}")
    family = get_family(model)
    resolved = family.site(model, site)
    baseline = evaluate_loss(model, data, loss_fn, forward_fn, max_batches, accelerator)
    insert_layer(model, resolved, weight, bias, epsilon=0.0)
    tried = [(0.0, baseline)]
    try:
        layer = model.get_submodule(resolved.container)[resolved.position]
        layer = family.unwrap(layer)
        ref = layer.weight
        for eps in epsilons:
            layer.set_direction(
                (eps * weight.to(torch.float64)).to(ref), None if bias is None else (eps * bias.to(torch.float64)).to(ref)
            )
            tried.append((float(eps), evaluate_loss(model, data, loss_fn, forward_fn, max_batches, accelerator)))
    finally:
        family.remove(model, resolved)
    best_eps, best_loss = min(tried, key=lambda t: (t[1], t[0]))
    if not best_loss < baseline:
        best_eps, best_loss = 0.0, baseline
    return LineSearchResult(best_eps, best_loss, baseline, tried)
