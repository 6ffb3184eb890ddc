"""Plain helpers shared by the test files (fixtures are in conftest.py): where things are, running finetune.py (in
a subprocess or in this process), reading what a run left behind, and the checks several files make.

A helper that only one test file uses stays in that file.
"""
import contextlib
import copy
import gc
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # finetune.py, merge_adapter.py
sys.path.insert(0, os.path.join(ROOT, "examples"))  # tiny_qwen.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import finetune  # noqa: E402
from fp32 import assert_changed_beyond_rounding, assert_fp32_close, backward_depth, forward_depth  # noqa: E402
from reference_labels import IGNORE  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# Data and command lines
# ---------------------------------------------------------------------------------------------------------

DATA = os.path.join(ROOT, "examples", "data.jsonl")
AGENT_DATA = os.path.join(ROOT, "examples", "data_agent.jsonl")  # reasoning, tools, tool calls
GOOD = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}  # a minimal sample
GOOD_LINE = json.dumps(GOOD)

SHORT_RUN = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
             "--seed", "0"]
LORA = ["--lora_r", "16", "--lora_alpha", "32"]
PROMPT = "<|im_start|>user\nWhat is 12 times 13?<|im_end|>\n<|im_start|>assistant\n"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def write_jsonl(path, samples):
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return str(path)


def write_json(path, samples):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(samples, f, ensure_ascii=False, indent=1)
    return str(path)


def write_parquet(path, samples):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(key for sample in samples for key in sample))  # a table has every column
    pq.write_table(pa.table({key: [sample.get(key) for sample in samples] for key in columns}), path)
    return str(path)


def lora_command(model, out, *extra):
    """`python finetune.py ...`: a short LoRA run of the example data, a checkpoint every 2 steps."""
    return [sys.executable, os.path.join(ROOT, "finetune.py"), "--model_name_or_path", model, "--data_path", DATA,
            "--output_dir", out, "--use_lora", "true", "--lora_r", "8", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--seed", "0", "--save_steps", "2",
            *extra]


def torchrun(*args):
    """The command line of finetune.py under torchrun on 2 processes."""
    return ["torchrun", "--nproc_per_node", "2", "--master_port", str(finetune.free_port()),
            os.path.join(ROOT, "finetune.py"), *args]


def zero3_config(tmp_path):
    """The shipped ZeRO-3 config with nothing kept whole: tiny LoRA matrices must really be partitioned."""
    with open(os.path.join(ROOT, "ds_config_zero3.json")) as f:
        config = json.load(f)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_partition_everything.json"
    path.write_text(json.dumps(config))
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# finetune.py's own objects, built as main() builds them
# ---------------------------------------------------------------------------------------------------------

def make_encoder(tokenizer, model_max_length=8192, system_message="You are a helpful assistant.", template="chatml",
                 template_kwargs=None):
    return finetune.ChatEncoder(tokenizer, model_max_length, system_message, template, template_kwargs)


def dataset_of(specs, encoder, data_args, seed=0):
    """finetune.make_dataset on --data_path entries, resolved as a run resolves them (resolve_sources)."""
    return finetune.make_dataset(finetune.resolve_sources(specs), encoder, data_args, seed)


def encode(tokenizer, path, lazy=False, **kwargs):
    """Every example of a data file, through ChatEncoder(tokenizer, **kwargs)."""
    encoder = finetune.ChatEncoder(tokenizer, kwargs.pop("model_max_length", 8192), **kwargs)
    dataset = (finetune.LazySupervisedDataset if lazy else finetune.SupervisedDataset)(path, encoder)
    return [dataset[i] for i in range(len(dataset))]


def trained_runs(tokenizer, example):
    """The trained stretches of an example (its labels that are not ignored), each decoded to text."""
    runs, run = [], []
    for label in example["labels"] + [IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def with_template(tokenizer, chat_template):
    """A copy of the tokenizer with another chat template."""
    other = copy.copy(tokenizer)
    other.chat_template = chat_template
    return other


def training_args(tmp_path, **kwargs):
    return finetune.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kwargs)


def lora_args(**kwargs):
    args = finetune.LoraArguments(use_lora=True, lora_r=4, lora_alpha=8, **kwargs)
    finetune.check_arguments(finetune.DataArguments(data_path="unused"), finetune.TrainingArguments(output_dir="x"),
                             args)
    return args


def fake_checkpoint(folder, step, state=True, weights=True, optimizer=True):
    """A checkpoint folder with real (tiny) files: trainer_state.json naming `step`, adapter weights, optimizer."""
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


# ---------------------------------------------------------------------------------------------------------
# Running finetune.py
# ---------------------------------------------------------------------------------------------------------

