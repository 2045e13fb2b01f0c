"""Insert an eigen-initialised TopoLayer and choose its scale eps (docs/method.md section 3).

``insert_layer`` mutates the model in place: W = eps * weight, b = eps * bias. With eps = 0 the new
layer is the identity and the model's outputs are bit-identical. ``line_search_epsilon`` tries a grid
of eps on held-out probe data and never accepts an eps that raises the loss (eps = 0 is admissible).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .derivative.probes import default_forward
from .derivative.topological import ForwardFn, LossFn, SiteResult, _to_device, check_loss_fn, split_batch
from .surgery import get_family
from .surgery.base import DownstreamUnsupportedError, Site, hook_state

__all__ = [
    "DEFAULT_EPSILONS",
    "LineSearchResult",
    "evaluate_loss",
    "fill_inactive_rows",
    "insert_layer",
    "line_search_epsilon",
    "reuse_site_states",
]

#: Default eps grid: log-spaced from 1e-3 to 1, three points per decade (the direction has unit norm per
#: eigenvector). Capped at 1 because eps is chosen on held-out data: with a tiny held-out set (10 labels
#: per class in the transfer benchmark) the old cap of 10 let one seed accept eps = 10, an initial
#: layer of Frobenius norm ~50 far outside the quadratic regime the derivative describes, and that run
#: never recovered. Pass ``epsilons`` to search wider.
DEFAULT_EPSILONS: tuple[float, ...] = tuple(float(x) for x in torch.logspace(-3, 0, 10, dtype=torch.float64))


def fill_inactive_rows(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Give the rows (neurons) an eigen direction leaves at exactly zero a small random direction.

    Q_t is block-diagonal over output rows, so an eigenvector lives on one row and the "cluster" rule
    activates only k rows. A row that starts at w_r = 0, b_r = 0 never trains: its gradient is
    delta_r * sigma'(w_r . z + b_r) * z and sigma'(0) = 0, so (w_r, b_r) = 0 is a stationary point for
    every optimiser. This adds a random direction R supported on the zero rows, scaled so that
    ||R||_F = ratio * ||[weight | bias]||_F:

        theta' = theta + R,   theta'^T Q theta' = theta^T Q theta + R^T Q R   (R and theta share no rows)

    so the second-order decrease of the eigen rows is kept (R^T Q R of a random direction is small
    next to lambda_max) and every neuron of the new layer can train.

    Args:
        weight: (d_out, d_in) direction (for convolutions d_in = C*k*k; any trailing shape works).
        bias: (d_out,) or ``None``.
        ratio: ||R|| / ||theta||; 0 returns the inputs unchanged.
        generator: seeds R (pass the event's generator so every rank and every rerun draws the same R).

    Returns:
        (weight', bias') with the same shapes and dtypes.
    """
    if ratio < 0:
        raise ValueError(f"fill ratio must be >= 0, got {ratio}")
    if ratio == 0:
        return weight, bias
    rows = weight.reshape(weight.shape[0], -1)
    full = rows if bias is None else torch.cat([rows, bias[:, None]], dim=1)  # (d_out, D)
    dead = full.abs().sum(dim=1) == 0  # (d_out,)
    if not bool(dead.any()):
        return weight, bias
    r = torch.randn(full.shape, generator=generator, dtype=torch.float64).to(full) * dead[:, None]
    r = r * (ratio * full.norm() / r.norm())
    new = full + r
    w = new[:, : rows.shape[1]].reshape(weight.shape)
    return w, (None if bias is None else new[:, -1].clone())


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
    layer: nn.Module | None = None,
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
        layer: a zero layer to insert (copied) instead of the family's full one, e.g. a
            :class:`~topotransfer.layers.LowRankTopoLayer` with its U set; ``weight`` then has its V's shape.

    Returns:
        The same ``model`` object.
    """
    site, weight, bias = _direction(site, weight, bias)
    family = get_family(model)
    resolved = family.site(model, site)
    layer = family.new_layer(model, resolved) if layer is None else copy.deepcopy(layer)
    model_ref = next(iter(model.parameters()), None)
    if model_ref is not None:  # the model's dtype before the direction is set: float64 directions stay float64
        layer = layer.to(device=model_ref.device, dtype=model_ref.dtype)
    if weight is not None:
        if weight.numel() != layer.weight.numel():
            raise ValueError(
                f"weight has {tuple(weight.shape)} ({weight.numel()} entries); site {resolved.name!r} needs "
                f"{tuple(layer.weight.shape[:2])}"
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
        downstream: whether the eps were evaluated on the network downstream of the site only
            (``False``: full forward passes, see :func:`line_search_epsilon`).
    """

    epsilon: float
    loss: float
    baseline_loss: float
    tried: list[tuple[float, float]] = field(default_factory=list)
    downstream: bool = False


