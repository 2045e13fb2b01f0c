"""Where the row-wise rules' time goes: cProfile of ``rowwise`` and ``rowwise_whiten`` (matrix-free) on the
benchmark ViT of bench_vit_derivative.py, next to one forward + backward over the same probe (CPU time).

    python scripts/profile_rowwise_whiten.py --d 768 --tokens 65 --images 32 --batch-size 16
    python scripts/profile_rowwise_whiten.py --parts --d 768 --tokens 65 --images 32 --batch-size 16

Prints each rule's CPU time in units of the forward + backward, then its cProfile (cumulative, the
topotransfer / linear-algebra entries): the statistics pass, the batched row-wise Lanczos, and for the whitened
rule the second moment, the Cholesky factor, the whitening of the cached rows and the top-1 solve for lambda_max.

``--parts``: the whitened rule's steps timed one by one (CPU seconds over the 13 sites, as fractions of the forward
+ backward; the same calls as ``init_rules.rowwise_site_results``): statistics pass, second moment, Cholesky,
whitening the cached rows, the whitened blocks' subspace starts, their batched Lanczos (split into the products
and the rest: recurrence, re-orthogonalisation, Ritz values), the null-space check, one product with all blocks
(for scale), the plain blocks' subspace starts and the top-1 solve for lambda_max; one JSON line.
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
    ap.add_argument("--parts", action="store_true", help="time the whitened rule's steps one by one")
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
    if args.parts:
        parts(model, data, loss_fn, fb, args)
        return
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


def parts(model, data, loss_fn, fb: float, args: argparse.Namespace) -> None:
    """The whitened rule's steps timed one by one (module docstring)."""
    import json

    import topotransfer.derivative.topological as topo
    from topotransfer.eigen import block_top_eigenpairs_lanczos

    t: dict[str, float] = {}

    def timed(key, f, *a, **k):
        c0 = time.process_time()
        out = f(*a, **k)
        t[key] = t.get(key, 0.0) + time.process_time() - c0
        return out

    sites, stats, _, _ = timed("stats", topo.compute_site_statistics, model, data, loss_fn, solver="matrix_free")
    ir, work, top1 = init_rules, [], []
    for s in sites:
        st = stats[s.name]
        M = timed("second_moment", st.second_moment)
        L = timed("cholesky", ir._cholesky, M, 1e-6)
        ws = timed("whiten_rows", st.whitened, L)
        start = timed("whitened_subspace", ir._starts, ws)
        inside = [0.0]

        def matvec(v, rows=None, _ws=ws):
            c0 = time.process_time()
            out = _ws.matvec(v, rows=rows)
            inside[0] += time.process_time() - c0
            return out

        tops = timed("whitened_lanczos", block_top_eigenpairs_lanczos, matvec, st.R, st.D,
                     tol=1e-4 * ir.WHITEN_WARM_TOL, start=start, start_mix=ir.WHITEN_START_MIX,
                     min_steps=ir.WARM_MIN_STEPS, report_tol=1e-4)
        t["whitened_lanczos_products"] = t.get("whitened_lanczos_products", 0.0) + inside[0]
        tops = timed("null_check", lambda: ir._null_space_check(ws, tops, ir._null_direction(M, L, 1e-6), 1e-4, 24,
                                                                 400))
        work.append(tops.work)
        timed("one_product", ws.matvec, torch.randn(st.R, st.D, 1, dtype=torch.float64))
        pstart = timed("plain_subspace", ir._starts, st)
        eig = timed("top1_lambda_max", topo.solve_site, st, num_eigenvalues=1, tol=1e-4, site=s.name, start=pstart,
                    first_checks=ir.WARM_FIRST_CHECKS)
        top1.append(eig.work)
    print(json.dumps({"d": args.d, "tokens": args.tokens, "images": args.images, "fb_cpu_s": fb,
                      "fraction_of_fb": {k: round(v / fb, 4) for k, v in t.items()},
                      "whitened_products_per_site": [round(w, 2) for w in work],
                      "top1_products_per_site": [round(w, 2) for w in top1]}))


if __name__ == "__main__":
    main()
