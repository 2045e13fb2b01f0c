"""Llama layout (Llama, Qwen2, Mistral): sites, finite differences with padding and prompts, exact identity,
KV-cache generation (rotary embeddings and cache kwargs pass through an inserted block), adapter round trip.

transformers' RMSNorm computes in float32 even for float64 inputs: finite-difference tests switch it to
float64 (:func:`decoder_checks.exact_rmsnorm`); identity and generation tests use the model as it is.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from decoder_checks import (  # noqa: E402
    LENGTHS,
    VOCAB,
    assert_cached_generation_is_exact,
    exact_rmsnorm,
    fd_quadratic,
    greedy,
    logits,
    make_batch,
    random_direction,
)
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from topotransfer import TopoBlock, UnsupportedModelError, get_family, insert_layer, topological_derivative  # noqa: E402
from topotransfer.adapter import load_adapter, save_adapter  # noqa: E402
from topotransfer.losses import CausalLMLoss  # noqa: E402
from topotransfer.models.hf import load_backbone  # noqa: E402

HIDDEN, LAYERS = 16, 2
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.2, attn_implementation="sdpa",
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def make_lm(arch: str = "llama", seed: int = 0, dtype=torch.float64, cls=None, **overrides):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    return (cls or model_cls)(config_cls(**{**_COMMON, **overrides})).to(dtype).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sites_in_depth_order(arch):
    model = make_lm(arch)
    family = get_family(model)
    assert family.name == "llama"
    assert [s.name for s in family.sites(model)] == ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(LAYERS)]
    base = make_lm(cls=LlamaModel)
    assert [s.name for s in family.sites(base)] == ["embed_tokens"] + [f"layers.{i}" for i in range(LAYERS)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_score_matches_finite_differences_at_every_site(arch):
    model, data = exact_rmsnorm(make_lm(arch)), [make_batch()]
    results = topological_derivative(model, data, CausalLMLoss(), rule="top1")
    assert len(results) == LAYERS + 1
    for r in results:
        assert r.num_samples == sum(LENGTHS)
        assert r.score > 0, r
        fd = fd_quadratic(model, r.site, r.weight, r.bias, data)
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_zero_layer_is_exact_identity_at_every_site(arch, attn):
    base = make_lm(arch, attn_implementation=attn)
    batch = make_batch()
    before = logits(base, batch)
    for site in get_family(base).sites(base):
        model = insert_layer(copy.deepcopy(base), site.name)
        assert model.config.num_hidden_layers == LAYERS + 1
        if getattr(model.config, "layer_types", None) is not None:
            assert len(model.config.layer_types) == LAYERS + 1
        assert isinstance(model.get_submodule(site.container)[site.position], TopoBlock)
        assert torch.equal(logits(model, batch), before), site.name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_with_kv_cache_after_insertion(arch):
    base = make_lm(arch)
    prompt = make_batch()["input_ids"][:2, :3]
    expected, _ = greedy(base, prompt)
    zero = insert_layer(insert_layer(copy.deepcopy(base), "model.layers.0"), "model.embed_tokens")
    assert torch.equal(greedy(zero, prompt)[0], expected)
    model = copy.deepcopy(base)
    for i, site in enumerate(["model.embed_tokens", "model.layers.1"]):  # a TopoBlock at position 0, before every slot
        w, b = random_direction(model, i)
        insert_layer(model, site, w, b, epsilon=0.5)
    assert [blk.self_attn.layer_idx for blk in model.model.layers if not isinstance(blk, TopoBlock)] == [0, 1]
    assert not torch.equal(assert_cached_generation_is_exact(model, prompt), expected)


def test_mixed_layer_types_are_refused():
    model = make_lm("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert len(set(model.config.layer_types)) == 2
    with pytest.raises(UnsupportedModelError, match="mixes layer types"):
        insert_layer(model, "model.layers.0")
    assert model.config.num_hidden_layers == LAYERS and len(model.model.layers) == LAYERS  # nothing changed


def test_adapter_round_trip_then_generate(tmp_path):
    make_lm(dtype=torch.float32).save_pretrained(tmp_path / "base")
    base_dir = str(tmp_path / "base")
    model = load_backbone(base_dir, architecture="LlamaForCausalLM")
    for i, site in enumerate(["model.layers.1", "model.embed_tokens"]):
        w, b = random_direction(model, i)
        insert_layer(model, site, w.float(), b.float(), epsilon=0.3)
    save_adapter(model, base_dir, None, None, tmp_path / "adapter")
    loaded = load_adapter(base_dir, tmp_path / "adapter")
    batch = make_batch()
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    prompt = batch["input_ids"][:2, :3]
    assert torch.equal(greedy(loaded, prompt)[0], greedy(model, prompt)[0])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sites_inside_blocks(arch, tmp_path):
    """The residual stream after the attention add (input of post_attention_layernorm): exact identity with a
    zero layer (eager and sdpa), FD at each site, cached generation and adapter round trip with a layer there."""
    base, batch = make_lm(arch), make_batch()
    family = get_family(base)
    subs = family.sites(base, "sublayers")
    assert [s.name for s in subs] == [f"model.layers.{i}.post_attention_layernorm" for i in range(LAYERS)]
    assert [s.name for s in family.sites(base, "all")][1:3] == ["model.layers.0.post_attention_layernorm",
                                                                 "model.layers.0"]
    for attn in ("eager", "sdpa"):
        ref = make_lm(arch, attn_implementation=attn)
        before = logits(ref, batch)
        for site in subs:
            model = insert_layer(copy.deepcopy(ref), site.name)
            assert model.config.num_hidden_layers == LAYERS
            assert torch.equal(logits(model, batch), before), (attn, site.name)
    exact = exact_rmsnorm(copy.deepcopy(base))
    for r in topological_derivative(exact, [batch], CausalLMLoss(), sites=[s.name for s in subs], rule="top1"):
        assert r.num_samples == sum(LENGTHS) and r.score > 0
        fd = fd_quadratic(exact, r.site, r.weight, r.bias, [batch])
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)
    model = copy.deepcopy(base)
    w, b = random_direction(model, 3)
    insert_layer(model, subs[0].name, w, b, epsilon=0.5)
    insert_layer(model, "model.embed_tokens", w, b, epsilon=0.5)  # shifts the block holding the layer
    assert [n for n, _, _ in family.inside_layers(model)] == ["model.layers.1.post_attention_layernorm"]
    assert_cached_generation_is_exact(model, batch["input_ids"][:2, :3])
    assert family.remove(model, "model.layers.1.post_attention_layernorm") is not None
    assert type(model.model.layers[1]) is type(base.model.layers[0])  # the original class is back
    if arch == "llama":
        make_lm(arch, dtype=torch.float32).save_pretrained(tmp_path / "base")
        loaded_base = load_backbone(str(tmp_path / "base"), architecture="LlamaForCausalLM")
        insert_layer(loaded_base, "model.layers.1.post_attention_layernorm", w.float(), b.float(), epsilon=0.3)
        insert_layer(loaded_base, "model.embed_tokens", w.float(), b.float(), epsilon=0.3)
        save_adapter(loaded_base, str(tmp_path / "base"), None, None, tmp_path / "adapter")
        loaded = load_adapter(str(tmp_path / "base"), tmp_path / "adapter")
        assert torch.equal(logits(loaded, batch), logits(loaded_base, batch))