def _sum_over_processes(values: list[float], n: int, accelerator: object | None) -> tuple[list[float], int]:
    if accelerator is None or getattr(accelerator, "num_processes", 1) == 1:
        return values, n
    sums = torch.tensor([*values, n], dtype=torch.float64, device=accelerator.device)
    out = [float(v) for v in accelerator.reduce(sums, reduction="sum").cpu()]
    return out[:-1], int(out[-1])


#: While :func:`reuse_site_states` is active: the held-out states of a search, shared by its line searches.
_REUSE: dict | None = None

#: Largest batch (in state elements) of one downstream pass over several eps stacked along the batch; 0 = one
#: eps per pass (default). Off by default: a larger batch changes the rounding of some kernels (the ResidualCNN's
#: convolutions gave losses differing in the 6th digit), and with it, on near ties, the eps chosen; on a CPU the
#: batched pass saves only per-call overhead (same flops). Set e.g. 64 * 2**20 to use it.
EPS_BATCH_ELEMENTS = 0


@contextmanager
def reuse_site_states(sites: Sequence[str | Site] | None = None) -> Iterator[None]:
    """Share the held-out states of the downstream line search between calls (a site search).

    Inside the context, :func:`line_search_epsilon` on the same (model, data, max_batches) runs the full forward
    pass over ``data`` once and caches the state h_t at every site of ``sites`` (or only the site asked for,
    when ``sites`` is ``None``): a search over S sites and both signs of each direction costs one full forward
    pass plus the downstream passes, instead of 2 S full passes. The caller must not change the model inside
    the context (the line search does not: it leaves the model as it was). The loss at eps = 0 is the same
    number for every site (the sum of the same per-batch losses), the first batch's check of the downstream
    path runs once per site. Nested use keeps the outer cache.
    """
    global _REUSE
    if _REUSE is not None:
        yield
        return
    _REUSE = {"sites": None if sites is None else [getattr(s, "site", getattr(s, "name", s)) for s in sites],
              "states": {}, "checked": {}}
    try:
        yield
    finally:
        _REUSE = None


@torch.no_grad()
def _site_states(model, family, site: Site, data, loss_fn, max_batches):
    """One full forward pass per batch: the state h_t at ``site``, the batch and its loss (eval, no grad).

    Under :func:`reuse_site_states` the states of every site of the search are captured in that one pass and
    kept for the next calls.
    """
    if _REUSE is not None:
        key = (id(model), id(data), max_batches, id(loss_fn))
        entry = _REUSE["states"].get(key)
        if entry is None or site.name not in entry[0]:
            names = _REUSE["sites"] if _REUSE["sites"] and site.name in _REUSE["sites"] else [site.name]
            targets = [t for t in (family.site(model, n) for n in names) if t.kind == "output" or t.name == site.name]
            per_site, total = _states_at(model, family, targets, data, loss_fn, max_batches)
            entry = (per_site, total)
            _REUSE["states"][key] = entry
        return entry[0][site.name], entry[1]
    per_site, total = _states_at(model, family, [site], data, loss_fn, max_batches)
    return per_site[site.name], total


def _states_at(model, family, sites: list[Site], data, loss_fn, max_batches):
    """{site name: [(h_t, inputs, targets) per batch]} and the summed loss, from one full forward pass per batch."""
    stores: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    device = next(model.parameters()).device
    cached: dict[str, list] = {s.name: [] for s in sites}
    total, n = 0.0, 0
    handles = [hook_state(model, s, stores[s.name].append, family) for s in sites]
    try:
        for batch in data:
            if max_batches is not None and n >= max_batches:
                break
            inputs, targets = split_batch(batch)
            inputs, targets = _to_device(inputs, device), _to_device(targets, device)
            for st in stores.values():
                st.clear()
            loss = float(loss_fn(default_forward(model, inputs), targets))
            for s in sites:
                if len(stores[s.name]) != 1:
                    raise RuntimeError(f"Site module {s.name!r} ran {len(stores[s.name])} times in one forward pass")
                cached[s.name].append((stores[s.name][0], inputs, targets))
            total += loss
            n += 1
    finally:
        for h in handles:
            h.remove()
    return cached, total


def _repeat_inputs(x: object, times: int) -> object | None:
    """A tensor batch repeated ``times`` along dim 0, or ``None`` when the inputs are not a plain tensor."""
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x.repeat(times, *([1] * (x.dim() - 1)))
    return None


