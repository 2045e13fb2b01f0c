"""The rank-k layer g = u + U sigma(V z + c) (docs/method.md section 10): identity at V = 0, the second-order
expansion J(eps) = J(0) - eps^2/2 sum_j theta_j^T Q(u_j) theta_j checked by finite differences in float64 for
random U and for the eigen rows, trainability, line search and adapter round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from topotransfer import ResidualMLP, compute_site_statistics, insert_layer
from topotransfer.init_rules import rowwise_site_results
from topotransfer.insertion import line_search_epsilon
from topotransfer.layers import LowRankTopoLayer, TopoLayer, build_topo_layer, lowrank_from_rows
from topotransfer.surgery import get_family

EPS = 1e-4


def _loss(model, data, loss_fn) -> float:
    with torch.no_grad():
        return sum(float(loss_fn(model(x), y)) for x, y in data)


def _mlp_case():
    torch.manual_seed(0)
    model = ResidualMLP(3, 6, 3, 2).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64)
    return model, [(x[:25], y[:25]), (x[25:], y[25:])], nn.MSELoss(reduction="sum")


def _quadratic(Q: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """sum_j theta_j^T Q(u_j) theta_j with Q(u) = sum_r u_r Q_r; Q (R, D, D), up (R, k), theta_j = [v_j | c_j]."""
    theta = torch.cat([weight, bias[:, None]], dim=1)  # (k, D)
    return float(torch.einsum("rj,rde,jd,je->", up, Q, theta, theta))


def test_zero_inner_weights_are_an_exact_identity_for_any_up():
    model, data, _ = _mlp_case()
    x = data[0][0]
    before = model(x)
    layer = LowRankTopoLayer(6, 2).double()
    layer.set_up(torch.randn(6, 2, dtype=torch.float64))
    for site in get_family(model).sites(model):
        grown = insert_layer(copy.deepcopy(model), site.name, layer=layer)
        assert torch.equal(grown(x), before), site.name
    assert layer.num_parameters() == 2 * (2 * 6 + 1)
    with pytest.raises(ValueError, match="rank must be positive"):
        LowRankTopoLayer(6, 0)


@pytest.mark.parametrize("site", ["input_layer", "layers.1", "layers.2"])
def test_random_up_and_inner_direction_match_the_expansion(site):
    """2 (J(0) - J(eps)) / eps^2 -> sum_j theta_j^T Q(u_j) theta_j for random U, V, c (unit ||[V | c]||)."""
    model, data, loss_fn = _mlp_case()
    _, stats, _, _ = compute_site_statistics(model, data, loss_fn, sites=[site], solver="dense")
    Q = stats[site].Q
    g = torch.Generator().manual_seed(5)
    up = torch.randn(6, 3, generator=g, dtype=torch.float64)
    w, b = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    norm = torch.sqrt(w.square().sum() + b.square().sum())
    w, b = w / norm, b / norm
    layer = LowRankTopoLayer(6, 3).double()
    layer.set_up(up)
    predicted = _quadratic(Q, up, w, b)
    grown = insert_layer(copy.deepcopy(model), site, w, b, epsilon=EPS, layer=layer)
    fd = 2 * (_loss(model, data, loss_fn) - _loss(grown, data, loss_fn)) / EPS**2
    assert abs(predicted) > 1e-3
    assert fd == pytest.approx(predicted, rel=1e-2), (fd, predicted)


def test_eigen_rows_initialise_the_layer_with_the_sum_of_their_eigenvalues():
    """One-hot U on the k rows of largest lambda_r: quadratic = sum a_j^2 lambda_j / sum a_j^2 (rowwise, equal: mean)."""
    model, data, loss_fn = _mlp_case()
    site = "layers.1"
    (r,) = rowwise_site_results(model, data, loss_fn, sites=[site], solver="dense")
    _, stats, _, _ = compute_site_statistics(model, data, loss_fn, sites=[site], solver="dense")
    lam = torch.linalg.eigvalsh(stats[site].Q)[:, -1]  # (R,) top eigenvalue of every row block
    rows = lam.argsort(descending=True)[:2].tolist()
    assert lam[rows[1]] > 0
    up, w, b = lowrank_from_rows(r.weight, r.bias, rows)
    assert torch.equal(up.sum(0), torch.ones(2)) and float(w.square().sum() + b.square().sum()) == pytest.approx(1.0)
    predicted = float(lam[rows].mean())  # equal row weights
    assert _quadratic(stats[site].Q, up, w, b) == pytest.approx(predicted, rel=1e-9)
    layer = LowRankTopoLayer(6, 2).double()
    layer.set_up(up)
    grown = insert_layer(copy.deepcopy(model), site, w, b, epsilon=EPS, layer=layer)
    fd = 2 * (_loss(model, data, loss_fn) - _loss(grown, data, loss_fn)) / EPS**2
    assert fd == pytest.approx(predicted, rel=1e-2)
    with pytest.raises(ValueError, match="distinct"):
        lowrank_from_rows(r.weight, r.bias, [1, 1])


def test_every_parameter_trains_after_a_nonzero_eps():
    model, data, loss_fn = _mlp_case()
    (r,) = rowwise_site_results(model, data, loss_fn, sites=["layers.0"], solver="dense")
    up, w, b = lowrank_from_rows(r.weight, r.bias, [0, 3])
    template = LowRankTopoLayer(6, 2).double()
    template.set_up(up)
    insert_layer(model, "layers.0", w, b, epsilon=0.1, layer=template)
    layer = model.layers[1]
    assert isinstance(layer, LowRankTopoLayer) and layer is not template
    loss_fn(model(data[0][0]), data[0][1]).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_line_search_with_the_rank_k_layer_downstream_equals_full_passes():
    model, data, loss_fn = _mlp_case()
    template = LowRankTopoLayer(6, 2).double()
    template.set_up(torch.eye(6, dtype=torch.float64)[:, [1, 4]])
    w, b = torch.ones(2, 6, dtype=torch.float64) / 4, torch.ones(2, dtype=torch.float64) / 4
    down = line_search_epsilon(model, "layers.1", data, loss_fn, w, b, epsilons=(0.1, 1.0), layer=template)
    full = line_search_epsilon(model, "layers.1", data, loss_fn, w, b, epsilons=(0.1, 1.0), layer=template,
                               downstream=False)
    assert down.downstream and not full.downstream
    for (e1, l1), (e2, l2) in zip(down.tried, full.tried, strict=True):
        assert e1 == e2 and l1 == pytest.approx(l2, rel=1e-12)
    assert len(model.layers) == 3
    with pytest.raises(ValueError, match="needs"):
        insert_layer(model, "layers.1", torch.ones(6, 6), None, layer=template)


def test_config_rebuilds_the_layer():
    layer = LowRankTopoLayer.like(TopoLayer(8, norm="layernorm", eps=1e-12), 3)
    assert layer.config() == {"type": "lowrank", "dim": 8, "rank": 3, "bias": True, "norm": "layernorm",
                              "eps": 1e-12, "activation": "topo"}
    rebuilt = build_topo_layer(layer.config())
    assert isinstance(rebuilt, LowRankTopoLayer) and rebuilt.config() == layer.config()
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {"weight": (3, 8), "bias": (3,), "up": (8, 3)}


def test_adapter_and_merged_round_trip_with_rank_k_layers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    from topotransfer.adapter import load_adapter, load_merged, merge_and_save, save_adapter
    from topotransfer.models.hf import load_backbone

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    model = load_backbone(str(tmp_path / "bert"), architecture="BertForSequenceClassification")
    family = get_family(model)
    g = torch.Generator().manual_seed(1)
    for site, rank in (("bert.encoder.layer.0.output.LayerNorm", 3), ("bert.encoder.layer.1", 2)):
        template = LowRankTopoLayer.like(family.new_layer(model, family.site(model, site)), rank)
        template.set_up(torch.randn(16, rank, generator=g))
        insert_layer(model, site, torch.randn(rank, 16, generator=g), torch.randn(rank, generator=g), 0.5,
                     layer=template)
    assert sorted(type(layer).__name__ for _, layer in family.inserted(model)) == ["LowRankTopoLayer"] * 2
    save_adapter(model, str(tmp_path / "bert"), None, None, tmp_path / "adapter")
    merge_and_save(model, tmp_path / "merged")
    batch = {"input_ids": torch.tensor([[2, 5, 7, 0], [3, 4, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(load_adapter(None, tmp_path / "adapter")(**batch).logits, expected)
        assert torch.equal(load_merged(tmp_path / "merged")(**batch).logits, expected)
