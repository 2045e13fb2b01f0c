"""Site labels: a place in the original network + the order of insertion there, stable across events."""

from __future__ import annotations

import pytest
import torch

from topotransfer.models.residual_mlp import ResidualMLP
from topotransfer.surgery import get_family
from topotransfer.surgery.labels import label_insertions, site_labels


def insert(model, records: list[dict], site: str, tag: float) -> None:
    """Insert a layer (weights filled with ``tag`` to recognise it) after the current site ``site``."""
    family = get_family(model)
    layer = family.new_layer(model, family.site(model, site))
    with torch.no_grad():
        layer.weight.fill_(tag)
    family.insert(model, site, layer)
    records.append({"site": site, "layer": layer.config()})


def layer_labels(model, records, tags: set[float]) -> dict[float, str]:
    """{tag of an inserted layer: the label of its output site}."""
    family = get_family(model)
    labels = site_labels(model, records)
    _, container = family.chain(model)
    out = {}
    for pos, layer in family.inserted(model):
        tag = float(layer.weight.detach().flatten()[0])
        if tag in tags and bool((layer.weight == tag).all()):
            out[tag] = labels[f"{container}.{pos}"]
    return out


def test_labels_name_base_places_and_insertion_order():
    model, records = ResidualMLP(2, 4, 3, 1), []
    original_ids = [id(b) for b in model.layers]
    base = site_labels(model, records)
    assert base == {"input_layer": "input_layer", "layers.0": "layers.0", "layers.1": "layers.1",
                    "layers.2": "layers.2"}
    insert(model, records, "layers.1", 1.0)  # after base block 1: layers.1+1, now at position 2
    insert(model, records, "input_layer", 2.0)  # after the stem: shifts every block by one
    insert(model, records, "layers.2", 3.0)  # current layers.2 is base block 1 again -> layers.1+2, before +1
    insert(model, records, "layers.4", 4.0)  # current layers.4 is layers.1+1 -> layers.1+3
    labels = site_labels(model, records)
    # every original place keeps its base name, whatever moved around it
    originals = [f"layers.{i}" for i, b in enumerate(model.layers) if id(b) in original_ids]
    assert [labels[n] for n in originals] == ["layers.0", "layers.1", "layers.2"]
    assert labels["input_layer"] == "input_layer"
    # each inserted layer keeps the label it got when it was inserted
    assert layer_labels(model, records, {1.0, 2.0, 3.0, 4.0}) == {1.0: "layers.1+1", 2.0: "input_layer+1", 3.0: "layers.1+2",
                                            4.0: "layers.1+3"}
    # and the records say where each went and what it is called
    assert [(r["site_label"], r["label"]) for r in label_insertions(model, records)] == [
        ("layers.1", "layers.1+1"), ("input_layer", "input_layer+1"), ("layers.1", "layers.1+2"),
        ("layers.1+1", "layers.1+3"),
    ]
    assert len(set(labels.values())) == len(labels)


def test_labels_are_the_same_in_every_event():
    """The label of a place computed at any later event equals the label it had when first seen."""
    model, records = ResidualMLP(2, 4, 2, 1), []
    seen: dict[int, str] = {}  # id of the module producing the state -> label
    family = get_family(model)
    for step, site in enumerate(["layers.0", "layers.0", "input_layer", "layers.3"]):
        labels = site_labels(model, records)
        stem, container = family.chain(model)
        producers = [model.get_submodule(stem)] + list(model.get_submodule(container))
        for name, module in zip([stem] + [f"{container}.{i}" for i in range(len(producers) - 1)], producers,
                                strict=True):
            assert seen.setdefault(id(module), labels[name]) == labels[name]
        insert(model, records, site, float(step + 1))


def test_records_that_do_not_fit_the_model():
    model = ResidualMLP(2, 4, 2, 1)
    with pytest.raises(ValueError, match="neither the stem"):
        site_labels(model, [{"site": "head", "layer": {}}])


def test_vit_labels_with_a_peft_prefix():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                    image_size=8, patch_size=4, num_channels=1, num_labels=2)
    model = transformers.ViTForImageClassification(config)
    family = get_family(model)
    stem, container = family.chain(model)
    records: list[dict] = []
    insert(model, records, f"{container}.0", 1.0)
    records[0]["site"] = "base_model.model." + records[0]["site"]  # as a peft-wrapped run might name it
    labels = site_labels(model, records)
    assert labels[stem] == stem and labels[f"{container}.1"] == f"{container}.0+1"
    assert labels[f"{container}.2"] == f"{container}.1"


def test_event_records_get_the_labels_of_their_time():
    from topotransfer.surgery.labels import label_event

    model, records = ResidualMLP(2, 4, 2, 1), []
    insert(model, records, "layers.0", 1.0)  # -> layers.0+1 at position 1
    # an event that scored every site of the model as it was (3 blocks), then inserted after layers.1 (+1 there)
    scores = {"input_layer": 0.1, "layers.0": 0.2, "layers.1": 0.5, "layers.2": 0.3}
    insert(model, records, "layers.1", 2.0)
    record = label_event({"site": "layers.1", "scores": scores}, model, records)
    assert record["site_labels"] == {"input_layer": "input_layer", "layers.0": "layers.0", "layers.1": "layers.0+1",
                                     "layers.2": "layers.1"}
    assert (record["site_label"], record["label"]) == ("layers.0+1", "layers.0+2")
    stopped = label_event({"site": None, "scores": {}}, model, records)  # nothing inserted: the sites as they are
    assert stopped["site_labels"]["layers.2"] == "layers.0+2" and "site_label" not in stopped
    unknown = label_event({"site": "layers.9"}, model, records + [{"site": "head.attn", "layer": {}}])
    assert "site_labels" not in unknown  # site kinds the labels do not know: the record is left as it is
