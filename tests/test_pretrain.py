"""``topotransfer pretrain``: a small ViT trained from a ViTConfig, saved with its image processor; then the
offline three-step path of the README: pretrain -> adapt on the result -> reload the adapter, identical logits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import topotransfer as tt  # noqa: E402
from topotransfer.cli import main  # noqa: E402
from topotransfer.config import ConfigError, load_config  # noqa: E402
from topotransfer.recipes.pretrain import run_pretrain  # noqa: E402

TINY = ["model.width=16", "model.depth=2", "model.num_heads=2", "model.patch_size=4", "data.name=digits",
        "data.num_train=200", "data.num_val=50", "data.num_test=50", "train.epochs=1", "train.batch_size=32",
        "train.warmup_steps=0", "progress=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    code = main(["pretrain", "--config", "pretrain_vit_mnist", f"output_dir={out}", *TINY])
    assert code == 0
    return out


def test_pretrain_output_loads_with_from_pretrained(pretrained, capsys):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTForImageClassification

    results = json.loads((pretrained / "results.json").read_text())
    assert results["recipe"] == "pretrain" and results["test_error"] is not None and results["epochs"] == 1
    assert results["image_size"] == 8 and results["num_channels"] == 1 and results["num_labels"] == 10
    model = AutoModelForImageClassification.from_pretrained(pretrained / "model")
    assert isinstance(model, ViTForImageClassification)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 16
    assert model.config.id2label[3] == "3"
    processor = AutoImageProcessor.from_pretrained(pretrained / "model")
    assert processor.size == {"height": 8, "width": 8}
    assert list(processor.image_mean) == [0.5] and list(processor.image_std) == [0.5]
    # the saved weights are the trained ones: the recorded test error is reproduced from the directory
    from topotransfer.data import load_task

    task = load_task("digits", num_train=200, num_val=50, num_test=50)
    x, y = task.test.tensors
    with torch.no_grad():
        pred = model.eval()(pixel_values=(x - 0.5) / 0.5).logits.argmax(-1)
    assert int((pred != y).sum()) / len(y) == pytest.approx(results["test_error"], abs=1e-12)


def test_pretrain_adapt_reload_offline(pretrained, tmp_path):
    from topotransfer.recipes.adapt import run_adapt

    backbone = pretrained / "model"
    cfg = load_config(None, ["task=adapt", f"model.name_or_path={backbone}", f"output_dir={tmp_path / 'adapt'}",
                             "data.name=digits", "data.num_train=60", "data.num_val=30", "data.num_test=30",
                             "probe.batch_size=30", "probe.batches=1", "train.batch_size=20", "progress=false",
                             "adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1"])
    run = run_adapt(cfg)
    assert run.results["insertions"] == 1 and run.results["normalization"]["mean"] == [0.5]
    # sites named as users think of them: the place in the base model + the insertion order there
    event, record = run.results["events"][0], run.results["insertion_records"][0]
    assert event["site_labels"][event["site"]] == event["site_label"] == record["site_label"]
    assert event["label"] == record["label"] == f"{record['site_label']}+1"
    reloaded = tt.load_adapter(str(backbone), tmp_path / "adapt" / "adapter")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(run.model.eval()(pixel_values=x).logits, reloaded.eval()(pixel_values=x).logits)


def test_pretrain_refuses_what_it_cannot_build(tmp_path, capsys):
    base = [f"output_dir={tmp_path / 'x'}", *TINY]
    with pytest.raises(ConfigError, match="model.family=vit"):
        run_pretrain(load_config(None, ["task=pretrain", *base, "model.family=mlp"]))
    with pytest.raises(ConfigError, match="needs an image classification task"):
        run_pretrain(load_config(None, ["task=pretrain", *base, "model.family=vit", "data.name=sentiment"]))
    assert main(["pretrain", "--config", "grow_digits"]) == 2
    assert "the config has task='grow': run it with `topotransfer grow`" in capsys.readouterr().err


def _files(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_refused_rerun_leaves_the_run_byte_identical(pretrained, capsys):
    from topotransfer.errors import RunExistsError

    before = _files(pretrained)
    assert main(["pretrain", "--config", "pretrain_vit_mnist", f"output_dir={pretrained}", *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(RunExistsError, match="--resume"):
        run_pretrain(load_config(None, ["task=pretrain", "model.family=vit", f"output_dir={pretrained}", *TINY]))
    assert _files(pretrained) == before


class _Killed(BaseException):
    """Stands for SIGKILL right after a checkpoint was written (BaseException: nothing catches it)."""


def test_a_killed_pretrain_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Killed right after the mid-epoch checkpoint of step 5 (7 steps per epoch, 2 epochs), resumed with
    ``--resume``: the weights, history and test error equal the uninterrupted run's."""
    from safetensors.torch import load_file

    import topotransfer.training.run as run_skeleton
    from topotransfer.training.checkpoint import latest_checkpoint

    extra = ["train.epochs=2", "train.checkpoint_every_steps=5", "train.lr_schedule=cosine"]
    real_save = run_skeleton.save_checkpoint

    def save_then_die(out, name, net, manifest, optimizer=None, state=None, **kw):
        path = real_save(out, name, net, manifest, optimizer, state, **kw)
        if state and state.get("steps") == 5:
            raise _Killed
        return path

    monkeypatch.setattr(run_skeleton, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        main(["pretrain", "--config", "pretrain_vit_mnist", f"output_dir={tmp_path / 'run'}", *TINY, *extra])
    assert not (tmp_path / "run" / "results.json").exists()
    saved = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert saved["steps"] == 5 and saved["epoch"] == 0 and saved["epoch_progress"]["batches"] == 5
    mid_epoch = []

    def save_and_note(out, name, net, manifest, optimizer=None, state=None, **kw):
        if state and state.get("epoch_progress") is not None:
            mid_epoch.append(state["steps"])
        return real_save(out, name, net, manifest, optimizer, state, **kw)

    monkeypatch.setattr(run_skeleton, "save_checkpoint", save_and_note)
    args = ["pretrain", "--config", "pretrain_vit_mnist", *TINY, *extra]
    assert main([*args[:3], "--resume", f"output_dir={tmp_path / 'run'}", *args[3:]]) == 0
    assert mid_epoch == [10]  # continued after step 5 (a restart would checkpoint at step 5 again)
    monkeypatch.setattr(run_skeleton, "save_checkpoint", real_save)
    assert main([*args, f"output_dir={tmp_path / 'full'}"]) == 0
    run, full = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("run", "full"))
    assert run["steps"] == full["steps"] == 14 and run["test_error"] == full["test_error"]
    assert [{k: v for k, v in h.items() if k != "time"} for h in run["history"]] == \
        [{k: v for k, v in h.items() if k != "time"} for h in full["history"]]
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("run", "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(run["phase_times"]) >= {"training", "evaluation", "saving"}
