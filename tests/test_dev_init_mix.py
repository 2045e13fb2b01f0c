"""scripts/dev_init_mix.py: the effective rank it reports, and docs/results/evidence/dev_mix.md is exactly what its
command prints from the committed development records."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import dev_init_mix  # noqa: E402


def test_effective_rank_is_d_for_orthogonal_and_one_for_rank_one():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert abs(dev_init_mix.effective_rank(3.0 * q) - 6.0) < 1e-9
    u, v = torch.randn(6, 1), torch.randn(1, 6)
    assert abs(dev_init_mix.effective_rank(u @ v) - 1.0) < 1e-6


def test_committed_dev_mix_tables_are_recomputable():
    doc = (ROOT / "docs" / "results" / "evidence" / "dev_mix.md").read_text()
    command = doc.split("Printed by `", 1)[1].split("`", 1)[0].split()
    assert command[:3] == ["python", "scripts/dev_init_mix.py", "report"]
    at = command.index("--setting")
    settings = command[at + 1:command.index("--out")]
    printed = dev_init_mix.report(settings)
    assert printed in doc
