#!/usr/bin/env bash
# LoRA fine-tuning of a Qwen chat model on your conversations, on one GPU, all GPUs of a node, or several nodes.
#
#   bash finetune_lora.sh [-c RUN.yaml] [-m MODEL] [-d DATA] [-o OUTPUT] [--ds CONFIG|none] [any finetune.py flag ...]
#
# MODEL, DATA, OUTPUT and DS_CONFIG may also come from the environment. -c RUN.yaml (or .json): a file of
# finetune.py settings (see examples/*.yaml) that wins over the defaults below. Flags after them go to finetune.py
# unchanged and win over both (for example --num_train_epochs 1 or --model_max_length 4096).
# Processes: NPROC_PER_NODE (default: every visible GPU, 1 without one), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1; required when NNODES > 1), MASTER_PORT (29500), RDZV_TIMEOUT (seconds the nodes wait
# for each other before giving up, 300). One process runs `python`, more run `torchrun`.
# DeepSpeed: --ds / DS_CONFIG (default ds_config_zero2.json on GPUs, none on the CPU, where it is for tests only).
# SP=N (1): split every sequence over N ranks (long samples; DeepSpeed Ulysses, DS_CONFIG then ds_config_zero3.json).
# PRECISION=auto|bf16|fp16|fp32 (auto: bf16 on GPUs that have it, fp16 on other GPUs, fp32 on the CPU).
# finetune_qlora.sh is this script with --q_lora true.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
DATA="${DATA:-$HERE/examples/data.jsonl}"
OUTPUT="${OUTPUT:-output_lora}"
PRECISION="${PRECISION:-auto}"
PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-300}"
SP="${SP:-1}"

fail() { echo "error: $*" >&2; exit 2; }
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }  # the header

passthrough=()
config=()
explicit=()  # -m/-d/-o given on this command line: they win over a config file, so they go after it
while [ $# -gt 0 ]; do
    case "$1" in
        -c|--config) [ $# -ge 2 ] || fail "$1 needs a value"; [ -f "$2" ] || fail "config file $2 not found"
                     config=(--config "$2"); CONFIG_FILE="$2"; shift 2 ;;
        -m|--model)  [ $# -ge 2 ] || fail "$1 needs a value"; MODEL="$2"; explicit+=(--model_name_or_path "$2"); shift 2 ;;
        -d|--data)   [ $# -ge 2 ] || fail "$1 needs a value"; DATA="$2"; explicit+=(--data_path "$2"); shift 2 ;;
        -o|--output) [ $# -ge 2 ] || fail "$1 needs a value"; OUTPUT="$2"; explicit+=(--output_dir "$2"); shift 2 ;;
        --ds)        [ $# -ge 2 ] || fail "$1 needs a value"; DS_CONFIG="$2"; shift 2 ;;
        -h|--help)   usage; exit 0 ;;
        *)           passthrough+=("$1"); shift ;;
    esac
done

# What this machine has: number of GPUs and the best precision they support.
read -r GPUS BEST_PRECISION < <("$PYTHON" -c 'import torch
n = torch.cuda.device_count()
print(n, ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if n else "fp32")')
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}"
[ "$PRECISION" = auto ] && PRECISION="$BEST_PRECISION"
case "$PRECISION" in
    bf16) precision_flags=(--bf16 true) ;;
    fp16) precision_flags=(--fp16 true) ;;
    fp32) precision_flags=() ;;  # finetune.py's default
    *) fail "PRECISION must be auto, bf16, fp16 or fp32, got '$PRECISION'" ;;
esac
for arg in "${passthrough[@]}"; do  # a precision flag given on the command line wins over PRECISION
    case "$arg" in --bf16|--bf16=*|--fp16|--fp16=*) precision_flags=() ;; esac
done
if [ -n "${CONFIG_FILE:-}" ] && grep -Eq '^[[:space:]]*"?(bf16|fp16)"?[[:space:]]*:' "$CONFIG_FILE"; then
    precision_flags=()  # and so does one in the config file
fi
[[ "$SP" =~ ^[1-9][0-9]*$ ]] || fail "SP must be a positive integer, got '$SP'"
sp_flags=()
if [ "$SP" -gt 1 ]; then
    sp_flags=(--sequence_parallel_size "$SP")
    DS_CONFIG="${DS_CONFIG:-$HERE/ds_config_zero3.json}"  # splitting sequences is DeepSpeed's
