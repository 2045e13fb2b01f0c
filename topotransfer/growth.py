"""Growth policy: *when* to grow (plateau), *where* (argmax of the topological derivative, or a
baseline's rule) and *how* (eigenvector direction + line-searched eps). docs/method.md section 8.

Methods (one switch, ``GrowthConfig.method``):

- ``topo``: the site score at every site (``probe.score``: theta^T Q_t theta, the predicted decrease of the
  direction the rule inserts there, by default; or TD = lambda_max(Q_t)); insert at the argmax if it is > 0,
  eigen direction, eps by line search. With ``site_selection="realized"`` the site is instead the one whose
  eigen direction, line-searched, lowers the held-out loss most (among sites with score > 0): the finite-eps
  counterpart of the score, which is only its eps -> 0 limit (J(0) - J(eps) ~ eps^2 theta^T Q theta / 2).
- ``random_site``: a random site, eigen direction of that site, eps by line search. The site is drawn by
  :func:`random_site_generator`: independently per (setting, seed, event).
- ``random_init``: the site topo would choose (same ``site_selection``), a Gaussian random direction scaled
  exactly like the eigen direction there (same Frobenius norm; under ``probe.whiten`` the same mean-square
  pre-activation (1/N) sum_n ||theta zh_n||^2), eps by the same line search. Only the direction differs.
- ``net2deeper``: a random site, an identity layer that can train (tanh activation, zero weights).
- ``forward_thinking``: freeze everything but the head, add a randomly initialised layer on top.
- ``fixed``: never grows (the network is built at its final depth).

Randomness comes from generators seeded by (run seed, event number[, setting]), never from global state, so
a resumed run makes the same choices. When no eps of the line search lowers the held-out loss the layer is
still inserted at the smallest eps of the grid (eps = 0 would be a layer that never trains, sigma'(0) = 0),
and the event says so (``GrowthEvent.eps_fallback``).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .derivative.topological import LossFn, topological_derivative
from .init_rules import input_second_moments, probe_site_results
from .insertion import DEFAULT_EPSILONS, fill_inactive_rows, line_search_epsilon, reuse_site_states
from .layers import build_topo_layer
from .surgery import get_family

__all__ = [
    "GrowthEvent", "PlateauDetector", "count_parameters", "grow_once", "random_site_generator", "realized_site",
    "scale_matched_random_direction",
]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class PlateauDetector:
    """True once the monitored loss has not improved by a relative ``min_delta`` for ``patience`` calls."""

    def __init__(self, patience: int, min_delta: float = 1e-4) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.bad = 0

    def update(self, value: float) -> bool:
        improved = self.best == math.inf or value < self.best - self.min_delta * abs(self.best)
        if improved:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def reset(self) -> None:
        self.best, self.bad = math.inf, 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = float(state["best"]), int(state["bad"])


@dataclass
class GrowthEvent:
    """What one growth event did (a row of the run's JSON history).

    Attributes:
        event: 0-based event number.
        epoch: epochs completed before the event.
        method: growth method.
        site: where the layer went (site name before insertion); ``None`` if nothing was inserted.
        scores: the number that ranks the sites, per site (``{}`` for methods that do not compute it);
            ``score_kind`` says which: lambda_max(Q_t) = TD, or theta^T Q_t theta of the site's direction.
        k: directions summed into the initial layer.
        epsilon: scale of the inserted layer.
        eps_tried: ``[(eps, held-out loss), ...]`` from the line search.
        loss_before: held-out (summed) loss before insertion.
        loss_after: held-out loss right after insertion.
        depth: number of blocks after the event.
        params: parameter count after the event.
        layer: config of the inserted layer (to replay the insertion on load).
        stopped: why growth stopped at this event ("score<=0"), else ``None``.
        sign: +1 or -1, the sign of the eigen direction the line search preferred.
        quadratic: theta^T Q_t theta of the unit-scale direction (eigen methods; NaN otherwise): the
            second-order model predicts loss_before - loss_after ~ (eps^2 / 2) * quadratic (on the probe
            data, which the line search does not use).
        realized: ``site_selection="realized"``: best held-out loss of each candidate site's line search; when it
            is not empty it is what ranked the sites (lowest wins; ``scores`` only admitted sites with score > 0
            and broke ties).
        quadratics: theta^T Q_t theta of each site's direction (the predicted decrease per eps^2 / 2 of the
            layer that would be inserted there).
        score_kind: what ``scores`` holds (``probe.score``): "lambda_max" or "quadratic" ("" when no derivative).
        lambda_max: lambda_max(Q_t) = TD of each site, whatever ``score_kind`` is.
        eps_fallback: no eps lowered the held-out loss; the layer went in at the grid's smallest eps.
        init_norm: Frobenius norm of the inserted layer's [W | b] (eps times the direction's norm).
        forced_site: the site was imposed by the caller (``grow_once(site=...)``: every-site sweeps and
            initialisation ablations), not chosen by the method.
        seconds: wall time of the event's steps (``"derivative"``, ``"line_search"``).
        cpu_seconds: CPU time of this process in the same steps.
    """

    event: int
    epoch: int
    method: str
    site: str | None
    scores: dict[str, float] = field(default_factory=dict)
    k: int = 0
    epsilon: float = 0.0
    eps_tried: list[tuple[float, float]] = field(default_factory=list)
    loss_before: float = math.nan
    loss_after: float = math.nan
    depth: int = 0
    params: int = 0
    layer: dict = field(default_factory=dict)
    stopped: str | None = None
    sign: int = 1
    quadratic: float = math.nan
    realized: dict[str, float] = field(default_factory=dict)
    quadratics: dict[str, float] = field(default_factory=dict)
    eps_fallback: bool = False
    init_norm: float = 0.0
    forced_site: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    score_kind: str = ""
    lambda_max: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _depth(model: nn.Module) -> int:
    family = get_family(model)
    _, container = family.chain(model)
    return len(model.get_submodule(container))


def random_site_generator(seed: int, event: int, setting: str = "") -> torch.Generator:
    """The generator of a random-site draw: independent per (setting, seed, event).

    ``setting`` names what the run adapts or grows (e.g. the data config); without it, runs of different
    settings with the same seed and event would draw the same site index (they did in the transfer
    benchmark: 10 and 50 labels per class drew the same sites). sha256, not ``hash``: stable across processes.
    """
    key = f"{setting}|{seed}|{event}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


def scale_matched_random_direction(
    weight: torch.Tensor, bias: torch.Tensor | None, gen: torch.Generator, moment: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Gaussian random direction of the same size as the eigen direction (weight, bias).

    Size = Frobenius norm ||[W | b]||_F, or, when ``moment`` M = (1/N) sum_n zh_n zh_n^T (D, D) is given
    (the whitened rule, where eps is an RMS pre-activation), the mean-square pre-activation
    tr(Theta M Theta^T) = (1/N) sum_n ||Theta zh_n||^2. So the random baseline differs from the eigen
    initialisation only in the direction, and the same eps grid means the same thing for both.

    Args:
        weight: (d_out, d_in) eigen direction's weight; bias: (d_out,) or ``None``.
        moment: (d_in + 1, d_in + 1) with a bias, (d_in, d_in) without; ``None`` = match the Frobenius norm.

    Returns:
        (weight, bias) float64 random direction (bias ``None`` when ``bias`` is).
    """
    w = torch.randn(weight.shape, generator=gen, dtype=torch.float64)
    b = None if bias is None else torch.randn(bias.shape, generator=gen, dtype=torch.float64)
    ref = weight.detach().to("cpu", torch.float64)
    ref = ref if bias is None else torch.cat([ref, bias.detach().to("cpu", torch.float64)[:, None]], dim=1)
    theta = w if b is None else torch.cat([w, b[:, None]], dim=1)  # (d_out, D)

    def size(t: torch.Tensor) -> torch.Tensor:
        if moment is None:
            return t.square().sum()
        m = moment.detach().to("cpu", torch.float64)
        return torch.einsum("od,de,oe->", t, m, t)  # tr(Theta M Theta^T)

    scale = (size(ref) / size(theta)).sqrt()
    w = (w * scale).to(weight.device)
    return w, None if b is None else (b * scale).to(weight.device)


