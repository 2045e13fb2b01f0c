"""Insertion preserves the function at eps = 0; the eps line search never raises the loss."""

import copy

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
