"""The regression task in the published setting (config ``grow_regression_paper``): every growth method on
several seeds, one small raw JSON per (method, seed), and the table beside the published numbers.

    python scripts/reproduce_regression_paper.py run --seeds 100-109            # all methods, 2 runs at a time
    python scripts/reproduce_regression_paper.py run --seeds 0-4 --methods topo fixed --raw-dir /tmp/dev \\
        growth.check_every=200                                                  # a development variant
    python scripts/reproduce_regression_paper.py report --seeds 100-109         # print the table from the raw files
    python scripts/reproduce_regression_paper.py report --seeds 100-109 --update docs/results/growth.md

``run`` starts one process per (method, seed) (``nice -n 10``, one torch thread, at most ``--jobs`` at a time);
each writes ``<raw-dir>/<method>/seed<seed>.json``: the resolved config, test MSE of the best-validation and of
the final model with their depth and parameter count, parameter-epochs, wall and CPU time, and the growth
events without weights. Run directories (checkpoints) go under ``--work-dir``. ``report`` reads only the raw
files and fails when one is missing or was made with another config than the one requested (config file plus
the same ``key=value`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "grow_regression_paper"
METHODS = ["topo", "topo_argmax", "fixed", "random_site", "random_init", "net2deeper", "forward_thinking"]
# Methods that are not a growth.method of their own: the config switches they stand for.
VARIANTS = {"topo_argmax": ["growth.method=topo", "growth.site_selection=argmax"]}
# Test MSE on f(x, y) = exp(-0.1 (x^2 + y^2)) sin(x) cos(y) from the group's follow-up paper (an error-estimate
# based insertion method, not the topological derivative; its own data and budgets).
PUBLISHED = {"proposed (follow-up paper)": 9.0e-6, "fixed": 3.82e-5, "random insertion": 9.41e-5,
             "net2deeper": 7.66e-5, "forward_thinking": 7.1e-4}
PUBLISHED_ROW = {"topo": "proposed (follow-up paper)", "fixed": "fixed", "random_site": "random insertion",
                 "net2deeper": "net2deeper", "forward_thinking": "forward_thinking"}
# Keys of the resolved config that differ between the runs of one table by design.
PER_RUN_KEYS = ("seed", "output_dir", "progress")
BEGIN, END = "<!-- regression_paper:begin -->", "<!-- regression_paper:end -->"


class ReportError(RuntimeError):
    """A raw file is missing, unreadable, or was produced by another config."""


def parse_seeds(text: str) -> list[int]:
    """``"100-109"`` or ``"0,2,5"`` (or a mix) -> sorted seeds."""
    seeds: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            seeds.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r} (e.g. 100-109 or 0,1,2)") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"empty seed list {text!r}")
    return sorted(seeds)


def overrides_for(method: str, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    switch = VARIANTS.get(method, [f"growth.method={method}"])
    return [f"seed={seed}", *switch, f"output_dir={run_dir}", "progress=false", *extra]


def comparable_config(cfg_dict: dict) -> dict:
    """The resolved config without the keys that differ from run to run by design."""
    return {k: v for k, v in cfg_dict.items() if k not in PER_RUN_KEYS}


def config_path(config: str) -> Path:
    """A YAML path, or the name of a built-in config (topotransfer/configs/<name>.yaml)."""
    path = Path(config)
    if path.is_file():
        return path
    builtin = ROOT / "topotransfer" / "configs" / (config if config.endswith(".yaml") else f"{config}.yaml")
    if not builtin.is_file():
        sys.exit(f"error: config {config!r} is neither a file nor a built-in config")
    return builtin


def expected_config(config: str, method: str, extra: list[str]) -> dict:
    from topotransfer.config import load_config, to_dict

    cfg = load_config(config_path(config), overrides_for(method, 0, Path("x"), extra))
    return comparable_config(to_dict(cfg))


def run_one(config: str, method: str, seed: int, work_dir: Path, raw_dir: Path, extra: list[str]) -> dict:
    """Run one (method, seed) in this process and write its raw JSON (no weights)."""
    import torch

    from topotransfer.config import load_config, to_dict
    from topotransfer.recipes.grow import run_grow

    torch.set_num_threads(1)
    run_dir = work_dir / method / f"seed{seed}"
    if run_dir.exists():  # a fresh run every time: never resume a half-finished or older run silently
        import shutil

        shutil.rmtree(run_dir)
    cfg = load_config(config_path(config), overrides_for(method, seed, run_dir, extra))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    res = run_grow(cfg)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    hist = json.loads((run_dir / "history.json").read_text())["epochs"]
    best = next(h for h in hist if h["epoch"] == res["best_epoch"])
    events = [{k: e.get(k) for k in ("event", "epoch", "site", "epsilon", "sign", "scores", "realized",
                                      "loss_before", "loss_after", "depth", "params", "stopped")}
              for e in res["events"]]
    record = {
        "method": method, "seed": seed, "config_name": config, "overrides": extra,
        "config": comparable_config(to_dict(cfg)),
        "test_mse": res["test_loss"], "final_test_mse": res["final_test_error"],
        "best_epoch": res["best_epoch"], "best_depth": best["depth"], "best_params": best["params"],
        "depth": res["depth"], "params": res["params"], "insertions": res["insertions"],
        "epochs": len(hist), "param_epochs": sum(h["params"] for h in hist),
        "best_val_mse": min(h["val_loss"] for h in hist), "final_val_mse": hist[-1]["val_loss"],
        "final_train_mse": hist[-1]["train_loss"],
        "stage_epochs": [e["epoch"] for e in res["events"] if e.get("site")],
        "wall_time": wall, "cpu_time": cpu, "torch": torch.__version__, "python": platform.python_version(),
        "events": events,
    }
    raw_dir.joinpath(method).mkdir(parents=True, exist_ok=True)
    (raw_dir / method / f"seed{seed}.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    return record


def check_overrides(config: str, methods: list[str], extra: list[str]) -> None:
    """Fail with one line, before anything runs, when the config or an override cannot be used."""
    from topotransfer.config import ConfigError

    for m in methods:
        try:
            expected_config(config, m, extra)
        except ConfigError as e:
            sys.exit(f"error: {e}")


def cmd_run(args: argparse.Namespace) -> None:
    check_overrides(args.config, args.methods, args.overrides)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    failed = []

    def reap(block: bool) -> None:
        while running and (block or any(p.poll() is not None for p, *_ in running)):
            for item in list(running):
                p, m, s, t0 = item
                if p.poll() is not None:
                    running.remove(item)
                    status = "ok" if p.returncode == 0 else f"FAILED ({p.returncode})"
                    if p.returncode != 0:
                        failed.append((m, s))
                    print(f"{m} seed {s}: {status} in {time.perf_counter() - t0:.0f} s", flush=True)
            if running and block:
                time.sleep(0.5)
            elif not block:
                break

    for m, s in jobs:
        while len(running) >= args.jobs:
            time.sleep(0.5)
            reap(block=False)
        cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "_one", "--config", args.config,
               "--method", m, "--seed", str(s), "--work-dir", str(args.work_dir), "--raw-dir", str(args.raw_dir),
               *args.overrides]
        log = args.work_dir / "logs" / f"{m}_seed{s}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            running.append((subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env), m, s,
                            time.perf_counter()))
    reap(block=True)
    if failed:
        sys.exit(f"{len(failed)} run(s) failed: {failed}; logs in {args.work_dir / 'logs'}")


def config_diff(want: dict, got: dict, defaults: dict | None = None) -> list[str]:
    """Dotted keys of ``want`` whose value ``got`` differs in. Keys only in ``got`` are options the code no
    longer has (removed after the run); keys only in ``want`` are options added after the run, accepted when
    requested at their default (the old code behaved as the default). Anything else is a difference."""
    if defaults is None:
        from topotransfer.config import RunConfig, to_dict

        defaults = comparable_config(to_dict(RunConfig()))
    out = []
    for key, value in want.items():
        if isinstance(value, dict) and isinstance(got.get(key), dict):
            out += [f"{key}.{k}" for k in config_diff(value, got[key], defaults.get(key) or {})]
        elif key not in got:
            if key not in defaults or defaults[key] != value:
                out.append(key)
        elif got[key] != value:
            out.append(key)
    return sorted(out)


def load_raw(raw_dir: Path, config: str, methods: list[str], seeds: list[int], extra: list[str]) -> dict:
    """``{method: {seed: record}}``; raises :class:`ReportError` on a missing file or a config mismatch."""
    out: dict = {}
    for m in methods:
        want = expected_config(config, m, extra)
        out[m] = {}
        for s in seeds:
            path = raw_dir / m / f"seed{s}.json"
            if not path.is_file():
                raise ReportError(f"missing raw file {path} (run: reproduce_regression_paper.py run --methods {m} "
                                  f"--seeds {s})")
            rec = json.loads(path.read_text())
            diff = config_diff(want, rec.get("config") or {})
            if diff:
                raise ReportError(f"{path} was produced by another config (differs in {diff})")
            out[m][s] = rec
    return out


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2e} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1e}"


def _mean(xs: list[float], fmt: str = ".1f") -> str:
    return format(statistics.mean(xs), fmt)


def report(raw: dict, seeds: list[int], command: str) -> str:
    methods = list(raw)
    any_rec = raw[methods[0]][seeds[0]]
    lines = [
        "## Published setting of the regression task (config `grow_regression_paper`)",
        "",
        f"Command: `{command}`  ",
        f"Raw data: `docs/results/regression_paper/<method>/seed<seed>.json` (made by `reproduce_regression_paper.py "
        f"run`). Seeds {', '.join(map(str, seeds))} ({len(seeds)}), torch {any_rec['torch']}, Python {any_rec['python']}, "
        "one torch thread per run, 2 runs at a time on 2 shared CPU cores.",
        "",
        "Test MSE on 2000 test points, mean ± std over seeds. *best-val* = the model with the lowest validation "
        "MSE (what `results.json` reports), *final* = the model at the end of the budget; depth = hidden residual "
        "layers, params = all parameters of that model. Param-epochs = parameters summed over the epochs trained.",
        "",
        "| method | test MSE best-val | depth | params | test MSE final | depth | params | param-epochs | "
        "wall [s] | CPU [s] | published test MSE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = [raw[m][s] for s in seeds]
        pub = PUBLISHED.get(PUBLISHED_ROW.get(m, ""), None)
        pub_txt = f"{pub:.2e} ({PUBLISHED_ROW[m]})" if pub is not None else "–"
        lines.append(
            f"| {m} | {_ms([r['test_mse'] for r in rs])} | {_mean([r['best_depth'] for r in rs])} | "
            f"{_mean([r['best_params'] for r in rs], '.0f')} | {_ms([r['final_test_mse'] for r in rs])} | "
            f"{_mean([r['depth'] for r in rs])} | {_mean([r['params'] for r in rs], '.0f')} | "
            f"{statistics.mean([r['param_epochs'] for r in rs]):.2e} | {_mean([r['wall_time'] for r in rs], '.0f')} | "
            f"{_mean([r['cpu_time'] for r in rs], '.0f')} | {pub_txt} |"
        )
    if "topo" in raw:
        lines += ["", "Paired per-seed differences, baseline − topo test MSE (positive: topo lower), mean ± std, "
                  "and the seeds on which topo is lower:", "",
                  "| baseline | best-val: diff | topo lower | final: diff | topo lower |", "|---|---|---|---|---|"]
        for m in methods:
            if m == "topo":
                continue
            cells = []
            for key in ("test_mse", "final_test_mse"):
                d = [raw[m][s][key] - raw["topo"][s][key] for s in seeds]
                cells += [_ms(d), f"{sum(x > 0 for x in d)}/{len(d)}"]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        topo = statistics.mean(raw["topo"][s]["test_mse"] for s in seeds)
        below = [name for name, v in PUBLISHED.items() if topo <= v]
        lines += ["", f"Goal check: topo's mean best-val test MSE {topo:.2e} vs the published proposed method 9.0e-6: "
                  f"{'met' if topo <= 9.0e-6 else 'not met'}; at or below the published "
                  f"{', '.join(below) if below else 'none of the published rows'}."]
    return "\n".join(lines) + "\n"


def cmd_report(args: argparse.Namespace) -> None:
    check_overrides(args.config, args.methods, args.overrides)
    try:
        raw = load_raw(args.raw_dir, args.config, args.methods, args.seeds, args.overrides)
    except ReportError as e:
        sys.exit(f"error: {e}")
    contiguous = len(args.seeds) > 1 and args.seeds == list(range(args.seeds[0], args.seeds[-1] + 1))
    seeds_txt = f"{args.seeds[0]}-{args.seeds[-1]}" if contiguous else ",".join(map(str, args.seeds))
    flags = [f"--{k} {v}" for k, v in (("notes", args.notes), ("update", args.update)) if v is not None]
    command = " ".join(["python scripts/reproduce_regression_paper.py report --seeds", seeds_txt, *flags, *args.overrides])
    text = report(raw, args.seeds, command)
    if args.notes is not None:
        text += "\n" + args.notes.read_text().rstrip() + "\n"
    print(text)
    if args.update is not None:
        doc = args.update.read_text()
        block = f"{BEGIN}\n{text}{END}"
        if BEGIN in doc and END in doc:
            doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip() + "\n\n" + block + "\n"
        args.update.write_text(doc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "_one"):
        p = sub.add_parser(name)
        p.add_argument("--config", default=CONFIG, help="config name or YAML path")
        p.add_argument("--raw-dir", type=Path, default=ROOT / "docs" / "results" / "regression_paper")
        p.add_argument("overrides", nargs="*", help="key=value applied to every run (and expected by report)")
        if name == "_one":
            p.add_argument("--method", required=True, choices=METHODS)
            p.add_argument("--seed", type=int, required=True)
            p.add_argument("--work-dir", type=Path, required=True)
            continue
        p.add_argument("--seeds", type=parse_seeds, required=True, help="e.g. 100-109 or 0,1,2")
        p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
        if name == "run":
            p.add_argument("--work-dir", type=Path, default=Path("outputs/reproduce_regression_paper"))
            p.add_argument("--jobs", type=int, default=2, help="runs at a time")
        else:
            p.add_argument("--notes", type=Path, default=None, help="markdown appended after the tables")
            p.add_argument("--update", type=Path, default=None,
                           help="also write the section into this markdown file (between its markers)")
    args = ap.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        ap.error(f"overrides must be key=value, got {bad}")
    if args.cmd == "_one":
        run_one(args.config, args.method, args.seed, args.work_dir, args.raw_dir, args.overrides)
    elif args.cmd == "run":
        cmd_run(args)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
