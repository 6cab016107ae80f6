#!/usr/bin/env bash
# The approximation-quality report on MNIST and CIFAR-10 (JPEG q75 copy), copied into
# figures/ and analyses/results/ for the README.  About 2 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
curvlab="${CURVLAB:-.venv/bin/curvlab}"
shared="${SHARED_DATA:-../shared/data}"
[[ -d "$shared" ]] || shared=/work/shared/data
mkdir -p figures analyses/results
"$curvlab" report --dataset mnist --data-dir "$shared/mnist" --out runs/report-mnist --no-progress
"$curvlab" report --dataset cifar10 --data-dir "$shared/cifar10" --model cnn --batch-size 64 \
    --out runs/report-cifar10 --no-progress
for name in mnist cifar10; do
    cp "runs/report-$name/report.nc" "analyses/results/report_$name.nc"
    cp "runs/report-$name/summary.md" "analyses/results/report_$name.md"
    for fig in spectra errors network; do
        cp "runs/report-$name/$fig.png" "figures/report_${name}_$fig.png"
    done
done
