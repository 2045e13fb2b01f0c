"""End-to-end wall and CPU time of topo against its baselines, side by side in one process (issue 12).

    python scripts/bench_end_to_end.py --backbone /path/to/pretrained_mnist --log e2e.json   # 10 / 50 / 100 labels + grow
    python scripts/bench_end_to_end.py --quick --log /tmp/e2e.json                           # tiny backbone, smoke run
    python scripts/bench_end_to_end.py --report-only --log e2e.json                          # print the tables again

Adapt: the transfer benchmark's setting (scripts/reproduce_transfer.py: its config, budget and matched LoRA rank),
``--source`` backbone adapted to ``--target`` with ``--shots`` labels per class, ``adapt.method=lora`` and
``adapt.method=topo`` with the same epochs. Grow: ``--grow-config`` with ``growth.method=topo`` and
``growth.method=fixed`` (built at the final depth, same epochs). The runs of one setting alternate in the same
process (``--order`` sets which goes first), so both see the same machine load as far as possible.

Per phase, the wall seconds (``phase_times``) and CPU seconds of the process (``phase_cpu_times``) that each run
wrote to its results.json; "total" is the wall / CPU time of the whole call measured here (model loading and
data preparation included). Ratios are topo / LoRA and topo / fixed. The raw numbers go to ``--log`` (JSON),
from which ``--report-only`` prints the same tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_transfer import FULL, QUICK, matched_lora_rank, pretrain, run_one  # noqa: E402

from topotransfer.config import load_config  # noqa: E402
from topotransfer.recipes.grow import run_grow  # noqa: E402

GROW_CONFIG = str(Path(__file__).parents[1] / "topotransfer" / "configs" / "grow_digits.yaml")
PHASES = ["head_warmup", "derivative", "line_search", "training", "evaluation", "saving"]
GOALS = {"adapt": 1.3, "grow": 1.5}  # the bounds on topo's wall time over the baseline's


def _timed_call(fn) -> tuple[dict, float, float]:
    """``(results, wall seconds, CPU seconds)`` of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    res = fn()
    return res, time.perf_counter() - t0, time.process_time() - c0


def _row(kind: str, setting: str, method: str, res: dict, wall: float, cpu: float) -> dict:
    return {"kind": kind, "setting": setting, "method": method, "seed": res["seed"], "test_error": res["test_error"],
            "phase_times": res.get("phase_times", {}), "phase_cpu_times": res.get("phase_cpu_times", {}),
            "total_wall": wall, "total_cpu": cpu, "events": [
                {k: e.get(k) for k in ("site", "epsilon", "seconds", "cpu_seconds")} for e in res.get("events", [])]}


def run_adapt_pair(backbone: Path, args: argparse.Namespace, budget: dict, shots: int, seed: int) -> list[dict]:
    """LoRA and topo at ``shots`` labels per class, in ``args.order``."""
    cfg = json.loads((backbone / "config.json").read_text())
    rank = matched_lora_rank(cfg["hidden_size"], cfg["num_hidden_layers"], 2)
    rows = []
    for method in args.order:
        baseline = "lora" if method == "baseline" else "topo"
        res, wall, cpu = _timed_call(functools.partial(
            run_one, backbone, args.target, baseline, shots, seed, args.work_dir / "adapt",
            budget["adapt"] + args.overrides, rank, 10, budget["num_test"] if args.quick else args.num_test))
        rows.append(_row("adapt", f"{shots} labels/class", baseline, res, wall, cpu))
        print(f"  adapt {shots} labels/class {baseline}: wall {wall:.1f} s, CPU {cpu:.1f} s, test error "
              f"{res['test_error']!r}", file=sys.stderr, flush=True)
    return rows


def run_grow_pair(args: argparse.Namespace, seed: int) -> list[dict]:
    """Growth (``growth.method=topo``) and the fixed-depth baseline of ``--grow-config``, in ``args.order``."""
    rows = []
    extra = ["train.epochs=8", "growth.epochs_per_stage=2"] if args.quick else []
    for method in args.order:
        name = "fixed" if method == "baseline" else "topo"
        out = args.work_dir / "grow" / f"{name}-seed{seed}"
        cfg = load_config(args.grow_config, [f"growth.method={name}", f"seed={seed}", f"output_dir={out}",
                                             "progress=false", *extra, *args.grow_overrides])
        res, wall, cpu = _timed_call(functools.partial(run_grow, cfg, overwrite=True))
        rows.append(_row("grow", Path(args.grow_config).stem, name, res, wall, cpu))
        print(f"  grow {name}: wall {wall:.1f} s, CPU {cpu:.1f} s, test error {res['test_error']!r}",
              file=sys.stderr, flush=True)
    return rows


