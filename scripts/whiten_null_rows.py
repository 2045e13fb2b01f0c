"""The rows a subspace start misses on the benchmark ViT, and why: their top eigenvalue is the ~0 of the inputs'
null direction (issue 12).

For every site of the benchmark ViT (bench_vit_derivative.py, random init and data, seed 0; d <= 256): the smallest
singular value of the cached inputs Zh relative to the largest, the number of directions of M below the whitening
ridge, and every row whose top eigenvalue a solve started from the subspace Ritz vectors misses by more than 1e-4 of
the site's largest, with the dense float64 top two eigenvalues of that row (relative to the site's largest): for the
whitened blocks A_r, the batched Lanczos without the null-space check (iterated to 3e-5, reported at 1e-4); for the
plain blocks Q_r, the shipped ``init_rules.block_tops`` (tol 1e-4). One JSON line per site.

    python scripts/whiten_null_rows.py D TOKENS IMAGES BATCH_SIZE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vit_derivative import build_tokens  # noqa: E402

import topotransfer.derivative.topological as topo  # noqa: E402
import topotransfer.init_rules as ir  # noqa: E402
from topotransfer.eigen import block_top_eigenpairs_lanczos  # noqa: E402


def _missed(values: torch.Tensor, lam: torch.Tensor) -> list[dict]:
    scale = float(lam[:, -1].abs().max())
    err = (values - lam[:, -1]).abs() / scale
    return [{"row": r, "got": float(values[r]) / scale, "top2": [float(x) / scale for x in lam[r, -2:].flip(0)]}
            for r in (err > 1e-4).nonzero().flatten().tolist()]


def main(argv: list[str]) -> None:
    d, tokens, images, bs = map(int, argv[:4])
    torch.set_num_threads(1)
    model, data, loss_fn = build_tokens(d, images, bs, 0, tokens)
    sites, stats, _, _ = topo.compute_site_statistics(model, data, loss_fn, solver="matrix_free")
    for s in sites:
        st = stats[s.name]
        M = st.second_moment()
        L = ir._cholesky(M, 1e-6)
        ws = st.whitened(L)
        zh = torch.cat(st._z).double()
        sv = torch.linalg.svdvals(zh)
        eps = 1e-6 * float(torch.trace(M)) / M.shape[0]
        out = {"site": s.name, "sv_min_over_max": float(sv[-1] / sv[0]),
               "M_directions_below_ridge": int((torch.linalg.eigvalsh(M) < eps).sum())}
        for name, stat in (("whitened", ws), ("plain", st)):
            z, p = torch.cat(stat._z).double(), torch.cat(stat._p).double()
            lam = torch.linalg.eigvalsh(torch.einsum("nr,ni,nj->rij", p, z, z))
            if name == "whitened":
                tops = block_top_eigenpairs_lanczos(stat.matvec, stat.R, stat.D, tol=3e-5, report_tol=1e-4,
                                                    start=stat.subspace_starts(k=ir.START_SUBSPACE),
                                                    min_steps=ir.WARM_MIN_STEPS)
            else:
                tops = ir.block_tops(stat)
            out[f"{name}_missed"] = _missed(tops.values, lam)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
