"""The inserted layer of the method (``docs/method.md`` section 2).

Notation::

    u      state entering the new layer, shape (..., d) (MLP state or transformer token) or (B, C, H, W)
    z      norm(u): identity, LayerNorm without affine, or the k x k im2col patch for convolutions
    W, b   weight (d_out, d_in) and bias (d_out) of the layer
    g      = u + sigma(W z + b)
    sigma  = 2 * silu - tanh, so sigma(0) = 0, sigma'(0) = 0, sigma''(0) = 1

With W = 0 and b = 0 the layer returns ``u + 0``, which is bit-identical to ``u``: inserting a zero
layer leaves the network's function unchanged. Because sigma'(0) = 0 the first-order change of the
loss vanishes and the loss change is second order in the weights (the topological derivative).

Each layer also knows how to turn a captured state and its adjoint into the sample matrices used by
the derivative (:meth:`TopoLayer.samples`): rows are samples (batch x tokens, or batch x pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS", "LowRankTopoLayer", "TopoConv2d", "TopoLayer", "build_topo_layer", "lowrank_from_rows", "topo_activation",
]

_NORMS = (None, "layernorm")


def topo_activation(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = 2 silu(x) - tanh(x) = x^2/2 + x^3/3 - x^4/24 + O(x^5); sigma(0) = sigma'(0) = 0, sigma''(0) = 1.

    Args:
        x: any shape.

    Returns:
        Tensor of the same shape.
    """
    return 2.0 * F.silu(x) - torch.tanh(x)


#: Activations a TopoLayer may use. Only "topo" (sigma'(0) = 0) has the topological derivative; "tanh"
#: gives the trainable identity insertion of the Net2DeeperNet baseline (tanh'(0) = 1, so a zero layer
#: still receives gradients, whereas a zero "topo" layer does not).
ACTIVATIONS = {"topo": topo_activation, "tanh": torch.tanh}


class _ResidualTopoBase(nn.Module):
    """What every inserted layer shares: the activation registry and setting the direction (W, b)."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _set_activation(self, activation: str) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__} activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    @torch.no_grad()
    def set_direction(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Set W from ``weight`` (d_out, d_in), or the layer's own weight shape, and b from (d_out,)."""
        self.weight.copy_(weight.reshape(self.weight.shape))
        if self.bias is not None:
            self.bias.copy_(torch.zeros_like(self.bias) if bias is None else bias.reshape(self.bias.shape))


