"""scripts/ablate_init.py (initialisation ablation at the configured method's site) on tiny budgets (``--quick``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

import ablate_init  # noqa: E402
import report_evidence  # noqa: E402
from test_sweep_sites import quick_spec  # noqa: E402


def test_growth_ablation_puts_every_initialisation_at_the_configured_site(tmp_path):
    raw = tmp_path / "raw"
    [path] = ablate_init.main(["--quick", "--setting", "grow_digits", "--seeds", "0", "--work-dir",
                               str(tmp_path / "work"), "--raw-dir", str(raw)])
    data = json.loads(path.read_text())
    own = data["configured_rule"]
    assert own == "rowwise_whiten"  # grow_digits.yaml: rowwise + whiten
    assert set(data["runs"]) == {"top1", "cluster", "rowwise", "rowwise_whiten", "random", "random_same_eps",
                                 "net2deeper"}
    for label, run in data["runs"].items():
        e = run["event"]
        assert e["site"] == data["site"] and e["forced_site"] == (label != own)
        if label != "net2deeper":  # net2deeper computes no derivative
            assert e["scores"] == data["runs"][own]["event"]["scores"]  # the same state at event 0
        assert isinstance(e["eps_fallback"], bool)  # recorded, never silent
    assert data["runs"]["net2deeper"]["event"]["init_norm"] == 0.0  # an identity layer
    rnd = data["runs"]["random"]["event"]
    assert math.isnan(rnd["quadratic"]) if rnd["quadratic"] is not None else True
    assert rnd["method"] == "random_init" and rnd["epsilon"] > 0

    # random_same_eps: the random direction of `random` (same generator and scale), at the eigen direction's eps
    same, eigen = data["runs"]["random_same_eps"]["event"], data["runs"][own]["event"]
    assert same["method"] == "random_init" and same["epsilon"] == eigen["epsilon"]
    assert same["init_norm"] / same["epsilon"] == pytest.approx(rnd["init_norm"] / rnd["epsilon"], rel=1e-9)
    assert (same["epsilon"] == rnd["epsilon"]) == (same["init_norm"] == rnd["init_norm"])

    # --add: only the named initialisations, added to the existing file (its command kept, the addition recorded)
    before = json.loads(path.read_text())
    del before["runs"]["random_same_eps"]
    path.write_text(json.dumps(before))
    [again] = ablate_init.main(["--quick", "--setting", "grow_digits", "--seeds", "0", "--work-dir",
                                str(tmp_path / "work"), "--raw-dir", str(raw), "--add", "random_same_eps"])
    added = json.loads(again.read_text())
    assert added["runs"] == data["runs"] and added["command"] == data["command"] and added["complete"]
    assert "--add random_same_eps" in added["added"]["random_same_eps"]
    with pytest.raises(SystemExit, match="unknown initialisation"):
        ablate_init.main(["--quick", "--setting", "grow_digits", "--seeds", "0", "--work-dir",
                          str(tmp_path / "work"), "--raw-dir", str(raw), "--add", "nonsense"])

    spec = quick_spec(tmp_path, "grow_digits", [0])
    text = report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "ablation"])
    for label in data["runs"]:
        assert f"| {label} |" in text
    assert "`random_same_eps` = the direction of `random` inserted at exactly the eps" in text
    assert f"Final test error per seed (0) [%]: {own} " in text
    path.unlink()
    with pytest.raises(SystemExit, match=r"missing raw file .*ablation_seed0\.json.*ablate_init\.py"):
        report_evidence.main(["--spec", str(spec), "--raw-dir", str(raw), "--kinds", "ablation"])


def test_rank_k_layers_are_ablated_only_against_the_rules_that_give_row_eigenvalues():
    labels = [label for label, _ in ablate_init.initialisations(False, "rowwise", 0, 0.1, rank_k=True)]
    assert labels == ["random", "rowwise_whiten"]
    labels = [label for label, _ in ablate_init.initialisations(False, "rowwise", 0, 0.1)]
    assert labels == ["random", "top1", "cluster", "rowwise_whiten"]
