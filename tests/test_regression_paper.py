"""Config ``grow_regression_paper`` (published setting of the regression task) and its reproduce script, with tiny
budgets: the stage rule (plateau or at most N epochs), full-batch epochs, raw files and the report's checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from topotransfer.config import ConfigError, load_config
from topotransfer.recipes.grow import run_grow

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "topotransfer" / "configs" / "grow_regression_paper.yaml"
SCRIPT = ROOT / "scripts" / "reproduce_regression_paper.py"
TINY = ["data.num_train=60", "data.num_val=30", "data.num_test=40", "train.batch_size=60", "probe.batch_size=60",
        "train.epochs=30", "growth.max_stage_epochs=8", "growth.check_every=4", "progress=false"]


def test_published_setting_is_what_the_config_says():
    cfg = load_config(CONFIG)
    assert (cfg.model.width, cfg.train.optimizer, cfg.train.lr) == (20, "adamw", 0.01)
    assert cfg.train.batch_size >= cfg.data.num_train  # full batch
    assert (cfg.growth.max_stage_epochs, cfg.growth.patience) == (2000, 2)
    assert cfg.growth.max_depth == cfg.model.depth + cfg.growth.max_insertions == 7  # 10 layers with input/output
    assert cfg.train.epochs == 2000 * (cfg.growth.max_insertions + 1)


def test_stage_options_are_validated():
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(CONFIG, ["growth.epochs_per_stage=5"])
    with pytest.raises(ConfigError, match="check_every"):
        load_config(CONFIG, ["growth.check_every=0"])
    with pytest.raises(ConfigError, match="max_stage_epochs"):
        load_config(CONFIG, ["growth.max_stage_epochs=0"])


def test_stage_ends_after_at_most_max_stage_epochs(tmp_path):
    # patience far beyond the budget: only the epoch cap can end a stage, so events land every 8 epochs
    cfg = load_config(CONFIG, [*TINY, f"output_dir={tmp_path / 'cap'}", "growth.patience=100", "growth.max_insertions=3",
                               "growth.max_depth=4"])
    res = run_grow(cfg)
    assert [e["epoch"] for e in res["events"]] == [8, 16, 24]
    assert res["depth"] == 4
    assert (tmp_path / "cap" / "best" / "model.safetensors").is_file()


def test_stage_ends_at_a_plateau_counted_in_checks(tmp_path):
    # lr so small that no check improves by min_delta: the first check (epoch 4) sets the best, the checks at
    # epochs 8 and 12 fail (patience 2): the stage ends at epoch 12, before the cap of 25 epochs.
    cfg = load_config(CONFIG, [*TINY, f"output_dir={tmp_path / 'plateau'}", "growth.max_stage_epochs=25",
                               "train.lr=1e-7", "growth.min_delta=0.01", "growth.max_insertions=1", "growth.max_depth=2"])
    res = run_grow(cfg)
    assert [e["epoch"] for e in res["events"]] == [12]


def test_script_runs_reports_and_refuses_other_configs(tmp_path):
    raw, work = tmp_path / "raw", tmp_path / "work"
    base = [sys.executable, str(SCRIPT)]
    subprocess.run([*base, "run", "--seeds", "0", "--methods", "topo", "fixed", "--raw-dir", str(raw), "--work-dir",
                    str(work), *TINY], check=True, capture_output=True, text=True)
    rec = json.loads((raw / "topo" / "seed0.json").read_text())
    assert rec["config"]["growth"]["max_stage_epochs"] == 8 and rec["epochs"] == 30
    assert rec["best_epoch"] <= 30 and rec["best_params"] <= rec["params"]
    assert rec["events"] and all("layer" not in e for e in rec["events"])  # no weights in the raw files
    out = subprocess.run([*base, "report", "--seeds", "0", "--methods", "topo", "fixed", "--raw-dir", str(raw), *TINY],
                         check=True, capture_output=True, text=True).stdout
    assert "| topo |" in out and "| fixed |" in out and "3.82e-05 (fixed)" in out and "Goal check" in out
    other = subprocess.run([*base, "report", "--seeds", "0", "--methods", "topo", "--raw-dir", str(raw)],
                           capture_output=True, text=True)
    assert other.returncode != 0 and "another config" in other.stderr
    missing = subprocess.run([*base, "report", "--seeds", "0-1", "--methods", "topo", "--raw-dir", str(raw), *TINY],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "missing raw file" in missing.stderr
