"""Causal language-model data from local text: files -> token ids -> fixed-length blocks -> batches.

Nothing is downloaded. A corpus is a text file or a directory of text files (read in sorted path order,
so a corpus is the same on every machine that has the same files). Documents are tokenised separately,
joined with the tokenizer's end-of-sequence id between them, and the stream is cut into contiguous
blocks of ``block_size`` tokens (the remainder dropped). A batch is the dict the probe and training loops
take: ``input_ids`` (B, L), ``attention_mask`` (B, L) all ones (blocks are never padded) and ``labels``
(B, L) = the input ids (:class:`~topotransfer.losses.CausalLMLoss` shifts them).

:class:`ByteTokenizer` (ids 0..255 = bytes, 256 = end of sequence) needs no vocabulary file: it lets a
small GPT-2 be pretrained on any local text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .errors import EmptyDatasetError
from .losses import causal_lm_labels

__all__ = [
    "CORPUS_PREFIXES", "ByteTokenizer", "LMBlocks", "corpus_documents", "is_corpus", "lm_batches", "read_corpus",
    "split_blocks", "tokenize_corpus",
]

#: ``data.name`` values that name a text corpus (causal-LM adaptation): ``textfile:<file or directory>``
#: and ``hf:text`` (datasets' ``text`` loader over ``data.data_files``).
CORPUS_PREFIXES = ("textfile:", "hf:text")

DEFAULT_SUFFIXES = (".txt", ".md", ".rst", ".py")


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255) and :attr:`eos_token_id` = 256; ``vocab_size`` = 257."""

    eos_token_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``: its UTF-8 bytes."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (the end-of-sequence id dropped; invalid UTF-8 replaced)."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def read_corpus(path: str | Path, suffixes: Sequence[str] = DEFAULT_SUFFIXES, max_files: int | None = None) -> list[str]:
    """The documents of a corpus: one text file, or every file under a directory whose name ends in ``suffixes``.

    Args:
        path: a file or a directory (searched recursively, files in sorted order).
        suffixes: file name endings to read from a directory.
        max_files: read at most this many files (the first ones in sorted order).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        EmptyDatasetError: no non-empty document was found.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {str(path)!r} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
    if max_files is not None:
        files = files[:max_files]
    docs = [text for text in (f.read_text(encoding="utf-8", errors="replace") for f in files) if text.strip()]
    if not docs:
        raise EmptyDatasetError(f"corpus {str(path)!r} holds no non-empty text file (suffixes {list(suffixes)})")
    return docs


def _encoder(tokenizer: object) -> Callable[[str], list[int]]:
    if hasattr(tokenizer, "encode") and not hasattr(tokenizer, "convert_tokens_to_ids"):
        return tokenizer.encode  # ByteTokenizer and other plain encoders
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # a transformers tokenizer


def tokenize_corpus(docs: Sequence[str], tokenizer: object, block_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """Token blocks of a corpus.

    Args:
        docs: documents (:func:`read_corpus`).
        tokenizer: a :class:`ByteTokenizer`, or a transformers tokenizer (no special tokens added; its
            ``eos_token_id``, when it has one, separates documents).
        block_size: tokens per block L.
        max_tokens: stop after this many tokens of the stream.

    Returns:
        (N, L) long tensor of contiguous blocks.

    Raises:
        EmptyDatasetError: the corpus is shorter than one block.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a block predicts its tokens from the previous ones), got {block_size}")
    encode = _encoder(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for doc in docs:
        stream += encode(doc)
        if eos is not None:
            stream.append(int(eos))
        if max_tokens is not None and len(stream) >= max_tokens:
            stream = stream[:max_tokens]
            break
    n = len(stream) // block_size
    if n == 0:
        raise EmptyDatasetError(f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).reshape(n, block_size)


def split_blocks(blocks: torch.Tensor, fractions: Sequence[float], seed: int = 0) -> list[torch.Tensor]:
    """Split (N, L) blocks into parts of the given fractions (summing to at most 1) after a seeded shuffle.

    Raises:
        EmptyDatasetError: a part would be empty.
    """
    if any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-12:
        raise ValueError(f"fractions must be positive and sum to at most 1, got {list(fractions)}")
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for f in fractions:
        size = int(round(f * blocks.shape[0]))
        if size == 0:
            raise EmptyDatasetError(f"{blocks.shape[0]} blocks give an empty part for fraction {f}")
        parts.append(blocks[order[start : start + size]])
        start += size
    return parts


def lm_batches(blocks: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of blocks: dicts with ``input_ids``, ``attention_mask`` (ones) and ``labels`` (= input ids).

    The last batch may be smaller. ``shuffle`` permutes the blocks with a generator seeded by ``seed``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed)) if shuffle else None
    data = blocks[order] if order is not None else blocks
    out = []
    for i in range(0, data.shape[0], batch_size):
        ids = data[i : i + batch_size]
        mask = torch.ones_like(ids)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": causal_lm_labels(ids, mask)})
    return out


