#!/usr/bin/env python
"""Cost of the derivatives on a decoder LM, as ratios to one forward + backward pass of the probe.

On a random-weight ``GPT2LMHeadModel`` (float32, width ``--width``, ``--layers`` blocks) and random token
batches (``--batches`` x ``--batch-size`` sequences of ``--seq-len`` tokens, the last quarter of each
sequence padding), with the summed next-token loss :class:`topotransfer.losses.CausalLMLoss`:

- ``t_fb``: one forward + backward pass (``loss.backward()``) over the probe batches;
- ``copy_site_scores``: the first-order derivative of a copied block at every site (block expansion);
- ``topological_derivative``: the TopoLayer derivative at every site (rule top1, solver auto).

Each is timed ``--repeats`` times (median), as wall time and as process CPU time, in one process with one
torch thread. Prints a markdown table; ``--out FILE`` also writes it (with the command) to FILE.

Usage::

    OMP_NUM_THREADS=1 python scripts/bench_expansion.py [--width 256] [--layers 6] [--vocab 4096]
        [--seq-len 128] [--batch-size 8] [--batches 2] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of ``fn()`` over ``repeats`` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    from transformers import GPT2Config, GPT2LMHeadModel

    from topotransfer import topological_derivative
    from topotransfer.expansion import copy_site_scores
    from topotransfer.losses import CausalLMLoss, causal_lm_labels

    config = GPT2Config(vocab_size=args.vocab, n_embd=args.width, n_layer=args.layers, n_head=args.heads,
                        n_positions=args.seq_len, attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(args.batches):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[:, args.seq_len - args.seq_len // 4 :] = 0
        data.append({"input_ids": ids, "attention_mask": mask, "labels": causal_lm_labels(ids, mask)})
    loss_fn = CausalLMLoss()

    def forward_backward() -> None:
        for b in data:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            loss_fn(out, b["labels"]).backward()
        model.zero_grad(set_to_none=True)

    rows = [("one forward + backward (t_fb)", *timed(forward_backward, args.repeats))]
    rows.append(("copy_site_scores (copied block, all sites)",
                 *timed(lambda: copy_site_scores(model, data, loss_fn), args.repeats)))
    rows.append(("topological_derivative (TopoLayer, all sites, top1)",
                 *timed(lambda: topological_derivative(model, data, loss_fn, rule="top1"), args.repeats)))
    t_fb_wall, t_fb_cpu = rows[0][1], rows[0][2]
    command = "OMP_NUM_THREADS=1 python scripts/bench_expansion.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        f"Command: `{command.strip()}`",
        "",
        f"GPT-2, {n_params / 1e6:.2f} M parameters (width {args.width}, {args.layers} blocks, vocab {args.vocab}), "
        f"probe {args.batches} x {args.batch_size} sequences x {args.seq_len} tokens (a quarter padding), float32, "
        f"1 thread, median of {args.repeats}.",
        "",
        "| computation | wall s | CPU s | wall / t_fb | CPU / t_fb |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, wall, cpu in rows:
        lines.append(f"| {name} | {wall:.3f} | {cpu:.3f} | {wall / t_fb_wall:.2f} | {cpu / t_fb_cpu:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
