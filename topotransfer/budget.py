"""Spend a parameter budget on rank-k layers at several sites (docs/method.md section 12).

Every positive per-row top eigenvalue lambda_{s,r} of site s is a candidate rank-1 term of a
:class:`~topotransfer.layers.LowRankTopoLayer` (u = e_r, v = the row's eigenvector): predicted decrease
eps^2/2 lambda_{s,r}, cost 2 d_s + 1 parameters. :func:`allocate_ranks` takes terms greedily by lambda / cost
(largest first), so with one width d it keeps the largest eigenvalues pooled over all sites. Pure functions on
plain numbers; the recipe turns an allocation into layers (:func:`plan_insertions` gives rows and directions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import LowRankTopoLayer, TopoLayer, lowrank_from_rows

__all__ = [
    "Allocation", "allocate_ranks", "insert_budgeted", "lora_parameter_count", "lora_shapes", "plan_insertions",
    "rank_cost", "split_budget",
]


def rank_cost(dim: int, bias: bool = True, train_up: bool = True) -> int:
    """Trained parameters of one rank of a LowRankTopoLayer on width ``dim``: a row of V (d), c_j (1), and a column
    of U (d) unless U stays at its one-hot eigen rows (``train_up=False``: a fixed row selection, not trained)."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    return dim + int(bias) + (dim if train_up else 0)


