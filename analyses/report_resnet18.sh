#!/usr/bin/env bash
# The approximation-quality report of ResNet-18 (CIFAR stem, train-mode BatchNorm: the exact
# coupled blocks) on CIFAR-10 (JPEG q75 copy), copied into figures/ and analyses/results/ for the
# README.  42 min and 14 GB peak memory on one CPU thread (default measured batch N = 4).
set -euo pipefail
cd "$(dirname "$0")/.."
curvlab="${CURVLAB:-.venv/bin/curvlab}"
shared="${SHARED_DATA:-../shared/data}"
[[ -d "$shared" ]] || shared=/work/shared/data
mkdir -p figures analyses/results
name=cifar10-resnet18-train
"$curvlab" report --model resnet18 --dataset cifar10 --data-dir "$shared/cifar10" --mode train \
    --out "runs/report-$name" --no-progress
cp "runs/report-$name/report.nc" "analyses/results/report_$name.nc"
cp "runs/report-$name/summary.md" "analyses/results/report_$name.md"
for fig in spectra errors network coupling; do
    cp "runs/report-$name/$fig.png" "figures/report_${name}_$fig.png"
done
