"""The adapt recipe end to end on a tiny ViT saved locally (offline), its baselines, and its errors.

The "pretrained" backbone is a random tiny ViT written with ``save_pretrained`` (3 labels, 12x12 RGB
inputs); the target is scikit-learn digits (8x8 gray, 10 labels), so every run exercises the new head,
the resize and the gray -> RGB conversion. Budgets are a few optimizer steps (``train.max_steps``).
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from torch.utils.data import TensorDataset

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

from topotransfer.adapter import load_adapter, load_merged, save_adapter, unwrap_peft  # noqa: E402
from topotransfer.cli import BUILTIN_CONFIGS, main  # noqa: E402
from topotransfer.config import ConfigError, load_config  # noqa: E402
from topotransfer.errors import (  # noqa: E402
    AdapterMismatchError,
    EmptyDatasetError,
    ImageSizeError,
    LabelCountMismatchError,
)
from topotransfer.models.hf import ImageNormalization, load_backbone  # noqa: E402
from topotransfer.preprocess import prepare_images  # noqa: E402
from topotransfer.recipes.adapt import _set_trainable, apply_lora, lora_target_modules, run_adapt  # noqa: E402
from topotransfer.surgery import get_family  # noqa: E402

IMAGE, HIDDEN = 12, 16
SMALL = ["data.num_train=60", "data.num_val=30", "data.num_test=30", "probe.batch_size=30", "probe.batches=1",
         "train.batch_size=20", "progress=false"]


def assert_cli_error(capsys, argv: list[str], pattern: str) -> None:
    """The CLI refuses ``argv`` with exit code 2 and one ``error: ...`` line matching ``pattern`` (no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(pattern, err), err


def save_vit(path, layers: int = 2, seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                       image_size=IMAGE, patch_size=4, num_channels=3, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_vit(tmp_path_factory.mktemp("vit"))


def overrides(base: str, out, *extra: str) -> list[str]:
    return [f"model.name_or_path={base}", f"output_dir={out}", *SMALL, *extra]


def run(base: str, out, *extra: str):
    return run_adapt(load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml", overrides(base, out, *extra)))


def backbone_state(model) -> dict[str, torch.Tensor]:
    """The backbone's weights under the base model's own names: no head, no inserted blocks, no LoRA."""
    base, _ = unwrap_peft(model)
    family = get_family(base)
    _, container = family.chain(base)
    blocks = base.get_submodule(container)
    original = [i for i, b in enumerate(blocks) if family.unwrap(b) is None]
    renumber = {str(pos): str(i) for i, pos in enumerate(original)}
    out = {}
    for key, value in base.state_dict().items():
        if key.startswith("classifier.") or "lora_" in key:
            continue
        if key.startswith(container + "."):
            pos, rest = key[len(container) + 1 :].split(".", 1)
            if pos not in renumber:
                continue  # an inserted TopoLayer
            key = f"{container}.{renumber[pos]}.{rest}"
        out[key.replace(".base_layer.", ".")] = value
    return out


@torch.no_grad()
def logits(model, x):
    return model(x).logits


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_adapt_end_to_end(base, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["adapt", "--config", "adapt_digits_vit", *overrides(base, out, "adapt.head_epochs=1",
                 "adapt.insertions=2", "adapt.epochs_per_insertion=1", "adapt.final_epochs=1", "train.max_steps=6")])
    assert code == 0
    summary = json.loads(re.search(r"\{.*\}", capsys.readouterr().out, re.S).group(0))
    assert summary["method"] == "topo" and summary["insertions"] == 2
    results = json.loads((out / "results.json").read_text())
    assert results["backbone_unchanged"] and results["num_labels"] == 10 and results["depth"] == 4
    assert results["steps"] == 6 and len(results["events"]) == 2
    for event in results["events"]:
        assert event["site"] == max(event["scores"], key=event["scores"].get)  # argmax of probe.score
        assert event["epsilon"] > 0
        assert event["loss_after"] < event["loss_before"] or event["eps_fallback"]  # line search never raises it
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["insertions"] == results["insertion_records"] and adapter_cfg["num_labels"] == 10
    x = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))
    from_adapter, merged = load_adapter(base, out / "adapter"), load_merged(out / "merged")
    assert torch.equal(logits(from_adapter, x), logits(merged, x))
    assert from_adapter.config.id2label[9] == "9"


def test_adapter_and_merged_reload_equal_live_model(base, tmp_path):
    result = run(base, tmp_path, "adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1",
                 "train.max_steps=3")
    x = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    live = logits(result.model, x)
    assert torch.equal(logits(load_adapter(None, tmp_path / "adapter"), x), live)  # recorded base
    assert torch.equal(logits(load_merged(tmp_path / "merged"), x), live)
    fresh = backbone_state(load_backbone(base))
    now = backbone_state(result.model)
    assert fresh.keys() == now.keys() and all(torch.equal(fresh[k], now[k]) for k in fresh)


@pytest.mark.parametrize("whiten", ["false", "true"])
def test_rowwise_rule_in_the_adapt_recipe(base, tmp_path, whiten):
    """probe.rule=rowwise in adapt: every row with positive curvature starts active (cluster: a few), the
    site is still the argmax of TD (probe.score=lambda_max), and the adapter reloads to the live model's logits."""
    common = ("adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1", "train.max_steps=3",
              "probe.score=lambda_max")
    cluster = run(base, tmp_path / "cluster", "probe.rule=cluster", *common).results["events"][0]
    result = run(base, tmp_path / "rowwise", "probe.rule=rowwise", f"probe.whiten={whiten}", *common)
    (event,) = result.results["events"]
    assert event["scores"] == pytest.approx(cluster["scores"], rel=1e-5)  # TD does not depend on the rule
    assert event["site"] == cluster["site"] == max(event["scores"], key=event["scores"].get)
    assert event["k"] > cluster["k"] and event["epsilon"] > 0
    assert event["score_kind"] == "lambda_max" and event["scores"] == event["lambda_max"]
    x = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits(load_adapter(base, tmp_path / "rowwise" / "adapter"), x), logits(result.model, x))


