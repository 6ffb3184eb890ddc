"""End-to-end runs as a user starts them, on tiny random Qwen models: the launchers, examples/chat.py and the demo in
a subprocess; finetune.py's own command lines through finetune.main() in this process (helpers.run_in_process: the
same exit status, stdout and stderr, without a new interpreter's start-up).

Marked e2e (each run costs 5-20 s on 2 CPU cores): `pytest -m "not e2e"` skips them, `pytest -m e2e` runs only them.
"""
import json
import os
import sys

import pytest
import torch
import transformers
from fp32 import assert_changed_beyond_rounding, assert_fp32_close, forward_depth
from helpers import (AGENT_DATA, DATA, LORA, PROMPT, SHORT_RUN, assert_adapter_changes_logits, assert_success,
                     base_model, log_history, logits_of, run_cli, run_in_process, train_losses, write_jsonl)
from reference_labels import IGNORE, reference_ids_and_labels, template_ids_and_labels, template_messages
from safetensors.torch import load_file
from tiny_qwen import qwen_tokenizer_dir

pytestmark = pytest.mark.e2e


def assert_loss_falls(output_dir):
    losses = train_losses(output_dir)
    assert len(losses) >= 8
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.05, losses


def assert_adapter_changes_the_model(base_path, adapter_dir):
    files = set(os.listdir(adapter_dir))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), files  # adapter only
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2 and all(t.numel() > 0 for t in tensors.values())
    assert_adapter_changes_logits(base_path, adapter_dir)


def test_full_finetune_of_qwen3_with_packing_writes_a_model_that_reloads_with_trained_weights(tiny_qwen3, tmp_path):
    out = str(tmp_path / "full")
    result = run_in_process(["--model_name_or_path", tiny_qwen3, "--data_path", DATA, "--eval_data_path", AGENT_DATA,
                             "--output_dir", out, "--max_steps", "12", "--learning_rate", "3e-3",
                             "--save_strategy", "no", "--packing", "true", *SHORT_RUN])
    assert_success(result)
    assert_loss_falls(out)
    assert any("eval_loss" in entry for entry in log_history(out))
    steps = [entry for entry in log_history(out) if "loss" in entry]
    assert all(e["tokens_per_second_per_device"] >= e["trained_tokens_per_second_per_device"] > 0 for e in steps)
    summary = next(entry for entry in log_history(out) if "train_runtime" in entry)
    assert summary["trained_tokens_per_second_per_device"] > 0
    assert "trained_tokens_per_second_per_device" in result.stdout + result.stderr  # users see it in the logs
    with open(os.path.join(out, "training_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    trained, base = base_model(out), base_model(tiny_qwen3)
    assert trained.config.use_cache is True
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert "model.embed_tokens.weight" in changed and any("mlp.down_proj" in n for n in changed)
    assert transformers.AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>") == 151645


def safetensors_of(folder):
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def config_of(folder):
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return {key: value for key, value in config.items() if key not in ("transformers_version", "dtype")}


def test_full_finetune_of_qwen3_5_with_packing_keeps_the_checkpoints_class_config_and_vision_tower(
        tiny_qwen3_5, tmp_path):
    out = str(tmp_path / "full")
    result = run_in_process(["--model_name_or_path", tiny_qwen3_5, "--data_path", DATA, AGENT_DATA, "--output_dir", out,
                             "--max_steps", "10", "--learning_rate", "3e-3", "--save_strategy", "no",
                             "--packing", "true", *SHORT_RUN])
    assert_success(result)
    assert "parameters outside it (the vision tower) are frozen" in result.stderr
    assert_loss_falls(out)
    # The checkpoint's own class and config (Qwen3_5ForConditionalGeneration, model_type qwen3_5), every tensor under
    # its own name and shape, the vision tower's unchanged to the bit, the language model's trained.
    assert config_of(out) == config_of(tiny_qwen3_5)
    trained, base = safetensors_of(out), safetensors_of(tiny_qwen3_5)
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}
    vision = [key for key in base if key.startswith("model.visual.")]
    assert len(vision) == 21 and all(torch.equal(trained[key], base[key]) for key in vision)
    changed = {key for key in base if not torch.equal(trained[key], base[key])}
    assert {"lm_head.weight", "model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
            "model.language_model.layers.3.self_attn.q_proj.weight"} <= changed
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration" and model.config.get_text_config().use_cache


def test_qwen3_5_lora_adapter_loads_onto_the_checkpoints_class_merges_and_answers(tiny_qwen3_5, tmp_path):
    import peft

    import merge_adapter

    out = str(tmp_path / "lora")
    result = run_in_process(["--model_name_or_path", tiny_qwen3_5, "--data_path", AGENT_DATA, "--output_dir", out,
                             "--use_lora", "true", "--max_steps", "6", "--learning_rate", "1e-2", "--save_strategy",
                             "no", "--packing", "true", "--rope_scaling", "2",
                             "--chat_template_kwargs", '{"preserve_thinking": true}', *LORA, *SHORT_RUN])
    assert_success(result)
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    # The keys of the checkpoint's own class, which vLLM maps onto its language model: 3 linear-attention layers of 6
    # adapted projections and 1 attention layer of 7, an A and a B each.
    assert len(saved) == 2 * (3 * 6 + 7)
    assert all(key.startswith("base_model.model.model.language_model.layers.") for key in saved)
    with open(os.path.join(out, "base_config_changes.json")) as f:  # YaRN, in the language model's config
        changes = json.load(f)
    assert changes["rope_parameters"]["rope_type"] == "yarn" and changes["max_position_embeddings"] == 8192

    def base_with_yarn(cls=transformers.AutoModelForImageTextToText):
        config = transformers.AutoConfig.from_pretrained(tiny_qwen3_5)
        for key, value in changes.items():
            setattr(config.get_text_config(), key, value)
        return cls.from_pretrained(tiny_qwen3_5, config=config, dtype=torch.float32)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    adapted = peft.PeftModel.from_pretrained(base_with_yarn(), out)
    loaded = {name.replace(".default.", "."): p for name, p in adapted.named_parameters() if ".lora_" in name}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)  # every tensor
    expected = logits_of(adapted, tokenizer)
    depth = forward_depth(len(tokenizer(PROMPT)["input_ids"]), layers=4)
    assert_changed_beyond_rounding(expected, logits_of(base_with_yarn(), tokenizer), depth, "logits")
    text_only = base_with_yarn(transformers.AutoModelForCausalLM)  # the text-only class, through transformers' loader
    text_only.load_adapter(out)
    assert_fp32_close(logits_of(text_only, tokenizer), expected, depth, "logits on AutoModelForCausalLM")

    merged = merge_adapter.merge(out, str(tmp_path / "merged"), dtype="fp32")
    assert config_of(merged)["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert config_of(merged)["text_config"]["rope_parameters"]["rope_type"] == "yarn"
    merged_tensors, base = safetensors_of(merged), safetensors_of(tiny_qwen3_5)
    assert merged_tensors.keys() == base.keys()
    assert all(torch.equal(merged_tensors[k], base[k]) for k in base if k.startswith("model.visual."))
    merged_model = transformers.AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32)
    assert_fp32_close(logits_of(merged_model, tokenizer), expected, depth + 4, "merged logits")
    for flags in (["--base", tiny_qwen3_5, "--adapter", out], ["--model", merged]):
        answer = run_cli([sys.executable, os.path.join("examples", "chat.py"), *flags, "--max_new_tokens", "4", "Hi"])
        assert_success(answer)
        assert "assistant: " in answer.stdout


