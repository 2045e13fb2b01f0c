"""The command line as a user meets it (issue 14): runs never destroy runs, bad input is one line on stderr
with exit code 2 (no traceback), Ctrl-C says how to resume, overrides go anywhere, and the plot / report /
derivative commands write what they say.

Every case runs the real CLI in a subprocess on tiny configs; where a run already exists, its files are
compared byte for byte afterwards.
"""

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from topotransfer.cli import main

TINY = ["data.name=regression", "data.num_train=160", "data.num_val=64", "data.num_test=64", "model.width=8",
        "model.depth=1", "train.epochs=4", "train.batch_size=32", "growth.epochs_per_stage=2",
        "growth.max_insertions=1", "probe.batch_size=80", "train.checkpoint_every=1", "progress=false"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
# Runs the CLI with some optional packages made unimportable (None in sys.modules), as if not installed.
BLOCKING = ("import sys; blocked = sys.argv.pop(1).split(','); sys.modules.update(dict.fromkeys(blocked)); "
            "from topotransfer.cli import main; sys.exit(main())")


def cli(*args: str, cwd: Path | None = None, block: tuple[str, ...] = (), timeout: float = 300):
    if block:
        cmd = [sys.executable, "-c", BLOCKING, ",".join(block), *args]
    else:
        cmd = [sys.executable, "-m", "topotransfer.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


def in_process(*args: str) -> subprocess.CompletedProcess:
    """The CLI's ``main`` in this process (no ~5 s of imports): for the variants of a case whose first instance
    runs in a real subprocess."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_input_error(run: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, exactly one (non-empty) line on stderr starting 'error: ', no traceback."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny grow run (one growth event) made through the CLI; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run = cli("grow", *TINY, f"output_dir={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "results.json").is_file() and (out / "last.previous").is_dir()
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> str:
    """A random tiny ViT written with save_pretrained (3 labels, 12x12 RGB)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "vit"
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=12, patch_size=4, num_channels=3, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    return str(path)


ADAPT_SMALL = ["data.num_train=60", "data.num_val=30", "data.num_test=30", "probe.batch_size=30", "probe.batches=1",
               "train.batch_size=20", "progress=false", "adapt.head_epochs=1", "adapt.insertions=1",
               "adapt.epochs_per_insertion=1", "adapt.final_epochs=0"]


# ------------------------------------------------------------------------------------- runs never destroy runs
def test_default_output_dir_is_per_config_method_and_seed(tmp_path):
    """The README's baseline command no longer shares the topo run's directory."""
    def output_dir(*args):
        run = cli("validate", "--config", "grow_digits", *args, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        return next(line.split(": ", 1)[1] for line in run.stdout.splitlines() if line.startswith("output_dir:"))

    assert output_dir() == "outputs/grow_digits/topo-seed0"
    baseline = in_process("validate", "--config", "grow_digits", "growth.method=random_site", "seed=1")
    assert "output_dir: outputs/grow_digits/random_site-seed1" in baseline.stdout.splitlines()


def test_a_new_run_is_refused_in_a_finished_runs_directory(run_copy):
    before = snapshot(run_copy)
    assert_input_error(cli("grow", *TINY, f"output_dir={run_copy}"), str(run_copy), "--resume", "--overwrite")
    # a run that would fail at once does not even rewrite config.yaml
    assert_input_error(in_process("grow", *TINY, "data.name=cifar", f"output_dir={run_copy}"), "data.name")
    assert snapshot(run_copy) == before


def test_overwrite_replaces_the_run(run_copy):
    old = (run_copy / "results.json").read_bytes()
    run = in_process("grow", *TINY, "seed=3", f"output_dir={run_copy}", "--overwrite")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((run_copy / "results.json").read_text())["seed"] == 3 and old != (run_copy / "results.json").read_bytes()
    assert_input_error(in_process("grow", *TINY, f"output_dir={run_copy}", "--overwrite", "--resume"), "--resume",
                       "--overwrite")


def test_resume_without_a_checkpoint_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "nothing"
    assert_input_error(cli("grow", *TINY, f"output_dir={out}", "--resume"), "no checkpoint", str(out))
    assert not out.exists()


# ------------------------------------------------------------------------------------ one-line errors (exit 2)
def test_adapt_without_model_name_or_path(tmp_path):
    assert_input_error(cli("adapt", "--config", "adapt_digits_vit", *ADAPT_SMALL, f"output_dir={tmp_path / 'o'}"),
                       "model.name_or_path")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,needle", [
    ("path/to/vit", "no such directory"),
    ("google/vit-base-patch16-224", "HF_HUB_OFFLINE"),  # a hub name, offline and not cached
])
def test_adapt_with_a_backbone_that_cannot_be_found(tmp_path, name, needle):
    assert_input_error(cli("adapt", "--config", "adapt_digits_vit", *ADAPT_SMALL, f"model.name_or_path={name}",
                           f"output_dir={tmp_path / 'o'}"), needle)


def test_adapt_with_a_folder_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_input_error(cli("adapt", "--config", "adapt_digits_vit", *ADAPT_SMALL,
                           f"model.name_or_path={tmp_path / 'empty'}", f"output_dir={tmp_path / 'o'}"), "config.json")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])


