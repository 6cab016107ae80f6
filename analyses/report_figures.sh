#!/usr/bin/env bash
# The approximation-quality report on MNIST and CIFAR-10 (JPEG q75 copy), copied into
# figures/ and analyses/results/ for the README.  Under a minute on 2 CPU cores.
source "$(dirname "$0")/report_common.sh"
"$curvlab" report --dataset mnist --data-dir "$shared/mnist" --out runs/report-mnist --no-progress
"$curvlab" report --dataset cifar10 --data-dir "$shared/cifar10" --model cnn --batch-size 64 \
    --out runs/report-cifar10 --no-progress
for name in mnist cifar10; do
    publish_report "$name" spectra errors network
done
