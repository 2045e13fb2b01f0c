"""BERT / RoBERTa family: sites, exact identity at eps = 0, finite differences with padded batches.

Text batches are padded: tokens whose ``attention_mask`` is 0 must not enter the statistics. Their adjoint
is exactly zero (masked keys get no attention, the head reads the CLS token), so the mask changes the
sample count and the cache, not Q; the padding test pins both facts against unpadded sequences.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from topotransfer import TopoBlock, compute_site_statistics, get_family, insert_layer, topological_derivative  # noqa: E402
from topotransfer.derivative.topological import sample_mask  # noqa: E402

HIDDEN, LAYERS, LABELS, VOCAB, SEQ = 16, 2, 3, 40, 6
LENGTHS = (6, 4, 3)  # real tokens per sequence; the rest is padding
EPS_FD = 1e-4
PAD = 1  # RoBERTa's padding_idx; BERT is told to use the same id


def _kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ + 4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=LABELS,
        initializer_range=0.2,  # adjoints far from zero
        pad_token_id=PAD,
        # eager attention computes softmax in float32 even in float64 models: FD needs sdpa
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return kwargs


def make_bert(cls=BertForSequenceClassification, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return cls(BertConfig(**_kwargs(**overrides))).double().eval()


def make_roberta(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(RobertaConfig(**_kwargs(**overrides))).double().eval()


def make_batch(seed: int = 1, lengths=LENGTHS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (len(lengths), SEQ), generator=g)
    mask = torch.zeros(len(lengths), SEQ, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, PAD)
    labels = torch.randint(0, LABELS, (len(lengths),), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def summed_loss(model: nn.Module, data, loss_fn) -> float:
    total = 0.0
    for batch in data:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        total += float(loss_fn(model(**inputs).logits, batch["labels"]))
    return total


@torch.no_grad()
def outputs(model: nn.Module, batch: dict) -> list[torch.Tensor]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def fd_quadratic(model, site, weight, bias, data, loss_fn, eps=EPS_FD) -> float:
    j0 = summed_loss(model, data, loss_fn)
    grown = insert_layer(copy.deepcopy(model), site, weight, bias, epsilon=eps)
    return 2.0 * (j0 - summed_loss(grown, data, loss_fn)) / eps**2


@pytest.mark.parametrize(
    ("build", "prefix"),
    [(lambda: make_bert(BertModel), ""), (make_bert, "bert."), (make_roberta, "roberta.")],
    ids=["BertModel", "BertForSequenceClassification", "RobertaForSequenceClassification"],
)
def test_sites_in_depth_order(build, prefix):
    model = build()
    family = get_family(model)
    assert family.name == "bert"
    assert [s.name for s in family.sites(model)] == [f"{prefix}embeddings"] + [
        f"{prefix}encoder.layer.{i}" for i in range(LAYERS)
    ]


@pytest.mark.parametrize("build", [make_bert, make_roberta], ids=["bert", "roberta"])
def test_score_matches_finite_differences_with_padding(build):
    model, data = build(), [make_batch()]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    results = topological_derivative(model, data, loss_fn, rule="top1")
    assert len(results) == LAYERS + 1
    for r in results:
        assert r.num_samples == sum(LENGTHS)  # padding tokens are not samples
        assert r.score > 0, r
        fd = fd_quadratic(model, r.site, r.weight, r.bias, data, loss_fn)
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


def test_padding_equals_unpadded_sequences():
    """Padded batch + mask gives the statistics of the same sequences run one by one without padding."""
    model = make_bert()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    padded = make_batch()
    singles = []
    for b, n in enumerate(LENGTHS):
        singles.append({k: (v[b : b + 1, :n] if v.dim() == 2 else v[b : b + 1]) for k, v in padded.items()})
    sites, stats_p, _, jp = compute_site_statistics(model, [padded], loss_fn, solver="dense")
    _, stats_s, _, js = compute_site_statistics(model, singles, loss_fn, solver="dense")
    assert jp == pytest.approx(js, rel=1e-10)
    for s in sites:
        assert stats_p[s.name].count == stats_s[s.name].count == sum(LENGTHS)
        torch.testing.assert_close(stats_p[s.name].Q, stats_s[s.name].Q, rtol=1e-7, atol=1e-10)
    # matrix-free caches hold only the real tokens
    _, mf, _, _ = compute_site_statistics(model, [padded], loss_fn, solver="matrix_free")
    for s in sites:
        assert mf[s.name]._rows()[0].shape[0] == sum(LENGTHS)
        torch.testing.assert_close(mf[s.name].dense(), stats_p[s.name].Q, rtol=1e-7, atol=1e-10)


def test_bad_attention_mask_shape_is_a_clear_error():
    state = torch.zeros(2, 5, HIDDEN)
    assert sample_mask({"input_ids": torch.zeros(2, 5)}, state) is None
    assert sample_mask(torch.zeros(2, 5), state) is None
    assert sample_mask({"attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])}, state).sum() == 7
    with pytest.raises(ValueError, match="attention_mask of shape"):
        sample_mask({"attention_mask": torch.ones(2, 1, 5, 5)}, state)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("build", [make_bert, make_roberta], ids=["bert", "roberta"])
def test_zero_layer_is_exact_identity_at_every_site(build, attn):
    base = build(attn_implementation=attn)
    batch = make_batch()
    before = outputs(base, batch)
    family = get_family(base)
    for site in family.sites(base):
        model = insert_layer(copy.deepcopy(base), site.name)
        assert model.config.num_hidden_layers == LAYERS + 1
        block = model.get_submodule(site.container)[site.position]
        assert isinstance(block, TopoBlock) and not block.return_tuple
        after = outputs(model, batch)
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), site.name
