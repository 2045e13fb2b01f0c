"""Adapt a decoder language model (GPT-2, Llama layout) to a text corpus: ``topotransfer adapt`` with
``data.name=textfile:<path>`` or ``data.name=hf:text`` (+ ``data.data_files``); results say task ``causal_lm``.

    load the decoder LM and its tokenizer (the directory's; ByteTokenizer when it holds none), read the
    corpus -> blocks of data.max_length tokens (train / validation / test; a fixed split, seed 0)
    -> place adapt.insertions = B new blocks once, on the target's probe batches:
         topo        TopoLayers at the B sites of largest TD, eps by line search (first local minimum)
         expand      copied blocks (LLaMA-Pro init) at the B sites of largest ||D_t|| (site_selection=argmax)
                     or of largest held-out decrease along D_t (site_selection=realized, eps from that search)
         interleave  LLaMA-Pro's uniform interleave; on_top: B copies after the last block
         lora        peft LoRA, rank matched to B copied blocks' parameters (adapt.lora_match_blocks)
    -> train only the new parameters, insertions * epochs_per_insertion + final_epochs epochs (mean
       next-token loss; no head phase: the LM head is the pretrained one, frozen)
    -> perplexity on the held-out target (and on data.source_corpus before / after: the forgetting)
    -> output_dir/{config.yaml, results.json, adapter/, merged/}

The backbone is fingerprinted before placement and must be bit-identical at the end. The merged export
loads with :func:`topotransfer.adapter.load_merged` and generates with ``model.generate`` (KV cache).
One process only (the placement statistics are not reduced over ranks).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import infer_insertions, merge_and_save, save_adapter, unwrap_peft
from ..config import CAUSAL_LM_METHODS, ConfigError, RunConfig
from ..expansion import (choose_sites, copies_parameter_count, copy_site_scores, expand, freeze_all_but_copies,
                         lora_rank_matching, on_top_sites, realized_copy_sites, uniform_interleave_sites)
from ..growth import count_parameters
from ..init_rules import probe_site_results
from ..insertion import DEFAULT_EPSILONS, insert_layer, line_search_epsilon
from ..lm_data import ByteTokenizer, LMBlocks, corpus_documents, read_corpus, split_blocks, tokenize_corpus
from ..losses import CausalLMLoss
from ..surgery import get_family
from ..surgery.decoder import DecoderFamily
from ..training.loop import evaluate
from ..training.run import Run, RunState, read_manifest
from .adapt import AdaptRun, _fingerprint, first_local_minimum_epsilon

__all__ = ["CAUSAL_LM_METHODS", "CausalLMState", "load_decoder", "run_causal_lm"]

LORA_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


@dataclass
class CausalLMState(RunState):
    """The run state; ``placed``: the new blocks are in (a resume replays them from the manifest)."""

    placed: bool = False


# ---------------------------------------------------------------------------------------------- set-up
def load_decoder(name_or_path: str, revision: str | None = None) -> tuple[nn.Module, Any]:
    """The decoder LM (its ``*ForCausalLM`` / ``*LMHeadModel`` class) and its tokenizer.

    The tokenizer is the directory's (``AutoTokenizer``) when it holds tokenizer files, else the
    :class:`~topotransfer.lm_data.ByteTokenizer` (UTF-8 bytes, id 256 = end of sequence), which needs
    ``vocab_size >= 257``.

    Raises:
        UnsupportedModelError: not a GPT-2 / Llama-layout decoder.
        ConfigError: no tokenizer in the directory and a vocabulary too small for bytes.
    """
    import transformers

    from ..errors import UnsupportedModelError
    from ..models.hf import load_backbone, load_tokenizer

    config = transformers.AutoConfig.from_pretrained(name_or_path, revision=revision)
    arch = next((a for a in (config.architectures or []) if a.endswith(("ForCausalLM", "LMHeadModel"))),
                "AutoModelForCausalLM")
    model = load_backbone(name_or_path, revision, architecture=arch)
    if not isinstance(get_family(model), DecoderFamily):
        raise UnsupportedModelError(f"causal-LM adaptation needs a GPT-2 or Llama-layout decoder, got {type(model).__name__}")
    path = Path(name_or_path)
    has_files = not path.is_dir() or any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if has_files:
        return model, load_tokenizer(name_or_path, revision, config)
    if config.vocab_size < ByteTokenizer.vocab_size:
        raise ConfigError(f"{name_or_path!r} holds no tokenizer and its vocabulary ({config.vocab_size}) is too small "
                          f"for the byte tokenizer ({ByteTokenizer.vocab_size}): save its tokenizer beside config.json")
    return model, ByteTokenizer()


def _corpus(cfg: RunConfig, tokenizer: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """Token blocks: train / val / test of the target (a fixed split, seed 0, unless the corpus has its own
    validation / test) and ``source`` (data.source_corpus, or None). Sizes capped by data.num_*."""
    d = cfg.data
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    L = d.max_length or min(limit, 256)
    if L > limit:
        raise ConfigError(f"data.max_length={L} exceeds the model's {limit} positions")
    docs = corpus_documents(d.name, d.data_files, d.cache_dir)
    blocks = {split: tokenize_corpus(texts, tokenizer, L) for split, texts in docs.items()}
    if "validation" in blocks and "test" in blocks:
        out = {"train": blocks["train"], "val": blocks["validation"], "test": blocks["test"]}
    else:
        out = dict(zip(("train", "val", "test"), split_blocks(blocks["train"], [0.8, 0.1, 0.1], seed=0), strict=True))
    for split, n in (("train", d.num_train), ("val", d.num_val), ("test", d.num_test)):
        out[split] = out[split][:n] if n is not None else out[split]
    src = d.source_corpus
    out["source"] = None if src is None else tokenize_corpus(read_corpus(src), tokenizer, L)[: d.num_test or 256]
    return out


# ---------------------------------------------------------------------------------------------- placement
def _place(model: nn.Module, cfg: RunConfig, probe: list, heldout: list) -> tuple[nn.Module, dict]:
    """Put in the B new blocks of ``adapt.method`` (in place; LoRA wraps). Returns ``(model, event record)``."""
    a, loss, budget = cfg.adapt, CausalLMLoss(), cfg.adapt.insertions
    record: dict = {"event": 0, "method": a.method, "scores": {}, "sites": [], "epsilons": []}
    t0 = time.perf_counter()
    if a.method == "expand":
        scores = copy_site_scores(model, probe, loss)
        record["scores"] = {s.site: s.score for s in scores}
        if a.site_selection == "realized":
            searched = realized_copy_sites(model, scores, heldout, loss, budget, _grid(cfg))
            chosen, eps = [s for s, _ in searched], [ls.epsilon for _, ls in searched]
        else:
            chosen, eps = choose_sites(scores, budget), [0.0] * budget
        record["seconds"] = {"derivative": time.perf_counter() - t0}
        record["sites"], record["epsilons"] = [s.site for s in chosen], eps
        expand(model, chosen, eps)
    elif a.method in ("interleave", "on_top"):
        record["sites"] = (uniform_interleave_sites if a.method == "interleave" else on_top_sites)(model, budget)
        record["epsilons"] = [0.0] * budget
        expand(model, record["sites"])
    elif a.method == "topo":
        results = probe_site_results(model, probe, loss, cfg.probe, progress=cfg.progress)
        record["scores"] = {r.site: r.score for r in results}
        record["seconds"] = {"derivative": time.perf_counter() - t0}
        family = get_family(model)
        best = sorted((r for r in results if r.score > 0), key=lambda r: -r.score)[:budget]
        best.sort(key=lambda r: family.site(model, r.site).index)
        for r in best:  # each searched with the others absent; eps = 0 would never train (sigma'(0) = 0)
            ls = line_search_epsilon(model, r.site, heldout, loss, r.weight, r.bias, epsilons=_grid(cfg))
            record["epsilons"].append(first_local_minimum_epsilon(ls.tried) or min(_grid(cfg)))
        record["sites"] = [r.site for r in best]
        for r, e in reversed(list(zip(best, record["epsilons"], strict=True))):  # deepest first: names stay
            insert_layer(model, r.site, r.weight, r.bias, epsilon=e)
    elif a.method == "lora":
        model = _apply_lora(model, cfg)
        record["lora_r"] = unwrap_peft(model)[1].peft_config["default"].r
    else:
        raise ConfigError(f"adapt.method={a.method!r} is not a causal-LM method ({'|'.join(CAUSAL_LM_METHODS)})")
    record["seconds"] = {**record.get("seconds", {}), "placement": time.perf_counter() - t0}
    return model, record


def _grid(cfg: RunConfig) -> tuple[float, ...]:
    return tuple(sorted(cfg.adapt.epsilons)) if cfg.adapt.epsilons else DEFAULT_EPSILONS


def _apply_lora(model: nn.Module, cfg: RunConfig, rank: int | None = None) -> nn.Module:
    """peft LoRA on the family's linear maps (or adapt.lora_target_modules); rank matched to B copies."""
    from peft import LoraConfig, get_peft_model

    a, family = cfg.adapt, get_family(model)
    targets = a.lora_target_modules or LORA_TARGETS[family.name]
    if rank is None:
        budget = copies_parameter_count(model, uniform_interleave_sites(model, a.insertions))
        rank = lora_rank_matching(model, budget, targets) if a.lora_match_blocks else a.lora_r
    config = LoraConfig(r=rank, lora_alpha=rank if a.lora_match_blocks else a.lora_alpha, lora_dropout=a.lora_dropout,
                        target_modules=targets, fan_in_fan_out=family.name == "gpt2")
    torch.manual_seed(cfg.seed)  # LoRA's A matrices
    return get_peft_model(model, config)