def lora_parameter_count(shapes: Sequence[tuple[int, int]], rank: int) -> int:
    """Trainable parameters of LoRA of rank ``rank`` on Linear layers of (in, out) ``shapes``: sum r (in + out)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return sum(rank * (i + o) for i, o in shapes)


def split_budget(total: int, events: int) -> list[int]:
    """``total`` parameters over ``events`` insertion events: equal parts, the remainder to the first ones."""
    if events < 1 or total < 0:
        raise ValueError(f"need events >= 1 and total >= 0, got events={events}, total={total}")
    q, r = divmod(total, events)
    return [q + (1 if i < r else 0) for i in range(events)]


def allocate_ranks(
    spectra: Mapping[str, Sequence[float]],
    costs: Mapping[str, int],
    budget: int,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
) -> dict[str, int]:
    """Ranks per site that fit ``budget``, chosen greedily by eigenvalue per parameter.

    Args:
        spectra: site -> its candidate eigenvalues (any order; only positive ones count).
        costs: site -> parameters per rank (:func:`rank_cost`).
        budget: parameters to spend (the result's cost is <= budget).
        min_rank: a site is opened with at least this many ranks at once (its ``min_rank`` largest
            eigenvalues, valued by their mean per parameter); a site with fewer positive eigenvalues is skipped.
        max_rank: at most this many ranks per site.

    Returns:
        site -> rank for the sites that get at least one, in the order of ``spectra``.
    """
    if budget < 0 or min_rank < 1 or (max_rank is not None and max_rank < min_rank):
        raise ValueError(f"need budget >= 0 and 1 <= min_rank <= max_rank, got {budget}, {min_rank}, {max_rank}")
    order = {s: i for i, s in enumerate(spectra)}
    lams = {s: sorted((float(v) for v in vals if float(v) > 0), reverse=True) for s, vals in spectra.items()}
    for s in lams:
        if costs.get(s, 0) <= 0:
            raise ValueError(f"site {s!r} needs a positive cost per rank, got {costs.get(s)}")
        if max_rank is not None:
            lams[s] = lams[s][:max_rank]
    ranks = dict.fromkeys(spectra, 0)
    left = budget
    while True:
        best, best_key, best_step = None, None, 0
        for s, vals in lams.items():
            k = ranks[s]
            step = min_rank if k == 0 else 1
            if k + step > len(vals) or step * costs[s] > left:
                continue
            value = sum(vals[k:k + step]) / (step * costs[s])  # predicted decrease per parameter
            key = (value, -order[s])
            if best_key is None or key > best_key:
                best, best_key, best_step = s, key, step
        if best is None:
            break
        ranks[best] += best_step
        left -= best_step * costs[best]
    return {s: k for s, k in ranks.items() if k > 0}


@dataclass
class Allocation:
    """A rank-k layer to insert at one site.

    Attributes:
        site: site name.
        index: depth order of the site (insert deepest first so that shallower names stay valid).
        rows: the k rows r_j of the full layer (one-hot columns of U), largest eigenvalue first.
        up, weight, bias: U (d, k), unit-norm direction V (k, d) and c (k,) (:func:`~topotransfer.layers.lowrank_from_rows`).
        predicted: sum_j a_j^2 lambda_{r_j} of the direction (J(eps) ~ J(0) - eps^2/2 predicted).
        parameters: k (2d + 1).
    """

    site: str
    index: float
    rows: list[int]
    up: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    predicted: float
    parameters: int


def plan_insertions(results: Sequence, budget: int, *, min_rank: int = 1, max_rank: int | None = None,
                    train_up: bool = True) -> list[Allocation]:
    """Allocate ``budget`` over the sites of row-wise :class:`~topotransfer.derivative.topological.SiteResult` s.

    Each result needs ``row_scores`` (R,) (the rule "rowwise" fills them) and a ``layer_config`` with ``dim``.
    ``train_up=False``: U will not train, so a rank costs d + 1 trained parameters (:func:`rank_cost`).

    Returns:
        One :class:`Allocation` per site that gets a rank, deepest site first.
    """
    spectra, costs, by_site = {}, {}, {}
    for r in results:
        if getattr(r, "row_scores", None) is None:
            raise ValueError(f"site {r.site!r} has no per-row eigenvalues: a parameter budget needs probe.rule=rowwise")
        spectra[r.site] = r.row_scores.tolist()
        costs[r.site] = rank_cost(int(r.layer_config["dim"]), r.bias is not None, train_up)
        by_site[r.site] = r
    ranks = allocate_ranks(spectra, costs, budget, min_rank=min_rank, max_rank=max_rank)
    out = []
    for site, k in ranks.items():
        r = by_site[site]
        rows = r.row_scores.to(torch.float64).argsort(descending=True, stable=True)[:k].tolist()
        up, weight, bias = lowrank_from_rows(r.weight, r.bias, rows)
        theta = torch.cat([r.weight, r.bias[:, None]], 1) if r.bias is not None else r.weight
        a2 = theta.to(torch.float64)[rows].square().sum(1)  # a_j^2 before renormalisation
        predicted = float((a2 * r.row_scores.to(torch.float64)[rows]).sum() / a2.sum().clamp_min(1e-300))
        out.append(Allocation(site, r.index, rows, up, weight, bias, predicted, k * costs[site]))
    return sorted(out, key=lambda a: -a.index)


def lora_shapes(model: nn.Module, targets: Sequence[str]) -> list[tuple[int, int]]:
    """(in, out) of every linear module whose last name component is in ``targets`` (what peft LoRA wraps; a
    module peft already wrapped counts once, by its own ``in_features`` / ``out_features``)."""
    return [(int(m.in_features), int(m.out_features)) for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in set(targets) and hasattr(m, "in_features") and hasattr(m, "out_features")]


def insert_budgeted(
    model: nn.Module,
    results: Sequence,
    budget: int,
    heldout: Iterable,
    loss_fn: Callable,
    *,
    epsilons: Sequence[float],
    choose_epsilon: Callable[[object], float],
    accelerator: object | None = None,
    min_rank: int = 1,
    max_rank: int | None = None,
    train_up: bool = True,
) -> list[dict]:
    """Spend ``budget`` on rank-k layers (:func:`plan_insertions`), deepest site first: line-search each layer's eps
    on ``heldout`` with the layers inserted before it in place, then insert it.

    Args:
        results: row-wise site results of the current model.
        choose_epsilon: ``LineSearchResult -> eps`` (> 0; e.g. the recipe's first-local-minimum rule).

    Returns:
        One record per inserted layer: ``site`` (name at insertion time), ``layer`` (config), ``rows``, ``rank``,
        ``parameters``, ``predicted`` (sum_j a_j^2 lambda_{r_j}), ``epsilon``, ``eps_tried``, ``loss_before``.
    """
    from .insertion import insert_layer, line_search_epsilon
    from .surgery import get_family

    family = get_family(model)
    records = []
    for a in plan_insertions(results, budget, min_rank=min_rank, max_rank=max_rank, train_up=train_up):
        full = family.new_layer(model, family.site(model, a.site))
        if not isinstance(full, TopoLayer):
            raise ValueError(f"rank-k layers replace token-wise TopoLayers only; site {a.site!r} takes {type(full).__name__}")
        template = LowRankTopoLayer.like(full, len(a.rows))
        template.set_up(a.up)
        ls = line_search_epsilon(model, a.site, heldout, loss_fn, a.weight, a.bias, epsilons=epsilons,
                                 accelerator=accelerator, layer=template)
        eps = float(choose_epsilon(ls))
        insert_layer(model, a.site, a.weight, a.bias, epsilon=eps, layer=template)
        records.append({
            "site": a.site, "layer": template.config(), "rows": a.rows, "rank": len(a.rows),
            "parameters": a.parameters, "predicted": a.predicted, "epsilon": eps, "eps_tried": ls.tried,
            "loss_before": ls.baseline_loss,
        })
    return records
