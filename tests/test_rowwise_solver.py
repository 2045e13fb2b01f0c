"""The batched matrix-free row-wise eigen-solver and the site score that names what it ranks by.

Every block's top eigenpair from :func:`~topotransfer.eigen.block_top_eigenpairs_lanczos` (all R blocks per
product, converged blocks leave the batch) must equal a dense float64 ``eigh`` per block: the eigenvalue, and
theta^T Q theta of the returned vector; the whitened variant likewise against the generalised problem. A
solver that runs out of steps must say so, naming the site and the rows.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import topotransfer.init_rules as ir
from topotransfer.config import ConfigError, ProbeConfig, load_config
from topotransfer.derivative.statistics import MatrixFreeStatistic
from topotransfer.derivative.topological import compute_site_statistics, topological_derivative
from topotransfer.eigen import block_top_eigenpairs_lanczos
from topotransfer.errors import ConvergenceWarning
from topotransfer.growth import grow_once
from topotransfer.models import ResidualMLP


def _random_statistic(R: int, d_in: int, N: int, seed: int, chunks: int = 3) -> MatrixFreeStatistic:
    """A float64 matrix-free statistic of N random samples (indefinite blocks), fed in ``chunks`` updates."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, d_in, generator=g, dtype=torch.float64)
    p = torch.randn(N, R, generator=g, dtype=torch.float64)
    st = MatrixFreeStatistic(R, d_in, bias=True, cache_dtype=torch.float64)
    for part in zip(z.chunk(chunks), p.chunk(chunks), strict=True):
        st.update(*part)
    return st


def _dense_blocks(st: MatrixFreeStatistic) -> torch.Tensor:
    z, p = st._rows()
    return torch.einsum("nr,ni,nj->rij", p.double(), z.double(), z.double())  # Q_r = sum_n p_nr zh_n zh_n^T


@pytest.mark.parametrize("R,d_in,N", [(12, 29, 200), (40, 60, 90)])  # full rank, and rank-deficient (N < D)
def test_batched_block_tops_equal_dense_per_block(R, d_in, N):
    st = _random_statistic(R, d_in, N, seed=R)
    Q = _dense_blocks(st)
    ref = torch.linalg.eigvalsh(Q)[:, -1]
    calls = []

    def matvec(v, rows=None):
        calls.append(v.shape[0])
        return st.matvec(v, rows=rows)

    tops = block_top_eigenpairs_lanczos(matvec, st.R, st.D, tol=1e-8, max_steps=2 * st.D)
    scale = float(ref.abs().max())
    assert tops.all_converged and tops.missed() == []
    assert torch.allclose(tops.values, ref, rtol=0, atol=1e-9 * scale)  # every block's top eigenvalue
    quad = torch.einsum("ri,rij,rj->r", tops.vectors, Q, tops.vectors)  # v_r^T Q_r v_r in float64
    assert torch.allclose(quad, ref, rtol=0, atol=1e-9 * scale)
    assert torch.allclose(tops.vectors.norm(dim=1), torch.ones(R, dtype=torch.float64))
    res = (torch.einsum("rij,rj->ri", Q, tops.vectors) - tops.values[:, None] * tops.vectors).norm(dim=1)
    assert torch.allclose(tops.residuals, res, atol=1e-9 * scale)  # the reported residuals are the true ones
    assert min(calls) < R  # converged blocks left the batch: later products ran on fewer blocks