def test_realized_site_selection_in_the_adapt_recipe(base, tmp_path):
    """adapt.site_selection=realized: every site with TD > 0 is line-searched; the layer goes where the held-out
    loss (at the first local minimum of its line search) ends lowest, and the event records that search."""
    result = run(base, tmp_path, "adapt.site_selection=realized", "adapt.head_epochs=1", "adapt.insertions=1",
                 "adapt.epochs_per_insertion=1", "train.max_steps=3")
    (event,) = result.results["events"]
    assert set(event["realized"]) == {s for s, v in event["scores"].items() if v > 0} and len(event["realized"]) > 1
    assert event["realized"][event["site"]] == min(event["realized"].values())  # ties: the larger TD
    if not event["eps_fallback"]:
        assert event["loss_after"] == pytest.approx(event["realized"][event["site"]], rel=1e-12)
    with pytest.raises(ConfigError, match="site_selection"):
        load_config(None, ["adapt.site_selection=best"])


def test_lora_and_inserted_layers_train_backbone_unchanged(base, tmp_path):
    result = run(base, tmp_path, "adapt.lora=true", "adapt.lora_r=2", "adapt.head_epochs=1", "adapt.insertions=1",
                 "adapt.epochs_per_insertion=2", "train.max_steps=5", "adapt.backbone_lr=0.01")
    model = result.model
    assert result.results["lora"] and unwrap_peft(model)[1] is not None
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained
    (_, layer), = get_family(model).inserted(model)
    norm = float(torch.cat([layer.weight.flatten(), layer.bias]).detach().norm())
    assert norm != pytest.approx(result.results["events"][0]["init_norm"], rel=1e-6)  # trained after insertion
    fresh, now = backbone_state(load_backbone(base)), backbone_state(model)
    assert fresh.keys() == now.keys() and all(torch.equal(fresh[k], now[k]) for k in fresh)
    # the adapter carries LoRA + inserted layer + head, and reloads exactly
    reloaded = load_adapter(base, tmp_path / "adapter")
    x = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(reloaded, x), logits(model, x))


