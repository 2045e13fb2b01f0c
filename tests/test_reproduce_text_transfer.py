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


def test_rank_k_rows_at_a_random_and_the_last_site(tmp_path, capsys):
    """random_site_rank_k / last_block_rank_k: topo_rank_k's budget (the same overrides but the method), one rank-k
    layer at the site random_site draws for this seed and setting / at the last block site; --table-from lists them."""
    spec = importlib.util.spec_from_file_location("reproduce_text_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    topo = module.METHOD_OVERRIDES["topo_rank_k"]
    for row, method in (("random_site_rank_k", "random_site"), ("last_block_rank_k", "last_block")):
        assert module.METHOD_OVERRIDES[row] == [f"adapt.method={method}", *topo[1:]] and topo[0] == "adapt.method=topo"
    model = save_bert(tmp_path / "bert")
    rows = ["topo_rank_k", "random_site_rank_k", "last_block_rank_k", "random_site", "last_block"]
    work, raw = tmp_path / "work", tmp_path / "raw"
    # the tiny BERT (d = 16): LoRA-1's count (2 targets x 2 blocks x 2 x 16 = 128) buys 3 ranks of 2 d + 1 = 33, and
    # a min rank of 3 keeps them at one site, as min rank 96 keeps LoRA-16's 191 ranks at one site at d = 384
    common = ["--seeds", "3", "--quick", "--model", model, "--work-dir", str(work), "--out-dir", str(tmp_path / "docs"),
              "--raw-dir", str(raw), "train.max_steps=2"]
    module.main(["--methods", *rows[:3], *common, "adapt.budget_lora_rank=1", "adapt.budget_min_rank=3"])
    module.main(["--methods", *rows[3:], *common])  # the old rows as they are: one full layer, no budget
    by = {r["method"]: r for r in module.load_records(raw)}
    sites = list(by["topo_rank_k"]["scores"])  # the block sites topo_rank_k probes, in order
    assert len(sites) == 3  # embeddings + 2 blocks
    assert by["last_block_rank_k"]["chosen"] == sites[-1] == by["last_block"]["chosen"]
    assert by["random_site_rank_k"]["chosen"] == by["random_site"]["chosen"] in sites  # the same draw
    budgets = {}
    for row in rows[:3]:
        r = by[row]
        (site, rank), = r["rank_k_layers"]  # one rank-k layer ...
        assert site == r["chosen"] and rank == 3 and r["insertions"] == 1
        if row != "topo_rank_k":
            assert list(r["scores"]) == [site]  # ... at the one site the method probes
        event = json.loads((work / "sentiment" / "4shot" / row / "seed3" / "results.json").read_text())
        event = next(e for e in event["events"] if e.get("layers"))
        budgets[row] = event["budget"]
        assert event["parameters"] == 3 * 33
    assert budgets["topo_rank_k"] == budgets["random_site_rank_k"] == budgets["last_block_rank_k"] == 2 * 2 * 2 * 16
    for row in rows[3:]:  # the old rows keep one full d x (d + 1) layer
        assert not by[row]["rank_k_layers"] and by[row]["insertions"] == 1 and list(by[row]["scores"]) == [by[row]["chosen"]]

    module.main(["--table-from", str(raw)])
    printed = capsys.readouterr().out
    for row in rows:
        assert any(line.startswith(f"| {row} |") for line in printed.splitlines())


def test_count_table_counts_paired_wins_per_setting():
    """count_table: per setting, on how many common seeds the row's test error is below the other's (a tie is not a
    win; a seed only one of the two ran is left out), and the total; the derivative's site against the other sites."""
    spec = importlib.util.spec_from_file_location("reproduce_text_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    errors = {("sentiment", 32): {"lora": [0.30, 0.30, 0.30], "topo_rank_k": [0.20, 0.30, 0.40],
                                  "random_site_rank_k": [0.10, 0.50, None]},
              ("intent", 8): {"lora": [0.5, None, 0.5], "topo_rank_k": [0.4, 0.1, 0.4]}}
    records = [{"task": t, "shots": n, "method": m, "seed": 100 + i, "test_error": e}
               for (t, n), rows in errors.items() for m, es in rows.items() for i, e in enumerate(es) if e is not None]
    lines = module.count_table(records)
    assert lines[2] == "| row | against | intent 8 | sentiment 32 | all |"
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in lines[4:] if line}
    assert rows[("topo_rank_k", "lora")].endswith("| 2 of 2 | 1 of 3 | 3 of 5 |")  # 0.30 vs 0.30: no win
    assert rows[("random_site_rank_k", "lora")].endswith("| – | 1 of 2 | 1 of 2 |")
    assert rows[("topo_rank_k", "random_site_rank_k")].endswith("| – | 1 of 2 | 1 of 2 |")
    assert ("topo_rank_k", "last_block_rank_k") not in rows  # a pair whose second row never ran
