#!/usr/bin/env bash
# LoRA fine-tuning of a Qwen chat model on your conversations.
#
#   bash finetune_lora.sh [-m MODEL] [-d DATA] [-o OUTPUT] [any finetune.py flag ...]
#
# MODEL, DATA and OUTPUT may also come from the environment. Flags after them go to finetune.py unchanged
# and win over the defaults below (for example --num_train_epochs 1 or --model_max_length 4096).
# PRECISION=auto|bf16|fp16|fp32 picks the dtype (auto: bf16 on a GPU that has it, fp16 on other GPUs,
# fp32 on the CPU). finetune_qlora.sh is this script with --q_lora true.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
DATA="${DATA:-$HERE/examples/data.jsonl}"
OUTPUT="${OUTPUT:-output_lora}"
PRECISION="${PRECISION:-auto}"
PYTHON="${PYTHON:-python}"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

passthrough=()
while [ $# -gt 0 ]; do
    case "$1" in
        -m|--model)  [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }; MODEL="$2"; shift 2 ;;
        -d|--data)   [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }; DATA="$2"; shift 2 ;;
        -o|--output) [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }; OUTPUT="$2"; shift 2 ;;
        -h|--help)   usage; exit 0 ;;
        *)           passthrough+=("$1"); shift ;;
    esac
done

if [ "$PRECISION" = auto ]; then
    PRECISION="$("$PYTHON" -c 'import torch
if not torch.cuda.is_available(): print("fp32")
else: print("bf16" if torch.cuda.is_bf16_supported() else "fp16")')"
fi
case "$PRECISION" in
    bf16) precision_flags=(--bf16 true) ;;
    fp16) precision_flags=(--fp16 true) ;;
    fp32) precision_flags=() ;;
    *) echo "error: PRECISION must be auto, bf16, fp16 or fp32, got '$PRECISION'" >&2; exit 2 ;;
esac

cmd=("$PYTHON" "$HERE/finetune.py"
    --model_name_or_path "$MODEL"
    --data_path "$DATA"
    --output_dir "$OUTPUT"
    --use_lora true
    "${precision_flags[@]}"
    --num_train_epochs 3
    --per_device_train_batch_size 2
    --gradient_accumulation_steps 8
    --learning_rate 3e-4
    --weight_decay 0.1
    --adam_beta2 0.95
    --warmup_steps 0.01
    --lr_scheduler_type cosine
    --model_max_length 2048
    --activation_checkpointing true
    --logging_steps 10
    --save_strategy steps
    --save_steps 100
    --save_total_limit 3
    "${passthrough[@]}")

echo "+ ${cmd[*]}"
exec "${cmd[@]}"