def test_lora_and_inserted_layer_receive_gradient(base):
    from topotransfer.config import AdaptConfig
    from topotransfer.insertion import insert_layer

    model = load_backbone(base, id2label={i: str(i) for i in range(10)})
    model = apply_lora(model, AdaptConfig(lora_r=2))
    insert_layer(model, get_family(model).sites(model)[1].name, torch.ones(HIDDEN, HIDDEN), torch.ones(HIDDEN), 0.1)
    _set_trainable(model, ["classifier"], backbone=False, lora=True)
    x = torch.randn(4, 3, IMAGE, IMAGE)
    torch.nn.functional.cross_entropy(model(x).logits, torch.arange(4)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "lora_B" in n or ".layer." in n)
    assert all(grads[n] is None for n in grads if "lora_" not in n and ".layer." not in n and "classifier" not in n)
    assert lora_target_modules(model, None) == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="match no module"):
        lora_target_modules(model, ["query", "value"])


@pytest.mark.parametrize("method", ["linear_probe", "lora", "random_site", "last_block", "full_finetune"])
def test_baselines(base, tmp_path, method):
    result = run(base, tmp_path, f"adapt.method={method}", "adapt.head_epochs=1", "adapt.insertions=1",
                 "adapt.epochs_per_insertion=1", "train.max_steps=5")  # 3 head steps, 2 method steps
    r = result.results
    assert r["method"] == method and 0 <= r["test_error"] <= 1
    assert r["insertions"] == (1 if method in ("random_site", "last_block") else 0)
    if method == "last_block":
        assert r["insertion_records"][0]["site"] == "vit.layers.1"
    fresh, now = backbone_state(load_backbone(base)), backbone_state(result.model)
    unchanged = all(torch.equal(fresh[k], now[k]) for k in fresh)
    assert r["backbone_unchanged"] is unchanged
    assert unchanged is (method != "full_finetune")
    assert (tmp_path / "adapter").is_dir() is (method != "full_finetune")
    assert (tmp_path / "merged").is_dir()



@pytest.mark.parametrize(("method", "forced"), [("topo", 3), ("topo", 5), ("full_finetune", 3)])
def test_best_validation_epoch_and_its_test_error(base, tmp_path, monkeypatch, method, forced):
    """``best_val`` is the epoch of lowest validation loss and its test error is that epoch's model's.

    The live model is evaluated on the test split after every epoch (independently of the recipe) and epoch
    ``forced``'s validation loss is made the lowest: epoch 3 = the first after the insertion (the model trains
    on for two epochs, so the kept copy must not follow it; full_finetune: nor its backbone), epoch 5 = the
    last (then it is the final model's)."""
    import topotransfer.recipes.adapt as recipe
    from topotransfer.training.run import Run

    seen, task, real_epoch, real_load = {}, {}, Run.train_epoch, recipe._load_data

    def load_data(cfg, backbone_config):
        loaded = real_load(cfg, backbone_config)
        task["test"] = loaded[0].test
        return loaded

    def train_epoch(self, *args, **kwargs):
        val = real_epoch(self, *args, **kwargs)
        seen[self.state.epoch] = self.evaluate(self.net, self.batches(task["test"], self.cfg.train.batch_size))
        if self.state.epoch == forced:
            self.state.history[-1]["val_loss"] = -1.0  # lower than any cross-entropy
        return val

    monkeypatch.setattr(recipe, "_load_data", load_data)
    monkeypatch.setattr(Run, "train_epoch", train_epoch)
    r = run(base, tmp_path, f"adapt.method={method}", "adapt.head_epochs=2", "adapt.insertions=1",
            "adapt.epochs_per_insertion=2", "adapt.final_epochs=1").results
    best = r["best_val"]
    assert r["epochs"] == len(seen) == 5 and best["epoch"] == forced and best["val_loss"] == -1.0
    assert best["phase"] == r["history"][forced - 1]["phase"]
    assert best["trainable_params"] == r["history"][forced - 1]["trainable_params"]
    assert (best["test_error"], best["test_loss"]) == (seen[forced]["error"], seen[forced]["loss"])
    if forced == 5:
        assert (best["test_error"], best["test_loss"]) == (r["test_error"], r["test_loss"])
    else:  # the case the copy matters: training went on after the best epoch
        assert best["test_loss"] != r["test_loss"]