def grow_once(
    model: nn.Module,
    method: str,
    probe_data: Iterable,
    heldout_data: Iterable,
    loss_fn: LossFn,
    *,
    event: int,
    epoch: int,
    seed: int = 0,
    probe_cfg=None,
    epsilons: tuple[float, ...] | list[float] | None = None,
    accelerator: object | None = None,
    both_signs: bool = True,
    fill_inactive: float = 0.0,
    init_mix: float = 0.0,
    site_selection: str = "argmax",
    site: str | None = None,
    setting: str = "",
) -> GrowthEvent:
    """Perform one growth event in place and describe it.

    Args:
        model: the network (unwrapped); changed in place.
        method: see the module docstring.
        probe_data: batches for the derivative (summed loss over them).
        heldout_data: re-iterable batches for the eps line search.
        loss_fn: *summed* loss.
        event: event number (seeds the event's randomness with ``seed``).
        probe_cfg: a :class:`~topotransfer.config.ProbeConfig` (solver, rule, c, k, tol).
        epsilons: line-search grid.
        both_signs: line-search eps along +theta and -theta and keep the better (``GrowthEvent.sign``).
        fill_inactive: for eigen directions (topo, random_site), add a random direction of this relative
            norm on the rows the eigenvectors leave at zero (:func:`~topotransfer.insertion.fill_inactive_rows`).
        init_mix: topo: insert sqrt(1 - m^2) * theta + m * R instead of the eigen direction theta, R a random
            direction of theta's size (:func:`scale_matched_random_direction`; the whitened rule's measure under
            ``probe.whiten``); 0 = theta (nothing drawn), 1 = random_init's direction at topo's site rule.
        site_selection: topo and random_init: "argmax" (of ``SiteResult.score``, i.e. ``probe.score``;
            docs/method.md section 7) or "realized" (module docstring).
        site: insert here whatever the method would choose (topo, random_site, random_init, net2deeper), and
            even if no site has TD > 0: the every-site sweep and the initialisation ablation
            (``scripts/sweep_sites.py``, ``scripts/ablate_init.py``). The scores of every site are still
            computed and recorded.
        setting: names the run's task for :func:`random_site_generator` (random_site, net2deeper).
        accelerator: a multi-process ``accelerate.Accelerator``; ``probe_data`` and ``heldout_data`` are
            this process's shards, the statistics and line-search losses are summed over processes, so
            every rank makes the same choice and inserts the same layer.

    Returns:
        The :class:`GrowthEvent`; ``site is None`` and ``stopped`` set when nothing was inserted.

    The steps: the derivative (:func:`_site_results`), then the site, direction, eps and layer
    (:func:`_eigen_layer`), or a baseline's rule; then the insertion.
    """
    family = get_family(model)
    gen = torch.Generator().manual_seed(10_007 * (seed + 1) + event)
    sites = family.sites(model)
    if site is not None and site not in {s.name for s in sites}:
        raise ValueError(f"site {site!r} is not a site of the model; sites: {[s.name for s in sites]}")
    site_gen = random_site_generator(seed, event, setting)
    rec = GrowthEvent(event=event, epoch=epoch, method=method, site=None, forced_site=site is not None)
    if method in ("topo", "random_site", "random_init"):
        search = _LineSearch(model, heldout_data, loss_fn, tuple(epsilons) if epsilons else DEFAULT_EPSILONS,
                             accelerator, both_signs)
        t0, c0 = time.perf_counter(), time.process_time()
        results = _site_results(model, method, sites, site, site_gen, probe_data, loss_fn, probe_cfg, accelerator)
        rec.seconds["derivative"] = time.perf_counter() - t0
        rec.cpu_seconds["derivative"] = time.process_time() - c0
        found = _eigen_layer(model, method, results, site, gen, rec, probe_data, probe_cfg, accelerator, search,
                             fill_inactive, site_selection, init_mix)
        if found is None:
            return rec
        site, layer = found
    elif method == "net2deeper":
        site = family.site(model, site) if site is not None else sites[
            int(torch.randint(len(sites), (1,), generator=site_gen))]
        layer = build_topo_layer({**family.new_layer(model, site).config(), "activation": "tanh"})
    elif method == "forward_thinking":
        site, layer = _forward_thinking_layer(model, sites, gen)
    elif method == "fixed":
        rec.stopped = "fixed"
        return rec
    else:
        raise ValueError(f"Unknown growth method {method!r}")

    rec.site = site.name
    rec.layer = layer.config()
    family.insert(model, site, layer)
    rec.depth, rec.params = _depth(model), count_parameters(model)
    return rec


