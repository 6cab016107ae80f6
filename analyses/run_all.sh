#!/usr/bin/env bash
# Regenerate every CPU analysis (results in analyses/results, figures in figures/).
# Expected time on 2 CPU cores: about 50 minutes (one torch thread per run is fastest: OMP_NUM_THREADS=1).
# GPU runs: see analyses/README.md.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
    echo "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (Debian) — skipping fashion-cnn" >&2
    fashion=""
else
    fashion="fashion-cnn"
fi
for setting in mnist-mlp mnist-cnn $fashion; do
    "$py" analyses/optimizer_comparison.py --setting "$setting" --budget cpu
done
for setting in mnist-mlp mnist-cnn; do
    "$py" analyses/approximation_quality.py --setting "$setting"
done
"$py" analyses/tekfac_ablation.py
CURVLAB="${CURVLAB:-.venv/bin/curvlab}" bash analyses/report_figures.sh