def _trainable(model: nn.Module, method: str) -> list[nn.Parameter]:
    """Only the new parameters train: the copies, the TopoLayers, or LoRA's matrices."""
    if method in ("expand", "interleave", "on_top"):
        return freeze_all_but_copies(model)
    if method == "lora":
        return [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    model.requires_grad_(False)
    params = [p for _, layer in get_family(model).inserted(model) for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _rebuild(model: nn.Module, cfg: RunConfig, manifest: dict) -> nn.Module:
    """The placed architecture of a checkpoint: its recorded insertions (zero blocks), or LoRA of its rank."""
    from ..training.checkpoint import replay_insertions

    if manifest.get("lora_r") is not None:
        return _apply_lora(model, cfg, manifest["lora_r"])
    replay_insertions(model, manifest["insertions"])
    return model


# ---------------------------------------------------------------------------------------------- the recipe
def run_causal_lm(cfg: RunConfig, resume: bool = False, accelerator=None, overwrite: bool = False) -> AdaptRun:
    """Adapt ``cfg.model.name_or_path`` (a decoder LM) to the corpus ``cfg.data.name`` (module docstring).

    Returns:
        :class:`~topotransfer.recipes.adapt.AdaptRun` (results also in ``output_dir/results.json``).

    Raises:
        ConfigError: a method that is not a causal-LM method, several processes, a corpus too short.
        RuntimeError: nothing was placed (topo: TD <= 0 at every site), or the frozen backbone changed (a bug).
    """
    a = cfg.adapt
    if a.method not in CAUSAL_LM_METHODS:
        raise ConfigError(f"adapt.method={a.method!r} does not apply to a text corpus; use {'|'.join(CAUSAL_LM_METHODS)}")
    run = Run(cfg, resume=resume, overwrite=overwrite, accelerator=accelerator)
    if run.acc.num_processes > 1:
        raise ConfigError("causal-LM adaptation runs on one process (its placement statistics are not reduced over ranks)")
    model, tokenizer = load_decoder(cfg.model.name_or_path, cfg.model.revision)
    blocks = _corpus(cfg, tokenizer, model)
    model.to(run.device)
    backbone = list(model.named_parameters())
    before = _fingerprint(backbone)
    run.write_config()
    bs = cfg.train.batch_size
    val, test = run.batches(LMBlocks(blocks["val"]), bs), run.batches(LMBlocks(blocks["test"]), bs)
    source = None if blocks["source"] is None else run.batches(LMBlocks(blocks["source"]), bs)
    base_ppl = {"test": _ppl(run, model, test), "source": None if source is None else _ppl(run, model, source)}

    ckpt = run.checkpoint_to_resume()
    if ckpt is None:
        probe = run.batches(LMBlocks(blocks["train"]), cfg.probe.batch_size, cfg.probe.batches)
        model, record = _place(model, cfg, probe, val)
        state = CausalLMState(placed=True, events=[record])
        manifest = {"format": 1, "recipe": "causal_lm", "base_model": cfg.model.name_or_path, "method": a.method,
                    "insertions": [] if a.method == "lora" else infer_insertions(model), "lora_r": record.get("lora_r")}
        run.say(f"placed {a.method}: {record['sites'] or 'LoRA r=' + str(record.get('lora_r'))}")
    else:
        manifest = read_manifest(ckpt)
        model = _rebuild(model, cfg, manifest)
        state = run.read_state(ckpt, CausalLMState)
    params = _trainable(model, a.method)
    if not params:  # topo: no site has TD > 0 on the probe batches
        raise RuntimeError(f"{a.method}: nothing was placed (scores {state.events[0]['scores']}), so nothing can train")
    trainable_ids = {id(p) for p in params}
    run.frozen_ids = {id(p) for p in model.parameters() if id(p) not in trainable_ids}
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=cfg.train.weight_decay)
    if ckpt is not None:
        run.load_weights(ckpt, model, optimizer)
    epochs = a.insertions * a.epochs_per_insertion + a.final_epochs
    run.start(model, optimizer, manifest, state, train_set=LMBlocks(blocks["train"]), val_batches=val, epochs=epochs,
              kind="causal_lm", loss=CausalLMLoss("mean"), desc=f"causal_lm {a.method}")
    while state.epoch < epochs:
        if run.train_epoch({"trainable_params": sum(p.numel() for p in params)}) is None:
            break
        if run.checkpoint_due():
            run.checkpoint()
    model = run.net.eval()
    changed = sorted(n for (n, _), h in zip(backbone, _fingerprint(backbone).values(), strict=True) if before[n] != h)
    if changed:
        raise RuntimeError(f"backbone weights changed during {a.method} adaptation (a bug): {changed[:5]}")
    results = _results(run, model, cfg, blocks, base_ppl, val, test, source, tokenizer)
    run.finish(results, export=lambda out: _export(out, model, cfg, tokenizer))
    return AdaptRun(results=results, model=model, insertions=manifest["insertions"])


# ---------------------------------------------------------------------------------------------- the end
def _ppl(run: Run, model: nn.Module, batches: list) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of ``batches``."""
    return math.exp(evaluate(model, batches, "causal_lm", run.device, accelerator=run.acc)["loss"])


def _results(run: Run, model: nn.Module, cfg: RunConfig, blocks: dict, base_ppl: dict, val: list, test: list,
             source: list | None, tokenizer: Any) -> dict:
    state, record = run.state, run.state.events[0]
    test_ppl = _ppl(run, model, test)
    source_ppl = None if source is None else _ppl(run, model, source)
    base, _ = unwrap_peft(model)
    return {
        "method": cfg.adapt.method, "task": "causal_lm", "seed": cfg.seed, "base_model": cfg.model.name_or_path,
        "corpus": cfg.data.name, "tokenizer": "bytes" if isinstance(tokenizer, ByteTokenizer) else type(tokenizer).__name__,
        "block_size": int(blocks["train"].shape[1]),
        "blocks": {k: (None if v is None else int(v.shape[0])) for k, v in blocks.items()},
        "val_perplexity": _ppl(run, model, val), "test_perplexity": test_ppl, "base_test_perplexity": base_ppl["test"],
        "source_perplexity": source_ppl, "base_source_perplexity": base_ppl["source"],
        "forgetting": None if source_ppl is None else source_ppl - base_ppl["source"],
        "val_error": None, "test_error": None,  # no classification error: the perplexities above
        "sites": record["sites"], "epsilons": record["epsilons"], "lora_r": record.get("lora_r"),
        "insertions": len(record["sites"]), "insertion_records": run.manifest["insertions"], "events": state.events,
        "depth": base.config.num_hidden_layers, "params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True), "backbone_unchanged": True,
        "epochs": state.epoch, "steps": state.steps, "history": state.history, "wall_time": run.elapsed(),
    }


def _export(out: Path, model: nn.Module, cfg: RunConfig, tokenizer: Any) -> None:
    """``output_dir/adapter`` (new blocks / LoRA over the untouched base) and ``output_dir/merged`` (+ tokenizer)."""
    name, revision = cfg.model.name_or_path, cfg.model.revision
    if cfg.adapt.save_adapter:
        save_adapter(model, name, revision, None, out / "adapter", include_head=False)
    if cfg.adapt.save_merged:
        merge_and_save(model, out / "merged", base_name_or_path=name, revision=revision)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out / "merged")
