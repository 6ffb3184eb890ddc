"""Multi-process runs on the CPU: torchrun/DDP, DeepSpeed ZeRO-2 and ZeRO-3 (gloo), the deepspeed launcher, two nodes.

Marked `distributed` (and e2e): each test starts 2 processes, 20-40 s on 2 cores; the first DeepSpeed run on a
fresh machine also compiles DeepSpeed's shared-memory op (about a minute, cached in ~/.cache/torch_extensions).
"""
import math
import os
import shutil

import pytest
import torch
from fp32 import assert_fp32_close
from helpers import (DATA, ROOT, assert_adapter_changes_logits, assert_resumed_run_matches, assert_success, base_model,
                     log_history, run_cli, tokens_per_step, torchrun, train_losses, zero3_config)
from safetensors.torch import load_file

from finetune import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

RUN = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
       "--seed", "0", "--save_strategy", "no"]
LORA = ["--use_lora", "true", "--lora_r", "8", "--lora_alpha", "16"]


def adapter_tensors(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_launcher_with_two_processes_runs_ddp_on_sharded_data(tiny_qwen2, tmp_path):
    out = str(tmp_path / "ddp")
    cache = str(tmp_path / "cache")
    result = run_cli(["bash", "finetune_lora.sh", "-m", tiny_qwen2, "-o", out, "--max_steps", "4",
                      "--learning_rate", "1e-2", "--data_cache_dir", cache, *LORA[2:], *RUN],
                     env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())})
    assert_success(result)
    assert "torch.distributed.run --nproc_per_node 2" in result.stdout
    # One rank tokenized into the cache, the other mapped what it wrote.
    assert result.stderr.count(f"{DATA}: tokenized by rank 0") == 1
    assert result.stderr.count(f"rank 1: {DATA}: loaded the tokenized data from the cache") == 1
    assert len(os.listdir(cache)) == 1
    # 8 samples, 2 per process and 2 processes: an epoch every 2 steps, so each rank saw its own half.
    assert [e["epoch"] for e in log_history(out) if "loss" in e] == [0.5, 1.0, 1.5, 2.0]
    # Messages print once, from global rank 0: the save says when it starts and when it is done.
    assert result.stderr.count("saving the LoRA adapter") == 2
    assert f"saving the LoRA adapter and the tokenizer to {out}: done in" in result.stderr
    assert_adapter_changes_logits(tiny_qwen2, out)


