"""How long does an initialisation's (or a site's) head start last? Validation loss after the insertion, per epoch.

    python scripts/evidence_curves.py collect --work-dir W --setting grow_digits --seeds 105 106   # W: the
        # --work-dir of scripts/sweep_sites.py / ablate_init.py; writes docs/results/evidence/curves/<setting>_seed<S>.json
    python scripts/evidence_curves.py report --setting grow_digits grow_regression               # prints the tables

The single-insertion runs of the every-site sweep and of the initialisation ablation all share the state up to
the insertion (event 0) and train for the same number of epochs after it. The sweep and ablation raw files keep
the end points only (best-validation and final model); the one-shot held-out loss right after the insertion and
the final error disagree about which initialisation is better (docs/results/evidence.md), and this script shows
what happens in between: the validation loss of every run at fixed numbers of epochs after the insertion,
relative to the configured run (the eigen initialisation at the method's own site) on the same seed.

The curve files are small (one validation loss per epoch after the insertion, per run; no weights) and are the
only input of ``report``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CURVES = ROOT / "docs" / "results" / "evidence" / "curves"
# epochs after the insertion at which the table compares runs ("end" = the last epoch)
OFFSETS = (1, 5, 20, 50, 100, 200, "end")


def _run_curve(run_dir: Path) -> dict | None:
    """``{"insert_epoch", "val_loss": [after epoch insert+1, ...], "site"}`` of one finished single-insertion run."""
    res, hist = run_dir / "results.json", run_dir / "history.json"
    if not (res.is_file() and hist.is_file()):
        return None
    events = json.loads(res.read_text()).get("events") or []
    if not events:
        return None
    t = int(events[0]["epoch"])
    epochs = json.loads(hist.read_text())["epochs"]
    return {"insert_epoch": t, "site": events[0].get("site"),
            "val_loss": [float(f"{e['val_loss']:.5g}") for e in epochs if e["epoch"] > t]}  # 5 digits: small file


def collect(work: Path, setting: str, seed: int, out_dir: Path = CURVES) -> Path:
    """Gather the post-insertion validation curves of every run of (setting, seed) under ``work`` into one file.

    Runs: ``sweep/seed<S>/<name>`` (``configured`` = the method's own choice; ``site_<site>`` = imposed site)
    and ``ablation/seed<S>/<init>``; the ``fixed`` reference (no insertion) is skipped.
    """
    runs: dict[str, dict] = {}
    for kind in ("sweep", "ablation"):
        base = Path(work) / setting / kind / f"seed{seed}"
        if not base.is_dir():
            continue
        for run_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            curve = _run_curve(run_dir)
            if curve is not None:
                runs[f"{kind}/{run_dir.name}"] = curve
    if "sweep/configured" not in runs:
        raise SystemExit(f"evidence_curves: no finished sweep/configured run of {setting} seed {seed} under {work}")
    lengths = {len(c["val_loss"]) for c in runs.values()}
    if len(lengths) != 1:
        raise SystemExit(f"evidence_curves: runs of {setting} seed {seed} trained different epochs after the "
                         f"insertion ({sorted(lengths)}): not comparable")
    out = Path(out_dir) / f"{setting}_seed{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setting": setting, "seed": seed, "runs": runs}) + "\n")
    return out


def _at(curve: list[float], offset) -> float:
    """The lowest validation loss within ``offset`` epochs after the insertion (the best-validation model's
    loss had training stopped there): one epoch's loss swings by up to +-50 % at a constant rate late in a
    regression run, the running minimum does not."""
    n = len(curve) if offset == "end" else min(int(offset), len(curve))
    return min(curve[:n])


def table(setting: str, seeds: list[int], curves_dir: Path = CURVES) -> list[str]:
    """One row per run name (sweep sites and initialisations): at each offset, the mean over seeds of
    100 * (val_loss(run) / val_loss(configured) - 1) and on how many seeds the configured run is lower."""
    data = {}
    for s in seeds:
        p = Path(curves_dir) / f"{setting}_seed{s}.json"
        if not p.is_file():
            raise SystemExit(f"evidence_curves: missing {p}: run `collect` for {setting} seed {s}")
        data[s] = json.loads(p.read_text())["runs"]
    names = sorted({n for runs in data.values() for n in runs} - {"sweep/configured"})
    cols = [f"+{o}" if o != "end" else "end" for o in OFFSETS]
    lines = [f"### {setting}: validation loss after the insertion, relative to the configured run (seeds {seeds})",
             "",
             "Each cell: mean over seeds of 100 × (best val loss of the run / best val loss of the configured run − 1), "
             "best = the lowest validation loss within that many epochs after the insertion (> 0: the "
             "configured eigen insertion is ahead), and "
             "in brackets on how many seeds the configured run's loss is strictly lower. The configured run "
             "is the method's own site with the configured eigen rule; `sweep/site_X` = the same insertion at "
             "site X; `ablation/<init>` = another initialisation at the configured run's site.",
             "",
             "| run | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name in names:
        seeds_n = [s for s in seeds if name in data[s]]
        cells = []
        for o in OFFSETS:
            rel = [100 * (_at(data[s][name]["val_loss"], o) / _at(data[s]["sweep/configured"]["val_loss"], o) - 1)
                   for s in seeds_n]
            ahead = sum(r > 0 for r in rel)
            cells.append(f"{statistics.mean(rel):+.1f} ({ahead}/{len(rel)})" if rel else "–")
        lines.append(f"| {name} | {len(seeds_n)} | " + " | ".join(cells) + " |")
    same = {s: [n for n, c in data[s].items() if n.startswith("sweep/site_") and
                c["site"] == data[s]["sweep/configured"]["site"]] for s in seeds}
    lines += ["", "An imposed-site run at the configured run's own site repeats it (same state, same insertion): "
              f"{sum(len(v) for v in same.values())} such rows over the seeds are in the means above "
              "(their cells are 0)."]
    return lines


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("collect", "report"))
    ap.add_argument("--setting", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="default (report): every seed with a curve file")
    ap.add_argument("--work-dir", type=Path, default=None, help="collect: the sweep / ablation --work-dir")
    ap.add_argument("--curves-dir", type=Path, default=CURVES)
    ap.add_argument("--out", type=Path, default=None, help="report: also write the tables here (markdown)")
    args = ap.parse_args(argv)
    if args.mode == "collect":
        if args.work_dir is None or not args.seeds:
            ap.error("collect needs --work-dir and --seeds")
        for name in args.setting:
            for s in args.seeds:
                print(collect(args.work_dir, name, s, args.curves_dir))
        return ""
    command = "python scripts/evidence_curves.py report --setting " + " ".join(args.setting) + (
        f" --out {args.out.as_posix()}" if args.out else "")
    out = ["# Evidence: how long the insertion's head start lasts", "",
           f"Printed by `{command}` from the curve files in docs/results/evidence/curves "
           "(collected from the runs of the report seeds named in each table; scripts/evidence_curves.py says how).", ""]
    for name in args.setting:
        seeds = args.seeds or sorted(int(p.stem.rsplit("_seed", 1)[1])
                                     for p in Path(args.curves_dir).glob(f"{name}_seed*.json"))
        out += table(name, seeds, args.curves_dir) + [""]
    text = "\n".join(out).rstrip() + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