def test_finetune_lora_sh_with_default_data_grouping_and_val_size_writes_an_adapter_that_changes_outputs(tiny_qwen2, tmp_path):
    out = str(tmp_path / "lora")
    result = run_cli(["bash", "finetune_lora.sh", "-m", tiny_qwen2, "-o", out, "--max_steps", "10",
                      "--learning_rate", "1e-2", "--save_strategy", "no", "--group_by_length", "true",
                      "--val_size", "0.25", *LORA, *SHORT_RUN])
    assert_success(result)
    assert "holding out 2 of 8 training samples" in result.stderr
    assert any("eval_loss" in entry for entry in log_history(out))
    assert f"--data_path {DATA}" in result.stdout  # the launcher prints what it runs; DATA defaults to the example
    assert "trainable parameters:" in result.stderr + result.stdout
    assert_loss_falls(out)
    assert_adapter_changes_the_model(tiny_qwen2, out)


def test_finetune_qlora_sh_writes_an_adapter_that_loads_on_the_full_precision_base(tiny_qwen2, tmp_path):
    out = str(tmp_path / "qlora")
    result = run_cli(["bash", "finetune_qlora.sh", "-m", tiny_qwen2, "-d", DATA, "-o", out, "--max_steps", "8",
                      "--learning_rate", "1e-2", "--save_strategy", "no", *LORA, *SHORT_RUN])
    assert_success(result)
    assert "--q_lora true" in result.stdout
    assert_adapter_changes_the_model(tiny_qwen2, out)


