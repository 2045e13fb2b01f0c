"""Development seeds only: does mixing a random part into the eigen direction (``growth.init_mix``) train better?

    python scripts/dev_init_mix.py run --setting grow_regression --mix 0.5 --seeds 0 1 2 3 4 --work-dir W
    python scripts/dev_init_mix.py report --setting grow_regression grow_digits      # prints the table
    python scripts/dev_init_mix.py rank --setting grow_regression grow_digits --seeds 0   # the eigen layer's rank

The eigen layer of the row-wise rule is nearly low rank (its rows share the few top eigen-directions of the
probe), and on the growth settings it leads every other initialisation for the first 100-200 epochs after the
insertion and then falls behind a random direction of the same size (scripts/evidence_curves.py). This checks,
on development seeds, the method change that follows: insert sqrt(1 - m^2) * eigen + m * random. Each run is the
evidence protocol's single insertion (same setting, same budget) with the method's own site rule; m = 0 is the
configured run of the committed development sweep (docs/results/evidence/raw/<setting>/sweep_seed<S>.json).
Raw records: docs/results/evidence/dev_mix/<setting>_mix<m>_seed<S>.json (small JSON, no weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence as ev  # noqa: E402  (the scripts folder)

OUT = ev.ROOT / "docs" / "results" / "evidence" / "dev_mix"
DEV_SEEDS = (0, 1, 2, 3, 4)


def _configured(setting: str, seed: int) -> dict:
    """The m = 0 run: this script's own (same code as the m > 0 runs) when it ran, else the committed
    development sweep's run at the site the configured rule picks."""
    own = OUT / f"{setting}_mix0.0_seed{seed}.json"
    if own.is_file():
        return json.loads(own.read_text())["run"]
    raw = json.loads(ev.raw_path(ev.ROOT / "docs/results/evidence/raw", setting, "sweep", seed).read_text())
    return raw["runs"][ev.topo_choice(raw["runs"], "realized")]


def run(setting: str, mix: float, seeds: list[int], work: Path) -> None:
    spec = ev.load_spec()
    for seed in seeds:
        if seed not in DEV_SEEDS:
            raise SystemExit(f"dev_init_mix: seed {seed} is not a development seed {DEV_SEEDS}")
        s = dict(spec["settings"][setting])
        s["overrides"] = [*s.get("overrides", []), f"growth.init_mix={mix}"]
        rec = ev.grow_run(s, seed, Path(work) / setting / f"mix{mix}" / f"seed{seed}")
        out = OUT / f"{setting}_mix{mix}_seed{seed}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"setting": setting, "mix": mix, "seed": seed,
                                   "overrides": s["overrides"], "run": rec}, indent=1, default=str) + "\n")
        print(out, rec["final"]["test_error"])


def effective_rank(w: "torch.Tensor") -> float:
    """(sum_i s_i)^2 / sum_i s_i^2 over the singular values s of ``w`` (d_out, d_in): d for equal singular values,
    1 for rank one."""
    import torch

    s = torch.linalg.svdvals(w.double())
    return float(s.sum() ** 2 / s.square().sum())


def rank(setting: str, seed: int, work: Path) -> dict:
    """Run the setting up to its first insertion (configured rule, m = 0) and measure the inserted weight's
    effective rank next to a Gaussian matrix of the same shape (seeded by ``seed``)."""
    import torch

    import topotransfer.growth as growth
    from topotransfer.config import load_config
    from topotransfer.recipes.grow import run_grow

    spec = ev.load_spec()["settings"][setting]
    over = [*ev.base_overrides(spec), f"seed={seed}", f"output_dir={Path(work) / 'rank' / setting / str(seed)}",
            "progress=false", "growth.method=topo"]
    cfg = load_config(ev.CONFIGS / f"{spec['config']}.yaml", over)
    # stop one epoch after the first growth event: only the inserted layer is wanted
    cfg = load_config(ev.CONFIGS / f"{spec['config']}.yaml", [*over, f"train.epochs={cfg.growth.epochs_per_stage + 1}"])
    seen: list = []
    real = growth.get_family

    def family_that_records(model):
        fam = real(model)
        insert = fam.insert

        def recording(model_, site, layer, *args, **kwargs):
            seen.append((site.name, layer.weight.detach().clone()))
            return insert(model_, site, layer, *args, **kwargs)

        fam.insert = recording
        return fam

    growth.get_family = family_that_records
    try:
        run_grow(cfg, overwrite=True)
    finally:
        growth.get_family = real
    site, w = seen[0]
    gauss = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = torch.linalg.svdvals(w.double())
    rec = {"setting": setting, "seed": seed, "site": site, "shape": list(w.shape),
           "effective_rank": effective_rank(w), "gaussian_effective_rank": effective_rank(gauss),
           "singular_values_rel": [float(x) for x in (s / s[0]).tolist()]}
    out = OUT / f"rank_{setting}_seed{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def rank_table(settings: list[str]) -> str:
    lines = ["| setting | seed | site | shape | effective rank of the eigen layer | of a Gaussian matrix | "
             "singular values below 1 % of the largest |", "|---|---|---|---|---|---|---|"]
    for setting in settings:
        for f in sorted(OUT.glob(f"rank_{setting}_seed*.json")):
            r = json.loads(f.read_text())
            small = sum(x < 0.01 for x in r["singular_values_rel"])
            lines.append(f"| {setting} | {r['seed']} | {r['site']} | {r['shape'][0]} x {r['shape'][1]} | "
                         f"{r['effective_rank']:.2f} | {r['gaussian_effective_rank']:.2f} | {small} |")
    return "\n".join(lines)


