"""Prints the table of docs/results/evidence/notes.md "Diagnosis on development seeds": grow_digits every-site
sweeps with the eps grid capped at 1 (the default) and at 10, per (seed, site), from the committed raw files.

    python docs/results/evidence/dev_eps10/compare.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAP1 = [HERE.parents[0] / "raw" / "grow_digits", HERE / "raw" / "grow_digits"]  # seeds 0-2 / 3-4


def cell(run: dict) -> str:
    e = run["event"]
    eps = f"{e['epsilon']:.3g}" + (" (fallback)" if e.get("eps_fallback") else "")
    return f"{eps}, {e['loss_before']:.2f} -> {e['realized']:.2f}, {100 * run['final']['test_error']:.2f} %"


def main() -> None:
    print("| seed | site | cap 1: eps, held-out, final test | cap 10: eps, held-out, final test | "
          "realized picks (cap 1 / cap 10) |")
    print("|---|---|---|---|---|")
    for seed in range(5):
        one = next((d / f"sweep_seed{seed}.json" for d in CAP1 if (d / f"sweep_seed{seed}.json").is_file()), None)
        ten = HERE / "raw" / "grow_digits_eps10" / f"sweep_seed{seed}.json"
        if one is None or not ten.is_file():
            continue
        a, b = json.loads(one.read_text()), json.loads(ten.read_text())
        for i, site in enumerate(sorted(a["runs"])):
            picks = f"{a['configured_site']} / {b['configured_site']}" if i == 0 else ""
            print(f"| {seed} | {site} | {cell(a['runs'][site])} | {cell(b['runs'][site])} | {picks} |")


if __name__ == "__main__":
    main()
