"""The topological derivative at every site of a model (docs/method.md section 3).

For a site t with layer input z (D = d_in + 1 with the bias) and adjoint p = -dJ/dh_t (R = d_out):

    Q_{t,r} = sum_n p_{n,r} zh_n zh_n^T,     TD_t = lambda_max(blockdiag_r Q_{t,r})
    J(eps)  = J(0) - eps^2/2 theta^T Q_t theta + O(eps^3)  for W = eps Phi, b = eps beta

One forward + backward pass per probe batch captures z and p at all sites (:mod:`.probes`); the
statistics are streamed (:mod:`.statistics`) and solved per site (:mod:`..eigen`).

Padded text batches: when the inputs are a dict with an ``attention_mask`` of shape (B, L), the rows
n = (b, l) with mask 0 are dropped from Z and P before they reach the statistics (:func:`sample_mask`),
so padding tokens neither count as samples nor occupy the matrix-free cache.

Subsampling (``sample_fraction`` / ``max_samples_per_batch``): of the N rows (tokens / pixels) of a batch,
n are drawn uniformly without replacement by a ``torch.Generator`` seeded from ``(sample_seed, batch
index)`` -- the same rows at every site, on every rerun -- and their adjoints are multiplied by N / n.
The statistic is then an unbiased estimate of the full-data sum Q (E[Q_hat] = Q), so scores keep the
scale of the unsubsampled ones and stay comparable across sites, probe sizes and fractions;
``count`` / ``num_samples`` still counts the N rows represented (``num_rows`` the n kept).
lambda_max of an estimate is biased upward by its noise (E lambda_max(Q_hat) >= lambda_max(Q)).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..eigen import EigenResult, dense_top_eigenpairs, lanczos_top_eigenpairs, select_direction
from ..errors import ConvergenceWarning
from ..surgery import get_family
from ..surgery.base import ChainFamily, Site
from .probes import capture_states, default_forward, probe_batch
from .statistics import DenseStatistic, MatrixFreeStatistic, SiteStatistic

__all__ = [
    "SCORE_KINDS",
    "SiteResult",
    "compute_site_statistics",
    "sample_mask",
    "solve_site",
    "split_batch",
    "subsample_rows",
    "topological_derivative",
]

SOLVERS = ("auto", "dense", "matrix_free")
#: What ``SiteResult.score`` is: lambda_max(Q_t), or theta^T Q_t theta of the direction inserted.
SCORE_KINDS = ("lambda_max", "quadratic")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ForwardFn = Callable[[nn.Module, object], torch.Tensor]


@dataclass
class SiteResult:
    """The derivative at one site and the initial direction of a layer inserted there.

    Attributes:
        site: site name (dotted path of the module producing the state).
        index: depth order t of the site.
        score: the number that ranks the sites, named by ``score_kind``: TD_t = lambda_max(Q_t) (default) or
            ``quadratic`` (a sum over the probe samples: it doubles with the data).
        eigenvalues: (m,) top eigenvalues over all blocks, descending.
        weight: (d_out, d_in) rows of Phi; unit Frobenius norm together with ``bias`` for rule "top1".
        bias: (d_out,) beta, or ``None`` when the layer has no bias.
        k: number of eigenvectors summed into the direction (neurons that start active).
        quadratic: theta^T Q theta of the returned direction; J(eps) ~ J(0) - eps^2/2 * quadratic.
        num_samples: samples (tokens / pixels) behind the statistics.
        solver: "dense" or "matrix_free".
        converged: whether the eigen-solver met its tolerance.
        layer_config: constructor arguments of the layer that fits the site.
        row_scores: (d_out,) top eigenvalue of every row block Q_r, in row order (rule "rowwise"; else ``None``);
            with ``whiten`` the generalised mu_r of (Q_r, M) behind the direction (per unit RMS pre-activation).
        score_kind: "lambda_max" (``score`` = lambda_max(Q_t), the eps -> 0 decrease of the best unit direction
            of the site) or "quadratic" (``score`` = theta^T Q_t theta of the direction returned here, the
            predicted decrease J(0) - J(eps) ~ eps^2/2 * quadratic of the layer actually inserted, for the
            rule's normalisation: unit Frobenius norm, or unit RMS pre-activation when whitened).
        lambda_max: lambda_max(Q_t), recorded whatever ``score_kind`` is.
    """

    site: str
    index: int
    score: float
    eigenvalues: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    k: int
    quadratic: float
    num_samples: int
    solver: str
    converged: bool = True
    layer_config: dict = field(default_factory=dict)
    row_scores: torch.Tensor | None = None
    score_kind: str = "lambda_max"
    lambda_max: float = math.nan


def split_batch(batch: object) -> tuple[object, torch.Tensor]:
    """A batch as ``(inputs, targets)``: a 2-sequence, or a dict with a ``"labels"`` key."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ValueError(f"A dict batch needs a 'labels' key; got keys {sorted(batch)}")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"A batch must be (inputs, targets) or a dict with 'labels'; got {type(batch).__name__}")


def _to_device(x: object, device: torch.device) -> object:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def check_loss_fn(loss_fn: LossFn) -> None:
    """Refuse mean-reduced torch losses: they make Q depend on the batch size."""
    if getattr(loss_fn, "reduction", None) == "mean":
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction='mean') makes the statistics depend on the batch size; "
            "use reduction='sum' (J is the loss summed over the probe data)"
        )


