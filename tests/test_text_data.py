"""The generated text tasks (sentiment, intent): deterministic, balanced, disjoint splits, no single-keyword
shortcut, held-out vocabulary and phrasing in test; the intent task written as CSV files and read back through
the hf:csv loader; and the tokenisation into padded batches with an attention mask."""

from __future__ import annotations

import re

import pytest
import torch

from topotransfer.data import AVAILABLE_TASKS, load_task
from topotransfer.errors import ModalityMismatchError
from topotransfer.text_data import (
    _INTENT_TEST,
    _INTENT_TRAIN,
    _TEST_WORDS,
    _TRAIN_WORDS,
    INTENT_CLASSES,
    SENTIMENT_CLASSES,
    TextDataset,
    make_intent,
    make_sentiment,
    make_text_task,
    write_text_task_csv,
)


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


def _content_words(words) -> set[str]:
    """Words of an intent split's items, times and request verb phrases, without the placeholders and the
    function words both splits share."""
    shared = {"a", "the", "my", "of", "to", "for", "on", "is", "there", "from", "i", "you", "me", "n", "t"}
    phrases = [*words.items, *words.times, *(vp for vps in words.requests for vp in vps), *words.wrappers,
               *words.questions, *words.retractions]
    return set().union(*(_words(re.sub(r"\{\w+\}", " ", x)) for x in phrases)) - shared


def test_intent_is_deterministic_balanced_and_disjoint():
    task = load_task("intent", num_train=103, num_val=41, num_test=62, seed=3)
    again = load_task("intent", num_train=103, num_val=41, num_test=62, seed=3)
    other = load_task("intent", num_train=103, num_val=41, num_test=62, seed=4)
    assert task.modality == "text" and task.num_outputs == 4 and task.class_names == list(INTENT_CLASSES)
    assert "intent" in AVAILABLE_TASKS
    for split in ("train", "val", "test"):
        data = getattr(task, split)
        assert data.texts == getattr(again, split).texts and torch.equal(data.labels, getattr(again, split).labels)
        assert data.texts != getattr(other, split).texts
        counts = data.labels.bincount(minlength=4)
        assert int(counts.max() - counts.min()) <= 1  # balanced over the four classes
        assert len(set(data.texts)) == len(data)
        assert all(t[0].isupper() and t[-1] in ".?" for t in data.texts)
    assert not set(task.train.texts) & set(task.val.texts)
    assert load_task("intent", num_train=5, num_val=3, num_test=62, seed=3).test.texts == task.test.texts
    # the two generated tasks are different tasks
    assert not set(task.train.texts) & set(make_sentiment(103, 41, 62, seed=3)[0].texts)


def test_intent_test_split_holds_out_phrasing_and_no_verb_decides():
    train, val, test = make_intent(2000, 300, 800, seed=1)
    train_vocab, test_vocab = _content_words(_INTENT_TRAIN), _content_words(_INTENT_TEST)
    assert not train_vocab & test_vocab  # items, times, verbs, wrappers and connectives of the splits are disjoint
    seen = set().union(*(_words(t) for t in train.texts + val.texts))
    assert not test_vocab & seen and not set(test.texts) & set(train.texts)
    assert all(_words(t) & test_vocab for t in test.texts) and all(_words(t) & train_vocab for t in train.texts)
    # every request verb of the training phrasing occurs in sentences of every class: the main clause decides
    by_label = [set() for _ in INTENT_CLASSES]
    for text, label in zip(train.texts, train.labels.tolist(), strict=True):
        by_label[label] |= _words(text)
    for verb in ("book", "reserve", "cancel", "delete", "move", "change", "ask", "check"):
        assert all(verb in words for words in by_label), verb
    retracted = [t for t in train.texts if "going to" in t or "do not want" in t]
    assert len(retracted) > 800  # about half the sentences give up a request of another class first
    assert make_text_task("intent", 20, 5, 10, seed=2)[2].texts == make_intent(20, 5, 10, seed=2)[2].texts
    with pytest.raises(ValueError, match="unknown generated text task"):
        make_text_task("topics")


def test_intent_csv_files_load_through_the_hf_csv_loader(tmp_path):
    pytest.importorskip("datasets")
    files = write_text_task_csv("intent", tmp_path / "intent", 40, 12, 20, seed=5)
    assert sorted(files) == ["test", "train", "validation"]
    task = load_task("hf:csv", data_files=files, cache_dir=tmp_path / "cache", seed=5)
    expected = make_intent(40, 12, 20, seed=5)
    assert task.modality == "text" and sorted(task.class_names) == sorted(INTENT_CLASSES)
    for split, data in zip((task.train, task.val, task.test), expected, strict=True):
        got = split.__getitems__(list(range(len(split))))
        want = [(t, INTENT_CLASSES[int(y)]) for t, y in zip(data.texts, data.labels, strict=True)]
        # the given splits as they are (order aside): same sentences, same classes
        assert sorted((t, task.class_names[int(y)]) for t, y in got) == sorted(want)
    with pytest.raises(ValueError, match="unknown generated text task"):
        write_text_task_csv("topics", tmp_path / "x")
    assert not (tmp_path / "x").exists()


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
