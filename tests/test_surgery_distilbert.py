"""DistilBERT family: sites, finite differences with padded batches, exact identity at eps = 0, adapter
round trip, and the adapt recipe on a tiny DistilBERT with its own tokenizer (offline)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    DistilBertTokenizer,
)

from topotransfer import TopoBlock, get_family, insert_layer, topological_derivative  # noqa: E402
from topotransfer.adapter import load_adapter, load_merged, save_adapter  # noqa: E402
from topotransfer.models.hf import backbone_modality, load_backbone  # noqa: E402

HIDDEN, LAYERS, LABELS, VOCAB, SEQ = 16, 2, 3, 40, 6
LENGTHS = (6, 4, 3)
PAD = 0
EPS_FD = 1e-4


def distilbert_config(**overrides) -> DistilBertConfig:
    kwargs = dict(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=2, hidden_dim=32, dropout=0.0,
                  attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=LABELS, initializer_range=0.2,
                  max_position_embeddings=16, pad_token_id=PAD, attn_implementation="sdpa")
    kwargs.update(overrides)
    return DistilBertConfig(**kwargs)


def make_distilbert(cls=DistilBertForSequenceClassification, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return cls(distilbert_config(**overrides)).double().eval()


def make_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), SEQ), generator=g)
    mask = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    return {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask,
            "labels": torch.randint(0, LABELS, (len(LENGTHS),), generator=g)}


def inputs_of(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def summed_loss(model, data, loss_fn) -> float:
    return float(sum(loss_fn(model(**inputs_of(b)).logits, b["labels"]) for b in data))


@torch.no_grad()
def outputs(model, batch) -> list[torch.Tensor]:
    return [t for t in model(**inputs_of(batch)).to_tuple() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize(("cls", "prefix"), [(DistilBertModel, ""), (DistilBertForSequenceClassification, "distilbert.")],
                         ids=["DistilBertModel", "DistilBertForSequenceClassification"])
def test_sites_in_depth_order(cls, prefix):
    model = make_distilbert(cls)
    family = get_family(model)
    assert family.name == "distilbert"
    assert [s.name for s in family.sites(model)] == [f"{prefix}embeddings"] + [
        f"{prefix}transformer.layer.{i}" for i in range(LAYERS)
    ]


def test_score_matches_finite_differences_with_padding():
    model, data = make_distilbert(), [make_batch()]
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    results = topological_derivative(model, data, loss_fn, rule="top1")
    assert len(results) == LAYERS + 1
    j0 = summed_loss(model, data, loss_fn)
    for r in results:
        assert r.num_samples == sum(LENGTHS) and r.score > 0
        grown = insert_layer(copy.deepcopy(model), r.site, r.weight, r.bias, epsilon=EPS_FD)
        fd = 2.0 * (j0 - summed_loss(grown, data, loss_fn)) / EPS_FD**2
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zero_layer_is_exact_identity_at_every_site(attn):
    base, batch = make_distilbert(attn_implementation=attn), make_batch()
    before = outputs(base, batch)
    for site in get_family(base).sites(base):
        model = insert_layer(copy.deepcopy(base), site.name)
        assert model.config.n_layers == model.config.num_hidden_layers == LAYERS + 1
        assert isinstance(model.get_submodule(site.container)[site.position], TopoBlock)
        assert all(torch.equal(a, b) for a, b in zip(before, outputs(model, batch), strict=True)), site.name


def test_sites_inside_blocks_identity_and_finite_differences():
    """Sub-block sites (in front of each post-LN LayerNorm): exact identity with a zero layer, FD at each."""
    base, data = make_distilbert(), [make_batch()]
    family = get_family(base)
    subs = family.sites(base, "sublayers")
    assert [s.name for s in subs] == [
        f"distilbert.transformer.layer.{i}.{ln}" for i in range(LAYERS) for ln in ("sa_layer_norm", "output_layer_norm")
    ]
    assert [s.name for s in family.sites(base, "all")][:3] == [
        "distilbert.embeddings", "distilbert.transformer.layer.0.sa_layer_norm",
        "distilbert.transformer.layer.0.output_layer_norm"]
    before = outputs(base, data[0])
    for site in subs:
        model = insert_layer(copy.deepcopy(base), site.name)
        assert model.config.n_layers == LAYERS  # inside a block: the depth does not change
        assert all(torch.equal(a, b) for a, b in zip(before, outputs(model, data[0]), strict=True)), site.name
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    j0 = summed_loss(base, data, loss_fn)
    for r in topological_derivative(base, data, loss_fn, sites=[s.name for s in subs], rule="top1"):
        assert r.num_samples == sum(LENGTHS) and r.score > 0
        grown = insert_layer(copy.deepcopy(base), r.site, r.weight, r.bias, epsilon=EPS_FD)
        fd = 2.0 * (j0 - summed_loss(grown, data, loss_fn)) / EPS_FD**2
        assert fd == pytest.approx(r.score, rel=1e-2), (r.site, fd, r.score)


def save_distilbert(path, seed: int = 0) -> str:
    """A random tiny DistilBERT with a WordPiece tokenizer, saved offline."""
    from test_text_data import write_vocab

    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = DistilBertTokenizer(write_vocab(path / "vocab.txt"))
    config = distilbert_config(vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                               attn_implementation=None)
    DistilBertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_adapter_and_merged_round_trip(tmp_path):
    base_dir = save_distilbert(tmp_path / "base")
    assert backbone_modality(transformers.AutoConfig.from_pretrained(base_dir)) == "text"
    model = load_backbone(base_dir, id2label={0: "neg", 1: "pos"})
    g = torch.Generator().manual_seed(2)
    for site in ("distilbert.transformer.layer.0.sa_layer_norm", "distilbert.transformer.layer.1", "distilbert.embeddings"):
        insert_layer(model, site, torch.randn(HIDDEN, HIDDEN, generator=g), torch.randn(HIDDEN, generator=g), 0.3)
    batch = make_batch()
    batch["input_ids"] = batch["input_ids"].clamp(max=model.config.vocab_size - 1)
    save_adapter(model, base_dir, None, None, tmp_path / "adapter", include_head=True)
    loaded = load_adapter(base_dir, tmp_path / "adapter")
    assert loaded.config.id2label[1] == "pos"
    assert torch.equal(loaded(**inputs_of(batch)).logits, model(**inputs_of(batch)).logits)
    from topotransfer.adapter import merge_and_save

    merge_and_save(model, tmp_path / "merged")
    assert torch.equal(load_merged(tmp_path / "merged")(**inputs_of(batch)).logits, model(**inputs_of(batch)).logits)


def test_adapt_recipe_accepts_distilbert(tmp_path):
    """``topotransfer adapt`` on a DistilBERT: the text task runs, inserts a layer, and the saved adapter
    and merged export reload to the live model's logits."""
    from test_adapt_text import batches, run

    base_dir = save_distilbert(tmp_path / "base")
    result = run(base_dir, tmp_path / "run", "adapt.head_epochs=1", "adapt.insertions=1",
                 "adapt.epochs_per_insertion=1", "train.max_steps=3")
    r = result.results
    assert r["backbone_unchanged"] and r["insertions"] == 1 and r["depth"] == LAYERS + 1
    assert r["events"][0]["site"].startswith("distilbert.")
    (x, _), = batches(base_dir)
    with torch.no_grad():
        live = result.model(**x).logits
        assert torch.equal(load_adapter(base_dir, tmp_path / "run" / "adapter")(**x).logits, live)
        assert torch.equal(load_merged(tmp_path / "run" / "merged")(**x).logits, live)
