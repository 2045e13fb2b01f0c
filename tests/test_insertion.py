"""Insertion preserves the function at eps = 0; the eps line search never raises the loss."""

import copy
import math

import pytest
import torch
from torch import nn

from topotransfer import (
    ResidualCNN,
    ResidualMLP,
    UnknownSiteError,
    UnsupportedModelError,
    get_family,
    insert_layer,
    line_search_epsilon,
    topological_derivative,
)


def _models():
    torch.manual_seed(0)
    return [
        (ResidualMLP(3, 5, 2, 2), torch.randn(7, 3)),
        (ResidualMLP(3, 5, 0, 2), torch.randn(7, 3)),
        (ResidualCNN(2, 4, 2, 3), torch.randn(3, 2, 6, 6)),
    ]


def test_zero_insertion_is_bit_identical_at_every_site():
    for model, x in _models():
        family = get_family(model)
        ref = model(x)
        for site in family.sites(model):
            grown = insert_layer(copy.deepcopy(model), site.name)
            assert torch.equal(grown(x), ref), site.name
            assert grown.depth == model.depth + 1
            # a direction with epsilon = 0 is an identity too
            layer = family.new_layer(model, site)
            w = torch.randn(layer.out_features, layer.in_features)
            grown = insert_layer(copy.deepcopy(model), site.name, w, torch.randn(layer.out_features), epsilon=0.0)
            assert torch.equal(grown(x), ref), site.name


def test_insert_goes_after_the_site():
    model = ResidualMLP(2, 3, 2, 1)
    old = list(model.layers)
    insert_layer(model, "layers.0", torch.ones(3, 3), torch.zeros(3), epsilon=0.5)
    assert model.layers[0] is old[0] and model.layers[2] is old[1]
    assert torch.equal(model.layers[1].weight, torch.full((3, 3), 0.5))
    insert_layer(model, "input_layer")
    assert model.layers[1] is old[0] and model.depth == 4


def test_errors():
    model = ResidualMLP(2, 3, 1, 1)
    with pytest.raises(UnknownSiteError, match="layers.0"):
        insert_layer(model, "layers.7")
    with pytest.raises(ValueError, match="needs"):
        insert_layer(model, "layers.0", torch.ones(2, 2), None, 1.0)
    with pytest.raises(UnsupportedModelError, match="residual_mlp"):
        get_family(nn.Sequential(nn.Linear(2, 2)))


def test_line_search_never_raises_loss_and_leaves_model_unchanged(float64):
    torch.manual_seed(3)
    model = ResidualMLP(2, 6, 1, 1)
    x = torch.rand(64, 2) * 4 - 2
    y = torch.sin(x[:, :1]) * torch.cos(x[:, 1:])
    data = [(x[:32], y[:32])]
    held = [(x[32:], y[32:])]
    loss_fn = nn.MSELoss(reduction="sum")
    ref = model(x)
    results = topological_derivative(model, data, loss_fn)
    best = max(results, key=lambda r: r.score)
    ls = line_search_epsilon(model, best, held, loss_fn)
    assert torch.equal(model(x), ref) and model.depth == 1  # temporary layer removed
    assert ls.tried[0] == (0.0, ls.baseline_loss) and len(ls.tried) > 5
    assert ls.loss <= ls.baseline_loss
    assert ls.loss == min(loss for _, loss in ls.tried)
    assert ls.epsilon > 0  # a positive score predicts a decrease at small eps
    insert_layer(model, best, epsilon=ls.epsilon)
    with torch.no_grad():
        assert float(loss_fn(model(x[32:]), y[32:])) == pytest.approx(ls.loss, rel=1e-12)

    # When no eps strictly lowers the loss (here the output ignores the hidden state), eps = 0 is kept.
    with torch.no_grad():
        model.output_layer.weight.zero_()
    flat = line_search_epsilon(model, best, held, loss_fn)
    assert flat.epsilon == 0.0 and flat.loss == flat.baseline_loss
    assert all(loss == flat.baseline_loss for _, loss in flat.tried)
    with pytest.raises(ValueError, match="positive"):
        line_search_epsilon(model, best, held, loss_fn, epsilons=[0.0, 1.0])


