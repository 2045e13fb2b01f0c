"""Per-site second-order statistics of the topological derivative (docs/method.md sections 3-4).

Notation (one site):

    z_n  = layer input of sample n (token / pixel), zh_n = [z_n; 1] (bias included), length D
    p_nr = component r of the adjoint p_n = -dJ/dh_n, r = 1..R (R = d_out)
    Q_r  = sigma''(0) * sum_n p_nr zh_n zh_n^T       (D x D, one block per output row r)
    Q    = blockdiag_r Q_r,  J(eps) = J(0) - eps^2/2 theta^T Q theta + O(eps^3)

Two representations with one interface (``matvec``, ``update``, ``all_reduce``):

- :class:`DenseStatistic` streams the R blocks (memory R*D^2, cost N*R*D^2 per update).
- :class:`MatrixFreeStatistic` caches Zh (N x D) and P (N x R) and applies
  Q(V)[:, r] = Zh^T (P[:, r] * (Zh V[:, r])) for all r with two GEMMs (memory N*(D+R)).

Both are *sums* with a sample count: splitting the probe data into other batches or processes does
not change them, and duplicating the data doubles them.
"""

from __future__ import annotations

import torch

__all__ = ["DenseStatistic", "MatrixFreeStatistic", "SiteStatistic", "append_bias"]

SIGMA_SECOND_DERIVATIVE = 1.0  # sigma''(0) for sigma = 2 silu - tanh


def append_bias(z: torch.Tensor, bias: bool) -> torch.Tensor:
    """zh = [z, 1]: (N, d_in) -> (N, d_in + 1) when the layer has a bias, else z."""
    return torch.cat([z, torch.ones_like(z[:, :1])], dim=1) if bias else z


def _reduce_sum(t: torch.Tensor, accelerator: object | None) -> torch.Tensor:
    if accelerator is None or getattr(accelerator, "num_processes", 1) == 1:
        return t
    return accelerator.reduce(t.contiguous(), reduction="sum")


