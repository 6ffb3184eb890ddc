"""When a run goes wrong or is stopped: steps whose loss or gradient norm is not finite (divergence), and signals
(a scheduler's SIGTERM before it preempts a job, Ctrl-C): what is saved, what is said, and the exit status.

The decisions are checked in-process on the callbacks. Runs are marked e2e: a diverged run calls finetune.main() in
this process; the runs whose point is the real process (a signal sent to it, a launcher) are subprocesses.
"""
import logging
import os
import signal
import subprocess
import time

import pytest
import torch
from helpers import CHILD_ENV, DATA, ROOT, complete, lora_command, run_in_process, training_args, write_jsonl

import finetune


# ---------------------------------------------------------------------------------------------------------
# Divergence: non-finite steps skipped, enough in a row stop the run, no result saved
# ---------------------------------------------------------------------------------------------------------

def test_non_finite_steps_are_skipped_and_enough_in_a_row_stop_training():
    guard = finetune.StopOnDivergence(limit=2)
    control = finetune.transformers.TrainerControl()
    state = finetune.transformers.TrainerState()
    model = torch.nn.Linear(2, 2)

    class Args:
        device = torch.device("cpu")

    def step(loss, grad_norm=1.0):
        model.weight.grad = torch.ones_like(model.weight)
        guard.note_loss(torch.tensor(loss))
        guard.grad_norm = grad_norm
        guard.on_pre_optimizer_step(Args, state, control, model=model)
        skipped = model.weight.grad is None
        state.global_step += 1
        control.should_save = True
        guard.on_step_end(Args, state, control)
        return skipped

    assert not step(2.0) and control.should_save
    assert step(float("nan")) and not control.should_save and not control.should_training_stop
    assert not step(2.0)  # a good step resets the count
    assert step(1.0, grad_norm=float("inf")) and not control.should_training_stop
    assert step(float("inf")) and control.should_training_stop and guard.stopped
    assert guard.first_bad_step == 4


def test_fp16_loss_scaling_overflows_are_not_divergence_but_a_non_finite_loss_is():
    guard = finetune.StopOnDivergence(limit=1, loss_scaling=True)
    control, state = finetune.transformers.TrainerControl(), finetune.transformers.TrainerState()

    class Args:
        device = torch.device("cpu")

    guard.note_loss(torch.tensor(2.0))
    guard.grad_norm = float("inf")  # the scaler skips this step and lowers its scale
    guard.on_pre_optimizer_step(Args, state, control)
    guard.on_step_end(Args, state, control)
    assert not control.should_training_stop and guard.in_a_row == 0
    guard.note_loss(torch.tensor(float("nan")))
    guard.on_pre_optimizer_step(Args, state, control)
    guard.on_step_end(Args, state, control)
    assert control.should_training_stop


