"""The output folder and its checkpoints: one run per folder; checkpoints verified on content, the newest good one
resumed, one that cannot fit the flags or the data refused; resumed runs that end where an uninterrupted run ends,
on the same or on another number of processes (DDP, DeepSpeed ZeRO-2, and ZeRO-3 through its universal checkpoints).

Most checks run in-process on the functions main() calls. Runs are marked e2e: one process runs finetune.main() in
this process, except the run killed with SIGKILL. The resumes on another number of processes (each runs 2-process
training, then resumes it on 1 and on 4 processes) are subprocesses, also marked distributed; their one-process runs
too, as they compare with the same engines (--deepspeed starts torch.distributed even on one process)."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from fp32 import assert_fp32_close, backward_depth
from helpers import (CHILD_ENV, DATA, GOOD, GOOD_LINE, LORA, ROOT, SHORT_RUN, assert_resumed_run_matches,
                     assert_success, complete, fake_checkpoint, log_history, lora_args, lora_command, run_cli,
                     run_in_process, train_losses, training_args, write_jsonl, zero3_config)
from safetensors.torch import load_file

import finetune


# ---------------------------------------------------------------------------------------------------------
# The output folder: one run at a time
# ---------------------------------------------------------------------------------------------------------

def test_output_folders_that_cannot_hold_the_result(tmp_path, tiny_qwen2):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(finetune.UserError, match=f"--output_dir {a_file} is a file, not a folder"):
        finetune.claim_output_dir(str(a_file), tiny_qwen2)
    with pytest.raises(finetune.UserError, match=f"--output_dir {a_file}/out: cannot write there"):
        finetune.claim_output_dir(str(a_file / "out"), tiny_qwen2)
    with pytest.raises(finetune.UserError, match="is the model folder: the result would overwrite"):
        finetune.claim_output_dir(tiny_qwen2 + "/", tiny_qwen2)


def test_one_run_per_output_folder_and_a_dead_runs_lock_is_taken_over(tmp_path, tiny_qwen2, caplog):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / finetune.OUTPUT_LOCK).write_text("pid 999999 on elsewhere since yesterday")  # its process is gone
    try:
        with caplog.at_level(logging.INFO, logger="finetune"):
            finetune.claim_output_dir(str(out), tiny_qwen2)
        assert "taking over the lock of a process that ended without releasing it (pid 999999" in caplog.text
        with pytest.raises(finetune.UserError, match=rf"--output_dir {out} is in use by another run \(pid "
                                                     rf"{os.getpid()} on "):
            finetune.lock_output_dir(str(out))  # a second run: the lock is held
    finally:
        finetune.release_output_dir()
    # Released, not removed: a run that opened the file just before cannot end up locking a file nobody else sees.
    assert (out / finetune.OUTPUT_LOCK).read_text() == ""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune"):
        finetune.claim_output_dir(str(out), tiny_qwen2)
    finetune.release_output_dir()
    assert "taking over" not in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Which checkpoint a run resumes from: verified on content, the newest good one, one that fits
# ---------------------------------------------------------------------------------------------------------

def test_resume_true_takes_the_newest_checkpoint(tmp_path):
    args = training_args(tmp_path, resume_from_checkpoint="true")
    with pytest.raises(finetune.UserError, match="no complete checkpoint-\\* folder"):
        finetune.resolve_resume_checkpoint(args)
    for step in (5, 10):
        fake_checkpoint(tmp_path / "out" / f"checkpoint-{step}", step)
    assert finetune.resolve_resume_checkpoint(args) == (str(tmp_path / "out" / "checkpoint-10"), None)
    assert finetune.resolve_resume_checkpoint(training_args(tmp_path, resume_from_checkpoint="false")) == (None, None)


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


@pytest.mark.parametrize("damage, problem", [
    ("truncated adapter", "adapter_model.safetensors is truncated"),
    ("deleted adapter", "it holds no model or adapter weights"),
    ("truncated optimizer", "optimizer.pt is truncated or corrupt"),
    ("deleted optimizer", "it holds no optimizer state"),
    ("truncated rng state", "rng_state.pth is truncated or corrupt"),
])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_older_one(tmp_path, caplog, damage, problem):
    out = tmp_path / "out"
    fake_checkpoint(out / "checkpoint-2", 2)
    newest = fake_checkpoint(out / "checkpoint-4", 4)
    torch.save({"python": 1}, os.path.join(newest, "rng_state.pth"))
    target = os.path.join(newest, {"truncated adapter": "adapter_model.safetensors",
                                   "deleted adapter": "adapter_model.safetensors",
                                   "truncated rng state": "rng_state.pth"}.get(damage, "optimizer.pt"))
    if damage.startswith("truncated"):
        os.truncate(target, os.path.getsize(target) - 10)
    else:
        os.remove(target)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        assert finetune.newest_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert f"skipping {newest}: {problem}" in caplog.text
    with pytest.raises(finetune.UserError, match=f"--resume_from_checkpoint {newest}: cannot resume from it"):
        finetune.resolve_resume_checkpoint(training_args(tmp_path, resume_from_checkpoint=newest))


def test_a_checkpoint_that_cannot_fit_the_flags_names_the_flag(tmp_path, tiny_qwen2):
    checkpoint = fake_checkpoint(tmp_path / "out" / "checkpoint-2", 2)
    with open(os.path.join(checkpoint, "adapter_config.json"), "w") as f:
        json.dump({"r": 4, "lora_alpha": 8, "base_model_name_or_path": tiny_qwen2}, f)
    model = finetune.ModelArguments(model_name_or_path=tiny_qwen2)
    finetune.check_checkpoint_fits(checkpoint, model, lora_args())  # the same flags: fine
    with pytest.raises(finetune.UserError, match="was trained with --lora_r 4, this run asks for --lora_r 16"):
        finetune.check_checkpoint_fits(checkpoint, model, finetune.LoraArguments(use_lora=True, lora_r=16,
                                                                                 lora_alpha=8))
    with pytest.raises(finetune.UserError, match="holds a LoRA adapter, but this run fine-tunes every weight"):
        finetune.check_checkpoint_fits(checkpoint, model, finetune.LoraArguments())
    with pytest.raises(finetune.UserError, match=f"adapts {tiny_qwen2}, but this run's --model_name_or_path is "):
        finetune.check_checkpoint_fits(checkpoint, finetune.ModelArguments(model_name_or_path=str(tmp_path)),
                                       lora_args())


def test_the_data_fingerprint_follows_content_and_order_not_names(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"messages": [{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "yes"}]}])
    renamed = shutil.copy(a, tmp_path / "renamed.jsonl")
    one_byte = tmp_path / "one_byte.jsonl"
    one_byte.write_bytes(open(a, "rb").read().replace(b'"yes"', b'"yet"'))
    fingerprint = finetune.data_fingerprint([a])
    assert finetune.data_fingerprint([renamed]) == fingerprint
    assert finetune.data_fingerprint([str(one_byte)]) != fingerprint
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD])
    assert finetune.data_fingerprint([a, b]) != finetune.data_fingerprint([b, a])


def test_resuming_on_other_data_is_refused_unless_asked_for(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "out" / "checkpoint-3", 3, state={
        "global_step": 3, "stateful_callbacks": {"RecordTrainingData": {"args": {"fingerprint": "a" * 64}}}})
    args = training_args(tmp_path)
    assert finetune.resolve_resume_checkpoint(args, fingerprint="a" * 64) == (checkpoint, None)
    with pytest.raises(finetune.UserError, match="checkpoint-3 was trained on other data than --data_path now holds, "
                                                 r"or with other .*\(content hash aaaaaaaaaaaa then, bbbbbbbbbbbb "
                                                 r"now\); start afresh with --overwrite_output_dir true, or continue "
                                                 "from its weights on the new data with --resume_on_new_data true"):
        finetune.resolve_resume_checkpoint(args, fingerprint="b" * 64)
    # Continuing on purpose: the old data's checkpoints move aside, so that rotation and later resumes see only
    # the new run's; the weights come from where the checkpoint went.
    aside = str(tmp_path / "out" / "previous-data-aaaaaaaaaaaa" / "checkpoint-3")
    assert finetune.resolve_resume_checkpoint(training_args(tmp_path, resume_on_new_data=True),
                                              fingerprint="b" * 64) == (None, aside)
    assert not os.path.exists(checkpoint) and finetune.checkpoint_problem(aside, 3) is None
    assert finetune.resolve_resume_checkpoint(args, fingerprint="b" * 64) == (None, None)  # nothing left to resume


# ---------------------------------------------------------------------------------------------------------
# Resumed runs end where an uninterrupted run ends; reruns on changed data or flags
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_lora_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(tiny_qwen2, tmp_path):
    def run(out, *extra):
        return run_in_process(["--model_name_or_path", tiny_qwen2, "--data_path", DATA, "--output_dir", out,
                               "--use_lora", "true", "--max_steps", "6", "--save_steps", "3", "--learning_rate", "1e-2",
                               *LORA, *SHORT_RUN, *extra])

    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    assert_success(run(whole))
    shutil.copytree(os.path.join(whole, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    result = run(resumed, "--resume_from_checkpoint", "true")
    assert_success(result)
    assert "resuming from" in result.stderr and "checkpoint-3" in result.stderr
    # The resumed run carries the checkpoint's history (steps 1-3) and logs the same losses for steps 4-6.
    assert len(train_losses(resumed)) == 6
    assert_resumed_run_matches(resumed, whole, 3, "adapter_model.safetensors")
    got = load_file(os.path.join(resumed, "adapter_model.safetensors"))
    assert any("lora_B" in key and got[key].abs().sum() > 0 for key in got)  # the adapter did train


def wait_for(predicate, process, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.e2e
def test_a_killed_run_repeated_ends_with_the_weights_of_an_uninterrupted_run(tiny_qwen2, tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    assert_success(run_in_process(lora_command(tiny_qwen2, whole, "--max_steps", "10")[2:]))

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

    result = run_in_process(lora_command(tiny_qwen2, killed, "--max_steps", "10")[2:])  # the same command again
    assert_success(result)
    assert f"skipping {damaged}: optimizer.pt is truncated or corrupt" in result.stderr
    resumed_from = [line for line in result.stderr.splitlines() if "resuming from" in line]
    assert resumed_from and not any(f"checkpoint-{n}" in resumed_from[0] for n in (8, 9))
    assert_resumed_run_matches(killed, whole, 6, "adapter_model.safetensors")  # steps 5-10 again, from step 4


@pytest.mark.e2e
def test_reruns_on_changed_data_or_flags_stop_in_one_line_or_continue_on_purpose(tiny_qwen2, tmp_path):
    out, data = str(tmp_path / "out"), str(tmp_path / "data.jsonl")
    shutil.copy(DATA, data)

    def run(*extra):
        return run_in_process(["--model_name_or_path", tiny_qwen2, "--data_path", data, "--output_dir", out,
                               "--use_lora", "true", "--lora_r", "8", "--max_steps", "2", "--save_steps", "2",
                               "--per_device_train_batch_size", "2", "--logging_steps", "1", *extra])

    assert_success(run())
    with open(data, "a") as f:  # one more sample: the checkpoint was trained on other data
        f.write(GOOD_LINE + "\n")
    for extra, expected in ((["--lora_r", "16"], "was trained with --lora_r 8, this run asks for --lora_r 16"),
                            ([], "was trained on other data than --data_path now holds")):
        result = run(*extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0]
    result = run("--resume_on_new_data", "true", "--save_steps", "1")
    assert_success(result)
    assert "starting from its weights on the new data (--resume_on_new_data)" in result.stderr
    assert len(train_losses(out)) == 2  # a fresh epoch count and schedule
    # The old data's checkpoint went aside: rotation and the next resume see only the new run's.
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    [aside] = [n for n in os.listdir(out) if n.startswith("previous-data-")]
    assert os.listdir(os.path.join(out, aside)) == ["checkpoint-2"]

    # A checkpoint of an older release records no data: it resumes (with a word), and its saves work.
    state_file = os.path.join(out, "checkpoint-2", "trainer_state.json")
    state = json.load(open(state_file))
    del state["stateful_callbacks"]["RecordTrainingData"]
    json.dump(state, open(state_file, "w"))
    result = run("--max_steps", "3", "--save_steps", "3")
    assert_success(result)
    assert "does not record what data it was trained on" in result.stderr
    assert finetune.recorded_fingerprint(os.path.join(out, "checkpoint-3")) is not None


# ---------------------------------------------------------------------------------------------------------
# On another number of processes: the same global batch, the same samples in each step
# ---------------------------------------------------------------------------------------------------------

# 8 samples, 1 per device: on 2 processes with 2 accumulation steps a global batch of 4, 2 steps an epoch. The
# checkpoint at step 3 is in the middle of the second epoch; steps 4 and 5 cross into the third.
RUN = ["--per_device_train_batch_size", "1", "--logging_steps", "1", "--seed", "0", "--max_steps", "5",
       "--save_steps", "3", "--lora_dropout", "0"]
RESUME_LORA = ["--use_lora", "true", "--lora_r", "8", "--lora_alpha", "16"]


def launch(processes, model, out, *extra):
    from finetune import free_port

    launcher = (["torchrun", "--nproc_per_node", str(processes), "--master_port", str(free_port())] if processes > 1
                else [sys.executable])
    return run_cli([*launcher, os.path.join(ROOT, "finetune.py"), "--model_name_or_path", model, "--data_path", DATA,
                    "--output_dir", out, *RUN, *extra])


def losses_by_step(out):
    return {e["step"]: e["loss"] for e in log_history(out) if "loss" in e}


def assert_resume_matches(whole, resumed, weights_file):
    expected, got = losses_by_step(whole), losses_by_step(resumed)
    tokens = max(e["num_input_tokens_seen"] for e in log_history(whole) if "loss" in e)
    assert sorted(got) == [1, 2, 3, 4, 5]  # the checkpoint's history, then steps 4 and 5
    # Each step's loss is a sum over its tokens, summed in another order on other processes.
    assert_fp32_close([got[4], got[5]], [expected[4], expected[5]], tokens, "losses after the resume")
    expected, got = load_file(os.path.join(whole, weights_file)), load_file(os.path.join(resumed, weights_file))
    assert expected.keys() == got.keys()
    for key in expected:  # two steps of gradients, each summed over a step's tokens in another order
        assert_fp32_close(got[key], expected[key], 2 * backward_depth(tokens), key)


# DDP with length grouping and packing too: the order of samples is kept by global batch whatever the processes.
ENGINES = {"ddp": (["--group_by_length", "true", "--packing", "true"], RESUME_LORA),
           "zero2": (["--deepspeed", os.path.join(ROOT, "ds_config_zero2.json")], RESUME_LORA),
           "zero3": (["--deepspeed", "ZERO3"], [])}


@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ENGINES)
def test_a_two_process_checkpoint_resumes_on_one_and_on_four_as_if_never_interrupted(engine, tiny_qwen2, tiny_qwen3,
                                                                                      tmp_path):
    deepspeed, mode = ENGINES[engine]
    deepspeed = [zero3_config(tmp_path) if arg == "ZERO3" else arg for arg in deepspeed]
    model = tiny_qwen2 if mode else tiny_qwen3  # LoRA of a Qwen2; ZeRO-3 every weight of a Qwen3
    flags = [*deepspeed, *mode, "--learning_rate", "1e-2" if mode else "1e-3"]
    weights = "adapter_model.safetensors" if mode else "model.safetensors"
    whole = str(tmp_path / "whole")
    assert_success(launch(2, model, whole, "--gradient_accumulation_steps", "2", *flags))
    for processes in (1, 4):
        resumed = str(tmp_path / f"on_{processes}")
        shutil.copytree(os.path.join(whole, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
        result = launch(processes, model, resumed, "--gradient_accumulation_steps", "2", *flags)  # the same command
        assert_success(result)
        accumulation = 4 // processes
        assert (f"on {processes} processes, 1 per device: gradient accumulation {accumulation} keeps its global "
                "batch of 4") in result.stderr
        assert_resume_matches(whole, resumed, weights)


@pytest.mark.e2e
@pytest.mark.distributed
def test_a_one_process_checkpoint_resumes_on_two(tiny_qwen2, tmp_path):
    whole = str(tmp_path / "whole")
    assert_success(launch(1, tiny_qwen2, whole, "--gradient_accumulation_steps", "4", *RESUME_LORA,
                          "--learning_rate", "1e-2"))
    resumed = str(tmp_path / "on_2")
    shutil.copytree(os.path.join(whole, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    result = launch(2, tiny_qwen2, resumed, "--gradient_accumulation_steps", "4", *RESUME_LORA,
                    "--learning_rate", "1e-2")
    assert_success(result)
    assert "gradient accumulation 2 keeps its global batch of 4" in result.stderr
    assert_resume_matches(whole, resumed, "adapter_model.safetensors")


@pytest.mark.e2e
@pytest.mark.distributed
def test_a_deepspeed_checkpoint_of_an_optimizer_without_adam_state_is_refused_on_another_number_of_processes(
        tiny_qwen2, tmp_path):
    flags = ["--deepspeed", os.path.join(ROOT, "ds_config_zero2.json"), *RESUME_LORA, "--optim", "sgd",
             "--learning_rate", "1e-2", "--max_steps", "3", "--gradient_accumulation_steps", "2"]
    out = str(tmp_path / "sgd")
    assert_success(launch(2, tiny_qwen2, out, *flags))
    result = launch(1, tiny_qwen2, out, *flags)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: {out}/checkpoint-3 was written by DeepSpeed on 2 processes with the optimizer sgd, "
                      "whose state DeepSpeed cannot convert for 1 (its universal checkpoints hold Adam's only: --optim "
                      "adamw_torch or adamw_torch_fused); resume it on 2 processes, or start afresh with "
                      "--overwrite_output_dir true"]
    assert "Traceback" not in result.stderr and not os.path.exists(os.path.join(out, "checkpoint-3", "latest_universal"))


@pytest.mark.parametrize("optimizer, refused", [("sgd", True), ("adafactor", True), ("deepspeed:Lamb", True),
                                                ("adamw_torch", False), ("deepspeed:AdamW", False), (None, False)])
def test_only_optimizers_with_adam_state_resume_deepspeed_checkpoints_on_another_number_of_processes(
        tmp_path, monkeypatch, optimizer, refused):
    checkpoint = shaped_checkpoint(tmp_path / "checkpoint-3", zero_stage=3, optimizer=optimizer)
    monkeypatch.setattr(finetune.TrainingArguments, "world_size", property(lambda self: 1))
    monkeypatch.setattr(finetune, "deepspeed_zero_stage", lambda args: 3)
    converted = []
    monkeypatch.setattr(finetune, "make_universal_checkpoint", converted.append)
    args = finetune.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                                      per_device_train_batch_size=1, gradient_accumulation_steps=2)
    if refused:
        with pytest.raises(finetune.UserError, match=f"with the optimizer {optimizer.removeprefix('deepspeed:')}, "
                                                     "whose state DeepSpeed cannot convert for 1"):
            finetune.fit_run_to_checkpoint(args, checkpoint)
        assert not converted  # refused before the (slow) conversion
    else:  # None: a checkpoint of an older release, judged by this run's --optim (adamw_torch)
        assert finetune.fit_run_to_checkpoint(args, checkpoint).gradient_accumulation_steps == 4
        assert converted == [checkpoint]


def shaped_checkpoint(folder, **shape):
    recorded = {"processes": 2, "data_parallel": 2, "per_device": 1, "accumulation": 2, "global_batch": 4,
                "zero_stage": None, **shape}
    return fake_checkpoint(folder, 3, state={"global_step": 3, "stateful_callbacks": {
        "RecordTrainingData": {"args": {"fingerprint": None, "shape": recorded}}}})


@pytest.mark.parametrize("processes, per_device, accumulation", [(1, 1, 4), (4, 1, 1), (2, 2, 1), (1, 2, 2)])
def test_the_global_batch_is_kept_by_the_accumulation(tmp_path, monkeypatch, processes, per_device, accumulation):
    checkpoint = shaped_checkpoint(tmp_path / "checkpoint-3")
    monkeypatch.setattr(finetune.TrainingArguments, "world_size", property(lambda self: processes))
    args = finetune.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                                      per_device_train_batch_size=per_device, gradient_accumulation_steps=2)
    fitted = finetune.fit_run_to_checkpoint(args, checkpoint)
    assert fitted.gradient_accumulation_steps == accumulation and args.gradient_accumulation_steps == 2
    assert finetune.run_shape(fitted)["global_batch"] == 4


def test_a_global_batch_no_accumulation_can_keep_is_one_line_naming_what_would(tmp_path, monkeypatch):
    checkpoint = shaped_checkpoint(tmp_path / "checkpoint-3")
    monkeypatch.setattr(finetune.TrainingArguments, "world_size", property(lambda self: 3))
    args = finetune.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                                      per_device_train_batch_size=1, gradient_accumulation_steps=2)
    with pytest.raises(finetune.UserError) as error:
        finetune.fit_run_to_checkpoint(args, checkpoint)
    # No per-device batch makes 4 on 3 processes: the numbers of processes that would, never a "?".
    assert str(error.value) == (
        f"{checkpoint} was trained with a global batch of 4 samples a step (1 per device x 2 accumulation x 2 "
        "data-parallel processes); 1 per device on 3 cannot make 4 with any accumulation, nor can any other "
        "per-device batch size: use 1 or 2 or 4 processes with --per_device_train_batch_size 1")
    monkeypatch.setattr(finetune.TrainingArguments, "world_size", property(lambda self: 1))
    args = finetune.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                                      per_device_train_batch_size=3, gradient_accumulation_steps=2)
    with pytest.raises(finetune.UserError) as error:
        finetune.fit_run_to_checkpoint(args, checkpoint)
    assert str(error.value).endswith("3 per device on 1 cannot make 4 with any accumulation: use "
                                     "--per_device_train_batch_size 1 or 2 or 4 here")
    assert "?" not in str(error.value)


def test_resuming_on_new_data_starts_from_copies_and_leaves_the_parsed_flags_as_given():
    model_args, lora_args = finetune.ModelArguments(model_name_or_path="base"), finetune.LoraArguments(use_lora=True)
    adapted_model_args, adapted_lora_args = finetune.start_from_weights_of("old/checkpoint-4", model_args, lora_args)
    assert adapted_lora_args.lora_weight_path == "old/checkpoint-4" and adapted_model_args is model_args
    assert lora_args.lora_weight_path is None
    full = finetune.LoraArguments()
    adapted_model_args, adapted_lora_args = finetune.start_from_weights_of("old/checkpoint-4", model_args, full)
    assert adapted_model_args.model_name_or_path == "old/checkpoint-4" and adapted_lora_args is full
    assert model_args.model_name_or_path == "base"