def test_deepspeed_launcher_zero2_lora_follows_the_cosine_flag_and_saves_modules_to_save(tiny_qwen2, tmp_path):
    out = str(tmp_path / "zero2")
    result = run_cli(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                      os.path.join(ROOT, "finetune.py"), "--model_name_or_path", tiny_qwen2, "--data_path", DATA,
                      "--output_dir", out, "--deepspeed", os.path.join(ROOT, "ds_config_zero2.json"),
                      "--max_steps", "6", "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine",
                      "--lora_modules_to_save", "embed_tokens,lm_head", *LORA, *RUN])
    assert_success(result)
    # The logged rate is the schedule's value before each step; a scheduler block in the config would replace it.
    logged = [e["learning_rate"] for e in log_history(out) if "loss" in e]
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * step / 6)) for step in range(6)]
    assert logged == pytest.approx(cosine, rel=1e-12)  # float64 on both sides, the same formula
    tensors = adapter_tensors(out)
    embeddings = [k for k in tensors if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert len(embeddings) == 2 and all(tensors[k].shape == (151680, 64) for k in embeddings)
    assert_adapter_changes_logits(tiny_qwen2, out)


def zero3_lora_run(tiny_qwen2, config, out, *extra):
    return run_cli(torchrun("--model_name_or_path", tiny_qwen2, "--data_path", DATA, "--output_dir", out,
                            "--deepspeed", config, "--max_steps", "4", "--learning_rate", "1e-2",
                            "--lora_modules_to_save", "embed_tokens", *LORA, *RUN,
                            "--save_strategy", "steps", "--save_steps", "2", *extra))


def test_zero3_lora_saves_the_complete_adapter_and_resumes(tiny_qwen2, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config, whole = zero3_config(tmp_path), str(tmp_path / "whole")
    assert_success(zero3_lora_run(tiny_qwen2, config, whole))

    saved = adapter_tensors(whole)
    assert len(saved) == 2 * 7 * 2 + 1  # A and B of 7 projections in 2 layers, and the embeddings
    assert all(t.numel() > 0 for t in saved.values())
    # Independent of our gather: DeepSpeed's own reconstruction of the trained weights from the ranks' shards.
    engine = get_fp32_state_dict_from_zero_checkpoint(os.path.join(whole, "checkpoint-4"),
                                                      exclude_frozen_parameters=True)
    engine = {k.replace(".modules_to_save", "").replace(".default", ""): v for k, v in engine.items()}
    assert set(saved) == set(engine)
    for key, value in saved.items():
        torch.testing.assert_close(value, engine[key], rtol=0, atol=0)  # the same fp32 values, copied
    assert_adapter_changes_logits(tiny_qwen2, whole)

    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(whole, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    result = zero3_lora_run(tiny_qwen2, config, resumed, "--resume_from_checkpoint", "true")
    assert_success(result)
    assert "resuming from" in result.stderr
    assert_resumed_run_matches(resumed, whole, 2, "adapter_model.safetensors")


def test_zero3_chunked_loss_matches_the_standard_loss(tiny_qwen2, tmp_path):
    runs = {}
    for chunked in ("true", "false"):
        out = str(tmp_path / f"chunked_{chunked}")
        # Chunks of 7 positions: the ranks' micro-batches need different numbers of them (and lm_head gathers).
        assert_success(run_cli(torchrun("--model_name_or_path", tiny_qwen2, "--data_path", DATA, "--output_dir", out,
                                        "--deepspeed", zero3_config(tmp_path), "--max_steps", "3",
                                        "--learning_rate", "1e-2", "--chunked_loss", chunked,
                                        "--loss_chunk_size", "7", *LORA, *RUN)))
        runs[chunked] = train_losses(out)
    assert len(runs["true"]) == 3
    # Each step's loss sums over its tokens; the two losses' gradients (another chunking) move the weights that
    # steps 2 and 3 see by their own rounding, which the loss feels only through those tokens again.
    assert_fp32_close(runs["true"], runs["false"], 3 * tokens_per_step(out), "losses")


def test_zero3_full_finetune_saves_a_model_that_reloads_with_trained_weights(tiny_qwen3, tmp_path):
    out = str(tmp_path / "zero3_full")
    result = run_cli(torchrun("--model_name_or_path", tiny_qwen3, "--data_path", DATA, "--output_dir", out,
                              "--deepspeed", zero3_config(tmp_path), "--max_steps", "3", "--learning_rate", "1e-3",
                              *RUN))
    assert_success(result)
    trained, base = base_model(out), base_model(tiny_qwen3)
    assert trained.config.use_cache is True
    for name, value in base.state_dict().items():
        assert trained.state_dict()[name].shape == value.shape
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert "model.embed_tokens.weight" in changed and any("self_attn.q_proj" in n for n in changed)


def test_two_nodes_on_one_machine_train_together_and_write_one_output(tiny_qwen2, tmp_path):
    import subprocess

    from helpers import CHILD_ENV

    out = str(tmp_path / "two_nodes")
    env = {**CHILD_ENV, "NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "RDZV_TIMEOUT": "120"}
    command = ["bash", "finetune_lora.sh", "-m", tiny_qwen2, "-o", out, "--max_steps", "2", *RUN]
    nodes = [subprocess.Popen(command, cwd=ROOT, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "saving the LoRA adapter" in outputs[0][1] and "saving the LoRA adapter" not in outputs[1][1]
    assert [e["epoch"] for e in log_history(out) if "loss" in e] == [0.5, 1.0]  # two nodes shared the data
    assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))


def test_wrong_node_rank_is_refused_before_anything_starts(tmp_path):
    result = run_cli(["bash", "finetune_lora.sh", "-o", str(tmp_path / "x")],
                     env={"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"})
    assert result.returncode == 2 and "NODE_RANK must be 0..1 for NNODES=2" in result.stderr


def test_qlora_with_zero3_stops_at_start_up_with_one_line(tiny_qwen2, tmp_path):
    result = run_cli(["python", os.path.join(ROOT, "finetune.py"), "--model_name_or_path", tiny_qwen2,
                      "--data_path", DATA, "--output_dir", str(tmp_path / "x"), "--q_lora", "true",
                      "--deepspeed", os.path.join(ROOT, "ds_config_zero3.json")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --q_lora cannot be combined with ZeRO-3" in result.stderr


def test_single_process_qlora_with_deepspeed_zero2_trains_and_saves(tiny_qwen2, tmp_path):
    out = str(tmp_path / "qlora_zero2")
    result = run_cli(["python", os.path.join(ROOT, "finetune.py"), "--model_name_or_path", tiny_qwen2,
                      "--data_path", DATA, "--output_dir", out, "--q_lora", "true", "--max_steps", "3",
                      "--learning_rate", "1e-2", "--deepspeed", os.path.join(ROOT, "ds_config_zero2.json"),
                      *LORA, *RUN])
    assert_success(result)  # the reference scripts died here on 'DummyOptim' object has no attribute 'step'
    assert len(train_losses(out)) == 3
    assert_adapter_changes_logits(tiny_qwen2, out)