def test_fill_inactive_rows_keeps_the_decrease_and_makes_every_row_trainable(float64):
    """Dead rows (w_r = b_r = 0) get exactly zero gradient (sigma'(0) = 0); filled rows train, and the
    second-order decrease splits as theta^T Q theta + R^T Q R (no cross term: R lives on other rows)."""
    from topotransfer import fill_inactive_rows

    torch.manual_seed(0)
    model = ResidualMLP(3, 6, 2, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g), torch.randint(0, 2, (40,), generator=g)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    res = topological_derivative(model, [(x, y)], loss_fn, sites=["layers.0"], rule="top1")[0]
    w, b = fill_inactive_rows(res.weight, res.bias, 0.5, torch.Generator().manual_seed(2))
    live = (res.weight.abs().sum(1) + res.bias.abs()) > 0
    assert int(live.sum()) == 1  # one eigenvector = one row of Q's block structure
    assert torch.equal(w[live], res.weight[live]) and torch.equal(b[live], res.bias[live])
    r = torch.cat([w - res.weight, (b - res.bias)[:, None]], 1)
    assert bool((r[~live].abs().sum(1) > 0).all())
    assert float(r.norm()) == pytest.approx(0.5, rel=1e-12)  # ||theta|| = 1 for top1
    assert fill_inactive_rows(res.weight, res.bias, 0.0) == (res.weight, res.bias)
    with pytest.raises(ValueError, match=">= 0"):
        fill_inactive_rows(res.weight, res.bias, -1.0)

    def curvature(weight, bias, eps=1e-4):
        j0 = float(loss_fn(model(x), y))
        grown = insert_layer(copy.deepcopy(model), "layers.0", weight, bias, epsilon=eps)
        return 2 * (j0 - float(loss_fn(grown(x), y))) / eps**2

    both, eig, noise = curvature(w, b), curvature(res.weight, res.bias), curvature(w - res.weight, b - res.bias)
    assert eig == pytest.approx(res.score, rel=1e-2)
    assert both == pytest.approx(eig + noise, rel=1e-2)

    for weight, bias, trainable_rows in ((res.weight, res.bias, live), (w, b, torch.ones_like(live))):
        grown = insert_layer(copy.deepcopy(model), "layers.0", weight, bias, epsilon=0.1)
        loss_fn(grown(x), y).backward()
        grad = grown.layers[1].weight.grad.abs().sum(1) + grown.layers[1].bias.grad.abs()
        assert torch.equal(grad > 0, trainable_rows)


@pytest.mark.parametrize("weighting", ["equal", "sqrt", "lambda"])
def test_rowwise_rule_quadratic_and_finite_differences(float64, weighting):
    """Row-wise rule: row r = a_r v_r (v_r the top eigenvector of block Q_r) on every row with lambda_r > 0.
    theta^T Q theta must equal the predicted sum a_r^2 lambda_r, the loss must drop by (eps^2/2) theta^T Q theta
    at small eps (finite differences, float64), and eps = 0 must be the identity."""
    from topotransfer.derivative.topological import compute_site_statistics
    from topotransfer.init_rules import block_top_eigenpairs, rowwise_direction, rowwise_site_results

    torch.manual_seed(0)
    model = ResidualMLP(3, 6, 2, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, generator=g), torch.randint(0, 2, (50,), generator=g)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    data = [(x[:25], y[:25]), (x[25:], y[25:])]
    _, stats, _, _ = compute_site_statistics(model, data, loss_fn, sites=["layers.0"], solver="dense")
    st = stats["layers.0"]
    vals, vecs = block_top_eigenpairs(st)
    ref = torch.linalg.eigvalsh(st.Q)[:, -1]
    assert torch.allclose(vals, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(torch.bmm(st.Q, vecs[:, :, None]).squeeze(-1), vals[:, None] * vecs, atol=1e-10)
    theta, k, quad = rowwise_direction(vals, vecs, weighting)
    assert float(theta.norm()) == pytest.approx(1.0, rel=1e-12)
    assert k == int((vals > 0).sum()) and k >= 2  # every row with positive curvature starts active
    assert torch.equal((theta.abs().sum(1) > 0), vals > 0)
    assert quad > 0

    (res,) = rowwise_site_results(model, data, loss_fn, sites=["layers.0"], weighting=weighting)
    assert res.score == pytest.approx(float(ref.max()), rel=1e-12)  # same TD as the other rules
    assert res.quadratic == pytest.approx(quad, rel=1e-12)
    assert res.quadratic == pytest.approx(st.quadratic(res.weight, res.bias), rel=1e-10)  # theta^T Q theta

    with torch.no_grad():
        j0 = sum(float(loss_fn(model(a), b)) for a, b in data)
    same = insert_layer(copy.deepcopy(model), "layers.0", res.weight, res.bias, epsilon=0.0)
    assert torch.equal(same(x), model(x))  # identity at eps = 0
    fd = []
    for eps in (1e-2, 1e-3, 1e-4):
        grown = insert_layer(copy.deepcopy(model), "layers.0", res.weight, res.bias, epsilon=eps)
        with torch.no_grad():
            j = sum(float(loss_fn(grown(a), b)) for a, b in data)
        fd.append(2 * (j0 - j) / eps**2)
    assert fd[-1] == pytest.approx(res.quadratic, rel=1e-3)
    assert abs(fd[-1] - res.quadratic) < abs(fd[0] - res.quadratic) + 1e-9  # converges as eps -> 0

    with pytest.raises(ValueError, match="weighting"):
        rowwise_direction(vals, vecs, "bogus")
    neg, k1, q1 = rowwise_direction(-vals.abs() - 1, vecs)  # no positive curvature: the best row only
    assert k1 == 1 and q1 < 0


def _classifier_problem(model_seed: int, data_seed: int, n: int):
    """A ResidualMLP(4, 7, 1, 3), one batch of n random inputs with 3-class labels, a summed cross-entropy."""
    torch.manual_seed(model_seed)
    model = ResidualMLP(4, 7, 1, 3)
    g = torch.Generator().manual_seed(data_seed)
    data = [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))]
    return model, data, nn.CrossEntropyLoss(reduction="sum")


