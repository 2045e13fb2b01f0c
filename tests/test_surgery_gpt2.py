"""GPT-2 family: sites, finite differences with padding and prompts, exact identity, KV-cache generation,
adapter and merged-export round trips.

Finite differences run in float64 with "sdpa" attention (eager attention's softmax runs in float32).
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from decoder_checks import (  # noqa: E402
    LENGTHS,
    PROMPTS,
    VOCAB,
    assert_cached_generation_is_exact,
    fd_quadratic,
    greedy,
    inputs_of,
    logits,
    make_batch,
    random_direction,
)
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402

from topotransfer import TopoBlock, get_family, insert_layer, topological_derivative  # noqa: E402
from topotransfer.adapter import load_adapter, load_merged, merge_and_save, save_adapter  # noqa: E402
from topotransfer.losses import CausalLMLoss  # noqa: E402
from topotransfer.models.hf import load_backbone  # noqa: E402

HIDDEN, LAYERS = 16, 3


def gpt2_config(**overrides) -> GPT2Config:
    kwargs = dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, initializer_range=0.2, attn_implementation="sdpa", bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def make_gpt2(cls=GPT2LMHeadModel, seed: int = 0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    return cls(gpt2_config(**overrides)).to(dtype).eval()


@pytest.mark.parametrize(("cls", "prefix"), [(GPT2Model, ""), (GPT2LMHeadModel, "transformer.")],
                         ids=["GPT2Model", "GPT2LMHeadModel"])
def test_sites_in_depth_order(cls, prefix):
    model = make_gpt2(cls)
    family = get_family(model)
    assert family.name == "gpt2"
    sites = family.sites(model)
    assert [s.name for s in sites] == [f"{prefix}drop"] + [f"{prefix}h.{i}" for i in range(LAYERS)]
    assert [s.position for s in sites] == list(range(LAYERS + 1))


def test_score_matches_finite_differences_at_every_site():
    model, data = make_gpt2(), [make_batch()]
    results = topological_derivative(model, data, CausalLMLoss(), rule="top1")
    assert [r.site for r in results] == ["transformer.drop"] + [f"transformer.h.{i}" for i in range(LAYERS)]
    for r in results:
        assert r.num_samples == sum(LENGTHS)  # padding tokens are not samples; prompt tokens are
        assert r.score > 0, r
        fd = fd_quadratic(model, r.site, r.weight, r.bias, data)
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


def test_probe_loss_masks_padding_and_prompt():
    """J counts exactly the target tokens: changing a padding or prompt label's id changes nothing."""
    model, batch = make_gpt2(), make_batch()
    lab = batch["labels"]
    assert int((lab != -100).sum()) == sum(n - p for n, p in zip(LENGTHS, PROMPTS, strict=True))
    out = logits(model, batch)
    j = CausalLMLoss()(out, lab)
    ref = sum(
        -torch.log_softmax(out[b, l - 1], -1)[lab[b, l]] for b in range(lab.shape[0]) for l in range(1, lab.shape[1])
        if lab[b, l] != -100
    )
    assert float(j) == pytest.approx(float(ref), rel=1e-12)
    with pytest.raises(ValueError, match="mean"):
        topological_derivative(model, [batch], torch.nn.CrossEntropyLoss())  # mean reduction is refused


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zero_layer_is_exact_identity_at_every_site(attn):
    base = make_gpt2(attn_implementation=attn)
    batch = make_batch()
    before = base(**inputs_of(batch))
    for site in get_family(base).sites(base):
        model = insert_layer(copy.deepcopy(base), site.name)
        assert model.config.num_hidden_layers == model.config.n_layer == LAYERS + 1
        assert isinstance(model.get_submodule(site.container)[site.position], TopoBlock)
        after = model(**inputs_of(batch))
        assert torch.equal(before.logits, after.logits), site.name


def test_generate_with_kv_cache_after_insertion():
    base = make_gpt2()
    prompt = make_batch()["input_ids"][:2, :3]
    expected, _ = greedy(base, prompt)
    # identity insertions at every site: generation unchanged
    zero = copy.deepcopy(base)
    for site in reversed(get_family(zero).sites(zero)):
        insert_layer(zero, site.name)
    assert torch.equal(greedy(zero, prompt)[0], expected)
    # non-zero layers: cached generation is exact (the cache slots of the original blocks are unchanged)
    model = copy.deepcopy(base)
    for i, site in enumerate(["transformer.drop", "transformer.h.1"]):
        w, b = random_direction(model, i)
        insert_layer(model, site, w, b, epsilon=0.5)
    assert [blk.attn.layer_idx for blk in model.transformer.h if not isinstance(blk, TopoBlock)] == [0, 1, 2]
    seq = assert_cached_generation_is_exact(model, prompt)
    assert not torch.equal(seq, expected)  # the layers do change the model


