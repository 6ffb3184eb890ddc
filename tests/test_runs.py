"""Real-world runs: interrupted and repeated commands, held-out validation, curves, merging an adapter."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import transformers
from fp32 import assert_fp32_close, forward_depth
from helpers import (CHILD_ENV, DATA, PROMPT, assert_resumed_run_matches, assert_success, complete, fake_checkpoint,
                     logits_of, lora_args, lora_command, run_finetune, training_args)

import finetune
import merge_adapter


def wait_for(predicate, process, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.e2e
def test_a_killed_run_repeated_ends_with_the_weights_of_an_uninterrupted_run(tiny_qwen2, tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert_success(run_finetune(lora_command(tiny_qwen2, whole, "--max_steps", "10")[2:]))

    process = subprocess.Popen(lora_command(tiny_qwen2, killed, "--max_steps", "10"), env=CHILD_ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: complete(os.path.join(killed, "checkpoint-4")), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # Newer than every good checkpoint: one cut short by the kill, and one whose optimizer state a bad disk
    # truncated (its trainer_state.json says it is complete). Both must be passed over, the second with a word.
    os.makedirs(os.path.join(killed, "checkpoint-9"))
    with open(os.path.join(killed, "checkpoint-9", "adapter_model.safetensors"), "wb") as f:
        f.write(b"\0" * 100)
    damaged = shutil.copytree(os.path.join(killed, "checkpoint-4"), os.path.join(killed, "checkpoint-8"))
    state = json.load(open(os.path.join(damaged, "trainer_state.json")))
    json.dump({**state, "global_step": 8}, open(os.path.join(damaged, "trainer_state.json"), "w"))
    os.truncate(os.path.join(damaged, "optimizer.pt"), os.path.getsize(os.path.join(damaged, "optimizer.pt")) // 2)

    result = run_finetune(lora_command(tiny_qwen2, killed, "--max_steps", "10")[2:])  # the same command again
    assert_success(result)
    assert f"skipping {damaged}: optimizer.pt is truncated or corrupt" in result.stderr
    resumed_from = [line for line in result.stderr.splitlines() if "resuming from" in line]
    assert resumed_from and not any(f"checkpoint-{n}" in resumed_from[0] for n in (8, 9))
    assert_resumed_run_matches(killed, whole, 6, "adapter_model.safetensors")  # steps 5-10 again, from step 4


@pytest.mark.e2e
def test_sigterm_writes_a_checkpoint_at_the_current_step_and_names_it(tiny_qwen2, tmp_path):
    out = str(tmp_path / "term")
    with open(tmp_path / "stderr.txt", "w+") as stderr_file:
        process = subprocess.Popen(lora_command(tiny_qwen2, out, "--max_steps", "500", "--save_steps", "200"),
                                   env=CHILD_ENV, stdout=subprocess.PIPE, stderr=stderr_file, text=True)
        for line in process.stdout:  # the Trainer prints each log line here: training has started
            if "'loss'" in line:
                break
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
        stderr_file.seek(0)
        stderr = stderr_file.read()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoints = [name for name in os.listdir(out) if name.startswith("checkpoint-")]
    assert len(checkpoints) == 1
    step = int(checkpoints[0].split("-")[1])
    assert 0 < step < 200 and complete(os.path.join(out, checkpoints[0]))
    assert f"stopped by SIGTERM at step {step}; the checkpoint is {os.path.join(out, checkpoints[0])}" in stderr
    assert "Traceback" not in stderr


def test_newest_complete_checkpoint_and_overwrite(tmp_path):
    out = tmp_path / "out"
    for step in (2, 4):
        fake_checkpoint(out / f"checkpoint-{step}", step)
    fake_checkpoint(out / "checkpoint-6", 6, state=False)  # cut short before trainer_state.json
    fake_checkpoint(out / "checkpoint-8", 8, state={"global_step": 7})
    fake_checkpoint(out / "checkpoint-10", 10, optimizer=False)  # --save_only_model: cannot resume
    assert finetune.newest_complete_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert finetune.resolve_resume_checkpoint(training_args(tmp_path)) == (str(out / "checkpoint-4"), None)
    assert finetune.resolve_resume_checkpoint(training_args(tmp_path, overwrite_output_dir=True)) == (None, None)
    with pytest.raises(finetune.UserError, match="contradict"):
        finetune.resolve_resume_checkpoint(training_args(tmp_path, overwrite_output_dir=True,
                                                         resume_from_checkpoint=str(out / "checkpoint-4")))
    finetune.remove_checkpoints(str(out))
    assert not os.listdir(out)


def test_val_size_holds_out_the_same_samples_for_the_same_seed(tokenizer, tmp_path):
    from helpers import make_encoder

    dataset = finetune.SupervisedDataset(DATA, make_encoder(tokenizer))
    train, held_out = finetune.split_off_validation(dataset, 0.25, seed=3)
    assert (len(train), len(held_out)) == (6, 2) and not set(train.indices) & set(held_out.indices)
    assert finetune.split_off_validation(dataset, 0.25, seed=3)[1].indices == held_out.indices
    assert train.lengths == [dataset.lengths[i] for i in train.indices]
    with pytest.raises(finetune.UserError, match="leaves no training or no validation sample"):
        finetune.split_off_validation(dataset, 8, seed=3)


@pytest.mark.parametrize("q_lora", [False, True])
def test_merged_model_gives_the_logits_of_base_plus_adapter(tiny_qwen2, tmp_path, tokenizer, q_lora):
    import peft

    model = finetune.load_model(finetune.ModelArguments(model_name_or_path=tiny_qwen2), training_args(tmp_path),
                                lora_args(q_lora=q_lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    adapter = str(tmp_path / "adapter")
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)

    merged_dir = merge_adapter.merge(adapter, str(tmp_path / "merged"), base=tiny_qwen2, dtype="fp32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name in merged.state_dict())
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    expected = logits_of(peft.PeftModel.from_pretrained(base, adapter), tokenizer)
    # x(W + BA) against xW + (xA)B: the forward's sums, plus one over the adapter's rank, in another order.
    depth = forward_depth(len(tokenizer(PROMPT)["input_ids"])) + 4
    assert_fp32_close(logits_of(merged, tokenizer), expected, depth, "logits")
    reloaded = transformers.AutoTokenizer.from_pretrained(merged_dir)
    assert reloaded.chat_template == tokenizer.chat_template


def test_training_curves_are_drawn(tmp_path):
    history = [{"step": s, "loss": 3.0 - s / 10, "learning_rate": 1e-3 * (1 - s / 10)} for s in range(1, 10)]
    history += [{"step": 5, "eval_loss": 2.8}, {"step": 9, "eval_loss": 2.3}]
    path = tmp_path / "curves.png"
    finetune.plot_training_curves(history, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_length_histogram_shows_what_truncation_cuts():
    text = finetune.length_histogram([10, 20, 70, 300, 900], model_max_length=256, rows=4)
    lines = text.splitlines()
    assert lines[0].endswith("--model_max_length 256:")
    assert lines[1].split()[0] == "1-64" and lines[1].split()[-1] == "2"
    assert lines[-1].split()[:2] == [">", "256"] and lines[-1].endswith("2  <- cut to model_max_length")
