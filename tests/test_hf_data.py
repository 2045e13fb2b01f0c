"""``hf:`` datasets as users have them: csv / json / parquet / imagefolder sources, text and images, sentence
pairs, column detection and its errors, lazy per-batch transforms, seeded augmentation, bad examples, and a
local CSV adapted end to end (a tiny BERT from a config; the packaged MiniLM when it is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")
from test_text_data import write_vocab  # noqa: E402

from topotransfer import hf_data  # noqa: E402
from topotransfer.data import load_task  # noqa: E402
from topotransfer.errors import BadExampleError, DatasetColumnError, ModalityMismatchError  # noqa: E402
from topotransfer.hf_data import LazySplit, augment_image, example_generator  # noqa: E402
from topotransfer.models.hf import ImageNormalization  # noqa: E402
from topotransfer.preprocess import AugmentedImages, prepare_task, prepare_text_task  # noqa: E402
from topotransfer.training.loop import make_loader  # noqa: E402

SENTENCES = [f"the {n} was {a}" for n in ("soup", "film", "staff", "plot", "screen") for a in ("good", "bad", "great",
                                                                                              "awful")]


def label_of(sentence: str) -> str:
    return "positive" if sentence.split()[-1] in ("good", "great") else "negative"


def write_csv(path: Path, sentences=SENTENCES, extra_column: bool = False) -> Path:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", *(["id"] if extra_column else [])])
        for i, s in enumerate(sentences):
            writer.writerow([s, label_of(s), *([i] if extra_column else [])])
    return path


def items(split) -> list:
    """Every item of a split (one batch read)."""
    return split.__getitems__(list(range(len(split)))) if len(split) else []


def make_images(root: Path, per_class: int = 10, size: int = 8, mode: str = "RGB") -> dict[str, int]:
    """Class folders of random PNGs; returns {file name: class index}."""
    from PIL import Image

    rng = np.random.default_rng(0)
    labels = {}
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / cls / f"{i}.png")
            labels[f"{cls}/{i}.png"] = label
    return labels


# ---------------------------------------------------------------------------------------------- text sources
def test_csv_text_is_lazy_complete_and_seeded(tmp_path):
    path = write_csv(tmp_path / "reviews.csv")
    task = load_task("hf:csv", data_files=str(path), cache_dir=tmp_path / "cache")
    assert task.modality == "text" and task.input_shape == () and task.class_names == ["negative", "positive"]
    assert all(isinstance(getattr(task, s), LazySplit) for s in ("train", "val", "test"))
    assert (len(task.train), len(task.val), len(task.test)) == (14, 2, 4)  # 20 -> 4 test, round(1.6) val
    seen = [(text, int(y)) for s in ("train", "val", "test") for text, y in items(getattr(task, s))]
    assert sorted(t for t, _ in seen) == sorted(SENTENCES)  # every sentence exactly once
    assert all(task.class_names[y] == label_of(t) for t, y in seen)
    again = load_task("hf:csv", data_files=str(path), cache_dir=tmp_path / "cache")
    other = load_task("hf:csv", data_files=str(path), cache_dir=tmp_path / "cache", seed=1)
    assert torch.equal(again.test.rows, task.test.rows) and not torch.equal(other.test.rows, task.test.rows)
    batch_texts, batch_labels = next(iter(make_loader(task.train, 4)))  # strings collate into a list
    assert len(batch_texts) == 4 and batch_labels.dtype == torch.int64


def test_json_sentence_pairs_and_column_errors(tmp_path):
    rows = [{"premise": f"a {i}", "hypothesis": f"b {i}", "label": i % 3} for i in range(30)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    kw = {"data_files": str(tmp_path / "pairs.jsonl"), "cache_dir": tmp_path / "cache"}
    with pytest.raises(DatasetColumnError, match="several input column candidates") as err:
        load_task("hf:json", **kw)
    assert "premise" in str(err.value) and "hypothesis" in str(err.value) and "\n" not in str(err.value)
    task = load_task("hf:json", text_column="premise", text_pair_column="hypothesis", **kw)
    assert task.num_outputs == 3 and task.class_names == ["0", "1", "2"]
    for (first, second), y in items(task.train):
        i = int(first.split()[1])
        assert second == f"b {i}" and int(y) == i % 3
    with pytest.raises(DatasetColumnError, match="text_pair_column needs data.text_column"):
        load_task("hf:json", text_pair_column="hypothesis", **kw)
    with pytest.raises(DatasetColumnError, match="'nope' is not a column; the columns are: premise"):
        load_task("hf:json", text_column="premise", label_column="nope", **kw)


def test_parquet_given_splits_and_label_detection(tmp_path):
    pd = pytest.importorskip("pandas")
    train = pd.DataFrame({"review": SENTENCES, "sentiment": [label_of(s) for s in SENTENCES],
                          "stars": list(range(len(SENTENCES)))})
    train.to_parquet(tmp_path / "train.parquet")
    train.iloc[:6].to_parquet(tmp_path / "test.parquet")
    files = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    kw = {"data_files": files, "cache_dir": tmp_path / "cache"}
    with pytest.raises(DatasetColumnError, match="no column named label / labels") as err:
        load_task("hf:parquet", **kw)
    assert "review (Value), sentiment (Value), stars (Value)" in str(err.value)
    task = load_task("hf:parquet", label_column="sentiment", **kw)  # the one other string column is the text
    assert task.source["columns"] == {"inputs": ["review"], "label": "sentiment"}
    assert len(task.test) == 6 and len(task.train) + len(task.val) == len(SENTENCES)  # the given test split as is
    with pytest.raises(ValueError, match="apply to 'hf:' / 'imagefolder:' datasets only"):
        load_task("digits", label_column="sentiment")


def test_unlabelled_test_split_is_dropped_and_carved(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"s {i},{i % 2}\n" for i in range(20)))
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(f"t {i},-1\n" for i in range(5)))
    task = load_task("hf:csv", data_files={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")},
                     cache_dir=tmp_path / "cache")
    assert task.source["unlabelled_splits_dropped"] == ["test"]
    assert len(task.test) == 4 and all(t.startswith("s ") for t, _ in items(task.test))


# -------------------------------------------------------------------------------------------- image sources
def test_imagefolder_hf_and_alias_read_the_same_pixels(tmp_path):
    from PIL import Image

    labels = make_images(tmp_path / "imgs")
    task = load_task("hf:imagefolder", data_dir=str(tmp_path / "imgs"), cache_dir=tmp_path / "cache")
    alias = load_task(f"imagefolder:{tmp_path / 'imgs'}", cache_dir=tmp_path / "cache")
    assert task.input_shape == (3, 8, 8) and task.class_names == ["cat", "dog"] and task.modality == "tensor"
    expected = {}
    for name, label in labels.items():
        pixels = np.asarray(Image.open(tmp_path / "imgs" / name), dtype=np.float32).transpose(2, 0, 1) / 255
        expected[torch.from_numpy(pixels).numpy().tobytes()] = label
    seen = {x.numpy().tobytes(): int(y) for s in ("train", "val", "test") for x, y in items(getattr(task, s))}
    assert seen == expected
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(alias, s).rows, getattr(task, s).rows)
    resized = load_task("hf:imagefolder", data_dir=str(tmp_path / "imgs"), cache_dir=tmp_path / "cache", image_size=4)
    assert items(resized.train)[0][0].shape == (3, 4, 4)


def test_splits_are_lazy_one_batch_decoded_at_a_time(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", per_class=20)
    task = load_task("hf:imagefolder", data_dir=str(tmp_path / "imgs"), cache_dir=tmp_path / "cache")
    assert isinstance(task.train, LazySplit) and not hasattr(task.train, "tensors")
    assert type(task.train.source.data).__name__ == "MemoryMappedTable"  # Arrow on disk, not in memory
    assert task.train.source.features["image"].decode is False  # paths only, decoded by the transform
    decoded = []
    real = hf_data.decode_image
    monkeypatch.setattr(hf_data, "decode_image", lambda value, where: decoded.append(where) or real(value, where))
    loader = make_loader(task.train, 4, shuffle=True, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 8, 8) and len(decoded) == 4  # only the batch's images were read


def test_corrupt_image_is_named_in_one_line_or_skipped(tmp_path):
    make_images(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "dog" / "broken.png"
    bad.write_bytes((tmp_path / "imgs" / "dog" / "0.png").read_bytes()[:70])  # a truncated PNG
    with pytest.raises(BadExampleError) as err:
        load_task(f"imagefolder:{tmp_path / 'imgs'}", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert str(bad) in message and "\n" not in message and "skip_bad_examples" in message
    task = load_task(f"imagefolder:{tmp_path / 'imgs'}", cache_dir=tmp_path / "cache", skip_bad_examples=True)
    assert sum(task.source["skipped"].values()) == 1
    assert len(task.train) + len(task.val) + len(task.test) == 20


def test_only_the_rows_used_are_decoded(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", per_class=20)
    checked = []
    real = hf_data._ImageCheck.__init__

    def spy(self, source, column, split, rows):
        checked.extend(rows)
        real(self, source, column, split, rows)

    monkeypatch.setattr(hf_data._ImageCheck, "__init__", spy)
    task = load_task(f"imagefolder:{tmp_path / 'imgs'}", cache_dir=tmp_path / "cache", num_train=6, num_val=2,
                     num_test=4)
    used = sorted(torch.cat([task.train.rows, task.val.rows, task.test.rows]).tolist())
    assert sorted(checked) == used and len(used) == 12  # not the 40 rows of the folder


def test_missing_text_is_named(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"s {i},{i % 2}\n" for i in range(9)) + ",1\n")
    with pytest.raises(BadExampleError, match="train example 9 has no value in column 'text'"):
        load_task("hf:csv", data_files=str(tmp_path / "t.csv"), cache_dir=tmp_path / "cache")


# -------------------------------------------------------------------------------------------- augmentation
def test_augmentation_is_seeded_per_example(tmp_path):
    make_images(tmp_path / "imgs", per_class=10, size=12)
    task = load_task("hf:imagefolder", data_dir=str(tmp_path / "imgs"), cache_dir=tmp_path / "cache")
    norm = ImageNormalization((0.5,) * 3, (0.25,) * 3)
    plain = prepare_task(task, 10, 3, norm)
    aug = prepare_task(task, 10, 3, norm, augment="crop_flip")

    def epoch(split, seed, batch_size=4, workers=0):
        split = split.with_transform(split.transform)
        split.num_workers = workers
        xs = [x for x, _ in make_loader(split, batch_size, shuffle=True, seed=seed)]
        return torch.cat(xs)

    first = epoch(aug.train, 5)
    assert torch.equal(first, epoch(aug.train, 5, batch_size=3))  # per example: batching does not matter
    assert torch.equal(first, epoch(aug.train, 5, workers=2))  # nor do worker processes
    assert not torch.equal(first, epoch(aug.train, 6))  # another epoch seed, other crops
    assert not torch.equal(first, epoch(plain.train, 5))
    # evaluation (unshuffled) loaders and the val / test splits are never augmented
    unshuffled = torch.cat([x for x, _ in make_loader(aug.train, 4)])
    assert torch.equal(unshuffled, torch.cat([x for x, _ in make_loader(plain.train, 4)]))
    assert aug.val.transform.augment == "none" and aug.test.transform.augment == "none"


def test_augment_image_modes():
    x = torch.rand(3, 6, 8)
    assert torch.equal(augment_image(x, "none", example_generator(0, 0)), x)
    flips = {bool(torch.equal(augment_image(x, "flip", example_generator(s, 0)), x.flip(-1))) for s in range(20)}
    assert flips == {True, False}
    for seed in range(10):
        out = augment_image(x, "crop_flip", example_generator(seed, 3))
        assert out.shape == x.shape and torch.equal(out, augment_image(x, "crop_flip", example_generator(seed, 3)))
    with pytest.raises(ValueError, match="data.augment"):
        augment_image(x, "rotate", example_generator(0, 0))


def test_in_memory_tasks_augment_and_stay_exact_without():
    task = load_task("digits", num_train=40, num_val=10, num_test=10)
    norm = ImageNormalization((0.5,), (0.5,))
    plain = prepare_task(task, 8, 1, norm)
    assert type(plain.train).__name__ == "TensorDataset"  # augment=none: the in-memory path as before
    aug = prepare_task(task, 8, 1, norm, augment="flip")
    assert isinstance(aug.train, AugmentedImages) and type(aug.val).__name__ == "TensorDataset"
    a = torch.cat([x for x, _ in make_loader(aug.train, 8, shuffle=True, seed=3)])
    b = torch.cat([x for x, _ in make_loader(aug.train, 5, shuffle=True, seed=3)])
    assert torch.equal(a, b)
    order = torch.cat([i for (i,) in make_loader(torch.utils.data.TensorDataset(torch.arange(40)), 8, True, 3)])
    originals = plain.train.tensors[0][order]
    flipped = [bool(torch.equal(a[i], originals[i].flip(-1))) and not torch.equal(a[i], originals[i]) for i in range(40)]
    assert 5 < sum(flipped) < 35 and all(torch.equal(a[i], originals[i]) for i in range(40) if not flipped[i])


# ---------------------------------------------------------------------------------------------- tokenising
def test_text_pairs_tokenised_per_batch(tmp_path):
    from transformers import BertTokenizer

    rows = [{"q": " ".join(["the soup"] * (1 + i % 4)), "a": "was good", "label": i % 2} for i in range(20)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task("hf:json", data_files=str(tmp_path / "qa.jsonl"), text_column="q", text_pair_column="a",
                     cache_dir=tmp_path / "cache")
    tokenizer = BertTokenizer(write_vocab(tmp_path / "vocab.txt"))
    prepared = prepare_text_task(task, tokenizer, max_length=12)
    assert isinstance(prepared.train, LazySplit)
    for inputs, _ in make_loader(prepared.train, 4):
        ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
        assert ids.shape[1] == int(mask.sum(1).max()) <= 12  # padded to the batch's longest only
        assert bool((types[:, 0] == 0).all()) and bool((types.amax(1) == 1).all())  # two segments
    image_task = load_task("digits", num_train=20, num_val=5, num_test=5)
    with pytest.raises(ModalityMismatchError):
        prepare_text_task(image_task, tokenizer, 12)


# ------------------------------------------------------------------------------------------ adapt end to end
def _adapt_csv(base: str, tmp_path: Path, *extra: str):
    from topotransfer.cli import BUILTIN_CONFIGS
    from topotransfer.config import load_config
    from topotransfer.recipes.adapt import run_adapt

    csv = write_csv(tmp_path / "reviews.csv", SENTENCES * 3)
    cfg = load_config(BUILTIN_CONFIGS / "adapt_sentiment_minilm.yaml", [
        f"model.name_or_path={base}", f"output_dir={tmp_path / 'run'}", "data.name=hf:csv",
        f"data.data_files={csv}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_train=null", "data.num_val=null",
        "data.num_test=null", "probe.batch_size=16", "probe.batches=1", "train.batch_size=8", "progress=false",
        "adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1", "train.max_steps=6",
        "adapt.budget_lora_rank=null", "adapt.budget_min_rank=1", *extra,  # one full layer on the tiny BERT
    ])
    return run_adapt(cfg)


def test_local_csv_adapts_a_tiny_bert(tmp_path):
    pytest.importorskip("peft")
    from test_adapt_text import save_bert

    from topotransfer.adapter import load_adapter

    base = save_bert(tmp_path / "bert")
    run = _adapt_csv(base, tmp_path)
    r = run.results
    assert r["task"] == "hf:csv" and r["num_labels"] == 2 and r["test_error"] is not None
    assert r["tokenizer"]["padded_length"] == "per batch" and r["data_source"]["columns"]["inputs"] == ["text"]
    assert r["insertions"] == 1
    reloaded = load_adapter(base, tmp_path / "run" / "adapter")
    tokens = prepare_text_task(load_task("hf:csv", data_files=str(tmp_path / "reviews.csv"),
                                         cache_dir=tmp_path / "cache"), reloaded_tokenizer(base), 64)
    inputs, _ = next(iter(make_loader(tokens.test, 8)))
    with torch.no_grad():
        assert torch.equal(run.model(**inputs).logits, reloaded.eval()(**inputs).logits)


def reloaded_tokenizer(base: str):
    from topotransfer.models.hf import load_tokenizer

    return load_tokenizer(base)


def test_local_csv_adapts_the_packaged_minilm(tmp_path):
    pytest.importorskip("peft")
    from topotransfer.models.hf import packaged_model_dir

    try:
        base = str(packaged_model_dir())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    r = _adapt_csv(base, tmp_path, "probe.rule=cluster", "data.max_length=16").results  # d = 384: keep it cheap
    assert r["num_labels"] == 2 and r["test_error"] is not None and r["insertions"] == 1


def test_image_backbone_refuses_a_text_csv(tmp_path):
    from test_adapt import save_vit

    base = save_vit(tmp_path / "vit")
    with pytest.raises(ModalityMismatchError, match="holds text"):
        _adapt_csv(base, tmp_path, "data.max_length=null")
