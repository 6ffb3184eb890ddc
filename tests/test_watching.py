"""Watching a long run: progress of long waits, replies at each evaluation, early stopping with the best checkpoint
kept, loss and learning-rate curves, checkpoints on demand (SAVE_NOW, STOP_NOW), the model card, TensorBoard."""
import glob
import json
import logging
import math
import os
import types
import warnings

import pytest
import torch
import transformers
from helpers import (DATA, assert_success, log_history, make_encoder, run_cli, run_in_process, torchrun, write_jsonl,
                     zero3_config)
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import finetune


def long_samples(count, words=40):
    return [{"messages": [{"role": "user", "content": f"Question {i}: " + "why " * words},
                          {"role": "assistant", "content": f"Answer {i}: " + "because " * words}]}
            for i in range(count)]


def progress_lines(caplog, what):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(what)]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_cache_build_reports_its_progress_in_a_non_terminal_log(tokenizer, tmp_path, caplog, monkeypatch, workers):
    monkeypatch.setattr(finetune, "PROGRESS_LOG_SECONDS", 0)  # a line at every update, and a last one
    count = 300 if workers == 1 else 2500  # two workers only split a file of 1 MB or more
    path = write_jsonl(tmp_path / "d.jsonl", long_samples(count, words=40 if workers == 1 else 90))
    assert (os.path.getsize(path) >= 1 << 20) == (workers == 2)
    with caplog.at_level(logging.INFO, logger="finetune"):
        dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer), batch_size=100,
                                             cache_dir=str(tmp_path / "cache"), num_workers=workers)
    assert len(dataset) == count
    lines = progress_lines(caplog, f"tokenizing {path}: ")
    assert lines[-1].startswith(f"tokenizing {path}: done, {count:,} of {count:,} samples (")
    counts = [int(line.split(": ")[1].removeprefix("done, ").split(" of ")[0].replace(",", "")) for line in lines]
    assert counts == sorted(counts) and counts[-1] == count
    if workers == 1:  # told after every batch of 100: rate and time left on the way
        assert counts[:3] == [100, 200, 300]
        assert "/s, about " in lines[0] and lines[0].endswith(" s left)")


def test_hashing_a_large_source_and_checking_a_lazy_one_report_progress(tokenizer, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(finetune, "PROGRESS_LOG_SECONDS", 0)
    monkeypatch.setattr(finetune, "HASH_PROGRESS_BYTES", 0)  # every file counts as large
    path = write_jsonl(tmp_path / "d.jsonl", long_samples(2500, words=90))
    megabytes = math.ceil(os.path.getsize(path) / 2 ** 20)  # read a MB at a time
    assert megabytes >= 2
    finetune.file_digest.cache_clear()
    with caplog.at_level(logging.INFO, logger="finetune"):
        finetune.data_fingerprint([path])
        finetune.LazySupervisedDataset(path, make_encoder(tokenizer))
    reading = progress_lines(caplog, f"reading {path}: ")
    assert [line.split(": ")[1].split(" (")[0] for line in reading] == [
        *(f"{k} of {megabytes} MB" for k in range(1, megabytes + 1)), f"done, {megabytes} of {megabytes} MB"]
    checking = progress_lines(caplog, f"checking {path}: ")
    assert len(checking) == 2500 + 1 and checking[-1].startswith(f"checking {path}: done, 2,500 of 2,500 samples")


def test_progress_is_silent_where_it_is_not_shown_and_for_short_waits(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="finetune"):
        hidden = finetune.Progress("a rank's wait", total=10, show=False)
        monkeypatch.setattr(finetune, "PROGRESS_LOG_SECONDS", 0)
        hidden.update(5)
        hidden.close()
        monkeypatch.setattr(finetune, "PROGRESS_LOG_SECONDS", 3600)
        short = finetune.Progress("a short wait", total=10)
        short.update(10)
        short.close()
    assert caplog.text == ""


def test_a_waiting_rank_names_the_process_that_holds_the_lock(tmp_path):
    path = str(tmp_path / "entry.lock")
    assert finetune.lock_holder(path) is None
    with finetune.locked_file(path, waiting="building"):
        assert finetune.lock_holder(path).startswith(f"pid {os.getpid()} on ")


def yes_no_data(tmp_path):
    """Training data that answers 'yes' and evaluation data that answers 'no' to the same questions: the eval loss
    must eventually rise as the model learns to say yes."""
    questions = ["Pick a word.", "Say something.", "Your answer?", "Go on."]

    def conversations(answer):
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
                for q in questions]
    return (write_jsonl(tmp_path / "yes.jsonl", conversations("yes yes yes yes yes yes")),
            write_jsonl(tmp_path / "no.jsonl", conversations("no no no no no no")))


