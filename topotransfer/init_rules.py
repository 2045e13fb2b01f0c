"""Row-wise eigen initialisation: one eigenvector per output row (docs/method.md section 5).

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

TD_t = max_r lambda_r = lambda_max(Q_t) is unchanged; the direction's own predicted decrease is the
theta^T Q theta below, which is what ranks the sites in the recipes (``probe.score=quadratic``, the default).

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
    SCORE_KINDS,
    LossFn,
    SiteResult,
    _to_device,
    compute_site_statistics,
    sample_mask,
    solve_site,
    split_batch,
    topological_derivative,
)
from .eigen import BlockTops, block_top_eigenpairs_lanczos, fix_signs
from .errors import ConvergenceWarning
from .surgery.base import Site

__all__ = [
    "ROW_WEIGHTINGS",
    "block_top_eigenpairs",
    "block_tops",
    "available_memory_bytes",
    "input_second_moments",
    "probe_cache_cap",
    "probe_site_results",
    "rowwise_direction",
    "rowwise_site_results",
    "whitened_block_top_eigenpairs",
    "whitened_block_tops",
]

ROW_WEIGHTINGS = ("equal", "sqrt", "lambda")

#: A matrix-free statistic is densified (``dense()``, then batched ``eigh``) only when R*D*D float64 entries
#: fit in this many (64 MB) *and* D <= ``DENSE_MAX_DIM``: densifying costs D products with every block, the
#: batched Lanczos about 10 - 20; measured crossover between D = 33 and D = 49 at N = 2048 and 16384 rows
#: (`python scripts/bench_vit_derivative.py switch`)
DENSE_LIMIT = 8 * 2**20
DENSE_MAX_DIM = 40


def _densify(stat: SiteStatistic) -> bool:
    """Whether the per-block top eigenpairs come from dense blocks (else batched Lanczos on ``stat.matvec``)."""
    if isinstance(stat, DenseStatistic):
        return True
    return stat.R * stat.D * stat.D <= DENSE_LIMIT and stat.D <= DENSE_MAX_DIM


def _dense_tops(Q: torch.Tensor) -> BlockTops:
    """Exact top eigenpair of every dense block Q (R, D, D) by batched ``eigh`` in float64."""
    Q = Q.to(torch.float64)
    Q = 0.5 * (Q + Q.transpose(1, 2))  # exact symmetry for eigh
    values, vectors = torch.linalg.eigh(Q)  # (R, D) ascending, (R, D, D) columns
    vals, vecs = values[:, -1].clone(), fix_signs(vectors[:, :, -1].clone())
    res = torch.linalg.vector_norm(torch.bmm(Q, vecs[:, :, None]).squeeze(-1) - vals[:, None] * vecs, dim=1)
    return BlockTops(vals, vecs, res, torch.ones(Q.shape[0], dtype=torch.bool, device=Q.device))


#: Dimension of the shared subspace whose Ritz vectors start the batched Lanczos of the plain blocks and the
#: top-1 solve for lambda_max (:meth:`~.derivative.statistics.MatrixFreeStatistic.subspace_starts`); 0 starts from
#: random vectors. Measured on the d = 768 ViT statistics (13 sites, 65 and 197 tokens per image), with
#: ``WARM_MIN_STEPS``: about 11 -> 5 - 6 products per site for the plain blocks, 5 -> 2 for the top-1 solve, for
#: about a third of one product. The whitened blocks start from their own subspace Ritz vectors, with a check for
#: the inputs' null direction (:func:`_null_direction`, :data:`WHITEN_START_MIX`, :data:`WHITEN_WARM_TOL`).
START_SUBSPACE = 32
#: ``min_steps`` of the warm-started batched Lanczos (8 from random starts: a residual test after very few steps can
#: pass on a lower Ritz pair). From the subspace Ritz vector the top pair dominates the start of the plain blocks;
#: 4 steps gave the same per-row agreement with dense float64 as 8 (d = 192, all 13 sites x 192 rows).
WARM_MIN_STEPS = 4
#: Weight of the seeded random unit vector added to each whitened block's unit subspace Ritz vector (0: none). From
#: the Ritz vector alone 28 - 30 of 13 x 192 rows converged on a lower eigenpair (d = 192, 197 tokens, 4 images; up to
#: 1e-3 of the site's largest eigenvalue). Every one of them was a row whose top eigenvalue is the ~0 of the inputs'
#: null direction (Zh w = 0, e.g. LayerNorm-centred inputs) above an all-negative spectrum on the span of the samples,
#: which no Krylov space grown from that span reaches; :func:`_null_space_check` finds those rows for ~ nothing. A
#: random part (0.1 until then) can also find a top eigenvector that lies in the samples' span but outside the
#: subspace (tests/test_rowwise_solver.py builds one; on the bench ViT at d = 192 none at 65 tokens x 16 images or
#: 197 x 4, 4 subspace seeds; 1 - 4 rows at 65 x 8, where 0.1 leaves 0 - 1), at a price: 6.0 -> 13.1 products per
#: site at d = 768, 65 tokens (docs/results/performance.md).
WHITEN_START_MIX = 0.0
#: Tolerance of the warm-started whitened blocks relative to the caller's ``tol``. At ``tol`` itself the mixed start
#: left 1 - 3 rows between 1e-4 and 3e-4 at 197 tokens (random starts of seeds 1 - 3: 0 - 2 rows; the subspace start
#: with the null-space check, subspace seeds 1 - 2: 1 - 3 rows); at 0.3 * ``tol`` no row of any of them was above
#: 1e-4 (d = 192, 65 and 197 tokens; scripts/whiten_start_variants.py). Convergence is still reported against
#: ``tol`` (a block that meets it is not flagged when it misses the margin).
WHITEN_WARM_TOL = 0.3
#: Convergence tests of the warm-started top-1 solve for lambda_max(Q_t) (the whitened rule): from step 2 on.
WARM_FIRST_CHECKS = (2, 3, 4, 6)


def _starts(stat: SiteStatistic, seed: int = 0) -> torch.Tensor | None:
    """Start vectors of a matrix-free solve: the statistic's shared-subspace Ritz vectors where it can give them
    (``None``: the solver's seeded random vectors)."""
    if START_SUBSPACE and hasattr(stat, "subspace_starts"):
        return stat.subspace_starts(k=START_SUBSPACE, seed=seed)
    return None


def _min_steps(start: torch.Tensor | None) -> int:
    return 8 if start is None else WARM_MIN_STEPS


def block_tops(stat: SiteStatistic, tol: float = 1e-4, steps: int = 24, max_steps: int = 400) -> BlockTops:
    """The top (largest algebraic) eigenpair of every block Q_r of a site, with per-block convergence.

    Dense statistics (and small matrix-free ones, :data:`DENSE_MAX_DIM`): batched ``eigh``. Otherwise the
    batched matrix-free Lanczos of :func:`~topotransfer.eigen.block_top_eigenpairs_lanczos` on ``stat.matvec``
    (all R blocks per product, converged blocks leave the batch).

    Args:
        stat: a site statistic (R blocks of size D).
        tol: relative residual tolerance of the Lanczos path.
        steps, max_steps: Krylov dimension per block while all are active, and the step budget per block.
    """
    if _densify(stat):
        return _dense_tops(stat.Q if isinstance(stat, DenseStatistic) else stat.dense())
    start = _starts(stat)
    return block_top_eigenpairs_lanczos(stat.matvec, stat.R, stat.D, tol=tol, steps=steps, max_steps=max_steps,
                                        start=start, min_steps=_min_steps(start))


def block_top_eigenpairs(
    stat: SiteStatistic, steps: int = 24, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top eigenpair of every block: values (R,) float64 and unit vectors (R, D) float64 (sign-fixed:
    largest-|entry| positive). :func:`block_tops` without the convergence record."""
    tops = block_tops(stat, tol=tol, steps=steps)
    return tops.values, tops.vectors


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
    every row): A v = L^{-1} (Q (L^{-T} v)), two triangular solves around one ``stat.matvec`` (D^2 per vector
    against the product's 4 N D: negligible for N >> D)."""

    def __init__(self, stat: SiteStatistic, L: torch.Tensor) -> None:
        self.stat, self.L, self.R, self.D = stat, L, stat.R, stat.D

    def matvec(self, v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """v (R, D, m) -> (R, D, m); with ``rows``, v is (len(rows), D, m) for those blocks only."""
        R, D, m = v.shape
        cols = v.to(self.L).permute(1, 0, 2).reshape(D, R * m)  # column (r, i) = v[r, :, i]
        w = torch.linalg.solve_triangular(self.L.T, cols, upper=True)  # L^{-T} v
        w = w.reshape(D, R, m).permute(1, 0, 2).contiguous()
        qw = (self.stat.matvec(w) if rows is None else self.stat.matvec(w, rows=rows)).to(self.L)  # Q_r L^{-T} v_r
        out = torch.linalg.solve_triangular(self.L, qw.permute(1, 0, 2).reshape(D, R * m), upper=False)
        return out.reshape(D, R, m).permute(1, 0, 2)


def _cholesky(M: torch.Tensor, ridge: float) -> torch.Tensor:
    """L with L L^T = M + ridge * trace(M) / D * I (float64)."""
    D = M.shape[0]
    M = M.to(torch.float64)
    M = M + ridge * float(torch.trace(M)) / D * torch.eye(D, dtype=M.dtype, device=M.device)
    return torch.linalg.cholesky(M)


def _null_direction(M: torch.Tensor, L: torch.Tensor, ridge: float, iters: int = 4, block: int = 4) -> torch.Tensor:
    """A unit column (D, 1): the whitened image y = L^T w of the direction w of least w^T M w / w^T (L L^T) w, when
    w^T M w lies below the ridge ``ridge * trace(M) / D`` that :func:`_cholesky` adds; else (D, 0).

    Such a w puts (almost) no pre-activation on any sample (Zh w ~ 0: e.g. the all-ones direction of a
    LayerNorm-centred input, or the ~650 directions outside the span of a ViT's patch + position embeddings), so
    Q_r w ~ 0 in every block: in whitened coordinates every block A_r has the eigenvalue ~ 0 on y -- the top one of a
    block whose eigenvalues on the span of the samples are all negative. The products A_r v lie in that span, and
    so do the subspace starts: a Krylov space grown from them never reaches y. One such direction is enough (on the
    null space every block's form is ~ 0, whatever its dimension). Found by block inverse iteration with the
    Cholesky factor, (L L^T)^{-1} X (the ridge directions have the smallest eigenvalues of M + ridge), then a
    Rayleigh-Ritz step on M: about ``iters`` x 2 D^2 x ``block`` flops, negligible.
    """
    D = M.shape[0]
    M = M.to(torch.float64)
    eps = ridge * float(torch.trace(M)) / D
    g = torch.Generator(device="cpu").manual_seed(0)
    X = torch.randn(D, min(block, D), generator=g, dtype=torch.float64).to(M.device)
    for _ in range(iters):
        X = torch.linalg.qr(torch.cholesky_solve(X, L))[0]  # (L L^T)^{-1} X, orthonormalised
    m, S = torch.linalg.eigh(X.T @ M @ X)  # Rayleigh-Ritz on M, ascending
    if not float(m[0]) < eps:
        return X[:, :0]
    y = L.T @ (X @ S[:, :1])  # y = L^T w
    return y / torch.linalg.vector_norm(y)


def _null_space_check(ws: SiteStatistic, tops: BlockTops, Y: torch.Tensor, tol: float, steps: int,
                      max_steps: int) -> BlockTops:
    """Rows whose top eigenpair lies in the span of Y (D, m) (:func:`_null_direction`), which the warm-started
    Krylov spaces cannot reach: solved again from there.

    Each block's top Ritz pair on span(Y), B_r = Y^T A_r Y (:meth:`~.statistics.MatrixFreeStatistic.projected_blocks`,
    about m^2 / (8 D) of a product), is compared with the returned value; the rows where it is larger restart the
    batched Lanczos from their Ritz vector there (products for those rows only), with the whole site's scale, and
    take the new pair when it is higher. ``tops`` is updated in place and returned.
    """
    if Y.shape[1] == 0 or not hasattr(ws, "projected_blocks"):
        return tops
    rho, C = torch.linalg.eigh(ws.projected_blocks(Y).to(torch.float64))
    idx = (rho[:, -1] > tops.values).nonzero().squeeze(1)
    if idx.numel() == 0:
        return tops
    start = C[idx, :, -1] @ Y.T  # (len(idx), D)

    def matvec(v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return ws.matvec(v, rows=idx if rows is None else idx[rows])

    again = block_top_eigenpairs_lanczos(matvec, idx.numel(), ws.D, tol=tol * WHITEN_WARM_TOL, steps=steps,
                                         max_steps=max_steps, start=start, min_steps=WARM_MIN_STEPS, report_tol=tol,
                                         scale=float(tops.values.abs().max()))
    better = again.values > tops.values[idx]
    rows = idx[better]
    tops.values[rows] = again.values[better]
    tops.vectors[rows] = again.vectors[better]
    tops.residuals[rows] = again.residuals[better]
    tops.converged[rows] = again.converged[better]
    tops.work += again.work * idx.numel() / tops.values.numel()
    tops.iterations = max(tops.iterations, again.iterations)
    return tops


def whitened_block_tops(
    stat: SiteStatistic, M: torch.Tensor, ridge: float = 1e-6, tol: float = 1e-4, steps: int = 24,
    max_steps: int = 400, seed: int = 0,
) -> BlockTops:
    """Top generalised eigenpair (mu_r, v_r) of (Q_r, M) for every block, v_r^T M v_r = 1.

    Through one Cholesky factor M = L L^T shared by all rows: y_r = L^T v_r is the top eigenvector of
    A_r = L^{-1} Q_r L^{-T}. Dense blocks (:func:`block_tops`' rule): batched ``eigh`` of A_r; otherwise the
    batched matrix-free Lanczos on A (:class:`_WhitenedBlocks`), never forming a block.

    Args:
        stat: a site statistic (R blocks of size D).
        M: (D, D) input second moment; ``ridge * trace(M) / D`` is added to its diagonal (conditioning:
            a constant input coordinate, e.g. a dead ReLU unit, makes M singular).
        tol, steps, max_steps: as in :func:`block_tops` (residuals and convergence refer to A_r and y_r).
        seed: seed of the start vectors (the subspace's range finder and any random part).

    Returns:
        :class:`~topotransfer.eigen.BlockTops` with values mu (R,) and vectors v (R, D) of unit M-norm (sign-fixed).
    """
    L = _cholesky(M, ridge)
    if _densify(stat):
        Q = (stat.Q if isinstance(stat, DenseStatistic) else stat.dense()).to(L)
        Q = 0.5 * (Q + Q.transpose(1, 2))
        D = Q.shape[-1]
        Lb = L.expand(Q.shape[0], D, D)
        # A_r = L^{-1} Q_r L^{-T}: two triangular solves (A_r is symmetric)
        X = torch.linalg.solve_triangular(Lb, Q, upper=False)  # L^{-1} Q_r
        A = torch.linalg.solve_triangular(Lb, X.transpose(1, 2), upper=False).transpose(1, 2)  # (L^{-1} (L^{-1} Q_r)^T)^T
        tops = _dense_tops(A)
    else:
        # whitened samples cached once (MatrixFreeStatistic.whitened), else L^{-1}, L^{-T} around each product
        ws = stat.whitened(L) if hasattr(stat, "whitened") else None
        op = ws.matvec if ws is not None else _WhitenedBlocks(stat, L).matvec
        start = None if ws is None else _starts(ws, seed)  # Ritz vectors of the whitened blocks A_r in a shared subspace
        # (+ WHITEN_START_MIX * the solver's seeded random unit vector); a tighter tolerance because a start's lower
        # pairs can converge first (WHITEN_WARM_TOL); then the rows whose top pair is the inputs' null direction, which
        # a Krylov space grown from the span of the samples never reaches, are solved again from there
        tops = block_top_eigenpairs_lanczos(op, stat.R, stat.D, tol=tol if start is None else tol * WHITEN_WARM_TOL,
                                            steps=steps, max_steps=max_steps, start=start, start_mix=WHITEN_START_MIX,
                                            min_steps=_min_steps(start), report_tol=tol, seed=seed)
        if start is not None:
            tops = _null_space_check(ws, tops, _null_direction(M, L, ridge), tol, steps, max_steps)
    v = torch.linalg.solve_triangular(L.T, tops.vectors.T, upper=True).T  # v_r = L^{-T} y_r: unit M-norm
    tops.vectors = fix_signs(v.contiguous())
    return tops


def whitened_block_top_eigenpairs(
    stat: SiteStatistic, M: torch.Tensor, ridge: float = 1e-6, steps: int = 24, tol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """mu (R,) and vectors (R, D) of :func:`whitened_block_tops`, without the convergence record."""
    tops = whitened_block_tops(stat, M, ridge=ridge, tol=tol, steps=steps)
    return tops.values, tops.vectors


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


def _warn_unconverged(site: str, tops: BlockTops, what: str) -> None:
    """ConvergenceWarning naming the site and the rows whose residual missed the tolerance."""
    rows = tops.missed()
    if not rows:
        return
    scale = float(tops.values.abs().max().clamp_min(1e-300))
    shown = ", ".join(str(r) for r in rows[:20]) + (f", ... ({len(rows)} rows)" if len(rows) > 20 else "")
    warnings.warn(
        f"Row-wise {what} eigen-solve at site {site!r} did not converge for rows [{shown}]: largest relative residual "
        f"{float(tops.residuals.max()) / scale:.2e} > tol {tops.tol:.1e} after {tops.iterations} Lanczos steps; "
        "those rows' directions (and lambda_r) may be inaccurate",
        ConvergenceWarning,
        stacklevel=3,
    )


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
    score: str = "lambda_max",
    max_steps: int = 400,
    max_cache_bytes: int | None = None,
) -> list[SiteResult]:
    """Like :func:`~topotransfer.derivative.topological.topological_derivative`, with the row-wise rule.

    One pass over ``data`` accumulates every site's statistic (summed over the processes of
    ``accelerator``, so every rank gets the same direction); each block's top eigenpair (:func:`block_tops`)
    gives lambda_max(Q_t) = max_r lambda_r and the direction of :func:`rowwise_direction`.

    ``whiten=True`` uses the generalised eigenpairs of (Q_r, M_t) (module docstring); M_t comes from the
    statistic itself when it holds every sample exactly (:meth:`~.statistics.SiteStatistic.second_moment`),
    else from one more forward pass over ``data``.

    ``score``: what ranks the sites (``SiteResult.score``, ``score_kind``): "lambda_max" (TD_t =
    lambda_max(Q_t), the default) or "quadratic" (theta^T Q_t theta of the direction returned, i.e. the
    predicted decrease J(0) - J(eps) ~ eps^2/2 theta^T Q theta of the layer actually inserted, for the
    normalisation of this rule). Both numbers are recorded in every result (``lambda_max``, ``quadratic``).

    Convergence (matrix-free statistics): a site where some rows missed ``tol`` warns
    (:class:`~topotransfer.errors.ConvergenceWarning`, naming the site and the rows) and has ``converged=False``.

    Returns:
        One :class:`SiteResult` per site in depth order; ``eigenvalues`` holds the R per-block top
        eigenvalues behind the direction (descending): lambda_r, or mu_r when whitened; ``k`` the rows that
        start active, ``quadratic`` theta^T Q theta, ``lambda_max`` lambda_max(Q_t).
    """
    if score not in SCORE_KINDS:
        raise ValueError(f"Unknown score {score!r}; choose one of {SCORE_KINDS}")
    site_list, stats, layers, _ = compute_site_statistics(
        model, data, loss_fn, sites, accelerator=accelerator, solver=solver, progress=progress,
        sample_fraction=sample_fraction, max_samples_per_batch=max_samples_per_batch, max_cache_bytes=max_cache_bytes,
    )
    moments: dict[str, torch.Tensor] = {}
    if whiten:
        moments = {s.name: stats[s.name].second_moment() for s in site_list}
        if any(m is None for m in moments.values()):  # subsampled rows or a lossy cache: a pass of its own
            moments = input_second_moments(model, data, site_list, layers, accelerator)
    device = next(model.parameters()).device
    out = []
    for s in site_list:
        st, layer = stats[s.name], layers[s.name]
        if whiten:
            # rows: generalised eigenvectors; their mu_r > 0 exactly where lambda_r > 0 (same inertia)
            wt = whitened_block_tops(st, moments[s.name], tol=tol, max_steps=max_steps)
            _warn_unconverged(s.name, wt, "whitened ")
            converged = wt.all_converged
            theta, k, quad = rowwise_direction(wt.values, wt.vectors, weighting)
            vals = wt.values  # the per-row values behind the direction: mu_r
            if _densify(st):
                lam = float(block_tops(st).values.max())
                # rows have unit M-norm and sum_r a_r^2 = 1: the mean-square pre-activation is 1
                quad = st.quadratic(theta[:, : layer.in_features], theta[:, layer.in_features] if st.bias else None)
            else:
                # lambda_max(Q_t) alone (the per-row lambda_r are not needed): the pruned top-1 solve, started
                # from the plain blocks' subspace Ritz vectors (1 - 3 products instead of ~5 from random vectors);
                # theta^T Q theta = sum_r a_r^2 mu_r exactly, with mu_r the Rayleigh quotients v_r^T Q_r v_r (unit
                # M-norm v_r) from the solver's final product.
                start = _starts(st)
                eig = solve_site(st, num_eigenvalues=1, tol=tol, site=s.name, start=start,
                                 first_checks=(4, 6) if start is None else WARM_FIRST_CHECKS)
                lam, converged = float(eig.values[0]), converged and eig.converged
        else:
            tops = block_tops(st, tol=tol, max_steps=max_steps)
            _warn_unconverged(s.name, tops, "")
            converged = tops.all_converged
            vals = tops.values
            theta, k, quad = rowwise_direction(vals, tops.vectors, weighting)
            lam = float(vals.max())
        theta = theta.to(device)
        out.append(
            SiteResult(
                site=s.name,
                index=s.index,
                score=lam if score == "lambda_max" else quad,
                eigenvalues=vals.sort(descending=True).values,
                weight=theta[:, : layer.in_features].contiguous(),
                bias=theta[:, layer.in_features].contiguous() if st.bias else None,
                k=k,
                quadratic=quad,
                num_samples=st.count,
                solver="dense" if isinstance(st, DenseStatistic) else "matrix_free",
                converged=converged,
                layer_config=layer.config(),
                row_scores=vals,
                score_kind=score,
                lambda_max=lam,
            )
        )
    if not math.isfinite(sum(r.score for r in out)):
        raise FloatingPointError("Non-finite topological derivative in the row-wise rule")
    return out


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def probe_cache_cap(probe) -> int | None:
    """Bytes the matrix-free probe cache may hold: ``probe.max_cache_gb`` when set (0: no cap), else half of
    the memory available when the probe starts (``None`` where that is unknown)."""
    gb = getattr(probe, "max_cache_gb", None)
    if gb is not None:
        return None if gb == 0 else int(gb * 1e9)
    avail = available_memory_bytes()
    return None if avail is None else avail // 2


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
    (grow, adapt, derivative) goes through here, so a rule means the same in all of them. The score that ranks
    the sites is ``probe.score``: "quadratic" (default), theta^T Q_t theta of the direction the rule inserts
    (its predicted decrease J(0) - J(eps) ~ eps^2/2 theta^T Q_t theta), or TD_t = lambda_max(Q_t), the decrease
    of the best unit direction, which only the top1 rule inserts (there the two are the same number). Every
    result records both (``SiteResult.score_kind`` says which is ``score``).
    ``sites=None`` probes ``probe.sites`` (blocks | sublayers | all; sites inside blocks that already hold a
    layer are left out).
    """
    if sites is None and getattr(probe, "sites", "blocks") != "blocks":
        from .surgery import get_family

        family = get_family(model)
        taken = {name for name, _, _ in family.inside_layers(model)}
        sites = [s.name for s in family.sites(model, probe.sites) if s.name not in taken]
    common = dict(accelerator=accelerator, solver=probe.solver, tol=probe.tol, progress=progress,
                  sample_fraction=probe.sample_fraction, max_samples_per_batch=probe.max_samples_per_batch,
                  score=getattr(probe, "score", "quadratic"), max_cache_bytes=probe_cache_cap(probe))
    if probe.rule == "rowwise":
        return rowwise_site_results(model, data, loss_fn, sites=sites, weighting=probe.row_weighting,
                                    whiten=probe.whiten, **common)
    return topological_derivative(model, data, loss_fn, sites=sites, rule=probe.rule, c=probe.c, k=probe.k, **common)
