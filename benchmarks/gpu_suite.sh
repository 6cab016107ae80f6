#!/usr/bin/env bash
# The GPU suite: on a machine with a CUDA GPU, from this repository alone, in under 8 minutes:
#
#   1. a virtual environment (.venv-gpu) that sees the packages of the python3 holding CUDA torch
#      (GPU_PYTHON names another), runs curvlab from this checkout and installs its dependencies
#      with the test extras and asdfghjkl — offline from benchmarks/wheels/ when that folder
#      exists (--download-wheels fills it), otherwise from the configured index; always
#      constrained to the torch present;
#   2. the CUDA tests (every test that skips without a CUDA device);
#   3. the extraction, comparison and optimizer benchmarks on the GPU;
#   4. a profile of every kind of optimizer step (kernels, busy time, launches, host reads), for
#      the sessions without a GPU to work from.
#
# Results: benchmarks/results/{extract,compare,optim,profile}_cuda.{json,md}, optim_cuda_resnet18.{json,md}
# and cuda_tests.txt; commit them.
#
#   bash benchmarks/gpu_suite.sh            # everything
#   SKIP_INSTALL=1 bash benchmarks/gpu_suite.sh
#   bash benchmarks/gpu_suite.sh --download-wheels   # beforehand, where pip reaches PyPI, for an
#                                                    # offline GPU machine with Python $WHEELS_PYTHON
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    --download-wheels)  # the pure-Python packages a CUDA image tends to lack: checked against
        # the package list of the lent H100/H200 machines' image (as read on 2026-11-17) with
        # every wheel's Requires-Dist — the rest (torchvision, einops, opt-einsum, scipy, xarray,
        # h5py, seaborn, pandas, scikit-learn, pytest-xdist, hypothesis, …) is there; another
        # image lacking more fails the install, naming the package
        python3 -m pip download --no-deps --only-binary=:all: --python-version "${WHEELS_PYTHON:-3.12}" \
            -d benchmarks/wheels backpack-for-pytorch unfoldNd curvlinops-for-pytorch einconv linear_operator \
            h5netcdf asdfghjkl
        exit;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_suite.sh [--download-wheels]  (env: RESULTS, GPU_PYTHON, SKIP_INSTALL, WHEELS_PYTHON)"
       exit 2;;
esac
start=$SECONDS
results=${RESULTS:-benchmarks/results}  # RESULTS=<folder> writes them elsewhere
py=.venv-gpu/bin/python
failed=()

step() {  # step <seconds> <name> <command...>: run with a time limit, report, keep going
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s, $((SECONDS - start))s elapsed)"
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [[ $rc == 0 ]] || failed+=("$name (exit $rc)")
    return 0
}

has_cuda() {  # the interpreter $py imports torch and sees a CUDA device
    $py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}

if [[ -z "${SKIP_INSTALL:-}" ]]; then
    base=${GPU_PYTHON:-python3}
    if ! $base -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_suite: $base cannot import torch with CUDA, or no CUDA device is visible (need a CUDA build of torch and a GPU; GPU_PYTHON=<interpreter> names another)"
        exit 2
    fi
    # Without pip of its own (and no old setuptools hiding $base's): $base's pip installs into it.
    [[ -x $py ]] || $base -m venv --without-pip .venv-gpu || { echo "gpu_suite: $base cannot make a virtual environment"; exit 2; }
    pip=("$base" -m pip --python "$py")  # pip >= 22.3
    # The venv sees every package of $base through a .pth file (their own .pth files included),
    # also where $base is itself a venv: --system-site-packages would show only its base
    # interpreter's packages, without torch.
    purelib="$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    $base -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))' \
        > "$purelib/gpu_suite_base.pth"
    torch_version="$($py -c 'import torch; print(torch.__version__.split("+")[0])')"
    constraints="$(mktemp)"
    echo "torch==$torch_version" > "$constraints"
    offline=()
    [[ -d benchmarks/wheels ]] && offline=(--no-index --find-links benchmarks/wheels)
    # curvlab itself runs from this checkout (a .pth line: no build step, which offline would need
    # setuptools' whole build chain as wheels); pip installs its dependencies as pyproject.toml lists them.
    requirements="$(mktemp)"
    $py -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))' \
        > "$requirements" || { echo "gpu_suite: cannot read pyproject.toml's dependencies (Python >= 3.11 needed)"; exit 3; }
    "${pip[@]}" install --quiet "${offline[@]}" --constraint "$constraints" -r "$requirements" \
        || { echo "gpu_suite: installing curvlab's dependencies failed"; exit 3; }
    pwd > "$purelib/gpu_suite_curvlab.pth"
    "${pip[@]}" install --quiet "${offline[@]}" --constraint "$constraints" asdfghjkl \
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
mkdir -p "$results"

# the step limits add up to 420 s (5 s more each to stop): with the install, under 8 minutes
# (pipefail in the step's own shell: the status is pytest's, not tee's)
step 80 "CUDA tests" bash -o pipefail -c "$py -m pytest -q -p no:cacheprovider -k cuda tests 2>&1 | tee $results/cuda_tests.txt"
step 100 "extraction benchmark" $py benchmarks/bench_extract.py --device cuda --models mlp,cnn,3c3d,resnet18 \
    --repeats 5 --busy-cores 1000 --out $results/extract_cuda.json
step 25 "comparison benchmark" $py benchmarks/bench_compare.py --device cuda --out $results/compare_cuda.json
# ResNet-18 first, SGD and curvlab's optimizers alone: the GPU targets are on them (every curvlab
# optimizer amortised <= 1.3x SGD), and the first GPU run's limit fell in ResNet-18's second repeat
# with every peer in it; then the small models with every peer, ASDL's included.  Results are
# written after every repeat: a model a step's limit cuts keeps the repeats it finished, marked
# "cut short".
step 100 "optimizer benchmark, ResNet-18" $py benchmarks/bench_optim.py --device cuda --threads 0 \
    --models resnet18 --peers sgd,curvlab-kfac,curvlab-ekfac,curvlab-tkfac,curvlab-tekfac --repeats 3 \
    --slow-seconds 1 --out $results/optim_cuda_resnet18.json
step 70 "optimizer benchmark, small models" $py benchmarks/bench_optim.py --device cuda --threads 0 \
    --models cnn,mlp,mlp-1024 --repeats 3 --slow-seconds 1 --out $results/optim_cuda.json
step 45 "step profile" $py benchmarks/profile_steps.py --device cuda --threads 0 --models resnet18,mlp \
    --budget 40 --out $results/profile_cuda.json
echo "gpu_suite: done in $((SECONDS - start)) s; results in $results/*_cuda.* (commit them)"
if (( ${#failed[@]} )); then
    echo "gpu_suite: failed or cut by their limits: ${failed[*]}"
    exit 1
fi