fi
if [ -z "${DS_CONFIG:-}" ]; then
    DS_CONFIG=$([ "$GPUS" -gt 0 ] && echo "$HERE/ds_config_zero2.json" || echo none)
fi
ds_flags=()
if [ "$DS_CONFIG" != none ]; then
    [ -f "$DS_CONFIG" ] || fail "DeepSpeed config $DS_CONFIG not found"
    ds_flags=(--deepspeed "$DS_CONFIG")
fi

# Wrong node variables make torchrun wait forever for peers that never come: check them first.
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || fail "NNODES must be a positive integer, got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
    || fail "NODE_RANK must be 0..$((NNODES - 1)) for NNODES=$NNODES, got '$NODE_RANK'"
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || fail "NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'"
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    fail "NNODES=$NNODES needs MASTER_ADDR: the address of the node with NODE_RANK=0, the same on every node"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"

if [ "$NNODES" -eq 1 ] && [ "$NPROC_PER_NODE" -eq 1 ]; then
    launcher=("$PYTHON")
else
    launcher=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES"
              --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
              --rdzv_conf "timeout=$RDZV_TIMEOUT")
fi

defaults=(
    --model_name_or_path "$MODEL"
    --data_path "$DATA"
    --output_dir "$OUTPUT"
    --num_train_epochs 3
    --per_device_train_batch_size 2
    --gradient_accumulation_steps 8
    --learning_rate 3e-4
    --weight_decay 0.1
    --adam_beta2 0.95
    --warmup_steps 0.01  # below 1: a fraction of the run's steps (transformers 5 folded warmup_ratio into it)
    --lr_scheduler_type cosine
    --model_max_length 2048
    --activation_checkpointing true
    --logging_steps 10
    --save_strategy steps
    --save_steps 100
    --save_total_limit 3)
# A default given again on this command line is left out, so that the printed command says each flag once.
given=" ${explicit[*]} ${passthrough[*]} "
kept=()
for ((i = 0; i < ${#defaults[@]}; i += 2)); do
    flag="${defaults[i]}"
    [[ "$given" == *" $flag "* || "$given" == *" $flag="* ]] || kept+=("$flag" "${defaults[i + 1]}")
done

cmd=("${launcher[@]}" "$HERE/finetune.py"
    --use_lora true
    "${precision_flags[@]}"
    "${ds_flags[@]}"
    "${sp_flags[@]}"
    "${kept[@]}"
    "${config[@]}"
    "${explicit[@]}"
    "${passthrough[@]}")

echo "+ ${cmd[*]}"
if [ "${#launcher[@]}" -eq 1 ]; then
    exec "${cmd[@]}"  # one process: finetune.py handles SIGTERM and Ctrl-C itself (checkpoint, exit 143 / 130)
fi

# torchrun would answer SIGTERM with a traceback and kill the workers 30 s later, checkpoint or not. So it ignores
# SIGTERM and Ctrl-C here, this script hands them to the workers, and the workers stop at their next micro-batch,
# write the checkpoint of the last completed step and exit 0 for it (FINETUNE_SIGNAL_EXIT_CODE), so that torchrun
# reports no failure; this script then exits 128 + the signal, as a single process would.
# The workers get SIGTERM for Ctrl-C too (a repeated SIGINT would end them at once), again every second until
# they are gone: one still importing ignores it until finetune.py starts listening. A second Ctrl-C kills them.
( trap '' TERM INT; PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT FINETUNE_SIGNAL_EXIT_CODE=0 exec "${cmd[@]}" ) &
child=$!
signalled=""
delivered=""  # a worker has had the signal: once they are all gone, torchrun is left to finish on its own
on_signal() {
    [ "$signalled" = INT ] && [ "$1" = INT ] && { pkill -KILL -P "$child" 2>/dev/null || true; }
    signalled="${signalled:-$1}"
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
while kill -0 "$child" 2>/dev/null; do
    if [ -z "$signalled" ]; then
        wait "$child" || true
    else
        if pkill -TERM -P "$child" 2>/dev/null; then
            delivered=1
        elif [ -z "$delivered" ]; then  # no worker yet (rendezvous): torchrun stops on SIGHUP
            kill -HUP "$child" 2>/dev/null || true
        fi
        sleep 1
    fi
done
status=0
wait "$child" || status=$?
if [ -n "$signalled" ] && [ "$status" -eq 0 ]; then  # the workers saved and stopped as asked
    [ "$signalled" = TERM ] && exit 143 || exit 130
fi
exit "$status"
