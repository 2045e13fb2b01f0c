"""DINOv2 family (blocks with layer scale; also DINOv2 with registers): sites, finite differences at every
site, exact identity at eps = 0, adapter round trip, and the adapt recipe on a tiny DINOv2 (offline)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from topotransfer import TopoBlock, get_family, insert_layer, topological_derivative  # noqa: E402
from topotransfer.adapter import load_adapter, load_merged, merge_and_save, save_adapter  # noqa: E402
from topotransfer.models.hf import backbone_modality, load_backbone  # noqa: E402

HIDDEN, LAYERS, LABELS, IMAGE = 16, 2, 3, 8
EPS_FD = 1e-4


def dinov2_kwargs(**overrides) -> dict:
    kwargs = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2, mlp_ratio=2, image_size=IMAGE,
                  patch_size=4, num_channels=3, num_labels=LABELS, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, initializer_range=0.2,
                  layerscale_value=0.5,  # layer scale far from 1 (the default is 1.0)
                  attn_implementation="sdpa")
    kwargs.update(overrides)
    return kwargs


def make_dinov2(cls=Dinov2ForImageClassification, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    config_cls = Dinov2WithRegistersConfig if cls is Dinov2WithRegistersModel else Dinov2Config
    extra = {"num_register_tokens": 2} if cls is Dinov2WithRegistersModel else {}
    return cls(config_cls(**dinov2_kwargs(**extra, **overrides))).double().eval()


def make_data(seed: int = 1, batch: int = 4, image: int = IMAGE):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, image, image, generator=g, dtype=torch.float64),
             torch.randint(0, LABELS, (batch,), generator=g))]


@torch.no_grad()
def summed_loss(model, data, loss_fn) -> float:
    return float(sum(loss_fn(model(x).logits, y) for x, y in data))


@torch.no_grad()
def outputs(model, x) -> list[torch.Tensor]:
    return [t for t in model(x).to_tuple() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize(("cls", "prefix"), [(Dinov2Model, ""), (Dinov2ForImageClassification, "dinov2."),
                                             (Dinov2WithRegistersModel, "")],
                         ids=["Dinov2Model", "Dinov2ForImageClassification", "Dinov2WithRegistersModel"])
def test_sites_in_depth_order(cls, prefix):
    model = make_dinov2(cls)
    family = get_family(model)
    assert family.name == "dinov2"
    assert [s.name for s in family.sites(model)] == [f"{prefix}embeddings"] + [
        f"{prefix}encoder.layer.{i}" for i in range(LAYERS)
    ]


def test_score_matches_finite_differences_at_every_site():
    model, data = make_dinov2(), make_data()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    results = topological_derivative(model, data, loss_fn, rule="top1")
    assert len(results) == LAYERS + 1
    j0 = summed_loss(model, data, loss_fn)
    for r in results:
        assert r.num_samples == 4 * 5 and r.score > 0  # batch x (4 patches + CLS)
        grown = insert_layer(copy.deepcopy(model), r.site, r.weight, r.bias, epsilon=EPS_FD)
        fd = 2.0 * (j0 - summed_loss(grown, data, loss_fn)) / EPS_FD**2
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls", [Dinov2ForImageClassification, Dinov2WithRegistersModel],
                         ids=["Dinov2ForImageClassification", "Dinov2WithRegistersModel"])
def test_zero_layer_is_exact_identity_at_every_site(cls, attn):
    base = make_dinov2(cls, attn_implementation=attn)
    x = make_data()[0][0]
    before = outputs(base, x)
    for site in get_family(base).sites(base):
        model = insert_layer(copy.deepcopy(base), site.name)
        assert model.config.num_hidden_layers == LAYERS + 1
        assert isinstance(model.get_submodule(site.container)[site.position], TopoBlock)
        assert all(torch.equal(a, b) for a, b in zip(before, outputs(model, x), strict=True)), site.name


def save_dinov2(path, image: int = IMAGE, seed: int = 0) -> str:
    torch.manual_seed(seed)
    Dinov2ForImageClassification(Dinov2Config(**dinov2_kwargs(image_size=image, attn_implementation=None))).save_pretrained(path)
    return str(path)


def test_adapter_and_merged_round_trip(tmp_path):
    base_dir = save_dinov2(tmp_path / "base")
    assert backbone_modality(transformers.AutoConfig.from_pretrained(base_dir)) == "image"
    model = load_backbone(base_dir, id2label={i: f"c{i}" for i in range(5)})
    g = torch.Generator().manual_seed(2)
    for site in ("dinov2.encoder.layer.1", "dinov2.embeddings"):
        insert_layer(model, site, torch.randn(HIDDEN, HIDDEN, generator=g), torch.randn(HIDDEN, generator=g), 0.3)
    x = make_data()[0][0].float()
    save_adapter(model, base_dir, None, None, tmp_path / "adapter", include_head=True)
    with torch.no_grad():
        live = model(x).logits
        assert torch.equal(load_adapter(base_dir, tmp_path / "adapter")(x).logits, live)
        merge_and_save(model, tmp_path / "merged")
        assert torch.equal(load_merged(tmp_path / "merged")(x).logits, live)


def test_adapt_recipe_accepts_dinov2(tmp_path):
    """``topotransfer adapt`` on a DINOv2 (images): inserts a layer; adapter and merged export reload exactly."""
    from test_adapt import IMAGE as ADAPT_IMAGE
    from test_adapt import run

    base_dir = save_dinov2(tmp_path / "base", image=ADAPT_IMAGE)
    result = run(base_dir, tmp_path / "run", "adapt.head_epochs=1", "adapt.insertions=1",
                 "adapt.epochs_per_insertion=1", "train.max_steps=3")
    r = result.results
    assert r["backbone_unchanged"] and r["insertions"] == 1 and r["depth"] == LAYERS + 1
    assert r["events"][0]["site"].startswith("dinov2.")
    x = torch.randn(3, 3, ADAPT_IMAGE, ADAPT_IMAGE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        live = result.model(x).logits
        assert torch.equal(load_adapter(base_dir, tmp_path / "run" / "adapter")(x).logits, live)
        assert torch.equal(load_merged(tmp_path / "run" / "merged")(x).logits, live)


@pytest.mark.parametrize("cls", [Dinov2ForImageClassification, Dinov2WithRegistersModel],
                         ids=["Dinov2ForImageClassification", "Dinov2WithRegistersModel"])
def test_sites_inside_blocks_identity_and_finite_differences(cls):
    """The residual stream after the layer-scaled attention branch (input of norm2): exact identity with a zero
    layer (eager and sdpa) and, for the classifier, FD at each site."""
    base = make_dinov2(cls)
    family = get_family(base)
    subs = family.sites(base, "sublayers")
    prefix = "dinov2." if cls is Dinov2ForImageClassification else ""
    assert [s.name for s in subs] == [f"{prefix}encoder.layer.{i}.norm2" for i in range(LAYERS)]
    x = make_data()[0][0]
    for attn in ("eager", "sdpa"):
        ref = make_dinov2(cls, attn_implementation=attn)
        before = outputs(ref, x)
        for site in subs:
            model = insert_layer(copy.deepcopy(ref), site.name)
            assert model.config.num_hidden_layers == LAYERS
            assert all(torch.equal(a, b) for a, b in zip(before, outputs(model, x), strict=True)), (attn, site.name)
            family.remove(model, site.name)
            assert type(model.get_submodule(site.container)[site.position]) is type(ref.get_submodule(site.container)[0])
    if cls is not Dinov2ForImageClassification:
        return
    data, loss_fn = make_data(), nn.CrossEntropyLoss(reduction="sum")
    j0 = summed_loss(base, data, loss_fn)
    for r in topological_derivative(base, data, loss_fn, sites=[s.name for s in subs], rule="top1"):
        assert r.score > 0
        grown = insert_layer(copy.deepcopy(base), r.site, r.weight, r.bias, epsilon=EPS_FD)
        fd = 2.0 * (j0 - summed_loss(grown, data, loss_fn)) / EPS_FD**2
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


def test_adapter_round_trip_with_a_layer_inside_a_block(tmp_path):
    base_dir = save_dinov2(tmp_path / "base")
    model = load_backbone(base_dir)
    g = torch.Generator().manual_seed(4)
    for site in ("dinov2.encoder.layer.0.norm2", "dinov2.embeddings"):
        insert_layer(model, site, torch.randn(HIDDEN, HIDDEN, generator=g), torch.randn(HIDDEN, generator=g), 0.3)
    x = make_data()[0][0].float()
    save_adapter(model, base_dir, None, None, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(load_adapter(base_dir, tmp_path / "adapter")(x).logits, model(x).logits)
