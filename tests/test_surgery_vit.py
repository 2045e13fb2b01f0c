"""ViT / DeiT family: sites, exact identity at eps = 0, finite differences, both transformers layouts.

transformers 5.x keeps ViT blocks at ``vit.layers`` and a block returns a tensor; transformers 4.x (up to
about 4.55) keeps them at ``vit.encoder.layer`` and a block returns ``(hidden_states,)``. The 4.x layout
is rebuilt here from real 5.x parts (:class:`ViTLayer` below) so that both contracts are tested with
one installed transformers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402
from transformers.models.vit import modeling_vit  # noqa: E402

from topotransfer import (  # noqa: E402
    TopoBlock,
    TopoLayer,
    UnsupportedModelError,
    compute_site_statistics,
    get_family,
    insert_layer,
    topological_derivative,
)

HIDDEN, LAYERS, LABELS, CHANNELS, IMAGE = 16, 2, 3, 3, 8
EPS_FD = 1e-4  # 2 (J(0) - J(eps)) / eps^2 = theta^T Q theta + O(eps)
# "eager" attention computes its softmax in float32 even in a float64 model (transformers 5.x and 4.57):
# J then carries ~1e-8 noise upstream of any attention and the FD quotient an error ~2e-8 / eps^2.
# "sdpa" stays in float64 on CPU, so finite differences use it; identity tests cover both.
FD_ATTN = "sdpa"
# Where the installed transformers keeps ViT blocks (5.x: ViTModel.layers; 4.57: ViTModel.encoder.layer).
BLOCKS = "layers" if int(transformers.__version__.split(".")[0]) >= 5 else "encoder.layer"


def vit_config(**overrides) -> ViTConfig:
    kwargs = dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=IMAGE,
        patch_size=4,
        num_channels=CHANNELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=LABELS,
        initializer_range=0.2,  # larger than the default 0.02 so adjoints are far from zero
        attn_implementation=FD_ATTN,
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def make_vit(cls=ViTForImageClassification, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return cls(vit_config(**overrides)).double().eval()


def make_data(seed: int = 1, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    labels = torch.randint(0, LABELS, (batch,), generator=g)
    return [(images, labels)]


def logits_of(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def summed_loss(model: nn.Module, data, loss_fn) -> float:
    return float(sum(loss_fn(logits_of(model(x)), y) for x, y in data))


@torch.no_grad()
def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a model returns (last_hidden_state and pooler_output, or logits)."""
    out = model(x)
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def fd_quadratic(model: nn.Module, site: str, weight, bias, data, loss_fn, eps: float = EPS_FD) -> float:
    """2 (J(0) - J(eps)) / eps^2 with W = eps * weight, b = eps * bias inserted at ``site`` of a copy."""
    j0 = summed_loss(model, data, loss_fn)
    grown = insert_layer(copy.deepcopy(model), site, weight, bias, epsilon=eps)
    return 2.0 * (j0 - summed_loss(grown, data, loss_fn)) / eps**2