# ---------------------------------------------------------------------------------------------------- errors
def test_unknown_config_key_and_missing_model(base, tmp_path, capsys):
    assert_cli_error(capsys, ["adapt", "--config", "adapt_digits_vit", "adapt.budget=3"], r"Unknown config key.*adapt\.budget")
    assert_cli_error(capsys, ["adapt", "adapt.method=magic"], "adapt.method must be one of")
    assert_cli_error(capsys, ["adapt", "--config", "adapt_digits_vit", f"output_dir={tmp_path}"], "needs model.name_or_path")
    assert_cli_error(capsys, ["adapt", "adapt.method=linear_probe", "adapt.lora=true"], "lora=true does not apply")


def test_image_size_that_cannot_be_used(base, tmp_path, capsys):
    with pytest.raises(ImageSizeError, match="data.image_size=16 but the backbone takes 12x12"):
        run(base, tmp_path, "data.image_size=16")
    assert_cli_error(capsys, ["adapt", "--config", "adapt_digits_vit", *overrides(base, tmp_path, "data.name=regression")], "not an image classification task")
    norm = ImageNormalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    gray = torch.rand(2, 1, 8, 8)
    rgb = prepare_images(gray, 8, 3, norm)
    assert rgb.shape == (2, 3, 8, 8) and torch.allclose(rgb[:, 1], (gray[:, 0] - 0.5) / 0.25)
    assert prepare_images(gray, 12, 3, norm).shape == (2, 3, 12, 12)
    with pytest.raises(ImageSizeError, match="cannot convert 2-channel"):
        prepare_images(torch.rand(2, 2, 8, 8), 8, 3, norm)
    with pytest.raises(ImageSizeError, match="are not images"):
        prepare_images(torch.rand(2, 64), 8, 3, norm)


def test_empty_dataset(base, tmp_path, monkeypatch):
    from topotransfer import preprocess
    from topotransfer.data import load_task

    def no_val(*args, **kwargs):
        task = load_task(*args, **kwargs)
        x, y = task.val.tensors
        return dataclasses.replace(task, val=TensorDataset(x[:0], y[:0]))

    monkeypatch.setattr(preprocess, "load_task", no_val)
    with pytest.raises(EmptyDatasetError, match="empty val split"):
        run(base, tmp_path, "adapt.head_epochs=0")
    monkeypatch.undo()
    (tmp_path / "images" / "cat").mkdir(parents=True)  # an image folder without images
    with pytest.raises(ValueError, match="empty"):
        run(base, tmp_path, f"data.name=imagefolder:{tmp_path / 'images'}")


def test_label_count_mismatch_with_existing_adapter(base, tmp_path):
    three = load_backbone(base)  # the base's own 3-label head
    save_adapter(three, base, None, [], tmp_path / "three", include_head=True)
    with pytest.raises(LabelCountMismatchError, match="head for 3 classes but task 'digits' has 10"):
        run(base, tmp_path / "out", f"adapt.adapter_path={tmp_path / 'three'}")


