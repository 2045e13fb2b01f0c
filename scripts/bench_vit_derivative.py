#!/usr/bin/env python
"""Benchmark the topological derivative of a ViT at ViT-Base width against one forward + backward pass.

Model: ``ViTForImageClassification(ViTConfig(hidden_size=d, num_hidden_layers=12, num_attention_heads=d/64,
intermediate_size=4d, image_size=32, patch_size=4, num_labels=10))`` in float32 (65 tokens per image,
13 sites), random initialisation, random images and labels, summed cross-entropy, probe batches of
``--batch-size`` images. For every width d and probe size (images):

- ``t_fb``: one forward + backward (``loss.backward()``, weight gradients included) over the probe data;
- the derivative over all 13 sites with ``topotransfer.topological_derivative`` (rule "cluster"), split
  into capture + statistics and eigen-solve, as ratios to ``t_fb`` measured *in the same process, side
  by side* (fb, derivative, fb, derivative, ...; the ratio is the median of the per-pair ratios);
- peak extra memory (fresh process per measurement, peak RSS counter reset right before it): of the
  forward + backward alone ("the probe's activation memory": activations + weight gradients) and of the
  derivative alone;
- ``lambda_max`` agreement between the matrix-free solver and blockwise dense ``eigh`` (``DenseStatistic``,
  where all 13 sites' d x (d+1)^2 blocks fit; at d = 768 a chunked blockwise reference on a few sites);
- a straightforward dense baseline implemented here: assemble one site's full Q of size (d(d+1))^2 and
  ``eigh`` it, timed at small d, fitted and extrapolated (O(d^6) time, O(d^4) memory).

Variants: ``mf`` (matrix-free, float32 cache), ``mf_bf16`` (bfloat16 cache), ``mf_sub`` (``sample_fraction``
rows per batch), ``dense`` (``solver="dense"``), ``ref`` (chunked blockwise dense reference).

Usage::

    python scripts/bench_vit_derivative.py [--widths 192 384 768] [--images 64 128 256 512]
        [--variants-at 768:512] [--dense-at 192:64 384:64] [--ref-at 768:64] [--ref-sites SITE ...]
        [--fullq-widths 16 32 48 64] [--mem fresh|inline] [--resume] [--log results.jsonl]
        [--out docs/results/performance.md]
    python scripts/bench_derivative.py vit ...   # the same, through the common benchmark entry point
    python scripts/bench_vit_derivative.py --report-only --log results.jsonl --out ...   # rebuild the report

    python scripts/bench_vit_derivative.py rules [--at D:TOKENS:IMAGES ...] [--agree-at D:TOKENS:IMAGES ...]
        # every rule a shipped config uses (cluster, rowwise, whitened rowwise) vs one forward + backward,
        # 65 or 197 tokens per image, and row-wise agreement with a dense float64 reference
    python scripts/bench_vit_derivative.py switch   # densify + eigh vs batched Lanczos (DENSE_MAX_DIM)

Every measurement runs in a child process (``--child JSON``) that prints one ``RESULT {...}`` line;
the parent appends it to ``--log`` (so an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

MB = 1e6
NUM_CLASSES = 10
IMAGE, PATCH, DEPTH = 32, 4, 12
TOKENS = (IMAGE // PATCH) ** 2 + 1  # 65


# ---------------------------------------------------------------------------------------------------
# memory (Linux)
# ---------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_rss() -> int:
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------------------
# child
# ---------------------------------------------------------------------------------------------------
def build(d: int, images: int, batch_size: int, seed: int):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=d, num_hidden_layers=DEPTH, num_attention_heads=max(1, d // 64),
                    intermediate_size=4 * d, image_size=IMAGE, patch_size=PATCH, num_labels=NUM_CLASSES,
                    attn_implementation="sdpa")
    model = ViTForImageClassification(cfg).float()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(images, 3, IMAGE, IMAGE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (images,), generator=g)
    data = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, images, batch_size)]
    return model, data, torch.nn.CrossEntropyLoss(reduction="sum")


def forward_backward(model, data, loss_fn) -> None:
    for xb, yb in data:
        loss_fn(model(xb).logits, yb).backward()


def derivative_kwargs(variant: str, args: argparse.Namespace) -> dict:
    import torch

    kw: dict = {"rule": "cluster"}
    if variant == "dense":
        kw["solver"] = "dense"
    else:
        kw["solver"] = "matrix_free"
    if variant == "mf_bf16":
        kw["cache_dtype"] = torch.bfloat16
    if variant == "mf_sub":
        kw["sample_fraction"] = args.sample_fraction
    return kw


def timed_derivative(model, data, loss_fn, kw: dict) -> tuple[list, dict]:
    """topological_derivative with its two phases timed (module globals wrapped for the call)."""
    import topotransfer
    import topotransfer.derivative.topological as topo

    phase = {"stats": 0.0, "solve": 0.0, "site_solve": [], "iters": [], "work": [], "converged": []}
    orig_stats, orig_solve = topo.compute_site_statistics, topo.solve_site

    def stats(*a, **k):
        t0 = time.perf_counter()
        r = orig_stats(*a, **k)
        phase["stats"] += time.perf_counter() - t0
        return r

    def solve(*a, **k):
        t0 = time.perf_counter()
        r = orig_solve(*a, **k)
        dt = time.perf_counter() - t0
        phase["solve"] += dt
        phase["site_solve"].append(dt)
        phase["iters"].append(int(r.iterations))
        phase["work"].append(float(getattr(r, "work", r.iterations)))
        phase["converged"].append(bool(r.converged))
        return r

    topo.compute_site_statistics, topo.solve_site = stats, solve
    try:
        results = topotransfer.topological_derivative(model, data, loss_fn, **kw)
    finally:
        topo.compute_site_statistics, topo.solve_site = orig_stats, orig_solve
    return results, phase


def child_time(spec: dict, args: argparse.Namespace) -> dict:
    """fb and derivative alternately in one process; ratios per pair."""
    import torch

    model, data, loss_fn = build(spec["d"], spec["images"], args.batch_size, args.seed)
    kw = derivative_kwargs(spec["variant"], args)
    forward_backward(model, data[:1], loss_fn)  # warm-up (one batch)
    model.zero_grad(set_to_none=True)
    pairs = []
    t_start = time.perf_counter()
    results = phase = None
    mem: dict = {}
    for rep in range(args.repeats):
        # Inline high-water marks (logged, not reported): memory the fb pass freed is reused by the derivative
        # without raising the mark, so they understate it; the report uses the fresh-process jobs only.
        if rep == 0:
            gc.collect()
            base, mem["reset"] = current_rss(), reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        forward_backward(model, data, loss_fn)
        t_fb, c_fb = time.perf_counter() - t0, time.process_time() - c0
        if rep == 0:
            mem["peak_fb_mb"] = (peak_rss() - base) / MB
        model.zero_grad(set_to_none=True)
        gc.collect()
        if rep == 0:
            base = current_rss()
            reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        results, phase = timed_derivative(model, data, loss_fn, kw)
        t_d, c_d = time.perf_counter() - t0, time.process_time() - c0
        if rep == 0:
            mem["peak_deriv_mb"] = (peak_rss() - base) / MB
        pairs.append({"t_fb": t_fb, "cpu_fb": c_fb, "t_deriv": t_d, "cpu_deriv": c_d, **{
            k: (list(v) if isinstance(v, list) else v) for k, v in phase.items()}})
        print(f"    d={spec['d']} images={spec['images']} {spec['variant']} rep {rep + 1}: fb {t_fb:.2f} s, "
              f"derivative {t_d:.2f} s (stats {phase['stats']:.2f} + solve {phase['solve']:.2f}), "
              f"ratio {t_d / t_fb:.2f}", file=sys.stderr, flush=True)
        min_reps = 1 if spec["variant"] == "dense" else 2  # dense at d = 384 takes minutes per run
        if time.perf_counter() - t_start > args.repeat_cap and rep + 1 >= min_reps:
            break
    med = lambda key: statistics.median(p[key] for p in pairs)  # noqa: E731
    return {
        **spec, "kind": "time", "threads": torch.get_num_threads(), "reps": len(pairs), "pairs": pairs,
        "t_fb": med("t_fb"), "t_deriv": med("t_deriv"),
        "ratio": statistics.median(p["t_deriv"] / p["t_fb"] for p in pairs),
        "ratio_stats": statistics.median(p["stats"] / p["t_fb"] for p in pairs),
        "ratio_solve": statistics.median(p["solve"] / p["t_fb"] for p in pairs),
        "cpu_ratio": statistics.median(p["cpu_deriv"] / p["cpu_fb"] for p in pairs),
        "lambda_max": [float(r.score) for r in results], "sites": [r.site for r in results],
        "k": [int(r.k) for r in results], "num_samples": [int(r.num_samples) for r in results],
        "load": os.getloadavg()[0], **mem,
    }


def child_mem(spec: dict, args: argparse.Namespace) -> dict:
    """Peak extra RSS of one forward + backward, or of one derivative, in a fresh process."""
    model, data, loss_fn = build(spec["d"], spec["images"], args.batch_size, args.seed)
    kw = derivative_kwargs(spec["variant"], args)
    gc.collect()
    base = current_rss()
    ok = reset_peak()
    t0 = time.perf_counter()
    if spec["what"] == "fb":
        forward_backward(model, data, loss_fn)
    else:
        timed_derivative(model, data, loss_fn, kw)
    dt = time.perf_counter() - t0
    return {**spec, "kind": "mem", "peak_extra_mb": (peak_rss() - base) / MB, "reset": ok, "seconds": dt,
            "base_mb": base / MB}


def blockwise_lambda_max(stat, chunk: int = 64) -> float:
    """Exact lambda_max of a matrix-free statistic: dense blocks built chunk by chunk in float64, eigvalsh."""
    import torch

    z = torch.cat(stat._z).double()
    p = torch.cat(stat._p).double()
    best = -math.inf
    for r0 in range(0, stat.R, chunk):
        Q = torch.einsum("nr,ni,nj->rij", p[:, r0 : r0 + chunk], z, z)
        best = max(best, float(torch.linalg.eigvalsh(Q)[:, -1].max()))
    return best


def child_ref(spec: dict, args: argparse.Namespace) -> dict:
    """Chunked blockwise dense lambda_max at a few sites (for widths where DenseStatistic does not fit)."""
    import topotransfer.derivative.topological as topo

    model, data, loss_fn = build(spec["d"], spec["images"], args.batch_size, args.seed)
    sites, stats, _, _ = topo.compute_site_statistics(model, data, loss_fn, sites=spec["sites"], solver="matrix_free")
    out = {}
    for s in sites:
        t0 = time.perf_counter()
        out[s.name] = (blockwise_lambda_max(stats[s.name]), time.perf_counter() - t0)
        print(f"    ref {s.name}: {out[s.name][0]:.8g} ({out[s.name][1]:.0f} s)", file=sys.stderr, flush=True)
    return {**spec, "kind": "ref", "lambda_max": {k: v[0] for k, v in out.items()},
            "seconds": {k: v[1] for k, v in out.items()}}


def child_fullq(spec: dict, args: argparse.Namespace) -> dict:
    """Straightforward dense baseline at one site: the full (d(d+1))^2 matrix Q, then eigh."""
    import torch

    import topotransfer.derivative.topological as topo

    model, data, loss_fn = build(spec["d"], spec["images"], args.batch_size, args.seed)
    site = topo.get_family(model).sites(model)[DEPTH // 2]
    _, stats, _, _ = topo.compute_site_statistics(model, data, loss_fn, sites=[site.name], solver="matrix_free")
    st = stats[site.name]
    z, p = torch.cat(st._z).double(), torch.cat(st._p).double()
    R, D = st.R, st.D
    M = R * D
    gc.collect()
    base = current_rss()
    reset_peak()
    t0 = time.perf_counter()
    Q = torch.zeros(M, M, dtype=torch.float64)  # theta = vec_rows([Phi | beta]); Q[(r,i),(s,j)] = delta_rs Q_r[i,j]
    for r in range(R):
        Q[r * D : (r + 1) * D, r * D : (r + 1) * D] = torch.einsum("n,ni,nj->ij", p[:, r], z, z)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    vals, vecs = torch.linalg.eigh(Q)
    t_eigh = time.perf_counter() - t0
    peak = (peak_rss() - base) / MB
    mf = topo.solve_site(st)
    return {**spec, "kind": "fullq", "site": site.name, "M": M, "t_build": t_build, "t_eigh": t_eigh,
            "peak_extra_mb": peak, "lambda_max": float(vals[-1]), "lambda_max_mf": float(mf.values[0])}


CHILDREN = {"time": child_time, "mem": child_mem, "ref": child_ref, "fullq": child_fullq}


# ---------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------
def launch(spec: dict, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--batch-size", str(args.batch_size),
           "--seed", str(args.seed), "--repeats", str(args.repeats), "--repeat-cap", str(args.repeat_cap),
           "--sample-fraction", str(args.sample_fraction)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timeout > {args.timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": f"child failed (exit {proc.returncode})"}
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall"] = time.perf_counter() - t0
    return res


def parse_at(items: list[str]) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in it.split(":")) for it in items]


def plan(args: argparse.Namespace) -> list[dict]:
    jobs: list[dict] = []
    for d in args.widths:
        for n in args.images:
            if f"{d}:{n}" in args.skip:
                continue
            jobs.append({"mode": "time", "d": d, "images": n, "variant": "mf"})
            if args.mem == "fresh":
                jobs.append({"mode": "mem", "d": d, "images": n, "variant": "mf", "what": "fb"})
                jobs.append({"mode": "mem", "d": d, "images": n, "variant": "mf", "what": "deriv"})
    for d, n in parse_at(args.variants_at):
        for v in ("mf_bf16", "mf_sub"):
            jobs.append({"mode": "time", "d": d, "images": n, "variant": v})
            if args.mem == "fresh":
                jobs.append({"mode": "mem", "d": d, "images": n, "variant": v, "what": "deriv"})
    for d, n in parse_at(args.dense_at):
        jobs.append({"mode": "time", "d": d, "images": n, "variant": "dense"})
        if args.mem == "fresh" and 13 * d * (d + 1) ** 2 * 8 <= 2e9:  # larger: the 13 sites' blocks alone need 13 d (d+1)^2 8 bytes
            jobs.append({"mode": "mem", "d": d, "images": n, "variant": "dense", "what": "deriv"})
    for d, n in parse_at(args.ref_at):
        sites = list(args.ref_sites)
        jobs.append({"mode": "ref", "d": d, "images": n, "variant": "ref", "sites": sites})
    for d in args.fullq_widths:
        jobs.append({"mode": "fullq", "d": d, "images": args.fullq_images, "variant": "fullq"})
    return jobs


def key(r: dict) -> tuple:
    return (r["mode"], r["d"], r["images"], r["variant"], r.get("what"))


def ram_gb() -> float:
    """Total RAM of this machine in GB (decimal)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def cache_mb(d: int, images: int, variant: str, fraction: float, batch: int) -> float:
    """MB of the matrix-free caches of all 13 sites: rows x (Zh: d + 1, P: d) x dtype size."""
    sizes = [min(batch, images - i) for i in range(0, images, batch)]
    rows = sum(math.ceil(fraction * b * TOKENS) if variant == "mf_sub" else b * TOKENS for b in sizes)
    return (DEPTH + 1) * rows * (2 * d + 1) * (2 if variant == "mf_bf16" else 4) / MB