def is_corpus(name: str) -> bool:
    """Whether ``data.name`` names a text corpus (``textfile:<path>`` or ``hf:text``)."""
    key = name.strip()
    return key.startswith("textfile:") or key == "hf:text"


def corpus_documents(name: str, data_files: object = None, cache_dir: str | None = None) -> dict[str, list[str]]:
    """The documents of a corpus per split.

    ``textfile:<path>``: ``{"train": read_corpus(path)}`` (a file, or every .txt/.md/.rst/.py file under a
    directory). ``hf:text``: ``datasets.load_dataset("text", data_files=..., sample_by="document")`` (one
    document per file; local files, nothing downloaded), every split it has (``train``, and ``validation`` /
    ``test`` when ``data_files`` is a dict naming them).

    Raises:
        ValueError: not a corpus name, or ``hf:text`` without ``data_files``.
        FileNotFoundError: a missing path or data file.
        EmptyDatasetError: a corpus without text.
    """
    key = name.strip()
    if key.startswith("textfile:"):
        if data_files is not None:
            raise ValueError("data.data_files applies to 'hf:text'; 'textfile:<path>' names its file or directory")
        path = key[len("textfile:"):].strip()
        if not path:
            raise ValueError("data.name='textfile:' needs a path, e.g. 'textfile:corpus/' or 'textfile:notes.txt'")
        return {"train": read_corpus(path)}
    if key != "hf:text":
        raise ValueError(f"{name!r} is not a text corpus (use 'textfile:<path>' or 'hf:text' with data.data_files)")
    if data_files is None:
        raise ValueError("data.name=hf:text needs data.data_files (a file, a list, or {train: ..., validation: ...})")
    import datasets

    try:
        splits = datasets.load_dataset("text", data_files=data_files, sample_by="document", cache_dir=cache_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"hf:text: {e}") from e
    out = {split: [t for t in ds["text"] if t.strip()] for split, ds in splits.items()}
    if not out.get("train"):
        raise EmptyDatasetError(f"hf:text with data_files={data_files!r} has no non-empty 'train' document")
    return out


class LMBlocks(Dataset):
    """(N, L) token blocks as a dataset for the training loops: item ``i`` is ``(inputs, labels)`` with
    ``inputs`` a :class:`~topotransfer.preprocess.TextInputs` of ``input_ids`` and ``attention_mask`` (ones)
    rows and ``labels`` the ``input_ids`` (:class:`~topotransfer.losses.CausalLMLoss` shifts them)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise EmptyDatasetError(f"LMBlocks needs a non-empty (N, L) tensor, got shape {tuple(blocks.shape)}")
        self.blocks = blocks.long().contiguous()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> tuple[dict, torch.Tensor]:
        from .preprocess import TextInputs

        ids = self.blocks[index]
        return TextInputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), ids
