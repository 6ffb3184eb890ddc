"""Model loading in-process: model folders that cannot load, LoRA targets, bias modes, starting from an adapter,
4-bit QLoRA; and merging an adapter into its base (merge_adapter.py)."""
import json
import os
import shutil

import pytest
import torch
import transformers
from fp32 import assert_fp32_close, forward_depth
from helpers import PROMPT, logits_of, lora_args, training_args
from safetensors.torch import load_file

import finetune
import merge_adapter

QWEN_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def load(model_dir, tmp_path, **lora_kwargs):
    return finetune.load_model(finetune.ModelArguments(model_name_or_path=model_dir), training_args(tmp_path),
                               lora_args(**lora_kwargs))


@pytest.mark.parametrize("arch", ["tiny_qwen2", "tiny_qwen3"])
def test_default_lora_targets_every_decoder_projection_and_not_lm_head(arch, request, tmp_path):
    model = load(request.getfixturevalue(arch), tmp_path)
    assert set(model.peft_config["default"].target_modules) == QWEN_PROJECTIONS
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * len(QWEN_PROJECTIONS) * 2  # A and B, 7 projections, 2 layers
    assert model.base_model.model.config.use_cache is False


def adapted_modules(model):
    return {name.split(".lora_")[0].removesuffix(".base_layer") for name, p in model.named_parameters()
            if p.requires_grad}


def test_qwen3_5_lora_adapts_the_language_model_projections_only(tiny_qwen3_5, tmp_path):
    model = load(tiny_qwen3_5, tmp_path)
    adapted = adapted_modules(model)
    # Gated DeltaNet: its input projections for q/k/v and the output gate z, and its output; not the per-head gates.
    linear_attention = {"linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj"}
    attention = {f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp = {f"mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")}
    prefix = "base_model.model.model.language_model.layers"
    expected = {f"{prefix}.{i}.{name}" for i in range(3) for name in linear_attention | mlp}
    expected |= {f"{prefix}.3.{name}" for name in attention | mlp}
    assert adapted == expected  # nothing in the vision tower, no lm_head, no in_proj_a / in_proj_b
    assert all(p.requires_grad is False for n, p in model.named_parameters() if ".visual." in n)
    assert model.config.get_text_config().use_cache is False


def test_full_fine_tuning_of_a_multimodal_checkpoint_freezes_its_vision_tower(tiny_qwen3_5, tmp_path):
    model = finetune.load_model(finetune.ModelArguments(model_name_or_path=tiny_qwen3_5), training_args(tmp_path),
                                finetune.LoraArguments())
    assert type(model).__name__ == "Qwen3_5ForConditionalGeneration"
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith("model.visual.")} and frozen


def test_named_lora_targets_must_match_a_decoder_projection(tiny_qwen3_5, tmp_path):
    model = load(tiny_qwen3_5, tmp_path, lora_target_modules=["in_proj_a,q_proj"])  # named: a gate is allowed
    assert {name.rsplit(".", 1)[-1] for name in adapted_modules(model)} == {"in_proj_a", "q_proj"}
    with pytest.raises(finetune.UserError, match=r"--lora_target_modules q_porj,experts: matched nothing in the "
                                                 r"decoder layers of this model \(its projections: down_proj, "):
        load(tiny_qwen3_5, tmp_path, lora_target_modules=["q_porj", "v_proj", "experts"])
    with pytest.raises(finetune.UserError, match="--lora_target_modules qkv: matched nothing"):  # the vision tower's
        load(tiny_qwen3_5, tmp_path, lora_target_modules=["qkv"])


def test_comma_separated_target_modules(tiny_qwen2, tmp_path):
    model = load(tiny_qwen2, tmp_path, lora_target_modules=["q_proj,v_proj"])
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_lora_bias_modes_train_and_save_the_biases(tiny_qwen2, tmp_path, bias):
    model = load(tiny_qwen2, tmp_path, lora_bias=bias)
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    # Qwen2 has biases on q, k and v only, all of them adapted: both modes train exactly those six.
    assert len(trainable_biases) == 6 and all(
        n.endswith(("q_proj.base_layer.bias", "k_proj.base_layer.bias", "v_proj.base_layer.bias")) for n in trainable_biases)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sum(key.endswith(".bias") for key in saved) == 6