def test_base_model_that_does_not_match_the_adapter(base, tmp_path):
    first = run(base, tmp_path / "first", "adapt.head_epochs=0", "adapt.insertions=1", "adapt.epochs_per_insertion=1",
                "train.max_steps=1", "adapt.save_merged=false")
    assert first.results["insertions"] == 1
    deeper = save_vit(tmp_path / "deeper", layers=3)
    with pytest.raises(AdapterMismatchError, match="num_blocks: adapter 2 vs model 3"):
        run(deeper, tmp_path / "second", f"adapt.adapter_path={tmp_path / 'first' / 'adapter'}")
    # the right base continues from the adapter: its insertions are kept and a new one is added
    again = run(base, tmp_path / "third", f"adapt.adapter_path={tmp_path / 'first' / 'adapter'}", "adapt.head_epochs=0",
                "adapt.insertions=1", "adapt.epochs_per_insertion=1", "train.max_steps=1")
    assert again.results["insertions"] == 2
    assert again.insertions[0] == first.insertions[0]


def test_topo_stops_when_no_site_lowers_the_loss(base, tmp_path, monkeypatch):
    from topotransfer.recipes import adapt

    real = adapt.probe_site_results

    def negative(*args, **kwargs):
        results = real(*args, **kwargs)
        for r in results:
            r.score = -abs(r.score)
        return results

    monkeypatch.setattr(adapt, "probe_site_results", negative)
    result = run(base, tmp_path, "adapt.head_epochs=1", "adapt.insertions=2", "adapt.epochs_per_insertion=1",
                 "adapt.final_epochs=1")
    r = result.results
    assert r["insertions"] == 0 and r["events"][0]["stopped"] == "score<=0" and len(r["events"]) == 1
    assert [h["phase"] for h in r["history"]] == ["head", "final", "final", "final"]  # same epoch budget
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 0  # head only


# The held-out losses of the line search in the failing run of docs/results/transfer (10 labels per class,
# seed 1, 2nd insertion at vit.layers.0, old grid up to 10): the loss dips at eps = 0.01, climbs to ~550,
# and comes down again at eps = 10 -- below the baseline on the 100 validation examples. The old rule took
# eps = 10 (initial layer norm 36) and the run ended at 89 % test error.
FAILED_SEED_CURVE = [(0.0, 284.607), (0.001, 284.606), (0.0022, 284.6), (0.0046, 284.573), (0.01, 284.496),
                     (0.0215, 285.176), (0.0464, 293.243), (0.1, 367.252), (0.2154, 508.065), (0.4642, 540.551),
                     (1.0, 510.623), (2.1544, 330.775), (4.6416, 249.219), (10.0, 242.375)]


def test_first_local_minimum_epsilon():
    from topotransfer.recipes.adapt import first_local_minimum_epsilon

    assert first_local_minimum_epsilon(FAILED_SEED_CURVE) == 0.01
    assert first_local_minimum_epsilon(list(reversed(FAILED_SEED_CURVE))) == 0.01  # order-free
    assert first_local_minimum_epsilon([(0.0, 5.0), (0.1, 4.0), (1.0, 3.0)]) == 1.0  # monotone: the last
    assert first_local_minimum_epsilon([(0.0, 5.0), (0.1, 6.0), (1.0, 1.0)]) == 0.0  # rises at once: none
    assert first_local_minimum_epsilon([(0.0, 5.0), (0.1, 4.0), (0.2, 4.0), (1.0, 3.0)]) == 1.0  # flat: go on
    assert first_local_minimum_epsilon([(0.0, 5.0), (0.1, 4.0), (1.0, float("nan"))]) == 0.1
    with pytest.raises(ValueError, match="eps = 0"):
        first_local_minimum_epsilon([(0.1, 4.0)])


