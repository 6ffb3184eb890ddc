"""Sequence parallelism (DeepSpeed Ulysses / ALST, --sequence_parallel_size) and YaRN (--rope_scaling).

The proof is a comparison: the same samples in the same order, with the sequences split over 2 ranks and without,
must give the same loss and the same gradient norm at every step, and the same trained weights. The samples are
written so that the split (at position 64: rows are padded to --model_max_length 128 on the CPU) falls inside
them: trained tokens on both sides of it, only after it, and only before it (the other slice all padding).

The runs (marked `distributed` and e2e) start 2 or 4 processes, ~10-25 s each on 2 cores.
"""
import json
import math
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from fp32 import assert_changed_beyond_rounding, assert_fp32_close, backward_depth, forward_depth
from helpers import (DATA, PROMPT, ROOT, assert_adapter_changes_logits, assert_resumed_run_matches, assert_success,
                     base_model, log_history, logits_of, run_cli, run_in_process, torchrun, train_losses, write_jsonl,
                     zero3_config)
from safetensors.torch import load_file
from tiny_qwen import qwen_tokenizer_dir

import finetune
from finetune import IGNORE_INDEX, UserError


SPLIT = 64  # --model_max_length 128 over 2 ranks
SP_RUN = ["--model_max_length", str(2 * SPLIT), "--per_device_train_batch_size", "1", "--logging_steps", "1",
          "--seed", "0", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant",
          "--loss_chunk_size", "7"]  # several chunks, more on one rank than the other
LORA = ["--use_lora", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0"]  # (dropout: masks per rank)


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
    counts = [int((encoder.encode([encoder.parse(s, "")])[0]["labels"] != IGNORE_INDEX).sum()) for s in SAMPLES]
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
    """launch: "torchrun" (2 processes), "python" (one process of its own: --deepspeed starts torch.distributed even
    on one) or "in-process" (finetune.main in this process)."""
    if launch == "in-process":
        result = run_in_process(args)
    else:
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


@pytest.mark.e2e
@pytest.mark.distributed
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
    logits = [logits_of(peft.PeftModel.from_pretrained(base_model(tiny_qwen2), out), tokenizer)
              for out in (split, whole)]
    length = len(tokenizer(PROMPT)["input_ids"])
    assert_fp32_close(logits[0], logits[1], forward_depth(length) + 4 * backward_depth(tokens), "logits")


@pytest.mark.e2e
@pytest.mark.distributed
def test_sequence_parallel_run_resumes_mid_epoch_exactly(lora_runs, tiny_qwen2, data, tmp_path):
    """Step 3 of 2-micro-batch steps is 6 slices-pairs in: the resume skips batches under DeepSpeed's adapter."""
    whole = lora_runs["split_zero3"]
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(whole, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    run("torchrun", resumed, "--output_dir", resumed, "--model_name_or_path", tiny_qwen2, "--data_path", data,
        "--gradient_accumulation_steps", "2", "--max_steps", "4", *SP_RUN, *LORA, "--sequence_parallel_size", "2",
        "--deepspeed", zero3_config(tmp_path), "--save_strategy", "steps", "--save_steps", "3")
    assert tokens_seen(resumed) == tokens_seen(whole)
    assert_resumed_run_matches(resumed, whole, 1, "adapter_model.safetensors")


@pytest.mark.e2e
@pytest.mark.distributed
def test_sequence_parallel_full_finetune_beside_two_data_parallel_groups(tiny_qwen3, data, tmp_path):
    """4 processes: 2 groups of 2 ranks, each group splitting its own samples, with the chunked loss. 2 steps of 4
    samples equal one process accumulating the same 4 with the standard loss; the saved models reload with the
    same weights."""
    common = ["--model_name_or_path", tiny_qwen3, "--data_path", data, "--max_steps", "2", *SP_RUN,
              "--learning_rate", "0.05", "--deepspeed", zero3_config(tmp_path), "--save_strategy", "no"]
    split = str(tmp_path / "split")
    command = torchrun("--output_dir", split, *common, "--gradient_accumulation_steps", "2",
                       "--sequence_parallel_size", "2", "--activation_checkpointing", "true")  # recomputes the swaps
    command[command.index("--nproc_per_node") + 1] = "4"
    assert_success(run_cli(command))
    whole = run("python", str(tmp_path / "whole"), "--output_dir", str(tmp_path / "whole"), *common,
                "--gradient_accumulation_steps", "4", "--chunked_loss", "false")  # and the tied lm_head's gradient
    tokens = trained_tokens_per_step(tiny_qwen3, 4)
    assert_same_training(split, whole, tokens, 2, "2 x 2 ranks")
    models = [transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32) for out in (split, whole)]
    trained = dict(models[0].named_parameters())
    for name, expected in models[1].named_parameters():
        assert_fp32_close(trained[name].detach(), expected.detach(), 2 * backward_depth(tokens), name)
    assert_changed_beyond_rounding(trained["model.layers.0.self_attn.q_proj.weight"].detach(),
                                   base_model(tiny_qwen3).model.layers[0].self_attn.q_proj.weight.detach(),
                                   2 * backward_depth(tokens), "q_proj")


def sp_arguments(**overrides):
    values = dict(sequence_parallel_size=2, deepspeed="ds_config_zero3.json", world_size=2, packing=False)
    return SimpleNamespace(**{**values, **overrides})


def tiny_config(heads=4, kv_heads=2):
    return transformers.Qwen2Config(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads)


@pytest.mark.parametrize("overrides, attention, config, message", [
    (dict(deepspeed=None), "sdpa", tiny_config(), "--sequence_parallel_size 2 needs --deepspeed"),
    (dict(world_size=3), "sdpa", tiny_config(),
     r"--sequence_parallel_size 2 must divide the number of processes \(3\)"),
    (dict(), "eager", tiny_config(), "--attn_implementation eager cannot be split over ranks"),
    (dict(sequence_parallel_size=4, world_size=4), "sdpa", tiny_config(heads=6, kv_heads=2),
     "the model has 6 attention heads and 2 key/value heads"),
    (dict(sequence_parallel_size=4, world_size=4), "sdpa", tiny_config(heads=4, kv_heads=3),
     "the model has 4 attention heads and 3 key/value heads"),
    (dict(packing=True), "sdpa", tiny_config(), "--packing cannot be combined with --sequence_parallel_size 2"),
    (dict(), "sdpa", transformers.Qwen3_5Config(text_config=dict(num_attention_heads=4, num_key_value_heads=2)),
     "this model's linear-attention \\(Gated DeltaNet\\) layers carry a state along the whole sequence"),
], ids=["no-deepspeed", "world", "eager", "heads", "kv-heads", "packing", "linear-attention"])
def test_what_cannot_be_split_is_refused_in_one_line(overrides, attention, config, message):
    with pytest.raises(UserError, match=message) as error:
        args = sp_arguments(**overrides)
        finetune.check_sequence_parallelism(args, attention)  # at start-up, from the flags
        finetune.check_sequence_parallel_model(args, config)  # once the model's config is read
    assert "\n" not in str(error.value)


def test_a_possible_split_configures_the_trainer_for_deepspeed_ulysses():
    args = sp_arguments(world_size=4)
    finetune.check_sequence_parallelism(args, None)
    finetune.check_sequence_parallel_model(args, tiny_config())
    trainer_args = finetune.with_distributed_settings(args, SimpleNamespace(use_lora=False), None)
    config = trainer_args.parallelism_config
    assert (config.sp_backend, config.sp_size, config.dp_shard_size) == ("deepspeed", 2, 2)
    assert config.sp_handler.sp_attn_implementation == "sdpa" and config.sp_handler.sp_seq_length_is_variable
    assert not hasattr(args, "parallelism_config")  # a copy: the parsed flags stay as given
    untouched = sp_arguments(sequence_parallel_size=1, deepspeed=None)
    finetune.check_sequence_parallelism(untouched, "eager")
    assert finetune.with_distributed_settings(untouched, SimpleNamespace(use_lora=False), "eager") is untouched
    assert not hasattr(untouched, "parallelism_config")


def test_a_sequence_parallel_command_can_be_previewed_on_one_process(tmp_path, capsys):
    """--preprocess_only loads no model and splits nothing: the flags of the real run may stay on the command."""
    result = run_in_process(["--model_name_or_path", qwen_tokenizer_dir(), "--data_path", DATA, "--output_dir",
                             str(tmp_path / "out"), "--preprocess_only", "true", "--sequence_parallel_size", "2",
                             "--template", "chatml", "--data_cache_dir", "none"])
    assert result.returncode == 0, result.stderr
    assert "samples kept: 8" in result.stdout


def test_split_batches_are_padded_to_a_multiple_of_the_ranks_with_positions():
    collate = finetune.PadToLongestCollator(pad_token_id=0, multiple_of=4, position_ids=True)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                     {"input_ids": [5, 6], "labels": [-100, 6]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [5, 6, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, -100, -100], [-100, 6] + [-100] * 6]
    assert batch["position_ids"].tolist() == [list(range(8))] * 2
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 2 + [0] * 6]
    fixed = finetune.PadToLongestCollator(pad_token_id=0, multiple_of=4, length=10)  # gloo: one length
    assert fixed([{"input_ids": [5], "labels": [5]}])["input_ids"].shape == (1, 12)