def test_resume_from_a_truncated_checkpoint_names_it_and_the_way_out(run_copy):
    _damage(run_copy / "last" / "model.safetensors", "truncate")
    before = snapshot(run_copy)
    line = assert_input_error(cli("grow", *TINY, f"output_dir={run_copy}", "--resume"), "corrupt",
                              "model.safetensors", str(run_copy / "last"), "--resume-from last.previous", "best")
    assert snapshot(run_copy) == before, line
    # the way out it names works: the previous checkpoint resumes to a finished run
    run = cli("grow", *TINY, f"output_dir={run_copy}", "--resume-from", "last.previous")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((run_copy / "results.json").read_text())["insertions"] == 1


@pytest.mark.parametrize("file,damage", [
    ("optimizer.pt", "truncate"), ("state.json", "truncate"), ("manifest.json", "truncate"),
    ("model.safetensors", "flip"), ("rng.pt", "missing"),
])
def test_every_file_of_a_checkpoint_is_checked(run_copy, file, damage):
    target = run_copy / "last" / file
    if damage == "missing":  # a checksum listed for a file that is not there
        manifest = json.loads((run_copy / "last" / "manifest.json").read_text())
        manifest["checksums"][file] = "0" * 64
        (run_copy / "last" / "manifest.json").write_text(json.dumps(manifest))
    else:
        _damage(target, damage)
    before = snapshot(run_copy)
    assert_input_error(in_process("grow", *TINY, f"output_dir={run_copy}", "--resume"), "corrupt", file,
                       str(run_copy / "last"))
    assert snapshot(run_copy) == before


def test_resume_after_changing_the_architecture(run_copy):
    before = snapshot(run_copy)
    assert_input_error(cli("grow", *TINY, "model.width=12", f"output_dir={run_copy}", "--resume"),
                       "another architecture", "model.width")
    assert snapshot(run_copy) == before


def test_yaml_syntax_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: grow\nmodel: {width: 8\n")
    assert_input_error(cli("grow", "--config", str(bad)), "not valid YAML", "line")
    assert_input_error(in_process("grow", "train.epochs=[1"), "not valid YAML")


@pytest.mark.parametrize("override,needle", [
    ("model.family=rnn", "model.family"), ("data.name=cifar", "data.name"), ("task=transfer", "task"),
    ("data.name=sentiment", "text task"), ("model.family=cnn", "image task"),
])
def test_unknown_family_or_task_in_grow(tmp_path, override, needle):
    run = cli if override == "model.family=rnn" else in_process
    assert_input_error(run("grow", *TINY, override, f"output_dir={tmp_path / 'o'}"), needle)
    assert not (tmp_path / "o").exists()


def test_missing_optional_packages_name_the_pip_command(tmp_path, vit_dir, finished):
    assert_input_error(cli("grow", "data.name=digits", "train.epochs=1", "progress=false",
                           f"output_dir={tmp_path / 'a'}", block=("sklearn",)), "pip install scikit-learn")
    assert_input_error(cli("adapt", "--config", "adapt_digits_vit", *ADAPT_SMALL, "adapt.method=lora",
                           f"model.name_or_path={vit_dir}", f"output_dir={tmp_path / 'b'}", block=("peft",)),
                       "peft", "pip install peft")
    assert_input_error(cli("plot", str(finished), block=("matplotlib",)), "matplotlib", "pip install")


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_input_error(cli("grow", *TINY, f"output_dir={blocker / 'run'}"), str(blocker / "run"))
    assert_input_error(in_process("grow", *TINY, f"output_dir={blocker}"), "is a file")


def test_debug_shows_the_traceback(tmp_path):
    run = in_process("grow", *TINY, "model.family=rnn", "--debug")
    assert run.returncode == 2 and "Traceback" in run.stderr and run.stderr.rstrip().splitlines()[-1].startswith("error:")


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "train.epochs=30", "data.num_train=1000", f"output_dir={out}"]
    # a terminal's Ctrl-C: SIGINT at its default in the child even when this test runs as a background job (which
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, "-m", "topotransfer.cli", "grow", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "latest").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert str(out / "last") in lines[0] and lines[0].endswith("--resume")
    command = shlex.split(lines[0].split("Continue with: ", 1)[1])
    assert command[0] == "topotransfer"
    resumed = cli(*command[1:])  # the printed command continues the run to its end
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == 30


