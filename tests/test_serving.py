"""What a run writes serves where users serve it: a full fine-tune and a merge hold every tensor of the checkpoint
they started from, under its name, in its shape and in the dtype the checkpoint stores it in (the vision tower, the
multi-token-prediction block that transformers does not load, tied embeddings), for every family; a 16-bit run keeps
what the checkpoint stores in fp32 (Qwen3.5's Gated DeltaNet A_log and norm) in fp32, trained and saved.

llama.cpp's own converters and runtime on these outputs: benchmarks/engines.py (slow: it compiles llama.cpp)."""
import json
import os

import pytest
import torch
from helpers import DATA, LORA, SHORT_RUN, assert_success, run_in_process
from safetensors.torch import load_file, save_file

import finetune

FAMILIES = ["qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"]


def layout(folder):
    """{name: (shape, dtype)} of a model folder's stored tensors."""
    return {name: (tensor.shape, tensor.dtype) for name, tensor in finetune.stored_tensors(folder).items()}


def assert_same_layout(saved, base):
    expected, got = layout(base), layout(saved)
    assert sorted(set(expected) - set(got)) == [], "tensors of the base missing from the saved model"
    assert sorted(set(got) - set(expected)) == [], "tensors the base does not have"
    assert {name: got[name] for name in expected if got[name] != expected[name]} == {}, "other shapes or dtypes"


def full_run(model, out, *extra):
    return run_in_process(["--model_name_or_path", model, "--data_path", DATA, "--output_dir", out, *SHORT_RUN,
                           "--max_steps", "1", "--learning_rate", "1e-3", "--save_strategy", "no", *extra])


@pytest.mark.e2e
@pytest.mark.parametrize("arch", FAMILIES)
def test_a_full_fine_tune_and_a_merge_write_every_tensor_of_the_checkpoint(arch, tiny_models, tmp_path):
    import merge_adapter

    base = tiny_models(arch)
    full = str(tmp_path / "full")
    result = full_run(base, full)
    assert_success(result)
    assert_same_layout(full, base)
    assert "what will run:\n  attention: sdpa" in result.stderr  # the start-up report (tests/test_kernels.py)
    assert ("Gated DeltaNet layers: their PyTorch reference" in result.stderr) == arch.startswith("qwen3_5")
    adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
    lora_result = full_run(base, adapter, "--use_lora", "true", *LORA)
    assert_success(lora_result)
    with open(os.path.join(adapter, "README.md")) as f:
        card = f.read()
    if "moe" in arch:  # LoRA on the fused experts: no engine's LoRA loader reads it, and the run says so
        assert f"{adapter} holds LoRA on the fused MoE experts, which llama.cpp's LoRA converter refuses" in \
            lora_result.stderr
        assert "merge it and serve the merged model" in card
    else:
        assert "LoRA on the fused MoE experts" not in lora_result.stderr and "--enable-lora" in card
    merge_adapter.merge(adapter, merged)
    assert_same_layout(merged, base)
    mtp = [name for name in layout(base) if name.startswith("mtp.")]
    assert (len(mtp) > 0) == arch.startswith("qwen3_5")  # the released layout: the MTP block beside the model
    if mtp:  # carried over unchanged, in the layout every loader reads (shards named by an index)
        assert "multi-token-prediction block) carried over unchanged" in result.stderr
        before, after = load_file(os.path.join(base, "model.safetensors")), {}
        for folder in (full, merged):
            with open(os.path.join(folder, finetune.SAFE_INDEX)) as f:
                files = set(json.load(f)["weight_map"].values())
            assert sorted(files) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
            for file in files:
                after.update(load_file(os.path.join(folder, file)))
            assert all(torch.equal(after[name], before[name]) for name in mtp)
            with open(os.path.join(folder, "config.json")) as f:
                assert json.load(f)["text_config"]["mtp_num_hidden_layers"] == 1
        with open(os.path.join(full, "README.md")) as f:
            card = f.read()
        assert f"the multi-token-prediction block ({len(mtp)} tensors), which transformers does not load: carried " \
               "over unchanged" in card
        assert "the vision tower (text data gives it no gradient)" in card and "- vLLM: `vllm serve THIS_FOLDER`" in card
        import transformers

        reloaded = finetune.model_class(transformers.AutoConfig.from_pretrained(full)).from_pretrained(full)
        trained = load_file(os.path.join(full, "model-00001-of-00002.safetensors"))
        name = next(name for name in trained if "layers.0.mlp" in name or "layers.0.linear_attn.in_proj" in name)
        assert torch.equal(reloaded.state_dict()[name], trained[name])  # the sharded result loads as trained


@pytest.mark.e2e
def test_the_mtp_block_is_left_out_on_purpose_with_the_config_saying_so(tiny_models, tmp_path):
    import merge_adapter

    base, out = tiny_models("qwen3_5"), str(tmp_path / "full")
    assert_success(full_run(base, out, "--save_mtp", "false"))
    assert not [name for name in layout(out) if name.startswith("mtp.")]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["text_config"]["mtp_num_hidden_layers"] == 0
    adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
    assert_success(full_run(base, adapter, "--use_lora", "true", *LORA))
    merge_adapter.main(["--adapter", adapter, "--output", merged, "--no_mtp"])
    assert not [name for name in layout(merged) if name.startswith("mtp.")]
    with open(os.path.join(merged, "config.json")) as f:
        assert json.load(f)["text_config"]["mtp_num_hidden_layers"] == 0


def stored_in_bf16_but(folder, out, keep_fp32=("linear_attn.A_log", "linear_attn.norm.weight")):
    """A copy of a tiny checkpoint stored as Qwen3.5's releases are: bf16, but its Gated DeltaNet A_log and norm in
    fp32."""
    import shutil

    shutil.copytree(folder, out)
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    save_file({name: t if name.endswith(keep_fp32) else t.to(torch.bfloat16) for name, t in tensors.items()}, path,
              metadata={"format": "pt"})
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config["dtype"] = config["text_config"]["dtype"] = "bfloat16"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return out


@pytest.mark.e2e
def test_a_bf16_run_trains_and_saves_in_fp32_what_the_checkpoint_stores_in_fp32(tiny_models, tmp_path):
    base = stored_in_bf16_but(tiny_models("qwen3_5"), str(tmp_path / "base"))
    stored = layout(base)
    fp32 = sorted(name for name, (_, dtype) in stored.items() if dtype == "F32" and not name.startswith("mtp."))
    assert fp32 and all(name.endswith(("A_log", "linear_attn.norm.weight")) for name in fp32)
    out = str(tmp_path / "full")
    result = full_run(base, out, "--bf16", "true", "--use_cpu", "true", "--learning_rate", "1e-2", "--max_steps", "2")
    assert_success(result)
    assert_same_layout(out, base)  # every dtype as stored: bf16, and fp32 where the checkpoint has fp32
    before = load_file(os.path.join(base, "model.safetensors"))
    after = {}
    for file in set(json.load(open(os.path.join(out, finetune.SAFE_INDEX)))["weight_map"].values()):
        after.update(load_file(os.path.join(out, file)))
    for name in (n for n in fp32 if n.endswith("A_log")):
        assert not torch.equal(after[name], before[name]), f"{name} was not trained"
        # Trained in fp32: its values are not all ones a bf16 tensor can hold.
        assert not torch.equal(after[name].to(torch.bfloat16).float(), after[name]), f"{name} was trained in bf16"
    assert f"{len(fp32)} parameters the checkpoint stores in fp32" in result.stderr