@pytest.mark.e2e
def test_rope_scaling_stretches_positions_with_yarn_in_the_saved_model_and_beside_the_adapter(tiny_qwen2, tmp_path):
    import merge_adapter

    common = ["--model_name_or_path", tiny_qwen2, "--data_path", os.path.join(ROOT, "examples", "data.jsonl"),
              "--max_steps", "1", "--save_strategy", "no", "--rope_scaling", "4"]
    full = run("in-process", str(tmp_path / "full"), "--output_dir", str(tmp_path / "full"), *common)
    lora = run("in-process", str(tmp_path / "lora"), "--output_dir", str(tmp_path / "lora"), *common,
               "--use_lora", "true", "--rope_native_length", "2048")
    merged = merge_adapter.merge(lora, str(tmp_path / "merged"), dtype="fp32")
    for out, native in ((full, base_model(tiny_qwen2).config.max_position_embeddings), (merged, 2048)):
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        rope = model.config.rope_parameters
        assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4, native)
        assert model.config.max_position_embeddings == 4 * native
        assert model.model.rotary_emb.rope_type == "yarn"
        assert model.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4) + 1, rel=1e-12)
    assert "rope_parameters" in json.load(open(os.path.join(lora, "base_config_changes.json")))


@pytest.mark.e2e
def test_launcher_passes_sp_through_with_zero3(tiny_qwen2, tmp_path):
    result = run_cli(["bash", "finetune_lora.sh", "-m", tiny_qwen2, "-o", str(tmp_path / "o"), "--max_steps", "1"],
                     env={"SP": "2", "NPROC_PER_NODE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--sequence_parallel_size 2" in result.stdout and "ds_config_zero3.json" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == \
        "error: --sequence_parallel_size 2 must divide the number of processes (1)"
    refused = run_cli(["bash", "finetune_lora.sh"], env={"SP": "two"})
    assert refused.returncode == 2 and refused.stderr.strip() == "error: SP must be a positive integer, got 'two'"
