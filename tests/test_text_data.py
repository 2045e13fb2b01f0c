"""The generated sentiment task: deterministic, balanced, disjoint splits, no single-keyword shortcut,
held-out vocabulary in test; and its tokenisation into padded batches with an attention mask."""

from __future__ import annotations

import re

import pytest
import torch

from topotransfer.data import AVAILABLE_TASKS, load_task
from topotransfer.errors import ModalityMismatchError
from topotransfer.text_data import _TEST_WORDS, _TRAIN_WORDS, SENTIMENT_CLASSES, TextDataset, make_sentiment


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_sentiment_is_deterministic_balanced_and_disjoint():
    task = load_task("sentiment", num_train=101, num_val=40, num_test=60, seed=3)
    again = load_task("sentiment", num_train=101, num_val=40, num_test=60, seed=3)
    other = load_task("sentiment", num_train=101, num_val=40, num_test=60, seed=4)
    assert task.modality == "text" and task.kind == "classification" and task.input_shape == ()
    assert task.num_outputs == 2 and task.class_names == list(SENTIMENT_CLASSES)
    assert "sentiment" in AVAILABLE_TASKS
    for split in ("train", "val", "test"):
        data = getattr(task, split)
        assert isinstance(data, TextDataset)
        assert data.texts == getattr(again, split).texts and torch.equal(data.labels, getattr(again, split).labels)
        assert data.texts != getattr(other, split).texts
        counts = data.labels.bincount(minlength=2)
        assert abs(int(counts[0]) - int(counts[1])) <= 1  # balanced
        assert len(set(data.texts)) == len(data)  # no duplicate sentence
    assert not set(task.train.texts) & set(task.val.texts)
    text, label = task.train[0]
    assert isinstance(text, str) and text.endswith(".") and label.dtype == torch.int64
    # the test split does not depend on the train / val sizes
    small = load_task("sentiment", num_train=5, num_val=3, num_test=60, seed=3)
    assert small.test.texts == task.test.texts


def test_no_single_word_decides_the_label():
    train, _, _ = make_sentiment(2000, 0, 0, seed=0)
    by_label = [set(), set()]
    for text, label in zip(train.texts, train.labels.tolist(), strict=True):
        by_label[label] |= _words(text)
    # every adjective and the negation words occur in sentences of both classes
    for word in (*_TRAIN_WORDS.positive, *_TRAIN_WORDS.negative, "not", "never", "but", "although"):
        assert word in by_label[0] and word in by_label[1], word
    contrast = [t for t in train.texts if " but " in t or "although" in t.lower() or "even though" in t]
    assert len(contrast) > 300  # a large share mixes a positive and a negative clause


def test_test_split_holds_out_vocabulary_and_phrasing():
    train, val, test = make_sentiment(1000, 200, 500, seed=1)
    seen = set().union(*(_words(t) for t in train.texts + val.texts))
    held_out = {*_TEST_WORDS.positive, *_TEST_WORDS.negative, *(n.split()[-1] for n in _TEST_WORDS.nouns)}
    held_out |= {v for pair in _TEST_WORDS.loved + _TEST_WORDS.hated for v in pair}
    assert not held_out & seen
    assert all(_words(t) & held_out for t in test.texts)  # every test sentence has unseen content words
    test_words = set().union(*(_words(t) for t in test.texts))
    assert {"however", "yet", "nobody", "far"} <= test_words and not {"however", "yet", "nobody", "far"} & seen
    assert not set(test.texts) & set(train.texts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size does not apply to the text task"):
        load_task("sentiment", image_size=8)
    with pytest.raises(ValueError, match="num_train"):
        load_task("sentiment", num_train=0)
    with pytest.raises(ValueError, match="3 texts but 2 labels"):
        TextDataset(["a", "b", "c"], torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------- tokenisation
transformers = pytest.importorskip("transformers")


def write_vocab(path, extra_texts=()) -> str:
    """A WordPiece vocabulary covering every word of the sentiment task (no download)."""
    _, _, test = make_sentiment(0, 0, 0)
    words = set()
    for words_of in (_TRAIN_WORDS, _TEST_WORDS):
        for field in ("nouns", "positive", "negative", "intensifiers"):
            for phrase in getattr(words_of, field):
                words |= set(re.findall(r"\w+|[^\w\s]", phrase.lower()))
        for past, base in words_of.loved + words_of.hated:
            words |= set((past + " " + base).split())
    train, val, test = make_sentiment(400, 0, 400, seed=0)
    for text in [*train.texts, *test.texts, *extra_texts]:
        words |= set(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    path.write_text("\n".join(vocab) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    return BertTokenizer(write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt"))


def test_prepare_text_task_pads_masks_and_truncates(tokenizer):
    from topotransfer.preprocess import TextInputs, prepare_text_task, text_max_length
    from topotransfer.training.loop import make_loader

    task = load_task("sentiment", num_train=20, num_val=6, num_test=6, seed=0)
    prepared = prepare_text_task(task, tokenizer, max_length=64)
    enc = prepared.train.encoding
    lengths = enc["attention_mask"].sum(1)
    assert enc["input_ids"].shape == (20, int(lengths.max())) and prepared.input_shape == (int(lengths.max()),)
    assert (enc["input_ids"][enc["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    assert (enc["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert (enc["input_ids"] != tokenizer.unk_token_id).all()  # the test vocabulary covers the task
    x, y = next(iter(make_loader(prepared.train, 8)))
    assert isinstance(x, TextInputs) and x["input_ids"].shape == (8, enc["input_ids"].shape[1])
    assert torch.equal(y, task.train.labels[:8])
    moved = x.to("cpu", non_blocking=False)  # the signature accelerate's send_to_device uses
    assert isinstance(moved, TextInputs) and set(moved) == set(x)
    short = prepare_text_task(task, tokenizer, max_length=6)
    assert short.train.encoding["input_ids"].shape[1] == 6
    assert (short.train.encoding["input_ids"][:, -1] == tokenizer.sep_token_id).all()

    config = transformers.BertConfig(max_position_embeddings=40)
    assert text_max_length(tokenizer, config) == 40  # a tokenizer without a limit: the position embeddings
    assert text_max_length(tokenizer, config, 12) == 12
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        text_max_length(tokenizer, config, 1)
    image_task = load_task("regression", num_train=4, num_val=2, num_test=2)
    with pytest.raises(ModalityMismatchError, match="not a text classification task"):
        prepare_text_task(image_task, tokenizer, 16)
