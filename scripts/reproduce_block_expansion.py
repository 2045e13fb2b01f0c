#!/usr/bin/env python
"""Block expansion on real text, offline: a small byte-level GPT-2 pretrained on the Python standard library's
sources, adapted to documentation text; held-out target perplexity and source forgetting per method.

    nice -n 10 python scripts/reproduce_block_expansion.py --seeds 100 101 102 --out-dir docs/results/block_expansion
    python scripts/reproduce_block_expansion.py --report docs/results/block_expansion   # prints block_expansion.md
    python scripts/reproduce_block_expansion.py --quick --out-dir /tmp/be                 # a tiny end-to-end run

Corpora (nothing downloaded; both read in sorted path order, tokenised with
:class:`topotransfer.lm_data.ByteTokenizer`, cut into blocks of ``--seq-len`` bytes):

- source: every ``*.py`` file directly under the running Python's standard library directory
  (``sysconfig.get_paths()["stdlib"]``), first ``--source-tokens`` bytes; 95 % pretraining, 5 % held out
  (the forgetting set);
- target: every ``.md`` / ``.rst`` / ``.txt`` file under ``--target`` (default ``/usr/share/doc``), first
  ``--target-tokens`` bytes; one fixed split (seed 0) into train 80 % / probe 5 % / test 15 %.

The base model (one, pretrained with seed 0, cached under ``--work``) is adapted per seed and method with the
same optimizer, steps and learning rate; only the new parameters train (the backbone is checked bit-identical):

- ``topo_expand``: B copied blocks (LLaMA-Pro init, output projections zero) at the B sites of largest
  first-order derivative ||D_t|| (:func:`topotransfer.expansion.copy_site_scores` on the probe split);
- ``uniform``: LLaMA-Pro's interleave (one copy after every T/B blocks); ``on_top``: B copies after the last block;
- ``lora``: peft LoRA on ``c_attn``, ``c_proj``, ``c_fc`` with the largest rank whose parameters do not exceed
  the B copies' (:func:`topotransfer.expansion.lora_rank_matching`);
- ``topo_layer``: B TopoLayers at the B sites of largest TD (rule top1), eps by line search on the probe split
  (first local minimum, as ``topotransfer adapt``).

The seed draws the training order, the probe batches and LoRA's initial A. Writes one JSON per seed to
``--out-dir`` (``seed_<s>.json``: perplexities, chosen sites, trainable parameters, times) and, from all
JSONs there, ``block_expansion.md`` next to the directory (``--report DIR`` only prints it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

from topotransfer.lm_data import ByteTokenizer, lm_batches, read_corpus, split_blocks, tokenize_corpus
from topotransfer.losses import CausalLMLoss

METHODS = ["topo_expand", "uniform", "on_top", "lora", "topo_layer"]
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]
FULL = dict(width=128, layers=4, heads=4, seq_len=64, batch_size=16, pretrain_steps=600, pretrain_lr=3e-3,
            steps=120, lr=1e-3, budget=2, source_tokens=1_000_000, target_tokens=400_000, probe_batches=2,
            eval_blocks=128)
QUICK = dict(width=32, layers=2, heads=2, seq_len=32, batch_size=8, pretrain_steps=30, pretrain_lr=3e-3,
             steps=10, lr=1e-3, budget=1, source_tokens=60_000, target_tokens=30_000, probe_batches=1,
             eval_blocks=32)


# ---------------------------------------------------------------------------------------------- data
def load_corpora(args) -> dict:
    """Source train / held-out and target train / probe / test blocks, with file counts and a digest."""
    tok = ByteTokenizer()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src_docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    tgt_docs = read_corpus(args.target, suffixes=(".md", ".rst", ".txt"))
    src = tokenize_corpus(src_docs, tok, args.seq_len, max_tokens=args.source_tokens)
    tgt = tokenize_corpus(tgt_docs, tok, args.seq_len, max_tokens=args.target_tokens)
    src_train, src_test = split_blocks(src, [0.95, 0.05], seed=0)
    tgt_train, tgt_probe, tgt_test = split_blocks(tgt, [0.80, 0.05, 0.15], seed=0)
    digest = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]  # noqa: E731
    return {
        "source_train": src_train, "source_test": src_test[: args.eval_blocks],
        "target_train": tgt_train, "target_probe": tgt_probe, "target_test": tgt_test[: args.eval_blocks],
        "info": {"source": f"{stdlib}/*.py", "source_files": len(src_docs), "source_tokens": int(src.numel()),
                 "target": str(args.target), "target_files": len(tgt_docs), "target_tokens": int(tgt.numel()),
                 "source_digest": digest(src), "target_digest": digest(tgt),
                 "blocks": {k: int(v.shape[0]) for k, v in (("source_train", src_train), ("source_test", src_test),
                                                            ("target_train", tgt_train), ("target_probe", tgt_probe),
                                                            ("target_test", tgt_test))}},
    }


# ---------------------------------------------------------------------------------------------- training
def logits(model, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of ``blocks``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    loss = CausalLMLoss()
    for b in lm_batches(blocks, batch_size):
        total += float(loss(logits(model, b), b["labels"]))
        count += int((b["labels"][:, 1:] != -100).sum())
    model.train(was)
    return math.exp(total / count)


def train(model, params: list, blocks: torch.Tensor, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """Adam on the mean next-token loss for ``steps`` batches (reshuffled per pass, seeded); cosine decay.
    Returns the wall seconds."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    loss_fn = CausalLMLoss()
    model.train()
    start, step, epoch = time.perf_counter(), 0, 0
    while step < steps:
        for b in lm_batches(blocks, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            if step >= steps:
                break
            loss = loss_fn(logits(model, b), b["labels"]) / int((b["labels"][:, 1:] != -100).sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        epoch += 1
    model.eval()
    return time.perf_counter() - start


def pretrain(args, data: dict):
    """The base model: GPT-2 of ``--width`` x ``--layers`` on the source, seed 0; cached under ``--work``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    key = hashlib.sha256(json.dumps([args.width, args.layers, args.heads, args.seq_len, args.batch_size,
                                     args.pretrain_steps, args.pretrain_lr, data["info"]["source_digest"]]).encode())
    path = Path(args.work) / f"base_{key.hexdigest()[:12]}"
    if (path / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(path).eval(), path, json.loads((path / "pretrain.json").read_text())
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=ByteTokenizer.vocab_size, n_positions=args.seq_len, n_embd=args.width,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=ByteTokenizer.eos_token_id, eos_token_id=ByteTokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    seconds = train(model, list(model.parameters()), data["source_train"], args.pretrain_steps, args.pretrain_lr,
                    args.batch_size, seed=0)
    info = {"params": sum(p.numel() for p in model.parameters()), "steps": args.pretrain_steps,
            "tokens_seen": args.pretrain_steps * args.batch_size * args.seq_len, "wall_s": seconds}
    model.save_pretrained(path)
    (path / "pretrain.json").write_text(json.dumps(info))
    return model, path, info


# ---------------------------------------------------------------------------------------------- methods
def fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def adapt(method: str, base_path: Path, data: dict, args, seed: int) -> dict:
    """One method on one seed: insert / wrap, train the new parameters, perplexities."""
    from transformers import GPT2LMHeadModel

    from topotransfer.expansion import (choose_sites, copies_parameter_count, copy_site_scores, expand,
                                        freeze_all_but_copies, lora_rank_matching, on_top_sites,
                                        uniform_interleave_sites)

    torch.manual_seed(seed)
    model = GPT2LMHeadModel.from_pretrained(base_path).eval()
    before = fingerprint(model)
    loss_sum = CausalLMLoss()
    g = torch.Generator().manual_seed(seed)
    probe_idx = torch.randperm(data["target_train"].shape[0], generator=g)[: args.probe_batches * args.batch_size]
    probe = lm_batches(data["target_train"][probe_idx], args.batch_size)
    heldout = lm_batches(data["target_probe"][: 4 * args.batch_size], args.batch_size)
    record: dict = {"method": method}
    t0 = time.perf_counter()
    copy_budget = copies_parameter_count(model, uniform_interleave_sites(model, args.budget))
    if method in ("topo_expand", "uniform", "on_top"):
        if method == "topo_expand":
            scores = copy_site_scores(model, probe, loss_sum)
            record["scores"] = {s.site: s.score for s in scores}
            sites = [s.site for s in choose_sites(scores, args.budget)]
        else:
            sites = (uniform_interleave_sites if method == "uniform" else on_top_sites)(model, args.budget)
        record["sites"] = sites
        record["new_blocks"] = expand(model, sites)
        params = freeze_all_but_copies(model)
        base_params = [p for n, p in model.named_parameters() if not p.requires_grad]
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank_matching(model, copy_budget, LORA_TARGETS)
        record["rank"] = rank
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                                 fan_in_fan_out=True, lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
    elif method == "topo_layer":
        from topotransfer import insert_layer, topological_derivative
        from topotransfer.insertion import line_search_epsilon
        from topotransfer.recipes.adapt import first_local_minimum_epsilon

        from topotransfer.surgery import get_family

        family = get_family(model)
        results = topological_derivative(model, probe, loss_sum, rule="top1", forward_fn=logits_fn)
        record["scores"] = {r.site: r.score for r in results}
        best = sorted(sorted(results, key=lambda r: -r.score)[: args.budget], key=lambda r: family.site(model, r.site).index)
        eps = []
        for r in best:  # each searched on the base model, the others absent
            ls = line_search_epsilon(model, r.site, heldout, loss_sum, r.weight, r.bias)
            eps.append(first_local_minimum_epsilon(ls.tried) or min(e for e, _ in ls.tried if e > 0))
        record["sites"], record["epsilons"] = [r.site for r in best], eps
        for r, e in reversed(list(zip(best, eps))):  # deepest first: the shallower names keep their place
            insert_layer(model, r.site, r.weight, r.bias, epsilon=e)
        for p in model.parameters():
            p.requires_grad_(False)
        params = [p for _, layer in family.inserted(model) for p in layer.parameters()]
        for p in params:
            p.requires_grad_(True)
    else:
        raise ValueError(f"unknown method {method!r}")
    record["placement_s"] = time.perf_counter() - t0
    record["trainable_params"] = sum(p.numel() for p in params)
    record["copy_budget_params"] = copy_budget
    record["train_s"] = train(model, params, data["target_train"], args.steps, args.lr, args.batch_size, seed)
    record["target_ppl"] = perplexity(model, data["target_test"], args.batch_size)
    record["source_ppl"] = perplexity(model, data["source_test"], args.batch_size)
    if method == "lora":
        model = model.get_base_model()
        # the LoRA layers wrap the frozen weights; the base weights themselves must be untouched
        base = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
        h = hashlib.sha256()
        for name, p in sorted(base.items()):
            h.update(name.encode())
            h.update(p.detach().contiguous().numpy().tobytes())
        record["backbone_unchanged"] = h.hexdigest() == before
    elif method in ("topo_expand", "uniform", "on_top"):
        record["backbone_unchanged"] = all(not p.requires_grad for p in base_params) and _original_unchanged(
            model, base_path)
    else:
        record["backbone_unchanged"] = _original_unchanged(model, base_path)
    return record


def logits_fn(model, inputs):
    out = model(**inputs, use_cache=False) if isinstance(inputs, dict) else model(inputs, use_cache=False)
    return out.logits


def _original_unchanged(model, base_path: Path) -> bool:
    """Every parameter of the base checkpoint is bit-identical in the adapted model (inserted blocks shift
    names: matched through the family's own record of which blocks are original)."""
    from transformers import GPT2LMHeadModel

    from topotransfer.surgery import get_family
    from topotransfer.surgery.decoder import CopiedBlock

    family = get_family(model)
    base = GPT2LMHeadModel.from_pretrained(base_path)
    originals = [b for b in model.transformer.h if not isinstance(b, CopiedBlock) and family.unwrap(b) is None]
    pairs = list(zip(base.transformer.h, originals))
    ok = len(originals) == len(base.transformer.h)
    for b0, b1 in pairs:
        p0 = dict(b0.named_parameters())
        for n, p in b1.named_parameters():
            if n.startswith("topo_mid."):
                continue
            ok &= torch.equal(p0[n], p)
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"):
        ok &= torch.equal(base.get_parameter(name), model.get_parameter(name))
    return bool(ok)


def timing(base_path: Path, data: dict, args, repeats: int = 3) -> dict:
    """Wall and CPU seconds (median of ``repeats``) of one forward + backward of the probe, of
    copy_site_scores and of the TopoLayer derivative (top1), all sites, on the base model."""
    from transformers import GPT2LMHeadModel

    from topotransfer import topological_derivative
    from topotransfer.expansion import copy_site_scores

    model = GPT2LMHeadModel.from_pretrained(base_path).eval()
    probe = lm_batches(data["target_train"][: args.probe_batches * args.batch_size], args.batch_size)
    loss = CausalLMLoss()

    def fb():
        for b in probe:
            loss(logits(model, b), b["labels"]).backward()
        model.zero_grad(set_to_none=True)

    out = {"repeats": repeats}
    for name, fn in (("forward_backward", fb), ("copy_site_scores", lambda: copy_site_scores(model, probe, loss)),
                     ("topological_derivative", lambda: topological_derivative(model, probe, loss, rule="top1",
                                                                               forward_fn=logits_fn))):
        walls, cpus = [], []
        for _ in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        out[name] = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}
    return out


# ---------------------------------------------------------------------------------------------- report
def report(directory: Path) -> str:
    """block_expansion.md from every ``seed_*.json`` in ``directory``."""
    runs = [json.loads(p.read_text()) for p in sorted(directory.glob("seed_*.json"))]
    if not runs:
        raise SystemExit(f"no seed_*.json in {directory}")
    first = runs[0]
    cfg, info = first["config"], first["data"]
    seeds = [r["seed"] for r in runs]
    lines = [
        "# Block expansion on real text (GPT-2, byte level): target perplexity and source forgetting",
        "",
        f"Printed by `python scripts/reproduce_block_expansion.py --report {directory}` from the per-seed JSONs "
        f"written by `{first['command']}` (`nice -n 10`, 1 thread, {first['machine']}).",
        "",
        f"Base model: GPT-2, {first['pretrain']['params']:,} parameters (width {cfg['width']}, {cfg['layers']} blocks, "
        f"{cfg['heads']} heads, ByteTokenizer vocab 257, context {cfg['seq_len']}), pretrained once (seed 0) for "
        f"{cfg['pretrain_steps']} steps x {cfg['batch_size']} x {cfg['seq_len']} bytes "
        f"({first['pretrain']['tokens_seen']:,} tokens) on the source: {info['source']} "
        f"({info['source_files']} files, first {info['source_tokens']:,} bytes). Target: {info['target']} "
        f"(.md/.rst/.txt, {info['target_files']} files, first {info['target_tokens']:,} bytes; blocks "
        f"{info['blocks']}). Perplexities per byte on {cfg['eval_blocks']} held-out blocks of each corpus.",
        "",
        f"Adaptation: budget B = {cfg['budget']} new blocks; every method trains only its new parameters, "
        f"Adam lr {cfg['lr']} (cosine), {cfg['steps']} steps of {cfg['batch_size']} blocks; the derivative uses "
        f"{cfg['probe_batches']} probe batches drawn from the target train split by the seed. "
        f"Seeds {seeds}.",
        "",
        "| method | trainable params | target ppl (mean +- sd) | source ppl | forgetting (source ppl - base) | backbone unchanged |",
        "|---|---:|---:|---:|---:|---|",
    ]
    base_t = statistics.mean(r["base"]["target_ppl"] for r in runs)
    base_s = statistics.mean(r["base"]["source_ppl"] for r in runs)
    lines.append(f"| base (no adaptation) | 0 | {base_t:.3f} | {base_s:.3f} | 0 | yes |")

    def ms(xs):
        return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    for m in cfg["methods"]:
        rs = [r["methods"][m] for r in runs if m in r["methods"]]
        if not rs:
            continue
        t = [x["target_ppl"] for x in rs]
        s = [x["source_ppl"] for x in rs]
        f = [x["source_ppl"] - r["base"]["source_ppl"] for x, r in zip(rs, runs)]
        tp = sorted({x["trainable_params"] for x in rs})
        lines.append(f"| {m} | {', '.join(f'{v:,}' for v in tp)} | {ms(t)} | {ms(s)} | {ms(f)} | "
                     f"{'yes' if all(x['backbone_unchanged'] for x in rs) else 'NO'} |")
    lines += ["", "Per seed (target ppl / source ppl):", "", "| seed | " + " | ".join(cfg["methods"]) + " |",
              "|---|" + "---:|" * len(cfg["methods"])]
    for r in runs:
        cells = [f"{r['methods'][m]['target_ppl']:.3f} / {r['methods'][m]['source_ppl']:.3f}" if m in r["methods"]
                 else "-" for m in cfg["methods"]]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "Positions chosen per seed (sites are named in the base model; `transformer.drop` is the stem, "
              "`transformer.h.<i>` the output of block i; LLaMA-Pro uniform and on-top are fixed):", "",
              "| seed | topo_expand sites (copies at) | ||D_t|| per site | topo_layer sites (eps) |", "|---|---|---|---|"]
    for r in runs:
        te, tl = r["methods"].get("topo_expand", {}), r["methods"].get("topo_layer", {})
        sc = ", ".join(f"{k.split('.')[-1]}: {v:.3g}" for k, v in te.get("scores", {}).items())
        tls = ", ".join(f"{s} ({e:g})" for s, e in zip(tl.get("sites", []), tl.get("epsilons", [])))
        lines.append(f"| {r['seed']} | {', '.join(te.get('sites', []))} ({te.get('new_blocks')}) | {sc} | {tls} |")
    if "lora" in cfg["methods"]:
        lines += ["", f"LoRA ranks per seed: {[r['methods']['lora'].get('rank') for r in runs if 'lora' in r['methods']]} "
                  f"on {LORA_TARGETS} (fan_in_fan_out), alpha = rank, at most the {first['methods'].get('lora', {}).get('copy_budget_params', 0):,} "
                  "parameters of B copied blocks."]
    tm = dict(first["timing"])
    fb = tm["forward_backward"]
    lines += ["", f"Cost at the benchmark's width (seed {first['seed']}, {cfg['probe_batches']} probe batches of "
              f"{cfg['batch_size']} x {cfg['seq_len']} tokens, median of {tm.pop('repeats', 3)}, 1 thread on a shared, loaded machine: "
              "wall times are noisy, CPU times beside them):", "",
              "| computation | wall s | CPU s | wall / t_fb | CPU / t_fb |", "|---|---:|---:|---:|---:|"]
    for name, v in tm.items():
        lines.append(f"| {name} | {v['wall_s']:.3f} | {v['cpu_s']:.3f} | {v['wall_s'] / fb['wall_s']:.2f} | "
                     f"{v['cpu_s'] / fb['cpu_s']:.2f} |")
    total = sum(r["wall_s"] for r in runs)
    lines += ["", f"Wall time: pretraining {first['pretrain']['wall_s']:.0f} s (once), adaptation of all methods "
              f"{total:.0f} s over {len(runs)} seeds."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> str | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--out-dir", type=Path, default=None, help="where seed_<s>.json go (block_expansion.md beside)")
    ap.add_argument("--work", type=Path, default=Path("/work/runs/lm/block_expansion"), help="base model cache")
    ap.add_argument("--target", type=Path, default=Path("/usr/share/doc"))
    ap.add_argument("--quick", action="store_true", help="tiny model and budgets (the test's end-to-end run)")
    ap.add_argument("--report", type=Path, default=None, help="only print the report of the JSONs in this directory")
    for k, v in FULL.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None)
    args = ap.parse_args(argv)
    if args.report is not None:
        text = report(args.report)
        print(text, end="")
        return text
    if args.out_dir is None:
        ap.error("--out-dir is required (or --report DIR)")
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(1)
    command = "python scripts/reproduce_block_expansion.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    data = load_corpora(args)
    base_model, base_path, pre = pretrain(args, data)
    base = {"target_ppl": perplexity(base_model, data["target_test"], args.batch_size),
            "source_ppl": perplexity(base_model, data["source_test"], args.batch_size)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {k: getattr(args, k) for k in FULL} | {"methods": args.methods, "quick": args.quick}
    for seed in args.seeds:
        start = time.perf_counter()
        result = {"seed": seed, "command": command.strip(), "config": cfg, "data": data["info"], "pretrain": pre,
                  "base": base, "methods": {},
                  "machine": f"{platform.machine()}, torch {torch.__version__}, {os.cpu_count()} cores"}
        result["timing"] = timing(base_path, data, args, repeats=1 if args.quick else 3)
        for m in args.methods:
            result["methods"][m] = adapt(m, base_path, data, args, seed)
            print(f"seed {seed} {m}: target ppl {result['methods'][m]['target_ppl']:.3f}, source ppl "
                  f"{result['methods'][m]['source_ppl']:.3f}, sites {result['methods'][m].get('sites')}", flush=True)
        result["wall_s"] = time.perf_counter() - start
        (args.out_dir / f"seed_{seed}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    text = report(args.out_dir)
    (args.out_dir.parent / f"{args.out_dir.name}.md").write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
