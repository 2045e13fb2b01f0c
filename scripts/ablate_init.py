"""Initialisation ablation at a fixed site: the configured method's own run picks the site, then the same single
insertion there with every other initialisation (same eps line search, same budget). One raw file per seed.

    python scripts/ablate_init.py --setting grow_digits --seeds 0 1 2 3 4
    python scripts/ablate_init.py --setting grow_digits --seeds 100 101 --raw-dir docs/results/evidence/raw
    python scripts/ablate_init.py --quick --setting grow_digits --seeds 0             # smoke run
    python scripts/ablate_init.py --setting grow_digits --seeds 100 --raw-dir docs/results/evidence/raw \
        --add random_same_eps     # add initialisations to a seed's existing raw file (site and eps read from it)

Initialisations (labels of the raw file):

- ``top1``, ``cluster``, ``rowwise``, ``rowwise_whiten``: the eigen direction of that rule at the site (the
  configured rule's is the configured run itself; under a parameter budget spent on rank-k layers, only the
  row-wise rules, which give the per-row eigenvalues the ranks are chosen from);
- ``random``: a Gaussian direction scaled exactly like the configured rule's eigen direction at the site (same
  Frobenius norm; under the whitened rule the same mean-square pre-activation:
  :func:`topotransfer.growth.scale_matched_random_direction`), same line search over eps and sign (rank-k: the
  same rows and rank as the eigen layer, a random [V | c] of unit norm like the eigen one);
- ``random_same_eps`` (growth only): the same random direction as ``random`` (same generator, same scale),
  inserted at exactly the eps the configured rule's line search chose (a one-value grid: no eps search of its
  own, only the sign is chosen, as for every direction), so that both layers start equally large;
- ``net2deeper`` (growth only): a zero layer with tanh activation (Net2DeeperNet identity; nothing to search).

No silent eps fallback: when no eps of the grid lowers the held-out loss, the layer goes in at the smallest eps
and the raw record says so (``event.eps_fallback``), with its initial norm (``event.init_norm``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence as ev  # noqa: E402  (the scripts folder)
from sweep_sites import quick_setting  # noqa: E402

RULES = {
    "top1": ["probe.rule=top1"],
    "cluster": ["probe.rule=cluster"],
    "rowwise": ["probe.rule=rowwise", "probe.whiten=false"],
    "rowwise_whiten": ["probe.rule=rowwise", "probe.whiten=true"],
}


def configured_rule(setting: dict) -> str:
    probe = ev.resolved_config(setting)["probe"]
    if probe["rule"] == "rowwise":
        return "rowwise_whiten" if probe["whiten"] else "rowwise"
    return probe["rule"]


def random_direction(seed: int):
    """The adapt-side random baseline: replace the site result's direction by a scale-matched Gaussian one."""
    from topotransfer.growth import scale_matched_random_direction

    def direction(model, data, result):
        gen = torch.Generator().manual_seed(7919 * (seed + 1))
        w, b = scale_matched_random_direction(result.weight, result.bias, gen)
        return dataclasses.replace(result, weight=w, bias=b, quadratic=math.nan)

    return direction


def initialisations(grow: bool, own_rule: str, seed: int, eps: float, rank_k: bool = False) -> list[tuple[str, dict]]:
    """(label, keyword arguments of the run) of every initialisation but the configured one, in run order.
    ``rank_k``: a parameter budget spent on rank-k layers, which take their rows from the row-wise eigenvalues:
    only the row-wise rules apply (``random`` keeps the rows and the rank, only the direction is drawn)."""
    todo = [("random", dict(method="random_init") if grow else dict(direction=random_direction(seed)))]
    if grow:
        todo.append(("random_same_eps", dict(method="random_init", epsilons=[eps])))
        todo.append(("net2deeper", dict(method="net2deeper")))
    todo += [(rule, dict(probe=over)) for rule, over in RULES.items()
             if rule != own_rule and (not rank_k or "probe.rule=rowwise" in over)]
    return todo


def run_setting(name: str, setting: dict, seeds: list[int], work: Path, raw_dir: Path,
                add: list[str] | None = None, command: str = "") -> list[Path]:
    """The ablation of each seed; with ``add``, only those initialisations, added to the seed's raw file."""
    written = []
    grow = setting["recipe"] == "grow"
    backbone = None if grow else ev.pretrained(setting, work)
    own_rule = configured_rule(setting)
    rank_k = ev.rank_k(setting)
    for seed in seeds:
        t0 = time.perf_counter()
        base = work / name / "ablation" / f"seed{seed}"

        def one(label: str, **kw) -> dict:
            # the configured run is the sweep's own (same config, same seed): shared, read back when finished
            out = work / name / "sweep" / f"seed{seed}" / "configured" if label == own_rule else base / label
            if grow:
                return ev.grow_run(setting, seed, out, **kw)
            return ev.adapt_run(setting, seed, out, backbone, **kw)

        extra = {}
        if add:  # the seed's existing file (checked against the spec): its configured run, site and eps
            old = ev.read_raw(raw_dir, name, setting, "ablation", seed)
            runs = old["runs"]
            # the file keeps its own command and config record (what its first runs were made with; the spec
            # check above accepted it), the addition records its command
            extra = {key: old[key] for key in ("command", "config", "config_hash")}
            extra["added"] = {**old.get("added", {}), **{label: command for label in add}}
            t0 -= old.get("ablation_wall_time", 0.0)
        else:
            runs = {own_rule: one(own_rule)}  # the configured method: picks the site
        site = runs[own_rule]["event"]["site"]
        eps = runs[own_rule]["event"]["epsilon"]  # what the configured rule's line search chose
        # the most telling comparison first (eigen vs an equally large random direction); the file is rewritten
        # after every initialisation, so a seed cut short by time still reports what it ran (the table counts seeds)
        todo = initialisations(grow, own_rule, seed, eps, rank_k)
        if add:
            unknown = sorted(set(add) - {label for label, _ in todo})
            if unknown:
                raise SystemExit(f"unknown initialisation(s) {unknown} for {name}; "
                                 f"known: {[label for label, _ in todo]}")
            todo = [(label, kw) for label, kw in todo if label in add]
        for label, kw in todo:
            runs[label] = one(label, site=site, **kw)
            path = ev.write_raw(raw_dir, name, setting, "ablation", seed, runs,
                                {"site": site, "configured_rule": own_rule,
                                 "complete": len(runs) == len(initialisations(grow, own_rule, seed, eps, rank_k)) + 1,
                                 "ablation_wall_time": time.perf_counter() - t0, **extra})
        written.append(path)
        print(f"{name} seed {seed}: site {site}, {len(runs)} initialisations, {time.perf_counter() - t0:.0f} s "
              f"-> {written[-1]}", flush=True)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    ap = ev.script_parser(__doc__)
    ap.add_argument("--add", nargs="+", default=None, metavar="LABEL",
                    help="only these initialisations, added to each seed's existing raw file in --raw-dir")
    args, spec, raw_dir = ev.parse_script_args(ap, argv)
    command = " ".join(["python", "scripts/ablate_init.py", *(sys.argv[1:] if argv is None else argv)])
    written = []
    for name in args.setting:
        setting = spec["settings"][name]
        try:
            written += run_setting(name, quick_setting(setting) if args.quick else setting, args.seeds,
                                   args.work_dir, raw_dir, args.add, command)
        except ev.RawDataError as e:  # --add without (a valid) raw file to add to
            raise SystemExit(str(e)) from None
    return written


if __name__ == "__main__":
    main()