# Subprocesses must never reach for a hub, and should not fight each other for the 2 cores. (conftest.py sets up
# this session's environment before it imports this module, so that the copy holds it.)
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(args, cwd=ROOT, timeout=600, env=None):
    """Run a command the way a user would; return the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run(
        args, cwd=cwd, env={**CHILD_ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def run_finetune(args, **kwargs):
    """`python finetune.py ARGS` in a subprocess: for a run that needs a process of its own (a signal sent to it,
    torch.distributed, which --deepspeed starts even on one process, an environment read at import)."""
    return run_cli([sys.executable, os.path.join(ROOT, "finetune.py"), *args], **kwargs)


def run_in_process(args):
    """`python finetune.py ARGS` as finetune.main(ARGS) in this process, without the 5-8 s a new interpreter takes
    to import torch and transformers. Returns what run_finetune returns: a CompletedProcess with the exit status
    (main's sys.exit, 0 if it returns) and what the run wrote to stdout and to stderr, its log lines included.

    For one process that needs nothing of a process of its own. What main() changes in the process is put back
    afterwards: the signal handlers it installs, the levels of its loggers, os.environ (the launch environment),
    the random generators (--seed) and torch's default dtype. It must not start torch.distributed: a --deepspeed run
    does, even on one process (use run_finetune)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    # Where main()'s logging.basicConfig would send the log: stderr, in main's format. On the root logger before
    # main() runs, so that basicConfig (which does nothing where the root has a handler) adds none of its own; and
    # on transformers' logger, which keeps its records from the root and would write them to this process's stderr.
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    hosts = [logging.getLogger(), logging.getLogger("transformers")]
    levels = {name: logging.getLogger(name).level for name in ("finetune", "finetune.ranks")}
    verbosity = transformers.logging.get_verbosity()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    environ = dict(os.environ)
    generators = random.getstate(), np.random.get_state(), torch.get_rng_state()
    dtype = torch.get_default_dtype()
    for host in hosts:
        host.addHandler(handler)
    returncode = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                finetune.main([str(arg) for arg in args])
            except SystemExit as exit_status:  # as the interpreter turns it into an exit status
                code = exit_status.code
                returncode = 0 if code is None else code if isinstance(code, int) else 1
        assert not torch.distributed.is_initialized(), "main() started torch.distributed: use run_finetune"
    finally:
        for host in hosts:
            host.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        transformers.logging.set_verbosity(verbosity)
        for sig, old in handlers.items():
            signal.signal(sig, old)
        for key in [key for key in os.environ if key not in environ]:
            del os.environ[key]
        os.environ.update(environ)
        random.setstate(generators[0])
        np.random.set_state(generators[1])
        torch.set_rng_state(generators[2])
        torch.set_default_dtype(dtype)
        gc.collect()  # the run's model and trainer, now
    return subprocess.CompletedProcess(["finetune.main", *map(str, args)], returncode, stdout.getvalue(),
                                       stderr.getvalue())


# ---------------------------------------------------------------------------------------------------------
# What a run left behind, and checks on it
# ---------------------------------------------------------------------------------------------------------

def assert_success(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def log_history(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return json.load(f)["log_history"]


def train_losses(output_dir):
    return [entry["loss"] for entry in log_history(output_dir) if "loss" in entry]


def tokens_per_step(output_dir):
    """The most real tokens one optimizer step saw (from the logged running count)."""
    seen = [0] + [entry["num_input_tokens_seen"] for entry in log_history(output_dir) if "loss" in entry]
    return max(b - a for a, b in zip(seen, seen[1:]))


def complete(checkpoint):
    """The Trainer writes trainer_state.json last: a checkpoint folder that has it was written to the end."""
    return os.path.exists(os.path.join(checkpoint, "trainer_state.json"))


def assert_resumed_run_matches(resumed, whole, replayed_steps, weights_file):
    """A resumed run repeats the uninterrupted run's last steps: the same sums, which may only round otherwise
    (another memory alignment, another thread split): each replayed step's gradient once more."""
    tokens = tokens_per_step(whole)
    assert_fp32_close(train_losses(resumed), train_losses(whole), tokens, "losses")  # each a sum over a step
    expected = load_file(os.path.join(whole, weights_file))
    got = load_file(os.path.join(resumed, weights_file))
    assert expected.keys() == got.keys()
    for key in expected:
        assert_fp32_close(got[key], expected[key], backward_depth(tokens) * replayed_steps, key)


def base_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def logits_of(model, tokenizer):
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_adapter_changes_logits(base_path, adapter_dir):
    import peft

    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter_dir)
    before = logits_of(base_model(base_path), tokenizer)
    after = logits_of(peft.PeftModel.from_pretrained(base_model(base_path), adapter_dir), tokenizer)
    assert_changed_beyond_rounding(after, before, forward_depth(len(tokenizer(PROMPT)["input_ids"])), "logits")
