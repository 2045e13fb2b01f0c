"""Start vectors for the whitened row-wise blocks: per-row accuracy and products of each variant (issue 12).

On the benchmark ViT of ``bench_vit_derivative.py`` (random init and data, seed 0), for every site: the whitened
blocks A_r = L^{-1} Q_r L^{-T} (``MatrixFreeStatistic.whitened``), solved by the batched Lanczos of
``block_top_eigenpairs_lanczos`` from each start variant, against dense float64 ``eigvalsh`` of A_r (d <= 256).

Variants ``KIND:ALPHA:MIN_STEPS[:TOL]`` (TOL: the solver's relative residual tolerance, default 1e-4):
    rand:0:M    seeded random starts (seed 0, the shipped whitened solve with M = 8)
    rs:S:M      seeded random starts of seed S
    sub:a:M     the whitened blocks' own subspace Ritz vectors (``subspace_starts``, k = 32) + a * a random unit vector
    map:a:M     the plain blocks' subspace Ritz vectors mapped through the whitening, y_r = L^T v_r (normalised),
                + a * a random unit vector
    ship:S:X    the shipped solve, ``init_rules.whitened_block_tops(stat, M, seed=S)`` (its own start, tolerance and
                null-space check; TOL is ignored) with ``WHITEN_START_MIX`` = X (``-``: the shipped value)

    python scripts/whiten_start_variants.py D TOKENS IMAGES BATCH_SIZE VARIANT[,VARIANT...]

prints one JSON line per variant: rows with abs(mu_r - ref) / max abs(ref) > 1e-4 and the largest such error (summed /
maximised over sites; d <= 256 only), products per site (min / mean / max) and the solve's CPU seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vit_derivative import build_tokens  # noqa: E402

import topotransfer.derivative.topological as topo  # noqa: E402
import topotransfer.init_rules as ir  # noqa: E402
from topotransfer.eigen import block_top_eigenpairs_lanczos  # noqa: E402


def main(argv: list[str]) -> None:
    d, tokens, images, bs = map(int, argv[:4])
    variants = argv[4].split(",")
    model, data, loss_fn = build_tokens(d, images, bs, 0, tokens)
    sites, stats, _, _ = topo.compute_site_statistics(model, data, loss_fn, solver="matrix_free")
    agg = {v: {"rows": 0, "max": 0.0, "work": [], "sec": 0.0} for v in variants}
    for s in sites:
        st = stats[s.name]
        L = ir._cholesky(st.second_moment(), 1e-6)
        ws = st.whitened(L)
        R, D = st.R, st.D
        mu = None
        if d <= 256:  # dense float64 reference: A_r = sum_n p_nr (L^{-1} zh_n)(L^{-1} zh_n)^T
            z, p = torch.cat(ws._z).double(), torch.cat(ws._p).double()
            mu = torch.linalg.eigvalsh(torch.einsum("nr,ni,nj->rij", p, z, z))[:, -1]
        sub = ws.subspace_starts(k=32)
        mapped = st.subspace_starts(k=32) @ L.to(torch.float64)  # row r: (L^T v_r)^T
        mapped = mapped / mapped.norm(dim=1, keepdim=True)
        for v in variants:
            kind, a, ms, *rest = v.split(":")
            tol = float(rest[0]) if rest else 1e-4
            t0 = time.process_time()
            if kind == "ship":
                shipped = ir.WHITEN_START_MIX
                ir.WHITEN_START_MIX = shipped if ms == "-" else float(ms)
                try:
                    tops = ir.whitened_block_tops(st, st.second_moment(), seed=int(a))
                finally:
                    ir.WHITEN_START_MIX = shipped
            elif kind in ("rand", "rs"):
                seed = 0 if kind == "rand" else int(a)
                tops = block_top_eigenpairs_lanczos(ws.matvec, R, D, min_steps=int(ms), seed=seed, tol=tol)
            else:
                base = {"sub": sub, "map": mapped}[kind]
                tops = block_top_eigenpairs_lanczos(ws.matvec, R, D, min_steps=int(ms), tol=tol, start=base,
                                                    start_mix=float(a))
            agg[v]["sec"] += time.process_time() - t0
            agg[v]["work"].append(tops.work)
            if mu is not None:
                err = (tops.values - mu).abs() / mu.abs().max()
                agg[v]["rows"] += int((err > 1e-4).sum())
                agg[v]["max"] = max(agg[v]["max"], float(err.max()))
    for v, a in agg.items():
        w = a["work"]
        print(json.dumps({"d": d, "tokens": tokens, "images": images, "variant": v,
                          "rows_over_1e-4": a["rows"] if d <= 256 else None,
                          "max_err_rel": a["max"] if d <= 256 else None, "sites": len(w), "work_min": min(w),
                          "work_mean": sum(w) / len(w), "work_max": max(w), "solve_cpu_s": a["sec"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
