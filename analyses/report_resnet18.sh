#!/usr/bin/env bash
# The approximation-quality report of ResNet-18 (CIFAR stem, train-mode BatchNorm: the exact
# coupled blocks) on CIFAR-10 (JPEG q75 copy), copied into figures/ and analyses/results/ for the
# README.  14 min and 5.6 GB peak memory on one CPU thread (default measured batch N = 4; 2026-12-05).
source "$(dirname "$0")/report_common.sh"
name=cifar10-resnet18-train
"$curvlab" report --model resnet18 --dataset cifar10 --data-dir "$shared/cifar10" --mode train \
    --out "runs/report-$name" --no-progress
publish_report "$name" spectra errors network coupling
