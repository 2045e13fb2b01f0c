"""Row-wise eigen initialisation: one eigenvector per output row (METHOD.md section 3, block structure).

Q_t = blockdiag_r Q_{t,r}: row r of the new layer's [W | b] couples only with block r. The "cluster" rule
of :func:`topotransfer.eigen.select_direction` ranks eigenpairs over *all* blocks, so a few rows with the
largest curvature take every chosen eigenvector and the other rows start at exactly zero, where
sigma'(0) = 0 keeps them stationary for ever. The row-wise rule uses each block's *own* top eigenpair
(lambda_r, v_r), r = 1..R, and puts a multiple of v_r on every row with lambda_r > 0:

    theta_r = a_r v_r  (lambda_r > 0),   theta_r = 0  (lambda_r <= 0),   ||theta||_F = 1
    theta^T Q theta = sum_r a_r^2 lambda_r / sum_r a_r^2  >= 0

(the cross terms vanish because Q is block-diagonal), with the weights a_r

- ``"equal"``: a_r = 1 -- every row with positive curvature gets the same share of the norm;
- ``"sqrt"``: a_r = sqrt(lambda_r) -- a row's share of the second-order decrease grows with lambda_r^2;
- ``"lambda"``: a_r = lambda_r.

The site score is unchanged: TD_t = max_r lambda_r = lambda_max(Q_t).

Whitened variant (``whiten=True``): a unit *parameter* norm says little about how far the new layer is
from the identity; what the higher-order terms grow with is the size of its pre-activation W z + b. With
the input second moment M = (1/N) sum_n zh_n zh_n^T (the same for every row), each row's direction is the
top *generalised* eigenvector of (Q_r, M):

    Q_r v = mu M v,   v^T M v = 1   <=>   y = L^T v top eigenvector of L^{-1} Q_r L^{-T},  M = L L^T

i.e. the direction of largest curvature per unit mean-square pre-activation (mu_r > 0 exactly when
lambda_r > 0: congruence keeps the inertia). With sum_r a_r^2 = 1 the direction has
(1/N) sum_n ||theta zh_n||^2 = 1, so eps is the RMS pre-activation of the new layer, and
theta^T Q theta = sum_r a_r^2 mu_r.

Per-block top eigenpairs come from the public statistics API: the dense blocks (``DenseStatistic.Q``, or
``MatrixFreeStatistic.dense()`` while R*D^2 is small) with a batched ``eigh``, else a batched Lanczos on
``matvec`` over all blocks at once (:func:`block_top_eigenpairs`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .derivative.probes import default_forward
from .derivative.statistics import DenseStatistic, SiteStatistic, append_bias
from .derivative.topological import (
    LossFn,
    SiteResult,
    _to_device,
    compute_site_statistics,
    sample_mask,
    split_batch,
    topological_derivative,
)
from .eigen import fix_signs
from .errors import ConvergenceWarning
from .surgery.base import Site

__all__ = [
    "ROW_WEIGHTINGS",
    "block_top_eigenpairs",
    "input_second_moments",
    "probe_site_results",
    "rowwise_direction",
    "rowwise_site_results",
    "whitened_block_top_eigenpairs",
]

ROW_WEIGHTINGS = ("equal", "sqrt", "lambda")

#: Largest R*D*D (float64 entries) for which a matrix-free statistic is densified (64 MB).
DENSE_LIMIT = 8 * 2**20


def _lanczos_block_tops(stat: SiteStatistic, steps: int, tol: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Top eigenpair of every block by batched Lanczos with full re-orthogonalisation (no restarts).

    All R blocks iterate together: one ``stat.matvec`` of shape (R, D, 1) per step. Returns values (R,),
    vectors (R, D) and residuals (R,) = |beta_j| |last component of the Ritz vector| (exact for Lanczos).
    """
    R, D = stat.R, stat.D
    steps = min(steps, D)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, D, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    basis = torch.zeros(R, D, steps, dtype=torch.float64)
    alpha = torch.zeros(R, steps, dtype=torch.float64)
    beta = torch.zeros(R, steps, dtype=torch.float64)
    j_used = steps
    for j in range(steps):
        basis[:, :, j] = q
        w = stat.matvec(q.unsqueeze(-1).to(torch.float64)).squeeze(-1).to(torch.float64)  # (R, D): Q_r q_r
        alpha[:, j] = (w * q).sum(1)
        # full re-orthogonalisation against the whole basis, twice (float rounding of the products)
        for _ in range(2):
            w = w - torch.einsum("rdk,rk->rd", basis[:, :, : j + 1], torch.einsum("rdk,rd->rk", basis[:, :, : j + 1], w))
        beta[:, j] = w.norm(dim=1)
        if j + 1 == steps:
            break
        if float(beta[:, j].max()) < 1e-12:  # every Krylov space is invariant: Ritz pairs are exact
            j_used = j + 1
            break
        q = w / beta[:, j : j + 1].clamp_min(1e-300)
    j = j_used
    T = torch.diag_embed(alpha[:, :j]) + torch.diag_embed(beta[:, : j - 1], 1) + torch.diag_embed(beta[:, : j - 1], -1)
    theta, S = torch.linalg.eigh(T)  # ascending
    vals = theta[:, -1]
    vecs = torch.einsum("rdk,rk->rd", basis[:, :, :j], S[:, :, -1])
    res = beta[:, j - 1].abs() * S[:, -1, -1].abs()
    if j == D:
        res = torch.zeros_like(res)
    scale = float(vals.abs().max().clamp_min(1e-300))
    if float(res.max()) / scale > tol:
        warnings.warn(
            f"Row-wise Lanczos: largest relative residual {float(res.max()) / scale:.2e} > tol {tol:.1e} after {j} "
            "steps; the per-row eigenvectors may be inaccurate",
            ConvergenceWarning,
            stacklevel=3,
        )
    return vals, vecs / vecs.norm(dim=1, keepdim=True), res