def test_lora_weight_path_continues_from_the_given_adapter(tiny_qwen2, tmp_path):
    first = load(tiny_qwen2, tmp_path)
    with torch.no_grad():
        for name, p in first.named_parameters():
            if ".lora_B." in name:
                p.normal_()  # a trained-looking adapter (B starts at zero)
    first.save_pretrained(tmp_path / "adapter")
    expected = load_file(tmp_path / "adapter" / "adapter_model.safetensors")

    continued = finetune.load_model(finetune.ModelArguments(model_name_or_path=tiny_qwen2), training_args(tmp_path),
                                    lora_args(lora_weight_path=str(tmp_path / "adapter")))
    state = {n: p for n, p in continued.named_parameters() if ".lora_" in n}
    assert len(state) == len(expected) and all(p.requires_grad for p in state.values())
    for key, value in expected.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")].detach(), value)


def test_lora_weight_path_without_an_adapter_is_refused(tmp_path):
    with pytest.raises(finetune.UserError, match="no adapter_config.json"):
        lora_args(lora_weight_path=str(tmp_path))


def test_qlora_loads_the_base_in_4bit_nf4_with_double_quantization(tiny_qwen2, tmp_path):
    import bitsandbytes as bnb

    model = load(tiny_qwen2, tmp_path, q_lora=True)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4" and q_proj.weight.quant_state.nested
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe", "qwen3_moe"])
def test_qlora_quantizes_the_projections_and_leaves_the_gates_in_full_precision(arch, tiny_models, tmp_path):
    import bitsandbytes as bnb

    model = load(tiny_models(arch), tmp_path, q_lora=True, lora_dropout=0.0)
    quantized = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    layer = "layers.0." if arch == "qwen3_moe" else "layers.3."  # an attention layer
    assert any(name.endswith(f"{layer}self_attn.q_proj.base_layer") for name in quantized)
    gates = [name for name, module in model.named_modules() if name.endswith(finetune.LORA_LEFT_OUT)
             and isinstance(module, torch.nn.Linear)]
    assert not any(name in quantized for name in gates)
    assert all(not name.endswith("lm_head") for name in quantized)
    batch = torch.randint(0, 1000, (2, 9))
    model(input_ids=batch, labels=batch).loss.backward()  # trains: the adapters get gradients
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


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


@pytest.mark.e2e
def test_qwen3_8_flash_next_trains_with_lora_and_in_full_with_its_indexer_frozen(tiny_models, tmp_path):
    """qwen4_exp: hyper-connections, a sparse attention whose indexer selects positions (no gradient reaches it)."""
    from helpers import DATA, SHORT_RUN, assert_success, run_in_process

    base = tiny_models("qwen4_exp")
    common = ["--model_name_or_path", base, "--data_path", DATA, *SHORT_RUN, "--max_steps", "2",
              "--learning_rate", "1e-2", "--save_strategy", "no"]
    lora = load(base, tmp_path)
    adapted = adapted_modules(lora)
    assert any(".self_attn.q_proj" in name for name in adapted) and any("mlp.experts" in name for name in adapted)
    assert not any(".indexer." in name for name in adapted)
    result = run_in_process([*common, "--output_dir", str(tmp_path / "lora"), "--use_lora", "true", "--lora_r", "4"])
    assert_success(result)
    assert os.path.isfile(tmp_path / "lora" / "adapter_model.safetensors")
    full = str(tmp_path / "full")
    result = run_in_process([*common, "--output_dir", full])
    assert_success(result)
    assert "parameters of the sparse-attention indexer are frozen" in result.stderr
    before, after = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(full, "model.safetensors"))
    indexer = [name for name in before if ".indexer." in name]
    assert indexer and all(torch.equal(before[name], after[name]) for name in indexer)
    trained = [name for name in before if ".self_attn.q_proj" in name]
    assert all(not torch.equal(before[name], after[name]) for name in trained)
    with pytest.raises(finetune.UserError, match=r"--attn_implementation flash_attention_2: "
                                                 r"Qwen4ExpForConditionalGeneration \(qwen4_exp\) has no such path"):
        finetune.check_attention(transformers.AutoConfig.from_pretrained(base), "flash_attention_2")