def report(rows: list[dict]) -> str:
    """The per-phase table (wall / CPU seconds) and the ratio table, as markdown."""
    lines = ["| kind | setting | method | seed | " + " | ".join(PHASES) + " | total | test error |",
             "|---|---|---|---:|" + "---:|" * len(PHASES) + "---:|---:|"]
    for r in rows:
        cells = [f"{r['phase_times'].get(p, 0.0):.1f} / {r['phase_cpu_times'].get(p, 0.0):.1f}" for p in PHASES]
        lines.append(f"| {r['kind']} | {r['setting']} | {r['method']} | {r['seed']} | " + " | ".join(cells)
                     + f" | {r['total_wall']:.1f} / {r['total_cpu']:.1f} | {r['test_error']:.4f} |")
    lines += ["", "Seconds: wall / CPU. Ratios topo / baseline (LoRA for adapt, fixed for grow): of the summed phase "
              "times of results.json (the issue's measure), and of the whole call (model loading and data "
              "preparation included; the first run of a process also pays one-time costs: imports, first data load).",
              "", "| kind | setting | seed | order | phases: wall ratio | phases: CPU ratio | call: wall ratio | "
              "call: CPU ratio | topo's derivative + line search, share of its phase CPU | goal (phases, wall) |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    pairs: dict[tuple, dict] = {}
    for i, r in enumerate(rows):
        pairs.setdefault((r["kind"], r["setting"], r["seed"]), {})[r["method"]] = (i, r)
    for (kind, setting, seed), by in pairs.items():
        topo, base = by.get("topo"), by.get("lora" if kind == "adapt" else "fixed")
        if topo is None or base is None:
            continue
        order = "topo first" if topo[0] < base[0] else "baseline first"
        topo, base = topo[1], base[1]
        ph = {k: sum(r["phase_times"].values()) for k, r in (("t", topo), ("b", base))}
        pc = {k: sum(r["phase_cpu_times"].values()) for k, r in (("t", topo), ("b", base))}
        wall, cpu = ph["t"] / ph["b"], pc["t"] / pc["b"]
        extra = sum(topo["phase_cpu_times"].get(p, 0.0) for p in ("derivative", "line_search")) / pc["t"]
        goal = GOALS[kind]
        lines.append(f"| {kind} | {setting} | {seed} | {order} | {wall:.2f} | {cpu:.2f} | "
                     f"{topo['total_wall'] / base['total_wall']:.2f} | {topo['total_cpu'] / base['total_cpu']:.2f} | "
                     f"{100 * extra:.0f} % | <= {goal}: {'met' if wall <= goal else 'missed'} (CPU "
                     f"{'met' if cpu <= goal else 'missed'}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", type=Path, default=None,
                    help="a pretrained source ViT (save_pretrained dir, e.g. reproduce_transfer's WORK/pretrained); "
                         "default: pretrain one into WORK_DIR/pretrained (with --quick: a tiny one)")
    ap.add_argument("--source", default="mnist")
    ap.add_argument("--target", default="fashion_mnist")
    ap.add_argument("--shots", nargs="*", type=int, default=[10, 50, 100], help="labels per class (none: no adapt)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--no-grow", action="store_true", help="skip the grow pair")
    ap.add_argument("--grow-config", default=GROW_CONFIG)
    ap.add_argument("--grow-overrides", nargs="*", default=[], help="key=value for both grow runs")
    ap.add_argument("--order", nargs=2, default=["baseline", "topo"], choices=["baseline", "topo"],
                    help="which run of a pair goes first")
    ap.add_argument("--num-test", type=int, default=None, help="target test images per adapt run (default: all)")
    ap.add_argument("--work-dir", type=Path, default=Path("outputs/bench_end_to_end"))
    ap.add_argument("--log", type=Path, required=True, help="JSON file of the raw rows (written / read)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (smoke run)")
    ap.add_argument("--report-only", action="store_true", help="print the tables of --log, run nothing")
    ap.add_argument("overrides", nargs="*", help="key=value for every adapt run")
    args = ap.parse_args(argv)
    if sorted(args.order) != ["baseline", "topo"]:
        ap.error("--order takes baseline and topo, once each")
    if args.report_only:
        print(report(json.loads(args.log.read_text())["rows"]))
        return
    torch.set_num_threads(1)
    budget = QUICK if args.quick else FULL
    rows: list[dict] = []
    backbone = args.backbone
    if args.shots and backbone is None:
        backbone = pretrain(args.source, args.work_dir / "pretrained", budget)
    meta = {"command": " ".join(sys.argv), "backbone": str(backbone), "budget": budget, "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                                   time.gmtime())}
    for seed in args.seeds:
        for shots in args.shots:
            rows += run_adapt_pair(backbone, args, budget, shots, seed)
            args.log.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        if not args.no_grow:
            rows += run_grow_pair(args, seed)
            args.log.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(report(rows))


if __name__ == "__main__":
    main()
