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
    assert rank_cost(384) == 769 and rank_cost(384, bias=False) == 768 and rank_cost(384, train_up=False) == 385
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


def test_insert_budgeted_on_a_bert_with_sub_block_sites():
    """The executor: rank-k layers at several sites (block and inside-block), each line-searched, the loss drops."""
    pytest.importorskip("transformers")
    from test_surgery_bert import make_batch, make_bert

    from topotransfer.budget import insert_budgeted
    from topotransfer.config import ProbeConfig
    from topotransfer.init_rules import probe_site_results
    from topotransfer.insertion import evaluate_loss
    from topotransfer.surgery import get_family

    model, data = make_bert(), [make_batch(), make_batch(seed=2)]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    results = probe_site_results(model, data, loss_fn, ProbeConfig(rule="rowwise", sites="all", solver="dense"))
    budget = 6 * rank_cost(16)
    before = evaluate_loss(model, data, loss_fn)
    records = insert_budgeted(model, results, budget, data, loss_fn, epsilons=(0.01, 0.1, 1.0),
                              choose_epsilon=lambda ls: ls.epsilon or 0.01, max_rank=3)
    assert len(records) >= 2 and sum(r["parameters"] for r in records) <= budget
    assert all(r["rank"] <= 3 and r["layer"]["type"] == "lowrank" for r in records)
    inserted = get_family(model).inserted(model)
    assert len(inserted) == len(records)
    assert sum(sum(p.numel() for p in layer.parameters()) for _, layer in inserted) == sum(r["parameters"] for r in records)
    assert evaluate_loss(model, data, loss_fn) < before
    for r in records:  # each line search tried the eps it inserted with (0.01 = fallback when none lowered the loss)
        loss = dict(r["eps_tried"])[r["epsilon"]]
        assert loss < r["loss_before"] or r["epsilon"] == 0.01


def test_lora_shapes_count_wrapped_modules_once_and_budget_needs_rowwise():
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_surgery_bert import make_bert

    from topotransfer.budget import lora_shapes
    from topotransfer.config import ConfigError, load_config

    model = make_bert()
    shapes = lora_shapes(model, ["query", "value"])
    assert shapes == [(16, 16)] * 4
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    assert lora_shapes(wrapped, ["query", "value"]) == shapes
    lora = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert lora == lora_parameter_count(shapes, 2)
    with pytest.raises(ConfigError, match="rowwise"):
        load_config(None, ["task=adapt", "adapt.param_budget=100", "probe.rule=cluster"])
    assert load_config(None, ["task=adapt", "adapt.budget_lora_rank=4", "probe.rule=rowwise"]).adapt.budget_lora_rank == 4


@pytest.mark.parametrize("lora", [False, True], ids=["topo", "topo+lora"])
def test_adapt_recipe_spends_the_budget_on_rank_k_layers(tmp_path, lora):
    """adapt.budget_lora_rank: the inserted layers' parameters (+ LoRA's with adapt.lora) stay within LoRA's count at
    that rank; two events; the adapter and the merged export reload the live model."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from test_adapt_text import batches, logits, run, save_bert

    from topotransfer.adapter import load_adapter, load_merged

    base = save_bert(tmp_path / "bert")
    budget = lora_parameter_count([(16, 16)] * 4, 2)  # LoRA rank 2 on query / value of 2 blocks: 256
    extra = ["adapt.lora=true", "adapt.lora_r=1"] if lora else []
    result = run(base, tmp_path / "run", "probe.rule=rowwise", "probe.sites=all", "adapt.budget_lora_rank=2",
                 "adapt.head_epochs=1", "adapt.insertions=2", "adapt.epochs_per_insertion=1", "train.max_steps=4",
                 "adapt.budget_max_rank=3", *extra)
    r = result.results
    spent = sum(layer["parameters"] for e in r["events"] for layer in e.get("layers", []))
    lora_params = lora_parameter_count([(16, 16)] * 4, 1) if lora else 0
    assert 0 < spent <= budget - lora_params
    assert all(e["parameters"] <= (budget - lora_params) // 2 + 1 for e in r["events"] if e.get("layers"))
    head = 16 * 2 + 2
    assert r["trainable_params"] == spent + lora_params + head
    kinds = {layer["layer"]["type"] for e in r["events"] for layer in e.get("layers", [])}
    assert kinds == {"lowrank"} and r["backbone_unchanged"]
    # the budgeted events' eps line searches are timed like one layer's (results.json's phase times)
    assert all(e["seconds"]["line_search"] > 0 and e["cpu_seconds"]["line_search"] > 0 for e in r["events"])
    assert r["phase_times"]["line_search"] > 0
    (x, _), = batches(base)
    live = logits(result.model, x)
    assert torch.equal(logits(load_adapter(None, tmp_path / "run" / "adapter"), x), live)
    merged = logits(load_merged(tmp_path / "run" / "merged"), x)
    if lora:  # LoRA folded into the base matrices: equal up to rounding
        torch.testing.assert_close(merged, live, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(merged, live)


def test_frozen_up_keeps_the_eigen_rows_and_layer_lr_gets_its_own_group(tmp_path):
    """adapt.lowrank_freeze_up: every rank-k layer's U is still its one-hot eigen rows after training (V moved),
    and is neither trained nor spent from the budget; adapt.layer_lr: the inserted layers form their own optimizer group."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from test_adapt_text import run, save_bert

    from topotransfer.adapter import head_module_names, unwrap_peft
    from topotransfer.config import load_config
    from topotransfer.recipes.adapt import _optimizer
    from topotransfer.surgery import get_family

    base = save_bert(tmp_path / "bert")
    result = run(base, tmp_path / "run", "probe.rule=rowwise", "probe.sites=all", "adapt.budget_lora_rank=2",
                 "adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=2", "train.max_steps=6",
                 "adapt.budget_max_rank=3", "adapt.lowrank_freeze_up=true", "adapt.layer_lr=0.02")
    r = result.results
    layers = [layer for _, layer in get_family(result.model).inserted(result.model)]
    records = [x for e in r["events"] for x in e.get("layers", [])]
    assert layers and len(layers) == len(records)
    for layer in layers:
        assert isinstance(layer, LowRankTopoLayer) and not layer.up.requires_grad
        rows = {tuple(x["rows"]) for x in records if x["rank"] == layer.rank}
        one_hot = torch.zeros_like(layer.up)
        assert any(torch.equal(layer.up, one_hot.index_put((torch.tensor(list(rw)), torch.arange(layer.rank)),
                                                         torch.tensor(1.0))) for rw in rows)
        assert layer.weight.abs().sum() > 0
    spent = sum(x["parameters"] for x in records)  # a frozen U is not spent: d + 1 per rank
    assert spent == sum(layer.rank * (16 + 1) for layer in layers) <= lora_parameter_count([(16, 16)] * 4, 2)
    assert r["trainable_params"] == spent + 16 * 2 + 2  # V and c of the layers + the head
    cfg = load_config(None, ["task=adapt", "adapt.lr=0.005", "adapt.layer_lr=0.0007"])
    model = result.model
    opt = _optimizer(model, head_module_names(unwrap_peft(model)[0]), cfg.adapt, cfg.train)
    layer_ids = {id(p) for layer in layers for p in layer.parameters() if p.requires_grad}
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_lr[0.0007] == layer_ids and 0.005 in by_lr and not by_lr[0.005] & layer_ids