def test_rowwise_block_eigenpairs_matrix_free_and_lanczos_match_dense(float64, monkeypatch):
    """The per-block top eigenpairs from a matrix-free statistic (densified, and by batched Lanczos) agree
    with the dense statistic's."""
    import topotransfer.init_rules as ir
    from topotransfer.derivative.topological import compute_site_statistics

    model, data, loss_fn = _classifier_problem(2, 3, 40)
    _, dense, _, _ = compute_site_statistics(model, data, loss_fn, sites=["layers.0"], solver="dense")
    _, free, _, _ = compute_site_statistics(model, data, loss_fn, sites=["layers.0"], solver="matrix_free")
    v0, u0 = ir.block_top_eigenpairs(dense["layers.0"])
    v1, u1 = ir.block_top_eigenpairs(free["layers.0"])
    monkeypatch.setattr(ir, "DENSE_LIMIT", 0)  # force the Lanczos path
    v2, u2 = ir.block_top_eigenpairs(free["layers.0"])
    for v, u in ((v1, u1), (v2, u2)):
        assert torch.allclose(v, v0, rtol=1e-8, atol=1e-10)
        assert torch.allclose((u * u0).sum(1).abs(), torch.ones(7), atol=1e-6)  # same vectors up to sign


def test_whitened_eigenpairs_by_matrix_free_lanczos_match_dense(float64, monkeypatch):
    """Above DENSE_LIMIT (ViT-Base) the whitened blocks L^{-1} Q_r L^{-T} are applied matrix-free and solved by
    batched Lanczos: same mu_r and v_r as the dense generalised eigh."""
    import topotransfer.init_rules as ir
    from topotransfer.derivative.topological import compute_site_statistics

    model, data, loss_fn = _classifier_problem(4, 5, 60)
    sites, free, layers, _ = compute_site_statistics(model, data, loss_fn, sites=["layers.0"], solver="matrix_free")
    M = ir.input_second_moments(model, data, sites, layers)["layers.0"]
    mu0, v0 = ir.whitened_block_top_eigenpairs(free["layers.0"], M, ridge=0.0)
    monkeypatch.setattr(ir, "DENSE_LIMIT", 0)  # force the matrix-free Lanczos path
    mu1, v1 = ir.whitened_block_top_eigenpairs(free["layers.0"], M, ridge=0.0)
    assert torch.allclose(mu1, mu0, rtol=1e-8, atol=1e-10)
    Mv = (M @ v1.T).T
    assert torch.allclose((v1 * Mv).sum(1), torch.ones(7), atol=1e-6)  # unit M-norm
    assert torch.allclose((v1 * (M @ v0.T).T).sum(1).abs(), torch.ones(7), atol=1e-6)  # same vectors up to sign