# -- transformers 4.x layout, rebuilt from real 5.x parts -------------------------------------------------
class ViTLayer(nn.Module):
    """A 4.x-style ViT block: same class name, ``forward(hidden_states, head_mask, output_attentions)``
    returning a 1-tuple. Wraps a real transformers 5.x ViTLayer."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.block = modeling_vit.ViTLayer(config)

    def forward(self, hidden_states, head_mask=None, output_attentions=False):
        return (self.block(hidden_states),)


class Encoder4x(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([ViTLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, head_mask):
        for i, layer_module in enumerate(self.layer):
            layer_outputs = layer_module(hidden_states, head_mask[i], False)
            hidden_states = layer_outputs[0]
        return hidden_states


class ViTModel4x(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = modeling_vit.ViTEmbeddings(config)
        self.encoder = Encoder4x(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values):
        # 4.x sizes the head mask by config.num_hidden_layers: an unsynced config fails with IndexError.
        head_mask = [None] * self.config.num_hidden_layers
        return self.layernorm(self.encoder(self.embeddings(pixel_values), head_mask))


class ViTForImageClassification4x(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViTModel4x(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pixel_values):
        return self.classifier(self.vit(pixel_values)[:, 0])


def make_vit4x(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ViTForImageClassification4x(vit_config()).double().eval()


# -- 1. sites -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "prefix"),
    [(ViTModel, ""), (ViTForImageClassification, "vit.")],
    ids=["ViTModel", "ViTForImageClassification"],
)
def test_sites_in_depth_order(cls, prefix):
    model = make_vit(cls)
    sites = get_family(model).sites(model)
    assert get_family(model).name == "vit"
    assert len(sites) == LAYERS + 1
    assert [s.name for s in sites] == [f"{prefix}embeddings"] + [f"{prefix}{BLOCKS}.{i}" for i in range(LAYERS)]
    assert [s.index for s in sites] == list(range(LAYERS + 1))
    assert {s.container for s in sites} == {f"{prefix}{BLOCKS}"}
    assert [s.position for s in sites] == list(range(LAYERS + 1))


# -- 2. finite differences --------------------------------------------------------------------------------
def test_score_matches_finite_differences_at_every_site():
    model, data = make_vit(), make_data()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    results = topological_derivative(model, data, loss_fn, rule="top1")
    assert [r.site for r in results] == ["vit.embeddings"] + [f"vit.{BLOCKS}.{i}" for i in range(LAYERS)]
    for r in results:
        assert r.score > 0, r
        assert r.num_samples == 4 * 5  # batch x (4 patches + CLS)
        assert r.quadratic == pytest.approx(r.score, rel=1e-8)  # top1: theta is the top eigenvector
        fd = fd_quadratic(model, r.site, r.weight, r.bias, data, loss_fn)
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


@pytest.mark.parametrize("whiten", [False, True], ids=["rowwise", "rowwise-whitened"])
def test_rowwise_rule_matches_finite_differences_at_every_site(whiten):
    """The row-wise rule on token-wise pre-LayerNorm sites (the adapt recipe's probe.rule=rowwise): the
    score is lambda_max(Q_t) as under every rule, theta^T Q theta matches finite differences, every row
    with positive curvature starts active, and whitened directions have unit mean-square pre-activation
    over the tokens."""
    from topotransfer.derivative.statistics import append_bias
    from topotransfer.init_rules import rowwise_site_results

    model, data = make_vit(), make_data()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    top1 = {r.site: r for r in topological_derivative(model, data, loss_fn, rule="top1")}
    results = rowwise_site_results(model, data, loss_fn, whiten=whiten)
    _, stats, layers, _ = compute_site_statistics(model, data, loss_fn)
    for r in results:
        assert r.score == pytest.approx(top1[r.site].score, rel=1e-8)
        lam = torch.linalg.eigvalsh(stats[r.site].Q)[:, -1]
        assert r.k == int((lam > 0).sum()) and r.k > 1  # every positive-curvature row, not a few
        assert r.quadratic > 0
        fd = fd_quadratic(model, r.site, r.weight, r.bias, data, loss_fn)
        assert fd == pytest.approx(r.quadratic, rel=1e-2), (r.site, fd, r.quadratic)
        if whiten:  # eps is the RMS pre-activation of the new layer over the tokens
            captured: dict = {}
            handle = model.get_submodule(r.site).register_forward_hook(
                lambda m, a, out, store=captured: store.setdefault("h", get_family(model).capture(out)))
            with torch.no_grad():
                model(data[0][0])
            handle.remove()
            z, _ = layers[r.site].samples(captured["h"], torch.zeros_like(captured["h"]))
            pre = append_bias(z, True) @ torch.cat([r.weight, r.bias[:, None]], 1).T
            assert float(pre.square().sum(1).mean()) == pytest.approx(1.0, rel=1e-3)


def test_random_direction_matches_quadratic_form():
    model, data = make_vit(), make_data()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    sites, stats, layers, j0 = compute_site_statistics(model, data, loss_fn)
    assert j0 == pytest.approx(summed_loss(model, data, loss_fn), rel=1e-12)
    g = torch.Generator().manual_seed(7)
    for site in sites:
        st = stats[site.name]
        score = float(torch.linalg.eigvalsh(st.Q).max())  # dense at d = 16
        weight = torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64)
        bias = torch.randn(HIDDEN, generator=g, dtype=torch.float64)
        norm = torch.cat([weight.flatten(), bias]).norm()
        weight, bias = weight / norm, bias / norm
        quad = st.quadratic(weight, bias)
        fd = fd_quadratic(model, site.name, weight, bias, data, loss_fn)
        assert abs(fd - quad) <= 1e-2 * abs(quad) + 1e-3 * score, (site.name, fd, quad, score)


# -- 3. identity at eps = 0 --------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls", [ViTModel, ViTForImageClassification], ids=["ViTModel", "ViTForImageClassification"])
def test_zero_layer_is_exact_identity_at_every_site(cls, attn):
    base = make_vit(cls, attn_implementation=attn)
    x = make_data()[0][0]
    before = outputs(base, x)
    family = get_family(base)
    for site in family.sites(base):
        model = copy.deepcopy(base)
        insert_layer(model, site.name)
        assert model.config.num_hidden_layers == LAYERS + 1
        block = model.get_submodule(site.container)[site.position]
        assert isinstance(block, TopoBlock) and not block.return_tuple
        assert isinstance(block.layer, TopoLayer) and block.layer.norm == "layernorm"
        assert block.layer.weight.dtype == torch.float64
        assert len(family.sites(model)) == LAYERS + 2
        after = outputs(model, x)
        assert len(after) == len(before)
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), site.name

        insert_layer(model, site.name)  # twice at the same site
        assert model.config.num_hidden_layers == LAYERS + 2
        assert len(family.sites(model)) == LAYERS + 3
        assert isinstance(model.get_submodule(site.container)[site.position + 1], TopoBlock)
        assert all(torch.equal(a, b) for a, b in zip(before, outputs(model, x), strict=True)), site.name


# -- 4. transformers 4.x layout (blocks at vit.encoder.layer returning tuples) ---------------------------------
def test_transformers4_layout_sites_identity_and_fd():
    base, data = make_vit4x(), make_data()
    x = data[0][0]
    family = get_family(base)
    sites = family.sites(base)
    assert [s.name for s in sites] == ["vit.embeddings"] + [f"vit.encoder.layer.{i}" for i in range(LAYERS)]
    assert {s.container for s in sites} == {"vit.encoder.layer"}
    before = outputs(base, x)
    for site in sites:
        model = insert_layer(copy.deepcopy(base), site.name)
        block = model.vit.encoder.layer[site.position]
        assert isinstance(block, TopoBlock) and block.return_tuple
        assert model.config.num_hidden_layers == LAYERS + 1  # else the 4.x head mask is too short
        assert all(torch.equal(a, b) for a, b in zip(before, outputs(model, x), strict=True)), site.name
        assert [s.name for s in family.sites(model)][-1] == f"vit.encoder.layer.{LAYERS}"

    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    r = topological_derivative(base, data, loss_fn, sites=["vit.encoder.layer.0"], rule="top1")[0]
    assert r.site == "vit.encoder.layer.0" and r.score > 0
    fd = fd_quadratic(base, r.site, r.weight, r.bias, data, loss_fn)
    assert fd == pytest.approx(r.score, rel=1e-2), (fd, r.score)


# -- 5. DeiT ----------------------------------------------------------------------------------------------------
def test_deit_sites_and_identity():
    deit = pytest.importorskip("transformers.models.deit")
    cfg = transformers.DeiTConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=IMAGE,
        patch_size=4,
        num_channels=CHANNELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=LABELS,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    base = deit.DeiTForImageClassification(cfg).double().eval()
    family = get_family(base)
    sites = family.sites(base)
    prefix = sites[1].container
    assert sites[0].name.endswith("embeddings") and len(sites) == LAYERS + 1
    assert [s.name for s in sites[1:]] == [f"{prefix}.{i}" for i in range(LAYERS)]
    x = make_data()[0][0]
    before = outputs(base, x)
    for site in sites:
        model = insert_layer(copy.deepcopy(base), site.name)
        assert model.config.num_hidden_layers == LAYERS + 1
        assert isinstance(model.get_submodule(site.container)[site.position], TopoBlock)
        assert all(torch.equal(a, b) for a, b in zip(before, outputs(model, x), strict=True)), site.name


# -- 6. unsupported models ---------------------------------------------------------------------------------------
def _albert():  # blocks shared across depth in layer groups: no block list to insert into
    return transformers.AlbertModel(
        transformers.AlbertConfig(vocab_size=32, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)
    )


def _opt():
    return transformers.OPTModel(
        transformers.OPTConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                               word_embed_proj_dim=16, max_position_embeddings=16)
    )


@pytest.mark.parametrize("build", [_albert, _opt], ids=["albert", "opt"])
def test_unsupported_model_lists_supported_families(build):
    model = build()
    with pytest.raises(UnsupportedModelError, match="Supported families") as info:
        get_family(model)
    message = str(info.value)
    assert type(model).__name__ in message and model.config.model_type in message
    assert "vit" in message and "deit" in message and "bert" in message


# -- 7. probes leave the model clean -------------------------------------------------------------------------------
def _hook_state(model: nn.Module) -> dict[str, tuple]:
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks))
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_probes_leave_model_clean(training):
    model, data = make_vit(), make_data()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    model.train(training)
    hooks = _hook_state(model)
    topological_derivative(model, data, loss_fn, rule="top1")
    assert _hook_state(model) == hooks
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_model_gives_same_scores():
    data, loss_fn = make_data(), nn.CrossEntropyLoss(reduction="sum")
    free = topological_derivative(make_vit(), data, loss_fn, rule="top1")
    model = make_vit()
    model.requires_grad_(False)
    frozen = topological_derivative(model, data, loss_fn, rule="top1")
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert [r.site for r in frozen] == [r.site for r in free]
    for a, b in zip(frozen, free, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-10, abs=1e-14)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-8, atol=1e-10)
