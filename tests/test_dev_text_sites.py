"""scripts/dev_text_sites.py's ``trace``: one record per inserted layer, in event order, whether an event spent a
budget on rank-k layers or inserted one full layer (a run with both kinds kept each layer's own fields)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")  # reproduce_text_transfer (imported by the script) draws the plots

SCRIPT = Path(__file__).parents[1] / "scripts" / "dev_text_sites.py"


def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("dev_text_sites", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trace_keeps_each_layer_with_its_own_event():
    full = {"site": "bert.encoder.layer.4", "epsilon": 0.1, "eps_fallback": False, "loss_before": 0.7,
            "loss_after": 0.6, "eps_tried": [[0.0, 0.7], [0.1, 0.6]]}
    budget = {"site": "bert.encoder.layer.3", "layers": [
        {"site": "bert.encoder.layer.3", "rank": 40, "epsilon": 0.2, "eps_fallback": True, "loss_before": 0.5,
         "eps_tried": [[0.0, 0.5], [0.2, 0.55]]},
        {"site": "bert.encoder.layer.1", "rank": 8, "epsilon": 0.05, "eps_fallback": False, "loss_before": 0.5,
         "eps_tried": [[0.0, 0.5], [0.05, 0.45]]}]}
    history = [{"epoch": 1, "phase": "head", "train_loss": 0.7, "val_error": 0.5},
               {"epoch": 2, "phase": "topo", "train_loss": 0.6, "val_error": 0.4}]
    t = _module().trace({"history": history, "events": [budget, {"epoch": 3}, full]})  # an event with no insertion
    assert [(x["site"], x["rank"], x["epsilon"], x["eps_fallback"], x["loss_after"]) for x in t["layers"]] == [
        ("bert.encoder.layer.3", 40, 0.2, True, 0.55), ("bert.encoder.layer.1", 8, 0.05, False, 0.45),
        ("bert.encoder.layer.4", None, 0.1, False, 0.6)]
    assert t["phases"] == {"head": 1, "topo": 2} and t["train_loss"] == [0.7, 0.6]