def block_top_eigenpairs(
    stat: SiteStatistic, steps: int = 64, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top (largest algebraic) eigenpair of every block Q_r of a site.

    Args:
        stat: a site statistic (R blocks of size D).
        steps: Lanczos steps when the blocks are too large to densify (R*D^2 > ``DENSE_LIMIT``).
        tol: relative residual above which the Lanczos path warns.

    Returns:
        values (R,) float64 and unit vectors (R, D) float64 (sign-fixed: largest-|entry| positive).
    """
    if isinstance(stat, DenseStatistic):
        Q = stat.Q
    elif stat.R * stat.D * stat.D <= DENSE_LIMIT:
        Q = stat.dense()
    else:
        vals, vecs, _ = _lanczos_block_tops(stat, steps, tol)
        return vals, fix_signs(vecs)
    Q = Q.to(torch.float64)
    Q = 0.5 * (Q + Q.transpose(1, 2))  # exact symmetry for eigh
    values, vectors = torch.linalg.eigh(Q)  # (R, D) ascending, (R, D, D) columns
    return values[:, -1].clone(), fix_signs(vectors[:, :, -1].clone())


@torch.no_grad()
def input_second_moments(
    model: nn.Module, data: Iterable, sites: Sequence[Site], layers: dict[str, nn.Module],
    accelerator: object | None = None,
) -> dict[str, torch.Tensor]:
    """M_t = (1/N) sum_n zh_n zh_n^T (D, D) float64 at every site, from one forward pass over ``data``.

    zh_n = [z_n; 1] is the input of the would-be layer (``layers[name].samples``: tokens / pixels are
    samples; padding tokens of a dict batch with an ``attention_mask`` are dropped, as in the statistics).
    With a multi-process ``accelerator`` the sums and counts are reduced over processes.
    """
    from .surgery import get_family
    from .surgery.base import hook_state

    family = get_family(model)
    device = next(model.parameters()).device
    store: dict[str, torch.Tensor] = {}
    handles = []
    for s in sites:
        handles.append(hook_state(model, s, lambda h, name=s.name: store.__setitem__(name, h), family))
    sums = {s.name: None for s in sites}
    count = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in data:
            inputs, _ = split_batch(batch)
            store.clear()
            default_forward(model, _to_device(inputs, device))
            for s in sites:
                h = store[s.name]
                layer = layers[s.name]
                z, _ = layer.samples(h, torch.zeros_like(h))
                mask = sample_mask(inputs, h)
                if mask is not None:
                    z = z[mask]
                zh = append_bias(z.to(torch.float64), getattr(layer, "bias", None) is not None)  # (N, D)
                m = zh.T @ zh  # sum_n zh_n zh_n^T
                sums[s.name] = m if sums[s.name] is None else sums[s.name] + m
            count += z.shape[0]
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        count = accelerator.reduce(count.reshape(1), reduction="sum").reshape(())
        sums = {k: accelerator.reduce(v.contiguous(), reduction="sum") for k, v in sums.items()}
    return {k: v / count for k, v in sums.items()}


class _WhitenedBlocks:
    """The blocks A_r = L^{-1} Q_r L^{-T} of a site as a matrix-free operator (M = L L^T, the same L for
    every row): A v = L^{-1} (Q (L^{-T} v)), two triangular solves around one ``stat.matvec``."""

    def __init__(self, stat: SiteStatistic, L: torch.Tensor) -> None:
        self.stat, self.L, self.R, self.D = stat, L, stat.R, stat.D

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """v (R, D, m) -> (R, D, m)."""
        R, D, m = v.shape
        cols = v.to(self.L).permute(1, 0, 2).reshape(D, R * m)  # column (r, i) = v[r, :, i]
        w = torch.linalg.solve_triangular(self.L.T, cols, upper=True)  # L^{-T} v
        qw = self.stat.matvec(w.reshape(D, R, m).permute(1, 0, 2).contiguous()).to(self.L)  # Q_r (L^{-T} v_r)
        out = torch.linalg.solve_triangular(self.L, qw.permute(1, 0, 2).reshape(D, R * m), upper=False)
        return out.reshape(D, R, m).permute(1, 0, 2)


def whitened_block_top_eigenpairs(
    stat: SiteStatistic, M: torch.Tensor, ridge: float = 1e-6, steps: int = 64, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top generalised eigenpair (mu_r, v_r) of (Q_r, M) for every block, v_r^T M v_r = 1.

    Args:
        stat: a site statistic (R blocks of size D). Dense blocks (or R*D^2 <= ``DENSE_LIMIT``): batched
            ``eigh`` of L^{-1} Q_r L^{-T}; larger (ViT-Base, d = 768): batched Lanczos on the same operator,
            applied matrix-free (:class:`_WhitenedBlocks`), never forming a block.
        M: (D, D) input second moment; ``ridge * trace(M) / D`` is added to its diagonal (conditioning:
            a constant input coordinate, e.g. a dead ReLU unit, makes M singular).
        steps, tol: Lanczos steps and the relative residual above which it warns (large blocks only).

    Returns:
        mu (R,) float64 and vectors (R, D) float64 with unit M-norm (sign-fixed).
    """
    D = M.shape[0]
    M = M.to(torch.float64)
    M = M + ridge * float(torch.trace(M)) / D * torch.eye(D, dtype=M.dtype, device=M.device)
    L = torch.linalg.cholesky(M)  # M = L L^T
    if isinstance(stat, DenseStatistic) or stat.R * stat.D * stat.D <= DENSE_LIMIT:
        Q = (stat.Q if isinstance(stat, DenseStatistic) else stat.dense()).to(L)
        Q = 0.5 * (Q + Q.transpose(1, 2))
        Lb = L.expand(Q.shape[0], D, D)
        # A_r = L^{-1} Q_r L^{-T}: two triangular solves (A_r is symmetric)
        X = torch.linalg.solve_triangular(Lb, Q, upper=False)  # L^{-1} Q_r
        A = torch.linalg.solve_triangular(Lb, X.transpose(1, 2), upper=False).transpose(1, 2)  # (L^{-1} (L^{-1} Q_r)^T)^T
        A = 0.5 * (A + A.transpose(1, 2))
        mu, Y = torch.linalg.eigh(A)
        mu, y = mu[:, -1].clone(), Y[:, :, -1]  # (R,), (R, D) unit
    else:
        mu, y, _ = _lanczos_block_tops(_WhitenedBlocks(stat, L), steps, tol)
    v = torch.linalg.solve_triangular(L.T, y.T, upper=True).T  # v_r = L^{-T} y_r: unit M-norm
    return mu, fix_signs(v.contiguous())


def rowwise_direction(
    values: torch.Tensor, vectors: torch.Tensor, weighting: str = "equal"
) -> tuple[torch.Tensor, int, float]:
    """theta with row r = a_r v_r on every row with lambda_r > 0, unit Frobenius norm (module docstring).

    Args:
        values: (R,) top eigenvalue lambda_r of each block.
        vectors: (R, D) unit top eigenvector v_r of each block.
        weighting: "equal" (a_r = 1), "sqrt" (a_r = sqrt(lambda_r)) or "lambda" (a_r = lambda_r).

    Returns:
        theta (R, D) float64, k = number of active rows, and theta^T Q theta = sum a_r^2 lambda_r / sum a_r^2.
        When no lambda_r is positive, only the row of the largest lambda_r is used (k = 1, quadratic <= 0).
    """
    if weighting not in ROW_WEIGHTINGS:
        raise ValueError(f"Unknown row weighting {weighting!r}; choose one of {ROW_WEIGHTINGS}")
    lam = values.to(torch.float64)
    pos = lam > 0
    if not bool(pos.any()):
        a = torch.zeros_like(lam)
        a[int(lam.argmax())] = 1.0
    elif weighting == "equal":
        a = pos.to(torch.float64)
    elif weighting == "sqrt":
        a = lam.clamp_min(0).sqrt()
    else:
        a = lam.clamp_min(0)
    a = a / a.norm()  # ||theta||_F = ||a|| because every v_r has unit norm
    theta = a[:, None] * vectors.to(torch.float64)  # (R, D)
    quad = float((a.square() * lam).sum())  # block-diagonal Q: no cross terms between rows
    return theta, int((a != 0).sum()), quad


def rowwise_site_results(
    model: nn.Module,
    data: Iterable,
    loss_fn: LossFn,
    sites: Sequence[str | Site] | None = None,
    *,
    weighting: str = "equal",
    accelerator: object | None = None,
    solver: str = "auto",
    tol: float = 1e-4,
    sample_fraction: float | None = None,
    max_samples_per_batch: int | None = None,
    whiten: bool = False,
    progress: bool = False,
) -> list[SiteResult]:
    """Like :func:`~topotransfer.derivative.topological.topological_derivative`, with the row-wise rule.

    One pass over ``data`` accumulates every site's statistic (summed over the processes of
    ``accelerator``, so every rank gets the same direction); each block's top eigenpair gives the site's
    score TD_t = max_r lambda_r and the direction of :func:`rowwise_direction`.

    ``whiten=True`` uses the generalised eigenpairs of (Q_r, M_t) (module docstring; one more forward
    pass over ``data`` for M_t); the score stays lambda_max(Q_t).

    Returns:
        One :class:`SiteResult` per site in depth order; ``eigenvalues`` holds the R per-block top
        eigenvalues (descending), ``k`` the rows that start active, ``quadratic`` theta^T Q theta.
    """
    site_list, stats, layers, _ = compute_site_statistics(
        model, data, loss_fn, sites, accelerator=accelerator, solver=solver, progress=progress,
        sample_fraction=sample_fraction, max_samples_per_batch=max_samples_per_batch,
    )
    moments = input_second_moments(model, data, site_list, layers, accelerator) if whiten else {}
    out = []
    for s in site_list:
        st, layer = stats[s.name], layers[s.name]
        vals, vecs = block_top_eigenpairs(st, tol=tol)
        if whiten:
            # rows: generalised eigenvectors; their mu_r > 0 exactly where lambda_r > 0 (same inertia)
            mu, wvecs = whitened_block_top_eigenpairs(st, moments[s.name], tol=tol)
            theta, k, quad = rowwise_direction(mu, wvecs, weighting)
            # rows have unit M-norm and sum_r a_r^2 = 1: the mean-square pre-activation is 1
            quad = st.quadratic(theta[:, : layer.in_features], theta[:, layer.in_features] if st.bias else None)
        else:
            theta, k, quad = rowwise_direction(vals, vecs, weighting)
        device = next(model.parameters()).device
        theta = theta.to(device)
        out.append(
            SiteResult(
                site=s.name,
                index=s.index,
                score=float(vals.max()),
                eigenvalues=vals.sort(descending=True).values,
                weight=theta[:, : layer.in_features].contiguous(),
                bias=theta[:, layer.in_features].contiguous() if st.bias else None,
                k=k,
                quadratic=quad,
                num_samples=st.count,
                solver="dense" if isinstance(st, DenseStatistic) else "matrix_free",
                converged=True,
                layer_config=layer.config(),
                row_scores=vals,
            )
        )
    if not math.isfinite(sum(r.score for r in out)):
        raise FloatingPointError("Non-finite topological derivative in the row-wise rule")
    return out


def probe_site_results(
    model: nn.Module,
    data: Iterable,
    loss_fn: LossFn,
    probe,
    sites: Sequence[str | Site] | None = None,
    *,
    accelerator: object | None = None,
    progress: bool = False,
) -> list[SiteResult]:
    """Scores and directions at every site under the rule of a :class:`~topotransfer.config.ProbeConfig`.

    ``probe.rule`` = top1 | cluster | topk: :func:`~topotransfer.derivative.topological.topological_derivative`;
    ``rowwise``: :func:`rowwise_site_results` (``probe.row_weighting``, ``probe.whiten``). Every recipe
    (grow, adapt, derivative) goes through here, so a rule means the same in all of them. The score is
    TD_t = lambda_max(Q_t) under every rule. ``sites=None`` probes ``probe.sites`` (blocks | sublayers | all;
    sites inside blocks that already hold a layer are left out).
    """
    if sites is None and getattr(probe, "sites", "blocks") != "blocks":
        from .surgery import get_family

        family = get_family(model)
        taken = {name for name, _, _ in family.inside_layers(model)}
        sites = [s.name for s in family.sites(model, probe.sites) if s.name not in taken]
    common = dict(accelerator=accelerator, solver=probe.solver, tol=probe.tol, progress=progress,
                  sample_fraction=probe.sample_fraction, max_samples_per_batch=probe.max_samples_per_batch)
    if probe.rule == "rowwise":
        return rowwise_site_results(model, data, loss_fn, sites=sites, weighting=probe.row_weighting,
                                    whiten=probe.whiten, **common)
    return topological_derivative(model, data, loss_fn, sites=sites, rule=probe.rule, c=probe.c, k=probe.k, **common)
