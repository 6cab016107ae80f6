#!/usr/bin/env bash
# What `curvlab report --model <built-in> --dataset cifar10 --train-steps 2` takes on this machine:
# wall time and peak memory (GNU time's maximum resident set) of each command, one after another,
# with the machine, commit and load; the README's table of the built-ins cites the result.
#   bash benchmarks/report_builtins.sh [DATA_DIR]   (default ../shared/data/cifar10)
#   OUT=<file> writes the table elsewhere; CURVLAB=<command> runs another curvlab (default .venv/bin/curvlab)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/cifar10}
out=${OUT:-benchmarks/results/report_builtins_cpu.md}
curvlab=${CURVLAB:-.venv/bin/curvlab}
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# the commit and its state before anything is written (the table itself is a tracked file)
commit="git $(git rev-parse --short HEAD)$(git diff --quiet -- . ':(exclude)benchmarks/results' || echo ' (dirty)')"
{
  echo "# curvlab report on the built-in models (CIFAR-10 (JPEG q75 copy), --train-steps 2), cpu"
  echo
  echo "$(date -u +%FT%TZ); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nproc) CPUs;" \
       "$commit; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo "Command: \`.venv/bin/curvlab report --model MODEL --dataset cifar10 --data-dir DATA --train-steps 2 --no-progress\`;"
  echo "time and peak memory from GNU time (wall clock, maximum resident set size), one run each."
  echo
  echo "| \`--model\` | N measured | time | peak memory | load after |"
  echo "|---|---:|---:|---:|---:|"
} > "$work/table"  # the results file is replaced only once every command has run
for spec in "resnet18" "resnet18 --mode train" "vgg16-bn" "vit-tiny" "mobilenetv2"; do
  read -r -a args <<< "$spec"
  if ! /usr/bin/time -f "%e %M" -o "$work/time" $curvlab report --model "${args[@]}" --dataset cifar10 \
      --data-dir "$data" --train-steps 2 --no-progress --out "$work/rep" > "$work/log" 2>&1; then
    echo "report_builtins: \`curvlab report --model $spec\` failed ($out left as it was); its output:" >&2
    tail -n 20 "$work/log" >&2
    exit 1
  fi
  read -r secs kib < "$work/time"
  n=$($python -c "import xarray as xr; print(xr.open_dataset('$work/rep/report.nc').attrs['batch_size'])")
  printf '| `%s` | %s | %d:%02d | %.1f GiB | %s |\n' "$spec" "$n" $(( ${secs%.*} / 60 )) $(( ${secs%.*} % 60 )) \
    "$(echo "$kib / 1048576" | bc -l)" "$(cut -d' ' -f1 /proc/loadavg)" >> "$work/table"
  rm -rf "$work/rep"
done
mkdir -p "$(dirname "$out")"
cp "$work/table" "$out"
cat "$out"
