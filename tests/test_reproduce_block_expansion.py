"""scripts/reproduce_block_expansion.py --quick end to end: per-seed JSON, the report printed from it, a bit-identical
backbone for every method, the chosen positions recorded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_block_expansion.py"


def _load():
    spec = importlib.util.spec_from_file_location("reproduce_block_expansion", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_json_and_report(tmp_path):
    target = tmp_path / "docs"
    target.mkdir()
    for i in range(6):  # a small documentation corpus that is not Python
        (target / f"page{i}.md").write_text(f"# Page {i}\n\nThis page explains option {i} of the tool.\n" * 120)
    out = tmp_path / "results" / "block_expansion"
    mod = _load()
    text = mod.main(["--quick", "--seeds", "0", "--out-dir", str(out), "--work", str(tmp_path / "work"),
                     "--target", str(target)])
    run = json.loads((out / "seed_0.json").read_text())
    assert set(run["methods"]) == set(mod.METHODS)
    for name, m in run["methods"].items():
        assert m["backbone_unchanged"], name
        assert m["target_ppl"] > 1 and m["source_ppl"] > 1
    copies = run["methods"]["topo_expand"]
    assert len(copies["sites"]) == run["config"]["budget"] == len(copies["new_blocks"])
    assert max(copies["scores"], key=copies["scores"].get) in copies["sites"]  # budget 1: the best site
    assert run["methods"]["uniform"]["trainable_params"] == copies["trainable_params"]
    assert run["methods"]["lora"]["trainable_params"] <= copies["trainable_params"]
    assert (out.parent / "block_expansion.md").read_text() == text
    assert mod.main(["--report", str(out)]) == text  # the report is printed from the JSONs alone
    assert "| topo_expand |" in text and "forward_backward" in text
