#!/usr/bin/env bash
# Create .venv and install what finetune.py, the demo and the tests need.
#
#   bash install.sh          torch as pip picks it from requirements.txt (a CUDA build on Linux: for GPUs)
#   bash install.sh --cpu    a CPU-only torch first (TORCH_SPEC, default torch==2.13.0; set PIP_INDEX_URL or
#                            TORCH_INDEX_URL to PyTorch's CPU wheel index where the default index serves CUDA builds)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ "${1:-}" = --cpu ]; then
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
"${pip[@]}" -r requirements.txt
echo "installed into .venv (activate it with: source .venv/bin/activate)"