def test_whitened_batched_block_tops_equal_dense_generalised_eigh():
    st = _random_statistic(10, 24, 300, seed=5)
    Q = _dense_blocks(st)
    M = st.second_moment()
    z, _ = st._rows()
    assert torch.allclose(M, z.T @ z / 300, atol=1e-12)  # the statistic's own second moment
    tops = ir.whitened_block_tops(st, M, ridge=0.0, tol=1e-8, max_steps=200)
    assert tops.all_converged
    L = torch.linalg.cholesky(M)
    A = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, Q, upper=False).transpose(1, 2),
                                      upper=False)
    mu = torch.linalg.eigvalsh(0.5 * (A + A.transpose(1, 2)))[:, -1]
    assert torch.allclose(tops.values, mu, rtol=0, atol=1e-9 * float(mu.abs().max()))
    v = tops.vectors
    assert torch.allclose(torch.einsum("ri,ij,rj->r", v, M, v), torch.ones(10, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(torch.einsum("ri,rij,rj->r", v, Q, v), mu, atol=1e-9 * float(mu.abs().max()))


def test_running_out_of_steps_warns_naming_the_site_and_rows(float64, monkeypatch):
    torch.manual_seed(0)
    model = ResidualMLP(30, 48, 1, 3)  # D = 49: above DENSE_MAX_DIM, the matrix-free Lanczos path
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(200, 30, generator=g), torch.randint(0, 3, (200,), generator=g))]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # the default budget converges without a warning
        ok = ir.rowwise_site_results(model, data, loss_fn, sites=["layers.0"], solver="matrix_free")
    assert ok[0].converged and ok[0].solver == "matrix_free"
    for whiten in (False, True):
        with pytest.warns(ConvergenceWarning, match=r"site 'layers\.0' did not converge for rows \[\d"):
            (res,) = ir.rowwise_site_results(model, data, loss_fn, sites=["layers.0"], solver="matrix_free",
                                             whiten=whiten, max_steps=2)
        assert not res.converged


