"""A generated text classification task (no download): review sentences labelled by sentiment.

``load_task("sentiment")`` builds short review sentences ("Although the soup was bland, the waiter was
lovely.") from templates and word lists, deterministically from ``seed``. The label is the sentence's
overall polarity (0 = negative, 1 = positive), decided compositionally, so no single word gives it away:

* plain evaluations ("the plot was really dull") take the adjective's polarity;
* negations ("the room was not bad", "i would not call the screen superb") flip it, and every negation
  form appears in both classes (``not`` says nothing alone);
* contrasts ("X, but Y", "although X, Y", "Y, even though X") hold one clause of each polarity: the
  label is the main clause's (first or second), so both a positive and a negative adjective are in every
  such sentence;
* verb forms ("i loved the pasta", "nobody enjoyed the ending", "i have no complaints about the staff").

The test split is held out in *phrasing and vocabulary*: its templates (``"... was far from ..."``,
``"...; however, ..."``, ``"nobody ..."``; the contrast templates use other connectives, in both clause
orders), nouns, adjectives, verbs and intensifiers never occur in train or validation. A model can only score well on it by knowing what the unseen words and constructions mean,
which is what a pretrained text encoder brings. Train and validation share the training templates and
vocabulary and never share a sentence.

``load_task("intent")`` (:func:`make_intent`) is a 4-way request classification (book / cancel / reschedule /
question) for a booking assistant, built the same way: half the sentences retract a request of another class
before making their own ("i was going to cancel my haircut, but can you move my haircut to friday"), so every
request verb occurs in every class and only the main clause decides; its test split again uses request
verbs, items, times, wrappers and connectives that never occur in training.

Inputs are Python strings (:class:`TextDataset`); :func:`topotransfer.preprocess.prepare_text_task`
tokenises them for a backbone.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "INTENT_CLASSES",
    "SENTIMENT_CLASSES",
    "TEXT_CLASSES",
    "TEXT_TASKS",
    "TextDataset",
    "make_intent",
    "make_sentiment",
    "make_text_task",
    "write_text_task_csv",
]

TEXT_TASKS: tuple[str, ...] = ("sentiment", "intent")
"""Built-in generated text tasks (also listed in :data:`topotransfer.data.AVAILABLE_TASKS`)."""

SENTIMENT_CLASSES: tuple[str, ...] = ("negative", "positive")
INTENT_CLASSES: tuple[str, ...] = ("book", "cancel", "reschedule", "question")
TEXT_CLASSES: dict[str, tuple[str, ...]] = {"sentiment": SENTIMENT_CLASSES, "intent": INTENT_CLASSES}
"""Class names of each generated text task (label i = name i)."""


class TextDataset(Dataset):
    """Sentences with class labels; item ``i`` is ``(text, label)``.

    Args:
        texts: N sentences.
        labels: (N,) int64 class indices.
    """

    def __init__(self, texts: Sequence[str], labels: Tensor) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        self.texts = list(texts)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, Tensor]:
        return self.texts[index], self.labels[index]


# ------------------------------------------------------------------------------------------------ vocabulary
@dataclass(frozen=True)
class _Lexicon:
    """Content words of one split (train/val or test): disjoint between the two."""

    nouns: tuple[str, ...]
    positive: tuple[str, ...]  # adjectives
    negative: tuple[str, ...]
    loved: tuple[tuple[str, str], ...]  # positive verbs (past, base)
    hated: tuple[tuple[str, str], ...]  # negative verbs (past, base)
    intensifiers: tuple[str, ...]  # "" = none; each ends with a space


_TRAIN_WORDS = _Lexicon(
    nouns=("the soup", "the pasta", "the service", "the waiter", "the film", "the plot", "the acting",
           "the soundtrack", "the hotel room", "the staff", "the battery", "the screen", "the novel",
           "the main character"),
    positive=("good", "great", "excellent", "wonderful", "pleasant", "delightful", "impressive", "enjoyable",
              "fantastic", "lovely", "amazing", "perfect"),
    negative=("bad", "terrible", "awful", "boring", "disappointing", "unpleasant", "poor", "mediocre", "dreadful",
              "annoying", "horrible", "bland"),
    loved=(("loved", "love"), ("enjoyed", "enjoy"), ("liked", "like")),
    hated=(("hated", "hate"), ("disliked", "dislike")),
    intensifiers=("", "", "very ", "really ", "quite "),
)

_TEST_WORDS = _Lexicon(
    nouns=("the dessert", "the chef", "the ending", "the dialogue", "the lobby", "the breakfast", "the camera",
           "the keyboard", "the chapter", "the narrator"),
    positive=("superb", "terrific", "splendid", "outstanding", "marvelous", "brilliant", "fabulous", "charming"),
    negative=("dismal", "atrocious", "lousy", "abysmal", "tedious", "dull", "pathetic", "shoddy"),
    loved=(("adored", "adore"), ("appreciated", "appreciate"), ("admired", "admire")),
    hated=(("despised", "despise"), ("loathed", "loathe"), ("detested", "detest")),
    intensifiers=("", "", "extremely ", "truly ", "incredibly "),
)


# ------------------------------------------------------------------------------------------------ phrasings
# A clause builder turns (rng, words, polarity of the clause, noun) into text. Each construction kind has
# training phrasings and held-out test phrasings that express the same thing in other words.
_Clause = Callable[[random.Random, _Lexicon, int, str], str]


def _adj(rng: random.Random, w: _Lexicon, polarity: int) -> str:
    return rng.choice(w.positive if polarity else w.negative)


def _plain(pattern: str) -> _Clause:
    """An evaluation whose polarity is the adjective's."""
    return lambda rng, w, pol, noun: pattern.format(n=noun, i=rng.choice(w.intensifiers), a=_adj(rng, w, pol))


