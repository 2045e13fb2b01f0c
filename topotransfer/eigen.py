"""Eigen-solvers for the block-diagonal second-order operator Q of a site (METHOD.md sections 3-4).

Q = blockdiag(Q_1, ..., Q_R), each Q_r a symmetric, generally *indefinite* D x D block. We need the
largest algebraic eigenvalues over all blocks and their eigenvectors; an eigenvector of block r is
row r of the direction theta = vec_rows([Phi | beta]) (zeros in every other row).

- :func:`dense_top_eigenpairs`: ``torch.linalg.eigh`` on the (R, D, D) blocks, exact.
- :func:`lanczos_top_eigenpairs`: matrix-free batched Lanczos on all R blocks at once with full
  re-orthogonalisation and explicit restarts; needs only ``matvec(V) = Q V`` for V of shape
  (R, D, 1), so Q is never formed (two GEMMs per step when Q comes from cached samples).
- :func:`select_direction`: the initialisation rules "top1", "cluster", "topk".

Signs are fixed deterministically (largest-|entry| positive), so every process and rerun inserts
the same layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "EigenResult",
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
    """

    values: torch.Tensor
    rows: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool = True
    iterations: int = 0


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


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor, j: int) -> torch.Tensor:
    """The (R, j, j) Lanczos tridiagonal matrices from alpha (R, k) and beta (R, k)."""
    a, b = alpha[:, :j], beta[:, : j - 1]
    return torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)


def _ritz(basis, alpha, beta, j: int, D: int, num: int, tol: float):
    """Top ``num`` Ritz pairs over all blocks after j steps, their residuals, and whether all converged."""
    theta, S = torch.linalg.eigh(_tridiagonal(alpha, beta, j))  # (R, j), (R, j, j) ascending
    # Residual of Ritz pair i in block r: |beta_j| * |last component of s_i| (exact for Lanczos).
    res = beta[:, j - 1, None].abs() * S[:, -1, :].abs()
    if j == D:
        res = torch.zeros_like(res)  # the Krylov space is the whole space: Ritz pairs are exact
    order = torch.topk(theta.reshape(-1), min(num, theta.numel()), sorted=True).indices
    rows, cols = order // j, order % j
    vals = theta.reshape(-1)[order]
    vecs = torch.einsum("mdk,mk->md", basis[rows][:, :, :j], S[rows, :, cols])  # (m, D)
    flat = res.reshape(-1)[order]
    converged = bool((flat <= tol * vals.abs().max().clamp_min(1e-300)).all())
    return vals, rows, vecs, flat, converged


