#!/usr/bin/env bash
# Sweeps and ablations of the given settings and seeds, side by side (the ablation waits for, then reuses, the
# sweep's configured run of a seed), raw files into docs/results/evidence/raw, runs under WORK:
#   WORK=/tmp/ev bash scripts/run_evidence.sh "grow_digits grow_regression" "100 101 102 103 104"
# then: python scripts/report_evidence.py --out docs/results/evidence.md --notes docs/results/evidence/notes.md
set -euo pipefail
settings=$1; seeds=$2; work=${WORK:-/tmp/topotransfer_evidence}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
pids=()
for s in $settings; do
  for script in sweep_sites ablate_init; do
    ( for seed in $seeds; do
        nice -n 10 python scripts/$script.py --setting "$s" --seeds "$seed" --work-dir "$work" --raw-dir docs/results/evidence/raw
      done ) &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done
