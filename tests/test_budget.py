"""Budget allocation over sites (topotransfer/budget.py): pure greedy allocation by eigenvalue per parameter,
LoRA parameter matching, and plans built from row-wise site results (checked against the expansion)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from topotransfer import ResidualMLP, insert_layer
from topotransfer.budget import allocate_ranks, lora_parameter_count, plan_insertions, rank_cost, split_budget
from topotransfer.init_rules import rowwise_site_results
from topotransfer.layers import LowRankTopoLayer


def test_costs_and_lora_matching():
    assert rank_cost(384) == 769 and rank_cost(384, bias=False) == 768
    # LoRA r = 16 on query / value (384 -> 384) of 6 blocks: the MiniLM benchmark's 147,456 backbone parameters
    assert lora_parameter_count([(384, 384)] * 12, 16) == 147_456
    assert split_budget(10, 3) == [4, 3, 3] and sum(split_budget(147_456, 4)) == 147_456
    with pytest.raises(ValueError):
        split_budget(10, 0)
    with pytest.raises(ValueError):
        lora_parameter_count([(4, 4)], 0)


def test_greedy_takes_the_largest_eigenvalues_pooled_over_sites():
    spectra = {"a": [5.0, 1.0, -2.0, 0.5], "b": [4.0, 3.0, 2.0], "c": [-1.0, 0.0]}
    costs = {"a": 10, "b": 10, "c": 10}
    assert allocate_ranks(spectra, costs, 40) == {"a": 1, "b": 3}  # 5, 4, 3, 2
    assert allocate_ranks(spectra, costs, 39) == {"a": 1, "b": 2}  # the cost never exceeds the budget
    assert allocate_ranks(spectra, costs, 1000) == {"a": 3, "b": 3}  # only positive eigenvalues count
    assert allocate_ranks(spectra, costs, 1000, max_rank=2) == {"a": 2, "b": 2}
    assert allocate_ranks(spectra, costs, 0) == {}
    # per parameter: a cheaper site wins with a smaller eigenvalue
    assert allocate_ranks({"a": [5.0], "b": [3.0]}, {"a": 10, "b": 5}, 5) == {"b": 1}
    # min_rank opens a site with several ranks at once, valued by their mean
    assert allocate_ranks({"a": [5.0, 0.1], "b": [3.0, 2.9]}, {"a": 1, "b": 1}, 2, min_rank=2) == {"b": 2}
    assert allocate_ranks({"a": [5.0]}, {"a": 1}, 9, min_rank=2) == {}
    # ties: the earlier site first
    assert allocate_ranks({"a": [1.0], "b": [1.0]}, {"a": 1, "b": 1}, 1) == {"a": 1}
    with pytest.raises(ValueError, match="cost"):
        allocate_ranks({"a": [1.0]}, {}, 5)


def test_plan_from_rowwise_results_predicts_the_decrease():
    torch.manual_seed(0)
    model = ResidualMLP(3, 6, 3, 2).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64)
    data, loss_fn = [(x, y)], nn.MSELoss(reduction="sum")
    results = rowwise_site_results(model, data, loss_fn, solver="dense")
    budget = 5 * rank_cost(6)
    plan = plan_insertions(results, budget)
    assert sum(a.parameters for a in plan) <= budget and sum(len(a.rows) for a in plan) == 5
    assert [a.index for a in plan] == sorted((a.index for a in plan), reverse=True)  # deepest first
    pooled = sorted((float(v) for r in results for v in r.row_scores if v > 0), reverse=True)[:5]
    chosen = sorted((float(r.row_scores[row]) for a in plan for r in results if r.site == a.site for row in a.rows),
                    reverse=True)
    assert chosen == pytest.approx(pooled)
    with torch.no_grad():
        j0 = float(loss_fn(model(x), y))
    eps = 1e-4
    for a in plan:
        template = LowRankTopoLayer(6, len(a.rows)).double()
        template.set_up(a.up)
        grown = insert_layer(copy.deepcopy(model), a.site, a.weight, a.bias, epsilon=eps, layer=template)
        with torch.no_grad():
            fd = 2 * (j0 - float(loss_fn(grown(x), y))) / eps**2
        assert fd == pytest.approx(a.predicted, rel=1e-2), a.site
    # several insertions in plan order (deepest first) keep every later name valid
    for a in plan:
        template = LowRankTopoLayer(6, len(a.rows)).double()
        template.set_up(a.up)
        insert_layer(model, a.site, a.weight, a.bias, epsilon=0.1, layer=template)
    assert len(model.layers) == 3 + len(plan)
    with pytest.raises(ValueError, match="rowwise"):
        plan_insertions([dataclasses.replace(results[0], row_scores=None)], budget)