def lanczos_top_eigenpairs(
    matvec: Callable[[torch.Tensor], torch.Tensor],
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
) -> EigenResult:
    """Top eigenpairs of blockdiag(Q_1..Q_R) by batched Lanczos, given only ``matvec``.

    Every block runs its own Lanczos recurrence; all R products of a step go through one ``matvec``
    call (V of shape (R, D, 1)), which for cached samples is two GEMMs. Full re-orthogonalisation
    keeps the basis orthogonal (steps are few); a breakdown (invariant subspace found) restarts the
    block's recurrence from a fresh vector orthogonal to its basis, so no spurious Ritz value appears.
    After ``steps`` steps the Ritz pairs are checked; if the top ``num`` (over all blocks) have
    residual > ``tol * max|lambda|``, Lanczos restarts from the sum of each block's leading Ritz vectors.

    Args:
        matvec: (R, D, m) -> (R, D, m), the block-wise product with Q.
        num_blocks: R.
        dim: D.
        num: number of eigenpairs wanted (over all blocks).
        steps: Lanczos steps per cycle (capped at D; with steps = D the result is exact).
        tol: relative residual tolerance ||Q_r v - lambda v|| <= tol * max|lambda|. The eigenvalue error is
            about residual^2 / gap, so 1e-4 already gives lambda_max to ~1e-8 relative; a tolerance below
            the products' precision (float32: ~1e-6) cannot be met and only costs restarts.
        check_every: test convergence every this many steps and stop early.
        max_restarts: restart cycles after the first.
        dtype: working precision of the recurrence (float64 recommended; products may be float32).
        seed: seed of the deterministic start vectors (identical on every process).

    Returns:
        :class:`EigenResult` with ``converged`` telling whether the tolerance was met.
    """
    R, D = num_blocks, dim
    k = max(1, min(steps, D))
    v0 = _orthonormal_start(R, D, dtype, torch.device(device), seed)
    total = 0
    for cycle in range(max_restarts + 1):
        basis = torch.zeros(R, D, k + 1, dtype=dtype, device=device)
        alpha = torch.zeros(R, k, dtype=dtype, device=device)
        beta = torch.zeros(R, k, dtype=dtype, device=device)
        basis[:, :, 0] = v0
        for j in range(k):
            v = basis[:, :, j]
            w = matvec(v.unsqueeze(-1)).squeeze(-1).to(dtype)
            total += 1
            alpha[:, j] = (w * v).sum(1)
            w = w - alpha[:, j, None] * v
            if j > 0:
                w = w - beta[:, j - 1, None] * basis[:, :, j - 1]
            for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough")
                Vj = basis[:, :, : j + 1]
                w = w - torch.einsum("rdk,rk->rd", Vj, torch.einsum("rdk,rd->rk", Vj, w))
            b = torch.linalg.vector_norm(w, dim=1)
            scale = alpha[:, : j + 1].abs().amax(1).clamp_min(1e-300)
            broke = b <= 1e-10 * scale
            if j + 1 < k and bool(broke.any()):
                # Invariant subspace: continue with a fresh direction orthogonal to the basis; beta = 0
                # decouples T, so the new Ritz values are genuine eigenvalues of the block.
                fresh = _orthonormal_start(R, D, dtype, torch.device(device), seed + 1000 + j + 7919 * cycle)
                Vj = basis[:, :, : j + 1]
                for _ in range(2):
                    fresh = fresh - torch.einsum("rdk,rk->rd", Vj, torch.einsum("rdk,rd->rk", Vj, fresh))
                fresh = fresh / torch.linalg.vector_norm(fresh, dim=1, keepdim=True).clamp_min(1e-300)
                b = torch.where(broke, torch.zeros_like(b), b)
                w = torch.where(broke[:, None], fresh, w / b.clamp_min(1e-300)[:, None])
            else:
                w = w / b.clamp_min(1e-300)[:, None]
            beta[:, j] = b
            basis[:, :, j + 1] = w
            if check_every and (j + 1) % check_every == 0 and j + 1 < k:
                # Stop early once the wanted Ritz pairs have converged (they usually do long before k).
                got = _ritz(basis, alpha, beta, j + 1, D, num, tol)
                if got[4]:
                    vals, rows, vecs, flat, _ = got
                    vecs = vecs / torch.linalg.vector_norm(vecs, dim=1, keepdim=True)
                    return EigenResult(vals.to(torch.float64), rows, fix_signs(vecs).to(torch.float64),
                                       flat.to(torch.float64), True, total)
        vals, rows, vecs, flat, converged = _ritz(basis, alpha, beta, k, D, num, tol)
        if converged or cycle == max_restarts:
            vecs = vecs / torch.linalg.vector_norm(vecs, dim=1, keepdim=True)
            return EigenResult(vals.to(torch.float64), rows, fix_signs(vecs).to(torch.float64),
                               flat.to(torch.float64), converged, total)
        # Explicit restart: per block, the sum of its leading Ritz vectors (most wanted pairs live there).
        lead = min(k, max(1, num))
        theta, S = torch.linalg.eigh(_tridiagonal(alpha, beta, k))
        ritz = torch.einsum("rdk,rkm->rdm", basis[:, :, :k], S)
        v0 = ritz[:, :, k - lead :].sum(-1)
        v0 = v0 / torch.linalg.vector_norm(v0, dim=1, keepdim=True).clamp_min(1e-300)
    raise AssertionError("unreachable")


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
