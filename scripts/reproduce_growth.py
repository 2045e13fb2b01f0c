"""Run every growth method on every task with several seeds; write growth.md + plots to --out-dir.

    python scripts/reproduce_growth.py --out-dir docs/results # all tasks, 3 seeds
    python scripts/reproduce_growth.py --tasks regression --seeds 0 1 2 3 4
    python scripts/reproduce_growth.py --quick               # smoke run (tiny budgets)

The fixed baseline is built at the final depth the topo run reached for the same seed, and trained
for the same total epochs. Every run's directory (history.json, results.json, checkpoints) is kept
under --work-dir; the table and PNGs go to --out-dir (default WORK_DIR/report: the tracked docs/results only when
given explicitly). ``--reuse`` reads a finished run back only when its stored config.yaml is the requested one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from topotransfer.config import load_config, to_dict
from topotransfer.plots import plot_learning_curves, plot_site_scores
from topotransfer.recipes.grow import run_grow

METHODS = ["topo", "topo_argmax", "fixed", "random_site", "random_init", "net2deeper", "forward_thinking"]
# Methods that are not a growth.method of their own: the config switches they stand for.
VARIANTS = {"topo_argmax": ["growth.method=topo", "growth.site_selection=argmax"]}
TASK_CONFIGS = {
    "regression": "grow_regression",
    "digits": "grow_digits",
    "mnist": "grow_mnist",
    "digits_cnn": "grow_digits_cnn",
    "digits_vit": "grow_digits_vit",
}
QUICK = ["train.epochs=12", "growth.epochs_per_stage=3", "growth.max_insertions=2", "data.num_train=200",
         "data.num_test=200", "data.num_val=100"]


def run_one(task: str, method: str, seed: int, work: Path, extra: list[str], fixed_depth: int | None,
            reuse: bool = False) -> dict:
    run_dir = work / task / method / f"seed{seed}"
    switch = VARIANTS.get(method, [f"growth.method={method}"])
    over = [f"seed={seed}", *switch, f"output_dir={run_dir}", "progress=false", *extra]
    if method == "fixed" and fixed_depth is not None:
        base = load_config(TASK_CONFIGS_PATH[task], over).model.depth
        over.append(f"growth.max_insertions={max(0, fixed_depth - base)}")
    cfg = load_config(TASK_CONFIGS_PATH[task], over)
    if reuse and (run_dir / "results.json").is_file():
        # only a run of the same config is read back; another config there is run again (and replaces it)
        saved = run_dir / "config.yaml"
        if saved.is_file() and yaml.safe_load(saved.read_text()) == to_dict(cfg):
            return json.loads((run_dir / "results.json").read_text())
        print(f"--reuse: {run_dir} holds a run of another config; running it again", file=sys.stderr)
    return run_grow(cfg, overwrite=True)  # a rerun replaces the earlier run of this work dir


def _fmt(xs: list[float], pct: bool) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}" if pct else f"{m:.3e} ± {s:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASK_CONFIGS), choices=list(TASK_CONFIGS))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--task-seeds", nargs="+", default=[], metavar="TASK=S,S,...",
                    help="seeds of one task instead of --seeds (e.g. regression=0,1,2,3,4,5,6,7,8,9)")
    ap.add_argument("--work-dir", type=Path, default=Path("outputs/reproduce_growth"))
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where growth.md, raw.json and the PNGs go (default: WORK_DIR/report; docs/results only "
                         "when asked)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    ap.add_argument("--reuse", action="store_true",
                    help="read back finished runs in --work-dir made with the same config (others are run again)")
    ap.add_argument("--notes", type=Path, default=None,
                    help="markdown appended to the report after the tables (the hand-written reading of the results)")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = ap.parse_args()
    args.out_dir = args.out_dir or args.work_dir / "report"
    args.seeds_of = {t: list(args.seeds) for t in args.tasks}
    for item in args.task_seeds:
        task, _, seeds = item.partition("=")
        if task not in args.seeds_of or not seeds:
            ap.error(f"--task-seeds {item!r}: expected TASK=S,S,... with TASK one of {args.tasks}")
        args.seeds_of[task] = [int(x) for x in seeds.split(",")]
    extra = (QUICK if args.quick else []) + args.overrides
    methods = ["topo"] + [m for m in args.methods if m != "topo"] if "topo" in args.methods else args.methods

    results: dict[str, dict[str, list[dict]]] = {}
    bar = tqdm(total=len(methods) * sum(len(v) for v in args.seeds_of.values()), desc="runs")
    for task in args.tasks:
        results[task] = {m: [] for m in methods}
        for seed in args.seeds_of[task]:
            topo_depth = None
            for method in methods:
                bar.set_postfix_str(f"{task}/{method}/seed{seed}")
                r = run_one(task, method, seed, args.work_dir, extra, topo_depth, args.reuse)
                if method == "topo":
                    topo_depth = r["depth"]
                results[task][method].append(r)
                bar.update()
    bar.close()
    write_report(results, args, extra)


TASK_CONFIGS_PATH = {t: str(Path(__file__).parents[1] / "topotransfer" / "configs" / f"{c}.yaml")
                     for t, c in TASK_CONFIGS.items()}


def write_report(results: dict, args: argparse.Namespace, extra: list[str]) -> None:
    out = args.out_dir
    (out / "growth").mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python", "scripts/reproduce_growth.py", *sys.argv[1:]])
    nproc = os.cpu_count()  # not `nproc`: it reports OMP_NUM_THREADS when that is set
    lines = [
        "# Growth from scratch: results",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {nproc} CPU cores, torch {torch.__version__}, Python {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d')}, torch threads per run: {torch.get_num_threads()}. Seeds: "
        f"{'; '.join(f'{t} {v}' for t, v in args.seeds_of.items())}. "
        f"Extra overrides: `{' '.join(extra) or 'none'}`.",
        "",
        "Test error = MSE (regression) or 1 − accuracy in % (classification) of the best-validation model, "
        "mean ± std over seeds. Params = final parameter count. Depth = hidden residual layers at the end. "
        "The fixed baseline has the depth the topo run reached (same seed) and the same epochs.",
        "",
    ]
    for task, by_method in results.items():
        cls = any(r.get("test_error", 0) > 0.02 for r in by_method.get("fixed", [])) or task != "regression"
        lines += [f"## {task}", "", "| method | test error | seeds | params | depth | wall time [s] |",
                  "|---|---|---|---|---|---|"]
        for method, runs in by_method.items():
            if not runs:
                continue
            err = _fmt([r["test_error"] for r in runs], pct=cls)
            params = statistics.mean(r["params"] for r in runs)
            depth = statistics.mean(r["depth"] for r in runs)
            wall = statistics.mean(r["wall_time"] for r in runs)
            lines.append(f"| {method} | {err} | {len(runs)} | {params:.0f} | {depth:.1f} | {wall:.1f} |")
        lines.append("")
        seed0 = args.seeds_of[task][0]
        hist = {m: json.loads((args.work_dir / task / m / f"seed{seed0}" / "history.json").read_text())
                for m in by_method if by_method[m]}
        lc = plot_learning_curves(hist, out / "growth" / f"{task}_curves.png", title=f"{task}, seed {seed0}")
        lines.append(f"![learning curves]({lc.relative_to(out)})")
        if "topo" in hist:
            sc = plot_site_scores(hist["topo"]["events"], out / "growth" / f"{task}_scores.png",
                                  title=f"{task}: TD per site at each growth event (red = chosen)")
            lines.append(f"![TD per site]({sc.relative_to(out)})")
        lines.append("")
    if args.notes is not None:
        lines += [args.notes.read_text().rstrip(), ""]
    (out / "growth.md").write_text("\n".join(lines) + "\n")
    (out / "growth" / "raw.json").write_text(json.dumps(
        {t: {m: [{k: v for k, v in r.items() if k != "events"} for r in rs] for m, rs in bm.items()}
         for t, bm in results.items()}, indent=1))
    print((out / "growth.md").read_text())


if __name__ == "__main__":
    main()