class SiteStatistic:
    """Common interface. ``R`` blocks of size ``D``; vectors are shaped (R, D, m)."""

    def __init__(self, out_features: int, in_features: int, bias: bool) -> None:
        self.R = out_features
        self.D = in_features + int(bias)
        self.bias = bias
        self.count = 0  # samples (tokens / pixels) represented, summed over processes after all_reduce
        self.num_rows = 0  # rows actually added (< count when rows were subsampled)

    def update(self, z: torch.Tensor, p: torch.Tensor, represents: int | None = None) -> None:
        """Add samples: z (N, d_in) layer inputs, p (N, R) adjoints.

        ``represents``: how many samples these rows stand for (subsampling: the caller has already scaled
        p by represents / N so that the sum stays an unbiased estimate); default N.
        """
        raise NotImplementedError

    def _counted(self, n: int, represents: int | None) -> None:
        self.num_rows += n
        self.count += n if represents is None else int(represents)

    def _reduce_counts(self, accelerator: object | None, device: torch.device | str) -> None:
        counts = _reduce_sum(torch.tensor([self.count, self.num_rows], device=device), accelerator)
        self.count, self.num_rows = (int(c) for c in counts.tolist())

    def matvec(self, v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Q applied block-wise: v (R, D, m) -> (R, D, m), (Q v)[r] = Q_r v[r].

        With ``rows`` (a LongTensor of block indices), v is (len(rows), D, m) and only those blocks are applied.
        """
        raise NotImplementedError

    def all_reduce(self, accelerator: object | None) -> None:
        """Sum over processes (a no-op for one process)."""
        raise NotImplementedError

    def second_moment(self) -> torch.Tensor | None:
        """M = (1/N) sum_n zh_n zh_n^T (D, D) float64 over the samples behind the statistic (summed over
        processes), or ``None`` when the statistic cannot give it exactly (rows were subsampled, or the
        cache is lossy): the whitened row-wise rule then takes M from a forward pass of its own."""
        return None

    def quadratic(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """theta^T Q theta for theta = rows of [weight | bias]; weight (R, d_in), bias (R,)."""
        theta = self.theta(weight, bias)
        return float((theta * self.matvec(theta.unsqueeze(-1)).squeeze(-1)).sum())

    def theta(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """[weight | bias] as (R, D) in float64."""
        w = weight.reshape(self.R, -1).to(torch.float64)
        if self.bias:
            b = torch.zeros(self.R, dtype=torch.float64) if bias is None else bias.reshape(self.R, 1).to(torch.float64)
            w = torch.cat([w, b.reshape(self.R, 1).to(w.device)], dim=1)
        return w


class DenseStatistic(SiteStatistic):
    """Accumulate the R dense blocks Q_r (R, D, D) in float64."""

    def __init__(self, out_features: int, in_features: int, bias: bool, device: torch.device | str = "cpu") -> None:
        super().__init__(out_features, in_features, bias)
        self.Q = torch.zeros(self.R, self.D, self.D, dtype=torch.float64, device=device)
        self.M = torch.zeros(self.D, self.D, dtype=torch.float64, device=device)  # sum_n zh_n zh_n^T

    def update(self, z: torch.Tensor, p: torch.Tensor, represents: int | None = None) -> None:
        zh = append_bias(z.to(torch.float64), self.bias)
        self.M += zh.T @ zh  # D^2 per row next to the blocks' R D^2: the whitened rule needs no extra pass
        p = p.to(torch.float64) * SIGMA_SECOND_DERIVATIVE
        n = zh.shape[0]
        # Q_r is symmetric: only its upper triangle i <= j is accumulated, as one GEMM over the packed products
        #   Q_r[i, j] += sum_n p_nr K_n,(ij),   K_n,(ij) = zh_ni zh_nj   ("nr,nk->rk", k = (i, j) with i <= j)
        # half the flops of the full blocks ("nr,ni,nj->rij"), and the temporary K is (D (D+1) / 2, N), built
        # by D contiguous row products, not an (N, R, D) tensor. Chunked over n so that K (about 2^19 elements,
        # 4 MB, at least 128 rows) stays in cache between being written and read by the GEMM: 1.7x faster than
        # one chunk of 2^24 elements at D = 65 on a CPU. The GEMM writes the (R, D (D+1) / 2) orientation,
        # P^T K^T: 1.6x faster than K P at R = 64, D = 65 (one thread; the same sums, rounded in another order).
        iu, ju = self._upper
        packed = torch.zeros(self.R, iu.numel(), dtype=torch.float64, device=self.Q.device)
        chunk = max(128, (1 << 19) // iu.numel())
        for n0 in range(0, n, chunk):
            zt = zh[n0 : n0 + chunk].T.contiguous()  # (D, n)
            K = torch.empty(iu.numel(), zt.shape[1], dtype=torch.float64, device=zt.device)
            start = 0
            for i in range(self.D):  # rows (i, i..D-1) of K: zh_i * zh_j for j >= i, in triu_indices order
                torch.mul(zt[i : i + 1], zt[i:], out=K[start : start + self.D - i])
                start += self.D - i
            packed.addmm_(p[n0 : n0 + chunk].T, K.T)
        self.Q[:, iu, ju] += packed
        self.Q[:, ju, iu] = self.Q[:, iu, ju]  # the lower triangle mirrors the upper one exactly
        self._counted(n, represents)

    @property
    def _upper(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices (i, j), i <= j, of a block's upper triangle (diagonal included)."""
        if getattr(self, "_upper_idx", None) is None:
            self._upper_idx = tuple(torch.triu_indices(self.D, self.D, device=self.Q.device))
        return self._upper_idx

    def matvec(self, v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        Q = self.Q if rows is None else self.Q[rows]
        return torch.bmm(Q, v.to(self.Q))

    def all_reduce(self, accelerator: object | None) -> None:
        self.Q = _reduce_sum(self.Q, accelerator)
        self.M = _reduce_sum(self.M, accelerator)
        self._reduce_counts(accelerator, self.Q.device)

    def second_moment(self) -> torch.Tensor | None:
        if self.num_rows != self.count or self.count == 0:
            return None
        return self.M / self.count


class MatrixFreeStatistic(SiteStatistic):
    """Cache Zh and P (any dtype); apply Q with two GEMMs per product, accumulating in float32 or better.

    The rows stay in the chunks they arrived in (no concatenated copy); a product loops over the chunks
    and sums. Chunks whose dtype is not the compute dtype (bfloat16 caches) are converted a slice of
    ``convert_rows`` rows at a time, so the GEMMs run and accumulate in float32 while the cache stays
    half the size and no float32 copy of the whole cache is ever made.

    Args:
        cache_dtype: dtype of the cached rows (float32 default; bfloat16 halves the memory).
        compute_dtype: dtype of the products (default float32, float64 for float64 caches).
    """

    convert_rows = 8192

    def __init__(
        self,
        out_features: int,
        in_features: int,
        bias: bool,
        cache_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(out_features, in_features, bias)
        self.cache_dtype = cache_dtype
        self.compute_dtype = compute_dtype or (torch.float64 if cache_dtype == torch.float64 else torch.float32)
        self._z: list[torch.Tensor] = []
        self._p: list[torch.Tensor] = []
        self._accelerator: object | None = None
        self._rows_key: torch.Tensor | None = None  # the last ``rows`` of matvec and P restricted to them
        self._p_rows: list[torch.Tensor] = []

    def update(self, z: torch.Tensor, p: torch.Tensor, represents: int | None = None) -> None:
        zh = torch.empty(z.shape[0], self.D, dtype=self.cache_dtype, device=z.device)
        zh[:, : z.shape[1]] = z  # one copy (with the dtype conversion), no concatenation
        if self.bias:
            zh[:, -1] = 1
        self._z.append(zh)
        self._p.append((p * SIGMA_SECOND_DERIVATIVE).to(self.cache_dtype))
        self._rows_key, self._p_rows = None, []
        self._counted(z.shape[0], represents)

    def nbytes(self) -> int:
        """Bytes held by the cached rows."""
        return sum(t.numel() * t.element_size() for t in (*self._z, *self._p))

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached rows (Zh, P) concatenated (a copy; for tests and inspection)."""
        return torch.cat(self._z), torch.cat(self._p)

    def _p_for(self, rows: torch.Tensor | None) -> list[torch.Tensor]:
        if rows is None:
            return self._p
        if self._rows_key is None or self._rows_key.shape != rows.shape or not torch.equal(self._rows_key, rows):
            self._rows_key = rows.clone()
            self._p_rows = [p[:, rows] for p in self._p]  # gathered once per active set, not per product
        return self._p_rows

    def matvec(self, v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Block-wise product; with ``rows`` (indices of blocks), v is (len(rows), D, m) for those blocks."""
        Rv, D, m = v.shape
        cd = self.compute_dtype
        out = torch.zeros(D, Rv * m, dtype=cd, device=v.device)
        if self._z:
            vf = v.to(cd).permute(1, 0, 2).reshape(D, Rv * m)  # column (r, i) = v[r, :, i]
            # Under a caller's bf16/fp16 autocast the float32 GEMMs would silently run in half precision.
            with torch.autocast(device_type=v.device.type, enabled=False):
                for zh, p in zip(self._z, self._p_for(rows), strict=True):
                    step = zh.shape[0] if zh.dtype == cd else self.convert_rows
                    for i in range(0, zh.shape[0], step):
                        zc, pc = zh[i : i + step].to(cd), p[i : i + step].to(cd)
                        # (Q v)[r, :, i] = Zh^T (P[:, r] * (Zh v[r, :, i]))
                        u = (zc @ vf).reshape(-1, Rv, m) * pc[:, :, None]  # (n, R, m)
                        out.addmm_(zc.T, u.reshape(-1, Rv * m))
        out = out.reshape(D, Rv, m).permute(1, 0, 2).contiguous()
        out = _reduce_sum(out, self._accelerator)
        return out.to(v.dtype)

    def upper_bounds(self) -> torch.Tensor:
        """Proven upper bounds of every block's largest eigenvalue, shape (R,), float64.

        Q_r = Zh^T diag(p_r) Zh <= Zh^T diag(max(p_r, 0)) Zh =: Q_r^+ in the Loewner order (the dropped part
        Zh^T diag(max(-p_r, 0)) Zh is positive semi-definite), and Q_r^+ is positive semi-definite, so

            lambda_max(Q_r) <= lambda_max(Q_r^+) <= trace(Q_r^+) = sum_n max(p_nr, 0) ||zh_n||^2.

        One pass over the cache (N*R flops, no GEMM with D); summed over processes like the products.
        """
        dev = self._z[0].device if self._z else getattr(self._accelerator, "device", "cpu")
        out = torch.zeros(self.R, dtype=torch.float64, device=dev)
        for zh, p in zip(self._z, self._p, strict=True):
            for i in range(0, zh.shape[0], self.convert_rows):
                sq = zh[i : i + self.convert_rows].to(torch.float64).square().sum(1)  # ||zh_n||^2, (n,)
                out += p[i : i + self.convert_rows].to(torch.float64).clamp_min(0).T @ sq  # sum_n p+_nr ||zh_n||^2
        return _reduce_sum(out, self._accelerator)

    def subspace_starts(self, k: int = 32, power: int = 1, seed: int = 0) -> torch.Tensor:
        """Start vectors for a per-block eigen-solve: the top Ritz vector of every block Q_r in one shared
        k-dimensional subspace U, (R, D) float64 with unit rows.

        U spans the top principal directions of the adjoint-weighted inputs,

            C = sum_n ||p_n||^2 zh_n zh_n^T     (D, D),

        i.e. where the samples with large adjoints put their inputs, which is where the blocks
        Q_r = sum_n p_nr zh_n zh_n^T have their large eigenvalues. U comes from a randomized range finder,
        U = orth(C^(power+1) G) with a seeded Gaussian G (D, k): (power + 1) passes of 4 N D k flops. The
        projected blocks B_r = U^T Q_r U = sum_n p_nr y_n y_n^T, y_n = U^T zh_n (k,), come from one GEMM over
        the packed products of y (their upper triangle, k (k+1) / 2 x N) with P (N x R) (:meth:`projected_blocks`):
        about k^2 / (8 D) of one product with all blocks (a third at k = 32, D = 769); then a batched ``eigh`` of
        the R (k, k) blocks. Summed over processes like the products, so every rank gets the same vectors.

        Only a start: the solver iterates until its residual test passes, whatever the start.
        """
        dev = self._z[0].device if self._z else getattr(self._accelerator, "device", "cpu")
        cd = self.compute_dtype
        k = max(1, min(k, self.D))
        g = torch.Generator(device="cpu").manual_seed(seed)
        X = torch.randn(self.D, k, generator=g, dtype=torch.float64).to(device=dev, dtype=cd)
        with torch.autocast(device_type=dev.type if isinstance(dev, torch.device) else str(dev), enabled=False):
            for _ in range(power + 1):
                CX = torch.zeros(self.D, k, dtype=cd, device=dev)
                for zh, p in zip(self._z, self._p, strict=True):
                    for i in range(0, zh.shape[0], self.convert_rows):
                        zc, pc = zh[i : i + self.convert_rows].to(cd), p[i : i + self.convert_rows].to(cd)
                        w = pc.square().sum(1, keepdim=True)  # ||p_n||^2, (n, 1)
                        CX.addmm_(zc.T, w * (zc @ X))  # C X = Zh^T diag(||p_n||^2) Zh X
                CX = _reduce_sum(CX, self._accelerator)
                X = torch.linalg.qr(CX.to(torch.float64))[0].to(cd)  # orthonormal columns: the next U
        # ascending: the last column is each block's top Ritz vector in U. float32 is plenty for a start vector
        # and the batched eigh of many small blocks is a loop over LAPACK calls, 1.4x faster than in float64.
        _, S = torch.linalg.eigh(self.projected_blocks(X).to(torch.float32))
        starts = S[:, :, -1].to(torch.float64) @ X.to(torch.float64).T  # (R, D) = s_r^T U^T
        return starts / torch.linalg.vector_norm(starts, dim=1, keepdim=True).clamp_min(1e-300)

    def projected_blocks(self, X: torch.Tensor) -> torch.Tensor:
        """The blocks projected on the columns of X (D, k): B_r = X^T Q_r X = sum_n p_nr y_n y_n^T with
        y_n = X^T zh_n (k,), shape (R, k, k) in the compute dtype.

        One GEMM over the packed products of y (their upper triangle, k (k+1) / 2 x N) with P (N x R): about
        k^2 / (8 D) of one product with all blocks. Summed over processes like the products.
        """
        dev = self._z[0].device if self._z else getattr(self._accelerator, "device", "cpu")
        cd = self.compute_dtype
        k = X.shape[1]
        X = X.to(device=dev, dtype=cd)
        iu, ju = torch.triu_indices(k, k, device=dev)
        packed = torch.zeros(iu.numel(), self.R, dtype=cd, device=dev)
        with torch.autocast(device_type=dev.type if isinstance(dev, torch.device) else str(dev), enabled=False):
            for zh, p in zip(self._z, self._p, strict=True):
                for i in range(0, zh.shape[0], self.convert_rows):
                    y = zh[i : i + self.convert_rows].to(cd) @ X  # (n, k): y_n = X^T zh_n
                    # B_r[a, b] += sum_n y_na y_nb p_nr over the upper triangle a <= b
                    packed.addmm_((y[:, iu] * y[:, ju]).T, p[i : i + self.convert_rows].to(cd))
        packed = _reduce_sum(packed, self._accelerator)
        B = torch.zeros(self.R, k, k, dtype=cd, device=dev)
        B[:, iu, ju] = packed.T
        B[:, ju, iu] = packed.T
        return B

    def second_moment(self) -> torch.Tensor | None:
        lossless = self.cache_dtype in (torch.float32, torch.float64)
        if self.num_rows != self.count or self.count == 0 or not lossless:
            return None
        dev = self._z[0].device if self._z else getattr(self._accelerator, "device", "cpu")
        total = torch.zeros(self.D, self.D, dtype=torch.float64, device=dev)
        for zh in self._z:  # one chunk per probe batch, as a forward pass would sum them
            zh64 = zh.to(torch.float64)
            total += zh64.T @ zh64
        return _reduce_sum(total, self._accelerator) / self.count

    def whitened(self, L: torch.Tensor) -> MatrixFreeStatistic:
        """The statistic of the whitened samples L^{-1} zh_n (L lower triangular, (D, D)): its blocks are
        A_r = L^{-1} Q_r L^{-T} = sum_n p_nr (L^{-1} zh_n)(L^{-1} zh_n)^T.

        The rows are transformed once in float64 and cached in this statistic's dtype (one triangular solve,
        N D^2 flops, about a quarter of a product); products with A are then as accurate as products with Q.
        Applying L^{-T} and L^{-1} around every float32 product instead amplifies its rounding by the condition
        number of M, which is ~1e6 - 1e15 for transformer tokens. The adjoints are shared, not copied.
        """
        out = MatrixFreeStatistic(self.R, self.D - int(self.bias), self.bias, self.cache_dtype, self.compute_dtype)
        L64 = L.to(torch.float64)
        for zh in self._z:
            zt = torch.linalg.solve_triangular(L64.to(zh.device), zh.to(torch.float64).T, upper=False).T
            out._z.append(zt.to(self.cache_dtype))
        out._p = self._p
        out.count, out.num_rows, out._accelerator = self.count, self.num_rows, self._accelerator
        return out

    def all_reduce(self, accelerator: object | None) -> None:
        self._accelerator = accelerator  # products are summed lazily, one all-reduce per matvec
        # A rank with an empty shard has no cached rows: reduce on the accelerator's device (NCCL needs CUDA).
        dev = self._z[0].device if self._z else getattr(accelerator, "device", "cpu")
        self._reduce_counts(accelerator, dev)

    def dense(self) -> torch.Tensor:
        """The dense blocks (R, D, D) in float64 (for tests and small widths only)."""
        eye = torch.eye(self.D, dtype=torch.float64).expand(self.R, self.D, self.D)
        return self.matvec(eye.contiguous().to(torch.float64))
