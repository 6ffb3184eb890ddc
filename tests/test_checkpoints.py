"""Resuming on another number of processes: the same global batch, the same samples in each step, the losses and
weights of the run that was never interrupted (DDP, DeepSpeed ZeRO-2 and ZeRO-3 through its universal checkpoints).

Marked distributed and e2e: each case runs 2-process training, then resumes it on 1 and on 4 processes."""
import os
import shutil
import sys

import pytest
from fp32 import assert_fp32_close, backward_depth
from helpers import DATA, ROOT, assert_success, fake_checkpoint, log_history, run_cli, zero3_config
from safetensors.torch import load_file

import finetune

# 8 samples, 1 per device: on 2 processes with 2 accumulation steps a global batch of 4, 2 steps an epoch. The
# checkpoint at step 3 is in the middle of the second epoch; steps 4 and 5 cross into the third.
RUN = ["--per_device_train_batch_size", "1", "--logging_steps", "1", "--seed", "0", "--max_steps", "5",
       "--save_steps", "3", "--lora_dropout", "0"]
LORA = ["--use_lora", "true", "--lora_r", "8", "--lora_alpha", "16"]


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
ENGINES = {"ddp": (["--group_by_length", "true", "--packing", "true"], LORA),
           "zero2": (["--deepspeed", os.path.join(ROOT, "ds_config_zero2.json")], LORA),
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
    assert_success(launch(1, tiny_qwen2, whole, "--gradient_accumulation_steps", "4", *LORA, "--learning_rate", "1e-2"))
    resumed = str(tmp_path / "on_2")
    shutil.copytree(os.path.join(whole, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    result = launch(2, tiny_qwen2, resumed, "--gradient_accumulation_steps", "4", *LORA, "--learning_rate", "1e-2")
    assert_success(result)
    assert "gradient accumulation 2 keeps its global batch of 4" in result.stderr
    assert_resume_matches(whole, resumed, "adapter_model.safetensors")


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
    assert str(error.value) == (
        f"{checkpoint} was trained with a global batch of 4 samples a step (1 per device x 2 accumulation x 2 "
        "data-parallel processes); 1 per device on 3 cannot make 4 with any accumulation: use "
        "--per_device_train_batch_size ? here, or 1 or 2 or 4 processes")