def _site_results(model: nn.Module, method: str, sites: list, site: str | None, site_gen: torch.Generator,
                  probe_data: Iterable, loss_fn: LossFn, probe_cfg, accelerator) -> list:
    """The derivative step: TD (and the configured rule's direction) at every site, or at random_site's draw."""
    only = None
    if method == "random_site" and site is None:
        only = [sites[int(torch.randint(len(sites), (1,), generator=site_gen))].name]
    if probe_cfg is not None:  # the configured rule (topotransfer.init_rules.probe_site_results)
        return probe_site_results(model, probe_data, loss_fn, probe_cfg, sites=only, accelerator=accelerator)
    return topological_derivative(model, probe_data, loss_fn, sites=only, accelerator=accelerator)


@dataclass
class _LineSearch:
    """The eps line search of one event along a direction (and its negative)."""

    model: nn.Module
    heldout_data: Iterable
    loss_fn: LossFn
    grid: tuple[float, ...]
    accelerator: object | None
    both_signs: bool

    def __call__(self, result, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        """Line search along +theta (and -theta) at ``result.site``: (result of the better sign, weight, bias, sign)."""
        ls = line_search_epsilon(self.model, result.site, self.heldout_data, self.loss_fn, weight, bias,
                                 epsilons=self.grid, accelerator=self.accelerator)
        sign = 1
        if self.both_signs:
            # sigma(x) = x^2/2 + x^3/3 + ...: the direction's sign does not change the second-order
            # decrease but flips the cubic term, which limits how large eps can be. Try -theta too.
            neg = line_search_epsilon(
                self.model, result.site, self.heldout_data, self.loss_fn, -weight, None if bias is None else -bias,
                epsilons=self.grid, accelerator=self.accelerator,
            )
            if neg.loss < ls.loss:
                ls, weight, bias, sign = neg, -weight, (None if bias is None else -bias), -1
        return ls, weight, bias, sign


def _eigen_layer(model: nn.Module, method: str, results: list, site: str | None, gen: torch.Generator,
                 rec: GrowthEvent, probe_data: Iterable, probe_cfg, accelerator, search: _LineSearch,
                 fill_inactive: float, site_selection: str, init_mix: float = 0.0) -> tuple | None:
    """topo / random_site / random_init after the derivative: site and direction -> eps by line search -> layer.

    Fills ``rec`` (scores, sign, k, quadratic, line search, eps, init norm, line-search seconds). Returns
    ``(site, layer)``, or None when the method stops (no site with TD > 0).
    """
    family = get_family(model)
    rec.scores = {r.site: r.score for r in results}
    rec.quadratics = {r.site: float(r.quadratic) for r in results}
    rec.lambda_max = {r.site: float(r.lambda_max) for r in results}
    rec.score_kind = results[0].score_kind if results else ""
    best = max(results, key=lambda r: r.score)
    if site is not None:
        best = next(r for r in results if r.site == site)
    elif method != "random_site" and best.score <= 0:
        rec.stopped = "score<=0"  # no insertion lowers the loss to second order: stop growing
        return None

    def matched_moment(site_name: str):
        """Under the whitened rule the random direction is sized by its RMS pre-activation (needs M at the site)."""
        if probe_cfg is None or probe_cfg.rule != "rowwise" or not probe_cfg.whiten:
            return None
        target = family.site(model, site_name)
        return input_second_moments(model, probe_data, [target], {target.name: family.new_layer(model, target)},
                                    accelerator)[target.name]

    def eigen(r):
        w, b = (fill_inactive_rows(r.weight, r.bias, fill_inactive, gen) if fill_inactive > 0
                else (r.weight, r.bias))
        if method != "topo" or init_mix == 0:
            return w, b
        # theta' = sqrt(1 - m^2) theta + m R with |R| = |theta| (the rule's measure): the second-order decrease
        # becomes (1 - m^2) theta^T Q theta + m^2 R^T Q R + 2 m sqrt(1 - m^2) theta^T Q R, i.e. traded for rows
        # that are not all aligned with the few top eigen-directions of the probe (the eigen layer is low rank).
        rw, rb = scale_matched_random_direction(w, b, gen, matched_moment(r.site))
        keep = math.sqrt(1.0 - init_mix**2)
        w = keep * w.to(rw) + init_mix * rw
        b = None if b is None else keep * b.to(rb) + init_mix * rb
        return w, b

    t0, c0 = time.perf_counter(), time.process_time()
    if site is None and method in ("topo", "random_init") and site_selection == "realized":
        def candidate(r):
            found = search(r, *eigen(r))
            return found[0].loss, found

        best, (ls, weight, bias, rec.sign), rec.realized = realized_site(results, candidate)
    if method == "random_init":
        # the same site, a random direction of the eigen direction's size (scale_matched_random_direction)
        weight, bias = scale_matched_random_direction(best.weight, best.bias, gen, matched_moment(best.site))
        ls, weight, bias, rec.sign = search(best, weight, bias)
    elif site is not None or method != "topo" or site_selection != "realized":
        ls, weight, bias, rec.sign = search(best, *eigen(best))
    rec.seconds["line_search"] = time.perf_counter() - t0
    rec.cpu_seconds["line_search"] = time.process_time() - c0
    rec.k = best.k if method != "random_init" else int(weight.shape[0])
    rec.quadratic = float(best.quadratic) if method != "random_init" else math.nan
    rec.eps_tried, rec.loss_before = ls.tried, ls.baseline_loss
    # eps = 0 would insert a layer that can never train (sigma'(0) = 0 gives it zero gradient), so
    # when no eps lowers the held-out loss we seed with the smallest eps of the grid and say so.
    rec.eps_fallback = not ls.epsilon > 0
    rec.epsilon = ls.epsilon if ls.epsilon > 0 else min(search.grid)
    rec.loss_after = ls.loss if ls.epsilon > 0 else dict(ls.tried).get(rec.epsilon, math.nan)
    target = family.site(model, best.site)
    layer = family.new_layer(model, target)
    ref = layer.weight
    layer.set_direction((rec.epsilon * weight).to(ref), None if bias is None else (rec.epsilon * bias).to(ref))
    theta_sq = weight.square().sum() + (0 if bias is None else bias.square().sum())
    rec.init_norm = rec.epsilon * float(theta_sq.sqrt())
    return target, layer


def _forward_thinking_layer(model: nn.Module, sites: list, gen: torch.Generator) -> tuple:
    """forward_thinking: freeze what was trained (the head stays trainable), a random layer on top."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in _head(model).parameters():
        p.requires_grad_(True)
    site = sites[-1]
    layer = get_family(model).new_layer(model, site)
    with torch.no_grad():
        layer.weight.normal_(0.0, 1.0, generator=gen).mul_(layer.in_features**-0.5)
        if layer.bias is not None:
            layer.bias.normal_(0.0, 1.0, generator=gen).mul_(layer.in_features**-0.5)
    return site, layer


def realized_site(results: list, search) -> tuple:
    """``site_selection="realized"`` (module docstring), shared by the grow and adapt recipes.

    Args:
        results: one :class:`~topotransfer.derivative.topological.SiteResult` per site.
        search: ``search(result) -> (held-out loss, payload)``: the recipe's line search along that site's
            direction (the payload is whatever the recipe needs to insert: eps, signed direction, ...).

    Returns:
        (result, payload) of the site with the lowest loss among those with TD > 0 (ties: the larger TD), and
        ``{site: loss}`` of every site searched.
    """
    with reuse_site_states([r.site for r in results if r.score > 0]):  # one full pass for all sites and signs
        searched = {r.site: (r, *search(r)) for r in results if r.score > 0}
    best, _, payload = min(searched.values(), key=lambda v: (v[1], -v[0].score))
    return best, payload, {name: float(v[1]) for name, v in searched.items()}


def _head(model: nn.Module) -> nn.Module:
    """The output layer of a model (trained together with new layers in forward thinking)."""
    for name in ("output_layer", "head", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError(f"Cannot find the output layer of {type(model).__name__} for forward thinking")
