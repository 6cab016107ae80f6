#!/usr/bin/env bash
# Regenerate every CPU analysis (results in analyses/results, figures in figures/).
# Expected time on 2 CPU cores: about 45 minutes.  GPU runs: see analyses/README.md.
set -euo pipefail
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