def _negated(pattern: str) -> _Clause:
    """A negated evaluation: the adjective has the opposite polarity of the clause."""
    return lambda rng, w, pol, noun: pattern.format(n=noun, i=rng.choice(w.intensifiers), a=_adj(rng, w, 1 - pol))


def _verb(positive: str, negative: str) -> _Clause:
    """A verb clause; ``{v}`` is the past tense, ``{b}`` the base form of a verb of the clause's polarity."""

    def build(rng: random.Random, w: _Lexicon, pol: int, noun: str) -> str:
        past, base = rng.choice(w.loved if pol else w.hated)
        return (positive if pol else negative).format(n=noun, v=past, b=base)

    return build


def _negated_verb(positive: str, negative: str) -> _Clause:
    """A negated verb clause: the verb has the opposite polarity of the clause."""

    def build(rng: random.Random, w: _Lexicon, pol: int, noun: str) -> str:
        past, base = rng.choice(w.hated if pol else w.loved)
        return (positive if pol else negative).format(n=noun, v=past, b=base)

    return build


@dataclass(frozen=True)
class _Phrasings:
    """The clause and contrast templates of one split."""

    plain: tuple[_Clause, ...]
    negated: tuple[_Clause, ...]
    verb: tuple[_Clause, ...]
    contrast: tuple[str, ...]  # "{x}" = the clause of the other polarity, "{y}" = the main clause (the label)


_TRAIN_PHRASINGS = _Phrasings(
    plain=(_plain("{n} was {i}{a}"), _plain("{n} is {i}{a}"), _plain("{n} felt {i}{a}")),
    negated=(_negated("{n} was not {i}{a}"), _negated("{n} was never {a}"), _negated("{n} is not {i}{a}")),
    verb=(
        _verb("i {v} {n}", "i {v} {n}"),
        _negated_verb("i did not {b} {n}", "i did not {b} {n}"),  # "did not hate" is mild praise
        _verb("i have no complaints about {n}", "i have nothing good to say about {n}"),
    ),
    contrast=("{x}, but {y}", "although {x}, {y}", "{y}, even though {x}"),
)