def assert_greedy_reply(model, tokenizer, row, max_new_tokens):
    """The reply written in `row` is the greedy reply of `model` to its prompt, recomputed here token by token as
    far as each token's choice is clear: past a step whose two best logits are within what fp32 rounding in another
    process could swap (a margin of 1e-3 on logits of order 10, far above fp32's relative 1.2e-7), only the part
    before it must match."""
    stop = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} | {tokenizer.eos_token_id}
    ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    reply, clear = [], True
    with torch.no_grad():
        for _ in range(max_new_tokens):
            top = torch.topk(model(input_ids=torch.tensor([ids])).logits[0, -1], 2)
            if float(top.values[0] - top.values[1]) < 1e-3:
                clear = False
                break
            token = int(top.indices[0])
            if token in stop:
                break
            ids.append(token)
            reply.append(token)
    expected = tokenizer.decode(reply, skip_special_tokens=True)
    if clear:
        assert row["reply"] == expected
    else:  # a prefix; its last character may be cut inside a multi-byte token
        assert row["reply"].startswith(expected.rstrip("\ufffd"))


@pytest.mark.e2e
def test_early_stopping_keeps_the_best_checkpoint_past_the_save_limit_and_makes_it_the_result(tiny_qwen3, tmp_path):
    """One run watched every way a user would: early stopping on a rising eval loss, the replies at each
    evaluation, TensorBoard, the model card."""
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed (pip install tensorboard): this run "
                        "reports to it")
    train, evaluation = yes_no_data(tmp_path)
    out = str(tmp_path / "out")
    result = run_in_process(["--model_name_or_path", tiny_qwen3, "--data_path", train, "--eval_data_path", evaluation,
                             "--output_dir", out, "--max_steps", "30", "--learning_rate", "3e-2",
                             "--per_device_train_batch_size", "4", "--logging_steps", "1", "--seed", "0",
                             "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1",
                             "--save_total_limit", "2", "--early_stopping_patience", "2",
                             "--eval_generations", "2", "--eval_max_new_tokens", "6", "--report_to", "tensorboard"])
    assert_success(result)
    evals = [(e["step"], e["eval_loss"]) for e in log_history(out) if "eval_loss" in e]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    # It stopped as soon as 2 evaluations in a row failed to beat the best, well before step 30.
    assert evals[-1][0] == best_step + 2 < 30 and all(loss >= best_loss for _, loss in evals[-2:])
    with open(os.path.join(out, "trainer_state.json")) as f:
        state = json.load(f)
    best = os.path.join(out, f"checkpoint-{best_step}")
    assert state["best_model_checkpoint"] == best and state["global_step"] == best_step + 2
    assert f"early stopping at step {best_step + 2}: eval_loss did not improve" in result.stderr
    assert f"best checkpoint: {best}, eval_loss {best_loss:.4f} at step {best_step}" in result.stderr
    # --save_total_limit 2: the newest and the best, which is older than the two newest.
    assert sorted(glob.glob(os.path.join(out, "checkpoint-*"))) == [best, os.path.join(out, f"checkpoint-{best_step + 2}")]
    # The result is the best checkpoint's weights (load_best_model_at_end, set by early stopping).
    result_weights, best_weights = load_file(os.path.join(out, "model.safetensors")), load_file(
        os.path.join(best, "model.safetensors"))
    assert all(torch.equal(result_weights[k], best_weights[k]) for k in best_weights)

    # Replies: 2 per evaluation, with the step; the prompt ends where the assistant's turn starts, as the model's
    # own template renders the question for generation; the reference is the evaluation answer.
    with open(os.path.join(out, finetune.EVAL_GENERATIONS)) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["sample"]) for r in rows] == [(step, i) for step, _ in evals for i in (0, 1)]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen3)
    with open(evaluation) as f:
        samples = [json.loads(line) for line in f]
    for row in rows:
        messages = samples[row["sample"]]["messages"]
        assert row["prompt"] == tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True,
                                                              enable_thinking=False, tokenize=False)
        assert row["reference"] == messages[1]["content"]
    # Greedy: the best step's replies are what its weights (the result) reply, token for token.
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for row in (r for r in rows if r["step"] == best_step):
        assert_greedy_reply(model, tokenizer, row, 6)

    # TensorBoard: the Trainer's scalars, our tokens/s, and the replies as text at each evaluation's step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(glob.glob(os.path.join(out, "runs", "*"))[0], size_guidance={"tensors": 0}).Reload()
    assert {"train/loss", "eval/loss", "train/tokens_per_second_per_device"} <= set(events.Tags()["scalars"])
    texts = events.Tensors("eval/generations/text_summary")
    assert [t.step for t in texts] == [step for step, _ in evals]
    assert f"**reply**\n\n    {rows[-1]['reply'].splitlines()[0] if rows[-1]['reply'].strip() else ''}" \
        in texts[-1].tensor_proto.string_val[0].decode()

    # The card: metadata the hub reads, and what the model is made of.
    card = ModelCard.load(os.path.join(out, "README.md"))
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert set(card.data.tags) == {"qwen-finetune", "sft", "full", "qwen3"}
    assert card.data.base_model is None  # a local folder is not a hub id the hub could link
    assert f"`{train}`: sha256 `{finetune.data_fingerprint([train])}`" in card.text
    assert f"{train}: 4 read, 4 kept, 0 dropped, 4 taken" in card.text
    assert "4 training samples; 4 for evaluation" in card.text and "- global_batch: 4" in card.text
    assert f"- steps: {best_step + 2}" in card.text
    assert f"- final eval loss: {evals[-1][1]:.4f} (step {evals[-1][0]})" in card.text
    assert f"- best checkpoint: `checkpoint-{best_step}` (eval loss {best_loss:.4f}); the weights here are its" \
        in card.text
    assert f"- tokens seen: {state['num_input_tokens_seen']:,}" in card.text
    assert f"transformers {transformers.__version__}" in card.text
    assert 'transformers.AutoModelForCausalLM.from_pretrained("THIS_FOLDER_OR_REPO")' in card.text
    checkpoint_card = ModelCard.load(os.path.join(best, "README.md"))
    assert f"- steps: {best_step}" in checkpoint_card.text and "the weights here are its" not in checkpoint_card.text


