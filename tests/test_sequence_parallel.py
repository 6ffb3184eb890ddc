"""Sequence parallelism (DeepSpeed Ulysses / ALST, --sequence_parallel_size) and YaRN (--rope_scaling).

The proof is a comparison: the same samples in the same order, with the sequences split over 2 ranks and without,
must give the same loss and the same gradient norm at every step, and the same trained weights. The samples are
written so that the split (at position 64: rows are padded to --model_max_length 128 on the CPU) falls inside
them: trained tokens on both sides of it, only after it, and only before it (the other slice all padding).

Marked `distributed` (and e2e): the runs start 2 or 4 processes, ~10-25 s each on 2 cores.
"""
import math
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import ROOT, log_history, run_cli, run_finetune, write_jsonl
from fp32 import assert_fp32_close, backward_depth, forward_depth
from safetensors.torch import load_file
from test_distributed import torchrun, zero3_config
from test_e2e import PROMPT, assert_adapter_changes_logits, assert_success, base_model, logits_of, train_losses

import finetune
from finetune import IGNORE_INDEX, UserError

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

SPLIT = 64  # --model_max_length 128 over 2 ranks
SP_RUN = ["--model_max_length", str(2 * SPLIT), "--per_device_train_batch_size", "1", "--logging_steps", "1",
          "--seed", "0", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant"]
LORA = ["--use_lora", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0"]  # dropout masks are per rank


def conversation(*turns):
    return {"conversations": [{"from": role, "value": text} for role, text in turns]}


SAMPLES = [  # where the trained tokens fall, relative to the split, is checked by test_the_samples_straddle_the_split
    conversation(("user", "Name three primary colours."),
                 ("assistant", "Red, yellow and blue are the traditional primary colours used by painters."),
                 ("user", "And for light?"),
                 ("assistant", "For light the primaries are red, green and blue, which is why screens, projectors "
                               "and stage lamps mix those three to make every other colour you see.")),
    conversation(("user", "Here is a long note I wrote about my garden this spring: the tomatoes came up early, the "
                          "beans were slow, the lettuce bolted in the first heat wave, the squirrels dug up half of "
                          "the tulip bulbs, and the roses caught black spot after a wet May. What went best?"),
                 ("assistant", "The tomatoes.")),
    conversation(("user", "Say hi."), ("assistant", "Hi!")),
    conversation(("user", "What is 7 times 8?"), ("assistant", "7 times 8 is 56."), ("user", "And 9 times 6?"),
                 ("assistant", "9 times 6 is 54, two less than 56."), ("user", "Which is larger?"),
                 ("assistant", "56 is larger than 54 by two.")),
    conversation(("user", "Summarise: the meeting moved from Tuesday to Thursday because the projector broke, the "
                          "caterer cancelled, and two of the speakers were stuck at the airport after their flight "
                          "was delayed by fog for most of the morning, so the organisers chose the later date and "
                          "emailed everyone twice."),
                 ("assistant", "Moved to Thursday.")),
    conversation(("user", "Spell cat backwards."), ("assistant", "tac")),
    conversation(("user", "Give me a tip for sleeping better."),
                 ("assistant", "Keep the same wake-up time every day, weekends included; the body clock follows the "
                               "morning light more than the hour you go to bed."),
                 ("user", "Anything about screens?"),
                 ("assistant", "Dim them in the last hour before bed.")),
    conversation(("user", "Translate 'good morning' into French."), ("assistant", "Bonjour.")),
]
STRADDLE = {0: "both", 1: "after", 2: "before", 3: "both", 4: "after", 5: "before", 6: "both", 7: "before"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sp_data") / "split.jsonl", SAMPLES)


def test_the_samples_straddle_the_split(tiny_qwen2):
    """Under the split, rank 0 scores positions 0..63 (labels 1..64) and rank 1 positions 64..127 (labels 65..)."""
    encoder = finetune.ChatEncoder(transformers.AutoTokenizer.from_pretrained(tiny_qwen2), 2 * SPLIT)
    for k, sample in enumerate(SAMPLES):
        labels = encoder.encode([encoder.parse(sample, f"sample {k}")])[0]["labels"]
        assert len(labels) <= 2 * SPLIT
        before = any(label != IGNORE_INDEX for label in labels[1:SPLIT + 1])
        after = any(label != IGNORE_INDEX for label in labels[SPLIT + 1:])
        assert {(True, True): "both", (False, True): "after", (True, False): "before"}[before, after] == STRADDLE[k]


def grad_norms(output_dir):
    return [entry["grad_norm"] for entry in log_history(output_dir) if "loss" in entry]


def tokens_seen(output_dir):
    return [entry["num_input_tokens_seen"] for entry in log_history(output_dir) if "loss" in entry]


def trained_tokens_per_step(tokenizer_path, per_step):
    """The most trained tokens a step of `per_step` samples can hold (the order is shuffled)."""
    encoder = finetune.ChatEncoder(transformers.AutoTokenizer.from_pretrained(tokenizer_path), 2 * SPLIT)
    counts = [sum(label != IGNORE_INDEX for label in encoder.encode([encoder.parse(s, "")])[0]["labels"])
              for s in SAMPLES]
    return sum(sorted(counts)[-per_step:])


def assert_same_training(got, expected, tokens, steps, what):
    """The same samples step by step, the same step losses (token-weighted means) and gradient norms, up to sums
    taken in another order."""
    assert len(train_losses(got)) == len(train_losses(expected)) == steps, what
    assert tokens_seen(got) == tokens_seen(expected), what
    assert_fp32_close(train_losses(got), train_losses(expected), steps * tokens, f"{what}: losses")
    assert_fp32_close(grad_norms(got), grad_norms(expected), steps * backward_depth(tokens), f"{what}: grad norms")


def finetune_file(name):
    return os.path.join(ROOT, name)


def run(launch, out, *args):
    command = torchrun(*args) if launch == "torchrun" else [sys.executable, finetune_file("finetune.py"), *args]
    result = run_cli(command)
    assert_success(result)
    return out


@pytest.fixture(scope="module")
def lora_runs(tiny_qwen2, data, tmp_path_factory):
    """4 steps of LoRA (2 samples each, one per micro-batch) with and without the split over 2 ranks: under
    ZeRO-3 and ZeRO-2, with our chunked loss and the standard one. The split ZeRO-3 run also writes a checkpoint
    at step 3 (mid-epoch, mid-pair of slices), for the resume test."""
    tmp = tmp_path_factory.mktemp("sp_lora")
    zero3 = zero3_config(tmp)
    common = ["--model_name_or_path", tiny_qwen2, "--data_path", data, "--gradient_accumulation_steps", "2",
              "--max_steps", "4", *SP_RUN, *LORA]
    split = ["--sequence_parallel_size", "2"]
    return {
        "split_zero3": run("torchrun", str(tmp / "a"), "--output_dir", str(tmp / "a"), *common, *split,
                           "--deepspeed", zero3, "--save_strategy", "steps", "--save_steps", "3"),
        "split_zero3_standard_loss": run("torchrun", str(tmp / "b"), "--output_dir", str(tmp / "b"), *common, *split,
                                         "--deepspeed", zero3, "--chunked_loss", "false", "--save_strategy", "no"),
        "split_zero2": run("torchrun", str(tmp / "c"), "--output_dir", str(tmp / "c"), *common, *split,
                           "--deepspeed", finetune_file("ds_config_zero2.json"), "--save_strategy", "no"),
        "whole": run("python", str(tmp / "d"), "--output_dir", str(tmp / "d"), *common, "--deepspeed", zero3,
                     "--chunked_loss", "false", "--save_strategy", "no"),
        "tokens": trained_tokens_per_step(tiny_qwen2, 2),
    }


def test_sequence_parallel_lora_trains_exactly_as_without_it(lora_runs, tiny_qwen2):
    whole, tokens = lora_runs["whole"], lora_runs["tokens"]
    for name in ("split_zero3", "split_zero3_standard_loss", "split_zero2"):
        assert_same_training(lora_runs[name], whole, tokens, 4, name)
    split = lora_runs["split_zero3"]
    # The saved adapter: the same weights (4 SGD steps of gradients summed in another order) and logits.
    got, expected = load_file(os.path.join(split, "adapter_model.safetensors")), \
        load_file(os.path.join(whole, "adapter_model.safetensors"))
    assert got.keys() == expected.keys() and len(got) == 2 * 7 * 2
    for key in expected:
        assert_fp32_close(got[key], expected[key], 4 * backward_depth(tokens), key)
    assert_adapter_changes_logits(tiny_qwen2, split)
    import peft

    tokenizer = transformers.AutoTokenizer.from_pretrained(split)
    logits = [logits_of(peft.PeftModel.from_pretrained(base_model(tiny_qwen2), out), tokenizer) for out in (split, whole)]
    length = len(tokenizer(PROMPT)["input_ids"])
    assert_fp32_close(logits[0], logits[1], forward_depth(length) + 4 * backward_depth(tokens), "logits")
