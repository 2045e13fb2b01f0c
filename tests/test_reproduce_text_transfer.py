"""scripts/reproduce_text_transfer.py runs end to end with tiny settings (``--quick``) on a tiny local BERT."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")
from test_adapt_text import save_bert  # noqa: E402

SCRIPT = Path(__file__).parents[1] / "scripts" / "reproduce_text_transfer.py"


def test_quick_run_writes_the_report(tmp_path):
    spec = importlib.util.spec_from_file_location("reproduce_text_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = save_bert(tmp_path / "bert")
    report = module.main(["--quick", "--model", model, "--work-dir", str(tmp_path / "work"),
                          "--out-dir", str(tmp_path / "docs"), "train.max_steps=2"])
    text = report.read_text()
    for method in module.METHODS:
        assert f"| {method} |" in text
    assert "--quick --model" in text and "(chance = 50 %)" in text
    raw = json.loads((tmp_path / "docs" / "transfer_text" / "raw.json").read_text())
    assert raw["4"]["topo"][0]["insertions"] == 1 and raw["4"]["linear_probe"][0]["insertions"] == 0
    assert all(r[0]["backbone_unchanged"] for r in raw["4"].values())
    assert (tmp_path / "docs" / "transfer_text" / "test_error.png").stat().st_size > 0
    assert module.matched_lora_rank(384, 6, 1) == 16

    # --reuse reads the finished runs back (same configs) instead of running them again
    def no_run(cfg):
        raise AssertionError(f"{cfg.output_dir} was run again")

    module.run_adapt = no_run
    again = module.main(["--quick", "--model", model, "--work-dir", str(tmp_path / "work"),
                         "--out-dir", str(tmp_path / "again"), "--reuse", "train.max_steps=2"])
    assert json.loads((tmp_path / "again" / "transfer_text" / "raw.json").read_text()) == raw
    assert "Partial report" not in again.read_text() and "| seeds |" in again.read_text()
