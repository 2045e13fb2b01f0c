#!/usr/bin/env python
"""Cost of the realized-site search (``growth.realized_site``) against one forward pass of the held-out data.

The search line-searches eps along +theta and -theta at every candidate site (what ``grow_once`` does with
``site_selection="realized"``). Two ways, side by side in one process, on the same directions:

- ``per call``: every line search runs its own full forward pass to cache the state at its site, and one
  downstream pass per eps (what ``line_search_epsilon`` does outside a search);
- ``shared``: ``realized_site``'s way -- ``reuse_site_states`` caches the states at all candidate sites in one
  full forward pass (and checks the downstream path once per site); the eps passes are unchanged.

Both must give bit-identical losses (checked, printed). Models: the ResidualMLP of ``topotransfer grow``'s
defaults' size class and a 12-block ViT (d, 65 tokens per image), random weights and data.

Usage::

    python scripts/bench_realized_site.py [--vit-d 192] [--heldout 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import topotransfer.insertion as ins
from topotransfer.derivative.topological import topological_derivative
from topotransfer.insertion import evaluate_loss, line_search_epsilon


def mlp_problem(n: int, seed: int = 0):
    from topotransfer.models import ResidualMLP

    torch.manual_seed(seed)
    model = ResidualMLP(64, 128, 6, 10)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    return "ResidualMLP(64, 128, 6 blocks, 10)", model, [(x[i : i + 128], y[i : i + 128]) for i in range(0, n, 128)]


def vit_problem(d: int, n: int, seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=d, num_hidden_layers=12, num_attention_heads=max(1, d // 64), intermediate_size=4 * d,
                    image_size=32, patch_size=4, num_labels=10, attn_implementation="sdpa")
    model = ViTForImageClassification(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return f"ViT d={d}, 12 blocks, 65 tokens", model, [(x[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vit-d", type=int, default=192)
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    print("| model | held-out | sites | one forward [s] | per call [s] (x fwd) | shared [s] (x fwd) | speed-up | "
          "identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, model, heldout in (mlp_problem(args.heldout), vit_problem(args.vit_d, args.heldout)):
        results = topological_derivative(model, heldout[:1], loss_fn, solver="matrix_free")
        sites = sum(r.score > 0 for r in results)
        rows = {"fwd": [], "per": [], "shared": []}
        out = {}
        for _ in range(args.repeats):
            c0 = time.process_time()
            evaluate_loss(model, heldout, loss_fn)
            rows["fwd"].append(time.process_time() - c0)
            # per call: no shared states (what every line search of a search did before)
            c0 = time.process_time()
            out["per"] = [
                (line_search_epsilon(model, r.site, heldout, loss_fn, r.weight, r.bias).tried,
                 line_search_epsilon(model, r.site, heldout, loss_fn, -r.weight,
                                     None if r.bias is None else -r.bias).tried)
                for r in results if r.score > 0
            ]
            rows["per"].append(time.process_time() - c0)
            c0 = time.process_time()
            with ins.reuse_site_states([r.site for r in results if r.score > 0]):
                out["shared"] = [
                    (line_search_epsilon(model, r.site, heldout, loss_fn, r.weight, r.bias).tried,
                     line_search_epsilon(model, r.site, heldout, loss_fn, -r.weight,
                                         None if r.bias is None else -r.bias).tried)
                    for r in results if r.score > 0
                ]
            rows["shared"].append(time.process_time() - c0)
        med = {k: statistics.median(v) for k, v in rows.items()}
        same = out["per"] == out["shared"]
        print(f"| {name} | {args.heldout} | {sites} | {med['fwd']:.3f} | {med['per']:.2f} ({med['per'] / med['fwd']:.1f}) | "
              f"{med['shared']:.2f} ({med['shared'] / med['fwd']:.1f}) | {med['per'] / med['shared']:.2f}x | "
              f"{'bit-identical' if same else 'DIFFERENT'} |", flush=True)


if __name__ == "__main__":
    main()