_TEST_PHRASINGS = _Phrasings(
    plain=(_plain("i found {n} {i}{a}"), _plain("{n} turned out to be {i}{a}"), _plain("honestly, {n} seemed {i}{a}")),
    negated=(_negated("{n} was far from {a}"), _negated("{n} was anything but {a}"),
             _negated("i would not call {n} {a}"), _negated("{n} wasn't {i}{a} at all")),
    verb=(
        _verb("we really {v} {n}", "we really {v} {n}"),
        _negated_verb("nobody {v} {n}", "nobody {v} {n}"),  # "nobody loathed" = praise, "nobody adored" = not
        _verb("there is nothing to criticise about {n}", "there is nothing to praise about {n}"),
    ),
    contrast=("{x}; however, {y}", "{x}, yet {y}", "though {x}, {y}", "{y}, although {x}"),
)

# how often each construction kind is drawn
_KINDS: tuple[tuple[str, float], ...] = (("plain", 0.25), ("negated", 0.25), ("verb", 0.2), ("contrast", 0.3))


def _sentence(rng: random.Random, words: _Lexicon, phrasings: _Phrasings, label: int) -> str:
    kind = rng.choices([k for k, _ in _KINDS], weights=[p for _, p in _KINDS])[0]
    if kind == "contrast":
        clauses = phrasings.plain + phrasings.negated
        first, second = rng.sample(words.nouns, 2)  # two different things are contrasted
        other = rng.choice(clauses)(rng, words, 1 - label, first)
        main = rng.choice(clauses)(rng, words, label, second)
        text = rng.choice(phrasings.contrast).format(x=other, y=main)
    else:
        text = rng.choice(getattr(phrasings, kind))(rng, words, label, rng.choice(words.nouns))
    return text[0].upper() + text[1:] + "."


def _generate(n: int, rng: random.Random, sentence: Callable[[random.Random, int], str], num_classes: int,
              exclude: set[str]) -> tuple[list[str], Tensor]:
    """``n`` distinct sentences ``sentence(rng, label)`` not in ``exclude``, classes balanced (counts differ by at
    most one)."""
    labels = [i % num_classes for i in range(n)]
    rng.shuffle(labels)
    texts: list[str] = []
    seen = set(exclude)
    for label in labels:
        for _ in range(1000):
            text = sentence(rng, label)
            if text not in seen:
                break
        else:  # pragma: no cover - the template space holds hundreds of thousands of sentences
            raise ValueError(f"could not generate {n} distinct sentences")
        seen.add(text)
        texts.append(text)
    return texts, torch.tensor(labels, dtype=torch.int64)


def _rng(seed: int, stream: int) -> random.Random:
    """An independent, reproducible stream per (seed, split); ``random.Random`` is stable across platforms."""
    return random.Random(seed * 1_000_003 + stream)


def make_sentiment(
    num_train: int = 2000, num_val: int = 500, num_test: int = 1000, *, seed: int = 0
) -> tuple[TextDataset, TextDataset, TextDataset]:
    """Generate the sentiment task's splits (see the module docstring for the grammar).

    The test split depends on ``seed`` and ``num_test`` only (never on ``num_train`` / ``num_val``); train
    and validation are drawn from one stream, validation first. Every split is class-balanced (counts
    differ by at most one).

    Args:
        num_train: training sentences (>= 1).
        num_val: validation sentences (>= 0), same phrasings and vocabulary as train, no shared sentence.
        num_test: test sentences (>= 0), held-out phrasings and vocabulary.
        seed: seed of the generator.

    Returns:
        ``(train, val, test)`` :class:`TextDataset` splits with labels 0 = negative, 1 = positive.
    """
    def train_sentence(rng: random.Random, label: int) -> str:
        return _sentence(rng, _TRAIN_WORDS, _TRAIN_PHRASINGS, label)

    def test_sentence(rng: random.Random, label: int) -> str:
        return _sentence(rng, _TEST_WORDS, _TEST_PHRASINGS, label)

    return _splits(train_sentence, test_sentence, len(SENTIMENT_CLASSES), num_train, num_val, num_test, seed, (31, 32))