def test_the_model_card_names_a_hub_base_model_and_the_adapters_settings(tiny_qwen3_5, tokenizer, tmp_path):
    model = finetune.add_lora(finetune.model_class(transformers.AutoConfig.from_pretrained(tiny_qwen3_5))
                              .from_pretrained(tiny_qwen3_5),
                              finetune.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                              finetune.LoraArguments(use_lora=True, lora_r=4, lora_alpha=8))
    data_args = finetune.DataArguments(data_path=[DATA], chat_template_kwargs='{"preserve_thinking": true}')
    run = finetune.Run(finetune.ModelArguments(model_name_or_path="Qwen/Qwen3.6-27B"), data_args,
                       finetune.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                                  per_device_train_batch_size=2, gradient_accumulation_steps=8),
                       finetune.LoraArguments(use_lora=True, lora_r=4, lora_alpha=8),
                       finetune.resolve_sources(data_args.data_path))
    train_dataset = finetune.SupervisedDataset(DATA, make_encoder(tokenizer))
    facts = finetune.run_facts(run, model, make_encoder(tokenizer, template="auto"), train_dataset, None)
    state = transformers.TrainerState(global_step=3, epoch=1.5, log_history=[{"loss": 2.5, "step": 3}])
    path = str(tmp_path / "README.md")
    finetune.model_card(facts, state).save(path)
    card = ModelCard.load(path)
    assert card.data.base_model == "Qwen/Qwen3.6-27B" and card.data.library_name == "peft"
    assert card.data.pipeline_tag == "image-text-to-text" and "lora" in card.data.tags
    assert "Template: the model's own chat template with `{\"preserve_thinking\": true}`" in card.text
    assert "- global_batch: 16" in card.text and "- final train loss: 2.5000 (step 3)" in card.text
    assert '"r": 4, "alpha": 8' in card.text
    assert 'transformers.AutoModelForImageTextToText.from_pretrained("Qwen/Qwen3.6-27B")' in card.text
    assert "peft.PeftModel.from_pretrained(model, \"THIS_FOLDER_OR_REPO\")" in card.text


