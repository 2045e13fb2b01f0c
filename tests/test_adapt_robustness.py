"""The adapt recipe under accelerate (2 CPU processes), its checkpoints, kill-and-resume and NaN handling.

Same tiny "pretrained" ViT and digits target as tests/test_adapt.py (its fixtures are reused). Every run
inserts layers with LoRA on, so the checkpoints carry the LoRA matrices, the inserted layers and the head.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from test_adapt import IMAGE, logits, overrides, run, save_vit  # noqa: E402
from test_distributed import LAUNCH_ENV, _launch_cmd, kill_launch  # noqa: E402

import topotransfer.recipes.adapt as adapt_recipe  # noqa: E402
from topotransfer.adapter import load_adapter, load_merged  # noqa: E402
from topotransfer.cli import BUILTIN_CONFIGS  # noqa: E402
from topotransfer.config import load_config  # noqa: E402
from topotransfer.errors import CheckpointMismatchError  # noqa: E402
from topotransfer.training.checkpoint import latest_checkpoint  # noqa: E402

# 3 steps per epoch on one process; head 1 + 2 insertions x 2 epochs + final 1 = 6 epochs, 18 steps.
SCHEDULE = ["adapt.lora=true", "adapt.lora_r=2", "adapt.head_epochs=1", "adapt.insertions=2",
            "adapt.epochs_per_insertion=2", "adapt.final_epochs=1", "train.checkpoint_every=2", "adapt.lr=0.01"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_vit(tmp_path_factory.mktemp("vit"))


def _same_weights(a_dir, b_dir) -> bool:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ one process
def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_resumes_exactly(base, tmp_path, monkeypatch):
    real_losses = adapt_recipe._losses
    calls = {"n": 0}
    nan_at = 4 * 3 + 1  # the 2nd step of epoch 5; the checkpoint of epoch 4 (after both insertions) stays

    def poisoned(kind):
        loss_mean, loss_sum = real_losses(kind)

        def loss(out, y):
            calls["n"] += 1
            value = loss_mean(out, y)
            return value * float("nan") if calls["n"] == nan_at + 1 else value

        return loss, loss_sum

    monkeypatch.setattr(adapt_recipe, "_losses", poisoned)
    with pytest.raises(FloatingPointError, match=r"Training loss is nan at step 1.*epoch 5.*stays the latest checkpoint"):
        run(base, tmp_path / "run", *SCHEDULE)
    last = latest_checkpoint(tmp_path / "run")
    state = json.loads((last / "state.json").read_text())
    assert state["epoch"] == 4 and state["steps"] == 12 and len(state["events"]) == 2
    assert state["method_started"] and state["phase"] == "insertion 2"
    manifest = json.loads((last / "manifest.json").read_text())
    assert [i["site"] for i in manifest["insertions"]] == [e["site"] for e in state["events"]]
    assert manifest["lora"]["r"] == 2
    tensors = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    # only what training changes: head, inserted layers, LoRA (the frozen backbone comes from the base)
    assert any("lora_A" in k for k in tensors) and any("classifier" in k for k in tensors)
    assert not any(k.endswith("q_proj.base_layer.weight") for k in tensors)
    assert not (tmp_path / "run" / "results.json").exists()

    monkeypatch.setattr(adapt_recipe, "_losses", real_losses)
    with pytest.raises(CheckpointMismatchError, match="method: checkpoint 'topo' vs config 'random_site'"):
        _resume(base, tmp_path / "run", "adapt.method=random_site")  # --resume needs the same run
    resumed = _resume(base, tmp_path / "run")
    full = run(base, tmp_path / "full", *SCHEDULE)
    assert _same_weights(tmp_path / "run" / "last", tmp_path / "full" / "last")
    r, f = resumed.results, full.results
    assert r["test_error"] == f["test_error"] and r["steps"] == f["steps"] == 18
    assert [e["param_checksums"] for e in r["events"]] == [e["param_checksums"] for e in f["events"]]
    assert r["history"] == [{**h, "time": r["history"][i]["time"]} for i, h in enumerate(f["history"])]
    assert torch.equal(logits(resumed.model, _x()), logits(full.model, _x()))
    # the checkpoint alone rebuilds the final model (base + LoRA + replayed insertions + tensors)
    rebuilt = adapt_recipe.load_adapt_checkpoint(tmp_path / "run")
    assert torch.equal(logits(rebuilt, _x()), logits(full.model, _x()))


def _resume(base, out, *extra: str):
    cfg = load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml", overrides(base, out, *SCHEDULE, *extra))
    return adapt_recipe.run_adapt(cfg, resume=True)


def test_unwritable_output_dir_fails_before_anything_loads(base, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the output directory was checked")

    monkeypatch.setattr(adapt_recipe, "load_backbone", no_loading)
    monkeypatch.setattr(adapt_recipe, "_load_data", no_loading)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError, match="is not writable"):
        run(base, tmp_path / "a_file" / "run")


KILL_RUN = [*SCHEDULE, "data.num_train=600", "adapt.epochs_per_insertion=3", "train.checkpoint_every=100"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process runs use one thread too (conftest)


def _kill_after_first_insertion(cmd: list[str], out, env: dict, group: bool = False) -> None:
    """Start ``cmd``, SIGKILL it (and its process group) once the first insertion's checkpoint is on disk."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=group)
    history = out / "history.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if history.is_file() and json.loads(history.read_text())["events"]:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    finally:
        if group:  # the launcher and its ranks (torch elastic gives every rank a session of its own)
            kill_launch(proc)
        else:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert 1 <= len(state["events"]) and state["phase"] != "done"
    assert not (out / "results.json").exists()


