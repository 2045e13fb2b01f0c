"""Block expansion (copied blocks, LLaMA-Pro style): exact identity at insertion, the first-order derivative
D_t against autograd and finite differences in float64 at every site, only the copies train, KV-cache
generation after expansion, adapter / merged-export round trips, and the placement baselines."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from decoder_checks import (  # noqa: E402
    VOCAB,
    assert_cached_generation_is_exact,
    exact_rmsnorm,
    greedy,
    logits,
    make_batch,
    summed_loss,
)
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from topotransfer import get_family  # noqa: E402
from topotransfer.adapter import load_adapter, load_merged, merge_and_save, save_adapter  # noqa: E402
from topotransfer.expansion import (  # noqa: E402
    choose_sites,
    copies_parameter_count,
    copy_site_scores,
    expand,
    freeze_all_but_copies,
    insert_copied_block,
    line_search_copy,
    lora_rank_matching,
    on_top_sites,
    realized_copy_sites,
    uniform_interleave_sites,
)
from topotransfer.losses import CausalLMLoss  # noqa: E402
from topotransfer.models.hf import load_backbone  # noqa: E402
from topotransfer.surgery import CopiedBlock  # noqa: E402

HIDDEN, LAYERS = 16, 4
EPS_FD = 1e-5


def make_gpt2(seed: int = 0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=32, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2, attn_implementation="sdpa", bos_token_id=1,
                  eos_token_id=2)
    return GPT2LMHeadModel(GPT2Config(**{**kwargs, **overrides})).to(dtype).eval()


def make_llama(seed: int = 0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=LAYERS,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.2,
                  attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=0, mlp_bias=True,
                  attention_bias=True)  # biases on the output projections too
    return LlamaForCausalLM(LlamaConfig(**{**kwargs, **overrides})).to(dtype).eval()


BUILDERS = {"gpt2": make_gpt2, "llama": make_llama}


def attention_slots(model) -> list[int]:
    _, container = get_family(model).chain(model)
    return [m.layer_idx for m in model.get_submodule(container).modules()
            if isinstance(getattr(m, "layer_idx", None), int) and not m.__class__.__name__.endswith(("Layer", "Block"))]


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_zero_copy_is_exact_identity_at_every_site(arch):
    base, batch = BUILDERS[arch](), make_batch()
    before = logits(base, batch)
    family = get_family(base)
    for site in family.sites(base):
        model = copy.deepcopy(base)
        block = insert_copied_block(model, site.name)
        assert isinstance(model.get_submodule(site.container)[site.position], CopiedBlock)
        assert block.source == max(site.position - 1, 0)
        assert model.config.num_hidden_layers == LAYERS + 1
        assert attention_slots(model) == list(range(LAYERS + 1))  # dense cache slots in depth order
        assert torch.equal(logits(model, batch), before), site.name
    model = copy.deepcopy(base)
    positions = expand(model, [s.name for s in family.sites(base)])  # a copy at every site at once
    assert positions == [2 * i for i in range(LAYERS + 1)]
    assert torch.equal(logits(model, batch), before)
    assert family.remove(model, family.sites(model)[0]).__class__ is CopiedBlock  # the inverse of insert


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_first_order_derivative_matches_autograd_and_finite_differences(arch):
    """D_t (one probe pass + one block forward per site) equals minus the gradient of the output projections
    of a zero copy inserted at t, and the central difference of J(eps Theta) for Theta = D_t/||D_t|| and for
    a random direction: J(eps) = J(0) - eps <D_t, Theta> + O(eps^2)."""
    model, data = exact_rmsnorm(BUILDERS[arch]()), [make_batch()]
    loss_fn = CausalLMLoss()
    scores = copy_site_scores(model, data, loss_fn)
    family = get_family(model)
    assert [s.site for s in scores] == [s.name for s in family.sites(model)]
    g = torch.Generator().manual_seed(5)
    for s in scores:
        assert s.score > 0 and s.num_samples == int(data[0]["attention_mask"].sum())
        names = sorted(s.direction)
        assert all(n.split(".")[-2] in ("o_proj", "down_proj", "c_proj") for n in names) and len(names) >= 4
        # autograd: minus the gradient of a zero copy's output projections
        grown = copy.deepcopy(model)
        block = insert_copied_block(grown, s.site)
        loss = loss_fn(grown(**{k: v for k, v in data[0].items() if k != "labels"}).logits, data[0]["labels"])
        params = dict(block.block.named_parameters())
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, gr in zip(names, grads, strict=True):
            torch.testing.assert_close(-gr, s.score * s.direction[n], rtol=1e-8, atol=1e-10)
        # finite differences along D_t / ||D_t|| and along a random unit direction
        rand = {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in s.direction.items()}
        norm = torch.sqrt(sum((t * t).sum() for t in rand.values()))
        rand = {n: t / norm for n, t in rand.items()}
        for theta, expected in ((s.direction, s.score),
                                (rand, float(sum((s.score * s.direction[n] * rand[n]).sum() for n in names)))):
            j = []
            for eps in (EPS_FD, -EPS_FD):
                m = copy.deepcopy(model)
                insert_copied_block(m, s.site, theta, epsilon=eps)
                j.append(summed_loss(m, data, loss_fn))
            fd = (j[1] - j[0]) / (2 * EPS_FD)  # -dJ/deps
            assert fd == pytest.approx(expected, rel=1e-4, abs=1e-6 * s.score), (s.site, fd, expected)


def test_only_copies_train_and_only_their_output_projections_get_gradient_at_step_0():
    model, batch = make_llama(), make_batch()
    expand(model, uniform_interleave_sites(model, 2))
    trainable = freeze_all_but_copies(model)
    copies = [b for b in model.model.layers if isinstance(b, CopiedBlock)]
    assert len(copies) == 2 and {id(p) for p in trainable} == {id(p) for c in copies for p in c.parameters()}
    assert all(not p.requires_grad for p in model.parameters() if id(p) not in {id(q) for q in trainable})
    model.train()
    loss = CausalLMLoss()(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
    loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    for c in copies:
        for n, p in c.block.named_parameters():
            if n.startswith(("self_attn.o_proj", "mlp.down_proj")):
                assert p.grad.abs().sum() > 0, n
            else:  # every other parameter feeds through a zero output projection
                assert torch.count_nonzero(p.grad) == 0, n


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_generate_with_kv_cache_after_expansion(arch):
    model, batch = BUILDERS[arch](), make_batch()
    prompt = batch["input_ids"][:2, :3]
    expected, _ = greedy(model, prompt)
    zero = copy.deepcopy(model)
    expand(zero, on_top_sites(zero, 2) + [get_family(zero).sites(zero)[0].name])
    assert torch.equal(greedy(zero, prompt)[0], expected)
    scores = copy_site_scores(model, [batch], CausalLMLoss())
    # a copy at the stem site (before every original block: every cache slot shifts) and one in the middle
    expand(model, [scores[0], scores[2]], epsilon=2.0)
    assert attention_slots(model) == list(range(LAYERS + 2))
    assert not torch.equal(assert_cached_generation_is_exact(model, prompt), expected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_and_merged_round_trip_with_copies(arch, tmp_path):
    BUILDERS[arch](dtype=torch.float32).save_pretrained(tmp_path / "base")
    base_dir = str(tmp_path / "base")
    model = load_backbone(base_dir, architecture=type(BUILDERS[arch]()).__name__)
    batch = make_batch()
    scores = copy_site_scores(model, [batch], CausalLMLoss())
    expand(model, choose_sites(scores, 2), epsilon=0.5)
    adapter = save_adapter(model, base_dir, None, None, tmp_path / "adapter")
    assert [r["layer"]["type"] for r in adapter.insertions] == ["copied_block"] * 2
    loaded = load_adapter(base_dir, tmp_path / "adapter")
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    prompt = batch["input_ids"][:2, :3]
    assert torch.equal(greedy(loaded, prompt)[0], greedy(model, prompt)[0])
    merge_and_save(model, tmp_path / "merged")
    merged = load_merged(tmp_path / "merged")
    assert torch.equal(logits(merged, batch), logits(model, batch))
    assert torch.equal(greedy(merged, prompt)[0], greedy(model, prompt)[0])


def test_placement_baselines_and_budget():
    model = make_gpt2()
    assert uniform_interleave_sites(model, 2) == ["transformer.h.1", "transformer.h.3"]  # LLaMA-Pro: after each group
    assert uniform_interleave_sites(model, 4) == [f"transformer.h.{i}" for i in range(4)]
    assert uniform_interleave_sites(model, 3) == ["transformer.h.1", "transformer.h.2", "transformer.h.3"]
    assert on_top_sites(model, 2) == ["transformer.h.3"] * 2
    with pytest.raises(ValueError, match="budget"):
        uniform_interleave_sites(model, 5)
    batch = make_batch()
    scores = copy_site_scores(model, [batch], CausalLMLoss())
    chosen = choose_sites(scores, 2)
    top = sorted(scores, key=lambda s: -s.score)[:2]
    assert {s.site for s in chosen} == {s.site for s in top} and [s.index for s in chosen] == sorted(s.index for s in top)
    with pytest.raises(ValueError, match="budget"):
        choose_sites(scores, 0)
    # stacking on top: both copies duplicate the last original block
    stacked = copy.deepcopy(model)
    assert expand(stacked, on_top_sites(stacked, 2)) == [LAYERS, LAYERS + 1]
    last = dict(model.transformer.h[LAYERS - 1].attn.c_attn.named_parameters())["weight"]
    assert all(torch.equal(b.block.attn.c_attn.weight, last) for b in stacked.transformer.h[LAYERS:])
    # a small step along the chosen directions lowers the probe loss (first order: by ~ eps * sum of scores)
    j0 = summed_loss(model, [batch])
    grown = copy.deepcopy(model)
    expand(grown, chosen, epsilon=1e-3)
    assert summed_loss(grown, [batch]) < j0
    with pytest.raises(TypeError, match="decoder-LM family"):
        copy_site_scores(transformers.BertModel(transformers.BertConfig(
            vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)), [], None)


def test_realized_selection_by_line_search():
    """The line search leaves the model unchanged, never accepts a loss increase, and its best eps inserted for
    real gives exactly the loss it reported; realized_copy_sites keeps the largest decreases."""
    model = make_gpt2()
    probe, held_out = make_batch(seed=1), make_batch(seed=2)
    scores = copy_site_scores(model, [probe], CausalLMLoss())
    before = logits(model, held_out)
    searches = [line_search_copy(model, s, [held_out], CausalLMLoss()) for s in scores]
    assert torch.equal(logits(model, held_out), before) and model.config.num_hidden_layers == LAYERS
    for s, ls in zip(scores, searches, strict=True):
        assert ls.tried[0] == (0.0, ls.baseline) and ls.loss <= ls.baseline and ls.decrease >= 0
        grown = copy.deepcopy(model)
        expand(grown, [s], epsilon=ls.epsilon)
        assert summed_loss(grown, [held_out]) == pytest.approx(ls.loss, rel=1e-12)
    chosen = realized_copy_sites(model, scores, [held_out], CausalLMLoss(), budget=2)
    expected = sorted(range(len(scores)), key=lambda i: -searches[i].decrease)[:2]
    assert [s.site for s, _ in chosen] == [scores[i].site for i in sorted(expected)]
    grown = copy.deepcopy(model)
    expand(grown, [s for s, _ in chosen], epsilon=[ls.epsilon for _, ls in chosen])
    assert summed_loss(grown, [held_out]) < searches[0].baseline


def test_copy_of_a_block_holding_a_layer_inside_copies_the_block_only():
    model, batch = make_llama(), make_batch()
    from topotransfer import insert_layer

    g = torch.Generator().manual_seed(0)
    insert_layer(model, "model.layers.1.post_attention_layernorm", torch.randn(HIDDEN, HIDDEN, generator=g),
                 torch.randn(HIDDEN, generator=g), epsilon=0.5)
    before = logits(model, batch)
    block = insert_copied_block(model, "model.layers.1")
    assert not hasattr(block.block, "topo_mid") and type(block.block) is type(make_llama().model.layers[0])
    assert torch.equal(logits(model, batch), before)


@pytest.mark.parametrize(("arch", "targets"), [("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"])])
def test_lora_baseline_at_the_parameter_budget_of_the_copies(arch, targets):
    peft = pytest.importorskip("peft")
    model = BUILDERS[arch]()
    sites = uniform_interleave_sites(model, 2)
    budget = copies_parameter_count(model, sites)
    grown = copy.deepcopy(model)
    expand(grown, sites)
    assert budget == sum(p.numel() for p in freeze_all_but_copies(grown))
    r = lora_rank_matching(model, budget, targets)
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, target_modules=targets))
    count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    per_rank = count // r
    assert count == r * per_rank <= budget < (r + 1) * per_rank
    with pytest.raises(ValueError, match="no 2-D weight module"):
        lora_rank_matching(model, budget, ["nonexistent"])


def test_scores_leave_the_model_clean_and_handle_a_source_with_a_layer_inside():
    """copy_site_scores runs the source blocks themselves (outputs of their projections zeroed by hooks): no hook
    stays, nothing changes; a source holding a layer inside it is scored on its copy (which has no such layer)."""
    from topotransfer import insert_layer

    model, batch = make_llama(), make_batch()
    g = torch.Generator().manual_seed(0)
    insert_layer(model, "model.layers.1.post_attention_layernorm", torch.randn(HIDDEN, HIDDEN, generator=g),
                 torch.randn(HIDDEN, generator=g), epsilon=0.5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = copy_site_scores(model, [batch], CausalLMLoss())
    assert model.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    site = next(s for s in scores if s.site == "model.layers.1")  # its source holds the inserted layer
    grown = copy.deepcopy(model)
    block = insert_copied_block(grown, site.site)
    loss = CausalLMLoss()(grown(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
    names = sorted(site.direction)
    params = dict(block.block.named_parameters())
    for n, gr in zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True):
        torch.testing.assert_close(-gr, site.score * site.direction[n], rtol=1e-8, atol=1e-10)