def test_training_curves_are_drawn(tmp_path):
    history = [{"step": s, "loss": 3.0 - s / 10, "learning_rate": 1e-3 * (1 - s / 10)} for s in range(1, 10)]
    history += [{"step": 5, "eval_loss": 2.8}, {"step": 9, "eval_loss": 2.3}]
    path = tmp_path / "curves.png"
    finetune.plot_training_curves(history, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_a_run_too_short_to_log_a_loss_draws_its_curves_without_warnings(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finetune.plot_training_curves([{"step": 1, "learning_rate": 1e-3}], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def lora_run(model, data, out, *extra):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", out, "--use_lora", "true",
            "--lora_r", "8", "--lora_alpha", "16", "--max_steps", "3", "--learning_rate", "1e-3",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--seed", "0", "--save_steps", "100", *extra]


@pytest.mark.e2e
def test_stop_now_saves_stops_with_exit_0_and_the_same_command_resumes(tiny_qwen3_5, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, finetune.STOP_NOW), "w").close()  # there before the first step: answered at step 1
    command = lora_run(tiny_qwen3_5, DATA, out, "--chat_template_kwargs", '{"enable_thinking": false}')
    stopped = run_in_process(command)
    assert_success(stopped)
    assert f"stopped by STOP_NOW at step 1; the checkpoint is {os.path.join(out, 'checkpoint-1')}" in stopped.stderr
    assert sorted(os.listdir(out)) == [finetune.OUTPUT_LOCK, "checkpoint-1"]  # no result, the file answered
    assert finetune.checkpoint_problem(os.path.join(out, "checkpoint-1"), 1) is None
    resumed = run_in_process(command)
    assert_success(resumed)
    assert "resuming from" in resumed.stderr and log_history(out)[-1]["step"] == 3
    card = ModelCard.load(os.path.join(out, "README.md"))  # the adapter's card is ours, not peft's template
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-text-to-text"
    assert "Template: the model's own chat template with `{\"enable_thinking\": false}`" in card.text


def test_save_now_and_stop_now_are_answered_once_by_every_rank(tmp_path, monkeypatch):
    """The callback's decisions, as every rank sees them (one process here; the torchrun test runs two)."""
    out = tmp_path / "out"
    out.mkdir()
    args = types.SimpleNamespace(output_dir=str(out), process_index=0, device=torch.device("cpu"))
    stop = finetune.StopOnRequest()
    state, control = transformers.TrainerState(global_step=0), transformers.TrainerControl()
    stop.on_train_begin(args, state, control)
    try:
        (out / "SAVE_NOW").touch()
        state.global_step = 1
        stop.on_step_end(args, state, control)
        assert control.should_save and not control.should_training_stop and (out / "SAVE_NOW").exists()
        stop.on_save(args, state, control)  # the checkpoint is complete: the file goes
        assert not (out / "SAVE_NOW").exists()
        control = transformers.TrainerControl()
        (out / "SAVE_NOW").touch()
        stop.on_step_end(args, state, control)  # step 1 is on disk already: nothing to write, the file goes
        assert not control.should_save and not (out / "SAVE_NOW").exists()
        (out / "STOP_NOW").touch()
        state.global_step = 2
        stop.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and not control.should_evaluate
        assert stop.stop_reason == "STOP_NOW" and stop.stopped_at_step == 2
    finally:
        for sig in (finetune.signal.SIGTERM, finetune.signal.SIGINT):
            finetune.signal.signal(sig, finetune.signal.SIG_DFL)


@pytest.mark.e2e
@pytest.mark.distributed
def test_save_now_and_replies_under_torchrun_zero3(tiny_qwen3_5, tmp_path):
    """Two ranks, ZeRO-3 with every weight partitioned: SAVE_NOW writes one checkpoint that both ranks wrote their
    part of, and the replies at each evaluation (every rank generating together) are what the result replies."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    open(os.path.join(out, finetune.SAVE_NOW), "w").close()
    result = run_cli(torchrun(*lora_run(tiny_qwen3_5, DATA, out, "--max_steps", "2", "--val_size", "2",
                                        "--eval_strategy", "steps", "--eval_steps", "1", "--eval_generations", "1",
                                        "--eval_max_new_tokens", "6", "--deepspeed", zero3_config(tmp_path))))
    assert_success(result)
    assert result.stderr.count(f"SAVE_NOW in {out}: writing checkpoint-1") == 1
    assert not os.path.exists(os.path.join(out, finetune.SAVE_NOW))
    assert finetune.checkpoint_problem(os.path.join(out, "checkpoint-1"), 1) is None
    assert len(glob.glob(os.path.join(out, "checkpoint-1", "global_step1", "*optim_states.pt"))) == 2
    with open(os.path.join(out, finetune.EVAL_GENERATIONS)) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["sample"]) for r in rows] == [(1, 0), (2, 0)]  # written once, by rank 0
    import peft

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    base = transformers.AutoModelForImageTextToText.from_pretrained(tiny_qwen3_5)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    assert_greedy_reply(model, tokenizer, rows[-1], 6)
