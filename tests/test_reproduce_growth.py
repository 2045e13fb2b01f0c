"""scripts/reproduce_growth.py end to end with tiny budgets (``--quick``): methods, variants, per-task seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "reproduce_growth.py"


def test_quick_run_writes_the_table_with_per_task_seeds(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--quick", "--tasks", "regression", "--methods", "topo", "topo_argmax",
           "fixed", "--task-seeds", "regression=1", "--work-dir", str(tmp_path / "w"), "--out-dir", str(tmp_path / "out")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    text = (tmp_path / "out" / "growth.md").read_text()
    assert "Seeds: regression [1]" in text
    for method in ("topo", "topo_argmax", "fixed"):
        assert f"| {method} |" in text
    argmax = json.loads((tmp_path / "w" / "regression" / "topo_argmax" / "seed1" / "results.json").read_text())
    realized = json.loads((tmp_path / "w" / "regression" / "topo" / "seed1" / "results.json").read_text())
    assert argmax["method"] == realized["method"] == "topo"  # a variant of the same growth method
    assert all("realized" in e and not e["realized"] for e in argmax["events"])  # argmax: no per-site searches
    assert any(e["realized"] for e in realized["events"])  # the config default: realized
    bad = subprocess.run([*cmd[:2], "--task-seeds", "nosuchtask=1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--task-seeds" in bad.stderr
