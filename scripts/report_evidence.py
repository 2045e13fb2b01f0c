"""Print the every-site, initialisation and score tables of docs/results/evidence.md from the committed raw files.

    python scripts/report_evidence.py                                   # report seeds of every setting run
    python scripts/report_evidence.py --seeds dev                       # development seeds (choices)
    python scripts/report_evidence.py --out docs/results/evidence.md --notes docs/results/evidence/notes.md

Every number comes from docs/results/evidence/raw/<setting>/{sweep,ablation}_seed<S>.json (written by
scripts/sweep_sites.py and scripts/ablate_init.py). The command fails with one line when a raw file of a
requested (setting, seed) is missing or was produced by another config than the frozen spec
(docs/results/evidence/spec.json) says (its config hash). It writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _evidence as ev  # noqa: E402  (the scripts folder)


# ------------------------------------------------------------------------------------------------ numbers
def _unit(name: str, spec: dict) -> tuple[float, str]:
    """Scale and unit of a setting's error: MSE for regression, % otherwise."""
    return (1.0, "MSE") if spec["settings"][name].get("config") == "grow_regression" else (100.0, "%")


def fmt(xs: list[float], scale: float) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.mean(xs) * scale
    s = (statistics.stdev(xs) * scale) if len(xs) > 1 else 0.0
    return f"{m:.3e} ± {s:.1e}" if scale == 1.0 else f"{m:.2f} ± {s:.2f}"


def fmt_all(xs: list[float | None], scale: float) -> str:
    """:func:`fmt`, or "–" unless every value is there (a best-validation test error of None: the run was
    resumed after its best epoch; a mean over the others would be another set of seeds)."""
    return fmt(xs, scale) if xs and all(x is not None for x in xs) else "–"


