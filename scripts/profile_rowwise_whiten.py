"""Where the row-wise rules' time goes: cProfile of ``rowwise`` and ``rowwise_whiten`` (matrix-free) on the
benchmark ViT of bench_vit_derivative.py, next to one forward + backward over the same probe (CPU time).

    python scripts/profile_rowwise_whiten.py --d 768 --tokens 65 --images 32 --batch-size 16

Prints each rule's CPU time in units of the forward + backward, then its cProfile (cumulative, the
topotransfer / linear-algebra entries): the statistics pass, the batched row-wise Lanczos, and for the whitened
rule the second moment, the Cholesky factor, the whitening of the cached rows and the top-1 solve for lambda_max.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vit_derivative as bench  # noqa: E402

from topotransfer import init_rules  # noqa: E402
from topotransfer.config import ProbeConfig  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=65, choices=sorted(bench.TOKEN_SETUPS))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lines", type=int, default=30, help="profile entries printed per rule")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, data, loss_fn = bench.build_tokens(args.d, args.images, args.batch_size, 0, args.tokens)
    bench.forward_backward(model, data[:1], loss_fn)  # warm-up
    model.zero_grad(set_to_none=True)
    c0 = time.process_time()
    bench.forward_backward(model, data, loss_fn)
    fb = time.process_time() - c0
    model.zero_grad(set_to_none=True)
    print(f"d={args.d} tokens={args.tokens} images={args.images}: one forward + backward {fb:.2f} s CPU")
    for rule in ("rowwise", "rowwise_whiten"):
        prof = cProfile.Profile()
        c0 = time.process_time()
        prof.enable()
        init_rules.probe_site_results(model, data, loss_fn, ProbeConfig(solver="matrix_free", **bench.RULES[rule]))
        prof.disable()
        cpu = time.process_time() - c0
        print(f"== {rule}: {cpu:.2f} s CPU = {cpu / fb:.2f} x forward + backward")
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(
            r"topotransfer|linalg|addmm|matmul|solve", args.lines)
        print(out.getvalue())


if __name__ == "__main__":
    main()