# ----------------------------------------------------------------------------------------------------- traps
def test_overrides_after_options(run_copy):
    run = cli("grow", *TINY, f"output_dir={run_copy}", "--resume", "train.epochs=6")
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads((run_copy / "history.json").read_text())["epochs"]) == 6
    assert in_process("validate", "--bogus", "train.lr=1").returncode == 2


def test_validate_reads_the_task_from_the_config(vit_dir):
    run = cli("validate", "--config", "adapt_digits_vit", f"model.name_or_path={vit_dir}")
    assert run.returncode == 0, run.stderr
    assert "task: adapt" in run.stdout and "output_dir: outputs/adapt_digits_vit/topo-seed0" in run.stdout


@pytest.mark.parametrize("override,needle", [
    ("model.family=rnn", "model.family"), ("data.name=cifar", "data.name"), ("device=tpu", "device"),
    ("data.noise=nan", "finite"), ("train.lr=inf", "finite"), ("data.name='hf:'", "hf:"), ("seed=-1", "seed"),
    ("growth.epsilons=[0.1, -1]", "growth.epsilons"), ("model.kernel_size=2", "kernel_size"),
])
def test_validate_refuses_what_the_run_would_refuse(override, needle):
    run = cli if override == "device=tpu" else in_process
    assert_input_error(run("validate", override), needle)


def test_derivative_warmup_is_bounded_and_its_table_saved(tmp_path):
    out = tmp_path / "d"
    run = cli("derivative", *TINY, "train.epochs=500", "--warmup-epochs", "1", f"output_dir={out}")
    assert run.returncode == 0, run.stderr[-3000:]
    table = json.loads((out / "derivative.json").read_text())
    assert table["warmup_epochs"] == 1 and [r["site"] for r in table["sites"]] == ["input_layer", "layers.0"]
    rows = (out / "derivative.csv").read_text().splitlines()
    assert rows[0] == "site,td,quadratic,k,solver,heldout_loss,chosen" and len(rows) == 3
    explained = (out / "derivative.md").read_text()
    assert all(f"| {c} |" in explained for c in ("site", "td", "quadratic", "k", "solver", "heldout_loss", "chosen"))
    # the table is not overwritten by a second derivative run without --overwrite
    assert_input_error(in_process("derivative", *TINY, "--warmup-epochs", "1", f"output_dir={out}"), "--overwrite")