def sample_mask(inputs: object, state: torch.Tensor) -> torch.Tensor | None:
    """Which per-token sample rows of a site are real tokens (not padding).

    Args:
        inputs: the model inputs of one batch; only a dict with an ``"attention_mask"`` entry masks.
        state: the captured state h_t of a site, shape (B, L, d) for token-wise layers.

    Returns:
        ``None`` (keep every row) or a bool mask of shape (B*L,), in the row order of
        :meth:`~topotransfer.layers.TopoLayer.samples` (row b*L + l is token l of sequence b).

    Raises:
        ValueError: the attention mask is not (B, L) with (B, L) = the state's leading dimensions.
    """
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None:
        return None
    if mask.dim() != 2 or state.dim() != 3 or tuple(state.shape[:2]) != tuple(mask.shape):
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} cannot mask the per-token samples of a state of shape "
            f"{tuple(state.shape)}: a (batch, tokens) 0/1 mask is needed for (batch, tokens, hidden) states"
        )
    return mask.reshape(-1).to(state.device) != 0


def subsample_rows(
    num_rows: int,
    batch_index: int,
    fraction: float | None = None,
    max_rows: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """The rows of a batch kept by subsampling, or ``None`` to keep all ``num_rows``.

    n = min(num_rows, ceil(fraction * num_rows), max_rows) rows are drawn uniformly without replacement
    with a CPU ``torch.Generator`` seeded from ``(seed, batch_index)`` only, so every process and every
    rerun picks the same rows of the same batch. Returned sorted (memory order), as a LongTensor on ``device``.
    """
    keep = num_rows
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"sample_fraction must lie in (0, 1], got {fraction}")
        keep = min(keep, max(1, math.ceil(fraction * num_rows)))
    if max_rows is not None:
        if max_rows < 1:
            raise ValueError(f"max_samples_per_batch must be >= 1, got {max_rows}")
        keep = min(keep, max_rows)
    if keep >= num_rows:
        return None
    g = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + int(batch_index)) % (2**63))
    return torch.randperm(num_rows, generator=g)[:keep].sort().values.to(device)


def _truncate(inputs: object, targets: torch.Tensor, n: int) -> tuple[object, torch.Tensor]:
    """The first ``n`` examples of a batch (every tensor whose first dimension is the batch size)."""
    B = targets.shape[0]

    def cut(x: object) -> object:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == B:
            return x[:n]
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        return x

    return cut(inputs), targets[:n]


def _resolve_sites(model: nn.Module, family: ChainFamily, sites: Sequence[str | Site] | None) -> list[Site]:
    if sites is None:
        return family.sites(model)
    resolved = [family.site(model, s) for s in sites]
    return sorted(resolved, key=lambda s: s.index)


