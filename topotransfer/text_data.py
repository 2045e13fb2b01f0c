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

Inputs are Python strings (:class:`TextDataset`); :func:`topotransfer.preprocess.prepare_text_task`
tokenises them for a backbone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "SENTIMENT_CLASSES",
    "TEXT_TASKS",
    "TextDataset",
    "make_sentiment",
]

TEXT_TASKS: tuple[str, ...] = ("sentiment",)
"""Built-in generated text tasks (also listed in :data:`topotransfer.data.AVAILABLE_TASKS`)."""

SENTIMENT_CLASSES: tuple[str, ...] = ("negative", "positive")


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


def _generate(n: int, rng: random.Random, words: _Lexicon, phrasings: _Phrasings,
              exclude: set[str]) -> tuple[list[str], Tensor]:
    """``n`` distinct sentences not in ``exclude``, classes balanced (counts differ by at most one)."""
    labels = [i % len(SENTIMENT_CLASSES) for i in range(n)]
    rng.shuffle(labels)
    texts: list[str] = []
    seen = set(exclude)
    for label in labels:
        for _ in range(1000):
            text = _sentence(rng, words, phrasings, label)
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
    rng = _rng(seed, 31)
    val_texts, val_labels = _generate(num_val, rng, _TRAIN_WORDS, _TRAIN_PHRASINGS, set())
    train_texts, train_labels = _generate(num_train, rng, _TRAIN_WORDS, _TRAIN_PHRASINGS, set(val_texts))
    test_texts, test_labels = _generate(num_test, _rng(seed, 32), _TEST_WORDS, _TEST_PHRASINGS, set())
    return (TextDataset(train_texts, train_labels), TextDataset(val_texts, val_labels),
            TextDataset(test_texts, test_labels))
