#!/usr/bin/env bash
# Create .venv and install what finetune.py, the demo and the tests need, at the versions the test suite passed with
# (constraints.txt; requirements.txt gives the ranges).
#
#   bash install.sh          torch as pip picks it from requirements.txt (a CUDA build on Linux: for GPUs)
#   bash install.sh --cpu    a CPU-only torch first (TORCH_SPEC, default torch==2.13.0; set PIP_INDEX_URL or
#                            TORCH_INDEX_URL to PyTorch's CPU wheel index where the default index serves CUDA builds)
#   ... --newest             the newest releases of transformers, peft, accelerate, DeepSpeed and TRL instead of the
#                            tested ones, and of what they need (torch stays as tested): what .ci/run --newest checks
#   VENV=folder              another environment than .venv
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
NEWEST=(transformers peft accelerate deepspeed trl)
cpu=false newest=false
for arg in "$@"; do
    case "$arg" in
        --cpu) cpu=true ;;
        --newest) newest=true ;;
        *) echo "install.sh: unknown option $arg (--cpu, --newest)" >&2; exit 2 ;;
    esac
done
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
constraints=constraints.txt
if $newest; then  # only torch as tested: the newest libraries may need newer versions of what they use
    constraints="$VENV/constraints-torch.txt"
    grep -iE "^torch==" constraints.txt > "$constraints"
fi
if $cpu; then
    "${pip[@]}" -c "$constraints" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.13.0}"
fi
"${pip[@]}" -c "$constraints" -r requirements.txt
if $newest; then  # past requirements.txt's upper bounds too: a major release that breaks us is what this is for
    "${pip[@]}" -c "$constraints" --upgrade "${NEWEST[@]}"
    "$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^($(IFS='|'; echo "${NEWEST[*]}")) "
fi
echo "installed into $VENV (activate it with: source $VENV/bin/activate)"