def test_insertion_keeps_the_first_local_minimum_of_a_non_monotone_line_search(base, tmp_path, monkeypatch):
    """A far second basin of the held-out loss must not set the new layer's scale (the 10-label failure)."""
    from topotransfer.insertion import LineSearchResult
    from topotransfer.recipes import adapt

    real = adapt.line_search_epsilon
    grid = [e for e, _ in FAILED_SEED_CURVE[1:]]

    def non_monotone(*args, **kwargs):
        ls = real(*args, **kwargs)
        assert kwargs["stop_at_rise"] and [e for e, _ in ls.tried[1:]] == grid[: len(ls.tried) - 1]
        base_loss = ls.baseline_loss
        tried = [(e, base_loss + v - FAILED_SEED_CURVE[0][1]) for e, v in FAILED_SEED_CURVE]
        return LineSearchResult(10.0, tried[-1][1], base_loss, tried, ls.downstream)  # global minimum: eps = 10

    monkeypatch.setattr(adapt, "line_search_epsilon", non_monotone)
    result = run(base, tmp_path, "adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1",
                 f"adapt.epsilons=[{', '.join(map(str, grid))}]", "train.max_steps=2", "adapt.save_merged=false")
    event = result.results["events"][0]
    assert event["epsilon"] == 0.01 and event["eps_global_min"] == 10.0 and not event["eps_fallback"]
    assert event["loss_after"] < event["loss_before"]
    layer = [layer for _, layer in get_family(result.model).inserted(result.model)][0]
    theta = torch.cat([layer.weight.detach().reshape(layer.weight.shape[0], -1), layer.bias.detach()[:, None]], dim=1)
    direction_norm = event["init_norm"] / event["epsilon"]
    assert float(theta.norm()) < direction_norm  # ~0.01 x the direction after 2 small steps (eps = 10: 10 x)


def test_progress_lines_refused_rerun_and_phase_times(base, tmp_path, capsys):
    """One line per insertion, an epoch bar with loss and validation error, the final summary in %, wall time
    per phase in results.json; a second run into the directory is refused and leaves its files byte-identical."""
    from topotransfer.errors import NoCheckpointError, RunExistsError

    out = tmp_path / "run"
    res = run(base, out, "progress=true", "adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1",
              "adapt.final_epochs=1", "adapt.save_merged=false").results
    err = capsys.readouterr().err
    ev = res["events"][0]
    line = re.search(r"event 1 @ epoch 1: (\S+) \| quadratic ((?:\S+=\S+ ?)+) \| eps (\S+) \| held-out loss (\S+) -> (\S+) "
                     r"\| depth (\d+), ([\d,]+) params", err)
    assert line, err[-3000:]
    assert line.group(1) == ev["site"] and [s.split("=")[0] for s in line.group(2).split()] == list(ev["scores"])
    assert float(line.group(3)) == pytest.approx(ev["epsilon"], rel=1e-2)
    assert (int(line.group(6)), int(line.group(7).replace(",", ""))) == (res["depth"], res["params"]) == (3, res["params"])
    assert re.search(r"adapt\[topo\].*loss \S+, val \d+\.\d\d %", err), "the epoch bar shows no loss / validation error"
    summary = re.search(r"final model \(epoch 3, ([\d,]+) trained\): val (\S+) %, test (\S+) % \| depth 3, ([\d,]+) params", err)
    assert summary, err[-3000:]
    assert float(summary.group(2)) == pytest.approx(100 * res["val_error"], abs=0.01)
    assert float(summary.group(3)) == pytest.approx(100 * res["test_error"], abs=0.01)
    assert int(summary.group(1).replace(",", "")) == res["trainable_params"]
    times = json.loads((out / "results.json").read_text())["phase_times"]
    assert set(times) == {"head_warmup", "training", "evaluation", "saving", "derivative", "line_search"}
    assert all(t > 0 for t in times.values()) and sum(times.values()) <= res["wall_time"]
    cpu = json.loads((out / "results.json").read_text())["phase_cpu_times"]  # CPU seconds of the same phases
    assert set(cpu) == set(times) and all(t > 0 for t in cpu.values())

    finished = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(RunExistsError, match=r"--resume.*--overwrite"):
        run(base, out, "adapt.method=linear_probe")
    assert {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == finished
    with pytest.raises(NoCheckpointError, match="nothing to resume"):
        run_adapt(load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml", overrides(base, tmp_path / "empty")), resume=True)
    assert list((tmp_path / "empty").iterdir()) == []
