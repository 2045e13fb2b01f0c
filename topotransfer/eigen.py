"""Eigen-solvers for the block-diagonal second-order operator Q of a site (docs/method.md sections 3-4).

Q = blockdiag(Q_1, ..., Q_R), each Q_r a symmetric, generally *indefinite* D x D block. We need the
largest algebraic eigenvalues over all blocks and their eigenvectors; an eigenvector of block r is
row r of the direction theta = vec_rows([Phi | beta]) (zeros in every other row).

- :func:`dense_top_eigenpairs`: ``torch.linalg.eigh`` on the (R, D, D) blocks, exact.
- :func:`lanczos_top_eigenpairs`: matrix-free batched Lanczos on all R blocks at once with full
  re-orthogonalisation and explicit restarts; needs only ``matvec(V) = Q V`` for V of shape
  (R, D, 1), so Q is never formed (two GEMMs per step when Q comes from cached samples). Blocks that
  cannot hold one of the wanted top eigenpairs stop iterating after a few steps (pruning), so the
  later products cost a fraction of a full one.
- :func:`block_top_eigenpairs_lanczos`: the top eigenpair of *every* block at once (the row-wise rule),
  matrix-free: one batched Lanczos recurrence per block, all blocks' products in one ``matvec`` call,
  converged blocks leave the batch, a final product checks every returned pair's true residual.
- :func:`select_direction`: the initialisation rules "top1", "cluster", "topk".

Signs are fixed deterministically (largest-|entry| positive), so every process and rerun inserts
the same layer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "BlockTops",
    "EigenResult",
    "block_top_eigenpairs_lanczos",
    "dense_top_eigenpairs",
    "fix_signs",
    "lanczos_top_eigenpairs",
    "select_direction",
]

RULES = ("top1", "cluster", "topk")


@dataclass
class EigenResult:
    """Top eigenpairs of a block-diagonal Q, largest algebraic first.

    Attributes:
        values: (m,) eigenvalues, descending, float64.
        rows: (m,) block index r of each eigenvector.
        vectors: (m, D) unit eigenvectors of their block, sign-fixed.
        residuals: (m,) ||Q_r v - lambda v|| (0 for the dense solver up to rounding).
        converged: whether every residual met the tolerance.
        iterations: Lanczos steps taken (0 for the dense solver).
        work: products computed, in units of one product with all R blocks (less than ``iterations``
            when blocks were pruned).
    """

    values: torch.Tensor
    rows: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool = True
    iterations: int = 0
    work: float = 0.0


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry (first one on ties) is positive. (m, D) -> (m, D)."""
    idx = vectors.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vectors.gather(1, idx))
    sign[sign == 0] = 1
    return vectors * sign


def _top_of(values: torch.Tensor, vectors: torch.Tensor, num: int) -> tuple[torch.Tensor, ...]:
    """values (R, k), vectors (R, D, k) -> the ``num`` largest over all blocks: values, rows, vectors (m, D)."""
    R, k = values.shape
    m = min(num, R * k)
    # Stable order: by value descending, then by (row, column) so that equal values order deterministically.
    top = torch.topk(values.reshape(-1), m, sorted=True)
    rows, cols = top.indices // k, top.indices % k
    vecs = vectors[rows, :, cols]
    return top.values, rows, vecs


def dense_top_eigenpairs(Q: torch.Tensor, num: int = 32) -> EigenResult:
    """Exact top ``num`` eigenpairs of blockdiag(Q), Q of shape (R, D, D), via batched ``eigh`` in float64."""
    Q64 = Q.to(torch.float64)
    Q64 = 0.5 * (Q64 + Q64.transpose(1, 2))  # symmetric up to rounding already; make it exact for eigh
    values, vectors = torch.linalg.eigh(Q64)  # ascending, (R, D) and (R, D, D)
    vals, rows, vecs = _top_of(values, vectors, num)
    vecs = fix_signs(vecs)
    res = torch.linalg.vector_norm(torch.einsum("mij,mj->mi", Q64[rows], vecs) - vals[:, None] * vecs, dim=1)
    return EigenResult(vals, rows, vecs, res, True, 0)