def _downstream_losses(model, family, site, layer, cached, loss_fn, weight, bias, epsilons) -> list[float]:
    """Summed loss over the cached states for each eps: layer(h_t) -> blocks after the site -> head.

    With :data:`EPS_BATCH_ELEMENTS` > 0, several eps run in one batched downstream pass (their layer outputs
    stacked along the batch dimension, at most that many state elements per pass) when the inputs are a tensor;
    each eps's loss is then ``loss_fn`` on its own slice of the predictions, summed over the batches in the
    same order as one eps at a time. The layer's output for each eps is computed separately (the same
    ``layer(h)`` as before); only the network downstream sees a larger batch.
    """
    ref = layer.weight
    E = len(epsilons)
    sums = [0.0] * E

    def set_eps(eps: float) -> None:
        layer.set_direction(
            (eps * weight.to(torch.float64)).to(ref), None if bias is None else (eps * bias.to(torch.float64)).to(ref)
        )

    for h, x, y in cached:
        B = h.shape[0]
        chunk = max(1, min(E, EPS_BATCH_ELEMENTS // max(1, h.numel()))) if EPS_BATCH_ELEMENTS > 0 else 1
        if _repeat_inputs(x, 1) is None:
            chunk = 1
        for e0 in range(0, E, chunk):
            group = list(range(e0, min(E, e0 + chunk)))
            outs = []
            for e in group:
                set_eps(epsilons[e])
                outs.append(layer(h))
            if len(group) == 1:
                preds = [family.forward_from(model, site, outs[0], x)]
            else:
                big = family.forward_from(model, site, torch.cat(outs), _repeat_inputs(x, len(group)))
                preds = list(big.split(B))
            for e, pred in zip(group, preds, strict=True):
                sums[e] += float(loss_fn(pred, y))
    return sums


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
    downstream: bool = True,
    layer: nn.Module | None = None,
    stop_at_rise: bool = False,
) -> LineSearchResult:
    """Pick eps for the layer W = eps*weight, b = eps*bias at ``site`` on held-out probe data.

    An eps is accepted only if its loss is strictly lower than the loss at eps = 0; the model is left
    as it was (insert the layer for real with :func:`insert_layer` and the returned eps).

    Downstream evaluation (default): one full forward pass per held-out batch (no grad) gives the loss
    at eps = 0 and caches the state h_t at the site; every eps then runs only ``layer(h_t)`` and the
    network downstream of the site (:meth:`~topotransfer.surgery.base.ChainFamily.forward_from`), which
    computes exactly what the full model with the layer inserted computes. The cached states cost one
    state per held-out example (B x L x d for a transformer). It falls back to full forward passes with
    the layer temporarily inserted (and ``downstream=False`` in the result) when ``forward_fn`` is given,
    when the family does not know the model's head (BERT, custom heads, a ViT fed an attention mask), or
    when the downstream loss at eps = 0 of the first batch does not reproduce the full forward pass.

    Args:
        data: re-iterable held-out probe batches (a list or a DataLoader); read once on the downstream path.
        epsilons: candidate scales (> 0).
        forward_fn: ``forward_fn(model, inputs) -> predictions``; a custom one forces full forward passes.
        accelerator: a multi-process ``accelerate.Accelerator``: ``data`` is this process's shard and
            every loss is summed over processes, so all ranks choose the same eps.
        downstream: ``False`` always runs full forward passes.
        layer: the zero layer to try (copied; default the family's full layer), as in :func:`insert_layer`.
        stop_at_rise: walk the (ascending) grid up from eps = 0 and stop after the first eps whose loss is
            not finite or higher than the previous one's: the eps above it are not evaluated. Everything a
            first-local-minimum rule (:func:`~topotransfer.recipes.adapt.first_local_minimum_epsilon`) reads
            is in ``tried`` (the losses tried are bit-identical to a full search's), while ``epsilon`` is
            then the best of the eps tried, not of the whole grid.

    Returns:
        :class:`LineSearchResult` with every eps tried and its loss.

    Raises:
        ValueError: no direction, an eps <= 0, or ``stop_at_rise`` with a grid that is not ascending.
    """
    check_loss_fn(loss_fn)
    site, weight, bias = _direction(site, weight, bias)
    if weight is None:
        raise ValueError("line_search_epsilon needs a direction: pass a SiteResult or weight/bias")
    if any(e <= 0 for e in epsilons):
        raise ValueError(f"epsilons must be positive (eps = 0 is always tried), got {list(epsilons)}")
    if stop_at_rise and list(epsilons) != sorted(epsilons):
        raise ValueError(f"stop_at_rise walks the grid upwards: epsilons must be ascending, got {list(epsilons)}")
    family = get_family(model)
    resolved = family.site(model, site)
    tried = None
    # sub-block sites have no "rest of the chain" to run: full passes (forward_from would refuse anyway)
    if downstream and resolved.kind == "output" and (forward_fn is None or forward_fn is default_forward):
        tried = _line_search_downstream(model, family, resolved, data, loss_fn, weight, bias, epsilons, max_batches,
                                        accelerator, layer, stop_at_rise)
    used_downstream = tried is not None
    if tried is None:
        baseline = evaluate_loss(model, data, loss_fn, forward_fn, max_batches, accelerator)
        insert_layer(model, resolved, weight, bias, epsilon=0.0, layer=layer)
        tried = [(0.0, baseline)]
        try:
            live = family.layer_at(model, resolved)
            ref = live.weight
            for eps in epsilons:
                live.set_direction(
                    (eps * weight.to(torch.float64)).to(ref),
                    None if bias is None else (eps * bias.to(torch.float64)).to(ref),
                )
                tried.append((float(eps), evaluate_loss(model, data, loss_fn, forward_fn, max_batches, accelerator)))
                if stop_at_rise and _rises(tried):
                    break
        finally:
            family.remove(model, resolved)
    baseline = tried[0][1]
    best_eps, best_loss = min(tried, key=lambda t: (t[1], t[0]))
    if not best_loss < baseline:
        best_eps, best_loss = 0.0, baseline
    return LineSearchResult(best_eps, best_loss, baseline, tried, used_downstream)


def _rises(tried: list[tuple[float, float]]) -> bool:
    """Whether the last loss of ``tried`` is not finite or higher than the one before it (the search stops)."""
    last, previous = tried[-1][1], tried[-2][1]
    return not math.isfinite(last) or last > previous


def _downstream_reproduces(model, family, site, cached, loss_fn) -> bool:
    """Whether the downstream path reproduces the full forward pass at eps = 0 on the first batch."""
    try:
        for _, x, _ in cached[:1]:
            family.head(model, x)
        if cached:
            h, x, y = cached[0]
            full = float(loss_fn(default_forward(model, x), y))
            down = float(loss_fn(family.forward_from(model, site, h, x), y))
            tol = 100 * torch.finfo(h.dtype).eps * max(1.0, abs(full)) if h.is_floating_point() else 0.0
            if not abs(full - down) <= tol:
                warnings.warn(
                    f"Downstream evaluation from site {site.name!r} gives loss {down!r} but the full model "
                    f"{full!r}: {type(model).__name__}'s forward is not blocks + the known head; using full "
                    "forward passes for the line search",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return False
    except DownstreamUnsupportedError:
        return False
    return True


def _line_search_downstream(model, family, site, data, loss_fn, weight, bias, epsilons, max_batches, accelerator,
                            template=None, stop_at_rise=False):
    """The eps losses via cached states, or ``None`` when the full forward pass must be used instead.

    Every process decides the same way (the decision is all-reduced), so collective calls stay matched.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cached, total = _site_states(model, family, site, data, loss_fn, max_batches)
            check_key = (id(model), id(data), max_batches, id(loss_fn), site.name)
            if _REUSE is not None and check_key in _REUSE["checked"]:
                ok = _REUSE["checked"][check_key]
            else:
                ok = _downstream_reproduces(model, family, site, cached, loss_fn)
                if _REUSE is not None:
                    _REUSE["checked"][check_key] = ok
            flags, _ = _sum_over_processes([0.0 if ok else 1.0], 0, accelerator)
            if flags[0] > 0:
                return None
            layer = family.new_layer(model, site) if template is None else copy.deepcopy(template)
            ref = next(model.parameters())
            layer = layer.to(device=ref.device, dtype=ref.dtype).eval()
            if stop_at_rise:
                # one eps at a time, each loss summed over the processes before the next is decided on (every
                # rank stops at the same eps); a loss is the same sum, in the same batch order, as below
                (base,), n = _sum_over_processes([total], len(cached), accelerator)
                if n == 0:
                    raise ValueError("The line-search data is empty")
                tried = [(0.0, base)]
                for e in epsilons:
                    losses = _downstream_losses(model, family, site, layer, cached, loss_fn, weight, bias, [e])
                    tried.append((float(e), _sum_over_processes(losses, 0, accelerator)[0][0]))
                    if _rises(tried):
                        break
                return tried
            losses = _downstream_losses(model, family, site, layer, cached, loss_fn, weight, bias, epsilons)
    finally:
        model.train(was_training)
    values, n = _sum_over_processes([total, *losses], len(cached), accelerator)
    if n == 0:
        raise ValueError("The line-search data is empty")
    return [(0.0, values[0])] + [(float(e), v) for e, v in zip(epsilons, values[1:], strict=True)]
