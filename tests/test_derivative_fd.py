"""Finite-difference checks of the topological derivative (float64), docs/method.md section 3.

J(eps) = J(0) - eps^2/2 theta^T Q theta + O(eps^3): for the eigen direction theta^T Q theta is the
score (rule "top1"); for a random direction it is the quadratic form of the accumulated statistic.
"""

import copy

import pytest
import torch
from torch import nn

from topotransfer import ResidualCNN, ResidualMLP, compute_site_statistics, insert_layer, topological_derivative

EPS = 1e-4


def _loss(model, data, loss_fn):
    with torch.no_grad():
        return sum(float(loss_fn(model(x), y)) for x, y in data)


def _mlp_case():
    torch.manual_seed(0)
    model = ResidualMLP(3, 6, 3, 2)
    x = torch.randn(40, 3)
    y = torch.randn(40, 2)
    return model, [(x[:25], y[:25]), (x[25:], y[25:])], nn.MSELoss(reduction="sum")


def _mlp_classification_case():
    torch.manual_seed(1)
    model = ResidualMLP(4, 5, 2, 3)
    x = torch.randn(30, 4)
    y = torch.randint(0, 3, (30,))
    return model, [(x, y)], nn.CrossEntropyLoss(reduction="sum")


def _cnn_case():
    torch.manual_seed(2)
    model = ResidualCNN(2, 3, 2, 4)
    x = torch.randn(6, 2, 5, 5)
    y = torch.randint(0, 4, (6,))
    return model, [(x[:4], y[:4]), (x[4:], y[4:])], nn.CrossEntropyLoss(reduction="sum")


CASES = {"mlp_regression": _mlp_case, "mlp_classification": _mlp_classification_case, "cnn": _cnn_case}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("solver", ["dense", "matrix_free"])
def test_eigen_direction_lowers_loss_by_half_eps2_score(float64, case, solver):
    model, data, loss_fn = CASES[case]()
    results = topological_derivative(model, data, loss_fn, rule="top1", solver=solver, tol=1e-10)
    assert [r.index for r in results] == list(range(model.depth + 1))
    J0 = _loss(model, data, loss_fn)
    for r in results:
        assert r.converged and r.k == 1
        norm = (r.weight.square().sum() + r.bias.square().sum()).sqrt()
        assert abs(norm.item() - 1) < 1e-10  # unit Frobenius norm for rule "top1"
        grown = insert_layer(copy.deepcopy(model), r, epsilon=EPS)
        fd = 2 * (J0 - _loss(grown, data, loss_fn)) / EPS**2
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_direction_matches_quadratic_form(float64, case):
    model, data, loss_fn = CASES[case]()
    sites, stats, layers, J0 = compute_site_statistics(model, data, loss_fn, solver="dense")
    assert J0 == pytest.approx(_loss(model, data, loss_fn), rel=1e-12)
    g = torch.Generator().manual_seed(5)
    for s in sites:
        layer, st = layers[s.name], stats[s.name]
        w = torch.randn(layer.out_features, layer.in_features, generator=g)
        b = torch.randn(layer.out_features, generator=g)
        quad = st.quadratic(w, b)
        grown = insert_layer(copy.deepcopy(model), s.name, w, b, epsilon=EPS)
        fd = 2 * (J0 - _loss(grown, data, loss_fn)) / EPS**2
        scale = st.Q.abs().amax().item() * (w.square().sum() + b.square().sum()).item()
        assert abs(fd - quad) <= 1e-2 * abs(quad) + 1e-4 * scale, (s.name, fd, quad)


def test_cluster_direction_quadratic_is_sum_of_eigenvalues(float64):
    model, data, loss_fn = _mlp_case()
    sites, stats, _, J0 = compute_site_statistics(model, data, loss_fn)
    results = topological_derivative(model, data, loss_fn, rule="cluster", c=0.9)
    for r in results:
        assert r.k >= 1
        assert r.quadratic == pytest.approx(float(r.eigenvalues[: r.k].sum()), rel=1e-10)
        assert stats[r.site].quadratic(r.weight, r.bias) == pytest.approx(r.quadratic, rel=1e-8)
        grown = insert_layer(copy.deepcopy(model), r, epsilon=EPS)
        fd = 2 * (J0 - _loss(grown, data, loss_fn)) / EPS**2
        assert fd == pytest.approx(r.quadratic, rel=1e-2)