class TopoLayer(_ResidualTopoBase):
    """Residual layer ``g = u + sigma(W norm(u) + b)`` acting on the last dimension.

    Zero-initialised it is an exact identity. It works on any ``(..., dim)`` tensor: MLP states
    ``(B, d)`` and transformer tokens ``(B, L, d)`` alike (tokens act as extra samples).

    Args:
        dim: feature dimension d (input and output).
        bias: whether the layer has a bias b.
        norm: ``None`` (z = u, as in the method's MLPs) or ``"layernorm"`` (LayerNorm without affine
            parameters, for transformer residual streams).
        eps: LayerNorm epsilon.
        activation: key of :data:`ACTIVATIONS` ("topo" for every layer the derivative reasons about).
    """

    def __init__(
        self, dim: int, bias: bool = True, norm: str | None = None, eps: float = 1e-6, activation: str = "topo"
    ) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"TopoLayer dim must be positive, got {dim}")
        if norm not in _NORMS:
            raise ValueError(f"TopoLayer norm must be one of {_NORMS}, got {norm!r}")
        self._set_activation(activation)
        self.dim = dim
        self.norm = norm
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    # -- the layer ------------------------------------------------------------------------------
    def normalize(self, u: torch.Tensor) -> torch.Tensor:
        """z = norm(u), shape (..., dim)."""
        if self.norm == "layernorm":
            return F.layer_norm(u, (self.dim,), eps=self.eps)
        return u

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Args: u (..., dim). Returns: g (..., dim) = u + sigma(W z + b)."""
        return u + self._act(F.linear(self.normalize(u), self.weight, self.bias))

    @property
    def in_features(self) -> int:
        """d_in: the length of z (without the bias coordinate)."""
        return self.dim

    @property
    def out_features(self) -> int:
        """d_out: number of rows of W (one block of Q per row)."""
        return self.dim

    def config(self) -> dict:
        """Constructor arguments, for manifests and re-building the layer."""
        return {
            "type": "linear",
            "dim": self.dim,
            "bias": self.bias is not None,
            "norm": self.norm,
            "eps": self.eps,
            "activation": self.activation,
        }

    # -- what the derivative needs ----------------------------------------------------------------
    def samples(self, u: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flatten a captured state and its adjoint into per-sample rows.

        Args:
            u: state at the site, shape (..., dim).
            p: adjoint -dJ/du, same shape.

        Returns:
            Z of shape (N, d_in) with z_n = norm(u_n), and P of shape (N, d_out), N = prod(leading dims).
        """
        z = self.normalize(u)
        return z.reshape(-1, self.dim), p.reshape(-1, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bias={self.bias is not None}, norm={self.norm}, activation={self.activation}"


class TopoConv2d(_ResidualTopoBase):
    """Residual convolution ``g = u + sigma(conv(u, W) + b)`` on (B, C, H, W) states.

    W has shape (C, C, k, k) and acts on the k x k patch of all channels ("same" zero padding), so
    z_n is the im2col patch of pixel n (length C*k*k) and every pixel is a sample. The flattened
    weight (C, C*k*k) uses the channel-major ordering of :func:`torch.nn.functional.unfold`.

    Args:
        channels: C (input and output channels).
        kernel_size: k, odd.
        bias: whether the layer has a bias.
        activation: key of :data:`ACTIVATIONS`.
    """

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True, activation: str = "topo") -> None:
        super().__init__()
        if channels <= 0:
            raise ValueError(f"TopoConv2d channels must be positive, got {channels}")
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"TopoConv2d kernel_size must be a positive odd number, got {kernel_size}")
        self._set_activation(activation)
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(channels, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Args: u (B, C, H, W). Returns: g (B, C, H, W)."""
        return u + self._act(F.conv2d(u, self.weight, self.bias, padding=self.kernel_size // 2))

    @property
    def in_features(self) -> int:
        return self.channels * self.kernel_size**2

    @property
    def out_features(self) -> int:
        return self.channels

    def config(self) -> dict:
        return {
            "type": "conv2d",
            "channels": self.channels,
            "kernel_size": self.kernel_size,
            "bias": self.bias is not None,
            "activation": self.activation,
        }

    def samples(self, u: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel rows: Z (B*H*W, C*k*k) im2col patches, P (B*H*W, C) adjoints."""
        k = self.kernel_size
        patches = F.unfold(u, k, padding=k // 2)  # (B, C*k*k, H*W), channel-major like weight.reshape(C, -1)
        z = patches.transpose(1, 2).reshape(-1, self.in_features)
        return z, p.permute(0, 2, 3, 1).reshape(-1, self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


class LowRankTopoLayer(_ResidualTopoBase):
    """Rank-k residual layer ``g = u + U sigma(V z + c)`` on the last dimension (docs/method.md section 10).

    Shapes: V = ``weight`` (k, d), c = ``bias`` (k,), U = ``up`` (d, k); k(2d + 1) parameters with the bias
    instead of d(d + 1). With theta_j = [v_j | c_j] = eps * [phi_j | beta_j] and U fixed, ``sigma(0) =
    sigma'(0) = 0`` and ``sigma''(0) = 1`` give

        J(eps) = J(0) - eps^2/2 sum_j phi_hat_j^T Q(u_j) phi_hat_j + O(eps^3),   Q(u) = sum_r u_r Q_r,

    with Q_r the full layer's per-row blocks: the same statistics serve both layers. A one-hot column
    u_j = e_r makes term j the full layer's row r, so the top-k rows of the eigenproblem initialise it
    (:func:`lowrank_from_rows`). V = 0 (any U) is an exact identity.

    Args:
        dim: d (input and output).
        rank: k >= 1.
        bias: whether the inner pre-activation has a bias c.
        norm, eps, activation: as for :class:`TopoLayer`.
    """

    def __init__(
        self, dim: int, rank: int, bias: bool = True, norm: str | None = None, eps: float = 1e-6,
        activation: str = "topo",
    ) -> None:
        super().__init__()
        if dim <= 0 or rank <= 0:
            raise ValueError(f"LowRankTopoLayer dim and rank must be positive, got dim={dim}, rank={rank}")
        if norm not in _NORMS:
            raise ValueError(f"LowRankTopoLayer norm must be one of {_NORMS}, got {norm!r}")
        self._set_activation(activation)
        self.dim, self.rank, self.norm, self.eps = dim, rank, norm, eps
        self.weight = nn.Parameter(torch.zeros(rank, dim))
        self.bias = nn.Parameter(torch.zeros(rank)) if bias else None
        self.up = nn.Parameter(torch.zeros(dim, rank))

    normalize = TopoLayer.normalize
    samples = TopoLayer.samples

    @classmethod
    def like(cls, layer: TopoLayer, rank: int) -> LowRankTopoLayer:
        """A zero rank-``rank`` layer for the site a full ``layer`` fits (same d, bias, norm, eps, activation)."""
        return cls(layer.dim, rank, bias=layer.bias is not None, norm=layer.norm, eps=layer.eps,
                   activation=layer.activation)

    def num_parameters(self) -> int:
        """k (2d + 1) with the bias, k * 2d without."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Args: u (..., d). Returns: g (..., d) = u + U sigma(V z + c)."""
        return u + F.linear(self._act(F.linear(self.normalize(u), self.weight, self.bias)), self.up)

    @torch.no_grad()
    def set_up(self, up: torch.Tensor) -> None:
        """Set U from ``up`` (d, k)."""
        self.up.copy_(up.reshape(self.up.shape))

    @property
    def in_features(self) -> int:
        """d: the length of z; the derivative's statistics are the full layer's (d rows of d + 1)."""
        return self.dim

    @property
    def out_features(self) -> int:
        return self.dim

    def config(self) -> dict:
        return {"type": "lowrank", "dim": self.dim, "rank": self.rank, "bias": self.bias is not None,
                "norm": self.norm, "eps": self.eps, "activation": self.activation}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, bias={self.bias is not None}, norm={self.norm}, activation={self.activation}"


def lowrank_from_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, rows: list[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A full-layer direction restricted to ``rows``, as a rank-k layer's (U, V, c).

    Row r of the full direction [Phi | beta] becomes term j: u_j = e_r, [v_j | c_j] = [Phi_r | beta_r] / s, with
    s = the norm of the kept rows (the restricted direction has unit Frobenius norm, like the full one).
    Its quadratic is then sum_j [v_j|c_j]^T Q_{r_j} [v_j|c_j] (the full layer's kept rows, rescaled).

    Args:
        weight: (d, d) full direction Phi; bias: (d,) beta or ``None``; rows: k distinct row indices.

    Returns:
        up (d, k) one-hot columns, weight (k, d), bias (k,) or ``None``; float64.
    """
    idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if idx.numel() == 0 or idx.unique().numel() != idx.numel():
        raise ValueError(f"rows must be a non-empty list of distinct indices, got {idx.tolist()}")
    w = weight.to(torch.float64)[idx]
    b = None if bias is None else bias.to(torch.float64)[idx]
    scale = torch.sqrt(w.square().sum() + (0.0 if b is None else b.square().sum())).clamp_min(1e-300)
    up = torch.zeros(weight.shape[0], idx.numel(), dtype=torch.float64)
    up[idx, torch.arange(idx.numel())] = 1.0
    return up, w / scale, None if b is None else b / scale


def build_topo_layer(config: dict) -> nn.Module:
    """Re-build a zero layer from the ``config()`` of a TopoLayer / TopoConv2d / LowRankTopoLayer."""
    cfg = dict(config)
    kind = cfg.pop("type", "linear")
    if kind == "linear":
        return TopoLayer(**cfg)
    if kind == "conv2d":
        return TopoConv2d(**cfg)
    if kind == "lowrank":
        return LowRankTopoLayer(**cfg)
    raise ValueError(f"Unknown TopoLayer type {kind!r}; expected 'linear', 'conv2d' or 'lowrank'")
