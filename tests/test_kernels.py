"""Which fast path runs: the start-up report of the paths a step takes, and a hybrid model on a GPU without its
Gated DeltaNet kernels stopped in one line unless asked for. No GPU here: the kernels are made to seem present or
missing by replacing transformers' availability checks, and the device by a stand-in of the training arguments."""
import types

import pytest
import torch
import transformers
from helpers import training_args

import finetune


def on(device, allow=False):
    return types.SimpleNamespace(device=torch.device(device), allow_slow_kernels=allow)


def kernels(monkeypatch, fla, conv):
    import transformers.utils.import_utils as import_utils

    monkeypatch.setattr(import_utils, "is_flash_linear_attention_available", lambda: fla)
    monkeypatch.setattr(import_utils, "is_causal_conv1d_available", lambda: conv)


@pytest.mark.parametrize("fla, conv", [(False, False), (True, False), (False, True)])
def test_a_hybrid_on_a_gpu_without_its_kernels_stops_in_one_line_unless_asked(tiny_qwen3_5, monkeypatch, caplog,
                                                                               fla, conv):
    kernels(monkeypatch, fla, conv)
    config = transformers.AutoConfig.from_pretrained(tiny_qwen3_5)
    with pytest.raises(finetune.UserError) as error:
        finetune.check_kernels(config, on("cuda"))
    message = str(error.value)
    assert "\n" not in message and "pip install flash-linear-attention causal-conv1d" in message
    assert "--allow_slow_kernels true" in message
    finetune.check_kernels(config, on("cuda", allow=True))  # on purpose: a warning, and it goes on
    assert "run on their PyTorch reference (--allow_slow_kernels)" in caplog.text
    finetune.check_kernels(config, on("cpu"))  # the CPU has only the reference: nothing to stop


def test_a_hybrid_with_its_kernels_and_a_dense_model_pass(tiny_qwen3_5, tiny_qwen3, monkeypatch):
    kernels(monkeypatch, True, True)
    finetune.check_kernels(transformers.AutoConfig.from_pretrained(tiny_qwen3_5), on("cuda"))
    kernels(monkeypatch, False, False)
    finetune.check_kernels(transformers.AutoConfig.from_pretrained(tiny_qwen3), on("cuda"))  # no such layers


def test_the_report_names_each_path(tiny_models, tmp_path, monkeypatch):
    args = training_args(tmp_path, packing=True, loss_chunk_size=512)
    model_args = finetune.ModelArguments(model_name_or_path=tiny_models("qwen3_5_moe"))
    model = finetune.load_model(model_args, args, finetune.LoraArguments())
    lines = finetune.paths_that_run(model, model_args, args, finetune.LoraArguments())
    assert lines[0] == "attention: sdpa; packed samples kept apart (exact)"
    assert lines[1] == ("Gated DeltaNet layers: their PyTorch reference (flash-linear-attention and causal-conv1d: "
                        "GPUs only); a packed row runs sample by sample there")
    assert lines[2].startswith("experts: ") and lines[2].endswith("(transformers' default for this torch)")
    assert "loss: chunked, 512 positions a chunk (no logits of every position)" in lines
    assert "activation checkpointing: off; precision: fp32 on cpu" in lines
    monkeypatch.setattr(finetune, "gdn_kernels_available", lambda device: True)
    assert finetune.paths_that_run(model, model_args, args, finetune.LoraArguments())[1].startswith(
        "Gated DeltaNet layers: flash-linear-attention and causal-conv1d kernels")
    dense_args = training_args(tmp_path, chunked_loss=False)
    dense_model_args = finetune.ModelArguments(model_name_or_path=tiny_models("qwen3"), experts_implementation=None)
    dense = finetune.load_model(dense_model_args, dense_args, finetune.LoraArguments())
    assert finetune.paths_that_run(dense, dense_model_args, dense_args, finetune.LoraArguments()) == [
        "attention: sdpa", "loss: the model's own (logits of every position)",
        "activation checkpointing: off; precision: fp32 on cpu"]
