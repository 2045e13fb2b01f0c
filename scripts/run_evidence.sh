#!/usr/bin/env bash
# Run the sweep and the ablation of the given settings seed by seed (the ablation reuses the sweep's configured
# run), raw files into docs/results/evidence/raw, runs under WORK (default /tmp/topotransfer_evidence):
#   bash scripts/run_evidence.sh "grow_digits" "100 101 102 0"
# then: python scripts/report_evidence.py --out docs/results/evidence.md --notes docs/results/evidence/notes.md
set -euo pipefail
settings=$1; seeds=$2; work=${WORK:-/tmp/topotransfer_evidence}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
for seed in $seeds; do
  for s in $settings; do
    nice -n 10 python scripts/sweep_sites.py --setting "$s" --seeds "$seed" --work-dir "$work" --raw-dir docs/results/evidence/raw
    nice -n 10 python scripts/ablate_init.py --setting "$s" --seeds "$seed" --work-dir "$work" --raw-dir docs/results/evidence/raw
  done
done