def test_preprocess_only_loads_no_model_and_dumps_exactly_the_label_rule(tmp_path):
    conversations = [
        [{"role": "user", "content": "Quelle heure est-il ?"}, {"role": "assistant", "content": "Il est midi. ⏰"},
         {"role": "user", "content": "Merci\n"}, {"role": "assistant", "content": "  Avec plaisir."}],
        [{"role": "system", "content": "Reply in haiku."}, {"role": "user", "content": "rain"},
         {"role": "assistant", "content": "grey sky softly weeps\n\npuddles gather silver light"}],
        [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "cut away"}],
    ]
    data = write_jsonl(tmp_path / "new.jsonl", [{"messages": c} for c in conversations])
    out = str(tmp_path / "preview")
    # The model folder holds only a tokenizer: loading any model would fail.
    result = run_in_process(["--model_name_or_path", qwen_tokenizer_dir(), "--data_path", data, "--output_dir", out,
                             "--preprocess_only", "true", "--system_message", "Be kind.", "--model_max_length", "256",
                             "--template", "chatml"])
    assert_success(result)
    assert "samples kept: 2" in result.stdout and "1 with no trained token within --model_max_length" in result.stdout
    assert "⟦Il est midi. ⏰<|im_end|>⟧" in result.stdout
    assert "> 256" in result.stdout and "1  <- cut to model_max_length" in result.stdout  # the length histogram
    with open(os.path.join(out, "tokenized_train.jsonl")) as f:
        dumped = [json.loads(line) for line in f]
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    for example, messages in zip(dumped, conversations[:2]):
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": "Be kind."}] + messages
        _, ids, labels = reference_ids_and_labels(tokenizer, messages)
        assert example == {"input_ids": ids, "labels": labels}
        assert any(label != IGNORE for label in labels)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_preprocess_only_with_the_models_template_dumps_reasoning_and_tool_calls_by_the_rule(tmp_path):
    out = str(tmp_path / "preview")
    result = run_in_process(["--model_name_or_path", qwen_tokenizer_dir(), "--data_path", AGENT_DATA,
                             "--output_dir", out, "--preprocess_only", "true"])  # --template auto is the default
    assert_success(result)
    assert "the model's own chat template" in result.stderr
    assert "⟦<think>\nThe user wants today's weather in Lisbon" in result.stdout
    with open(os.path.join(out, "tokenized_train.jsonl")) as f:
        dumped = [json.loads(line) for line in f]
    with open(AGENT_DATA) as f:
        samples = [json.loads(line) for line in f]
    assert len(dumped) == len(samples)
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    for example, sample in zip(dumped, samples):
        if "messages" not in sample:
            continue  # the ShareGPT sample: its mapping is checked in test_template.py
        _, ids, labels = template_ids_and_labels(tokenizer, template_messages(sample["messages"]), sample.get("tools"))
        assert example == {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("case", ["bad json line", "missing file", "missing model"])
def test_data_errors_end_with_one_line_and_no_traceback(tmp_path, case, tiny_qwen2):
    model, data = tiny_qwen2, AGENT_DATA
    if case == "bad json line":
        data = tmp_path / "train.jsonl"
        data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                        '{"messages": [\n')
        expected = f"error: {data} line 2: not valid JSON"
    elif case == "missing file":
        data = tmp_path / "absent.jsonl"
        expected = f"error: {data}: file not found"
    else:
        model = str(tmp_path / "no_such_model")
        expected = f"error: --model_name_or_path {model}: cannot load a tokenizer from it"
    if case == "bad json line":  # through the launcher, as users start runs
        result = run_cli(["bash", "finetune_lora.sh", "-m", model, "-d", str(data), "-o", str(tmp_path / "o")])
    else:
        result = run_in_process(["--model_name_or_path", model, "--data_path", str(data), "--output_dir",
                                 str(tmp_path / "o")])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr


def test_demo_builds_trains_and_generates(tmp_path):
    result = run_cli(["bash", os.path.join("examples", "demo.sh"), str(tmp_path / "demo")])
    assert_success(result)
    assert "random weights" in result.stdout and "assistant: " in result.stdout
    assert os.path.exists(tmp_path / "demo" / "adapter" / "adapter_model.safetensors")
    # What it prints is what a user can act on: each flag of the launched command once, no library noise.
    command = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    flags = [word for word in command.split() if word.startswith("--")]
    assert len(flags) == len(set(flags)), command
    output = result.stdout + result.stderr
    for noise in ("Warning", "Setting accelerator to CPU", "Failed to load CPU gemm_4bit_forward"):
        assert noise not in output, output
