"""Causal-LM data from local text: corpus reading, tokenisation into blocks, splits, batches, and a probe on them."""

from __future__ import annotations

import pytest
import torch

from topotransfer.errors import EmptyDatasetError
from topotransfer.lm_data import (ByteTokenizer, LMBlocks, corpus_documents, is_corpus, lm_batches, read_corpus,
                                  split_blocks, tokenize_corpus)
from topotransfer.losses import CausalLMLoss


def write_corpus(root) -> None:
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("hello world\n")
    (root / "b" / "c.md").write_text("caf\u00e9 au lait\n")
    (root / "b" / "skip.bin").write_text("not read")
    (root / "empty.txt").write_text("   \n")


def test_read_tokenize_split_batch(tmp_path):
    write_corpus(tmp_path)
    docs = read_corpus(tmp_path)
    assert docs == ["hello world\n", "caf\u00e9 au lait\n"]  # sorted paths, suffix filter, empty dropped
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(docs[1])) == docs[1]
    stream = tok.encode(docs[0]) + [256] + tok.encode(docs[1]) + [256]
    blocks = tokenize_corpus(docs, tok, block_size=5)
    assert blocks.shape == (len(stream) // 5, 5)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert tokenize_corpus(docs, tok, 5, max_tokens=10).shape == (2, 5)
    train, val = split_blocks(blocks, [0.5, 0.25], seed=0)
    assert train.shape[0] + val.shape[0] <= blocks.shape[0]
    rows = {tuple(r) for r in blocks.tolist()}
    assert all(tuple(r) in rows for r in torch.cat([train, val]).tolist())
    batches = lm_batches(blocks, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2] * (blocks.shape[0] // 2) + ([1] if blocks.shape[0] % 2 else [])
    assert all(torch.equal(b["labels"], b["input_ids"]) and bool(b["attention_mask"].all()) for b in batches)


def test_bad_corpora_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("ab")
    with pytest.raises(EmptyDatasetError, match="no non-empty"):
        read_corpus(tmp_path, suffixes=(".md",))
    with pytest.raises(EmptyDatasetError, match="fewer than one block"):
        tokenize_corpus(["ab"], ByteTokenizer(), block_size=8)
    with pytest.raises(ValueError, match="fractions"):
        split_blocks(torch.zeros(4, 2, dtype=torch.long), [0.8, 0.5])


def test_probe_on_a_byte_level_gpt2():
    """The batches feed the derivative of a byte-level GPT-2 (vocab 257) directly."""
    transformers = pytest.importorskip("transformers")
    from topotransfer.expansion import copy_site_scores

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=ByteTokenizer.vocab_size, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()
    blocks = tokenize_corpus(["def f(x):\n    return x + 1\n" * 4], ByteTokenizer(), block_size=16)
    batches = lm_batches(blocks, batch_size=2)
    loss = CausalLMLoss()(model(input_ids=batches[0]["input_ids"]).logits, batches[0]["labels"])
    assert torch.isfinite(loss) and float(loss) > 0
    scores = copy_site_scores(model, batches, CausalLMLoss())
    assert len(scores) == 3 and all(s.score > 0 for s in scores)
    assert scores[0].num_samples == blocks.numel()


def test_corpus_sources_and_blocks_dataset(tmp_path):
    write_corpus(tmp_path)
    assert is_corpus("textfile:x") and is_corpus(" hf:text") and not is_corpus("hf:imdb") and not is_corpus("sentiment")
    assert corpus_documents(f"textfile:{tmp_path}") == {"train": read_corpus(tmp_path)}
    files = {"train": str(tmp_path / "a.txt"), "test": str(tmp_path / "b" / "c.md")}
    docs = corpus_documents("hf:text", files, cache_dir=str(tmp_path / "cache"))
    assert docs["train"][0].startswith("hello world") and docs["test"][0].startswith("caf\u00e9")
    with pytest.raises(ValueError, match="data_files"):
        corpus_documents("hf:text")
    with pytest.raises(ValueError, match="needs a path"):
        corpus_documents("textfile:")
    with pytest.raises(FileNotFoundError):
        corpus_documents("textfile:/no/such/dir")
    blocks = tokenize_corpus(docs["train"] * 4, ByteTokenizer(), block_size=6)
    inputs, labels = LMBlocks(blocks)[1]
    assert torch.equal(inputs["input_ids"], blocks[1]) and torch.equal(labels, blocks[1])
    assert torch.equal(inputs["attention_mask"], torch.ones(6, dtype=torch.long))


def test_causal_lm_loss_mean_is_the_sum_over_predicted_tokens():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3:] = -100
    total = CausalLMLoss()(logits, labels)
    assert torch.allclose(CausalLMLoss("mean")(logits, labels), total / 6)  # 4 + 2 predicted tokens
    with pytest.raises(ValueError, match="reduction"):
        CausalLMLoss("none")
