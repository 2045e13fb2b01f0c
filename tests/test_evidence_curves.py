"""scripts/evidence_curves.py: post-insertion validation curves collected from run directories, and the
committed docs/results/evidence_curves.md is exactly what its command prints from the committed curve files."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import evidence_curves  # noqa: E402


def _run(base: Path, name: str, t: int, losses: list[float], site: str = "layers.0") -> None:
    d = base / name
    d.mkdir(parents=True)
    epochs = [{"epoch": e + 1, "val_loss": 9.0} for e in range(t)]
    epochs += [{"epoch": t + 1 + i, "val_loss": v} for i, v in enumerate(losses)]
    (d / "history.json").write_text(json.dumps({"epochs": epochs, "events": []}))
    (d / "results.json").write_text(json.dumps({"events": [{"epoch": t, "site": site}]}))


def test_collect_and_table_compare_running_minima_to_the_configured_run(tmp_path):
    work = tmp_path / "w" / "toy"
    _run(work / "sweep" / "seed7", "configured", 3, [4.0, 2.0, 3.0, 1.0])
    _run(work / "sweep" / "seed7", "site_input_layer", 3, [5.0, 1.0, 1.5, 1.5], site="input_layer")
    _run(work / "ablation" / "seed7", "random", 3, [8.0, 4.0, 4.0, 2.0])
    out = evidence_curves.collect(tmp_path / "w", "toy", 7, tmp_path / "curves")
    runs = json.loads(out.read_text())["runs"]
    assert runs["sweep/configured"]["val_loss"] == [4.0, 2.0, 3.0, 1.0]  # only epochs after the insertion
    lines = evidence_curves.table("toy", [7], tmp_path / "curves")
    row = next(line for line in lines if line.startswith("| ablation/random |"))
    # +1: 8 / 4 - 1; +5 and end: running minima 2 / 1 - 1 (the configured run ahead on the seed: 1/1)
    assert row.split(" | ")[2:4] == ["+100.0 (1/1)", "+100.0 (1/1)"]
    row = next(line for line in lines if line.startswith("| sweep/site_input_layer |"))
    assert row.split(" | ")[2] == "+25.0 (1/1)" and row.rstrip(" |").endswith("+0.0 (0/1)")


def test_collect_refuses_runs_of_different_lengths(tmp_path):
    work = tmp_path / "w" / "toy"
    _run(work / "sweep" / "seed1", "configured", 2, [1.0, 1.0])
    _run(work / "ablation" / "seed1", "random", 2, [1.0])
    with pytest.raises(SystemExit, match="different epochs"):
        evidence_curves.collect(tmp_path / "w", "toy", 1, tmp_path / "curves")


def test_committed_curve_tables_are_recomputable():
    """The tables of docs/results/evidence_curves.md are what its own command prints (the header names --out)."""
    doc = ROOT / "docs" / "results" / "evidence_curves.md"
    text = doc.read_text()
    command = text.split("Printed by `", 1)[1].split("`", 1)[0].split()
    assert command[:3] == ["python", "scripts/evidence_curves.py", "report"] and "--out" in command
    at = command.index("--out")
    printed = evidence_curves.main(command[2:at] + command[at + 2:])  # print only: the test writes nothing

    def tables(s: str) -> str:
        return s.split("\n### ", 1)[1]

    assert tables(printed) == tables(text)
