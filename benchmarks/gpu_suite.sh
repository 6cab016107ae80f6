#!/usr/bin/env bash
# The GPU suite: on a machine with a CUDA GPU, from this repository alone, in under 8 minutes:
#
#   1. a virtual environment (.venv-gpu) that reuses the CUDA torch already installed there and
#      installs curvlab (editable) with its test extras and asdfghjkl — offline from
#      benchmarks/wheels/ when that folder exists (pip download them there beforehand), otherwise
#      from the configured index, always constrained to the torch present;
#   2. the CUDA tests (every test that skips without a CUDA device);
#   3. the extraction, comparison and optimizer benchmarks on the GPU.
#
# Results: benchmarks/results/{extract,compare,optim}_cuda.{json,md} and cuda_tests.txt; commit them.
#
#   bash benchmarks/gpu_suite.sh            # everything
#   SKIP_INSTALL=1 bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
results=benchmarks/results
mkdir -p "$results"
py=.venv-gpu/bin/python

step() {  # step <seconds> <name> <command...>: run with a time limit, report, keep going
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s, $((SECONDS - start))s elapsed)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    return 0
}

has_cuda() {  # the interpreter $py imports torch and sees a CUDA device
    $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

if [[ -z "${SKIP_INSTALL:-}" ]]; then
    [[ -x $py ]] || python3 -m venv --system-site-packages .venv-gpu
    if ! has_cuda; then
        echo "gpu_suite: torch with CUDA is not importable here, or no CUDA device is visible (need a CUDA build of torch installed system-wide and a GPU)"
        exit 2
    fi
    torch_version="$($py -c 'import torch; print(torch.__version__.split("+")[0])')"
    constraints="$(mktemp)"
    echo "torch==$torch_version" > "$constraints"
    offline=()
    [[ -d benchmarks/wheels ]] && offline=(--no-index --find-links benchmarks/wheels)
    $py -m pip install --quiet "${offline[@]}" --constraint "$constraints" -e ".[dev]" \
        || { echo "gpu_suite: installing curvlab failed"; exit 3; }
    $py -m pip install --quiet "${offline[@]}" --constraint "$constraints" asdfghjkl \
        || echo "gpu_suite: asdfghjkl not installed: the optimizer table will lack the ASDL peers"
fi
if [[ ! -x $py ]]; then
    echo "gpu_suite: $py not found (SKIP_INSTALL=1 needs the .venv-gpu an earlier run created; run without it)"
    exit 2
fi
if ! has_cuda; then
    echo "gpu_suite: $py cannot import torch with CUDA, or no CUDA device is visible: nothing to run on"
    exit 2
fi
$py -c "import torch; print('gpu_suite:', torch.__version__, torch.cuda.get_device_name(0))" || exit 2

step 90 "CUDA tests" bash -c "$py -m pytest -q -p no:cacheprovider -k cuda tests 2>&1 | tee $results/cuda_tests.txt"
step 150 "extraction benchmark" $py benchmarks/bench_extract.py --device cuda --models mlp,cnn,3c3d,resnet18 \
    --repeats 5 --busy-cores 1000 --out $results/extract_cuda.json
step 40 "comparison benchmark" $py benchmarks/bench_compare.py --device cuda --out $results/compare_cuda.json
step 180 "optimizer benchmark" $py benchmarks/bench_optim.py --device cuda --threads 0 \
    --models mlp,mlp-1024,cnn,resnet18 --repeats 5 --slow-seconds 1 --out $results/optim_cuda.json
echo "gpu_suite: done in $((SECONDS - start)) s; results in $results/*_cuda.* (commit them)"
