"""scripts/reproduce_text_transfer.py runs end to end with tiny settings (``--quick``) on a tiny local BERT, writes
one small record per run, prints the paired tables from those records alone, and runs the intent task from CSV."""

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


def test_quick_run_writes_the_report(tmp_path, capsys):
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
    raw_dir = tmp_path / "docs" / "transfer_text" / "runs"
    records = module.load_records(raw_dir)
    assert len(records) == len(module.METHODS)  # one seed, one setting
    by = {r["method"]: r for r in records}
    assert by["topo"]["insertions"] == 1 and by["linear_probe"]["insertions"] == 0
    assert by["topo"]["scores"] and by["topo"]["chosen"] in by["topo"]["scores"]
    assert all(r["cpu_time"] > 0 and r["task"] == "sentiment" and r["shots"] == 4 for r in records)
    assert all(p.stat().st_size < 4000 for p in raw_dir.glob("*.json"))  # small: no history, no weights
    assert (tmp_path / "docs" / "transfer_text" / "test_error.png").stat().st_size > 0
    assert module.matched_lora_rank(384, 6, 1) == 16

    # the paired table from the records alone: the difference to LoRA is topo's error minus LoRA's, per seed
    module.main(["--table-from", str(raw_dir)])
    printed = capsys.readouterr().out
    diff = 100 * (by["topo"]["test_error"] - by["lora"]["test_error"])
    row = next(line for line in printed.splitlines() if line.startswith("| topo |"))
    assert f"{diff:+.2f} ± 0.00" in row and ("1 of 1" if diff < 0 else "0 of 1") in row
    with pytest.raises(SystemExit, match="no per-run records"):
        module.main(["--table-from", str(tmp_path / "empty")])

    # --reuse reads the finished runs back (same configs) instead of running them again
    def no_run(cfg):
        raise AssertionError(f"{cfg.output_dir} was run again")

    module.run_adapt = no_run
    again = module.main(["--quick", "--model", model, "--work-dir", str(tmp_path / "work"),
                         "--out-dir", str(tmp_path / "again"), "--reuse", "train.max_steps=2"])
    assert module.load_records(tmp_path / "again" / "transfer_text" / "runs") == records
    assert "Partial report" not in again.read_text() and "| method | test error [%] |" in again.read_text()


def test_intent_task_from_csv_files(tmp_path):
    """--task csv:intent: the generated CSV files are read by the hf:csv loader, four classes, topo + LoRA."""
    pytest.importorskip("datasets")
    spec = importlib.util.spec_from_file_location("reproduce_text_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = save_bert(tmp_path / "bert")
    report = module.main(["--quick", "--model", model, "--task", "csv:intent", "--methods", "lora", "topo_lora",
                          "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "docs"),
                          "train.max_steps=2", "adapt.budget_lora_rank=2", "adapt.lora_r=1", "adapt.budget_min_rank=1"])
    text = report.read_text()
    assert "| topo_lora |" in text and "(chance = 75 %)" in text and "Task: `csv:intent`" in text
    records = {r["method"]: r for r in module.load_records(tmp_path / "docs" / "transfer_text" / "runs")}
    assert records["topo_lora"]["rank_k_layers"] and records["topo_lora"]["task"] == "csv:intent"
    assert (tmp_path / "work" / "csv" / "intent" / "4shot_seed0" / "train.csv").read_text().count("\n") == 1 + 4 * 4