def _orthonormal_start(R: int, D: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(R, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return v / torch.linalg.vector_norm(v, dim=1, keepdim=True)


def _start_vectors(
    R: int, D: int, dtype: torch.dtype, device: torch.device, seed: int, start: torch.Tensor | None,
    start_mix: float = 0.0,
) -> torch.Tensor:
    """Unit start vectors (R, D): ``start`` + ``start_mix`` x the seeded random vectors, normalised per block (a
    zero row falls back to the seeded random vector), or the seeded random vectors."""
    if start is None:
        return _orthonormal_start(R, D, dtype, device, seed)
    if start.shape != (R, D):
        raise ValueError(f"start must have shape ({R}, {D}), got {tuple(start.shape)}")
    st = start.to(device=device, dtype=dtype)
    if start_mix:
        st = st + start_mix * _orthonormal_start(R, D, dtype, device, seed)
    nrm = torch.linalg.vector_norm(st, dim=1, keepdim=True)
    if bool((nrm > 0).all()):
        return st / nrm
    return torch.where(nrm > 0, st / nrm.clamp_min(1e-300), _orthonormal_start(R, D, dtype, device, seed))


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor, j: int) -> torch.Tensor:
    """The (R, j, j) Lanczos tridiagonal matrices from alpha (R, k) and beta (R, k)."""
    a, b = alpha[:, :j], beta[:, : j - 1]
    return torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)