def test_adapter_and_merged_round_trip_then_generate(tmp_path):
    make_gpt2(dtype=torch.float32).save_pretrained(tmp_path / "base")
    base_dir = str(tmp_path / "base")
    model = load_backbone(base_dir, architecture="GPT2LMHeadModel")
    for i, site in enumerate(["transformer.h.2", "transformer.drop"]):
        w, b = random_direction(model, i)
        insert_layer(model, site, w.float(), b.float(), epsilon=0.3)
    batch = make_batch()
    adapter = save_adapter(model, base_dir, None, None, tmp_path / "adapter")
    assert adapter.base_num_hidden_layers == LAYERS and adapter.architecture == "GPT2LMHeadModel"
    assert adapter.head == []  # the LM head is the base's (tied to the embeddings)
    loaded = load_adapter(None, tmp_path / "adapter")
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    prompt = batch["input_ids"][:2, :3]
    assert torch.equal(greedy(loaded, prompt)[0], greedy(model, prompt)[0])
    merge_and_save(model, tmp_path / "merged", base_name_or_path=base_dir)
    merged = load_merged(tmp_path / "merged")
    assert torch.equal(logits(merged, batch), logits(model, batch))
    assert torch.equal(greedy(merged, prompt)[0], greedy(model, prompt)[0])


def test_sites_inside_blocks(tmp_path):
    """The residual stream after the attention add (input of ln_2): exact identity with a zero layer (eager and
    sdpa), FD at each site, cached generation, adapter and merged round trips with layers there."""
    base, batch = make_gpt2(), make_batch()
    family = get_family(base)
    subs = family.sites(base, "sublayers")
    assert [s.name for s in subs] == [f"transformer.h.{i}.ln_2" for i in range(LAYERS)]
    for attn in ("eager", "sdpa"):
        ref = make_gpt2(attn_implementation=attn)
        before = logits(ref, batch)
        for site in subs:
            model = insert_layer(copy.deepcopy(ref), site.name)
            assert model.config.num_hidden_layers == LAYERS
            assert torch.equal(logits(model, batch), before), (attn, site.name)
    for r in topological_derivative(base, [batch], CausalLMLoss(), sites=[s.name for s in subs], rule="top1"):
        assert r.num_samples == sum(LENGTHS) and r.score > 0
        fd = fd_quadratic(base, r.site, r.weight, r.bias, [batch])
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)
    model = copy.deepcopy(base)
    w, b = random_direction(model, 3)
    insert_layer(model, "transformer.h.2.ln_2", w, b, epsilon=0.5)
    insert_layer(model, "transformer.drop", w, b, epsilon=0.5)
    assert_cached_generation_is_exact(model, batch["input_ids"][:2, :3])

    make_gpt2(dtype=torch.float32).save_pretrained(tmp_path / "base")
    base_dir = str(tmp_path / "base")
    model = load_backbone(base_dir, architecture="GPT2LMHeadModel")
    insert_layer(model, "transformer.h.0.ln_2", w.float(), b.float(), epsilon=0.3)
    insert_layer(model, "transformer.h.1", w.float(), b.float(), epsilon=0.3)
    save_adapter(model, base_dir, None, None, tmp_path / "adapter")
    assert torch.equal(logits(load_adapter(base_dir, tmp_path / "adapter"), batch), logits(model, batch))
    merge_and_save(model, tmp_path / "merged")
    assert torch.equal(logits(load_merged(tmp_path / "merged"), batch), logits(model, batch))


def test_line_search_on_a_decoder_uses_full_passes_and_never_raises_the_loss():
    """The eps line search (realized site selection) on a decoder: the family has no downstream shortcut, so it
    runs full forward passes; the model comes back unchanged and the chosen eps gives the reported loss."""
    from topotransfer import line_search_epsilon

    model, probe, held_out = make_gpt2(), [make_batch(seed=1)], [make_batch(seed=2)]
    before = logits(model, held_out[0])
    r = topological_derivative(model, probe, CausalLMLoss(), rule="top1")[1]
    ls = line_search_epsilon(model, r, held_out, CausalLMLoss())
    assert not ls.downstream and ls.loss <= ls.baseline_loss
    assert torch.equal(logits(model, held_out[0]), before) and model.config.num_hidden_layers == LAYERS
    grown = insert_layer(copy.deepcopy(model), r, epsilon=ls.epsilon)
    with torch.no_grad():
        loss = float(CausalLMLoss()(logits(grown, held_out[0]), held_out[0]["labels"]))
    assert loss == pytest.approx(ls.loss, rel=1e-12)
