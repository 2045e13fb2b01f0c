"""Per-site second-order statistics of the topological derivative (METHOD.md sections 3-4).

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
        self.count = 0  # samples (tokens / pixels) seen, summed over processes after all_reduce

    def update(self, z: torch.Tensor, p: torch.Tensor) -> None:
        """Add samples: z (N, d_in) layer inputs, p (N, R) adjoints."""
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Q applied block-wise: v (R, D, m) -> (R, D, m), (Q v)[r] = Q_r v[r]."""
        raise NotImplementedError

    def all_reduce(self, accelerator: object | None) -> None:
        """Sum over processes (a no-op for one process)."""
        raise NotImplementedError

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

    def update(self, z: torch.Tensor, p: torch.Tensor) -> None:
        zh = append_bias(z.to(torch.float64), self.bias)
        p = p.to(torch.float64) * SIGMA_SECOND_DERIVATIVE
        n = zh.shape[0]
        # Q_r += sum_n p_nr zh_ni zh_nj  ("nr,ni,nj->rij"), chunked over r so the (N, r, D) product stays small.
        chunk = max(1, (1 << 24) // max(1, n * self.D))
        for r0 in range(0, self.R, chunk):
            pz = p[:, r0 : r0 + chunk, None] * zh[:, None, :]  # (N, rc, D)
            self.Q[r0 : r0 + chunk] += torch.einsum("nri,nj->rij", pz, zh)
        self.count += n

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.Q, v.to(self.Q))

    def all_reduce(self, accelerator: object | None) -> None:
        self.Q = _reduce_sum(self.Q, accelerator)
        self.count = int(_reduce_sum(torch.tensor([self.count], device=self.Q.device), accelerator).item())


class MatrixFreeStatistic(SiteStatistic):
    """Cache Zh and P (any dtype); apply Q with two GEMMs per product, accumulating in float32 or better.

    Args:
        cache_dtype: dtype of the cached rows (float32 default; bfloat16 halves the memory).
        accelerator: when given, every :meth:`matvec` sums the products over processes, so each
            process holds only its shard of the probe data.
    """

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

    def update(self, z: torch.Tensor, p: torch.Tensor) -> None:
        self._z.append(append_bias(z, self.bias).to(self.cache_dtype))
        self._p.append((p * SIGMA_SECOND_DERIVATIVE).to(self.cache_dtype))
        self.count += z.shape[0]

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._z) > 1:  # concatenate once so each product is two large GEMMs
            self._z, self._p = [torch.cat(self._z)], [torch.cat(self._p)]
        return self._z[0], self._p[0]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        R, D, m = v.shape
        if not self._z:
            out = torch.zeros(R, D, m, dtype=self.compute_dtype, device=v.device)
        else:
            zh, p = self._rows()
            zh, p = zh.to(self.compute_dtype), p.to(self.compute_dtype)
            vf = v.to(self.compute_dtype).permute(1, 0, 2).reshape(D, R * m)  # column (r, i) = v[r, :, i]
            # Under a caller's bf16/fp16 autocast the float32 GEMMs would silently run in half precision.
            with torch.autocast(device_type=zh.device.type, enabled=False):
                # (Q v)[r, :, i] = Zh^T (P[:, r] * (Zh v[r, :, i]))
                u = (zh @ vf).reshape(-1, R, m) * p[:, :, None]  # (N, R, m)
                out = (zh.T @ u.reshape(-1, R * m)).reshape(D, R, m).permute(1, 0, 2)
        out = _reduce_sum(out.contiguous(), self._accelerator)
        return out.to(v.dtype)

    def all_reduce(self, accelerator: object | None) -> None:
        self._accelerator = accelerator  # products are summed lazily, one all-reduce per matvec
        # A rank with an empty shard has no cached rows: reduce on the accelerator's device (NCCL needs CUDA).
        dev = self._z[0].device if self._z else getattr(accelerator, "device", "cpu")
        self.count = int(_reduce_sum(torch.tensor([self.count], device=dev), accelerator).item())

    def dense(self) -> torch.Tensor:
        """The dense blocks (R, D, D) in float64 (for tests and small widths only)."""
        eye = torch.eye(self.D, dtype=torch.float64).expand(self.R, self.D, self.D)
        return self.matvec(eye.contiguous().to(torch.float64))
