#!/usr/bin/env bash
# The Kronecker optimizers' default momentum (README, "Training defaults"): curvlab train with
# TEKFAC and KFAC at their defaults (momentum 0) and with momentum 0.9 (the default before),
# beside SGD's defaults; 3 seeds each; MNIST's MLP 4 epochs, digits' 10.  ~10 min on one core.
# Writes analyses/results/training_defaults.md (the last epoch of every run, and the means).
set -euo pipefail
cd "$(dirname "$0")/.."
mnist=${MNIST_DIR:-../shared/data/mnist}
[[ -d "$mnist" ]] || mnist=/work/shared/data/mnist  # as report_common.sh: the project's shared folder
out=analyses/results/training_defaults.md
runs=runs/analyses/training_defaults
rows=()
for setting in "mnist|--dataset mnist --data-dir $mnist --epochs 4" "digits|--epochs 10"; do
  name=${setting%%|*}; args=${setting#*|}
  for opt in "tekfac --momentum 0.9" "tekfac" "kfac --momentum 0.9" "kfac" "sgd"; do
    for seed in 0 1 2; do
      dir="$runs/$name-${opt// /}-s$seed"
      # shellcheck disable=SC2086
      last=$(.venv/bin/curvlab train $args --optimizer $opt --seed "$seed" --out "$dir" --overwrite --no-progress 2>&1 \
             | grep '^epoch' | tail -1)
      rows+=("$name|$opt|$seed|$last")
    done
  done
done
printf '%s\n' "${rows[@]}" | .venv/bin/python -c '
import re, statistics, sys
runs = {}
for line in sys.stdin:
    setting, opt, seed, last = line.rstrip("\n").split("|", 3)
    m = re.search(r"train loss (\S+), test loss (\S+), test accuracy (\S+),", last)
    runs.setdefault((setting, opt), []).append(tuple(float(v) for v in m.groups()))
print("# curvlab train: the Kronecker optimizers with and without momentum 0.9\n")
print("Written by `bash analyses/training_defaults.sh` (defaults otherwise: lr 0.1, damping 1e-3, KL clipping 1e-3; "
      "SGD lr 0.05, momentum 0.9; batch 128). The last epoch, mean over seeds 0, 1, 2 (range).\n")
print("| data | optimizer | train loss | test loss | test accuracy |\n|---|---|---:|---:|---:|")
for (setting, opt), v in runs.items():
    tr, te, acc = zip(*v)
    print(f"| {setting} | {opt} | {statistics.mean(tr):.3f} | {statistics.mean(te):.3f} | "
          f"{statistics.mean(acc):.4f} ({min(acc):.4f}–{max(acc):.4f}) |")
' > "$out"
echo "$out"