def test_sigkilled_adapt_run_resumes_to_the_uninterrupted_weights(base, tmp_path):
    out = tmp_path / "killed"
    cli = [sys.executable, "-m", "topotransfer.cli", "adapt", "--config", "adapt_digits_vit",
           *overrides(base, out, *KILL_RUN)]
    _kill_after_first_insertion(cli, out, ONE_THREAD)
    # `topotransfer adapt --resume` is this call (in-process: a second CLI start costs ~5 s of imports)
    _resume(base, out, *KILL_RUN)
    full = run(base, tmp_path / "full", *KILL_RUN)
    assert _same_weights(out / "last", tmp_path / "full" / "last")
    res = json.loads((out / "results.json").read_text())
    assert res["test_error"] == full.results["test_error"] and res["steps"] == full.results["steps"]
    assert [e["param_checksums"] for e in res["events"]] == [e["param_checksums"] for e in full.results["events"]]
    assert torch.equal(logits(load_adapter(base, out / "adapter"), _x()), logits(full.model, _x()))


class _Killed(Exception):
    """Stands for a kill between two epochs (the in-process runs below raise it instead of a signal)."""


@pytest.mark.parametrize(("forced", "layout"), [(1, (0, False)), (3, (1, True))])
def test_resumed_run_reports_the_best_validation_model_of_an_uninterrupted_one(base, tmp_path, monkeypatch,
                                                                                forced, layout):
    """A run stopped after its best-validation epoch rebuilds that epoch's model from ``output_dir/best``: the
    same best_val (epoch, losses, test error) as the uninterrupted run, with the model's architecture at that
    epoch (epoch 1: the head warm-up, no LoRA, no insertion; epoch 3: LoRA and the first of two insertions).
    Epoch ``forced``'s validation loss is made the lowest; the stop comes before epoch 5 (the last checkpoint
    is epoch 4's, after the second insertion)."""
    from topotransfer.training.run import Run

    real_epoch = Run.train_epoch
    stop_before = {"epoch": None}

    def train_epoch(self, *args, **kwargs):
        if self.state.epoch == stop_before["epoch"]:
            raise _Killed
        val = real_epoch(self, *args, **kwargs)
        if self.state.epoch == forced:
            self.state.history[-1]["val_loss"] = -1.0  # lower than any cross-entropy
        return val

    monkeypatch.setattr(Run, "train_epoch", train_epoch)
    full = run(base, tmp_path / "full", *SCHEDULE).results
    stop_before["epoch"] = 4
    with pytest.raises(_Killed):
        run(base, tmp_path / "stopped", *SCHEDULE)
    saved = json.loads((latest_checkpoint(tmp_path / "stopped") / "state.json").read_text())
    assert saved["epoch"] == 4 and saved["best_val"]["epoch"] == forced
    stop_before["epoch"] = None
    resumed = _resume(base, tmp_path / "stopped").results
    best = full["best_val"]
    assert best["epoch"] == forced and best["test_error"] is not None
    assert (best["insertions"], best["lora"]) == layout
    assert resumed["best_val"] == best and resumed["test_error"] == full["test_error"]
    # the copy holds the trained tensors only: no frozen backbone weight
    kept = load_file(str(tmp_path / "stopped" / "best" / "model.safetensors"))
    last = load_file(str(tmp_path / "stopped" / "last" / "model.safetensors"))
    assert not any("attention" in k and "lora" not in k for k in kept) and len(kept) <= len(last)


