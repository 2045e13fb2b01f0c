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
    """probe.rule changes the direction, never TD_t = lambda_max(Q_t) (init_rules.probe_site_results); the
    score that ranks by default is the direction's own theta^T Q theta, so it does depend on the rule."""
    from topotransfer.recipes.derivative import run_derivative

    out = {}
    for rule in ("cluster", "rowwise"):
        cfg = load_config(BUILTIN_CONFIGS / "grow_regression.yaml", [f"probe.rule={rule}", f"output_dir={tmp_path / rule}", "train.epochs=2",
                                              "data.num_train=200", "progress=false"])
        out[rule] = run_derivative(cfg)
    assert [r.site for r in out["cluster"]] == [r.site for r in out["rowwise"]]
    for a, b in zip(out["cluster"], out["rowwise"], strict=True):
        assert b.lambda_max == pytest.approx(a.lambda_max, rel=1e-6)
        assert (a.score, b.score) == (a.quadratic, b.quadratic) and a.score_kind == b.score_kind == "quadratic"
    assert any(b.k > a.k for a, b in zip(out["cluster"], out["rowwise"], strict=True))  # more rows start active


def test_default_output_dir_names_config_method_and_seed(tmp_path):
    from topotransfer.config import DEFAULT_OUTPUT_DIR

    assert RunConfig().output_dir == "outputs/default/topo-seed0"
    assert load_config(BUILTIN_CONFIGS / "grow_digits.yaml", ["seed=2"]).output_dir == "outputs/grow_digits/topo-seed2"
    cfg = load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml", ["adapt.method=lora"])
    assert cfg.output_dir == "outputs/adapt_digits_vit/lora-seed0"
    mine = tmp_path / "mine.yaml"
    mine.write_text("output_dir: runs/{config}-{task}/{method}/s{seed}\ngrowth: {method: fixed}\n")
    assert load_config(mine).output_dir == "runs/mine-grow/fixed/s0"
    assert load_config(None, ["output_dir=plain/{x}"]).output_dir == "plain/{x}"  # unknown braces stay
    runs = [p for p in CONFIGS if "task: pretrain" not in p.read_text()]  # a backbone's dir is named in docs
    assert "{config}" in DEFAULT_OUTPUT_DIR and runs and all("output_dir" not in p.read_text() for p in runs)


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.family=rnn", "model.family must be one of"),
        ("data.name=cifar", "data.name must be one of"),
        ("device=tpu", "device must be one of"),
        ("data.noise=nan", "finite"),
        ("data.noise=-1", "data.noise must be >= 0"),
        ("probe.tol=.inf", "finite"),
        ("growth.epsilons=[]", "growth.epsilons"),
        ("model.kernel_size=4", "odd"),
        ("train.weight_decay=-1", "weight_decay"),
        ("seed=-3", "seed must be >= 0"),
    ],
)
def test_enumerations_and_ranges_are_checked_when_the_config_is_read(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_task_name_forms():
    for name in ("digits", "Fashion-MNIST", "hf:mnist", "hf:glue:sst2", "imagefolder:data/x"):
        assert load_config(None, [f"data.name={name}"]).data.name == name
    for name in ("hf:", "imagefolder:"):
        with pytest.raises(ConfigError, match="needs a name after"):
            load_config(None, [f"data.name='{name}'"])


def test_check_runnable_reads_the_task_and_checks_across_sections(tmp_path):
    from topotransfer.config import check_runnable

    adapt = load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml")
    with pytest.raises(ConfigError, match="model.name_or_path"):
        check_runnable(adapt)
    (tmp_path / "vit").mkdir()
    with pytest.raises(ConfigError, match="without config.json"):
        check_runnable(load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml", [f"model.name_or_path={tmp_path / 'vit'}"]))
    (tmp_path / "vit" / "config.json").write_text("{}")
    check_runnable(load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml", [f"model.name_or_path={tmp_path / 'vit'}"]))
    check_runnable(load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml", ["model.name_or_path=org/model"]))  # a hub name
    with pytest.raises(ConfigError, match="no such directory"):
        check_runnable(load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml", ["model.name_or_path=./nowhere"]))
    with pytest.raises(ConfigError, match="topotransfer adapt"):
        check_runnable(adapt, "grow")
    for bad, match in [("data.name=sentiment", "text task"), ("model.family=cnn", "image task"),
                       ("data.name=digits data.noise=0.1", "regression task only"),
                       ("model.family=vit data.name=digits data.image_size=10", "divisible")]:
        with pytest.raises(ConfigError, match=match):
            check_runnable(load_config(None, bad.split()))
    check_runnable(load_config(None, []))


def test_yaml_errors_are_one_line_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: grow\n  seed: [1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: .* at line \d+, column \d+") as e:
        load_config(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["train.lr={"])
