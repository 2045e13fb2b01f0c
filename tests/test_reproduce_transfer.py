"""scripts/reproduce_transfer.py runs end to end with tiny settings (``--quick``, digits -> digits)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).parents[1] / "scripts" / "reproduce_transfer.py"


def test_quick_run_writes_the_report(tmp_path):
    spec = importlib.util.spec_from_file_location("reproduce_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--quick", "--source", "digits", "--target", "digits", "--work-dir", str(tmp_path / "work"),
                          "--out-dir", str(tmp_path / "docs"), "train.max_steps=3"])
    text = report.read_text()
    for method in module.METHODS:
        assert f"| {method} |" in text
    raw = json.loads((tmp_path / "docs" / "transfer" / "raw.json").read_text())
    assert raw["5"]["topo"][0]["insertions"] == 1 and raw["5"]["linear_probe"][0]["insertions"] == 0
    assert all(r[0]["backbone_unchanged"] for m, r in raw["5"].items() if m != "full_finetune")
    assert (tmp_path / "work" / "pretrained" / "preprocessor_config.json").is_file()
    assert module.matched_lora_rank(64, 4, 2) == 8
    assert (tmp_path / "docs" / "transfer" / "test_error.png").stat().st_size > 5000
    assert "transfer/test_error.png" in text and "transfer/scores_5shot.png" in text

    # --reuse reads the finished runs back (same configs) instead of running them again
    def no_run(cfg):
        raise AssertionError(f"{cfg.output_dir} was run again")

    module.run_adapt = no_run
    notes = tmp_path / "notes.md"
    notes.write_text("## Reading\n\nhand-written reading of the tables\n")
    again = module.main(["--quick", "--source", "digits", "--target", "digits", "--work-dir", str(tmp_path / "work"),
                         "--out-dir", str(tmp_path / "again"), "--reuse", "--notes", str(notes), "train.max_steps=3"])
    assert json.loads((tmp_path / "again" / "transfer" / "raw.json").read_text()) == raw
    text = again.read_text()
    assert text.index("| topo |") < text.index("hand-written reading") < text.index("## Plots")  # after the tables
    assert "Partial report" not in again.read_text() and "| seeds |" in again.read_text()
    # another config in the same run directory is not mistaken for a finished run
    with pytest.raises(AssertionError, match="was run again"):
        module.main(["--quick", "--source", "digits", "--target", "digits", "--work-dir", str(tmp_path / "work"),
                     "--out-dir", str(tmp_path / "other"), "--reuse", "train.max_steps=2"])
    # --report-only runs nothing: finished runs are read back, missing ones left out (a partial report)
    (tmp_path / "work" / "5shot" / "lora" / "seed0" / "results.json").unlink()
    only = module.main(["--quick", "--source", "digits", "--target", "digits", "train.max_steps=3", "--work-dir",
                        str(tmp_path / "work"), "--out-dir", str(tmp_path / "only"), "--report-only", "--methods",
                        "topo", "lora"])
    text = only.read_text()
    assert "Partial report" in text and "from 1 finished runs" in text and "| lora |" not in text
    only_raw = json.loads((tmp_path / "only" / "transfer" / "raw.json").read_text())
    assert only_raw["5"] == {"lora": [], "topo": raw["5"]["topo"]}