def _ritz(alpha: torch.Tensor, beta: torch.Tensor, j: int, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz values theta (R, j) ascending, eigenvectors S (R, j, j) of T_j, and residuals (R, j).

    The residual of Ritz pair i of block r is |beta_j| * |last component of s_i| (exact for Lanczos).
    """
    theta, S = torch.linalg.eigh(_tridiagonal(alpha, beta, j))
    res = beta[:, j - 1, None].abs() * S[:, -1, :].abs()
    if j == D:
        res = torch.zeros_like(res)  # the Krylov space is the whole space: Ritz pairs are exact
    return theta, S, res


def _accepts_rows(matvec: Callable) -> bool:
    """Whether ``matvec`` takes a ``rows=`` keyword (products for a subset of the blocks only)."""
    try:
        return "rows" in inspect.signature(matvec).parameters
    except (TypeError, ValueError):
        return False


def _project_out(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w - V (V^T w) per block: basis (R, j, D) with orthonormal rows, w (R, D)."""
    h = torch.bmm(basis, w.unsqueeze(-1))  # (R, j, 1)
    return w - torch.bmm(basis.transpose(1, 2), h).squeeze(-1)


def _reorthogonalize(basis: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Full re-orthogonalisation: one classical Gram-Schmidt pass, and a second one for the blocks whose
    norm dropped below 1/sqrt(2) of its value (Daniel-Gragg-Kaufman-Stewart criterion, as in ARPACK)."""
    before = torch.linalg.vector_norm(w, dim=1)
    w = _project_out(basis, w)
    again = torch.linalg.vector_norm(w, dim=1) < 0.7071 * before
    if bool(again.any()):
        if bool(again.all()):
            w = _project_out(basis, w)
        else:
            idx = again.nonzero().squeeze(1)
            w = w.clone()
            w[idx] = _project_out(basis[idx], w[idx])
    return w


def _active_products(
    matvec: Callable[..., torch.Tensor], R: int, D: int, dtype: torch.dtype, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``apply(v, act)``: the products Q_r v_r for the active blocks ``act`` only, v of shape (len(act), D).

    All blocks: one ``matvec``; a ``matvec`` taking ``rows=``: only the active blocks' products; otherwise the
    inactive blocks get zero vectors in a full product (the same result, at the full cost).
    """
    with_rows = _accepts_rows(matvec)

    def apply(v: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        if act.numel() == R:
            return matvec(v.unsqueeze(-1)).squeeze(-1).to(dtype)
        if with_rows:
            return matvec(v.unsqueeze(-1), rows=act).squeeze(-1).to(dtype)
        full = torch.zeros(R, D, 1, dtype=v.dtype, device=device)
        full[act, :, 0] = v
        return matvec(full).squeeze(-1)[act].to(dtype)

    return apply


def _keep_blocks(
    basis: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, keep: torch.Tensor, j: int, cap: int, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop the Lanczos recurrences of the blocks not in ``keep`` (indices into the active blocks).

    basis (Ra, cap + 1, D), alpha / beta (Ra, cap) hold ``j`` steps; the survivors keep them, and the memory the
    dropped blocks freed (``budget`` basis vectors in all) lets them run a longer Krylov space: the new capacity
    is ``max(cap, min(D, budget // survivors - 1))``.
    """
    D = basis.shape[-1]
    cap_new = max(cap, min(D, budget // keep.numel() - 1))
    new_basis = basis.new_empty(keep.numel(), cap_new + 1, D)
    new_basis[:, : j + 1] = basis[keep, : j + 1]
    new_alpha, new_beta = alpha.new_zeros(keep.numel(), cap_new), beta.new_zeros(keep.numel(), cap_new)
    new_alpha[:, :j], new_beta[:, :j] = alpha[keep, :j], beta[keep, :j]
    return new_basis, new_alpha, new_beta, cap_new


def lanczos_top_eigenpairs(
    matvec: Callable[..., torch.Tensor],
    num_blocks: int,
    dim: int,
    num: int = 32,
    steps: int = 48,
    tol: float = 1e-4,
    max_restarts: int = 20,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    check_every: int = 8,
    prune: bool = True,
    first_checks: tuple[int, ...] = (4, 6),
    prune_after: int = 6,
    prune_margin: float = 2.0,
    upper_bounds: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> EigenResult:
    """Top eigenpairs of blockdiag(Q_1..Q_R) by batched Lanczos, given only ``matvec``.

    Every block runs its own Lanczos recurrence; all products of a step go through one ``matvec``
    call (V of shape (R, D, 1)), which for cached samples is two GEMMs. Full re-orthogonalisation
    keeps the basis orthogonal; a breakdown (invariant subspace found) continues the block's
    recurrence from a fresh vector orthogonal to its basis, so no spurious Ritz value appears.

    Block pruning (``prune=True``): only the top ``num`` eigenpairs over *all* blocks are wanted, and
    most blocks hold none of them. At every convergence test, L = the ``num``-th largest Ritz value seen
    over all blocks is a lower bound of the ``num``-th largest eigenvalue (Ritz values never exceed the
    eigenvalues they approximate, Cauchy interlacing). From step ``prune_after`` on, a block whose top
    Ritz value theta_1 plus ``prune_margin`` * |beta_j| lies below L stops iterating (theta_1 + |beta_j| is
    the Zhou-Li estimate of an upper bound of the block's largest eigenvalue; it is not a proven bound,
    hence the margin: on ViT and MLP statistics (lambda_max - theta_1) / |beta_j| was at most 0.86 at
    step 6 and 0.57 at step 8, but up to 3.9 at step 4). A pruned block's top Ritz pair is kept for the
    record. The products of the next steps cost only (active blocks / R) of a full one (``matvec`` is
    called with ``rows=`` when it accepts that keyword), and the basis memory freed lets the active
    blocks run a longer Krylov space before any restart. ``prune=False`` iterates every block.

    Proven bounds (``upper_bounds``, shape (R,), e.g. :meth:`MatrixFreeStatistic.upper_bounds`): a block whose
    bound lies below L cannot hold a wanted eigenpair, so it is dropped at the first convergence test already
    (before ``prune_after``, without any margin); with ``prune=True`` the Zhou-Li test above still applies
    from ``prune_after`` on. The bound must be valid (lambda_max(Q_r) <= upper_bounds[r]); it is compared with
    a relative slack of 1e-6 for the rounding of float32 products.

    The basis holds at most R * (steps + 1) vectors of length D. When the active blocks reach their
    Krylov dimension without converging, Lanczos restarts them from the sum of their leading Ritz vectors.

    Args:
        matvec: (R, D, m) -> (R, D, m), the block-wise product with Q; optionally
            ``matvec(v, rows=idx)`` with v of shape (len(idx), D, m) for the blocks ``idx`` only.
        num_blocks: R.
        dim: D.
        num: number of eigenpairs wanted (over all blocks).
        steps: Lanczos steps per cycle while all blocks are active (capped at D; with steps = D the result
            is exact); after pruning the cycle grows to the same basis memory.
        tol: relative residual tolerance ||Q_r v - lambda v|| <= tol * max|lambda|. The eigenvalue error is
            about residual^2 / gap, so 1e-4 already gives lambda_max to ~1e-8 relative; a tolerance below
            the products' precision (float32: ~1e-6) cannot be met and only costs restarts.
        max_restarts: restart cycles after the first.
        dtype: working precision of the recurrence (float64 recommended; products may be float32).
        seed: seed of the deterministic start vectors (identical on every process).
        check_every: test convergence (and prune) every this many steps and stop early.
        prune: stop iterating blocks that cannot hold a wanted eigenpair (see above).
        first_checks: extra early steps at which convergence is tested (cheap: R small tridiagonal eighs).
        prune_after: first step at which blocks may be pruned.
        prune_margin: safety factor on |beta_j| in the pruning test.
        upper_bounds: (R,) proven upper bounds of each block's largest eigenvalue (see above), or ``None``.
        start: (R, D) start vector of every block's recurrence (e.g. Ritz vectors from a shared subspace,
            :meth:`~topotransfer.derivative.statistics.MatrixFreeStatistic.subspace_starts`; normalised here, a zero
            row falls back to the seeded random vector), or ``None`` for the seeded random vectors.

    Returns:
        :class:`EigenResult` with ``converged`` telling whether the tolerance was met.
    """
    R, D = num_blocks, dim
    dev = torch.device(device)
    k0 = max(1, min(steps, D))
    budget = R * (k0 + 1)  # basis vectors of length D held at once
    want = max(1, num)
    bounds = None
    if upper_bounds is not None:
        bounds = upper_bounds.to(device=dev, dtype=torch.float64).reshape(-1)
        if bounds.numel() != R:
            raise ValueError(f"upper_bounds must have one entry per block ({R}), got {bounds.numel()}")
        bounds = bounds + 1e-6 * bounds.abs()  # slack for the rounding of the (float32) products

    apply = _active_products(matvec, R, D, dtype, dev)

    # Pruned blocks: their top Ritz pair (value, residual, block, vector).
    fr_vals = torch.zeros(0, dtype=dtype, device=dev)
    fr_res = torch.zeros(0, dtype=dtype, device=dev)
    fr_rows = torch.zeros(0, dtype=torch.long, device=dev)
    fr_vecs = torch.zeros(0, D, dtype=dtype, device=dev)
    lower = -math.inf  # running lower bound of the num-th largest eigenvalue
    act = torch.arange(R, device=dev)
    v0 = _start_vectors(R, D, dtype, dev, seed, start)
    total, work = 0, 0.0
    for cycle in range(max_restarts + 1):
        Ra = act.numel()
        cap = max(1, min(D, budget // Ra - 1))
        basis = torch.empty(Ra, cap + 1, D, dtype=dtype, device=dev)  # rows of block r: its Lanczos vectors
        alpha = torch.zeros(Ra, cap, dtype=dtype, device=dev)
        beta = torch.zeros(Ra, cap, dtype=dtype, device=dev)
        basis[:, 0] = v0
        j = 0
        while j < cap:
            v = basis[:, j]
            w = apply(v, act)
            total += 1
            work += Ra / R
            alpha[:, j] = (w * v).sum(1)
            w = w - alpha[:, j, None] * v
            if j > 0:
                w = w - beta[:, j - 1, None] * basis[:, j - 1]
            w = _reorthogonalize(basis[:, : j + 1], w)
            b = torch.linalg.vector_norm(w, dim=1)
            scale = alpha[:, : j + 1].abs().amax(1).clamp_min(1e-300)
            broke = b <= 1e-10 * scale
            if j + 1 < cap and bool(broke.any()):
                # Invariant subspace: continue with a fresh direction orthogonal to the basis; beta = 0
                # decouples T, so the new Ritz values are genuine eigenvalues of the block.
                fresh = _orthonormal_start(R, D, dtype, dev, seed + 1000 + j + 7919 * cycle)[act]
                for _ in range(2):
                    fresh = _project_out(basis[:, : j + 1], fresh)
                fresh = fresh / torch.linalg.vector_norm(fresh, dim=1, keepdim=True).clamp_min(1e-300)
                b = torch.where(broke, torch.zeros_like(b), b)
                w = torch.where(broke[:, None], fresh, w / b.clamp_min(1e-300)[:, None])
            else:
                w = w / b.clamp_min(1e-300)[:, None]
            beta[:, j] = b
            basis[:, j + 1] = w
            j += 1
            if not (j == cap or j in first_checks or (check_every and j % check_every == 0)):
                continue
            theta, S, res = _ritz(alpha, beta, j, D)
            vals = torch.cat([theta.reshape(-1), fr_vals])
            m = min(want, vals.numel())
            order = torch.topk(vals, m, sorted=True).indices
            if vals.numel() >= want:
                lower = max(lower, float(vals[order[-1]]))
            flat = torch.cat([res.reshape(-1), fr_res])[order]
            converged = bool((flat <= tol * vals[order].abs().max().clamp_min(1e-300)).all())
            if converged or (j == cap and cycle == max_restarts):
                return _finish(vals[order], flat, order, basis, S, act, j, fr_rows, fr_vecs, converged, total, work)
            if j == cap:
                break
            heuristic = prune and j >= prune_after
            if Ra > 1 and lower > -math.inf and (heuristic or bounds is not None):
                keep = torch.ones(Ra, dtype=torch.bool, device=dev)
                if heuristic:
                    upper = theta[:, -1] + (prune_margin * beta[:, j - 1].abs() if j < D else 0.0)
                    keep &= upper >= lower
                if bounds is not None:
                    # Proven: lambda_max(Q_r) <= bound_r < L <= (num-th largest eigenvalue), no margin needed.
                    keep &= bounds[act].to(dtype) >= lower
                if not bool(keep.all()) and bool(keep.any()):
                    drop = (~keep).nonzero().squeeze(1)
                    top_vec = torch.bmm(S[drop, :, -1].unsqueeze(1), basis[drop, :j]).squeeze(1)
                    fr_vals = torch.cat([fr_vals, theta[drop, -1]])
                    fr_res = torch.cat([fr_res, res[drop, -1]])
                    fr_rows = torch.cat([fr_rows, act[drop]])
                    fr_vecs = torch.cat([fr_vecs, top_vec])
                    kept = keep.nonzero().squeeze(1)
                    act = act[kept]
                    Ra = act.numel()
                    basis, alpha, beta, cap = _keep_blocks(basis, alpha, beta, kept, j, cap, budget)
        # Explicit restart: per block, the sum of its leading Ritz vectors (most wanted pairs live there).
        lead = min(j, want)
        v0 = torch.bmm(S[:, :, j - lead :].sum(-1).unsqueeze(1), basis[:, :j]).squeeze(1)
        v0 = v0 / torch.linalg.vector_norm(v0, dim=1, keepdim=True).clamp_min(1e-300)
    raise AssertionError("unreachable")


def _finish(vals, res, order, basis, S, act, j, fr_rows, fr_vecs, converged, total, work) -> EigenResult:
    """Assemble the result from the selected (active Ritz or pruned) pairs."""
    j_cols = S.shape[-1]
    n_active = act.numel() * j_cols
    vecs = torch.empty(order.numel(), basis.shape[-1], dtype=basis.dtype, device=basis.device)
    rows = torch.empty(order.numel(), dtype=torch.long, device=basis.device)
    is_act = order < n_active
    if bool(is_act.any()):
        o = order[is_act]
        blk, col = o // j_cols, o % j_cols
        vecs[is_act] = torch.bmm(S[blk, :, col].unsqueeze(1), basis[blk, :j]).squeeze(1)
        rows[is_act] = act[blk]
    if bool((~is_act).any()):
        o = order[~is_act] - n_active
        vecs[~is_act] = fr_vecs[o]
        rows[~is_act] = fr_rows[o]
    vecs = vecs / torch.linalg.vector_norm(vecs, dim=1, keepdim=True)
    return EigenResult(
        vals.to(torch.float64), rows, fix_signs(vecs).to(torch.float64), res.to(torch.float64), converged, total, work
    )


def select_direction(
    result: EigenResult,
    num_blocks: int,
    rule: str = "cluster",
    c: float = 0.5,
    k: int | None = None,
) -> tuple[torch.Tensor, int, float]:
    """Build the initial direction theta from the top eigenpairs.

    - ``"top1"``: the top eigenvector (unit Frobenius norm); k = 1.
    - ``"cluster"``: sum of the eigenvectors with lambda_i >= (1 - c) lambda_1 (first author's rule);
      k = their count. Only the top eigenvector when lambda_1 <= 0.
    - ``"topk"``: sum of the top ``k`` eigenvectors.

    Eigenvectors are Q-orthogonal and unit, so theta^T Q theta = sum of the chosen lambda_i.

    Returns:
        theta (R, D) float64, the number k of directions summed, and theta^T Q theta.
    """
    if rule not in RULES:
        raise ValueError(f"Unknown rule {rule!r}; choose one of {RULES}")
    if not 0.0 <= c <= 1.0:
        raise ValueError(f"cluster constant c must lie in [0, 1], got {c}")
    vals = result.values
    if rule == "top1" or vals[0] <= 0:
        n = 1
    elif rule == "cluster":
        n = int((vals >= (1.0 - c) * vals[0]).sum())
    else:
        if k is None or k < 1:
            raise ValueError(f"rule='topk' needs k >= 1, got {k}")
        if k > vals.numel():
            raise ValueError(f"rule='topk' with k={k} but only {vals.numel()} eigenpairs were computed")
        n = k
    theta = torch.zeros(num_blocks, result.vectors.shape[1], dtype=torch.float64, device=result.vectors.device)
    theta.index_add_(0, result.rows[:n], result.vectors[:n].to(torch.float64))
    return theta, n, float(vals[:n].sum())


@dataclass
class BlockTops:
    """The top (largest algebraic) eigenpair of every block Q_r, r = 1..R.

    Attributes:
        values: (R,) lambda_r, float64. From the matrix-free solver: the Rayleigh quotient v_r^T Q_r v_r of the
            returned vector, computed by the final product (so theta^T Q theta of any direction built from the
            rows is exactly sum_r a_r^2 values[r] up to the products' rounding).
        vectors: (R, D) unit v_r, float64, sign-fixed.
        residuals: (R,) ||Q_r v_r - lambda_r v_r|| from that final product (0 for dense ``eigh`` up to rounding).
        converged: (R,) bool, residual <= tol * (the block's own size, see
            :func:`block_top_eigenpairs_lanczos`).
        tol: the relative tolerance used.
        iterations: Lanczos steps of the longest-running block (0 for dense ``eigh``).
        work: products computed, in units of one product with all R blocks (including the final check).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    tol: float = 0.0
    iterations: int = 0
    work: float = 0.0

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def missed(self) -> list[int]:
        """Blocks (rows) whose residual missed the tolerance."""
        return [int(i) for i in (~self.converged).nonzero().flatten()]


def block_top_eigenpairs_lanczos(
    matvec: Callable[..., torch.Tensor],
    num_blocks: int,
    dim: int,
    tol: float = 1e-4,
    steps: int = 24,
    max_steps: int = 400,
    check_every: int = 4,
    min_steps: int = 8,
    floor: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    seed: int = 0,
    start: torch.Tensor | None = None,
    start_mix: float = 0.0,
    report_tol: float | None = None,
    scale: float = 0.0,
) -> BlockTops:
    """Top eigenpair of every block of blockdiag(Q_1..Q_R) by batched Lanczos, given only ``matvec``.

    Each block runs its own Lanczos recurrence (full re-orthogonalisation); the R products of a step are one
    ``matvec`` call, which for cached samples is two GEMMs over Zh (N x D) and P (N x R):
    Q(V)[r] = Zh^T (P[:, r] * (Zh V[r])) -- the same cost as one product with the whole site.

    Every ``check_every`` steps (from ``min_steps`` on) each block's top Ritz pair (theta_r, y_r) is tested: its
    residual ||Q_r y_r - theta_r y_r|| = |beta_j| |last component of the Ritz vector| (exact for Lanczos).
    Blocks with residual <= ``tol`` * rho_r leave the batch, rho_r = the block's own size (its largest |Ritz
    value|), clipped to [``floor``, 1] * max_r |lambda_r| (below the floor a float32 product cannot resolve the
    block; the cap keeps every lambda_r within ``tol`` of the site's largest, since a Ritz value lies within
    its residual of an eigenvalue). A tolerance relative to the block itself, not to the site's largest
    block, decides the sign of small lambda_r (which rows the row-wise rule activates) and makes it unlikely
    that a block stops on its second eigenvalue before the first has emerged; ``min_steps`` serves the same
    purpose (a residual test after very few steps can pass on a lower Ritz pair). The products of the
    remaining blocks cost (active / R) of a full one (``matvec(v, rows=idx)`` when it accepts ``rows``). The
    basis memory that the converged blocks free goes to the remaining ones (longer Krylov spaces, up to D);
    a block still unconverged when its space is full restarts from its top Ritz vector. A Lanczos breakdown
    (invariant subspace; e.g. Q_r = 0 for an output row without adjoint) makes the Ritz pair exact.

    The eigenvalue error of a pair with residual rho is at most rho^2 / gap (gap to the block's next
    eigenvalue), so ``tol`` = 1e-4 gives lambda_r to about 1e-8 relative when the gap is not tiny.

    Truthful report: after the iteration, one more product with all R blocks computes every returned vector's
    Rayleigh quotient (the value returned) and true residual; ``converged[r]`` compares that residual, not the
    recurrence's estimate, with the tolerance.

    Args:
        matvec: (R, D, m) -> (R, D, m); optionally ``matvec(v, rows=idx)`` with v of shape (len(idx), D, m).
        num_blocks, dim: R and D.
        tol: relative residual tolerance (relative to each block's own size, see above).
        steps: Krylov dimension per block while all blocks are active (capped at D).
        max_steps: Lanczos steps per block in total (restarts included) before giving up on a block.
        check_every: convergence test interval.
        min_steps: no block stops before this many steps (unless its Krylov space is exhausted).
        floor: smallest block size considered, relative to max_r |lambda_r|.
        dtype: precision of the recurrence (products may be float32).
        seed: seed of the deterministic start vectors.
        start: (R, D) start vectors (see :func:`lanczos_top_eigenpairs`), or ``None`` for seeded random ones. A
            start close to the top eigenvector converges in a few steps; ``min_steps`` still applies.
        start_mix: weight of the seeded random unit vector added to every row of ``start`` before it is
            normalised (0: ``start`` alone). A start built from a subspace can be nearly orthogonal to a block's
            top eigenvector; the random part keeps a component on it, so the recurrence cannot settle on a
            lower pair that the residual test would accept.
        report_tol: tolerance of the final true-residual check (``converged``, ``BlockTops.tol``); default ``tol``.
            A caller may iterate to a tighter ``tol`` than it needs (a safety margin against stopping on a lower
            Ritz pair) without reporting a block as unconverged that meets the tolerance it asked for.
        scale: a known lower bound of max_r |lambda_r| over the whole site (default 0: only the blocks solved here).
            It caps and floors every block's size like the running max of the blocks' own Ritz values; a caller
            that solves a subset of a site's blocks (e.g. rows restarted from another start) passes the site's
            scale, so that blocks whose eigenvalues all lie near 0 are not held to a tolerance relative to ~0.

    Returns:
        :class:`BlockTops`.
    """
    R, D = num_blocks, dim
    dev = torch.device(device)
    k0 = max(1, min(steps, D))
    budget = R * (k0 + 1)

    apply = _active_products(matvec, R, D, dtype, dev)

    vecs = torch.zeros(R, D, dtype=dtype, device=dev)
    radius = torch.zeros(R, dtype=dtype, device=dev)
    scale = max(0.0, float(scale))  # running max |theta| over all blocks (only grows: Ritz values approach eigenvalues
    # from below)
    act = torch.arange(R, device=dev)
    v0 = _start_vectors(R, D, dtype, dev, seed, start, start_mix)
    used = torch.zeros(R, dtype=torch.long, device=dev)  # steps taken per block
    work = 0.0
    while act.numel() > 0:
        Ra = act.numel()
        cap = max(1, min(D, max(k0, budget // Ra - 1)))
        basis = torch.empty(Ra, cap + 1, D, dtype=dtype, device=dev)
        alpha = torch.zeros(Ra, cap, dtype=dtype, device=dev)
        beta = torch.zeros(Ra, cap, dtype=dtype, device=dev)
        basis[:, 0] = v0
        j = 0
        while j < cap:
            v = basis[:, j]
            w = apply(v, act)
            work += Ra / R
            used[act] += 1
            alpha[:, j] = (w * v).sum(1)
            w = w - alpha[:, j, None] * v
            if j > 0:
                w = w - beta[:, j - 1, None] * basis[:, j - 1]
            w = _reorthogonalize(basis[:, : j + 1], w)
            b = torch.linalg.vector_norm(w, dim=1)
            size = alpha[:, : j + 1].abs().amax(1).clamp_min(1e-300)
            broke = b <= 1e-10 * size  # invariant subspace: beta = 0 makes the Ritz pairs exact
            b = torch.where(broke, torch.zeros_like(b), b)
            beta[:, j] = b
            basis[:, j + 1] = torch.where(broke[:, None], torch.zeros_like(w), w / b.clamp_min(1e-300)[:, None])
            j += 1
            out_of_steps = used[act] >= max_steps
            if not (j == cap or (j >= min_steps and j % check_every == 0) or bool(broke.any())
                    or bool(out_of_steps.any())):
                continue
            theta, S, res = _ritz(alpha, beta, j, D)
            top, res_top = theta[:, -1], res[:, -1]
            res_top = torch.where(beta[:, j - 1] == 0, torch.zeros_like(res_top), res_top)
            scale = max(scale, float(top.abs().max()))
            # the block's own size: its largest |Ritz value| (both ends converge first), floored for blocks ~ 0
            radius[act] = torch.maximum(theta[:, -1].abs(), theta[:, 0].abs()).clamp(floor * scale, scale)
            done = (res_top <= tol * radius[act]) | out_of_steps | (beta[:, j - 1] == 0)
            if j == cap and not bool(done.all()):
                # Krylov space full: keep the top Ritz pair of every block (the restart vector of the others)
                y = torch.bmm(S[:, :, -1].unsqueeze(1), basis[:, :j]).squeeze(1)
                vecs[act] = y
                v0 = y[~done]
                v0 = v0 / torch.linalg.vector_norm(v0, dim=1, keepdim=True).clamp_min(1e-300)
                act = act[~done]
                break
            if bool(done.any()):
                idx = done.nonzero().squeeze(1)
                y = torch.bmm(S[idx, :, -1].unsqueeze(1), basis[idx, :j]).squeeze(1)
                vecs[act[idx]] = y
                keep = (~done).nonzero().squeeze(1)
                act = act[keep]
                if act.numel() == 0:
                    break
                Ra = act.numel()
                basis, alpha, beta, cap = _keep_blocks(basis, alpha, beta, keep, j, cap, budget)
    vecs = vecs / torch.linalg.vector_norm(vecs, dim=1, keepdim=True).clamp_min(1e-300)
    vecs = fix_signs(vecs)
    # Truthful check: Rayleigh quotients and true residuals of the returned vectors, one product for all blocks.
    qv = apply(vecs, torch.arange(R, device=dev))
    work += 1.0
    values = (qv * vecs).sum(1)
    residuals = torch.linalg.vector_norm(qv - values[:, None] * vecs, dim=1)
    top_scale = max(float(values.abs().max()), scale)
    radius = torch.maximum(radius, values.abs()).clamp(floor * top_scale, top_scale)
    check = tol if report_tol is None else report_tol
    converged = residuals <= check * radius
    return BlockTops(values.to(torch.float64), vecs.to(torch.float64), residuals.to(torch.float64), converged,
                     check, int(used.max()) if R else 0, work)
