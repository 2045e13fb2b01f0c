"""Configs: every built-in YAML validates; unknown keys, wrong types and bad values are clear errors."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from topotransfer.cli import BUILTIN_CONFIGS
from topotransfer.config import ConfigError, RunConfig, load_config, to_dict

CONFIGS = sorted((Path(__file__).parents[1] / "topotransfer" / "configs").glob("*.yaml"))


def test_there_are_builtin_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_builtin_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert path.read_text().startswith("#"), "first line documents the launch command"


def test_overrides_and_types():
    cfg = load_config(None, ["train.lr=1e-2", "growth.method=random_site", "model.width=8", "data.num_train=50",
                             "growth.epsilons=[0.1, 1]"])
    assert cfg.train.lr == 0.01 and cfg.growth.method == "random_site" and cfg.model.width == 8
    assert cfg.growth.epsilons == [0.1, 1.0]
    assert to_dict(cfg)["train"]["lr"] == 0.01


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.lrr=1", r"Unknown config key.*train\.lrr"),
        ("bogus=1", r"Unknown config key.*bogus"),
        ("train.lr=fast", "must be a number"),
        ("model.depth=1.5", "must be an integer"),
        ("growth.method=magic", "growth.method must be one of"),
        ("probe.c=2", r"probe.c must lie in \[0, 1\]"),
        ("train.lr", "key=value"),
        ("probe.rule=topk", "probe.k >= 1"),
    ],
)
def test_bad_config_is_a_clear_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_cli_help_is_fast_and_validate_prints_config():
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "topotransfer", "--help"], capture_output=True, text=True, check=True)
    assert "grow" in out.stdout and time.perf_counter() - t < 10
    out = subprocess.run([sys.executable, "-m", "topotransfer", "validate", "--config", "grow_digits", "train.lr=0.5"],
                         capture_output=True, text=True, check=True)
    assert "lr: 0.5" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "topotransfer", "grow", "train.nope=1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Unknown config key" in bad.stderr


def test_every_rule_runs_in_the_derivative_recipe_with_the_same_scores(tmp_path):
    """probe.rule changes the direction, never the score TD_t = lambda_max(Q_t) (init_rules.probe_site_results)."""
    from topotransfer.recipes.derivative import run_derivative

    out = {}
    for rule in ("cluster", "rowwise"):
        cfg = load_config(BUILTIN_CONFIGS / "grow_regression.yaml", [f"probe.rule={rule}", f"output_dir={tmp_path / rule}", "train.epochs=2",
                                              "data.num_train=200", "progress=false"])
        out[rule] = run_derivative(cfg)
    assert [r.site for r in out["cluster"]] == [r.site for r in out["rowwise"]]
    for a, b in zip(out["cluster"], out["rowwise"], strict=True):
        assert b.score == pytest.approx(a.score, rel=1e-6)
    assert any(b.k > a.k for a, b in zip(out["cluster"], out["rowwise"], strict=True))  # more rows start active
