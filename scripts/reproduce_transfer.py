"""Transfer benchmark: pretrain a small ViT on one packaged dataset, adapt it to another with few labels per
class, compare topotransfer with the usual baselines; write transfer.md (+ raw.json, PNGs) to --out-dir.

    python scripts/reproduce_transfer.py --out-dir docs/results            # mnist -> fashion_mnist, 10 and 50 shots, 3 seeds
    python scripts/reproduce_transfer.py --source digits --target digits --shots 5 --seeds 0 1
    python scripts/reproduce_transfer.py --quick                           # smoke run (tiny budgets, one seed)

Methods (``adapt.method``): linear_probe, full_finetune, lora (rank chosen so that its trainable parameters
match the inserted layers'), random_site and last_block insertion (eigenvector init at that site), topo
(argmax of the topological derivative). Every method trains for the same number of epochs after the same
head warm-up. The pretrained backbone is written once to ``--work-dir/pretrained`` (``save_pretrained`` +
image processor) and reused when present; every adapt run's directory is kept under ``--work-dir``.
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
from torch import nn
from tqdm.auto import tqdm

from topotransfer.config import load_config
from topotransfer.data import load_task
from topotransfer.models.hf import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD, ImageNormalization
from topotransfer.plots import plot_method_comparison, plot_site_scores
from topotransfer.preprocess import prepare_task
from topotransfer.recipes.adapt import run_adapt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchrun import run_or_reuse, wall_text  # noqa: E402  (the scripts folder: shared benchmark helpers)

from topotransfer.training.loop import evaluate, make_loader, train_epoch

METHODS = ["linear_probe", "full_finetune", "lora", "random_site", "last_block", "topo"]
CONFIG = str(Path(__file__).parents[1] / "topotransfer" / "configs" / "adapt_digits_vit.yaml")
FULL = {"width": 64, "depth": 4, "heads": 4, "patch": 4, "pretrain_epochs": 3, "pretrain_num": None,
        "num_test": None, "adapt": ["adapt.head_epochs=5", "adapt.insertions=2", "adapt.epochs_per_insertion=10",
                                    "adapt.final_epochs=5", "probe.batches=4", "probe.batch_size=128"]}
QUICK = {"width": 16, "depth": 2, "heads": 2, "patch": 4, "pretrain_epochs": 1, "pretrain_num": 300,
         "num_test": 100, "adapt": ["adapt.head_epochs=1", "adapt.insertions=1", "adapt.epochs_per_insertion=1",
                                    "adapt.final_epochs=0", "probe.batches=1", "probe.batch_size=64"]}


def pretrain(source: str, out: Path, budget: dict, seed: int = 0) -> Path:
    """Train a small ViT on ``source`` and write it with ``save_pretrained`` (+ its image processor)."""
    from transformers import ViTConfig, ViTForImageClassification

    if (out / "config.json").is_file():
        info = json.loads((out / "pretrain.json").read_text())
        asked = {"epochs": budget["pretrain_epochs"], "num_train_requested": budget["pretrain_num"]}
        if any(k in info and info[k] != v for k, v in asked.items()):
            raise SystemExit(f"{out} holds a backbone pretrained with {info}, not {asked}: use another --work-dir")
        return out
    torch.manual_seed(seed)
    task = load_task(source, seed=seed, num_train=budget["pretrain_num"], num_test=budget["num_test"])
    channels, h, _ = task.input_shape  # gray sources give a gray backbone (no 3x copy of the data)
    size = h if h % budget["patch"] == 0 else (h // budget["patch"] + 1) * budget["patch"]
    mean, std = DEFAULT_IMAGE_MEAN[:channels], DEFAULT_IMAGE_STD[:channels]
    task = prepare_task(task, size, channels, ImageNormalization(mean, std))
    config = ViTConfig(hidden_size=budget["width"], num_hidden_layers=budget["depth"],
                       num_attention_heads=budget["heads"], intermediate_size=2 * budget["width"], image_size=size,
                       patch_size=budget["patch"], num_channels=channels, num_labels=task.num_outputs,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for epoch in tqdm(range(budget["pretrain_epochs"]), desc=f"pretrain on {source}", leave=False):
        train_epoch(model, make_loader(task.train, 128, shuffle=True, seed=epoch), opt, nn.CrossEntropyLoss())
    test = evaluate(model, make_loader(task.test, 256), "classification")
    model.save_pretrained(out)
    # what ViTImageProcessor.save_pretrained writes (without needing torchvision for its default backend)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean),
        "image_std": list(std)}, indent=1))
    (out / "pretrain.json").write_text(json.dumps({"source": source, "test_error": test["error"],
                                                   "num_train": len(task.train), "image_size": size,
                                                   "epochs": budget["pretrain_epochs"],
                                                   "num_train_requested": budget["pretrain_num"]}, indent=1))
    return out


def matched_lora_rank(width: int, depth: int, insertions: int, targets: int = 2) -> int:
    """LoRA rank whose trainable parameters (targets x depth x r x 2 width) match ``insertions`` TopoLayers
    (width^2 + width each)."""
    return max(1, round(insertions * (width * width + width) / (targets * depth * 2 * width)))


def run_one(base: Path, target: str, method: str, shots: int, seed: int, work: Path, extra: list[str],
            lora_rank: int, num_classes: int, num_test: int | None, reuse: bool = False,
            report_only: bool = False) -> dict | None:
    """One adapt run (its directory: ``work/<shots>shot/<method>/seed<seed>``); with ``reuse``, a finished run
    of the same config there is read back instead of rerun (an interrupted benchmark continues); with
    ``report_only``, a run that is not finished there is skipped (``None``), and so is, with ``reuse``, a run
    another process has claimed."""
    n = shots * num_classes
    out = work / f"{shots}shot" / method / f"seed{seed}"
    over = [f"model.name_or_path={base}", f"data.name={target}", f"data.num_train={n}", f"data.num_val={n}",
            f"seed={seed}", f"adapt.method={method}", f"adapt.lora_r={lora_rank}", "adapt.lora_alpha=16",
            f"output_dir={out}", "progress=false", *extra]
    if num_test is not None:
        over.append(f"data.num_test={num_test}")
    if method == "full_finetune":
        over.append("adapt.backbone_lr=0.0003")
    cfg = load_config(CONFIG, over)
    return run_or_reuse(cfg, out, reuse, report_only, run_adapt)  # looked up here: tests replace run_adapt


def _fmt(xs: list[float]) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="mnist", help="pretraining task (load_task name)")
    ap.add_argument("--target", default="fashion_mnist", help="adaptation task (load_task name)")
    ap.add_argument("--shots", nargs="+", type=int, default=[10, 50], help="labelled examples per class")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--work-dir", type=Path, default=Path("outputs/reproduce_transfer"))
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the report, raw.json and the PNGs go (default: WORK_DIR/report; docs/results only "
                         "when asked)")
    ap.add_argument("--quick", action="store_true", help="tiny model and budgets, one seed, 5 shots (smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help="pretraining epochs (default: 3; quick: 1)")
    ap.add_argument("--pretrain-num", type=int, default=None, help="pretraining images (default: all)")
    ap.add_argument("--num-test", type=int, default=None, help="target test images per run (default: all)")
    ap.add_argument("--reuse", action="store_true",
                    help="read back runs already finished in --work-dir with the same config instead of rerunning them")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report from the runs finished in --work-dir with the same config")
    ap.add_argument("--notes", type=Path, default=None,
                    help="markdown inserted after the tables (the hand-written reading of the results)")
    ap.add_argument("overrides", nargs="*", help="key=value applied to every adapt run")
    args = ap.parse_args(argv)
    args.out_dir = args.out_dir or args.work_dir / "report"
    if args.quick:
        args.seeds, args.shots = args.seeds[:1], [5]
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = dict(QUICK if args.quick else FULL)
    for key in ("pretrain_epochs", "pretrain_num", "num_test"):
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)
    extra = budget["adapt"] + args.overrides

    t0 = time.perf_counter()
    base = pretrain(args.source, args.work_dir / "pretrained", budget)
    pretrain_info = json.loads((base / "pretrain.json").read_text())
    insertions = load_config(CONFIG, extra).adapt.insertions
    rank = matched_lora_rank(budget["width"], budget["depth"], insertions)
    num_classes = load_task(args.target).num_outputs

    results: dict[int, dict[str, list[dict]]] = {}
    bar = tqdm(total=len(args.shots) * len(args.methods) * len(args.seeds), desc="adapt runs")
    for shots in args.shots:
        results[shots] = {m: [] for m in args.methods}
        for seed in args.seeds:
            for method in args.methods:
                bar.set_postfix_str(f"{shots}shot/{method}/seed{seed}")
                result = run_one(base, args.target, method, shots, seed, args.work_dir, extra,
                                 rank, num_classes, budget["num_test"], args.reuse or args.report_only,
                                 args.report_only)
                if result is not None:
                    results[shots][method].append(result)
                bar.update()
            # a report after every seed: an interrupted benchmark still leaves the seeds it finished
            write_report(results, args, extra, pretrain_info, rank, time.perf_counter() - t0, final=False)
    bar.close()
    complete = sum(len(v) for bm in results.values() for v in bm.values()) == (
        len(args.shots) * len(args.methods) * len(args.seeds))
    return write_report(results, args, extra, pretrain_info, rank, time.perf_counter() - t0, final=complete)


def write_report(results: dict, args: argparse.Namespace, extra: list[str], pretrain_info: dict, rank: int,
                 wall: float, final: bool = True) -> Path:
    """Write ``transfer.md``, its plots and ``transfer/raw.json``; ``final=False`` marks a partial report."""
    out = args.out_dir
    (out / "transfer").mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python", "scripts/reproduce_transfer.py", *sys.argv[1:]])
    nproc = os.cpu_count()
    lines = [
        "# Transfer: pretrained ViT adapted with few labels per class",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {nproc} CPU cores, torch {torch.__version__}, Python {platform.python_version()}; date "
        f"{time.strftime('%Y-%m-%d')}; {wall_text(results, args, wall)}. Seeds: {args.seeds}. "
        f"Overrides: `{' '.join(extra) or 'none'}`.",
        "",
        *([] if final else ["**Partial report**: the benchmark was still running (or was stopped); the tables hold "
                            "the runs finished so far, see the seed counts.", ""]),
        f"Backbone: ViT pretrained on `{pretrain_info['source']}` ({pretrain_info['num_train']} images, "
        f"{pretrain_info.get('epochs', 3)} epochs, "
        f"{pretrain_info['image_size']}x{pretrain_info['image_size']}), test error there "
        f"{100 * pretrain_info['test_error']:.2f} %. Target: `{args.target}`, N labelled examples per class for "
        "training and as many for validation (line search); test error = 1 − accuracy in % on "
        f"{'the test split' if args.num_test is None else f'{args.num_test} images of the test split'} of the "
        f"final model, mean ± std over seeds. LoRA rank {rank} (q/v) matches the trainable parameters of the "
        "inserted layers. Trainable = parameters trained after the head warm-up (head included).",
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
    bars = plot_method_comparison(errors, out / "transfer" / "test_error.png",
                                  title=f"{pretrain_info['source']} -> {args.target}: test error, mean ± std over seeds")
    if getattr(args, "notes", None) is not None:
        lines += [args.notes.read_text().rstrip(), ""]
    lines += ["## Plots", "", f"![test error per method]({bars.relative_to(out).as_posix()})", ""]
    for shots, by_method in results.items():
        topo_runs = by_method.get("topo") or []
        events = topo_runs[0].get("events", []) if topo_runs else []
        if any(e.get("scores") for e in events):
            png = plot_site_scores(events, out / "transfer" / f"scores_{shots}shot.png",
                                   title=f"{shots} labels/class, seed {topo_runs[0]['seed']}: TD per site (red: chosen)")
            lines += [f"![site scores, {shots} labels per class]({png.relative_to(out).as_posix()})", ""]
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    (out / "transfer" / "raw.json").write_text(json.dumps(
        {str(s): {m: [{k: v for k, v in r.items() if k != "history"} for r in rs] for m, rs in bm.items()}
         for s, bm in results.items()}, indent=1, default=float))
    if final:
        print((out / "transfer.md").read_text())
    return out / "transfer.md"


if __name__ == "__main__":
    main()
