#!/usr/bin/env bash
# Set up curvlab in a virtual environment, without pulling a CUDA build of torch.
#
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh --dev    # plus the test tools (pytest, hypothesis, curvlinops)
#
# Creates ./.venv with access to the system's site-packages: a torch already installed there is
# kept as it is; otherwise torch==2.13.0 is installed into .venv — the CPU wheel where pip finds
# one (this project's machines keep it on disk; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# names PyTorch's CPU index elsewhere: PyPI's Linux wheel is the CUDA build). Every later install
# is constrained to the torch present, so no dependency (BackPACK pulls torchvision) can swap it
# for another build.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev]"

[[ -x .venv/bin/python ]] || python3 -m venv --system-site-packages .venv
py=".venv/bin/python"

if ! "$py" -c "import torch" 2>/dev/null; then
    echo "curvlab setup: installing torch==2.13.0${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    "$py" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
fi
torch_version="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

log="$(mktemp)"
if ! "$py" -m pip install --quiet --constraint "$constraints" -e ".$extras" >"$log" 2>&1; then
    cat "$log"
    exit 1
fi
grep -v "^WARNING: Location" "$log" || true
rm -f "$log"
"$py" -c "import curvlab, torch, backpack; print('curvlab setup: ok (torch', torch.__version__ + ')')"