def test_a_stop_between_the_best_copy_and_last_resumes_with_the_copy_last_knows(base, tmp_path, monkeypatch):
    """Run.checkpoint writes the best-validation copy, then `last`: a run stopped between the two (the new copy on
    disk, its `last` not) rebuilds the copy of the best epoch the previous `last` recorded, from `best.previous`
    with that epoch's architecture, and reports the uninterrupted run's best_val. (Before `best.previous` was
    kept, adapt dropped the copy here and got the same result only because the replayed epochs find the newer
    best again; grow crashed, tests/test_robustness.py.)"""
    import topotransfer.training.run as run_skeleton

    real_save, calls = run_skeleton.save_checkpoint, []

    def save_then_die(out, name, net, manifest, optimizer=None, state=None, **kw):
        if name == "last" and calls[-1:] == ["best"] and "last" in calls:
            raise _Killed  # a second best copy is on disk, the `last` that records its epoch is not
        calls.append(name)
        return real_save(out, name, net, manifest, optimizer, state, **kw)

    full = run(base, tmp_path / "full", *SCHEDULE).results
    monkeypatch.setattr(run_skeleton, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run(base, tmp_path / "stopped", *SCHEDULE)
    monkeypatch.setattr(run_skeleton, "save_checkpoint", real_save)
    saved = json.loads((latest_checkpoint(tmp_path / "stopped") / "state.json").read_text())
    newest = json.loads((tmp_path / "stopped" / "best" / "state.json").read_text())
    assert newest["epoch"] > saved["best_val"]["epoch"]  # the case this test is about
    real_resume_best, rebuilt = adapt_recipe._resume_best, []
    monkeypatch.setattr(adapt_recipe, "_resume_best", lambda *a: rebuilt.append(a[-1].name) or real_resume_best(*a))
    resumed = _resume(base, tmp_path / "stopped").results
    assert rebuilt == ["best.previous"]
    assert full["best_val"]["test_error"] is not None
    assert resumed["best_val"] == full["best_val"] and resumed["test_error"] == full["test_error"]


# ------------------------------------------------------------------------------------------ two processes
TWO_PROC = [*SCHEDULE, "data.num_train=200", "train.batch_size=10", "probe.batch_size=15", "probe.batches=4"]


def _adapt_cmd(base, out, *extra: str, config_file: str | None = None) -> list[str]:
    return _launch_cmd(["adapt", "--config", "adapt_digits_vit", *overrides(base, out, *TWO_PROC, *extra)],
                       config_file)


@pytest.fixture(scope="module")
def two_process_run(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt2") / "full"
    t = time.perf_counter()
    proc = subprocess.run(_adapt_cmd(base, out), capture_output=True, text=True, env=LAUNCH_ENV, timeout=240)
    return out, proc, time.perf_counter() - t


@pytest.mark.distributed
def test_two_process_adapt_run(base, two_process_run):
    out, proc, wall = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"test_error"') == 1, "only rank 0 prints the summary"
    res = json.loads((out / "results.json").read_text())
    assert res["num_processes"] == 2 and res["insertions"] == 2 and res["lora"] and res["backbone_unchanged"]
    for ev in res["events"]:
        scores, params = ev["score_checksums"], ev["param_checksums"]
        assert len(scores) == 2 and scores[0] == scores[1], f"ranks' derivative scores differ: {scores}"
        assert len(params) == 2 and params[0] == params[1], f"ranks' inserted layers differ: {params}"
        assert ev["site"] == max(ev["scores"], key=ev["scores"].get)
    # 200 examples, batch 10 per process on 2 processes: 10 steps per epoch, 6 epochs
    assert res["steps"] == 60 and [h["phase"] for h in res["history"]] == [
        "head", "insertion 1", "insertion 1", "insertion 2", "insertion 2", "final"]
    # the adapter (written by rank 0 only) reloads with the checkpoint's exact logits; merged folds LoRA in
    x = _x(3)
    from_adapter = logits(load_adapter(base, out / "adapter"), x)
    assert torch.equal(from_adapter, logits(adapt_recipe.load_adapt_checkpoint(out), x))
    torch.testing.assert_close(logits(load_merged(out / "merged"), x), from_adapter, rtol=1e-5, atol=1e-6)
    print(f"2-process adapt run: {wall:.1f} s wall")


@pytest.mark.distributed
def test_two_process_adapt_run_killed_after_an_insertion_resumes_exactly(base, two_process_run, tmp_path):
    full, proc, _ = two_process_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "killed"
    cmd = _adapt_cmd(base, out, config_file="cpu_2proc")
    _kill_after_first_insertion(cmd, out, LAUNCH_ENV, group=True)  # the launcher and both ranks
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=LAUNCH_ENV, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same_weights(out / "last", full / "last")
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, out))
    assert ra["test_error"] == rb["test_error"]
    assert [e["param_checksums"] for e in ra["events"]] == [e["param_checksums"] for e in rb["events"]]