def fullq_fit(records: list[dict]) -> tuple[float, float, list[int]] | None:
    """Power-law fit of one site's full-Q build + eigh time over the measured widths: (a, b, widths)."""
    big = sorted((r for r in records if r.get("mode") == "fullq" and "error" not in r and r["t_eigh"] > 0.05),
                 key=lambda r: r["d"])
    if len(big) < 2:
        return None
    a, b = fit_power([r["d"] for r in big], [r["t_eigh"] + r["t_build"] for r in big])
    return a, b, [r["d"] for r in big]


def fit_power(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares fit log y = a + b log x; returns (a, b)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ly)) / sum((u - mx) ** 2 for u in lx)
    return my - b * mx, b


def report(records: list[dict], args: argparse.Namespace, argv: list[str], wall: float | None) -> str:
    by = {}
    for r in records:
        if "error" not in r:
            by[key(r)] = r
    errors = [r for r in records if "error" in r]
    # Only fresh-process peaks are reported: the inline ones (--mem inline) are kept in the log but understate
    # the derivative's peak (RSS freed by the fb pass before it is reused without raising the high-water mark).
    get = lambda *k: by.get(k)  # noqa: E731
    lines = [
        "# Performance: the topological derivative of a ViT vs one forward + backward pass",
        "",
        f"- command: `python {shlex.join([*shlex.split(args.prog), *argv])}`",
        f"- torch threads {records[0].get('threads', '?') if records else '?'}, `nproc` = {os.cpu_count()}, "
        f"{platform.machine()}, Python {platform.python_version()}; other jobs shared the 2 cores "
        f"(load average {os.getloadavg()[0]:.1f} at the end), so only same-process ratios are meaningful",
        f"- model: ViTForImageClassification, hidden d, {DEPTH} blocks, heads d/64, MLP 4d, image {IMAGE}, patch "
        f"{PATCH} -> {TOKENS} tokens/image, float32, random init, random images/labels, summed cross-entropy, "
        f"batches of {args.batch_size} images; 13 sites; rule \"cluster\", 32 eigenpairs, tol 1e-4",
        "- t_fb: one forward + backward (loss.backward(), weight grads) over the probe data; ratios: derivative "
        "phase / t_fb in the same process, alternating fb and derivative, median over the pairs",
        "- memory: peak RSS increase (VmHWM reset right before) of the forward + backward alone (activations + "
        "weight grads = the probe's activation memory) and of the derivative alone, each in a fresh process",
        "",
        "## Matrix-free derivative over all 13 sites",
        "",
        "| d | images | rows N | t_fb [s] | reps | capture+stats / t_fb | eigen / t_fb | **derivative / t_fb** "
        "| CPU-time ratio | blockwise dense / t_fb | full-Q dense / t_fb | Lanczos steps (work) per site |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    fit = fullq_fit(records)
    for d in args.widths:
        for n in args.images:
            t = get("time", d, n, "mf", None)
            if t is None:
                lines.append(f"| {d} | {n} | {n * TOKENS} | not run (time budget) | | | | | | | | |")
                continue
            p = t["pairs"][-1]
            its = sorted(set(p["iters"]))
            steps = f"{'/'.join(map(str, its))} ({statistics.mean(p['work']):.1f})"
            dn = get("time", d, n, "dense", None)
            blocks_gb = (DEPTH + 1) * d * (d + 1) ** 2 * 8 / 1e9
            if dn:
                bdense = f"{dn['ratio']:.1f}"
            elif blocks_gb > ram_gb():
                bdense = f"does not fit ({blocks_gb:.0f} GB of blocks)"
            else:
                bdense = "not run"
            full_gb = (d * (d + 1)) ** 2 * 8 / 1e9
            if full_gb > ram_gb():
                fq = f"does not fit ({full_gb:,.0f} GB per site)"
            elif 4 * full_gb > ram_gb() and fit:
                fq = (f"~{(DEPTH + 1) * math.exp(fit[0]) * d ** fit[1] / t['t_fb']:,.0f} (extrapolated, not run: "
                      f"eigh needs ~{4 * full_gb:.0f} GB)")
            elif fit:
                fq = f"~{(DEPTH + 1) * math.exp(fit[0]) * d ** fit[1] / t['t_fb']:,.0f} (extrapolated, not run)"
            else:
                fq = "-"
            lines.append(f"| {d} | {n} | {n * TOKENS} | {t['t_fb']:.2f} | {t['reps']} | {t['ratio_stats']:.2f} | "
                         f"{t['ratio_solve']:.2f} | **{t['ratio']:.2f}** | {t['cpu_ratio']:.2f} | {bdense} | {fq} | "
                         f"{steps} |")
    lines += ["", "## Memory (peak RSS increase, fresh process per measurement)", "",
              "fb = one forward + backward over the probe in batches (activations of one batch + weight gradients); "
              "states = the 13 site states h_t of the whole probe in float32 (13 N d 4 bytes); "
              "cache = the matrix-free Zh, P caches of the 13 sites (computed from N).", "",
              "| d | images | fb peak MB | derivative peak MB | derivative / fb | derivative - fb MB | states MB | "
              "cache MB |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in args.widths:
        for n in args.images:
            mfb, mde = get("mem", d, n, "mf", "fb"), get("mem", d, n, "mf", "deriv")
            if not (mfb or mde):
                continue
            states = (DEPTH + 1) * n * TOKENS * d * 4 / MB
            f = lambda r: f"{r['peak_extra_mb']:.0f}" if r else "-"  # noqa: E731
            ratio = f"{mde['peak_extra_mb'] / mfb['peak_extra_mb']:.2f}" if mfb and mde else "-"
            diff = f"{mde['peak_extra_mb'] - mfb['peak_extra_mb']:+.0f}" if mfb and mde else "-"
            lines.append(f"| {d} | {n} | {f(mfb)} | {f(mde)} | {ratio} | {diff} | {states:.0f} | "
                         f"{cache_mb(d, n, 'mf', 1.0, args.batch_size):.0f} |")
    # variants
    var_rows = []
    for d, n in parse_at(args.variants_at) + parse_at(args.dense_at):
        for v in ("mf", "mf_bf16", "mf_sub", "dense"):
            t, m = get("time", d, n, v, None), get("mem", d, n, v, "deriv")
            if t is None:
                continue
            mfb = get("mem", d, n, "mf", "fb")
            ref = get("time", d, n, "mf", None)
            rel = "-"
            if ref and v != "mf":
                rel = f"{max(abs(a - b) / abs(b) for a, b in zip(t['lambda_max'], ref['lambda_max'])):.1e}"
            label = {"mf": "matrix-free, float32 cache", "mf_bf16": "matrix-free, bfloat16 cache",
                     "mf_sub": f"matrix-free, sample_fraction={args.sample_fraction}",
                     "dense": "blockwise dense (DenseStatistic + eigh)"}[v]
            if m:
                peak = f"{m['peak_extra_mb']:.0f}"
            elif v == "dense":
                peak = f"not measured (blocks alone: {13 * d * (d + 1) ** 2 * 8 / 1e6:,.0f})"
            else:
                peak = "-"
            row = (f"| {d} | {n} | {label} | {t['ratio_stats']:.2f} | {t['ratio_solve']:.2f} | **{t['ratio']:.2f}** "
                   f"| {peak} | ")
            row += f"{mfb['peak_extra_mb']:.0f} | {rel} |" if mfb else f"- | {rel} |"
            if (d, n, v) not in {(r[0], r[1], r[2]) for r in var_rows}:
                var_rows.append((d, n, v, row))
    if var_rows:
        lines += ["", "## Variants (same process ratios; lambda_max vs the float32 matrix-free run)", "",
                  "| d | images | solver / cache | capture+stats / t_fb | eigen / t_fb | derivative / t_fb "
                  "| derivative peak MB | fb peak MB | max rel. diff lambda_max over sites |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [r[3] for r in var_rows]
    # agreement
    agree = []
    for d, n in parse_at(args.dense_at):
        t, dn = get("time", d, n, "mf", None), get("time", d, n, "dense", None)
        if t and dn:
            rel = [abs(a - b) / abs(b) for a, b in zip(t["lambda_max"], dn["lambda_max"])]
            agree.append(f"| {d} | {n} | DenseStatistic + eigh, all 13 sites | {max(rel):.1e} | "
                         f"{dn['lambda_max'][0]:.6g} / {t['lambda_max'][0]:.6g} |")
    for d, n in parse_at(args.ref_at):
        t, rf = get("time", d, n, "mf", None), get("ref", d, n, "ref", None)
        if t and rf:
            idx = {s: i for i, s in enumerate(t["sites"])}
            rel = [abs(t["lambda_max"][idx[s]] - v) / abs(v) for s, v in rf["lambda_max"].items()]
            first = next(iter(rf["lambda_max"]))
            agree.append(f"| {d} | {n} | chunked blockwise eigvalsh, sites {', '.join(rf['lambda_max'])} "
                         f"({statistics.mean(rf['seconds'].values()):.0f} s per site) | {max(rel):.1e} | "
                         f"{rf['lambda_max'][first]:.6g} / {t['lambda_max'][idx[first]]:.6g} |")
    if agree:
        lines += ["", "## lambda_max: matrix-free vs dense (goal 1e-4 relative)", "",
                  "| d | images | dense reference | max rel. diff over sites | first site: dense / matrix-free |",
                  "|---:|---:|---|---:|---|"] + agree
    # full Q
    fq = sorted((r for r in by.values() if r["mode"] == "fullq"), key=lambda r: r["d"])
    if fq:
        lines += ["", "## Straightforward dense baseline: one site's full Q ((d(d+1))^2) + eigh", "",
                  f"Built from the same cached Z, P ({args.fullq_images} images) at the middle site; float64.", "",
                  "| d | M = d(d+1) | build [s] | eigh [s] | peak MB | lambda_max full / matrix-free |",
                  "|---:|---:|---:|---:|---:|---|"]
        for r in fq:
            lines.append(f"| {r['d']} | {r['M']} | {r['t_build']:.2f} | {r['t_eigh']:.2f} | {r['peak_extra_mb']:.0f} "
                         f"| {r['lambda_max']:.8g} / {r['lambda_max_mf']:.8g} |")
        big = [r for r in fq if r["t_eigh"] > 0.05]
        if len(big) >= 2:
            a, b = fit_power([r["d"] for r in big], [r["t_eigh"] + r["t_build"] for r in big])
            lines += ["", f"Fit over d = {', '.join(str(r['d']) for r in big)}: time per site ~ d^{b:.1f} "
                      "(O(d^6) expected for eigh of the (d(d+1))^2 matrix). Extrapolated to the benchmark widths:", "",
                      "| d | full Q float64 | est. time per site | est. for 13 sites | vs measured matrix-free eigen-solve (13 sites) |",
                      "|---:|---:|---:|---:|---:|"]
            for d in args.widths:
                gb = (d * (d + 1)) ** 2 * 8 / 1e9
                est = math.exp(a) * d**b
                t = get("time", d, args.images[0], "mf", None)
                mf = f"{t['pairs'][-1]['solve']:.1f} s ({args.images[0]} images)" if t else "-"
                # eigh with eigenvectors (LAPACK syevd): input copy + eigenvectors + a 2 M^2 workspace ~ 4 M^2 floats
                fits = (f"does not fit in {ram_gb():.0f} GB RAM" if gb > ram_gb() else
                        f"the matrix fits in {ram_gb():.0f} GB RAM, eigh's ~{4 * gb:.0f} GB do not" if 4 * gb > ram_gb()
                        else "fits")
                lines.append(f"| {d} | {gb:,.0f} GB ({fits}) | {est / 3600:,.1f} h | {13 * est / 3600:,.0f} h | {mf} |")
    # per-site detail of the largest mf run
    det = [r for r in by.values() if r["mode"] == "time" and r["variant"] == "mf"]
    if det:
        r = max(det, key=lambda r: (r["d"], r["images"]))
        p = r["pairs"][-1]
        lines += ["", f"## Per site, d = {r['d']}, {r['images']} images (last repeat)", "",
                  "| site | eigen-solve [s] | Lanczos steps | work (full products) | converged | lambda_max | k |",
                  "|---|---:|---:|---:|---|---:|---:|"]
        for i, s in enumerate(r["sites"]):
            lines.append(f"| {s} | {p['site_solve'][i]:.2f} | {p['iters'][i]} | {p['work'][i]:.2f} | "
                         f"{'yes' if p['converged'][i] else 'NO'} | {r['lambda_max'][i]:.6g} | {r['k'][i]} |")
    if errors:
        lines += ["", "## Not measured", ""] + [f"- {e['mode']} d={e['d']} images={e['images']} {e['variant']}: "
                                                  f"{e['error']}" for e in errors]
    if wall is not None:
        lines += ["", f"Benchmark wall time: {wall / 60:.0f} min."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[192, 384, 768])
    ap.add_argument("--images", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--skip", nargs="*", default=[], metavar="D:IMAGES", help="(d, images) not to run (trimmed)")
    ap.add_argument("--variants-at", nargs="*", default=["768:512"], metavar="D:IMAGES",
                    help="also run the bf16-cache and subsampled variants here")
    ap.add_argument("--dense-at", nargs="*", default=["192:64", "384:64"], metavar="D:IMAGES",
                    help="blockwise dense (DenseStatistic) runs for timing and lambda_max agreement")
    ap.add_argument("--ref-at", nargs="*", default=["768:64"], metavar="D:IMAGES",
                    help="chunked blockwise dense lambda_max at three sites")
    ap.add_argument("--ref-sites", nargs="+", default=["vit.embeddings", "vit.layers.5", "vit.layers.11"],
                    help="sites of the chunked blockwise dense reference")
    ap.add_argument("--fullq-widths", type=int, nargs="*", default=[16, 24, 32, 48, 64])
    ap.add_argument("--fullq-images", type=int, default=64)
    ap.add_argument("--sample-fraction", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeat-cap", type=float, default=120.0, help="no third repeat once a config ran this long [s]")
    ap.add_argument("--mem", choices=("fresh", "inline"), default="fresh",
                    help="peak memory in fresh processes (separate jobs), or 'inline': skip those jobs (the timing "
                         "process logs high-water marks, which understate the derivative's peak; not reported)")
    ap.add_argument("--prog", default="scripts/bench_vit_derivative.py", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", type=Path, default=Path("bench_vit_derivative.jsonl"))
    ap.add_argument("--resume", action="store_true", help="skip measurements already in --log")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from --log")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(CHILDREN[spec["mode"]](spec, args)), flush=True)
        return

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # children: robust when other jobs share the cores
    records: list[dict] = []
    if (args.resume or args.report_only) and args.log.exists():
        records = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    wall = None
    if not args.report_only:
        done = {key(r) for r in records if "error" not in r}
        jobs = [j for j in plan(args) if key({**j}) not in done]
        t_start = time.perf_counter()
        for i, job in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {job}", file=sys.stderr, flush=True)
            res = launch(job, args)
            records.append(res)
            with args.log.open("a") as f:
                f.write(json.dumps(res) + "\n")
            print(f"    -> {'ERROR ' + res['error'] if 'error' in res else 'ok'} "
                  f"[{time.perf_counter() - t_start:.0f} s]", file=sys.stderr, flush=True)
        wall = time.perf_counter() - t_start
    shown = list(argv)
    if "--prog" in shown:  # set by the bench_derivative.py dispatcher, which is already named in the command
        i = shown.index("--prog")
        del shown[i : i + 2]
    text = report(records, args, shown, wall)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


# ---------------------------------------------------------------------------------------------------
# rules: every rule a shipped config uses, side by side with one forward + backward (issue 12)
# ---------------------------------------------------------------------------------------------------
RULES = {  # name -> ProbeConfig fields (solver matrix_free: ViT-Base widths; "auto" would pick it from D > 257)
    "cluster": {"rule": "cluster"},
    "rowwise": {"rule": "rowwise"},
    "rowwise_whiten": {"rule": "rowwise", "whiten": True},
}
TOKEN_SETUPS = {65: (32, 4), 197: (224, 16)}  # tokens per image -> (image size, patch size)


def build_tokens(d: int, images: int, batch_size: int, seed: int, tokens: int, depth: int = DEPTH):
    """The benchmark ViT (float32, random init and data) with 65 (32 px, patch 4) or 197 (224 px, patch 16)
    tokens per image."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    image, patch = TOKEN_SETUPS[tokens]
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=d, num_hidden_layers=depth, num_attention_heads=max(1, d // 64),
                    intermediate_size=4 * d, image_size=image, patch_size=patch, num_labels=NUM_CLASSES,
                    attn_implementation="sdpa")
    model = ViTForImageClassification(cfg).float()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(images, 3, image, image, generator=g)
    y = torch.randint(0, NUM_CLASSES, (images,), generator=g)
    data = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, images, batch_size)]
    return model, data, torch.nn.CrossEntropyLoss(reduction="sum")


def _run_rule(model, data, loss_fn, fields: dict):
    """probe_site_results under a rule, with the statistics pass timed apart from the solve."""
    import warnings

    import topotransfer.derivative.topological as topo
    import topotransfer.init_rules as ir
    from topotransfer.config import ProbeConfig

    t = {"stats": 0.0}
    orig = ir.compute_site_statistics, topo.compute_site_statistics

    def stats(*a, **k):
        t0 = time.perf_counter()
        out = orig[1](*a, **k)
        t["stats"] += time.perf_counter() - t0
        return out

    ir.compute_site_statistics = topo.compute_site_statistics = stats
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = ir.probe_site_results(model, data, loss_fn, ProbeConfig(solver="matrix_free", **fields))
    finally:
        ir.compute_site_statistics, topo.compute_site_statistics = orig
    warned = sum("converge" in str(w.message) for w in caught)
    return res, t["stats"], warned


def child_rules(spec: dict, args: argparse.Namespace) -> dict:
    """fb and each rule alternately in one process (wall and CPU time); ratios per pair, median over pairs."""
    import torch

    model, data, loss_fn = build_tokens(spec["d"], spec["images"], args.batch_size, args.seed, spec["tokens"])
    forward_backward(model, data[:1], loss_fn)  # warm-up
    model.zero_grad(set_to_none=True)
    rules = spec.get("rules", list(RULES))
    pairs: dict[str, list] = {r: [] for r in rules}
    out: dict = {}
    for rep in range(args.repeats):
        for rule in rules:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            forward_backward(model, data, loss_fn)
            t_fb, c_fb = time.perf_counter() - t0, time.process_time() - c0
            model.zero_grad(set_to_none=True)
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            res, t_stats, warned = _run_rule(model, data, loss_fn, RULES[rule])
            t_r, c_r = time.perf_counter() - t0, time.process_time() - c0
            pairs[rule].append({"t_fb": t_fb, "cpu_fb": c_fb, "t": t_r, "cpu": c_r, "stats": t_stats})
            out[rule] = {"lambda_max": [r.lambda_max for r in res], "quadratic": [r.quadratic for r in res],
                         "converged": [bool(r.converged) for r in res], "k": [int(r.k) for r in res],
                         "warnings": warned}
            print(f"    d={spec['d']} tokens={spec['tokens']} images={spec['images']} {rule} rep {rep + 1}: fb "
                  f"{t_fb:.2f} s, rule {t_r:.2f} s (stats {t_stats:.2f}), ratio {t_r / t_fb:.2f}, cpu "
                  f"{c_r / c_fb:.2f}", file=sys.stderr, flush=True)
    med = statistics.median
    for rule in rules:
        ps = pairs[rule]
        out[rule].update({
            "pairs": ps, "t_fb": med(p["t_fb"] for p in ps), "t": med(p["t"] for p in ps),
            "ratio": med(p["t"] / p["t_fb"] for p in ps), "cpu_ratio": med(p["cpu"] / p["cpu_fb"] for p in ps),
            "ratio_stats": med(p["stats"] / p["t_fb"] for p in ps),
        })
    return {**spec, "kind": "rules", "threads": torch.get_num_threads(), "load": os.getloadavg()[0], "rules": out}


def child_agree(spec: dict, args: argparse.Namespace) -> dict:
    """Row-wise eigenpairs (plain and whitened) against a dense float64 reference at every site and row."""
    import torch

    import topotransfer.derivative.topological as topo
    import topotransfer.init_rules as ir

    model, data, loss_fn = build_tokens(spec["d"], spec["images"], args.batch_size, args.seed, spec["tokens"],
                                        spec.get("depth", DEPTH))
    sites, stats, _, _ = topo.compute_site_statistics(model, data, loss_fn, solver="matrix_free")
    rows = []
    for s in sites:
        st = stats[s.name]
        z, p = torch.cat(st._z).double(), torch.cat(st._p).double()
        Q = torch.einsum("nr,ni,nj->rij", p, z, z)
        lam_all, vec_all = torch.linalg.eigh(Q)
        lam = lam_all[:, -1]
        M = st.second_moment()
        L = ir._cholesky(M, 1e-6)
        A = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, Q, upper=False).transpose(1, 2),
                                          upper=False)
        mu_all, y_all = torch.linalg.eigh(0.5 * (A + A.transpose(1, 2)))
        mu = mu_all[:, -1]
        ref_dirs = {"rowwise": (lam, vec_all[:, :, -1]),
                    "rowwise_whiten": (mu, torch.linalg.solve_triangular(L.T, y_all[:, :, -1].T, upper=True).T)}
        rec = {"site": s.name}
        for name, tops, ref in (("rowwise", ir.block_tops(st), lam),
                                ("rowwise_whiten", ir.whitened_block_tops(st, M), mu)):
            scale = float(ref.abs().max())
            err = (tops.values - ref).abs() / scale
            theta, _, _ = ir.rowwise_direction(tops.values, tops.vectors)
            quad_ref = float(torch.einsum("ri,rij,rj->", theta, Q, theta))  # theta^T Q theta in float64
            quad_mf = st.quadratic(theta[:, :-1], theta[:, -1])
            # the direction a dense float64 solve would insert, and its theta^T Q theta
            theta_ref, k_ref, _ = ir.rowwise_direction(*ref_dirs[name])
            quad_dense_dir = float(torch.einsum("ri,rij,rj->", theta_ref, Q, theta_ref))
            rec[name] = {"max_err_rel": float(err.max()), "rows_over_1e-4": int((err > 1e-4).sum()),
                         "lambda_max_rel": abs(float(tops.values.max()) - float(ref.max())) / scale,
                         "quad_rel": abs(quad_mf - quad_ref) / abs(quad_ref),
                         "sign_mismatch": int(((tops.values > 0) != (ref > 0)).sum()),
                         "quad_vs_dense_direction": abs(quad_ref - quad_dense_dir) / abs(quad_dense_dir),
                         "k": int((theta.abs().sum(1) > 0).sum()), "k_dense": k_ref,
                         "mismatch_max_abs_rel": float((ref.abs() / scale)[(tops.values > 0) != (ref > 0)].max())
                         if bool(((tops.values > 0) != (ref > 0)).any()) else 0.0,
                         "converged": tops.all_converged, "work": tops.work, "iterations": tops.iterations}
        rows.append(rec)
    return {**spec, "kind": "agree", "sites": rows}


def child_rules_mem(spec: dict, args: argparse.Namespace) -> dict:
    """Peak extra RSS of one rule (fresh process) and the bytes its matrix-free caches held."""
    import topotransfer.derivative.topological as topo
    import topotransfer.init_rules as ir
    from topotransfer.config import ProbeConfig

    model, data, loss_fn = build_tokens(spec["d"], spec["images"], args.batch_size, args.seed, spec["tokens"])
    held = {}
    orig = topo.compute_site_statistics

    def stats(*a, **k):
        out = orig(*a, **k)
        held["cache_mb"] = sum(st.nbytes() for st in out[1].values() if hasattr(st, "nbytes")) / MB
        held["examples"] = max(st.count for st in out[1].values()) // spec["tokens"]
        return out

    gc.collect()
    base = current_rss()
    ok = reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    ir.compute_site_statistics = stats
    try:
        ir.probe_site_results(model, data, loss_fn, ProbeConfig(solver="matrix_free", **RULES[spec["rule"]]))
    finally:
        ir.compute_site_statistics = orig
    return {**spec, "kind": "rules_mem", "peak_extra_mb": (peak_rss() - base) / MB, "reset": ok, "base_mb": base / MB,
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, **held}


CHILDREN.update({"rules": child_rules, "agree": child_agree, "rules_mem": child_rules_mem})


def rules_report(records: list[dict], argv: list[str]) -> str:
    lines = ["Command: `python scripts/bench_vit_derivative.py " + " ".join(shlex.quote(a) for a in argv) + "`", "",
             "| d | tokens/image | images | one fwd+bwd [s] | rule | rule [s] | wall ratio | CPU ratio | "
             "stats / fb | sites converged | warnings |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r.get("kind") != "rules":
            continue
        for rule, v in r["rules"].items():
            lines.append(f"| {r['d']} | {r['tokens']} | {r['images']} | {v['t_fb']:.2f} | {rule} | {v['t']:.2f} | "
                         f"{v['ratio']:.2f} | {v['cpu_ratio']:.2f} | {v['ratio_stats']:.2f} | "
                         f"{sum(v['converged'])}/{len(v['converged'])} | {v['warnings']} |")
    mem = [r for r in records if r.get("kind") == "rules_mem"]
    if mem:
        lines += ["", "| d | tokens | images | rule | peak extra RSS [MB] | matrix-free cache [MB] | examples used |",
                  "|---:|---:|---:|---|---:|---:|---:|"]
        for r in mem:
            lines.append(f"| {r['d']} | {r['tokens']} | {r['images']} | {r['rule']} | {r['peak_extra_mb']:.0f} | "
                         f"{r['cache_mb']:.0f} | {r['examples']} |")
    agree = [r for r in records if r.get("kind") == "agree"]
    if agree:
        lines += ["", "| d | tokens | images | rule | max over sites and rows of abs(lambda_r - ref) / max abs(ref) | "
                  "rows above 1e-4 | lambda_max rel. err | theta^T Q theta rel. err (same theta) | "
                  "theta^T Q theta vs the dense solve's direction | rows with another sign (their max abs(lambda_r) / "
                  "max abs(ref)) | converged | products per site |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in agree:
            for rule in ("rowwise", "rowwise_whiten"):
                xs = [s[rule] for s in r["sites"]]
                lines.append(
                    f"| {r['d']} | {r['tokens']} | {r['images']} | {rule} | {max(x['max_err_rel'] for x in xs):.1e} | "
                    f"{sum(x['rows_over_1e-4'] for x in xs)} of {len(xs)} x {r['d']} | "
                    f"{max(x['lambda_max_rel'] for x in xs):.1e} | {max(x['quad_rel'] for x in xs):.1e} | "
                    f"{max(x.get('quad_vs_dense_direction', math.nan) for x in xs):.1e} | "
                    f"{sum(x['sign_mismatch'] for x in xs)} ({max(x.get('mismatch_max_abs_rel', math.nan) for x in xs):.0e}) | "
                    f"{sum(x['converged'] for x in xs)}/{len(xs)} | "
                    f"{min(x['work'] for x in xs):.1f} - {max(x['work'] for x in xs):.1f} |")
    return "\n".join(lines) + "\n"


def rules_main(argv: list[str]) -> None:
    """``bench_vit_derivative.py rules``: the rules of the shipped configs vs one forward + backward."""
    ap = argparse.ArgumentParser(prog="bench_vit_derivative.py rules")
    ap.add_argument("--at", nargs="*", default=["192:65:32", "384:65:32", "768:65:32", "768:197:8"],
                    metavar="D:TOKENS:IMAGES")
    ap.add_argument("--agree-at", nargs="*", default=["192:65:16"], metavar="D:TOKENS:IMAGES")
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    ap.add_argument("--mem-at", nargs="*", default=[], metavar="D:TOKENS:IMAGES",
                    help="peak RSS of the rowwise rule in a fresh process")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=7200.0)
    ap.add_argument("--log", type=Path, default=Path("bench_vit_rules.jsonl"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    records = []
    if args.report_only and args.log.exists():
        records = [json.loads(x) for x in args.log.read_text().splitlines() if x.strip()]
    else:
        jobs = [{"mode": "agree", "d": d, "tokens": t, "images": n} for d, t, n in
                (map(int, a.split(":")) for a in args.agree_at)]
        jobs += [{"mode": "rules", "d": d, "tokens": t, "images": n, "rules": args.rules} for d, t, n in
                 (map(int, a.split(":")) for a in args.at)]
        jobs += [{"mode": "rules_mem", "d": d, "tokens": t, "images": n, "rule": "rowwise"} for d, t, n in
                 (map(int, a.split(":")) for a in args.mem_at)]
        for job in jobs:
            print(f"[{job}]", file=sys.stderr, flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job), "--batch-size",
                   str(args.batch_size), "--seed", str(args.seed), "--repeats", str(args.repeats)]
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                res = json.loads(lines[-1][7:]) if lines else {**job, "error": f"exit {proc.returncode}"}
            except subprocess.TimeoutExpired:
                res = {**job, "error": "timeout"}
            records.append(res)
            with args.log.open("a") as f:
                f.write(json.dumps(res) + "\n")
    text = rules_report(records, ["rules", *argv])
    print(text)
    if args.out is not None:
        args.out.write_text(text)


def switch_main(argv: list[str]) -> None:
    """``bench_vit_derivative.py switch``: densify + batched eigh vs the batched Lanczos for one matrix-free
    statistic of random rows (R = d blocks of D = d + 1), CPU time, best of 3: where ``DENSE_MAX_DIM`` goes."""
    import torch

    from topotransfer.derivative.statistics import MatrixFreeStatistic
    from topotransfer.eigen import block_top_eigenpairs_lanczos
    from topotransfer.init_rules import _dense_tops

    torch.set_num_threads(1)
    for n in (2048, 16384):
        for d in (8, 16, 24, 32, 48, 64, 96, 128):
            g = torch.Generator().manual_seed(0)
            st = MatrixFreeStatistic(d, d, True)
            for _ in range(0, n, 1024):
                st.update(torch.randn(1024, d, generator=g), 0.1 * torch.randn(1024, d, generator=g))

            def best(f):
                out = math.inf
                for _ in range(3):
                    c0 = time.process_time()
                    f()
                    out = min(out, time.process_time() - c0)
                return out

            td = best(lambda st=st: _dense_tops(st.dense()))
            tl = best(lambda st=st: block_top_eigenpairs_lanczos(st.matvec, st.R, st.D))
            print(f"N={n} D={d + 1}: densify+eigh {td * 1e3:.1f} ms, batched Lanczos {tl * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["switch"]:
        switch_main(sys.argv[2:])
    elif sys.argv[1:2] == ["rules"]:
        rules_main(sys.argv[2:])
    else:
        main()
