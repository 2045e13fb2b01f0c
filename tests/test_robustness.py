"""Runs that fail or are interrupted: NaN losses stop cleanly, a SIGKILLed run resumes exactly, bf16
trains in bf16 while the derivative stays float32."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import topotransfer.recipes.grow as grow_recipe
import topotransfer.training.run as run_skeleton  # the life cycle (checkpoints, evaluation) the recipes share
from topotransfer import ResidualMLP, compute_site_statistics
from topotransfer.config import load_config
from topotransfer.derivative.statistics import DenseStatistic
from topotransfer.derivative.topological import solve_site
from topotransfer.recipes.grow import run_grow
from topotransfer.training.checkpoint import latest_checkpoint

TINY = [
    "data.name=regression", "data.num_train=160", "data.num_val=64", "data.num_test=128",
    "model.width=8", "model.depth=1", "train.epochs=12", "train.batch_size=32", "train.lr=0.01",
    "growth.epochs_per_stage=4", "growth.max_insertions=2", "probe.batch_size=80", "progress=false",
    "train.checkpoint_every=3",
]


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"output_dir={tmp_path}", *extra])


def _same_weights(a_dir, b_dir) -> bool:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_losses = grow_recipe._losses
    calls = {"n": 0}
    nan_at = 6 * 5 + 2  # 5 steps per epoch: the 3rd step of epoch 7 (checkpoints at epochs 3, 4, 6)

    def poisoned(kind):
        loss_mean, loss_sum = real_losses(kind)

        def loss(out, y):
            calls["n"] += 1
            value = loss_mean(out, y)
            return value * float("nan") if calls["n"] == nan_at + 1 else value

        return loss, loss_sum

    monkeypatch.setattr(grow_recipe, "_losses", poisoned)
    with pytest.raises(FloatingPointError, match=r"Training loss is nan at step 2.*epoch 7.*stays the latest checkpoint"):
        run_grow(_cfg(tmp_path / "run"))
    last = latest_checkpoint(tmp_path / "run")
    state = json.loads((last / "state.json").read_text())
    assert state["epoch"] == 6 and len(state["events"]) == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())["epochs"]) == 6

    # The good checkpoint resumes to exactly the run that never saw a NaN.
    monkeypatch.setattr(grow_recipe, "_losses", real_losses)
    resumed = run_grow(_cfg(tmp_path / "run"), resume=True)
    full = run_grow(_cfg(tmp_path / "full"))
    assert _same_weights(tmp_path / "run" / "last", tmp_path / "full" / "last")
    assert resumed["test_error"] == full["test_error"]


def test_nonfinite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    real_evaluate = run_skeleton.evaluate

    def evaluate_then_corrupt(model, *args, **kwargs):
        out = real_evaluate(model, *args, **kwargs)
        if len(list(tmp_path.glob("run/last"))) and not getattr(evaluate_then_corrupt, "done", False):
            evaluate_then_corrupt.done = True
            with torch.no_grad():
                next(model.parameters())[0] = float("inf")  # silently corrupted after a valid evaluation
        return out

    monkeypatch.setattr(run_skeleton, "evaluate", evaluate_then_corrupt)
    with pytest.raises(FloatingPointError, match="Non-finite parameters.*refusing to checkpoint"):
        run_grow(_cfg(tmp_path / "run", "train.checkpoint_every=1"))
    last = latest_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())


KILL_RUN = [
    "data.name=regression", "data.num_train=2000", "data.num_val=100", "data.num_test=100", "model.width=8",
    "model.depth=1", "train.epochs=12", "train.batch_size=16", "train.lr=0.003", "growth.epochs_per_stage=4",
    "growth.max_insertions=2", "probe.batch_size=500", "probe.batches=2", "progress=false",
    "train.checkpoint_every=100",
]


def test_sigkilled_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """A real process killed (SIGKILL) right after the first growth event's checkpoint, then --resume."""
    cli = [sys.executable, "-m", "topotransfer.cli", "grow", *KILL_RUN, f"output_dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    history = tmp_path / "killed" / "history.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if history.is_file() and json.loads(history.read_text())["events"]:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_state = json.loads((latest_checkpoint(tmp_path / "killed") / "state.json").read_text())
    assert killed_state["epoch"] < 12 and not (tmp_path / "killed" / "results.json").exists()

    resumed = subprocess.run(cli + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = run_grow(load_config(None, KILL_RUN + [f"output_dir={tmp_path / 'full'}"]))
    assert _same_weights(tmp_path / "killed" / "last", tmp_path / "full" / "last")
    res = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert res["test_error"] == full["test_error"]
    assert [e["site"] for e in res["events"]] == [e["site"] for e in full["events"]]
    assert [e["param_checksums"] for e in res["events"]] == [e["param_checksums"] for e in full["events"]]


def test_bf16_trains_in_bf16_and_probes_in_float32(tmp_path, monkeypatch):
    train_dtypes, probe_dtypes = set(), set()
    real_build, real_update = grow_recipe.build_model, DenseStatistic.update

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.input_layer.register_forward_hook(
            lambda m, i, o: train_dtypes.add(o.dtype) if m.training else None
        )
        return model

    def update(self, z, p):
        probe_dtypes.update({z.dtype, p.dtype})
        return real_update(self, z, p)

    monkeypatch.setattr(grow_recipe, "build_model", build_model)
    monkeypatch.setattr(DenseStatistic, "update", update)
    res = run_grow(_cfg(tmp_path, "train.mixed_precision=bf16"))
    assert res["insertions"] == 2 and res["test_error"] == res["test_error"]
    assert train_dtypes == {torch.bfloat16}, "training forward should run under bf16 autocast"
    assert probe_dtypes == {torch.float32}, "the derivative's states must not be bf16"
    monkeypatch.undo()
    # A later float32 run in the same process is unaffected by the bf16 accelerate state.
    assert run_grow(_cfg(tmp_path / "fp32", "train.epochs=2"))["depth"] == 1


def test_matrix_free_solve_ignores_a_callers_autocast():
    torch.manual_seed(0)
    model, x = ResidualMLP(3, 12, 1, 2), torch.randn(200, 3)
    data = [(x, torch.randn(200, 2))]
    _, stats, _, _ = compute_site_statistics(model, data, nn.MSELoss(reduction="sum"), solver="matrix_free")
    st = stats["layers.0"]
    ref = solve_site(st, num_eigenvalues=4, tol=1e-10).values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = solve_site(st, num_eigenvalues=4, tol=1e-10).values
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- LR schedule, mid-epoch checkpoints, disk
def test_lr_schedule_values():
    from topotransfer.training.optim import lr_factor

    def lr_at(step, total, cfg):
        return cfg.lr * lr_factor(step, total, cfg)

    cos = load_config(None, ["train.lr=0.1", "train.lr_schedule=cosine", "train.warmup_steps=4"]).train
    assert [lr_at(s, 20, cos) for s in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lr_at(4, 20, cos) == pytest.approx(0.1) and lr_at(12, 20, cos) == pytest.approx(0.05)
    assert lr_at(20, 20, cos) == pytest.approx(0.0, abs=1e-12) and lr_at(99, 20, cos) == pytest.approx(0.0, abs=1e-12)
    lin = load_config(None, ["train.lr=0.1", "train.lr_schedule=linear"]).train
    assert lr_at(0, 10, lin) == pytest.approx(0.1) and lr_at(5, 10, lin) == pytest.approx(0.05)
    const = load_config(None, ["train.lr=0.1"]).train
    assert {lr_at(s, 10, const) for s in range(12)} == {0.1}
    with pytest.raises(ValueError, match="lr_schedule must be"):
        load_config(None, ["train.lr_schedule=step"])


def test_lr_schedule_runs_over_global_steps_across_growth_events(tmp_path):
    """The LR of every epoch's last step is the schedule at the run's global step: a growth event's new
    optimizer continues on it instead of restarting at the peak."""
    from topotransfer.training.optim import lr_factor

    cfg = _cfg(tmp_path, "train.lr_schedule=cosine", "train.warmup_steps=3")
    res = run_grow(cfg)
    assert res["insertions"] == 2
    history = json.loads((tmp_path / "history.json").read_text())["epochs"]
    total = cfg.train.epochs * 5  # 160 examples / batch 32
    assert [h["steps"] for h in history] == [5 * (e + 1) for e in range(12)]
    assert [h["lr"] for h in history] == pytest.approx([0.01 * lr_factor(h["steps"] - 1, total, cfg.train) for h in history])
    assert history[4]["lr"] < history[3]["lr"] < 0.01, "the LR after the first growth event went back up"


class _Killed(BaseException):
    """Stands for SIGKILL right after a checkpoint was written (BaseException: nothing catches it)."""


def test_mid_epoch_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """train.checkpoint_every_steps: a run stopped right after a mid-epoch checkpoint (7 steps: never at an
    epoch boundary here, 5 steps per epoch) resumes by skipping the batches already trained on in that
    epoch's shuffle, and ends bit-identical to the uninterrupted run (weights, history, LR schedule)."""
    extra = ("train.checkpoint_every_steps=7", "train.lr_schedule=cosine")
    real_save = run_skeleton.save_checkpoint
    seen = []

    def save_then_die(out, name, net, manifest, optimizer=None, state=None, **kw):
        path = real_save(out, name, net, manifest, optimizer, state, **kw)
        if state and state.get("epoch_progress") is not None:
            seen.append(dict(state["epoch_progress"], epoch=state["epoch"], steps=state["steps"]))
            if len(seen) == 4 and state["events"]:  # step 28: epoch 6, 3 of its 5 batches, after event 1
                raise _Killed
        return path

    monkeypatch.setattr(run_skeleton, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run_grow(_cfg(tmp_path / "run", *extra))
    assert seen[-1]["steps"] == 28 and seen[-1]["epoch"] == 5 and seen[-1]["batches"] == 3
    assert (latest_checkpoint(tmp_path / "run") / "rng.pt").is_file()
    monkeypatch.setattr(run_skeleton, "save_checkpoint", real_save)
    resumed = run_grow(_cfg(tmp_path / "run", *extra), resume=True)
    full = run_grow(_cfg(tmp_path / "full", *extra))
    assert _same_weights(tmp_path / "run" / "last", tmp_path / "full" / "last")
    assert resumed["test_error"] == full["test_error"]
    h_run, h_full = (json.loads((tmp_path / d / "history.json").read_text())["epochs"] for d in ("run", "full"))
    strip = [{k: v for k, v in h.items() if k != "time"} for h in h_run]
    assert strip == [{k: v for k, v in h.items() if k != "time"} for h in h_full]


def test_a_stop_between_the_best_copy_and_last_resumes_with_the_copy_last_knows(tmp_path, monkeypatch):
    """Run.checkpoint writes the best-validation copy, then `last`. A run stopped between the two, when the new
    best model already has the first growth event's layer and the previous `last` recorded a best epoch before
    it, resumes with that epoch's copy (kept as `best.previous`) and ends as the uninterrupted run: same best
    epoch, best-validation test error and weights."""
    real_save = run_skeleton.save_checkpoint
    calls = []

    def save_then_die(out, name, net, manifest, optimizer=None, state=None, **kw):
        if name == "last" and calls and calls[-1] == "best" and (state or {}).get("best_insertions", 0) >= 1:
            raise _Killed  # the new copy (with the inserted layer) is on disk, its `last` is not
        calls.append(name)
        return real_save(out, name, net, manifest, optimizer, state, **kw)

    monkeypatch.setattr(run_skeleton, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run_grow(_cfg(tmp_path / "run"))
    monkeypatch.setattr(run_skeleton, "save_checkpoint", real_save)
    saved = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    newest = json.loads((tmp_path / "run" / "best" / "state.json").read_text())
    assert saved["best_insertions"] == 0 and newest["epoch"] > saved["best_epoch"]  # the case this test is about
    resumed = run_grow(_cfg(tmp_path / "run"), resume=True)
    full = run_grow(_cfg(tmp_path / "full"))
    assert (resumed["best_epoch"], resumed["test_error"]) == (full["best_epoch"], full["test_error"])
    assert _same_weights(tmp_path / "run" / "last", tmp_path / "full" / "last")
    assert _same_weights(tmp_path / "run" / "best", tmp_path / "full" / "best")


def test_rng_states_round_trip():
    from topotransfer.training.checkpoint import gather_rng_states, restore_rng_state

    torch.manual_seed(3)
    (saved,) = gather_rng_states(None)
    a = torch.rand(5)
    torch.manual_seed(4)
    restore_rng_state(saved)
    assert torch.equal(torch.rand(5), a)


def test_a_nearly_full_disk_fails_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    calls = []
    monkeypatch.setattr(run_skeleton, "train_run_epoch", lambda *a, **k: calls.append(1))
    with pytest.raises(OSError, match=r"MB free; this run's checkpoints need"):
        run_grow(_cfg(tmp_path / "run"))
    assert not calls and latest_checkpoint(tmp_path / "run") is None


def test_mid_epoch_checkpoint_of_another_process_count_is_refused(tmp_path):
    from topotransfer.errors import CheckpointMismatchError
    from topotransfer.training.checkpoint import gather_rng_states, resume_rng_states, save_checkpoint

    model = ResidualMLP(2, 4, 1, 1)
    two_ranks = gather_rng_states(None) * 2
    save_checkpoint(tmp_path, "last", model, {"insertions": []}, None, {"epoch_progress": {"batches": 3}},
                    rng_states=two_ranks)
    ckpt = latest_checkpoint(tmp_path)
    assert len(resume_rng_states(ckpt, {"epoch_progress": {"batches": 3}}, 2)) == 2
    assert resume_rng_states(ckpt, {"epoch_progress": None}, 1) is None  # epoch boundary: any count
    with pytest.raises(CheckpointMismatchError, match="written mid-epoch by 2 processes.*this run has 1"):
        resume_rng_states(ckpt, {"epoch_progress": {"batches": 3}}, 1)


def test_checkpoints_carry_checksums_and_keep_the_previous_generation(tmp_path):
    """Every file of a checkpoint is listed with its SHA-256 in manifest.json; a damaged file is named (file and
    checkpoint) before anything loads; the replaced `last` stays as `last.previous` and still loads."""
    import hashlib

    from topotransfer.errors import CheckpointMismatchError, CorruptCheckpointError
    from topotransfer.training.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint

    torch.manual_seed(0)
    net = ResidualMLP(2, 4, 1, 1)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(3, 2)).sum().backward()
    opt.step()
    manifest = {"format": 1, "insertions": []}
    save_checkpoint(tmp_path, "last", net, manifest, opt, {"epoch": 1})
    first = load_file(str(tmp_path / "last" / "model.safetensors"))
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    save_checkpoint(tmp_path, "last", net, manifest, opt, {"epoch": 2})
    assert "checksums" not in manifest, "the caller's manifest is not changed"
    saved = verify_checkpoint(tmp_path / "last")
    assert sorted(saved["checksums"]) == ["model.safetensors", "optimizer.pt", "state.json"]
    for name, digest in saved["checksums"].items():
        assert hashlib.sha256((tmp_path / "last" / name).read_bytes()).hexdigest() == digest
    previous = load_file(str(tmp_path / "last.previous" / "model.safetensors"))
    assert all(torch.equal(first[k], previous[k]) for k in first)
    assert load_checkpoint(tmp_path / "last.previous", ResidualMLP(2, 4, 1, 1))["state"] == {"epoch": 1}

    weights = tmp_path / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(CorruptCheckpointError, match=r"last is corrupt: model.safetensors .*--resume-from last.previous"):
        load_checkpoint(tmp_path / "last", ResidualMLP(2, 4, 1, 1))
    # another architecture: a one-line mismatch error, not torch's "size mismatch" traceback
    with pytest.raises(CheckpointMismatchError, match="another architecture.*size mismatch for"):
        load_checkpoint(tmp_path / "last.previous", ResidualMLP(2, 6, 1, 1))
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_checkpoint(tmp_path / "last.previous", ResidualMLP(2, 4, 2, 1))


def test_a_kill_inside_save_checkpoint_resumes_from_the_checkpoint_latest_named(tmp_path, monkeypatch):
    """save_checkpoint moves `last` to `last.previous`, then the new one into `last`: a run killed between the
    two moves leaves `latest` naming a missing `last`; resume then finds the checkpoint `latest` meant."""
    import os

    from topotransfer.training import checkpoint as ckpt

    net = ResidualMLP(2, 4, 1, 1)
    ckpt.save_checkpoint(tmp_path, "last", net, {"format": 1, "insertions": []}, None, {"epoch": 1})
    assert latest_checkpoint(tmp_path) == tmp_path / "last"
    real_replace, calls = os.replace, []

    def killed_after_first_move(src, dst):
        calls.append((src, dst))
        real_replace(src, dst)
        if str(dst).endswith("last.previous"):
            raise KeyboardInterrupt  # the process dies here, before the new checkpoint is moved into place

    monkeypatch.setattr(ckpt.os, "replace", killed_after_first_move)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, "last", net, {"format": 1, "insertions": []}, None, {"epoch": 2})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert not (tmp_path / "last").exists() and (tmp_path / "latest").read_text().strip() == "last"
    found = latest_checkpoint(tmp_path)
    assert found == tmp_path / "last.previous"
    assert ckpt.load_checkpoint(found, ResidualMLP(2, 4, 1, 1))["state"] == {"epoch": 1}