@pytest.mark.parametrize("selection", ["argmax", "realized"])
def test_derivative_marks_the_site_the_configs_growth_event_chooses(tmp_path, selection):
    """After W epochs the derivative command and a grow run whose first event comes at epoch W see the same
    network: the marked site is the site that event inserts at."""
    common = [*TINY, f"growth.site_selection={selection}", "data.num_train=320"]
    der = (cli if selection == "realized" else in_process)(
        "derivative", *common, "--warmup-epochs", "2", f"output_dir={tmp_path / 'd'}")
    assert der.returncode == 0, der.stderr[-3000:]
    table = json.loads((tmp_path / "d" / "derivative.json").read_text())
    grow = in_process("grow", *common, "train.epochs=3", f"output_dir={tmp_path / 'g'}")
    assert grow.returncode == 0, grow.stderr[-3000:]
    event = json.loads((tmp_path / "g" / "history.json").read_text())["events"][0]
    assert table["chosen_site"] == event["site"]
    assert {r["site"]: r["td"] for r in table["sites"]} == pytest.approx(event["lambda_max"], rel=1e-6)
    assert {r["site"]: r["quadratic"] for r in table["sites"]} == pytest.approx(event["quadratics"], rel=1e-6)
    assert event["score_kind"] == table["score"] == "quadratic" and event["scores"] == event["quadratics"]
    marked = [line for line in der.stdout.splitlines() if "<- insert here" in line]
    assert len(marked) == 1 and marked[0].split()[0] == event["site"] and selection in marked[0]
    if selection == "realized":
        searched = {r["site"]: r["heldout_loss"] for r in table["sites"] if r["heldout_loss"] is not None}
        assert searched == pytest.approx(event["realized"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- plot / report
def test_plot_writes_learning_curves_and_site_scores(finished, tmp_path):
    pytest.importorskip("matplotlib")
    run = cli("plot", str(finished), "--out", str(tmp_path / "plots"))
    assert run.returncode == 0, run.stderr[-3000:]
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs[0] == "learning_curves.png" and len(pngs) == 2 and pngs[1].startswith("site_scores-")
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert_input_error(in_process("plot", str(tmp_path)), "history.json")


def test_report_compares_runs(finished, tmp_path):
    other = tmp_path / "fixed"
    assert in_process("grow", *TINY, "growth.method=fixed", "seed=1", f"output_dir={other}").returncode == 0
    run = cli("report", str(finished), str(other))
    assert run.returncode == 0, run.stderr[-3000:]
    header, topo, fixed = run.stdout.splitlines()[:3]
    assert "best-val test error" in header and "final test error" in header
    assert topo.split()[2:4] == ["topo", "0"] and fixed.split()[2:4] == ["fixed", "1"]
    res = json.loads((finished / "results.json").read_text())
    assert f"{res['final_test_error']:.4g}" in topo and str(res["best_depth"]) in topo.split()
    csv_rows = in_process("report", str(finished), "--format", "csv").stdout.splitlines()
    assert csv_rows[0].startswith("run,task,method,seed,best_val_test_error") and len(csv_rows) == 2
    assert_input_error(in_process("report", str(tmp_path / "nowhere")), "results.json")


# ------------------------------------------------------------------------------------------- quiet libraries
def test_transformers_load_report_of_the_new_head_is_dropped_and_others_lose_their_colour_codes():
    import logging

    from topotransfer.cli import _LoadReportFilter

    def record(text):
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, text, None, None)

    head = ("\x1b[1mViTForImageClassification LOAD REPORT\x1b[0m from: x\nKey | Status | \n---+---+\n"
            "classifier.weight | MISMATCH | Reinit\nclassifier.bias | MISMATCH | Reinit\n")
    assert not _LoadReportFilter().filter(record(head))
    missing = head.replace("classifier.bias | MISMATCH", "vit.layers.3.fc1.weight | UNEXPECTED")
    rec = record(missing)
    assert _LoadReportFilter().filter(rec) and "\x1b" not in rec.getMessage() and "UNEXPECTED" in rec.getMessage()
    assert _LoadReportFilter().filter(record("something else"))


def test_adapt_output_has_no_load_report_or_future_warning(tmp_path, vit_dir):
    run = cli("adapt", "--config", "adapt_digits_vit", *ADAPT_SMALL, "adapt.lora=true",
              f"model.name_or_path={vit_dir}", f"output_dir={tmp_path / 'o'}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "LOAD REPORT" not in run.stderr and "FutureWarning" not in run.stderr and "\x1b[" not in run.stderr


@pytest.mark.parametrize("error,code,needle", [
    (FloatingPointError("Training loss is nan (epoch 3). The run diverged; out/last stays the latest checkpoint"), 3,
     "diverged"),
    (RuntimeError("an index that cannot happen\nsecond line"), 1, "internal error (RuntimeError: an index"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_exit_codes_of_a_diverged_run_a_bug_and_an_interrupt(monkeypatch, error, code, needle):
    import topotransfer.cli as cli_module

    def fail(args):
        raise error

    monkeypatch.setattr(cli_module, "_cmd_validate", fail)
    run = in_process("validate")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == code and len(lines) == 1 and needle in lines[0], run.stderr
    assert "Traceback" not in run.stderr