def test_whitened_rowwise_rule_is_a_generalised_eigenvector_with_unit_preactivation(float64):
    """whiten=True: Q_r v_r = mu_r M v_r with v_r^T M v_r = 1 (M = mean zh zh^T); the direction has mean-square
    pre-activation 1, theta^T Q theta = sum a_r^2 mu_r, and finite differences confirm the decrease."""
    from topotransfer.derivative.statistics import append_bias
    from topotransfer.derivative.topological import compute_site_statistics
    from topotransfer.init_rules import input_second_moments, rowwise_site_results, whitened_block_top_eigenpairs

    torch.manual_seed(0)
    model = ResidualMLP(3, 6, 2, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, generator=g), torch.randint(0, 2, (50,), generator=g)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    data = [(x[:20], y[:20]), (x[20:], y[20:])]
    sites, stats, layers, _ = compute_site_statistics(model, data, loss_fn, sites=["layers.0"], solver="dense")
    M = input_second_moments(model, data, sites, layers)["layers.0"]
    with torch.no_grad():
        h = model.layers[0](model.input_layer(x)) if hasattr(model, "input_layer") else None
    st = stats["layers.0"]
    mu, v = whitened_block_top_eigenpairs(st, M, ridge=0.0)
    Mv = (M @ v.T).T
    assert torch.allclose((v * Mv).sum(1), torch.ones(6), atol=1e-10)  # unit M-norm
    assert torch.allclose(torch.bmm(st.Q, v[:, :, None]).squeeze(-1), mu[:, None] * Mv, atol=1e-8)
    assert torch.equal(mu > 0, torch.linalg.eigvalsh(st.Q)[:, -1] > 0)  # same rows have positive curvature

    (res,) = rowwise_site_results(model, data, loss_fn, sites=["layers.0"], whiten=True)
    assert res.score == pytest.approx(float(torch.linalg.eigvalsh(st.Q)[:, -1].max()), rel=1e-12)
    assert res.quadratic == pytest.approx(st.quadratic(res.weight, res.bias), rel=1e-12) and res.quadratic > 0
    if h is not None:  # mean-square pre-activation of the unit-scale direction is 1
        pre = append_bias(h, True) @ torch.cat([res.weight, res.bias[:, None]], 1).T
        assert float(pre.square().sum(1).mean()) == pytest.approx(1.0, rel=1e-4)
    with torch.no_grad():
        j0 = sum(float(loss_fn(model(a), b)) for a, b in data)
        eps = 1e-4
        grown = insert_layer(copy.deepcopy(model), "layers.0", res.weight, res.bias, epsilon=eps)
        j = sum(float(loss_fn(grown(a), b)) for a, b in data)
    assert 2 * (j0 - j) / eps**2 == pytest.approx(res.quadratic, rel=1e-3)


