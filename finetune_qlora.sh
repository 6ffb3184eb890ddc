#!/usr/bin/env bash
# QLoRA fine-tuning: the base model is loaded in 4-bit NF4 (bitsandbytes) and a LoRA adapter is trained on top.
#
#   bash finetune_qlora.sh [-m MODEL] [-d DATA] [-o OUTPUT] [any finetune.py flag ...]
#
# Everything else is as in finetune_lora.sh, which this script runs with --q_lora true.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUTPUT="${OUTPUT:-output_qlora}" exec bash "$HERE/finetune_lora.sh" --q_lora true "$@"
