#!/usr/bin/env python
"""Benchmark the topological derivative against one forward + backward pass.

For every width d and probe size N, on ``ResidualMLP(in_features=d, width=d, depth, out_features=10)``
in float32 with a summed cross-entropy on random data (batches of ``--batch-size``):

- ``t_fb``: one forward + backward pass (``loss.backward()``) over the same N samples, same batches;
- ``topotransfer.topological_derivative(..., solver=s, rule="cluster")`` over all depth + 1 sites for
  s in ("dense", "matrix_free"), as a ratio to ``t_fb``, split into capture + statistics
  (``compute_site_statistics``) and eigen-solve (``solve_site``, summed over sites) by wrapping those
  two functions with timers for the duration of the real ``topological_derivative`` call;
- extra peak RSS of the derivative over the RSS right before it (model, data, gradients of the
  t_fb passes already allocated), measured in a fresh subprocess per (solver, d, N) with the kernel's
  peak-RSS counter reset (``/proc/self/clear_refs``), falling back to ``ru_maxrss``;
- agreement of lambda_max (per site) between the two solvers.

Usage::

    python scripts/bench_derivative.py vit [...]     # the ViT benchmark (d 192/384/768, 12 blocks) of
                                                    # docs/results/performance.md: scripts/bench_vit_derivative.py
    python scripts/bench_derivative.py [--widths 64 128 256 512 1024] [--samples 256 1024 4096]
        [--depth 4] [--repeats 3] [--quick] [--dense-budget-gb 8] [--out docs/results/bench_derivative.md]

Each (solver, d, N) runs in a child process (``--one SOLVER D N``) that prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

NUM_CLASSES = 10
LOAD_AT_START = "?"
GIT_AT_START = "?"
SOLVERS = ("dense", "matrix_free")
GB = 1e9
MB = 1e6


# ---------------------------------------------------------------------------------------------------
# memory helpers (Linux)
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
    if kb is not None:
        return kb * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # best effort


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False when not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def dense_stat_bytes(d: int, depth: int) -> tuple[float, float]:
    """(bytes of one site's dense statistic, predicted peak of the dense solver).

    One site: d_out * (d + 1)^2 float64. All depth + 1 sites are held at once; the eigen-solve of a
    site adds about two more copies (the symmetrised Q and eigh's eigenvector output).
    """
    per_site = d * (d + 1) ** 2 * 8.0
    return per_site, per_site * (depth + 1 + 2)


def probe_bytes(d: int, n: int, depth: int) -> float:
    """Probe activations z of all sites in float32: N * d * (depth + 1) * 4."""
    return n * d * (depth + 1) * 4.0


# ---------------------------------------------------------------------------------------------------
# child: one (solver, d, N)
# ---------------------------------------------------------------------------------------------------
def run_one(solver: str, d: int, n: int, args: argparse.Namespace) -> dict:
    import torch

    import topotransfer
    import topotransfer.derivative.topological as topo

    torch.manual_seed(args.seed)
    model = topotransfer.ResidualMLP(in_features=d, width=d, depth=args.depth, out_features=NUM_CLASSES).float()
    x = torch.randn(n, d, dtype=torch.float32)
    y = torch.randint(0, NUM_CLASSES, (n,))
    data = [(x[i : i + args.batch_size], y[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    def forward_backward() -> None:
        for xb, yb in data:
            loss_fn(model(xb), yb).backward()

    # t_fb: warm-up once, then the median of `repeats` passes.
    load0 = os.getloadavg()[0]
    forward_backward()
    t_fb, c_fb = [], []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=False)
        t0, c0 = time.perf_counter(), time.process_time()
        forward_backward()
        t_fb.append(time.perf_counter() - t0)
        c_fb.append(time.process_time() - c0)
    model.zero_grad(set_to_none=True)
    out: dict = {
        "solver": solver,
        "d": d,
        "N": n,
        "t_fb": statistics.median(t_fb),
        "t_fb_all": t_fb,
        "cpu_fb": statistics.median(c_fb),
        "threads": torch.get_num_threads(),
    }
    if solver == "fb":
        return out

    # Wrap the two phases (module globals used by topological_derivative) with timers.
    phase = {"stats": 0.0, "solve": 0.0, "site_solve": [], "iters": [], "converged": []}
    orig_stats, orig_solve = topo.compute_site_statistics, topo.solve_site

    def timed_stats(*a, **k):
        t0 = time.perf_counter()
        r = orig_stats(*a, **k)
        phase["stats"] += time.perf_counter() - t0
        return r

    def timed_solve(*a, **k):
        t0 = time.perf_counter()
        r = orig_solve(*a, **k)
        dt = time.perf_counter() - t0
        phase["solve"] += dt
        phase["site_solve"].append(dt)
        phase["iters"].append(int(r.iterations))
        phase["converged"].append(bool(r.converged))
        return r

    topo.compute_site_statistics, topo.solve_site = timed_stats, timed_solve
    gc.collect()
    base = current_rss()
    hwm_reset = reset_peak_rss()
    base_peak = peak_rss()
    runs = []
    try:
        elapsed = 0.0
        for rep in range(args.repeats):
            phase.update(stats=0.0, solve=0.0, site_solve=[], iters=[], converged=[])
            t0, c0 = time.perf_counter(), time.process_time()
            results = topotransfer.topological_derivative(model, data, loss_fn, solver=solver, rule="cluster")
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            elapsed += dt
            runs.append(
                {"total": dt, "cpu": cpu, **{k: (list(v) if isinstance(v, list) else v) for k, v in phase.items()}}
            )
            print(
                f"    {solver} d={d} N={n} run {rep + 1}: {dt:.2f} s "
                f"(stats {phase['stats']:.2f} s, solve {phase['solve']:.2f} s)",
                file=sys.stderr,
                flush=True,
            )
            if elapsed > args.repeat_cap and rep + 1 < args.repeats:
                print(
                    f"    {solver} d={d} N={n}: {elapsed:.0f} s > --repeat-cap {args.repeat_cap:.0f} s, "
                    "no more repeats",
                    file=sys.stderr,
                    flush=True,
                )
                break
    finally:
        topo.compute_site_statistics, topo.solve_site = orig_stats, orig_solve
    peak = peak_rss()
    # Without a resettable counter, ru_maxrss may predate the measurement: only a lower bound on accuracy.
    extra = peak - base if hwm_reset else max(0, peak - base)
    med = sorted(runs, key=lambda r: r["total"])[(len(runs) - 1) // 2]  # lower median: one actual run
    out.update(
        runs=len(runs),
        t_total=med["total"],
        cpu_total=med["cpu"],
        load=(load0, os.getloadavg()[0]),
        t_stats=med["stats"],
        t_solve=med["solve"],
        site_solve=med["site_solve"],
        iters=med["iters"],
        converged=med["converged"],
        lambda_max=[float(r.score) for r in results],
        sites=[r.site for r in results],
        k=[int(r.k) for r in results],
        base_rss_mb=base / MB,
        peak_extra_mb=extra / MB,
        peak_reset=hwm_reset,
        base_peak_mb=base_peak / MB,
    )
    return out


# ---------------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------------
def child_cmd(solver: str, d: int, n: int, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, os.path.abspath(__file__), "--one", solver, str(d), str(n),
        "--depth", str(args.depth), "--repeats", str(args.repeats), "--batch-size", str(args.batch_size),
        "--seed", str(args.seed), "--repeat-cap", str(args.repeat_cap),
    ]  # fmt: skip


def launch(solver: str, d: int, n: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            child_cmd(solver, d, n, args), stdout=subprocess.PIPE, stderr=None, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"solver": solver, "d": d, "N": n, "error": f"timeout (> {args.timeout:.0f} s)"}
    wall = time.perf_counter() - t0
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"solver": solver, "d": d, "N": n, "error": f"child failed (exit {proc.returncode})"}
    res = json.loads(lines[-1])
    res["wall"] = wall
    return res


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def build_tables(rows: list[dict], args: argparse.Namespace) -> tuple[str, str]:
    main = [
        "| d | N | t_fb [s] | dense ratio | matrix-free ratio | dense peak MB | mf peak MB | rel. diff lambda_max "
        "| probe acts MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    detail = [
        "| solver | d | N | runs | t_fb [s] | t_deriv [s] | capture+stats [s] | eigen-solve [s] "
        "| per-site solve [s] | Lanczos matvecs per site | converged | lambda_max per site | CPU-time ratio "
        "| load avg (start, end) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|---|",
    ]
    for row in rows:
        d, n = row["d"], row["N"]
        cells = {}
        for s in SOLVERS:
            r = row.get(s)
            if r is None:
                cells[s] = ("-", "-")
            elif "skip" in r:
                cells[s] = (r["skip"], "-")
            elif "error" in r:
                cells[s] = (r["error"], "-")
            else:
                cells[s] = (f"{r['t_total'] / r['t_fb']:.1f}", f"{r['peak_extra_mb']:.0f}")
                detail.append(
                    f"| {s} | {d} | {n} | {r['runs']} | {r['t_fb']:.3f} | {r['t_total']:.2f} | {r['t_stats']:.2f} "
                    f"| {r['t_solve']:.2f} | {' '.join(f'{t:.2f}' for t in r['site_solve'])} "
                    f"| {' '.join(str(i) for i in r['iters']) if s == 'matrix_free' else '(eigh)'} "
                    f"| {''.join('y' if c else 'N' for c in r['converged'])} "
                    f"| {' '.join(f'{v:.4g}' for v in r['lambda_max'])} "
                    f"| {r['cpu_total'] / r['cpu_fb']:.1f} | {r['load'][0]:.1f}, {r['load'][1]:.1f} |"
                )
        t_fbs = [row[s]["t_fb"] for s in SOLVERS if row.get(s) and "t_fb" in row[s]]
        t_fb = statistics.median(t_fbs) if t_fbs else None
        rel = "-"
        rd, rm = row.get("dense"), row.get("matrix_free")
        if rd and rm and "lambda_max" in rd and "lambda_max" in rm:
            rel = max(abs(a - b) / abs(a) for a, b in zip(rd["lambda_max"], rm["lambda_max"], strict=True))
            rel = f"{rel:.1e}"
        main.append(
            f"| {d} | {n} | {fmt(t_fb, '.3f')} | {cells['dense'][0]} | {cells['matrix_free'][0]} "
            f"| {cells['dense'][1]} | {cells['matrix_free'][1]} | {rel} | {probe_bytes(d, n, args.depth) / MB:.0f} |"
        )
    return "\n".join(main), "\n".join(detail)


def solver_defaults() -> str:
    """The library's current eigen-solver defaults (read from the signatures, not hard-coded)."""
    import inspect

    import topotransfer
    from topotransfer.eigen import lanczos_top_eigenpairs

    def defaults(fn, names):
        sig = inspect.signature(fn).parameters
        return [f"{n}={sig[n].default}" for n in names if n in sig]

    return ", ".join(
        defaults(topotransfer.topological_derivative, ["num_eigenvalues", "tol", "lanczos_steps"])
        + defaults(lanczos_top_eigenpairs, ["max_restarts", "check_every"])
    )


def git_state() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "topotransfer"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return head + (" (topotransfer/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(args: argparse.Namespace, argv: list[str]) -> str:
    import torch

    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nproc = str(os.cpu_count())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join([
        "# Topological derivative vs one forward + backward pass",
        "",
        f"- command: `python {shlex.join(['scripts/bench_derivative.py', *argv])}`",
        f"- torch {torch.__version__}, threads {torch.get_num_threads()}, `nproc` = {nproc}, "
        f"{platform.machine()}, Python {platform.python_version()}, load average at the end: {load}",
        f"- ResidualMLP(in=d, width=d, depth={args.depth}, out={NUM_CLASSES}) float32, summed cross-entropy, "
        f"random data, batches of {args.batch_size}, {args.depth + 1} sites, rule=\"cluster\", library defaults "
        f"({solver_defaults()}); code at git {GIT_AT_START}",
        f"- times: wall clock, (lower) median of up to {args.repeats} runs (fewer once a config exceeds "
        f"{args.repeat_cap:.0f} s); ratio = t_derivative / t_fb, both measured in the same child process; the "
        "CPU-time ratio (process_time, all threads) is less sensitive to other load on the machine",
        f"- load average at the start: {LOAD_AT_START}; children run with OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}",
        "- peak MB: extra peak RSS of topological_derivative over the RSS right before it (fresh process per "
        "config, peak counter reset via /proc/self/clear_refs)",
        f"- probe acts MB = N * d * (depth+1) * 4 bytes; dense skipped when its predicted peak "
        f"(d*(d+1)^2*8 bytes per site x (depth+3)) exceeds {args.dense_budget_gb:g} GiB",
        "- rel. diff lambda_max = max over sites |l_dense - l_mf| / |l_dense|",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vit"]:
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_vit_derivative", Path(__file__).with_name(
            "bench_vit_derivative.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main([*argv[1:], "--prog", "scripts/bench_derivative.py vit"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--samples", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small sizes (widths 32 64, samples 256 512, 1 repeat)")
    p.add_argument("--dense-budget-gb", type=float, default=8.0, help="skip dense when predicted memory exceeds (GiB)")
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="SOLVER:D:N",
        help="configurations not to run, e.g. matrix_free:1024:4096 (reported as skipped)",
    )
    p.add_argument(
        "--repeat-cap",
        type=float,
        default=60.0,
        help="stop repeating a configuration once its runs took this many seconds",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="kill a configuration after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the children (default: torch's)")
    p.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "unset"),
        default="passive",
        help="OMP_WAIT_POLICY of the children (passive: robust when other processes share the cores)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--one", nargs=3, metavar=("SOLVER", "D", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        solver, d, n = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(run_one(solver, d, n, args)), flush=True)
        return

    global LOAD_AT_START
    global GIT_AT_START
    LOAD_AT_START = " ".join(f"{x:.2f}" for x in os.getloadavg())
    GIT_AT_START = git_state()
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the children's torch at import
    if args.omp_wait_policy != "unset":
        # GNU OpenMP spins after each parallel region by default; on a loaded machine a 2-thread torch then
        # loses ~0.4 s per small batched eigh (measured: 32 blocks of 33x33, 0.44 s active vs 0.004 s passive).
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    if args.quick:
        args.widths, args.samples, args.repeats = [32, 64], [256, 512], 1
        args.timeout = min(args.timeout, 60.0)
    skip = set(args.skip)
    budget = args.dense_budget_gb * 2**30
    configs = [(d, n) for d in args.widths for n in args.samples]
    jobs = [(s, d, n) for d, n in configs for s in args.solvers]
    rows: list[dict] = []
    t_start = time.perf_counter()
    k = 0
    for d, n in configs:
        row: dict = {"d": d, "N": n}
        for s in args.solvers:
            k += 1
            tag = f"[{k}/{len(jobs)}] {s} d={d} N={n}"
            if f"{s}:{d}:{n}" in skip:
                row[s] = {"skip": "skipped (--skip)"}
                print(f"{tag}: skipped (--skip)", file=sys.stderr, flush=True)
                continue
            if s == "dense":
                _, need = dense_stat_bytes(d, args.depth)
                if need > budget:
                    row[s] = {"skip": f"does not fit ({need / GB:.1f} GB)"}
                    print(
                        f"{tag}: does not fit ({need / GB:.1f} GB > {args.dense_budget_gb:g} GiB)",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
            print(f"{tag} ...", file=sys.stderr, flush=True)
            r = launch(s, d, n, args)
            row[s] = r
            if "error" in r:
                print(f"{tag}: {r['error']}", file=sys.stderr, flush=True)
            else:
                print(
                    f"{tag}: t_fb {r['t_fb']:.3f} s, derivative {r['t_total']:.2f} s "
                    f"(stats {r['t_stats']:.2f} + solve {r['t_solve']:.2f}), ratio {r['t_total'] / r['t_fb']:.1f}, "
                    f"peak +{r['peak_extra_mb']:.0f} MB  [elapsed {time.perf_counter() - t_start:.0f} s]",
                    file=sys.stderr,
                    flush=True,
                )
        rows.append(row)

    main_table, detail_table = build_tables(rows, args)
    report = "\n".join([
        header(args, argv), "", main_table, "",
        "## Where the time goes", "",
        "t_deriv = capture+stats (one forward + autograd.grad per batch, dense einsum accumulation or "
        "caching of Z, P) + eigen-solve (dense batched eigh, or matrix-free Lanczos); per-site values are in "
        "site order (input_layer, layers.0, ...). converged: y/N per site.", "",
        detail_table, "",
        f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.", "",
    ])  # fmt: skip
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