@pytest.mark.e2e
def test_a_diverged_run_stops_in_one_line_logs_nan_and_saves_no_result(tiny_qwen3, tmp_path):
    out = str(tmp_path / "diverged")
    result = run_in_process(["--model_name_or_path", tiny_qwen3, "--data_path", DATA, "--output_dir", out,
                             "--max_steps", "8", "--learning_rate", "1e38", "--per_device_train_batch_size", "2",
                             "--logging_steps", "1", "--save_steps", "1", "--max_nonfinite_steps", "2"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training diverged: the loss or gradient norm was not "
                                                     "finite in 2 steps in a row from step 2 on")
    assert f"newest good checkpoint: {os.path.join(out, 'checkpoint-1')}" in errors[0]
    assert "'loss': 'nan'" in result.stdout  # shown as nan, not hidden behind the average of earlier losses
    # No result, no checkpoint of a bad step (the lock file of the output folder stays, released).
    assert sorted(os.listdir(out)) == [finetune.OUTPUT_LOCK, "checkpoint-1"]
    weights = finetune.weights_file_problem(os.path.join(out, "checkpoint-1", "model.safetensors"))
    assert weights is None and finetune.checkpoint_problem(os.path.join(out, "checkpoint-1"), 1) is None


# ---------------------------------------------------------------------------------------------------------
# Signals: the last good step saved at once, named, and the exit status a scheduler expects
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def own_signal_handlers():
    """Tests that install finetune's handlers in this process give the old ones back (subprocesses inherit them)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signal_saves_only_a_step_that_is_new_and_went_right(own_signal_handlers):
    guard = finetune.StopOnDivergence(limit=3)
    stop = finetune.StopOnRequest(guard)
    state = finetune.transformers.TrainerState()
    state.global_step = 4
    stop.on_train_begin(None, state, None)  # resumed from checkpoint-4
    assert not stop._should_save(state)  # it is on disk already: never rewrite it inside a grace period
    state.global_step = 5
    assert stop._should_save(state)
    guard.in_a_row = 1
    assert not stop._should_save(state)  # step 5 went wrong


def test_a_sigterm_with_save_only_model_does_not_promise_a_resume(tmp_path, caplog, own_signal_handlers):
    stop = finetune.StopOnRequest()
    stop.stop_reason, stop.stopped_at_step = "SIGTERM", 5
    with caplog.at_level(logging.WARNING, logger="finetune"), pytest.raises(SystemExit) as exit_status:
        finetune.report_stop(stop, training_args(tmp_path, save_only_model=True))
    assert exit_status.value.code == 143
    assert "checkpoint-5 holds the weights only (--save_only_model), so a rerun starts afresh" in caplog.text
    assert "resume" not in caplog.text.split("afresh")[1]


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


@pytest.mark.e2e
@pytest.mark.distributed
def test_sigterm_to_the_launcher_under_torchrun_saves_the_last_step_at_once_and_exits_143(tiny_qwen2, tmp_path):
    """Steps longer than torchrun's 30 s grace period: the checkpoint must not wait for the step to end."""
    data = write_jsonl(tmp_path / "long.jsonl", [{"messages": [
        {"role": "user", "content": f"Question {i}: " + "tell me about the sea " * 20},
        {"role": "assistant", "content": "The sea is wide and deep. " * 30}]} for i in range(400)])
    out = str(tmp_path / "out")
    command = ["bash", "finetune_lora.sh", "-m", tiny_qwen2, "-d", data, "-o", out, "--max_steps", "3",
               "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "160", "--logging_steps", "1",
               "--save_steps", "100", "--lora_r", "8", "--activation_checkpointing", "false"]
    env = {**CHILD_ENV, "NPROC_PER_NODE": "2", "MASTER_PORT": str(finetune.free_port())}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, started = [], None
    for line in process.stdout:
        output.append(line)
        if "trainable parameters" in line:
            started = time.time()
        if "'loss'" in line:  # step 1 is done; step 2 has begun
            break
    step_seconds = time.time() - started
    process.send_signal(signal.SIGTERM)  # to the launcher only, as a container runtime sends it
    signalled = time.time()
    output += process.communicate(timeout=300)[0]
    stop_seconds, output = time.time() - signalled, "".join(output)
    assert step_seconds > 30, f"a step took {step_seconds:.0f} s: too short to test the grace period"
    assert process.returncode == 143, output[-3000:]
    assert stop_seconds < 30, f"{stop_seconds:.0f} s from SIGTERM to exit"
    assert output.count(f"stopped by SIGTERM at step 1; the checkpoint is {os.path.join(out, 'checkpoint-1')}") == 1
    assert "Traceback" not in output and "ChildFailedError" not in output
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == ["checkpoint-1"]
    assert finetune.checkpoint_problem(os.path.join(out, "checkpoint-1"), 1) is None


@pytest.mark.parametrize("error, code", [(finetune.UserError("--flag: bad"), 2), (finetune.RunFailed("diverged"), 1)])
def test_every_error_is_one_line_from_rank_0_and_each_other_nodes_first_process(monkeypatch, capsys, error, code):
    import signal

    def fail(argv):
        raise error

    monkeypatch.setattr(finetune, "train", fail)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    printed = {}
    try:
        for rank, local_rank in (("0", "0"), ("1", "1"), ("2", "0")):  # two nodes of two processes
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("LOCAL_RANK", local_rank)
            with pytest.raises(SystemExit) as exit:
                finetune.main([])
            assert exit.value.code == code
            printed[rank] = capsys.readouterr().err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert printed == {"0": f"error: {error}\n", "1": "", "2": f"error (rank 2): {error}\n"}