def _splits(train_sentence: Callable[[random.Random, int], str], test_sentence: Callable[[random.Random, int], str],
            num_classes: int, num_train: int, num_val: int, num_test: int, seed: int,
            streams: tuple[int, int]) -> tuple[TextDataset, TextDataset, TextDataset]:
    """Validation then train from one stream (no shared sentence), test from its own stream (so it depends on
    ``seed`` and ``num_test`` only)."""
    rng = _rng(seed, streams[0])
    val_texts, val_labels = _generate(num_val, rng, train_sentence, num_classes, set())
    train_texts, train_labels = _generate(num_train, rng, train_sentence, num_classes, set(val_texts))
    test_texts, test_labels = _generate(num_test, _rng(seed, streams[1]), test_sentence, num_classes, set())
    return (TextDataset(train_texts, train_labels), TextDataset(val_texts, val_labels),
            TextDataset(test_texts, test_labels))


# ------------------------------------------------------------------------------------------------ intent
@dataclass(frozen=True)
class _IntentWords:
    """The vocabulary and phrasings of one split of the intent task (train/val or test: disjoint).

    ``requests[c]``: verb phrases (base form) asking for class c (book, cancel, reschedule) or, for
    ``question``, asking about an item; ``{n}`` = the item, ``{t}`` = a time. ``wrappers`` turn a verb phrase into
    a request ("please {vp}"); ``questions`` are direct questions of the question class; ``retractions`` hold
    ``{x}`` (a verb phrase of another class, given up) and ``{y}`` (the main request, which is the label).
    """

    items: tuple[str, ...]
    times: tuple[str, ...]
    requests: tuple[tuple[str, ...], ...]
    wrappers: tuple[str, ...]
    questions: tuple[str, ...]
    retractions: tuple[str, ...]


_INTENT_TRAIN = _IntentWords(
    items=("dinner table", "hotel room", "flight", "haircut", "dentist appointment", "rental car", "train ticket",
           "yoga class"),
    times=("friday", "tuesday", "monday evening", "the tenth"),
    requests=(
        ("book a {n} for {t}", "reserve a {n} for {t}", "book a {n}"),
        ("cancel my {n}", "cancel the {n} on {t}", "delete my {n} reservation"),
        ("move my {n} to {t}", "change my {n} to {t}", "push my {n} back to {t}"),
        ("ask how much a {n} costs", "check whether a {n} is free on {t}"),
    ),
    wrappers=("i would like to {vp}", "please {vp}", "can you {vp}", "i want to {vp}"),
    questions=("how much does a {n} cost", "is a {n} free on {t}", "i want to know the cost of a {n}"),
    retractions=("i was going to {x}, but {y}", "i do not want to {x}; {y}", "{y}, i am not going to {x}"),
)

_INTENT_TEST = _IntentWords(
    items=("ferry crossing", "guided tour", "spa session", "tennis court", "museum visit", "driving lesson",
           "pottery workshop", "boat trip"),
    times=("saturday morning", "the weekend", "thursday afternoon", "the twenty-first"),
    requests=(
        ("secure a {n} for {t}", "arrange a {n} for {t}", "set up a {n}"),
        ("scrap my {n}", "call off the {n} on {t}", "withdraw from my {n}"),
        ("postpone my {n} until {t}", "shift my {n} to {t}", "bring my {n} forward to {t}"),
        ("find out the price of a {n}", "see if there is a {n} open on {t}"),
    ),
    wrappers=("i'd love to {vp}", "kindly {vp}", "could you {vp} for me", "i need you to {vp}"),
    questions=("what is the price of a {n}", "are any {n} slots open on {t}", "what is the fee for a {n} on {t}"),
    retractions=("i had planned to {x}, yet {y}", "{y}; there is no need to {x}", "rather than {x}, {y}"),
)

_QUESTION = INTENT_CLASSES.index("question")


def _intent_clause(rng: random.Random, w: _IntentWords, label: int, noun: str) -> tuple[str, bool]:
    """The main clause of class ``label`` about ``noun``; ``True`` when it is a question (ends with "?")."""
    time = rng.choice(w.times)
    if label == _QUESTION and rng.random() < 0.5:
        return rng.choice(w.questions).format(n=noun, t=time), True
    vp = rng.choice(w.requests[label]).format(n=noun, t=time)
    wrapper = rng.choice(w.wrappers)
    return wrapper.format(vp=vp), wrapper.startswith(("can you", "could you")) or label == _QUESTION


