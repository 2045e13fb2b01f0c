"""Adapter persistence: save_adapter / load_adapter round trips, merged export, mismatched bases.

A tiny ViT is saved with ``save_pretrained`` to a temporary directory (offline), adapted to 5 labels with
two inserted TopoLayers of non-zero weights, saved, reloaded, and compared bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForImageClassification, BertConfig, BertModel, ViTConfig, ViTForImageClassification  # noqa: E402

from topotransfer import insert_layer  # noqa: E402
from topotransfer.adapter import (  # noqa: E402
    ADAPTER_CONFIG_NAME,
    MERGED_MANIFEST_NAME,
    TopoAdapter,
    infer_insertions,
    load_adapter,
    load_merged,
    merge_and_save,
    save_adapter,
)
from topotransfer.errors import (  # noqa: E402
    AdapterMismatchError,
    CheckpointMismatchError,
    LabelCountMismatchError,
)
from topotransfer.models.hf import load_backbone, load_image_normalization  # noqa: E402

HIDDEN, BASE_LABELS, TARGET_LABELS = 16, 3, 5
X = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def vit_config(**overrides) -> ViTConfig:
    kwargs = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
                  patch_size=4, num_channels=3, num_labels=BASE_LABELS)
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def save_base(path, seed: int = 0, **overrides) -> str:
    torch.manual_seed(seed)
    ViTForImageClassification(vit_config(**overrides)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return save_base(tmp_path_factory.mktemp("base"))


def adapted(base_dir: str, labels: int = TARGET_LABELS):
    """Base + new head + two non-zero TopoLayers; returns (model, insertion records as they happened)."""
    model = load_backbone(base_dir, id2label={i: f"c{i}" for i in range(labels)})
    g = torch.Generator().manual_seed(1)
    records = []
    for site in ("vit.layers.1", "vit.embeddings"):
        insert_layer(model, site, torch.randn(HIDDEN, HIDDEN, generator=g), torch.randn(HIDDEN, generator=g), 0.3)
        records.append({"site": site, "layer": {"type": "linear", "dim": HIDDEN, "bias": True, "norm": "layernorm",
                                                "eps": 1e-12, "activation": "topo"}})
    with torch.no_grad():
        model.classifier.weight.normal_(generator=g)
    return model, records


@torch.no_grad()
def logits(model, x=X):
    return model(x).logits


def test_adapter_round_trip_is_bit_identical(base_dir, tmp_path):
    model, records = adapted(base_dir)
    adapter = save_adapter(model, base_dir, None, records, tmp_path / "adapter")
    assert adapter.base_num_hidden_layers == 2 and adapter.head == ["classifier"] and adapter.num_labels == 5
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert [{"site": r["site"], "layer": r["layer"]} for r in saved["insertions"]] == records
    assert saved["format_version"] == 1
    # stable labels: after base block 1, then after the embeddings (which moved base block 1 to layers.2)
    assert [(r["site_label"], r["label"]) for r in saved["insertions"]] == [
        ("vit.layers.1", "vit.layers.1+1"), ("vit.embeddings", "vit.embeddings+1")]
    assert sorted(saved["tensors"]["inserted"]) == sorted(
        f"vit.layers.{p}.layer.{w}" for p in (0, 3) for w in ("weight", "bias")
    )
    for source in (base_dir, None):  # by name, and from the recorded base
        loaded = load_adapter(source, tmp_path / "adapter")
        assert loaded.config.num_hidden_layers == 4 and loaded.config.id2label[4] == "c4"
        assert torch.equal(logits(loaded), logits(model))
    # inferred insertions give the same model
    save_adapter(model, base_dir, None, None, tmp_path / "inferred")
    assert torch.equal(logits(load_adapter(base_dir, tmp_path / "inferred")), logits(model))


def test_head_kept_from_base_when_labels_match(base_dir, tmp_path):
    model = load_backbone(base_dir)
    insert_layer(model, "vit.layers.0", torch.ones(HIDDEN, HIDDEN), torch.ones(HIDDEN), 0.01)
    adapter = save_adapter(model, base_dir, None, None, tmp_path)
    assert adapter.head == [] and adapter.tensors["head"] == []
    assert torch.equal(logits(load_adapter(base_dir, tmp_path)), logits(model))


def test_merged_export_round_trip(base_dir, tmp_path):
    model, _ = adapted(base_dir)
    merge_and_save(model, tmp_path, base_name_or_path=base_dir)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2  # the base depth: insertions are replayed on load
    assert json.loads((tmp_path / MERGED_MANIFEST_NAME).read_text())["num_hidden_layers"] == 4
    assert model.config.num_hidden_layers == 4  # the live model is untouched
    loaded = load_merged(tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(OSError):  # a plain from_pretrained must not silently drop / re-initialise blocks
        AutoModelForImageClassification.from_pretrained(tmp_path)


def test_merged_export_with_wrong_manifest_is_refused(base_dir, tmp_path):
    model, _ = adapted(base_dir)
    merge_and_save(model, tmp_path)
    path = tmp_path / MERGED_MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["insertions"] = manifest["insertions"][:1]
    manifest["num_hidden_layers"] = 3
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        load_merged(tmp_path)


def test_lora_adapter_and_merge(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, records = adapted(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(3))
    adapter = save_adapter(pm, base_dir, None, records, tmp_path / "adapter")
    assert adapter.lora["r"] == 2 and len(adapter.tensors["lora"]) == 4 * 2  # q, v x A, B x 2 blocks
    loaded = load_adapter(base_dir, tmp_path / "adapter")
    assert type(loaded).__name__.startswith("PeftModel")
    assert torch.equal(logits(loaded), logits(pm))
    merge_and_save(pm, tmp_path / "merged")
    merged = load_merged(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(pm), rtol=1e-5, atol=1e-5)  # W + BA folded: rounding only
    assert "lora_A" in " ".join(n for n, _ in pm.named_parameters())  # the live peft model was not merged


def test_mismatched_base_is_refused(base_dir, tmp_path):
    model, records = adapted(base_dir)
    save_adapter(model, base_dir, None, records, tmp_path / "adapter")
    deeper = save_base(tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(AdapterMismatchError, match="num_blocks: adapter 2 vs model 3"):
        load_adapter(deeper, tmp_path / "adapter")
    wider = save_base(tmp_path / "wider", hidden_size=32, intermediate_size=32)
    with pytest.raises(AdapterMismatchError, match="hidden_size"):
        load_adapter(wider, tmp_path / "adapter")
    bert = BertModel(BertConfig(vocab_size=20, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32))
    with pytest.raises(AdapterMismatchError, match="model_type"):
        load_adapter(bert, tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError, match="already holds"):
        load_adapter(model, tmp_path / "adapter")
    with pytest.raises(LabelCountMismatchError, match="5 labels but the base model has 3"):
        load_adapter(load_backbone(base_dir), tmp_path / "adapter")  # base head: 3 classes
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(base_dir, tmp_path)


def test_wrong_insertion_records_are_refused(base_dir, tmp_path):
    model, records = adapted(base_dir)
    with pytest.raises(AdapterMismatchError, match="block positions"):
        save_adapter(model, base_dir, None, records[:1], tmp_path)
    with pytest.raises(AdapterMismatchError, match="no such|does not have"):
        save_adapter(model, base_dir, None, [{"site": "vit.layers.7", "layer": records[0]["layer"]}] * 2, tmp_path)
    bad = [dict(r, layer={**r["layer"], "eps": 1e-6}) for r in records]
    with pytest.raises(AdapterMismatchError, match="records layer"):
        save_adapter(model, base_dir, None, bad, tmp_path)
    assert infer_insertions(model) == [
        {"site": "vit.embeddings", "layer": records[0]["layer"]},
        {"site": "vit.layers.2", "layer": records[0]["layer"]},  # final position 3
    ]
    with pytest.raises(AdapterMismatchError, match="format_version"):
        TopoAdapter.from_dict({"format_version": 99})


def test_image_normalization_reads_saved_processor(base_dir, tmp_path):
    assert load_image_normalization(base_dir).mean == (0.5, 0.5, 0.5)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": 0.25}))
    norm = load_image_normalization(str(tmp_path), num_channels=3)
    assert norm.mean == (0.1, 0.2, 0.3) and norm.std == (0.25, 0.25, 0.25)
    assert load_image_normalization(str(tmp_path), num_channels=1).mean == pytest.approx((0.2,))


def test_bert_adapter_and_merged_round_trip(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "bert")
    model = load_backbone(str(tmp_path / "bert"), architecture="BertForSequenceClassification")
    insert_layer(model, "bert.encoder.layer.0", torch.ones(HIDDEN, HIDDEN) / HIDDEN, torch.ones(HIDDEN), 0.5)
    save_adapter(model, str(tmp_path / "bert"), None, None, tmp_path / "adapter")
    merge_and_save(model, tmp_path / "merged")
    batch = {"input_ids": torch.tensor([[2, 5, 7, 0], [3, 4, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(load_adapter(None, tmp_path / "adapter")(**batch).logits, expected)
        assert torch.equal(load_merged(tmp_path / "merged")(**batch).logits, expected)
