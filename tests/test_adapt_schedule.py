"""The adapt recipe's learning-rate schedule and mid-epoch checkpoints, and its refusal of FSDP launches.

The schedule runs over the whole run's optimizer steps (head phase, insertion events and LoRA phase
included); a run stopped right after a mid-epoch checkpoint resumes to the uninterrupted weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_adapt import base, run  # noqa: E402, F401  (base: the module's tiny saved ViT fixture)
from test_distributed import launch_two_processes  # noqa: E402

import topotransfer.recipes.adapt as adapt_recipe  # noqa: E402
import topotransfer.training.run as run_skeleton  # noqa: E402  (checkpoints are written by the run skeleton)
from topotransfer.config import load_config  # noqa: E402
from topotransfer.training.checkpoint import latest_checkpoint  # noqa: E402
from topotransfer.training.optim import lr_factor  # noqa: E402

# 60 examples, batch 20: 3 steps per epoch; head 1 + 2 insertions x 2 + final 1 = 6 epochs, 18 steps
SCHEDULE = ["adapt.lora=true", "adapt.lora_r=2", "adapt.lora_dropout=0.3", "adapt.head_epochs=1",
            "adapt.insertions=2", "adapt.epochs_per_insertion=2", "adapt.final_epochs=1", "adapt.lr=0.01",
            "train.checkpoint_every=100", "train.lr_schedule=cosine", "train.warmup_steps=2"]


def _history(out: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "time"} for h in json.loads((out / "history.json").read_text())["epochs"]]


def test_lr_schedule_spans_phases_and_insertions(base, tmp_path):  # noqa: F811
    res = run(base, tmp_path / "run", *SCHEDULE)
    assert res.results["insertions"] == 2 and res.results["steps"] == 18
    cfg = load_config(None, ["train.lr_schedule=cosine", "train.warmup_steps=2"]).train
    history = _history(tmp_path / "run")
    assert [h["phase"] for h in history] == ["head", "insertion 1", "insertion 1", "insertion 2", "insertion 2",
                                             "final"]
    # the LR of each epoch's last step (steps 3, 6, ..., 18): head + inserted layers at adapt.lr
    expected = [0.01 * lr_factor(3 * (e + 1) - 1, 18, cfg) for e in range(6)]
    assert [h["lr"] for h in history] == pytest.approx(expected)
    assert history[-1]["lr"] < 1e-3 < history[1]["lr"], "the schedule restarted at an insertion event"


class _Killed(BaseException):
    """Stands for SIGKILL right after a checkpoint was written."""


def test_mid_epoch_checkpoint_resumes_to_the_uninterrupted_weights(base, tmp_path, monkeypatch):  # noqa: F811
    """Stopped right after the mid-epoch checkpoint of step 8 (epoch 3, 2 of 3 batches; after insertion 1,
    LoRA dropout drawing from the RNG), resumed: the trained tensors equal the uninterrupted run's."""
    extra = (*SCHEDULE, "train.checkpoint_every_steps=4")
    real_save = run_skeleton.save_checkpoint
    seen = []

    def save_then_die(out, name, model, manifest, optimizer=None, state=None, **kw):
        path = real_save(out, name, model, manifest, optimizer, state, **kw)
        if state and state.get("epoch_progress") is not None:
            seen.append((state["steps"], state["epoch"], state["epoch_progress"]["batches"]))
            if state["steps"] == 8:
                raise _Killed
        return path

    monkeypatch.setattr(run_skeleton, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run(base, tmp_path / "run", *extra)
    assert seen == [(4, 1, 1), (8, 2, 2)]
    assert (latest_checkpoint(tmp_path / "run") / "rng.pt").is_file()
    monkeypatch.setattr(run_skeleton, "save_checkpoint", real_save)
    resumed = adapt_recipe.run_adapt(
        load_config(adapt_recipe_config(), _over(base, tmp_path / "run", *extra)), resume=True
    )
    full = run(base, tmp_path / "full", *extra)
    a, b = (load_file(str(tmp_path / d / "last" / "model.safetensors")) for d in ("run", "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.results["test_error"] == full.results["test_error"]
    assert _history(tmp_path / "run") == _history(tmp_path / "full")


def adapt_recipe_config() -> Path:
    from topotransfer.cli import BUILTIN_CONFIGS

    return BUILTIN_CONFIGS / "adapt_digits_vit.yaml"


def _over(base_dir: str, out: Path, *extra: str) -> list[str]:
    from test_adapt import overrides

    return overrides(base_dir, out, *extra)


@pytest.mark.distributed
def test_fsdp_launch_of_adapt_is_refused_with_a_clear_error(base, tmp_path):  # noqa: F811
    proc = launch_two_processes(["adapt", "--config", "adapt_digits_vit", *_over(base, tmp_path / "run")], "fsdp",
                                timeout=120)
    assert proc.returncode != 0
    assert "the adapt recipe runs under DDP, not FSDP" in proc.stderr, proc.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "run") is None


def test_bf16_adapt_trains_in_bf16_and_probes_in_float32(base, tmp_path, monkeypatch):  # noqa: F811
    from topotransfer.derivative.statistics import DenseStatistic

    train_dtypes, probe_dtypes = set(), set()
    real_load, real_update = adapt_recipe.load_backbone, DenseStatistic.update

    def load_backbone(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.vit.embeddings.register_forward_hook(lambda m, i, o: train_dtypes.add(o.dtype) if m.training else None)
        model.classifier.register_forward_hook(lambda m, i, o: train_dtypes.add(o.dtype) if m.training else None)
        return model

    def update(self, z, p, represents=None):
        probe_dtypes.update({z.dtype, p.dtype})
        return real_update(self, z, p, represents)

    monkeypatch.setattr(adapt_recipe, "load_backbone", load_backbone)
    monkeypatch.setattr(DenseStatistic, "update", update)
    res = run(base, tmp_path / "run", "train.mixed_precision=bf16", "adapt.head_epochs=1", "adapt.insertions=1",
              "adapt.epochs_per_insertion=1", "adapt.final_epochs=1")
    assert res.results["insertions"] == 1
    assert torch.bfloat16 in train_dtypes, "training forwards should run under bf16 autocast"
    assert probe_dtypes == {torch.float32}, "the derivative's states must not be bf16"
