#!/usr/bin/env bash
# Regenerate every CPU analysis (results in analyses/results, figures in figures/).
# Two lanes run side by side, one torch thread each (faster than one lane with two threads);
# each setting's optimizers all run in the same lane, so its wall-clock comparison stays fair.
# Expected time on 2 CPU cores: about 45 minutes (a fresh clone, setup included: 43 min). Logs: runs/analyses/logs/. GPU runs: analyses/README.md.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
export CURVLAB="${CURVLAB:-.venv/bin/curvlab}"
logs=runs/analyses/logs
mkdir -p "$logs"

step() { echo "[$(date +%T)] $*"; "$@"; echo "[$(date +%T)] done: $*"; }

lane_a() {
    step "$py" analyses/optimizer_comparison.py --setting mnist-cnn --budget cpu
    step "$py" analyses/optimizer_comparison.py --setting mnist-mlp --budget cpu
    step "$py" analyses/approximation_quality.py --setting mnist-mlp
}

lane_b() {
    if [[ -d /usr/share/datasets/fashion-mnist ]]; then
        step "$py" analyses/optimizer_comparison.py --setting fashion-cnn --budget cpu
    else
        echo "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (Debian) — skipping fashion-cnn" >&2
    fi
    step "$py" analyses/approximation_quality.py --setting mnist-cnn
    step "$py" analyses/tekfac_ablation.py
    step bash analyses/report_figures.sh
}

start=$(date +%s)
lane_a >"$logs/lane_a.log" 2>&1 &
a=$!
lane_b >"$logs/lane_b.log" 2>&1 &
b=$!
status=0
wait "$a" || { echo "run_all: lane A failed, see $logs/lane_a.log" >&2; status=1; }
wait "$b" || { echo "run_all: lane B failed, see $logs/lane_b.log" >&2; status=1; }
echo "run_all: finished in $(( ($(date +%s) - start) / 60 )) min (status $status); logs in $logs"
exit "$status"
