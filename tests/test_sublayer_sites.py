"""Sites inside transformer blocks (``probe.sites=sublayers|all``): listing, exact identity at eps = 0,
finite differences of the score in float64, line search by full passes, removal, adapter round trips.

Pre-LN ViT / DeiT: the residual stream after the attention add (``<block>.layernorm_after``'s input, also the
MLP's residual). Post-LN BERT / RoBERTa: the sums fed to ``attention.output.LayerNorm`` and ``output.LayerNorm``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from test_surgery_bert import make_batch, make_bert, make_roberta  # noqa: E402
from test_surgery_bert import outputs as bert_outputs  # noqa: E402
from test_surgery_bert import summed_loss as bert_loss  # noqa: E402
from test_surgery_vit import BLOCKS, make_data, make_vit  # noqa: E402
from test_surgery_vit import outputs as vit_outputs  # noqa: E402
from test_surgery_vit import summed_loss as vit_loss  # noqa: E402
from transformers import DeiTConfig, DeiTForImageClassification  # noqa: E402

from topotransfer import get_family, insert_layer, topological_derivative  # noqa: E402
from topotransfer.config import ConfigError, ProbeConfig  # noqa: E402
from topotransfer.errors import NoSitesFoundError  # noqa: E402
from topotransfer.init_rules import probe_site_results  # noqa: E402
from topotransfer.insertion import line_search_epsilon  # noqa: E402
from topotransfer.models import ResidualMLP  # noqa: E402
from topotransfer.surgery.hf import TopoPreNorm  # noqa: E402

EPS_FD = 1e-4
LOSS = nn.CrossEntropyLoss(reduction="sum")
BERT_POINTS = ("attention.output.LayerNorm", "output.LayerNorm")


def make_deit(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
                  patch_size=4, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  num_labels=3, initializer_range=0.2, attn_implementation="sdpa")
    kwargs.update(overrides)
    return DeiTForImageClassification(DeiTConfig(**kwargs)).double().eval()


def test_site_sets_in_depth_order():
    bert = make_bert()
    family = get_family(bert)
    blocks = [s.name for s in family.sites(bert)]
    assert blocks == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1"]
    subs = family.sites(bert, "sublayers")
    assert [s.name for s in subs] == [f"bert.encoder.layer.{i}.{p}" for i in range(2) for p in BERT_POINTS]
    assert all(s.kind == "input" for s in subs)
    assert [s.name for s in family.sites(bert, "all")] == [
        "bert.embeddings", "bert.encoder.layer.0.attention.output.LayerNorm", "bert.encoder.layer.0.output.LayerNorm",
        "bert.encoder.layer.0", "bert.encoder.layer.1.attention.output.LayerNorm",
        "bert.encoder.layer.1.output.LayerNorm", "bert.encoder.layer.1",
    ]
    vit = make_vit()
    assert [s.name for s in get_family(vit).sites(vit, "sublayers")] == [
        f"vit.{BLOCKS}.{i}.layernorm_after" for i in range(2)
    ]
    with pytest.raises(ValueError, match="site set"):
        family.sites(bert, "everything")
    mlp = ResidualMLP(3, 4, 2, 2)
    with pytest.raises(NoSitesFoundError, match="inside its blocks"):
        get_family(mlp).sites(mlp, "sublayers")
    assert ProbeConfig(sites="all").sites == "all"
    with pytest.raises(ConfigError, match="probe.sites"):
        ProbeConfig(sites="inner")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("build", [make_bert, make_roberta], ids=["bert", "roberta"])
def test_zero_layer_is_exact_identity_inside_bert_blocks(build, attn):
    base = build(attn_implementation=attn)
    batch = make_batch()
    before = bert_outputs(base, batch)
    keys = set(base.state_dict())
    for site in get_family(base).sites(base, "sublayers"):
        model = insert_layer(copy.deepcopy(base), site.name)
        assert isinstance(model.get_submodule(site.name), TopoPreNorm)
        assert model.config.num_hidden_layers == 2  # no block was added
        assert set(model.state_dict()) == keys | {f"{site.name}.topo.weight", f"{site.name}.topo.bias"}
        after = bert_outputs(model, batch)
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), site.name


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("build", [make_vit, make_deit], ids=["vit", "deit"])
def test_zero_layer_is_exact_identity_inside_vit_blocks(build, attn):
    base = build(attn_implementation=attn)
    x = make_data()[0][0]
    before = vit_outputs(base, x)
    keys = set(base.state_dict())
    for site in get_family(base).sites(base, "sublayers"):
        model = insert_layer(copy.deepcopy(base), site.name)
        block = site.name.rsplit(".", 1)[0]
        assert set(model.state_dict()) == keys | {f"{block}.topo_mid.weight", f"{block}.topo_mid.bias"}
        after = vit_outputs(model, x)
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), site.name


def _fd(model, site, weight, bias, loss_of) -> float:
    j0 = loss_of(model)
    grown = insert_layer(copy.deepcopy(model), site, weight, bias, epsilon=EPS_FD)
    return 2.0 * (j0 - loss_of(grown)) / EPS_FD**2


@pytest.mark.parametrize("build", [make_bert, make_roberta], ids=["bert", "roberta"])
def test_score_matches_finite_differences_inside_bert_blocks(build):
    model, data = build(), [make_batch()]
    sites = [s.name for s in get_family(model).sites(model, "sublayers")]
    results = topological_derivative(model, data, LOSS, sites=sites, rule="top1")
    assert [r.site for r in results] == sites
    for r in results:
        assert r.score > 0, r
        fd = _fd(model, r.site, r.weight, r.bias, lambda m: bert_loss(m, data, LOSS))
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


@pytest.mark.parametrize("build", [make_vit, make_deit], ids=["vit", "deit"])
def test_score_matches_finite_differences_inside_vit_blocks(build):
    model, data = build(), make_data()
    sites = [s.name for s in get_family(model).sites(model, "sublayers")]
    results = topological_derivative(model, data, LOSS, sites=sites, rule="top1")
    for r in results:
        assert r.score > 0, r
        fd = _fd(model, r.site, r.weight, r.bias, lambda m: vit_loss(m, data, LOSS))
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


def test_random_direction_and_rowwise_rule_inside_blocks():
    """A random direction (not an eigenvector) and the row-wise rule: 2 (J0 - J(eps)) / eps^2 = theta^T Q theta."""
    model, data = make_bert(), [make_batch()]
    site = "bert.encoder.layer.1.attention.output.LayerNorm"
    probe = ProbeConfig(rule="rowwise", sites="sublayers", solver="dense")
    results = {r.site: r for r in probe_site_results(model, data, LOSS, probe)}
    assert list(results) == [s.name for s in get_family(model).sites(model, "sublayers")]
    r = results[site]
    fd = _fd(model, site, r.weight, r.bias, lambda m: bert_loss(m, data, LOSS))
    assert fd == pytest.approx(r.quadratic, rel=1e-2)
    from topotransfer.derivative.topological import compute_site_statistics

    _, stats, _, _ = compute_site_statistics(model, data, LOSS, sites=[site], solver="dense")
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(16, 16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    theta = torch.cat([w, b[:, None]], 1)
    w, b, theta = w / theta.norm(), b / theta.norm(), theta / theta.norm()  # unit norm: O(eps) error as for eigen directions
    quad = float(torch.einsum("rd,rde,re->", theta, stats[site].Q, theta))
    fd = _fd(model, site, w, b, lambda m: bert_loss(m, data, LOSS))
    assert fd == pytest.approx(quad, rel=1e-2)


def test_occupied_sub_sites_are_not_probed_again_and_remove_restores():
    model, data = make_bert(), [make_batch()]
    family = get_family(model)
    site = "bert.encoder.layer.0.output.LayerNorm"
    norm = model.get_submodule(site)
    before = bert_outputs(model, make_batch())
    insert_layer(model, site, torch.ones(16, 16) / 16, torch.ones(16), 0.1)
    assert [(p, type(layer).__name__) for p, layer in family.inserted(model)] == [(f"{site}.topo", "TopoLayer")]
    probed = probe_site_results(model, data, LOSS, ProbeConfig(sites="sublayers", solver="dense"))
    assert site not in {r.site for r in probed} and len(probed) == 3
    with pytest.raises(ValueError, match="already holds"):
        insert_layer(model, site)
    layer = family.remove(model, site)
    assert type(layer).__name__ == "TopoLayer" and family.inserted(model) == []
    restored = model.get_submodule(site)
    assert type(restored) is nn.LayerNorm and restored.weight is norm.weight
    assert all(torch.equal(a, b) for a, b in zip(before, bert_outputs(model, make_batch()), strict=True))
    vit = make_vit()
    vsite = f"vit.{BLOCKS}.1.layernorm_after"
    cls = type(vit.get_submodule(f"vit.{BLOCKS}.1"))
    insert_layer(vit, vsite)
    assert get_family(vit).remove(vit, vsite) is not None
    assert type(vit.get_submodule(f"vit.{BLOCKS}.1")) is cls and not hasattr(vit.get_submodule(f"vit.{BLOCKS}.1"), "topo_mid")


@pytest.mark.parametrize("which", ["bert", "vit"])
def test_line_search_inside_a_block_uses_full_passes(which):
    if which == "bert":
        model, data = make_bert(), [make_batch()]
        site = "bert.encoder.layer.0.attention.output.LayerNorm"
        loss_of = lambda m: bert_loss(m, data, LOSS)  # noqa: E731
    else:
        model, data = make_vit(), make_data()
        site = f"vit.{BLOCKS}.0.layernorm_after"
        loss_of = lambda m: vit_loss(m, data, LOSS)  # noqa: E731
    (r,) = topological_derivative(model, data, LOSS, sites=[site], rule="top1")
    ls = line_search_epsilon(model, r, data, LOSS, epsilons=(0.01, 0.1))
    assert not ls.downstream and ls.epsilon > 0
    assert get_family(model).inserted(model) == []  # the model is left as it was
    for eps, loss in ls.tried[1:]:
        assert loss == pytest.approx(loss_of(insert_layer(copy.deepcopy(model), r, epsilon=eps)), rel=1e-9)


def test_adapter_and_merged_round_trip_with_layers_inside_blocks(tmp_path):
    """Sub-block layers, then a block insertion before them that renames their block: save, reload, same logits."""
    from test_adapter import HIDDEN, save_base
    from transformers import BertConfig, BertForSequenceClassification

    from topotransfer.adapter import infer_insertions, load_adapter, load_merged, merge_and_save, save_adapter
    from topotransfer.errors import AdapterMismatchError
    from topotransfer.models.hf import load_backbone

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    model = load_backbone(str(tmp_path / "bert"), architecture="BertForSequenceClassification")
    g = torch.Generator().manual_seed(1)
    records = []
    for site in ("bert.encoder.layer.1.attention.output.LayerNorm", "bert.encoder.layer.0", "bert.encoder.layer.2.output.LayerNorm"):
        insert_layer(model, site, torch.randn(HIDDEN, HIDDEN, generator=g), torch.randn(HIDDEN, generator=g), 0.3)
        records.append({"site": site, "layer": get_family(model).layer_at(model, site).config()})
    # the first layer's block moved from index 1 to 2
    assert isinstance(model.get_submodule("bert.encoder.layer.2.attention.output.LayerNorm"), TopoPreNorm)
    batch = {"input_ids": torch.tensor([[2, 5, 7, 0], [3, 4, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    with torch.no_grad():
        expected = model(**batch).logits
    adapter = save_adapter(model, str(tmp_path / "bert"), None, records, tmp_path / "adapter")
    assert "bert.encoder.layer.2.attention.output.LayerNorm.topo.weight" in adapter.tensors["inserted"]
    assert len(adapter.tensors["inserted"]) == 6 and adapter.base_num_hidden_layers == 2
    save_adapter(model, str(tmp_path / "bert"), None, None, tmp_path / "inferred")
    assert [r["site"] for r in infer_insertions(model)] == [
        "bert.encoder.layer.0", "bert.encoder.layer.2.attention.output.LayerNorm", "bert.encoder.layer.2.output.LayerNorm"
    ]
    merge_and_save(model, tmp_path / "merged")
    with torch.no_grad():
        for path in ("adapter", "inferred"):
            assert torch.equal(load_adapter(None, tmp_path / path)(**batch).logits, expected)
        assert torch.equal(load_merged(tmp_path / "merged")(**batch).logits, expected)
    wrong = [dict(r) for r in records]
    wrong[0] = {**wrong[0], "site": "bert.encoder.layer.0.attention.output.LayerNorm"}
    with pytest.raises(AdapterMismatchError, match="inside blocks"):
        save_adapter(model, str(tmp_path / "bert"), None, wrong, tmp_path / "bad")
    # a ViT with a mid-block layer
    base = save_base(tmp_path / "vit")
    vit = load_backbone(base)
    insert_layer(vit, "vit.layers.1.layernorm_after", torch.randn(HIDDEN, HIDDEN, generator=g), torch.randn(HIDDEN, generator=g), 0.3)
    save_adapter(vit, base, None, None, tmp_path / "vit_adapter")
    merge_and_save(vit, tmp_path / "vit_merged")
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(load_adapter(base, tmp_path / "vit_adapter")(x).logits, vit(x).logits)
        assert torch.equal(load_merged(tmp_path / "vit_merged")(x).logits, vit(x).logits)


@pytest.mark.parametrize("lora", [False, True], ids=["topo", "topo+lora"])
def test_adapt_recipe_with_sub_block_sites(tmp_path, lora):
    """probe.sites=sublayers in the adapt recipe: the layers go inside blocks, train, and reload exactly."""
    from test_adapt_text import batches, logits, run, save_bert

    from topotransfer.adapter import load_adapter, load_merged

    base = save_bert(tmp_path / "bert")
    extra = ["adapt.lora=true", "adapt.lora_r=2"] if lora else []
    result = run(base, tmp_path / "run", "probe.sites=sublayers", "adapt.head_epochs=1", "adapt.insertions=2",
                 "adapt.epochs_per_insertion=1", "train.max_steps=4", *extra)
    events = result.results["events"]
    sub = [s.name for s in get_family(make_bert()).sites(make_bert(), "sublayers")]
    assert all(set(e["scores"]) <= set(sub) for e in events) and len(events) == 2
    assert events[1]["site"] not in events[0]["scores"] or events[1]["site"] != events[0]["site"]
    assert result.results["backbone_unchanged"]
    inside = get_family(result.model).inside_layers(result.model)
    assert len(inside) == 2 and all(layer.weight.abs().sum() > 0 for _, _, layer in inside)
    (x, _), = batches(base)
    live = logits(result.model, x)
    assert torch.equal(logits(load_adapter(None, tmp_path / "run" / "adapter"), x), live)
    if lora:  # LoRA folded into the base matrices: the same function up to float rounding
        torch.testing.assert_close(logits(load_merged(tmp_path / "run" / "merged"), x), live, rtol=1e-5, atol=1e-6)
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in result.model.named_parameters())
    else:
        assert torch.equal(logits(load_merged(tmp_path / "run" / "merged"), x), live)


def test_a_block_whose_forward_differs_is_refused_and_left_as_it_was():
    """The mid-block swap is kept only when the swapped forward reproduces the block's own forward bit for bit:
    a forward that computes something else is refused and the block keeps its class and children."""
    from topotransfer.errors import UnsupportedModelError
    from topotransfer.layers import TopoLayer
    from topotransfer.surgery.hf import _pre_ln_mid_forward
    from topotransfer.surgery.midblock import swap_in_mid_layer, swap_out_mid_layer

    block = make_vit().vit.layers[0]
    cls, children = type(block), dict(block.named_children())
    d = block.layernorm_after.normalized_shape[-1]

    def wrong_forward(self, hidden_states, *args, **kwargs):  # drops the MLP's residual
        return self.mlp(self.layernorm_after(self.topo_mid(hidden_states)))

    with pytest.raises(UnsupportedModelError, match="is not the pre-norm computation"):
        swap_in_mid_layer(block, TopoLayer(d, norm="layernorm"), wrong_forward, d)
    assert type(block) is cls and dict(block.named_children()) == children
    layer = TopoLayer(d, norm="layernorm")
    swap_in_mid_layer(block, layer, _pre_ln_mid_forward, d)  # the right forward is kept
    assert type(block) is not cls and block.topo_mid is layer
    assert swap_out_mid_layer(block, "x") is layer and type(block) is cls