def report(settings: list[str]) -> str:
    lines = ["| setting | m | seeds | best-val test (m) | best-val test (m = 0) | final test (m) | final test (m = 0) "
             "| final: (m = 0) − m per seed (m better on) | site same as m = 0 |", "|---|---|---|---|---|---|---|---|---|"]
    for setting in settings:
        scale = 1.0 if setting == "grow_regression" else 100.0
        files = sorted(OUT.glob(f"{setting}_mix*_seed*.json"))
        by_mix: dict[float, list[dict]] = {}
        for f in files:
            d = json.loads(f.read_text())
            by_mix.setdefault(d["mix"], []).append(d)
        for mix, ds in sorted(by_mix.items()):
            if mix == 0.0:
                continue
            ds.sort(key=lambda d: d["seed"])
            base = [_configured(setting, d["seed"]) for d in ds]
            fin = [d["run"]["final"]["test_error"] * scale for d in ds]
            fin0 = [b["final"]["test_error"] * scale for b in base]
            bv = [d["run"]["best"]["test_error"] * scale for d in ds]
            bv0 = [b["best"]["test_error"] * scale for b in base]
            diff = [a - b for a, b in zip(fin0, fin)]
            same = sum(d["run"]["event"].get("site") == b["event"].get("site") for d, b in zip(ds, base))

            def f(xs):
                m, sd = statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
                return f"{m:.3e} ± {sd:.1e}" if scale == 1.0 else f"{m:.2f} ± {sd:.2f}"
            better = sum(x > 0 for x in diff)
            lines.append(f"| {setting} | {mix} | {[d['seed'] for d in ds]} | {f(bv)} | {f(bv0)} | {f(fin)} | {f(fin0)} "
                         f"| {f(diff)} ({better}/{len(diff)}) | {same}/{len(ds)} |")
    text = "\n".join(lines) + "\n\n" + rank_table(settings)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("run", "report", "rank"))
    ap.add_argument("--setting", nargs="+", required=True)
    ap.add_argument("--mix", type=float, default=0.5)
    ap.add_argument("--seeds", nargs="+", type=int, default=list(DEV_SEEDS))
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/topotransfer_dev_mix"))
    ap.add_argument("--out", type=Path, default=None, help="report: write header + tables + --notes here")
    ap.add_argument("--notes", type=Path, default=None, help="report: a reading appended below the tables")
    args = ap.parse_args(argv)
    if args.mode == "run":
        for s in args.setting:
            run(s, args.mix, args.seeds, args.work_dir)
    elif args.mode == "rank":
        for s in args.setting:
            for seed in args.seeds:
                print(rank(s, seed, args.work_dir))
    else:
        text = report(args.setting)
        if args.out:
            command = ("python scripts/dev_init_mix.py report --setting " + " ".join(args.setting)
                       + f" --out {args.out.as_posix()}" + (f" --notes {args.notes.as_posix()}" if args.notes else ""))
            head = ["# Development seeds: the eigen direction mixed with a random one (growth.init_mix)", "",
                    f"Printed by `{command}` from docs/results/evidence/dev_mix (development seeds 0-4 only; "
                    "m = 0 is the same script's run of the configured method, same code as the m > 0 runs).", "",
                    "Final test error: (m = 0) − m per seed, positive = the mix is better; best-val = the "
                    "best-validation model. Errors in MSE (regression) or % (digits).", ""]
            notes = [] if args.notes is None else ["", Path(args.notes).read_text().rstrip()]
            Path(args.out).write_text("\n".join(head + [text] + notes) + "\n")


if __name__ == "__main__":
    main()
