"""What happens when things go wrong: bad text and numbers, bad flags and folders, broken model files and
checkpoints, changed data, a second run into the same folder, divergence and preemption.

Most checks run in-process on the functions main() calls; the runs whose point is the real command line (exit
status, one line, no traceback, launchers and signals) are subprocesses, marked e2e.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import warnings

import pytest
import torch
from helpers import (CHILD_ENV, DATA, GOOD, GOOD_LINE, ROOT, assert_success, fake_checkpoint, lora_args, make_encoder,
                     run_finetune, train_losses, training_args, write_jsonl)

import finetune


# ---------------------------------------------------------------------------------------------------------
# Text that cannot be tokenized as written: one line naming file and line, eager and lazy alike
# ---------------------------------------------------------------------------------------------------------

BAD_LINES = {
    "lone surrogate": ('{"messages": [{"role": "user", "content": "smile \\ud83d"}, '
                       '{"role": "assistant", "content": "ok"}]}',
                       "line 2: message 0 holds a lone surrogate '\\ud83d' at character 6"),
    "surrogate in reasoning": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                               '"content": "b", "weight": 1, "reasoning_content": "\\udc00"}]}',
                               "line 2: message 1: its 'reasoning_content' holds a lone surrogate"),
    "nested brackets": ("[" * 100_000 + "]" * 100_000, "line 2: not valid JSON (nested too deeply)"),
    "huge integer": ('{"n": ' + "9" * 5000 + "}", "line 2: not valid JSON (Exceeds the limit"),
    "Infinity literal": (GOOD_LINE[:-1] + ', "score": Infinity}', "line 2: not valid JSON (Infinity is not a JSON"),
    "weight on a user message": ('{"messages": [{"role": "user", "content": "a", "weight": 1}, '
                                 '{"role": "assistant", "content": "b"}]}',
                                 "line 2: message 0: 'weight' 1 on a user message: only what the assistant says"),
    "weight 2": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
                 '"weight": 2}]}', "'weight' must be 0 or 1"),
    "every weight 0": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
                       '"weight": 0}]}', "line 2: every assistant message has 'weight' 0"),
}


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_text_that_cannot_be_tokenized_is_refused_at_start_naming_the_line(tokenizer, tmp_path, case, lazy):
    line, problem = BAD_LINES[case]
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD_LINE + "\n" + line + "\n", encoding="utf-8")
    dataset_class = finetune.LazySupervisedDataset if lazy else finetune.SupervisedDataset
    with pytest.raises(finetune.DataError) as error:
        dataset_class(str(path), make_encoder(tokenizer))
    assert str(error.value).startswith(f"{path} line 2") and problem in str(error.value), str(error.value)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_latin1_byte_in_a_json_array_names_its_line(tokenizer, tmp_path, bom):
    path = tmp_path / "train.json"
    path.write_bytes(bom + b'[\n' + GOOD_LINE.encode() + b',\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n]')
    with pytest.raises(finetune.DataError, match=r"train.json line 3: not UTF-8 \(byte 0xe9\)"):
        finetune.SupervisedDataset(str(path), make_encoder(tokenizer))


def test_nan_in_tool_arguments_is_refused(tokenizer, tmp_path):
    call = {"type": "function", "function": {"name": "f", "arguments": '{"x": NaN}'}}
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "done"}]}])
    with pytest.raises(finetune.DataError, match="message 1 tool call 0 'arguments': not valid JSON "
                                                 r"\(NaN is not a JSON value\)"):
        finetune.SupervisedDataset(path, make_encoder(tokenizer, template="auto", system_message=None))


@pytest.mark.parametrize("template", ["chatml", "auto"])
def test_weight_0_keeps_an_assistant_message_out_of_training(tokenizer, tmp_path, template):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    weighted = [dict(m) for m in messages]
    weighted[1]["weight"], weighted[3]["weight"] = 0, 1
    path = write_jsonl(tmp_path / "w.jsonl", [{"messages": messages}, {"messages": weighted}])
    dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer, template=template, system_message=None))
    plain, with_weight = dataset[0], dataset[1]
    assert plain["input_ids"] == with_weight["input_ids"]

    def trained_text(example):
        return tokenizer.decode([t for t in example["labels"] if t != -100])

    assert trained_text(plain) == "Hello there.<|im_end|>Goodbye.<|im_end|>"
    assert trained_text(with_weight) == "Goodbye.<|im_end|>"


def test_empty_assistant_messages_are_counted_in_the_report(tokenizer, tmp_path, caplog):
    empty = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}
    path = write_jsonl(tmp_path / "e.jsonl", [GOOD, empty, empty])
    for lazy in (False, True):
        with caplog.at_level(logging.WARNING, logger="finetune"):
            dataset = finetune.make_dataset(path, make_encoder(tokenizer), finetune.DataArguments(
                data_path=path, lazy_preprocess=lazy, data_cache_dir=str(tmp_path / "cache")))
        assert dataset.empty_assistant == 2 and len(dataset) == 3
        assert f"{path}: 2 sample(s) with an empty assistant message" in caplog.text
    assert "notice: 2 sample(s) with an empty assistant message" in finetune.describe_dataset(
        finetune.SupervisedDataset(path, make_encoder(tokenizer)))


def test_a_huge_sample_is_cut_before_it_is_tokenized_whole(tokenizer, tmp_path, monkeypatch):
    huge = {"messages": [{"role": "user", "content": "Summarise:"},
                         {"role": "assistant", "content": "the sea is wide, " * 300_000}]}  # 5 MB of text
    path = write_jsonl(tmp_path / "huge.jsonl", [huge])
    encoder = make_encoder(tokenizer, model_max_length=256)
    longest = []
    real_tokenizer = encoder.tokenizer
    monkeypatch.setattr(encoder, "tokenizer", lambda texts, **kw: longest.append(max(map(len, texts))) or
                        real_tokenizer(texts, **kw))
    [example] = [finetune.SupervisedDataset(path, encoder)[0]]
    assert longest[0] <= encoder.max_chars < 100_000
    text, _ = encoder.render(encoder.parse(huge, "huge"))
    assert example["input_ids"] == real_tokenizer(text[:20_000], add_special_tokens=False)["input_ids"][:256]


# ---------------------------------------------------------------------------------------------------------
# Flags and folders that cannot work: one line before anything slow
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, problem", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be positive, got 0"),
    (["--learning_rate=-1e-4"], "--learning_rate must be zero or more, got -0.0001"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be positive"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1), got 1.5"),
    (["--max_steps", "0"], "--max_steps must be positive"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps must be positive"),
    (["--sequence_parallel_size", "0"], "--sequence_parallel_size must be positive"),
    (["--rope_scaling", "0.5"], "--rope_scaling is YaRN's factor: more than 1, at most 1024; got 0.5"),
    (["--rope_native_length", "4096"], "--rope_native_length is a positive number of tokens, for --rope_scaling"),
])
def test_impossible_numbers_are_refused(tmp_path, flags, problem):
    with pytest.raises(finetune.UserError, match=problem.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        finetune.parse_arguments(["--data_path", DATA, "--output_dir", str(tmp_path / "o"), "--use_cpu", "true",
                                  *flags])


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


@pytest.mark.parametrize("damage, problem", [
    ("no weights", "no model weights (*.safetensors) in that folder"),
    ("truncated weights", "model.safetensors is truncated"),
    ("no config", "cannot load its config"),
    ("unknown model type", "cannot load its config"),
])
def test_model_folders_that_cannot_load_are_one_line(tiny_qwen2, tmp_path, damage, problem):
    model = shutil.copytree(tiny_qwen2, tmp_path / "model")
    weights = model / "model.safetensors"
    if damage == "no weights":
        weights.unlink()
    elif damage == "truncated weights":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "no config":
        (model / "config.json").unlink()
    else:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "qwen99"}))
    with pytest.raises(finetune.UserError) as error:
        finetune.check_model_files(finetune.ModelArguments(model_name_or_path=str(model)))
    assert str(error.value).startswith(f"--model_name_or_path {model}: ") and problem in str(error.value)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: verified on content, the newest good one resumed, one that cannot fit the flags refused
# ---------------------------------------------------------------------------------------------------------

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
# Divergence, signals, curves
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


def test_an_unwritable_cache_folder_tokenizes_without_the_cache(tokenizer, tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    (tmp_path / "a_file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=str(tmp_path / "a_file" / "c"))
    assert len(dataset) == 1 and "--data_cache_dir" in caplog.text and "tokenizing without a cache" in caplog.text


def test_a_sigterm_with_save_only_model_does_not_promise_a_resume(tmp_path, caplog, own_signal_handlers):
    stop = finetune.StopOnRequest()
    stop.stop_reason, stop.stopped_at_step = "SIGTERM", 5
    with caplog.at_level(logging.WARNING, logger="finetune"), pytest.raises(SystemExit) as exit_status:
        finetune.report_stop(stop, training_args(tmp_path, save_only_model=True))
    assert exit_status.value.code == 143
    assert "checkpoint-5 holds the weights only (--save_only_model), so a rerun starts afresh" in caplog.text
    assert "resume" not in caplog.text.split("afresh")[1]


def test_a_run_too_short_to_log_a_loss_draws_its_curves_without_warnings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finetune.plot_training_curves([{"step": 1, "learning_rate": 1e-3}], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.e2e
def test_a_diverged_run_stops_in_one_line_logs_nan_and_saves_no_result(tiny_qwen3, tmp_path):
    out = str(tmp_path / "diverged")
    result = run_finetune(["--model_name_or_path", tiny_qwen3, "--data_path", DATA, "--output_dir", out,
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


@pytest.mark.e2e
def test_reruns_on_changed_data_or_flags_stop_in_one_line_or_continue_on_purpose(tiny_qwen2, tmp_path):
    out, data = str(tmp_path / "out"), str(tmp_path / "data.jsonl")
    shutil.copy(DATA, data)

    def run(*extra):
        return run_finetune(["--model_name_or_path", tiny_qwen2, "--data_path", data, "--output_dir", out,
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


def test_merge_adapter_says_what_is_wrong_in_one_line(tmp_path, tiny_qwen2, capsys):
    import merge_adapter

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "nowhere"}')
    cases = [(["--adapter", str(tmp_path / "missing")], f"{tmp_path / 'missing'}: no adapter_config.json"),
             (["--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "no_model")],
              f"base model {tmp_path / 'no_model'}: cannot load its config"),
             (["--adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "config_only")],
              f"base model {tmp_path / 'config_only'}: cannot load it (")]
    (tmp_path / "config_only").mkdir()
    shutil.copy(os.path.join(tiny_qwen2, "config.json"), tmp_path / "config_only")
    for flags, message in cases:
        assert merge_adapter.main([*flags, "--output", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: ") and message in error and error.count("\n") == 1, error


def test_lora_arguments_are_normalised_where_they_are_defined():
    args = finetune.LoraArguments(q_lora=True, lora_target_modules=["q_proj,k_proj", "v_proj"],
                                  lora_modules_to_save="embed_tokens lm_head")
    assert args.use_lora  # --q_lora implies it
    assert args.lora_target_modules == ["q_proj", "k_proj", "v_proj"]
    assert args.lora_modules_to_save == ["embed_tokens", "lm_head"]
    assert finetune.LoraArguments(lora_weight_path="adapter").use_lora
    assert not finetune.LoraArguments().use_lora and finetune.LoraArguments().lora_target_modules == ["all-linear"]