def _intent_sentence(rng: random.Random, w: _IntentWords, label: int) -> str:
    """Half the sentences: one request of class ``label``; the other half retract a request of another class
    (about the same item) first, so the request verbs of every class occur in every class."""
    noun = rng.choice(w.items)
    main, question = _intent_clause(rng, w, label, noun)
    if rng.random() < 0.5:
        other = rng.choice([c for c in range(len(INTENT_CLASSES)) if c != label])
        given_up = rng.choice(w.requests[other]).format(n=noun, t=rng.choice(w.times))
        main = rng.choice(w.retractions).format(x=given_up, y=main)
    return main[0].upper() + main[1:] + ("?" if question else ".")


def make_intent(
    num_train: int = 2000, num_val: int = 500, num_test: int = 1000, *, seed: int = 0
) -> tuple[TextDataset, TextDataset, TextDataset]:
    """Generate the intent task's splits: requests to a booking assistant, labels :data:`INTENT_CLASSES`.

    The label is the main request: "I was going to cancel my haircut, but can you move my haircut to friday?"
    is ``reschedule``. The test split's request verbs, items, times, wrappers, question forms and retraction
    connectives never occur in train or validation. Same split rules as :func:`make_sentiment`.

    Args:
        num_train: training sentences (>= 1).
        num_val: validation sentences (>= 0), training phrasings and vocabulary, no sentence shared with train.
        num_test: test sentences (>= 0), held-out phrasings and vocabulary.
        seed: seed of the generator.

    Returns:
        ``(train, val, test)`` :class:`TextDataset` splits, labels 0..3 (counts differ by at most one).
    """

    def train_sentence(rng: random.Random, label: int) -> str:
        return _intent_sentence(rng, _INTENT_TRAIN, label)

    def test_sentence(rng: random.Random, label: int) -> str:
        return _intent_sentence(rng, _INTENT_TEST, label)

    return _splits(train_sentence, test_sentence, len(INTENT_CLASSES), num_train, num_val, num_test, seed, (41, 42))


_MAKERS = {"sentiment": make_sentiment, "intent": make_intent}


def make_text_task(
    name: str, num_train: int = 2000, num_val: int = 500, num_test: int = 1000, *, seed: int = 0
) -> tuple[TextDataset, TextDataset, TextDataset]:
    """The splits of the generated text task ``name`` (one of :data:`TEXT_TASKS`).

    Raises:
        ValueError: an unknown name.
    """
    if name not in _MAKERS:
        raise ValueError(f"unknown generated text task {name!r}; expected one of {TEXT_TASKS}")
    return _MAKERS[name](num_train, num_val, num_test, seed=seed)


def write_text_task_csv(
    name: str, directory: str | os.PathLike, num_train: int = 2000, num_val: int = 500, num_test: int = 1000, *,
    seed: int = 0,
) -> dict[str, str]:
    """Write the splits of generated text task ``name`` as ``train.csv`` / ``validation.csv`` / ``test.csv``
    (columns ``text``, ``label`` = the class name) under ``directory``, for the ``hf:csv`` loader.

    ``load_task("hf:csv", data_files=<the returned dict>)`` then reads the same sentences and classes as
    ``load_task(name, ...)`` with the same sizes and seed: the file path of a user's own CSV data, exercised
    on a task whose held-out test phrasing is known.

    Returns:
        ``{"train": path, "validation": path, "test": path}`` (strings, as ``data.data_files`` takes them).

    Raises:
        ValueError: an unknown task name.
    """
    splits = make_text_task(name, num_train, num_val, num_test, seed=seed)
    classes = TEXT_CLASSES[name]
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, data in zip(("train", "validation", "test"), splits, strict=True):
        path = out / f"{split}.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows([text, classes[int(label)]] for text, label in zip(data.texts, data.labels, strict=True))
        files[split] = str(path)
    return files
