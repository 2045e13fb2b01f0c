"""`topotransfer adapt` on a text corpus (recipes/causal_lm.py): tiny GPT-2 / Llama saved locally, byte tokenizer.

End to end for topo, expand, interleave, on_top, lora: the frozen backbone bit-identical, the adapter reloads
with identical logits, the merged export generates (KV cache) exactly what the adapted model generates.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from topotransfer.adapter import load_adapter, load_merged, unwrap_peft  # noqa: E402
from topotransfer.cli import BUILTIN_CONFIGS, main  # noqa: E402
from topotransfer.config import ConfigError, check_runnable, load_config  # noqa: E402
from topotransfer.lm_data import ByteTokenizer  # noqa: E402
from topotransfer.recipes.adapt import run_adapt  # noqa: E402
from topotransfer.surgery import get_family  # noqa: E402
from topotransfer.surgery.decoder import CopiedBlock  # noqa: E402

TEXT = "def add(a, b):\n    return a + b\n\nThe tool reads a file and writes a report.\n"


def save_gpt2(path) -> str:
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_embd=16, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=256,
                               eos_token_id=256)).save_pretrained(path)
    return str(path)


def save_llama(path) -> str:
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                 bos_token_id=256, eos_token_id=256, pad_token_id=0)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (root / f"doc{i}.md").write_text(TEXT.replace("add", f"add{i}") * 12)
    (root / "source.txt").write_text("import os\nprint(os.getcwd())\n" * 30)
    return root


def config(tmp_path, base: str, corpus, method: str, **extra):
    overrides = [f"model.name_or_path={base}", f"data.name=textfile:{corpus}", f"output_dir={tmp_path / method}",
                 f"adapt.method={method}", "adapt.insertions=1", "adapt.epochs_per_insertion=1", "data.max_length=16",
                 f"data.source_corpus={corpus / 'source.txt'}", "data.num_train=24", "probe.batches=1",
                 "probe.batch_size=8", "probe.rule=top1", "train.batch_size=8", "progress=false", "adapt.lr=0.01"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(BUILTIN_CONFIGS / "adapt_causal_lm.yaml", overrides)


def greedy(model, prompt, use_cache=True):
    return model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0)


@pytest.mark.parametrize("method", ["topo", "expand", "interleave", "on_top", "lora"])
def test_adapt_a_gpt2_to_a_corpus(method, tmp_path, corpus):
    base = save_gpt2(tmp_path / "base")
    run = run_adapt(config(tmp_path, base, corpus, method))
    r = run.results
    out = tmp_path / method
    assert r["task"] == "causal_lm" and r["tokenizer"] == "bytes" and r["backbone_unchanged"]
    assert json.loads((out / "results.json").read_text())["test_perplexity"] == r["test_perplexity"]
    assert r["test_perplexity"] < r["base_test_perplexity"]  # the new parameters learned the target
    assert r["source_perplexity"] is not None and r["forgetting"] == r["source_perplexity"] - r["base_source_perplexity"]
    assert len(r["history"]) == 1 and r["steps"] == 3
    saved = GPT2LMHeadModel.from_pretrained(base)
    if method == "lora":  # rank matched to one copied block's parameters
        assert r["lora_r"] >= 1 and r["trainable_params"] <= sum(p.numel() for p in saved.transformer.h[0].parameters())
    else:
        assert len(r["sites"]) == 1 and r["depth"] == 3
    # the frozen backbone: every parameter of the base bit-identical in the adapted model
    model = run.model
    plain = unwrap_peft(model)[0]
    family = get_family(plain)
    originals = [b for b in plain.transformer.h if not isinstance(b, CopiedBlock) and family.unwrap(b) is None]
    assert len(originals) == 2
    for b0, b1 in zip(saved.transformer.h, originals):
        adapted = {n.replace("base_layer.", ""): p for n, p in b1.named_parameters() if "lora_" not in n}
        assert all(torch.equal(p, adapted[n]) for n, p in b0.named_parameters())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        assert torch.equal(saved.get_parameter(name), plain.get_parameter(name))
    # adapter reload: identical logits
    ids = torch.tensor([list(TEXT.encode())[:12]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = load_adapter(base, out / "adapter").eval()
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        merged = load_merged(out / "merged").eval()
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    # generate from the merged export: with the KV cache as without it, and as the adapted model
    prompt = ids[:, :5]
    gen = greedy(merged, prompt)
    assert torch.equal(gen, greedy(merged, prompt, use_cache=False))
    if method != "lora":  # LoRA folded in: equal up to rounding, the greedy path could differ in a tie
        assert torch.equal(gen, greedy(model, prompt))
    assert ByteTokenizer().decode(gen[0].tolist()).startswith(TEXT[:5])


def test_llama_expand_realized_and_hf_text(tmp_path, corpus):
    base = save_llama(tmp_path / "base")
    files = {"train": str(corpus / "doc0.md"), "validation": str(corpus / "doc1.md"), "test": str(corpus / "doc2.md")}
    cfg = config(tmp_path, base, corpus, "expand", **{"adapt.site_selection": "realized", "data.name": "hf:text",
                                                      "data.data_files": json.dumps(files),
                                                      "data.source_corpus": "null"})
    r = run_adapt(cfg).results
    assert r["backbone_unchanged"] and r["source_perplexity"] is None and len(r["sites"]) == 1
    assert r["events"][0]["scores"] and r["test_perplexity"] < r["base_test_perplexity"]
    merged = load_merged(tmp_path / "expand" / "merged").eval()
    prompt = torch.tensor([list(b"The tool")])
    assert torch.equal(greedy(merged, prompt), greedy(merged, prompt, use_cache=False))


def test_bad_causal_lm_configs_are_one_line_errors(tmp_path, corpus, capsys):
    base = save_gpt2(tmp_path / "base")
    with pytest.raises(ConfigError, match="does not apply to a text corpus"):
        check_runnable(config(tmp_path, base, corpus, "linear_probe"))
    with pytest.raises(ConfigError, match="needs a text corpus"):
        check_runnable(load_config(None, ["task=adapt", f"model.name_or_path={base}", "data.name=sentiment",
                                          "adapt.method=expand"]))
    capsys.readouterr()
    code = main(["adapt", "task=adapt", f"model.name_or_path={base}", "data.name=textfile:/no/such/corpus",
                 "adapt.method=expand", f"output_dir={tmp_path / 'bad'}", "progress=false"])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/no/such/corpus" in err[0]


def test_resume_replays_the_placement(tmp_path, corpus):
    base = save_gpt2(tmp_path / "base")
    const = {"train.lr_schedule": "constant"}  # a cosine schedule would span a different number of steps
    straight = run_adapt(config(tmp_path / "a", base, corpus, "expand", **const, **{"adapt.epochs_per_insertion": 2}))
    straight = straight.results
    run_adapt(config(tmp_path / "b", base, corpus, "expand", **const))  # one epoch, then continued to two
    more = config(tmp_path / "b", base, corpus, "expand", **const, **{"adapt.epochs_per_insertion": 2})
    resumed = run_adapt(more, resume=True).results
    assert resumed["sites"] == straight["sites"] and resumed["epochs"] == 2
    assert resumed["test_perplexity"] == straight["test_perplexity"]