def _tiny_vit_probe() -> tuple[nn.Module, list, nn.Module]:
    """A 2-block ViT (d = 48, 3 sites) with random weights, one probe batch of 12 images of 8 x 8 px, summed CE."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                                 image_size=8, patch_size=4, num_labels=3, attn_implementation="sdpa")
    model = transformers.ViTForImageClassification(cfg).float()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g))]
    return model, data, nn.CrossEntropyLoss(reduction="sum")


def test_tiny_vit_rowwise_eigenpairs_equal_dense_reference():
    model, data, loss_fn = _tiny_vit_probe()
    sites, stats, _, _ = compute_site_statistics(model, data, loss_fn, solver="matrix_free")
    assert len(sites) == 3
    for s in sites:
        st = stats[s.name]
        assert not ir._densify(st)  # D = 49 > DENSE_MAX_DIM: the batched Lanczos runs
        Q = _dense_blocks(st)
        ref = torch.linalg.eigvalsh(Q)[:, -1]
        scale = float(ref.abs().max())
        tops = ir.block_tops(st)
        assert tops.all_converged
        assert torch.allclose(tops.values, ref, rtol=0, atol=1e-4 * scale)  # float32 products, tol 1e-4
        quad = torch.einsum("ri,rij,rj->r", tops.vectors, Q, tops.vectors)
        assert torch.allclose(quad, ref, rtol=0, atol=1e-4 * scale)
        theta, _, q = ir.rowwise_direction(tops.values, tops.vectors)
        q_ref = float(torch.einsum("ri,rij,rj->", theta, Q, theta))
        assert q == pytest.approx(q_ref, rel=1e-5)


def _three_site_mlp():
    """Seed 13 of a ResidualMLP(4, 6, 3, 3): lambda_max ranks layers.0 first, the row-wise direction's
    theta^T Q theta ranks layers.1 first (found by a search over seeds 0-39; asserted below)."""
    torch.manual_seed(13)
    model = ResidualMLP(4, 6, 3, 3)
    g = torch.Generator().manual_seed(113)
    data = [(torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g))]
    return model, data, nn.CrossEntropyLoss(reduction="sum")


def test_quadratic_score_ranks_by_the_inserted_direction(float64):
    model, data, loss_fn = _three_site_mlp()
    by_lambda = ir.probe_site_results(model, data, loss_fn, ProbeConfig(rule="rowwise", score="lambda_max"))
    by_quad = ir.probe_site_results(model, data, loss_fn, ProbeConfig(rule="rowwise"))  # the default: quadratic
    _, stats, _, _ = compute_site_statistics(model, data, loss_fn)
    for a, b in zip(by_lambda, by_quad, strict=True):
        assert a.score_kind == "lambda_max" and b.score_kind == "quadratic"
        assert a.score == a.lambda_max == b.lambda_max  # both numbers recorded whatever ranks
        assert b.score == b.quadratic == a.quadratic
        assert torch.equal(a.weight, b.weight)  # the score does not change the direction
        st = stats[b.site]
        assert b.quadratic == pytest.approx(st.quadratic(b.weight, b.bias), rel=1e-10)  # of the inserted layer
        assert a.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(st.Q)[:, -1].max()), rel=1e-12)
    top_lambda = max(by_lambda, key=lambda r: r.score).site
    top_quad = max(by_quad, key=lambda r: r.score).site
    assert (top_lambda, top_quad) == ("layers.0", "layers.1")  # the two rankings differ here
    assert top_quad == max(by_quad, key=lambda r: r.quadratic).site


def test_quadratic_score_under_the_cluster_rule_and_bad_input(float64):
    model, data, loss_fn = _three_site_mlp()
    res = topological_derivative(model, data, loss_fn, rule="cluster", score="quadratic")
    for r in res:
        assert r.score_kind == "quadratic" and r.score == r.quadratic
        assert r.quadratic == pytest.approx(float(r.eigenvalues[: r.k].sum()), rel=1e-12)
        assert r.lambda_max == float(r.eigenvalues[0])
    with pytest.raises(ValueError, match="score"):
        topological_derivative(model, data, loss_fn, score="bogus")
    with pytest.raises(ValueError, match="score"):
        ir.rowwise_site_results(model, data, loss_fn, score="bogus")
    with pytest.raises(ValueError, match="probe.score"):
        ProbeConfig(score="bogus")


@pytest.mark.parametrize("whiten", [False, True], ids=["rowwise", "rowwise-whitened"])
def test_growth_event_inserts_at_the_argmax_of_the_configured_score(float64, whiten):
    """Where lambda_max and the inserted direction's theta^T Q theta rank the sites differently, a growth event
    (site_selection=argmax) inserts where ``probe.score`` is largest; the default is the quadratic. The event
    says which number ranked (``score_kind``) and keeps both per site."""
    assert ProbeConfig().score == "quadratic"
    chosen = {}
    for score in ("lambda_max", "quadratic"):
        model, data, loss_fn = _three_site_mlp()
        probe = ProbeConfig(rule="rowwise", whiten=whiten, score=score)
        results = {r.site: r for r in ir.probe_site_results(model, data, loss_fn, probe)}
        assert all(r.score_kind == score for r in results.values())
        rec = grow_once(model, "topo", data, data, loss_fn, event=0, epoch=0, probe_cfg=probe)
        assert rec.score_kind == score and rec.site == max(rec.scores, key=rec.scores.get)
        assert rec.lambda_max == pytest.approx({s: r.lambda_max for s, r in results.items()}, rel=1e-10)
        assert rec.quadratics == pytest.approx({s: r.quadratic for s, r in results.items()}, rel=1e-10)
        assert rec.scores == (rec.lambda_max if score == "lambda_max" else rec.quadratics)
        assert rec.quadratic == pytest.approx(results[rec.site].quadratic, rel=1e-10)  # of the layer inserted
        chosen[score] = rec.site
    by_lambda = max(rec.lambda_max, key=rec.lambda_max.get)
    by_quad = max(rec.quadratics, key=rec.quadratics.get)
    assert by_lambda != by_quad  # the case is informative under this rule
    assert chosen == {"lambda_max": by_lambda, "quadratic": by_quad}
    if not whiten:
        assert chosen == {"lambda_max": "layers.0", "quadratic": "layers.1"}  # the case the docstring names


def test_under_top1_both_scores_are_the_same_number(float64):
    """Rule top1 inserts the top eigenvector itself: theta^T Q theta = lambda_max(Q_t), exactly, so the two
    scores rank the sites alike (and both equal theta^T Q theta computed from Q)."""
    model, data, loss_fn = _three_site_mlp()
    by = {score: ir.probe_site_results(model, data, loss_fn, ProbeConfig(rule="top1", score=score))
          for score in ("lambda_max", "quadratic")}
    _, stats, _, _ = compute_site_statistics(model, data, loss_fn)
    for a, b in zip(by["lambda_max"], by["quadratic"], strict=True):
        assert (a.score_kind, b.score_kind) == ("lambda_max", "quadratic") and a.k == b.k == 1
        assert a.score == b.score == a.lambda_max == b.quadratic  # not approximately: one float
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert b.quadratic == pytest.approx(stats[b.site].quadratic(b.weight, b.bias), rel=1e-10)
    assert max(by["lambda_max"], key=lambda r: r.score).site == max(by["quadratic"], key=lambda r: r.score).site


def test_probe_score_config_error_is_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["probe.score=td"])
    assert "\n" not in str(err.value) and "probe.score must be quadratic|lambda_max, got 'td'" in str(err.value)
    assert load_config(None, ["probe.score=lambda_max"]).probe.score == "lambda_max"


def test_subspace_starts_are_the_blocks_top_ritz_vectors_and_exact_in_the_whole_space():
    st = _random_statistic(9, 15, 120, seed=3)  # D = 16
    Q = _dense_blocks(st)
    _, V = torch.linalg.eigh(Q)
    starts = st.subspace_starts(k=st.D)  # the subspace is the whole space: the exact top eigenvectors
    assert starts.shape == (9, 16) and starts.dtype == torch.float64
    assert torch.allclose(starts.norm(dim=1), torch.ones(9, dtype=torch.float64))
    assert torch.allclose((starts * V[:, :, -1]).sum(1).abs(), torch.ones(9, dtype=torch.float64), atol=1e-5)
    small = st.subspace_starts(k=4)  # a 4-dimensional subspace: Rayleigh quotients are lower bounds only
    rq = torch.einsum("ri,rij,rj->r", small, Q, small)
    assert bool((rq <= torch.linalg.eigvalsh(Q)[:, -1] + 1e-9).all())
    assert torch.equal(small, st.subspace_starts(k=4))  # seeded: every process and rerun gets the same vectors


@pytest.mark.parametrize("min_steps", [8, 4])
def test_warm_started_block_tops_equal_dense_per_block(min_steps):
    st = _random_statistic(12, 29, 200, seed=12)
    Q = _dense_blocks(st)
    ref = torch.linalg.eigvalsh(Q)[:, -1]
    start = st.subspace_starts(k=8)
    tops = block_top_eigenpairs_lanczos(st.matvec, st.R, st.D, tol=1e-8, max_steps=2 * st.D, start=start,
                                        min_steps=min_steps)
    scale = float(ref.abs().max())
    assert tops.all_converged
    assert torch.allclose(tops.values, ref, rtol=0, atol=1e-9 * scale)
    quad = torch.einsum("ri,rij,rj->r", tops.vectors, Q, tops.vectors)
    assert torch.allclose(quad, ref, rtol=0, atol=1e-9 * scale)
    # from the exact top eigenvectors the Krylov spaces are invariant after one product (a breakdown ends every
    # block at once, whatever min_steps): one product and the final check
    exact = torch.linalg.eigh(Q)[1][:, :, -1]
    fast = block_top_eigenpairs_lanczos(st.matvec, st.R, st.D, tol=1e-6, start=exact, min_steps=min_steps)
    assert fast.all_converged and fast.iterations == 1 and fast.work == 2.0
    assert torch.allclose(fast.values, ref, rtol=0, atol=1e-9 * scale)
    with pytest.raises(ValueError, match="start must have shape"):
        block_top_eigenpairs_lanczos(st.matvec, st.R, st.D, start=start[:, :-1])
    # report_tol: the same iteration (tol = 1e-12, 6 steps), only the final check is looser
    tight = block_top_eigenpairs_lanczos(st.matvec, st.R, st.D, tol=1e-12, max_steps=6, start=start)
    loose = block_top_eigenpairs_lanczos(st.matvec, st.R, st.D, tol=1e-12, max_steps=6, start=start, report_tol=0.5)
    assert torch.equal(tight.values, loose.values) and torch.equal(tight.residuals, loose.residuals)
    assert tight.tol == 1e-12 and loose.tol == 0.5 and not tight.all_converged and loose.all_converged


def _split_span_statistic() -> MatrixFreeStatistic:
    """Row 0's top whitened eigenvector lies in a span that the subspace start cannot see.

    300 samples live in coordinates 0 - 39 with adjoints ~ 1 (rows 1 - 5) and ~ 0.12 (row 0, random sign); 60
    samples live in coordinates 40 - 47 with small positive adjoints on every row. After whitening both groups
    have unit second moment, so row 0's top eigenpair (from the small group, 30.84) lies just above the largest
    eigenvalue on the big group's span, while C = sum_n ||p_n||^2 zh_n zh_n^T is dominated by the big group:
    the 32-dimensional subspace of ``subspace_starts`` lies in the big group's 40-dimensional span.
    """
    R, g, f64 = 6, torch.Generator().manual_seed(0), torch.float64
    z_big = torch.cat([torch.randn(300, 40, generator=g, dtype=f64), torch.zeros(300, 8, dtype=f64)], 1)
    z_small = torch.cat([torch.zeros(60, 40, dtype=f64), 0.1 * torch.randn(60, 8, generator=g, dtype=f64)], 1)
    p_big = torch.randn(300, R, generator=g, dtype=torch.float64)
    p_big[:, 0] *= 0.12
    p_small = 0.05 * (1 + torch.rand(60, R, generator=g, dtype=torch.float64))
    z, p = torch.cat([z_big, z_small]), torch.cat([p_big, p_small])
    perm = torch.randperm(360, generator=g)
    st = MatrixFreeStatistic(R, 48, bias=False, cache_dtype=torch.float64)
    st.update(z[perm], p[perm])
    return st


def test_whitened_random_part_finds_the_top_pair_the_subspace_start_misses(monkeypatch):
    """The limit of the shared-subspace start: a top eigenvector outside the subspace in the data's own span (not a
    null direction of the inputs, so the null-space check cannot help). Only a random part in the start finds it:
    ``WHITEN_START_MIX`` = 0.1; the default (0, measured: 2.2x fewer products at d = 768) stops on the lower pair."""
    st = _split_span_statistic()
    assert not ir._densify(st)  # D = 48 > DENSE_MAX_DIM: the warm-started batched Lanczos runs
    M = st.second_moment()
    ws = st.whitened(ir._cholesky(M, 0.0))
    z, p = ws._rows()
    A = torch.einsum("nr,ni,nj->rij", p, z, z)  # A_r = L^{-1} Q_r L^{-T} from the whitened samples, float64
    mu_all, Y = torch.linalg.eigh(A)
    mu = mu_all[:, -1]
    sub = ws.subspace_starts(k=ir.START_SUBSPACE)
    assert float((sub[0] * Y[0, :, -1]).abs().sum()) < 1e-3  # row 0's subspace start: nearly orthogonal to the top
    # from the subspace start alone, row 0 stops on a lower eigenpair (the residual test cannot tell)
    pure = block_top_eigenpairs_lanczos(ws.matvec, st.R, st.D, start=sub, min_steps=ir.WARM_MIN_STEPS)
    assert pure.all_converged and float((pure.values[0] - mu[0]).abs()) > 1e-3 * float(mu[0])
    assert ir._null_direction(M, ir._cholesky(M, 0.0), 0.0).shape[1] == 0  # M is full rank: no null direction
    default = ir.whitened_block_tops(st, M, ridge=0.0)
    assert float((default.values[0] - mu[0]).abs()) > 1e-3 * float(mu[0])  # the documented miss
    # Ritz vector + 0.1 x the seeded random unit vector: every block equals dense float64
    monkeypatch.setattr(ir, "WHITEN_START_MIX", 0.1)
    tops = ir.whitened_block_tops(st, M, ridge=0.0)
    assert tops.all_converged and tops.tol == 1e-4  # iterated to WHITEN_WARM_TOL * tol, reported against tol
    assert torch.allclose(tops.values, mu, rtol=0, atol=1e-8 * float(mu.abs().max()))
    Q = _dense_blocks(st)
    assert torch.allclose(torch.einsum("ri,rij,rj->r", tops.vectors, Q, tops.vectors), mu, rtol=0,
                          atol=1e-8 * float(mu.abs().max()))  # v_r^T Q_r v_r = mu_r with v_r^T M v_r = 1
    assert torch.allclose(torch.einsum("ri,ij,rj->r", tops.vectors, M, tops.vectors),
                          torch.ones(st.R, dtype=torch.float64), atol=1e-9)


def _centred_statistic() -> MatrixFreeStatistic:
    """LayerNorm-like inputs: every sample's features sum to 0, so w = (1, ..., 1, 0) has Zh w = 0 and Q_r w = 0 in
    every block. Rows 0 and 1 have negative adjoints on every sample: their top eigenvalue is that 0 (eigenvector w),
    all others are negative. Row 0's adjoints are ~ 1e-3 on a group of 60 samples living in 7 coordinates of their
    own, so its top eigenvalue on the span of the samples lies just below 0 (-1.5e-3 of the site's largest), as in
    the ViT rows the null-space check was built for; rows 2 - 5 have random-sign adjoints (positive tops)."""
    R, g, f64 = 6, torch.Generator().manual_seed(3), torch.float64
    z_big = torch.cat([torch.randn(300, 40, generator=g, dtype=f64), torch.zeros(300, 7, dtype=f64)], 1)
    z_small = torch.cat([torch.zeros(60, 40, dtype=f64), torch.randn(60, 7, generator=g, dtype=f64)], 1)
    z = torch.cat([z_big, z_small])
    z = z - z.mean(1, keepdim=True)  # centred per sample, as after a LayerNorm without affine part
    p = torch.randn(360, R, generator=g, dtype=f64)
    p[:300, 0] = -(0.5 + torch.rand(300, generator=g, dtype=f64))
    p[300:, 0] = -1e-3 * (1 + torch.rand(60, generator=g, dtype=f64))
    p[:, 1] = -(0.5 + torch.rand(360, generator=g, dtype=f64))
    st = MatrixFreeStatistic(R, 47, bias=True, cache_dtype=f64)
    st.update(z, p)
    return st


def test_whitened_rows_whose_top_is_the_inputs_null_direction_equal_dense():
    """A block's top eigenpair on the null direction of the inputs: the subspace start and every product lie in the
    span of the samples, so the Krylov space never reaches it; the null-space check finds it (rows 0 and 1)."""
    st = _centred_statistic()
    assert not ir._densify(st)
    M = st.second_moment()
    L = ir._cholesky(M, 1e-6)
    Y = ir._null_direction(M, L, 1e-6)
    w = torch.cat([torch.ones(st.D - 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    y = L.T @ w
    assert Y.shape == (st.D, 1) and float((Y[:, 0] @ y).abs() / y.norm()) > 1 - 1e-9  # Y = L^T w, normalised
    ws = st.whitened(L)
    z, p = ws._rows()
    A = torch.einsum("nr,ni,nj->rij", p, z, z)
    mu_all = torch.linalg.eigvalsh(A)
    mu, scale = mu_all[:, -1], float(mu_all[:, -1].abs().max())
    assert bool((mu[:2].abs() < 1e-9 * scale).all()) and bool((mu_all[:2, -2] < -1e-3 * scale).all())
    pure = block_top_eigenpairs_lanczos(ws.matvec, st.R, st.D, start=ws.subspace_starts(k=ir.START_SUBSPACE),
                                        min_steps=ir.WARM_MIN_STEPS)
    assert pure.all_converged and float(pure.values[0]) < -1e-3 * scale  # row 0 stopped on the span's top
    tops = ir.whitened_block_tops(st, M)
    assert tops.all_converged
    assert torch.allclose(tops.values, mu, rtol=0, atol=1e-8 * scale)
    Q = _dense_blocks(st)
    assert torch.allclose(torch.einsum("ri,rij,rj->r", tops.vectors, Q, tops.vectors), mu, rtol=0, atol=1e-8 * scale)
    # rows 0 and 1 now point along w (zero pre-activation on every sample); the others are untouched by the check
    cos = (tops.vectors[:2] @ w).abs() / (tops.vectors[:2].norm(dim=1) * w.norm())
    assert bool((cos > 1 - 1e-6).all())


def test_tiny_vit_whitened_rule_lambda_max_equals_dense_reference():
    """The whitened rule's lambda_max(Q_t) comes from the warm-started top-1 solve; it must equal the dense
    float64 max over every block's top eigenvalue, and the per-row mu_r the generalised eigenvalues."""
    model, data, loss_fn = _tiny_vit_probe()
    sites, stats, _, _ = compute_site_statistics(model, data, loss_fn, solver="matrix_free")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = ir.rowwise_site_results(model, data, loss_fn, solver="matrix_free", whiten=True)
    for s, r in zip(sites, res, strict=True):
        st = stats[s.name]
        assert r.solver == "matrix_free" and r.converged
        Q = _dense_blocks(st)
        lam = torch.linalg.eigvalsh(Q)[:, -1]
        assert r.lambda_max == pytest.approx(float(lam.max()), rel=1e-6)
        L = ir._cholesky(st.second_moment(), 1e-6)
        A = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, Q, upper=False).transpose(1, 2),
                                          upper=False)
        mu = torch.linalg.eigvalsh(0.5 * (A + A.transpose(1, 2)))[:, -1]
        assert torch.allclose(r.row_scores, mu, rtol=0, atol=1e-4 * float(mu.abs().max()))
