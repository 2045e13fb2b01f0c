"""Every-site sweep ("oracle"): the same single insertion at every site of a frozen setting, one raw file per seed.

    python scripts/sweep_sites.py --setting grow_digits --seeds 0 1 2 3 4             # development seeds
    python scripts/sweep_sites.py --setting grow_digits --seeds 100 101 102 --raw-dir docs/results/evidence/raw
    python scripts/sweep_sites.py --quick --setting grow_digits --seeds 0             # smoke run (tiny budgets)

Per seed: the configured method's own run (topo: it picks its site), then one run with the insertion imposed at
every other site (same rule, same eps line search, same budget), then the references (growth: the network
built at the final depth from the start, ``fixed``; transfer: the setting's ``references``, by default ``lora``
and ``full_finetune``, for the same epochs). A setting with a ``backbone`` (a packaged pretrained model, e.g. the
MiniLM of the text setting) adapts it without a pretraining step; under a parameter budget the insertion at
every site is the same rank-k rule (same budget, same line search). Settings (config, overrides, seeds) are
frozen in docs/results/evidence/spec.json; the protocol is in scripts/_evidence.py and docs/results/evidence.md. Raw files go to ``--raw-dir`` (default: under ``--work-dir``,
never into the repository unless asked); scripts/report_evidence.py makes the tables from them.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence as ev  # noqa: E402  (the scripts folder)

#: Tiny budgets for the smoke run (merged into the setting, so its config hash differs from the real one).
QUICK = {
    "grow": ["train.epochs=4", "growth.epochs_per_stage=2", "data.num_train=120", "data.num_val=60",
             "data.num_test=60"],
    "adapt": ["adapt.head_epochs=1", "adapt.epochs_per_insertion=1", "adapt.final_epochs=0", "probe.batches=1",
              "probe.batch_size=32", "data.num_test=50", "train.max_steps=3"],
}


def quick_setting(setting: dict) -> dict:
    """The setting with tiny budgets (transfer: a tiny ViT pretrained on digits, adapted to 5 digits per class; a
    packaged backbone: itself, adapted to 4 labels per class)."""
    s = copy.deepcopy(setting)
    s["overrides"] = [*s.get("overrides", []), *QUICK[s["recipe"]]]
    if s["recipe"] == "adapt" and s.get("backbone"):
        s.update(shots=4, references=["lora"])
    elif s["recipe"] == "adapt":
        s.update(source="digits", target="digits", shots=5, budget="quick", references=["lora"])
    return s


def run_setting(name: str, setting: dict, seeds: list[int], work: Path, raw_dir: Path,
                references: bool = True) -> list[Path]:
    """Sweep one setting over ``seeds``; returns the raw files written."""
    written = []
    backbone = ev.pretrained(setting, work) if setting["recipe"] == "adapt" else None
    for seed in seeds:
        t0 = time.perf_counter()
        base = work / name / "sweep" / f"seed{seed}"

        def one(label: str, **kw) -> dict:
            out = base / label.replace("/", "_")
            if setting["recipe"] == "grow":
                return ev.grow_run(setting, seed, out, **kw)
            return ev.adapt_run(setting, seed, out, backbone, **kw)

        own = one("configured")  # the configured method, its own site choice
        chosen = own["event"].get("site")
        if chosen is None:  # nothing inserted (no positive score / no rank fits the budget): no site to compare
            raise SystemExit(f"{name} seed {seed}: the configured run inserted nothing "
                             f"({own['event'].get('stopped', 'no event')}); see {base / 'configured'}")
        sites = list(own["event"]["scores"])
        runs = {chosen: own}
        for site in sites:
            if site not in runs:
                runs[site] = one(f"site_{site}", site=site)
        refs = {}
        if references:
            if setting["recipe"] == "grow":
                refs["fixed"] = one("fixed", fixed=True)
            else:
                for method in setting.get("references", ["lora", "full_finetune"]):
                    refs[method] = one(method, method=method)
        written.append(ev.write_raw(raw_dir, name, setting, "sweep", seed, runs,
                                   {"sites": sites, "configured_site": chosen, "references": refs,
                                    "sweep_wall_time": time.perf_counter() - t0}))
        print(f"{name} seed {seed}: {len(runs)} sites, configured -> {chosen}, "
              f"{time.perf_counter() - t0:.0f} s -> {written[-1]}", flush=True)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    ap = ev.script_parser(__doc__)
    ap.add_argument("--no-references", action="store_true", help="sites only (no fixed / lora / full_finetune)")
    args, spec, raw_dir = ev.parse_script_args(ap, argv)
    written = []
    for name in args.setting:
        setting = spec["settings"][name]
        if args.quick:
            setting = quick_setting(setting)
        written += run_setting(name, setting, args.seeds, args.work_dir, raw_dir, not args.no_references)
    return written


if __name__ == "__main__":
    main()