def _search_problem(kind: str):
    """A model, three held-out batches, probe results at every site (float32, as the recipes run)."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(6)
    if kind == "mlp":
        model = ResidualMLP(6, 12, 3, 3)
        x = torch.randn(90, 6, generator=g)
    elif kind == "cnn":
        model = ResidualCNN(2, 4, 2, 3)
        x = torch.randn(30, 2, 6, 6, generator=g)
    else:
        transformers = pytest.importorskip("transformers")
        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                     image_size=8, patch_size=4, num_labels=3, attn_implementation="sdpa")
        model = transformers.ViTForImageClassification(cfg).eval()
        x = torch.randn(30, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    held = [(x[i : i + x.shape[0] // 3], y[i : i + x.shape[0] // 3]) for i in range(0, x.shape[0], x.shape[0] // 3)]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    return model, held, loss_fn, topological_derivative(model, held[:1], loss_fn)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "vit"])
def test_shared_states_give_bit_identical_line_searches(kind, monkeypatch):
    """reuse_site_states (one full pass for every site and sign) changes nothing: every (eps, loss) is
    bit-identical to one line search at a time; several eps per downstream pass (opt-in) agree to float
    rounding."""
    import topotransfer.insertion as ins
    from topotransfer.insertion import reuse_site_states

    model, held, loss_fn, results = _search_problem(kind)
    full_passes = []
    model.register_forward_pre_hook(lambda m, a, kw=None: full_passes.append(1))

    def searches():
        return [(line_search_epsilon(model, r.site, held, loss_fn, r.weight, r.bias).tried,
                 line_search_epsilon(model, r.site, held, loss_fn, -r.weight, None if r.bias is None else -r.bias).tried)
                for r in results]

    alone = searches()
    passes_alone = len(full_passes)
    full_passes.clear()
    with reuse_site_states([r.site for r in results]):
        shared = searches()
    assert shared == alone
    monkeypatch.setattr(ins, "EPS_BATCH_ELEMENTS", 2**20)
    with reuse_site_states([r.site for r in results]):
        batched = searches()
    full_passes.clear()
    for a, b in zip(alone, batched, strict=True):
        for ta, tb in zip(a, b, strict=True):
            assert [e for e, _ in ta] == [e for e, _ in tb]
            assert [v for _, v in tb] == pytest.approx([v for _, v in ta], rel=1e-5)
    monkeypatch.undo()
    with reuse_site_states([r.site for r in results]):
        searches()
    # alone: per line search, one pass per batch + the first batch's check; shared: one pass per batch for all
    # sites, and the check once per site
    assert passes_alone == 2 * len(results) * (len(held) + 1)
    assert len(full_passes) == len(held) + len(results)
    assert ins._REUSE is None  # the context cleaned up


@pytest.mark.parametrize("kind", ["mlp", "vit"])
@pytest.mark.parametrize("downstream", [True, False])
def test_stop_at_rise_tries_a_bit_identical_prefix_up_to_the_first_rise(kind, downstream):
    """stop_at_rise evaluates the grid upwards and stops after the first eps whose loss rises: its (eps, loss)
    are exactly the first ones of the full search, the first local minimum is the same, and the eps above the
    rise are never evaluated."""
    from topotransfer.recipes.adapt import first_local_minimum_epsilon

    model, held, loss_fn, results = _search_problem(kind)
    grid = tuple(float(e) for e in torch.logspace(-3, 2, 12, dtype=torch.float64))  # far enough to rise
    stopped_early = 0
    for r in results:
        for sign in (1, -1):
            w, b = sign * r.weight, None if r.bias is None else sign * r.bias
            full = line_search_epsilon(model, r.site, held, loss_fn, w, b, epsilons=grid, downstream=downstream)
            short = line_search_epsilon(model, r.site, held, loss_fn, w, b, epsilons=grid, downstream=downstream,
                                        stop_at_rise=True)
            assert short.tried == full.tried[: len(short.tried)]  # bit-identical losses
            assert first_local_minimum_epsilon(short.tried) == first_local_minimum_epsilon(full.tried)
            losses = [v for _, v in short.tried]
            assert all(a >= b for a, b in zip(losses[:-2], losses[1:-1], strict=True))  # no rise before the last eps tried
            if len(short.tried) < len(full.tried):
                stopped_early += 1
                assert losses[-1] > losses[-2] or not math.isfinite(losses[-1])
            assert short.epsilon == min(short.tried, key=lambda t: (t[1], t[0]))[0] or short.epsilon == 0.0
    assert stopped_early > 0  # the grid reaches eps where the loss rises: the test exercises the stop
    with pytest.raises(ValueError, match="ascending"):
        line_search_epsilon(model, results[0].site, held, loss_fn, results[0].weight, results[0].bias,
                            epsilons=(0.1, 0.01), stop_at_rise=True)


def test_probe_cache_cap_stops_before_exceeding_and_warns():
    from topotransfer.config import ProbeConfig
    from topotransfer.derivative.topological import compute_site_statistics
    from topotransfer.init_rules import probe_cache_cap

    torch.manual_seed(0)
    model = ResidualMLP(300, 300, 1, 3)  # D = 301 > 257: matrix-free statistics
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(10, 300, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(5)]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    _, full, _, _ = compute_site_statistics(model, data, loss_fn)
    per_batch = sum(st.nbytes() for st in full.values()) // 5
    assert all(st.count == 50 for st in full.values())
    with pytest.warns(RuntimeWarning, match="cache cap reached.*20 examples"):
        _, capped, _, _ = compute_site_statistics(model, data, loss_fn, max_cache_bytes=int(2.5 * per_batch))
    assert all(st.count == 20 for st in capped.values())
    assert sum(st.nbytes() for st in capped.values()) <= 2.5 * per_batch
    with pytest.warns(RuntimeWarning, match="10 examples"):  # at least one batch, whatever the cap
        compute_site_statistics(model, data, loss_fn, max_cache_bytes=1)
    assert probe_cache_cap(ProbeConfig(max_cache_gb=0)) is None
    assert probe_cache_cap(ProbeConfig(max_cache_gb=1.5)) == 1_500_000_000
    auto = probe_cache_cap(ProbeConfig())
    assert auto is None or auto > 0