def compute_site_statistics(
    model: nn.Module,
    data: Iterable,
    loss_fn: LossFn,
    sites: Sequence[str | Site] | None = None,
    max_batches: int | None = None,
    accelerator: object | None = None,
    forward_fn: ForwardFn | None = None,
    solver: str = "auto",
    dense_max_dim: int = 257,
    cache_dtype: torch.dtype | None = None,
    progress: bool = False,
    *,
    max_samples: int | None = None,
    sample_fraction: float | None = None,
    max_samples_per_batch: int | None = None,
    sample_seed: int = 0,
    max_cache_bytes: int | None = None,
) -> tuple[list[Site], dict[str, SiteStatistic], dict[str, nn.Module], float]:
    """Stream the probe data once and accumulate every site's statistic.

    Args:
        model: a model of a registered family (its function is not changed; ``model.training`` is
            restored, parameters' ``requires_grad`` and ``.grad`` are not touched).
        data: iterable of ``(inputs, targets)`` batches (or dicts with ``labels``). Dict inputs with an
            ``attention_mask`` (B, L) drop the padding tokens' rows from the statistics.
        loss_fn: ``loss_fn(predictions, targets)`` summed over the batch.
        sites: site names to probe (default: all).
        max_batches: stop after this many batches.
        accelerator: an ``accelerate.Accelerator`` whose processes each hold a shard of ``data``;
            statistics are summed over processes.
        forward_fn: ``forward_fn(model, inputs) -> predictions`` (default: call the model, take logits).
        solver: "dense", "matrix_free" or "auto" (dense when D <= ``dense_max_dim``).
        cache_dtype: dtype of matrix-free caches (float32 default, float64 when the model is float64;
            ``torch.bfloat16`` halves the cache, products still accumulate in float32).
        max_samples: probe size: use at most this many examples (the last batch is cut; with
            ``max_batches`` whichever limit comes first; per process under ``accelerator``).
        sample_fraction: keep this fraction of the rows (tokens / pixels) of every batch (see the module
            docstring: the kept adjoints are scaled by N / n, so Q stays an unbiased estimate of the sum).
        max_samples_per_batch: keep at most this many rows of every batch.
        sample_seed: seed of the row selection (with the batch index).
        max_cache_bytes: cap on the rows the matrix-free statistics cache (13 ViT sites x N rows x (2d + 1)
            floats grow with the probe): the probe stops before the first batch that would exceed it (at least
            one batch is used) and warns with the number of examples used. ``None``: no cap.

    Returns:
        ``(sites, statistics by site name, zero layer that fits each site, total loss J)``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {SOLVERS}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    subsample_rows(2, 0, sample_fraction, max_samples_per_batch)  # validate the arguments early
    check_loss_fn(loss_fn)
    forward_fn = forward_fn or default_forward
    family = get_family(model)
    site_list = _resolve_sites(model, family, sites)
    layers, stats = _new_site_statistics(model, family, site_list, solver, dense_max_dim, cache_dtype)
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()  # the derivative is of the deterministic network: no dropout
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    n_batches = 0
    try:
        with capture_states(model, site_list, family) as store:
            batches = _probe_batches(data, stats, device, max_batches, max_samples, max_cache_bytes, progress)
            for inputs, targets in batches:
                loss, captured = probe_batch(model, site_list, family, store, inputs, targets, loss_fn, forward_fn)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"Non-finite probe loss {loss.item()} in batch {n_batches}")
                total_loss += loss.to(torch.float64)
                _update_site_statistics(stats, layers, site_list, captured, inputs, n_batches,
                                        sample_fraction, max_samples_per_batch, sample_seed)
                n_batches += 1
    finally:
        model.train(was_training)
    total_loss = _reduce_across_processes(stats, n_batches, total_loss, accelerator, device)
    return site_list, stats, layers, float(total_loss)


def _new_site_statistics(
    model: nn.Module,
    family: ChainFamily,
    site_list: Sequence[Site],
    solver: str,
    dense_max_dim: int,
    cache_dtype: torch.dtype | None,
) -> tuple[dict[str, nn.Module], dict[str, SiteStatistic]]:
    """One zero layer and one empty statistic per site.

    The layer (on the model's device and dtype) fits the site and turns its state / adjoint into samples.
    The statistic is dense (a D x D Q) when ``solver`` is "dense", or "auto" and D <= ``dense_max_dim``
    with D = in_features (+1 with a bias); else matrix-free (caches the rows, ``cache_dtype``: float64 for
    a float64 model, float32 otherwise, unless given).
    """
    layers = {s.name: family.new_layer(model, s) for s in site_list}
    ref = next(model.parameters())
    device = ref.device
    if cache_dtype is None:
        cache_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    stats: dict[str, SiteStatistic] = {}
    for s in site_list:
        layer = layers[s.name].to(device=device, dtype=ref.dtype)
        layers[s.name] = layer
        has_bias = getattr(layer, "bias", None) is not None
        D = layer.in_features + int(has_bias)
        use_dense = solver == "dense" or (solver == "auto" and D <= dense_max_dim)
        stats[s.name] = (
            DenseStatistic(layer.out_features, layer.in_features, has_bias, device=device)
            if use_dense
            else MatrixFreeStatistic(layer.out_features, layer.in_features, has_bias, cache_dtype=cache_dtype)
        )
    return layers, stats


def _probe_batches(
    data: Iterable,
    stats: dict[str, SiteStatistic],
    device: torch.device,
    max_batches: int | None,
    max_samples: int | None,
    max_cache_bytes: int | None,
    progress: bool,
) -> Iterator[tuple[object, torch.Tensor]]:
    """Yield the probe's ``(inputs, targets)`` batches on ``device``, within the probe's limits.

    Stops after ``max_batches`` batches or ``max_samples`` examples (the last batch is cut to fit), and
    before the first batch (never the first) whose rows would push the matrix-free caches past
    ``max_cache_bytes`` (warns). The caller updates ``stats`` with each batch before asking for the next:
    the cap is checked on what they hold then.
    """
    iterator = data
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(data, desc="topological derivative", total=max_batches, leave=False)
    n_batches = n_examples = 0
    cache_per_row = any(isinstance(st, MatrixFreeStatistic) for st in stats.values())
    for batch in iterator:
        if max_batches is not None and n_batches >= max_batches:
            break
        if max_samples is not None and n_examples >= max_samples:
            break
        inputs, targets = split_batch(batch)
        if max_cache_bytes is not None and n_batches > 0 and cache_per_row:
            held = sum(st.nbytes() for st in stats.values() if isinstance(st, MatrixFreeStatistic))
            if held + held / max(1, n_examples) * targets.shape[0] > max_cache_bytes:
                warnings.warn(
                    f"Probe cache cap reached: the matrix-free statistics hold {held / 1e6:.0f} MB after "
                    f"{n_examples} examples, the next batch would exceed max_cache_bytes = "
                    f"{max_cache_bytes / 1e6:.0f} MB; the derivative uses these {n_examples} examples only",
                    RuntimeWarning,
                    stacklevel=3,  # this generator, compute_site_statistics, its caller
                )
                break
        if max_samples is not None and n_examples + targets.shape[0] > max_samples:
            inputs, targets = _truncate(inputs, targets, max_samples - n_examples)
        n_examples += targets.shape[0]
        yield _to_device(inputs, device), _to_device(targets, device)
        n_batches += 1


def _update_site_statistics(
    stats: dict[str, SiteStatistic],
    layers: dict[str, nn.Module],
    site_list: Sequence[Site],
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]],
    inputs: object,
    batch_index: int,
    sample_fraction: float | None,
    max_samples_per_batch: int | None,
    sample_seed: int,
) -> None:
    """Add one probed batch to every site's statistic.

    Per site: the layer turns the state h and adjoint p into samples (z, p'); padding rows are dropped;
    with subsampling, n of the N rows are kept and their adjoints scaled by N / n (Q stays an unbiased
    estimate of the sum), the same rows at every site. Each site's state is released once cached.
    """
    subsampling = sample_fraction is not None or max_samples_per_batch is not None
    rows, rows_of, scale = None, -1, 1.0
    for s in site_list:
        h, p = captured.pop(s.name)  # drop each site's state as soon as it is cached
        z, pr = layers[s.name].samples(h, p)
        keep = sample_mask(inputs, h)
        del h, p
        if keep is not None:  # padding tokens are not samples (their adjoint is 0 anyway)
            z, pr = z[keep], pr[keep]
        if subsampling and z.shape[0] != rows_of:  # once per batch: states share their row layout
            rows = subsample_rows(z.shape[0], batch_index, sample_fraction, max_samples_per_batch,
                                  sample_seed, z.device)
            rows_of, scale = z.shape[0], z.shape[0] / rows.numel() if rows is not None else 1.0
        if rows is not None:  # the same rows at every site
            stats[s.name].update(z[rows], pr[rows] * scale, represents=z.shape[0])
        else:
            stats[s.name].update(z, pr)
        del z, pr


def _reduce_across_processes(
    stats: dict[str, SiteStatistic],
    n_batches: int,
    total_loss: torch.Tensor,
    accelerator: object | None,
    device: torch.device,
) -> torch.Tensor:
    """Sum the batch count, the loss J (scalar float64) and every statistic over the accelerator's processes.

    Raises ``ValueError`` when no process saw a batch.
    """
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        n_batches = int(accelerator.reduce(torch.tensor([n_batches], device=device), reduction="sum").item())
        total_loss = accelerator.reduce(total_loss.reshape(1), reduction="sum").reshape(())
    if n_batches == 0:
        raise ValueError("The probe data is empty: the topological derivative needs at least one batch")
    for st in stats.values():
        st.all_reduce(accelerator)
    return total_loss


def solve_site(
    stat: SiteStatistic,
    num_eigenvalues: int = 32,
    tol: float = 1e-4,
    steps: int = 48,
    max_restarts: int = 20,
    site: str | None = None,
    prune: bool = True,
    start: torch.Tensor | None = None,
    first_checks: tuple[int, ...] = (4, 6),
) -> EigenResult:
    """Top eigenpairs of one site's Q: dense ``eigh`` or matrix-free Lanczos, by the statistic's kind.

    ``start`` (R, D): start vectors of the blocks' Lanczos recurrences (default: seeded random vectors);
    ``first_checks``: the early steps at which the matrix-free solve tests convergence (see
    :func:`~topotransfer.eigen.lanczos_top_eigenpairs`).

    With ``prune``, the matrix-free solve also uses the statistic's proven per-block upper bounds
    (:meth:`~.statistics.MatrixFreeStatistic.upper_bounds`) to stop iterating blocks early.
    A matrix-free solve that misses ``tol`` warns (:class:`~topotransfer.errors.ConvergenceWarning`),
    naming ``site`` and the largest relative residual; the result is still returned (``converged=False``).
    """
    if isinstance(stat, DenseStatistic):
        return dense_top_eigenpairs(stat.Q, num_eigenvalues)
    # Proven per-block bounds (trace of the positive part) let Lanczos drop hopeless blocks at its first test.
    bounds = stat.upper_bounds() if prune and hasattr(stat, "upper_bounds") else None
    eig = lanczos_top_eigenpairs(
        stat.matvec, stat.R, stat.D, num=num_eigenvalues, steps=steps, tol=tol, max_restarts=max_restarts,
        prune=prune, upper_bounds=bounds, start=start, first_checks=first_checks,
    )
    if not eig.converged:
        scale = float(eig.values.abs().max().clamp_min(1e-300))
        worst = int(eig.residuals.argmax())
        warnings.warn(
            f"Matrix-free eigen-solve at site {site or '?'!r} did not converge: largest relative residual "
            f"||Q v - lambda v|| / max|lambda| = {float(eig.residuals[worst]) / scale:.2e} > tol {tol:.1e} "
            f"(eigenpair {worst + 1} of {eig.values.numel()}, lambda = {float(eig.values[worst]):.6g}) after "
            f"{eig.iterations} Lanczos steps (lanczos_steps={steps}, max_restarts={max_restarts}). TD = "
            f"{float(eig.values[0]):.6g} may be inaccurate; raise lanczos_steps / max_restarts or tol.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return eig


def topological_derivative(
    model: nn.Module,
    data: Iterable,
    loss_fn: LossFn,
    sites: Sequence[str | Site] | None = None,
    rule: str = "cluster",
    max_batches: int | None = None,
    accelerator: object | None = None,
    *,
    c: float = 0.5,
    k: int | None = None,
    solver: str = "auto",
    forward_fn: ForwardFn | None = None,
    num_eigenvalues: int = 32,
    tol: float = 1e-4,
    lanczos_steps: int = 48,
    dense_max_dim: int = 257,
    cache_dtype: torch.dtype | None = None,
    progress: bool = False,
    max_samples: int | None = None,
    sample_fraction: float | None = None,
    max_samples_per_batch: int | None = None,
    sample_seed: int = 0,
    max_restarts: int = 20,
    prune: bool = True,
    score: str = "lambda_max",
    max_cache_bytes: int | None = None,
) -> list[SiteResult]:
    """Topological derivative and initial layer direction at every site, in depth order.

    Args:
        model: ResidualMLP, ResidualCNN, or a transformers ViT / DeiT / BERT / RoBERTa (see
            :data:`surgery.FAMILIES`).
        data: iterable of ``(inputs, targets)`` batches (or dicts with ``"labels"``).
        loss_fn: loss *summed* over the batch, ``loss_fn(predictions, targets) -> scalar``.
        sites: site names (default: every site).
        rule: "top1", "cluster" (sum eigenvectors with lambda >= (1-c) lambda_1) or "topk".
        max_batches: use at most this many batches.
        accelerator: sum statistics over the processes of an ``accelerate.Accelerator``.
        c: cluster constant of rule "cluster".
        k: number of directions of rule "topk".
        solver: "auto", "dense" or "matrix_free".
        forward_fn: ``forward_fn(model, inputs) -> predictions``.
        num_eigenvalues: eigenpairs computed per site (bounds the cluster size).
        tol: relative residual tolerance of the matrix-free solver (a miss warns, naming the site).
        lanczos_steps, max_restarts: Krylov dimension per cycle and restarts of the matrix-free solver.
        dense_max_dim: ``solver="auto"`` solves dense blocks when D = d_in + 1 <= this, else matrix-free.
        cache_dtype: dtype of the matrix-free caches (``torch.bfloat16`` halves them).
        max_samples: probe size in examples (see :func:`compute_site_statistics`).
        sample_fraction, max_samples_per_batch, sample_seed: deterministic row subsampling per batch,
            with the kept adjoints scaled by N / n (unbiased estimate of Q; see the module docstring).
        prune: let the matrix-free solver stop iterating blocks that cannot hold a top eigenpair.
        max_cache_bytes: cap on the matrix-free probe cache (see :func:`compute_site_statistics`).
        score: what ``SiteResult.score`` is (:data:`SCORE_KINDS`): "lambda_max" (TD_t) or "quadratic" (theta^T
            Q theta of the returned direction: the sum of the eigenvalues the rule sums).

    Returns:
        One :class:`SiteResult` per site, in depth order. Weights are float64 on the model's device.
    """
    if score not in SCORE_KINDS:
        raise ValueError(f"Unknown score {score!r}; choose one of {SCORE_KINDS}")
    site_list, stats, layers, _ = compute_site_statistics(
        model, data, loss_fn, sites, max_batches, accelerator, forward_fn, solver, dense_max_dim, cache_dtype, progress,
        max_samples=max_samples, sample_fraction=sample_fraction, max_samples_per_batch=max_samples_per_batch,
        sample_seed=sample_seed, max_cache_bytes=max_cache_bytes,
    )
    results = []
    for s in site_list:
        st, layer = stats[s.name], layers[s.name]
        eig = solve_site(st, num_eigenvalues, tol, lanczos_steps, max_restarts, site=s.name, prune=prune)
        theta, n, quad = select_direction(eig, st.R, rule, c, k)
        weight = theta[:, : layer.in_features].contiguous()
        bias = theta[:, layer.in_features].contiguous() if st.bias else None
        results.append(
            SiteResult(
                site=s.name,
                index=s.index,
                score=float(eig.values[0]) if score == "lambda_max" else quad,
                eigenvalues=eig.values,
                weight=weight,
                bias=bias,
                k=n,
                quadratic=quad,
                num_samples=st.count,
                solver="dense" if isinstance(st, DenseStatistic) else "matrix_free",
                converged=eig.converged,
                layer_config=layer.config(),
                score_kind=score,
                lambda_max=float(eig.values[0]),
            )
        )
    return results