def paired(a: list[float], b: list[float], scale: float) -> str:
    """b - a per seed: mean ± std, and on how many seeds a is strictly better (lower) / tied."""
    d = [(y - x) for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return "–"
    m, s = statistics.mean(d) * scale, (statistics.stdev(d) * scale if len(d) > 1 else 0.0)
    wins, ties = sum(v > 0 for v in d), sum(v == 0 for v in d)
    num = f"{m:+.2e} ± {s:.1e}" if scale == 1.0 else f"{m:+.2f} ± {s:.2f}"
    return f"{num} ({wins}/{len(d)} better, {ties} tied)"


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when a side is constant or n < 2."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(x) < 2:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in rx)), math.sqrt(sum((b - my) ** 2 for b in ry))
    return math.nan if sx == 0 or sy == 0 else sxy / (sx * sy)


def _mean_finite(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return f"{statistics.mean(xs):+.2f} (n={len(xs)})" if xs else "–"


def _site_rule(name: str, spec: dict) -> str:
    """The configured site rule: growth / adapt site_selection, or "budget" when a parameter budget is spent on
    rank-k layers (the allocation picks the site: the largest row eigenvalues per parameter)."""
    if ev.rank_k(spec["settings"][name]):
        return "budget"
    cfg = ev.resolved_config(spec["settings"][name])
    return (cfg.get("growth") or cfg.get("adapt"))["site_selection"]


def _choice(data: dict, rule: str) -> str:
    """The configured method's site in a sweep seed's raw file (a budget's: the site its own run chose)."""
    return data["configured_site"] if rule == "budget" else ev.topo_choice(data["runs"], rule)


def _site_rule_label(name: str, spec: dict) -> str:
    """The configured site rule as the tables name it: ``argmax`` says of which number (``probe.score``)."""
    rule = _site_rule(name, spec)
    return f"argmax {ev.resolved_config(spec['settings'][name])['probe']['score']}" if rule == "argmax" else rule


# ------------------------------------------------------------------------------------------------ tables
def check_same_state(data: dict, name: str, seed: int) -> None:
    """Every run of a sweep seed must have seen the same state at event 0 (same scores at every site)."""
    ref = None
    for label, run in data["runs"].items():
        scores = run["event"]["scores"]
        if ref is None:
            ref = scores
        elif set(scores) != set(ref) or any(abs(scores[k] - ref[k]) > 1e-6 * (1 + abs(ref[k])) for k in ref):
            raise ev.RawDataError(f"{name} seed {seed}: run {label!r} saw other site scores than the first run: the "
                                  "state at event 0 was not shared (the sweep is not an every-site comparison)")


def sweep_tables(name: str, spec: dict, seeds: list[int], raw_dir: Path) -> list[str]:
    scale, unit = _unit(name, spec)
    setting = spec["settings"][name]
    data = {s: ev.read_raw(raw_dir, name, setting, "sweep", s) for s in seeds}
    for s, d in data.items():
        check_same_state(d, name, s)
    rule, rule_label = _site_rule(name, spec), _site_rule_label(name, spec)
    sites = data[seeds[0]]["sites"]

    def err(run, which):
        return run[which]["test_error"]

    lines = [f"### {name}: every site ({len(seeds)} seeds: {seeds})", "",
             f"Single insertion at event 0 at each site, then the rest of the budget. Site rule of the configured "
             f"method: `{rule_label}`"
             + (" (one rank-k layer with the parameter budget, at the site whose largest row eigenvalues per "
                "parameter are largest; imposed at another site: the same budget and rank rule there)"
                if rule == "budget" else "")
             + f". Test error in {unit}; best = best-validation model, final = last model. "
             "lambda_max = lambda_max(Q_t), quadratic = theta^T Q_t theta of the inserted direction (mean over "
             "seeds).",
             "",
             "| site | chosen by topo | lambda_max | quadratic | held-out loss after line search | eps fallbacks | "
             f"best-val test [{unit}] | final test [{unit}] | final val [{unit}] | final params | param-epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    choice = {s: _choice(d, rule) for s, d in data.items()}
    for site in sites:
        runs = [data[s]["runs"][site] for s in seeds]
        evs = [r["event"] for r in runs]
        lines.append(
            f"| {site} | {sum(choice[s] == site for s in seeds)}/{len(seeds)} | "
            f"{statistics.mean(ev.lambda_max_of(e)[site] for e in evs):.3g} | "
            f"{statistics.mean(e['quadratics'][site] for e in evs):.3g} | "
            f"{statistics.mean(e['realized'] for e in evs):.4g} | {sum(bool(e.get('eps_fallback')) for e in evs)} | "
            f"{fmt_all([err(r, 'best') for r in runs], scale)} | {fmt([err(r, 'final') for r in runs], scale)} | "
            f"{fmt([r['final']['val_error'] for r in runs], scale)} | "
            f"{statistics.mean(r['final']['params'] for r in runs):.0f} | "
            f"{statistics.mean(r['param_epochs'] for r in runs):.3g} |")
    lines.append("")
    if rule == "budget":  # the rank a site gets depends on its positive row eigenvalues
        lines += ["Rank of the inserted rank-k layer per site (mean over seeds; 0 = no rank fits the budget, nothing "
                  "inserted): " + ", ".join(
                      f"{t} {statistics.mean(data[s]['runs'][t]['event'].get('rank') or 0 for s in seeds):.1f}"
                      for t in sites) + ".", ""]

    # rules vs topo, paired per seed
    def rule_runs(pick) -> list[dict]:
        return [data[s]["runs"][pick(s)] for s in seeds]

    topo = rule_runs(lambda s: choice[s])
    rows = {
        f"topo ({rule})": topo,  # argmax: of the configured score (the line above the table names it)
        "topo (argmax lambda_max)": rule_runs(lambda s: ev.topo_choice(data[s]["runs"], "lambda_max")),
        "topo (argmax quadratic)": rule_runs(lambda s: ev.topo_choice(data[s]["runs"], "quadratic")),
        "first site": rule_runs(lambda s: sites[0]),
        "last site": rule_runs(lambda s: sites[-1]),
        "oracle: best site on validation (final val error)": rule_runs(
            lambda s: min(sites, key=lambda t: (data[s]["runs"][t]["final"]["val_error"],
                                                data[s]["runs"][t]["final"]["val_loss"]))),
        "oracle: best site on test (final)": rule_runs(
            lambda s: min(sites, key=lambda t: data[s]["runs"][t]["final"]["test_error"])),
    }
    for ref in data[seeds[0]].get("references", {}):
        rows[f"reference: {ref}"] = [data[s]["references"][ref] for s in seeds]
    # best-val params: the best-validation model's own size (before the insertion when its epoch came first)
    lines += [f"| rule | best-val test [{unit}] | best-val params | final test [{unit}] | final − topo, per seed "
              "(topo better on) | final params | param-epochs |", "|---|---|---|---|---|---|---|"]
    topo_final = [err(r, "final") for r in topo]
    for label, runs in rows.items():
        lines.append(f"| {label} | {fmt_all([err(r, 'best') for r in runs], scale)} | "
                     f"{statistics.mean(r['best']['params'] for r in runs):.0f} | "
                     f"{fmt([err(r, 'final') for r in runs], scale)} | "
                     f"{'–' if label == f'topo ({rule})' else paired(topo_final, [err(r, 'final') for r in runs], scale)} | "
                     f"{statistics.mean(r['final']['params'] for r in runs):.0f} | "
                     f"{statistics.mean(r['param_epochs'] for r in runs):.3g} |")
    # uniformly random site: exact expectation = mean over the sites of each seed
    rand = [statistics.mean(err(data[s]["runs"][t], "final") for t in sites) for s in seeds]
    rand_best = [None if any(err(data[s]["runs"][t], "best") is None for t in sites)
                 else statistics.mean(err(data[s]["runs"][t], "best") for t in sites) for s in seeds]
    lines.append(f"| random site (exact expectation: mean over sites) | {fmt_all(rand_best, scale)} | – | "
                 f"{fmt(rand, scale)} | {paired(topo_final, rand, scale)} | – | – |")
    lines.append("")

    def per_seed(xs: list[float]) -> str:
        # two decimals: on MNIST's 10 000 test images one image is 0.01 %
        return " / ".join(f"{x:.3e}" if scale == 1.0 else f"{x * scale:.2f}" for x in xs)

    # the paired columns above in numbers: every rule's final test error on each seed, in the seeds' order
    lines += [f"Final test error per seed ({', '.join(map(str, seeds))}) [{unit}]: " + "; ".join(
        [f"{label} {per_seed([err(r, 'final') for r in runs])}" for label, runs in rows.items()
         if label not in ("topo (argmax lambda_max)", "topo (argmax quadratic)")]  # not topo's own "topo (argmax)"
        + [f"random site (expectation) {per_seed(rand)}"])
        + ". Every site, per seed: " + "; ".join(
            f"{t} {per_seed([err(data[s]['runs'][t], 'final') for s in seeds])}" for t in sites) + ".", ""]

    # rank, regret, correlations
    rank, regret, within2 = [], [], 0
    corr = {"lambda_max": [], "quadratic": [], "realized (−line-search loss)": []}
    for s in seeds:
        runs = data[s]["runs"]
        finals = {t: runs[t]["final"]["test_error"] for t in sites}
        ordered = sorted(sites, key=finals.get)
        r = 1 + sum(finals[t] < finals[choice[s]] for t in sites)
        rank.append(r)
        within2 += r <= 2
        regret.append(finals[choice[s]] - finals[ordered[0]])
        improvement = [-finals[t] for t in sites]
        ev0 = runs[sites[0]]["event"]
        corr["lambda_max"].append(spearman([ev.lambda_max_of(ev0)[t] for t in sites], improvement))
        corr["quadratic"].append(spearman([ev0["quadratics"][t] for t in sites], improvement))
        corr["realized (−line-search loss)"].append(spearman([-runs[t]["event"]["realized"] for t in sites], improvement))
    spread = statistics.stdev(err(r, "final") for r in topo) if len(seeds) > 1 else 0.0
    lines += [f"topo's rank among the {len(sites)} sites by final test error (1 = best; ties share the better rank): "
              f"mean {statistics.mean(rank):.2f}, within the best two on {within2}/{len(seeds)} seeds; regret to the "
              f"best site {fmt(regret, scale)} {unit} (topo's own seed spread {spread * scale:.3g}). "
              "Spearman rank correlation between a score and the realized improvement (−final test error) over the "
              "sites, mean over seeds: " + ", ".join(f"{k} {_mean_finite(v)}" for k, v in corr.items()) + ".", ""]
    return lines


def ablation_table(name: str, spec: dict, seeds: list[int], raw_dir: Path) -> list[str]:
    scale, unit = _unit(name, spec)
    setting = spec["settings"][name]
    data = {s: ev.read_raw(raw_dir, name, setting, "ablation", s) for s in seeds}
    own = data[seeds[0]]["configured_rule"]
    labels = [own] + sorted({x for d in data.values() for x in d["runs"] if x != own})
    sites = sorted({d["site"] for d in data.values()})
    lines = [f"### {name}: initialisation at the configured method's site ({len(seeds)} seeds: {seeds})", "",
             f"Sites used: {', '.join(sites)}. Same eps grid and line search (both signs) for every direction; "
             f"`random` is scaled exactly like the `{own}` direction. eps fallback = no eps lowered the held-out "
             "loss (the layer went in at the smallest eps; counted, not hidden); the drop column is the loss of the "
             "layer actually inserted."
             + (" `random_same_eps` = the direction of `random` inserted at exactly the eps the "
                f"`{own}` line search chose (no eps search of its own, only the sign), so both layers start "
                "equally large in the measure `random` is matched in (under a whitened rule the Frobenius "
                "`initial norm` differs); its eps fallback = the loss did not drop at that eps."
                if "random_same_eps" in labels else ""), "",
             "| initialisation | seeds | eps fallbacks | mean initial norm | "
             "held-out loss drop at insertion [%; < 0: rose] | "
             f"best-val test [{unit}] | final test [{unit}] | final − {own}, per seed ({own} better on) |",
             "|---|---|---|---|---|---|---|---|"]
    for label in labels:
        have = [s for s in seeds if label in data[s]["runs"]]  # a seed cut short by time lacks the last ones
        ref = [data[s]["runs"][own]["final"]["test_error"] for s in have]
        runs = [data[s]["runs"][label] for s in have]
        evs = [r["event"] for r in runs]
        # the loss of the layer actually inserted (after an eps fallback: at the eps it went in at, which may
        # raise the loss: a negative drop), not the line search's best (0 on a fallback)
        after = [e.get("loss_after") if e.get("loss_after") is not None else e.get("realized") for e in evs]
        drops = [100 * (e["loss_before"] - a) / e["loss_before"] for e, a in zip(evs, after, strict=True)
                 if a is not None and e.get("loss_before") and math.isfinite(a)]
        finals = [r["final"]["test_error"] for r in runs]
        lines.append(
            f"| {label} | {len(have)} | {sum(bool(e.get('eps_fallback')) for e in evs)}/{len(evs)} | "
            f"{statistics.mean(e.get('init_norm', 0.0) or 0.0 for e in evs):.3g} | "
            f"{(f'{statistics.mean(drops):.2f}' if drops else '– (no search)')} | "
            f"{fmt_all([r['best']['test_error'] for r in runs], scale)} | {fmt(finals, scale)} | "
            f"{'–' if label == own else paired(ref, finals, scale)} |")
    lines.append("")

    def per_seed(label: str) -> str:
        return " / ".join("–" if label not in data[s]["runs"] else
                          f"{data[s]['runs'][label]['final']['test_error']:.3e}" if scale == 1.0 else
                          f"{100 * data[s]['runs'][label]['final']['test_error']:.2f}" for s in seeds)

    lines += [f"Final test error per seed ({', '.join(map(str, seeds))}) [{unit}]: "
              + "; ".join(f"{label} {per_seed(label)}" for label in labels) + ".", ""]
    return lines


def score_table(spec: dict, names: list[str], raw_dir: Path) -> list[str]:
    """Which number should rank the sites (development seeds only): per site rule, the Spearman correlation of
    its number with the realized improvement, how often it picks the best site, the mean final test error of
    its pick and the regret to the best site of each seed, and its paired difference to the first-site rule."""
    lines = ["## Site score: lambda_max or the inserted direction's quadratic? (development seeds)", "",
             "Per site rule, over the development seeds: the Spearman rank correlation over the sites between the "
             "rule's number and the realized improvement (−final test error), mean over seeds (n = seeds where it "
             "is defined); on how many seeds its pick is the best site by final test error (ties count as best); "
             "the final test error of its pick (mean ± std); the regret to the best site of each seed (mean ± "
             "std); and the paired per-seed difference to the fixed rule \"first site\" (first site − rule, "
             "positive = the rule is better; on how many seeds it is strictly better / tied).", "",
             "| setting | seeds | rule | Spearman | picks the best site | final test | regret to the best site | "
             "first site − rule, per seed |", "|---|---|---|---|---|---|---|---|"]
    ends = {}  # setting -> (argmax lambda_max = last site, argmax quadratic = first site, seeds, ratio per site)
    for name in names:
        scale, unit = _unit(name, spec)
        seeds = ev.seeds_of(spec, name, "dev")
        data = {s: ev.read_raw(raw_dir, name, spec["settings"][name], "sweep", s) for s in seeds}
        # rule -> (pick(runs, sites), number that ranks the sites or None for a fixed rule)
        rules = {
            "argmax lambda_max": (lambda runs, sites: ev.topo_choice(runs, "lambda_max"),
                                  lambda runs, t: ev.lambda_max_of(runs[t]["event"])[t]),
            "argmax quadratic": (lambda runs, sites: ev.topo_choice(runs, "quadratic"),
                                 lambda runs, t: runs[t]["event"]["quadratics"][t]),
            "realized (line search)": (lambda runs, sites: ev.topo_choice(runs, "realized"),
                                       lambda runs, t: -runs[t]["event"]["realized"]),
            "first site": (lambda runs, sites: sites[0], None),
            "last site": (lambda runs, sites: sites[-1], None),
        }
        if _site_rule(name, spec) == "budget":  # the configured allocation's own pick (no number on the sites)
            rules["rank-k budget (configured)"] = (None, None)
        picked = {r: [] for r in rules}
        best = {r: [] for r in rules}
        corr = {r: [] for r in rules}
        for s, d in data.items():
            check_same_state(d, name, s)
            runs, sites = d["runs"], d["sites"]
            finals = {t: runs[t]["final"]["test_error"] for t in sites}
            improvement = [-finals[t] for t in sites]
            best_err = min(finals.values())
            for rule, (pick, number) in rules.items():
                t = d["configured_site"] if pick is None else pick(runs, sites)
                picked[rule].append(finals[t])
                best[rule].append(best_err)
                if number is not None:
                    corr[rule].append(spearman([number(runs, u) for u in sites], improvement))
        sites0 = data[seeds[0]]["sites"]
        ratio = {t: statistics.mean(ev.lambda_max_of(d["runs"][t]["event"])[t] / d["runs"][t]["event"]["quadratics"][t]
                                    for d in data.values()) for t in sites0}
        ends[name] = (sum(rules["argmax lambda_max"][0](d["runs"], d["sites"]) == d["sites"][-1] for d in data.values()),
                      sum(rules["argmax quadratic"][0](d["runs"], d["sites"]) == d["sites"][0] for d in data.values()),
                      len(seeds), ratio)
        first = picked["first site"]
        for rule in rules:
            regret = [a - b for a, b in zip(picked[rule], best[rule], strict=True)]
            lines.append(
                f"| {name} | {seeds} | {rule} | {_mean_finite(corr[rule]) if rules[rule][1] else '–'} | "
                f"{sum(r == 0 for r in regret)}/{len(seeds)} | {fmt(picked[rule], scale)} {unit} | "
                f"{fmt(regret, scale)} {unit} | "
                f"{'–' if rule == 'first site' else paired(picked[rule], first, scale)} |")
    lines += ["", "Where the two numbers point: " + "; ".join(
        f"{name}: argmax lambda_max is the last site on {a}/{n} seeds, argmax quadratic the first site on {b}/{n} "
        "(lambda_max / quadratic per site, mean over seeds: " + ", ".join(f"{t} {r:.3g}" for t, r in ratio.items()) + ")"
        for name, (a, b, n, ratio) in ends.items()) + "."]
    return lines + [""]


def build(spec: dict, names: list[str], which: str, raw_dir: Path, kinds: list[str]) -> list[str]:
    lines = []
    for name in names:
        lines += [f"## {name}", ""]
        if "sweep" in kinds:
            lines += sweep_tables(name, spec, ev.seeds_of(spec, name, which), raw_dir)
        if "ablation" in kinds:
            lines += ablation_table(name, spec, ev.seeds_of(spec, name, which, "ablation"), raw_dir)
    return lines


def _rel(p: Path) -> str:
    try:
        return Path(p).resolve().relative_to(ev.ROOT).as_posix()
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=ev.SPEC)
    ap.add_argument("--raw-dir", type=Path, default=ev.RAW)
    ap.add_argument("--settings", nargs="+", default=None, help="default: every setting of the spec")
    ap.add_argument("--seeds", choices=["report", "dev"], default="report")
    ap.add_argument("--kinds", nargs="+", choices=["sweep", "ablation"], default=["sweep", "ablation"])
    ap.add_argument("--no-dev", action="store_true", help="leave out the site-score table of the development seeds")
    ap.add_argument("--header", type=Path, default=None, help="markdown put before the tables")
    ap.add_argument("--notes", type=Path, default=None, help="markdown put after the tables (the reading)")
    ap.add_argument("--out", type=Path, default=None, help="write the report here (default: print only)")
    args = ap.parse_args(argv)
    spec = ev.load_spec(args.spec)
    names = args.settings or list(spec["settings"])
    unknown = [n for n in names if n not in spec["settings"]]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; the spec has {sorted(spec['settings'])}")
    cmd = " ".join(["python", "scripts/report_evidence.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        body = build(spec, names, args.seeds, args.raw_dir, args.kinds)
        if not args.no_dev and "sweep" in args.kinds:
            body += score_table(spec, names, args.raw_dir)
    except ev.RawDataError as e:
        raise SystemExit(f"report_evidence: {e}") from None
    text = "\n".join([
        "# Evidence: does the derivative choose the site and the initialisation well?", "",
        f"Every table below is printed by `{cmd}` from the raw files in {_rel(args.raw_dir)} "
        f"({args.seeds} seeds of docs/results/evidence/spec.json).", "",
        *([args.header.read_text().rstrip(), ""] if args.header else []),
        *body,
        *([args.notes.read_text().rstrip(), ""] if args.notes else []),
    ]) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
