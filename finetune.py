"""Fine-tune a Qwen chat model (Qwen1.5 to Qwen3.8: dense, hybrid linear-attention, MoE, multimodal checkpoints) on
your own conversations.

    python finetune.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --data_path data.jsonl \
        --output_dir out --use_lora true

    python finetune.py run.yaml [--flag value ...]      # the settings of a YAML/JSON file, flags after it win

It runs unchanged as `python finetune.py`, `torchrun --nproc_per_node N finetune.py` and `deepspeed finetune.py`,
with or without `--deepspeed ds_config_zero2.json|ds_config_zero3.json`.

The file reads top to bottom in the order a run happens:
  1. arguments      ModelArguments, DataArguments, TrainingArguments, LoraArguments
  2. distributed    launchers, DDP, DeepSpeed ZeRO-3 and sequence parallelism (Ulysses): their special cases
                    live here as named helpers; what must stay in a Trainer method says `ZeRO-3:` or
                    `Sequence parallelism:` where it is. The rank and world size are read here only, and so is
                    which process speaks (progress of long waits, errors once per node)
  3. run folder     one run per --output_dir (a lock), checkpoints checked before they are trusted, the data
                    fingerprint and run shape each checkpoint records, and where a run resumes (also on another
                    number of processes)
  4. data           sources resolved once (files, Parquet, folders, dataset ids, each part's format) -> read and
                    check samples -> render (the model's chat template or ChatML) -> token ids + labels, cached
                    once per data version -> datasets mixed by count or fraction (the dataset protocol: what the
                    Trainer, the sampler and the preview read), collator
  5. preview        --preprocess_only: a report and a dump of exactly what would be trained
  6. model          full precision, LoRA or 4-bit QLoRA
  7. training       the Trainer with a loss that skips masked positions (also across ranks that split a
                    sequence), throughput logs, callbacks that watch the run, a ZeRO-3-aware save
  8. main           the run as a recipe over a Run (the flags as parsed, never changed, and the sources):
                    prepare -> decide_start (resume) -> build the datasets and the Trainer -> fit -> finish,
                    or preview_data; and the one place where errors become a one-line message

Label rule: only what the assistant says is trained (its reasoning, content and tool calls), plus the
<|im_end|> that closes each assistant turn; an empty <think></think> block is not trained.
"""
import argparse
import contextlib
import copy
import dataclasses
import fcntl
import fnmatch
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import typing
import warnings
import zipfile
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import Dataset

# Workaround (bitsandbytes 0.50, imported with transformers' TrainingArguments below): it warns on every CPU
# machine that an optional 4-bit kernel package is missing, which no user of this script needs to act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402 (imports bitsandbytes: after the above)

IGNORE_INDEX = -100  # label value that the loss skips
Span = tuple[int, int]  # [start, end) character offsets into a rendered text
log = logging.getLogger("finetune")
rank_log = logging.getLogger("finetune.ranks")  # what every rank says (log itself speaks for rank 0 only)


class UserError(Exception):
    """A mistake in the command line or the data: reported in one line, without a traceback."""


class RunFailed(Exception):
    """Training went wrong in a way no flag could have prevented up front (it diverged): one line, exit 1."""


class DataError(UserError):
    """A data file that cannot be read as conversations; the message names the file and the sample."""


def first_line(error):
    """An exception's message as one line (its first), for the one-line errors; its type when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ----------------------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------------------

@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "Hub id or local folder of the model to fine-tune."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run Python code shipped with the model. Only for models you trust."}
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "sdpa (the default), eager or flash_attention_2 (GPU, needs flash-attn)."}
    )
    rope_scaling: Optional[float] = field(
        default=None,
        metadata={"help": "Stretch the model's positions by this factor with YaRN (Qwen's way past its native "
                  "context: 4 takes a 32k model to 128k); written into the saved config."},
    )
    rope_native_length: Optional[int] = field(
        default=None,
        metadata={"help": "The context the model was trained for, which --rope_scaling stretches (default: its "
                  "config's max_position_embeddings; Qwen3's says 40960 where Qwen documents 32768)."},
    )
    experts_implementation: Optional[Literal["eager", "batched_mm", "grouped_mm"]] = field(
        default=None,
        metadata={"help": "MoE models: how the experts run. grouped_mm (the default where torch has it): one grouped "
                  "matrix product for all experts; batched_mm; eager: a loop over the experts."},
    )


@dataclass
class DataArguments:
    data_path: list[str] = field(
        default_factory=list,
        metadata={"help": "Training conversations: one or more sources, space- or comma-separated: JSON or JSON Lines "
                  "files, Parquet files, folders, glob patterns, Hugging Face dataset ids (org/name or "
                  "org/name:split). SOURCE#N takes N samples of it (repeating them if it holds fewer), SOURCE#0.5 "
                  "half of it, chosen by --seed."},
    )
    eval_data_path: list[str] = field(
        default_factory=list, metadata={"help": "Evaluation conversations, same sources; eval loss is logged."}
    )
    val_size: float = field(
        default=0,
        metadata={"help": "Hold out this fraction (0-1) or number (>= 1) of training samples for evaluation, "
                  "chosen by --seed; instead of --eval_data_path."},
    )
    lazy_preprocess: bool = field(
        default=False, metadata={"help": "Tokenize each sample when it is used instead of all up front."}
    )
    template: Literal["auto", "chatml"] = field(
        default="auto",
        metadata={"help": "auto: render with the model's own chat template (Qwen3 thinking, tools, tool calls), "
                  "what inference will use; chatml: plain <|im_start|>role ... <|im_end|> turns. auto falls back "
                  "to chatml for a tokenizer without a chat template."},
    )
    system_message: Optional[str] = field(
        default=None,
        metadata={"help": "System turn for samples that bring none. Unset: 'You are a helpful assistant.' with "
                  "--template chatml, the template's own default with auto. Empty: none with chatml, an empty "
                  "system message with auto."},
    )
    chat_template_kwargs: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "A JSON object of settings handed to the model's chat template at every render, e.g. "
                  "'{\"preserve_thinking\": true}' (Qwen3.6/3.8), '{\"enable_thinking\": false}', "
                  "'{\"reasoning_effort\": \"low\"}' (Qwen3.8); as vLLM's API takes them. --template auto only."},
    )
    mask_history: bool = field(
        default=False,
        metadata={"help": "Train only the last assistant turn of each sample; the earlier ones (a conversation's "
                  "earlier turns, an Alpaca record's history) are context."},
    )
    preprocess_only: bool = field(
        default=False,
        metadata={"help": "Load only the tokenizer, report on the data, write tokenized_train.jsonl, and exit."},
    )
    data_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Folder for tokenized data, built once per data version and memory-mapped by every rank "
                  "(default: $XDG_CACHE_HOME/qwen-finetune/tokenized, else ~/.cache/qwen-finetune/tokenized; a "
                  "shared file system serves many nodes); 'none': tokenize in memory at every start."},
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes that tokenize a data set (default: the available cores, up to 8)."}
    )

    def __post_init__(self):
        self.data_path, self.eval_data_path = split_names(self.data_path), split_names(self.eval_data_path)
        if self.data_cache_dir is None:
            self.data_cache_dir = default_cache_dir()
        elif self.data_cache_dir.strip().lower() == "none":
            self.data_cache_dir = ""
        else:
            self.data_cache_dir = os.path.expanduser(self.data_cache_dir)
        cores = len(os.sched_getaffinity(0))
        if self.preprocessing_num_workers is None:
            self.preprocessing_num_workers = min(cores, 8)
        elif self.preprocessing_num_workers < 1:
            raise UserError(f"--preprocessing_num_workers must be at least 1, got {self.preprocessing_num_workers}")
        elif self.preprocessing_num_workers > cores:  # more would only take turns on the same cores
            log.info(f"--preprocessing_num_workers {self.preprocessing_num_workers}: this process may use {cores} "
                     f"cores; tokenizing with {cores} workers")
            self.preprocessing_num_workers = cores
        self.chat_template_kwargs = parse_template_kwargs(self.chat_template_kwargs)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """The Trainer's own flags, with defaults that suit supervised fine-tuning of a chat model."""

    model_max_length: int = field(
        default=8192, metadata={"help": "Samples are cut to this many tokens; batches are padded only to their longest."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log loss, learning rate and tokens every N steps."})
    # Evaluation would otherwise keep every logit (vocabulary ~151k) of the eval set in memory.
    prediction_loss_only: bool = field(default=True, metadata={"help": "Evaluation computes the loss only."})
    # Our examples already hold exactly the model's inputs; the Trainer's column filter has nothing to do.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every column of the examples."})
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "Count the real (non-pad) input tokens seen: all, non_padding, no."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh: remove the checkpoints in output_dir (a rerun otherwise resumes from them)."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Padding-free batches: a batch's samples share one row, positions restart per sample, "
                  "and no token attends across samples."},
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch samples of similar length together (less padding without packing)."}
    )
    chunked_loss: bool = field(
        default=True,
        metadata={"help": "Project only trained positions through lm_head, a chunk at a time, instead of building "
                  "logits for every position; false = the model's standard loss."},
    )
    loss_chunk_size: int = field(default=1024, metadata={"help": "Positions per lm_head chunk of the chunked loss."})
    max_nonfinite_steps: int = field(
        default=3,
        metadata={"help": "Stop when this many optimizer steps in a row have a non-finite loss or gradient norm "
                  "(such a step is skipped, not applied); the result is then not saved."},
    )
    # A non-finite loss must show as nan in the logs, not be replaced by the average of the earlier ones.
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "Hide non-finite losses in the logs."})
    sequence_parallel_size: int = field(
        default=1,
        metadata={"help": "Split every sequence over this many ranks (DeepSpeed Ulysses / ALST; needs --deepspeed): "
                  "each holds 1/N of a sample's activations. Must divide the number of processes."},
    )
    resume_on_new_data: bool = field(
        default=False,
        metadata={"help": "The newest checkpoint was trained on other data: start from its weights on the new data, "
                  "with a fresh optimizer, schedule and epoch count, instead of stopping."},
    )
    router_aux_loss_coef: Optional[float] = field(
        default=None,
        metadata={"help": "MoE models: weight of the router's load-balancing loss in the training loss (default: the "
                  "model's router_aux_loss_coef, 0.001 on Qwen's); logged as router_aux_loss; 0 turns it off. eval_loss leaves "
                  "it out (eval_router_aux_loss is logged beside it)."},
    )
    eval_generations: int = field(
        default=0,
        metadata={"help": "At every evaluation, reply (greedily) to the first N evaluation prompts: written with the "
                  "step to eval_generations.jsonl in output_dir and shown by --report_to."},
    )
    eval_max_new_tokens: int = field(default=256, metadata={"help": "The longest reply --eval_generations writes."})
    early_stopping_patience: Optional[int] = field(
        default=None,
        metadata={"help": "Stop when --metric_for_best_model (default eval_loss) has not improved for this many "
                  "evaluations in a row; the result is then the best checkpoint (--load_best_model_at_end)."},
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "How much --metric_for_best_model must improve to count, for early stopping."}
    )
    allow_slow_kernels: bool = field(
        default=False,
        metadata={"help": "On a GPU, train a hybrid model (Gated DeltaNet) without flash-linear-attention and "
                  "causal-conv1d, on their PyTorch reference (several times slower), instead of stopping."},
    )
    save_mtp: bool = field(
        default=True,
        metadata={"help": "Full fine-tunes: carry the checkpoint's multi-token-prediction block (mtp.*, which "
                  "transformers does not load, so it is not trained) into the saved model, for vLLM's speculative "
                  "decoding and llama.cpp; false leaves it out and sets mtp_num_hidden_layers to 0 in the config."},
    )

    def __post_init__(self):
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        evaluates = transformers.trainer_utils.IntervalStrategy(self.eval_strategy) != "no"  # ValueError: one line
        if evaluates and self.metric_for_best_model is None:
            self.metric_for_best_model = "eval_loss"  # what names the best checkpoint, which rotation then keeps
        if self.early_stopping_patience is not None and evaluates:
            self.load_best_model_at_end = True  # the Trainer's own early stopping wants the best as the result
        super().__post_init__()
        if not torch.cuda.is_available():
            # Workaround (transformers 5.24, torch 2.13): the Trainer pins memory by default, which needs an
            # accelerator; on the CPU torch only warns on every batch. It can go when the Trainer checks itself.
            self.dataloader_pin_memory = False


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of every weight."})
    q_lora: bool = field(
        default=False, metadata={"help": "QLoRA: load the base model in 4-bit NF4 (bitsandbytes); implies --use_lora."}
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module names to adapt, space- or comma-separated. 'all-linear' = every linear projection of "
            "the decoder layers (q,k,v,o,gate,up,down on Qwen2/3), never lm_head."
        },
    )
    lora_weight_path: Optional[str] = field(
        default=None, metadata={"help": "Start from this trained adapter (its own config wins over --lora_r etc.)."}
    )
    lora_bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata={"help": "Which biases to train with the adapter: none, all or lora_only."}
    )
    lora_modules_to_save: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Modules trained in full and saved with the adapter, space- or comma-separated; for example "
            "embed_tokens,lm_head for a base model that must learn the ChatML control tokens."
        },
    )
    lora_router: bool = field(
        default=False,
        metadata={"help": "MoE models: adapt the router too (by default LoRA leaves the routing as it is)."},
    )

    def __post_init__(self):
        self.lora_target_modules = split_names(self.lora_target_modules)
        self.lora_modules_to_save = split_names(self.lora_modules_to_save)
        if (self.q_lora or self.lora_weight_path) and not self.use_lora:
            self.use_lora = True
            log.info("--q_lora / --lora_weight_path imply --use_lora: training a LoRA adapter")


def parse_arguments(argv=None):
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    parser.error = refuse_command_line  # one line naming the flag, not argparse's usage text
    argv = expand_config_files(sys.argv[1:] if argv is None else list(argv), parser)
    check_finite(parser, argv)  # before the Trainer's own checks run into inf or nan
    # Creating TrainingArguments starts torch.distributed: the environment must be ready before.
    argv = prepare_launch_environment(argv)
    try:
        model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # unknown flags and combinations the Trainer rejects (some in a list of lines)
        raise UserError(" ".join(line.strip().removeprefix("- ") for line in str(e).splitlines())) from None
    check_arguments(data_args, training_args, lora_args)
    check_model_arguments(model_args)
    check_distributed_setup(training_args, lora_args)
    if not data_args.preprocess_only:  # the preview loads no model and splits nothing
        check_sequence_parallelism(training_args, model_args.attn_implementation)
    return model_args, data_args, training_args, lora_args


def refuse_command_line(message):
    """argparse's error, as one line naming the flag (once, not with its dashed alias)."""
    raise UserError(re.sub(r"^argument (--\w+)(/--[\w-]+)*", r"\1", message))


def check_finite(parser, argv):
    """Every number a flag takes is finite: inf epochs or a nan learning rate would only fail after loading."""
    values, _ = parser.parse_known_args(argv)
    for action in parser._actions:
        value = getattr(values, action.dest, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{action.dest} must be a finite number, got {value}")


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def expand_config_files(argv, parser):
    """`finetune.py run.yaml [--flag value ...]`, and `--config run.yaml` anywhere: the file's settings (keys are
    flag names) take its place on the command line, so that flags after it win over it, and it over flags before
    it (the launchers put their defaults there)."""
    expanded, rest = [], list(argv)
    if rest and not rest[0].startswith("-") and rest[0].endswith(CONFIG_SUFFIXES):
        expanded += config_file_arguments(rest.pop(0), parser)
    while rest:
        arg = rest.pop(0)
        if arg == "--config" or arg.startswith("--config="):
            path = arg.partition("=")[2] or (rest.pop(0) if rest else "")
            if not path:
                raise UserError("--config needs a YAML or JSON file")
            expanded += config_file_arguments(path, parser)
        else:
            expanded.append(arg)
    return expanded


def config_file_arguments(path, parser):
    """A config file's settings as command-line arguments, each value checked against its flag's type (see
    config_value_arguments); an unknown key, a key given twice (in any spelling) or a value of the wrong type is an
    error naming the file and the key."""
    flags = config_flags(parser)
    arguments, seen = [], {}
    for key, value in read_config_file(path).items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in seen:
            raise UserError(f"{path}: '{seen[name]}' and '{key}' set the same flag; keep one")
        seen[name] = key
        if name not in flags:
            raise UserError(f"{path}: unknown key '{key}' (not a flag of finetune.py; see --help)")
        if value is not None:  # `key:` with nothing after it leaves the flag at its default
            words = config_value_arguments(value, flags[name], f"{path}: '{key}'")
            # One value as --flag=value: text that starts with a dash is then not taken for a flag.
            arguments += [f"--{name}={words[0]}"] if len(words) == 1 else [f"--{name}", *words]
    return arguments


class DuplicateKey(ValueError):
    pass


def read_config_file(path):
    """The settings of a YAML or JSON file of flags; a key given twice at any level is refused, not overwritten."""
    import yaml

    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")  # with or without a byte-order mark
    except OSError as e:
        raise UserError(f"{path}: cannot read the config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        if kind == "JSON":
            settings = json.loads(text, object_pairs_hook=unique_keys, parse_constant=refuse_constant)
        else:
            settings = yaml.load(text, Loader=unique_key_yaml_loader())
    except DuplicateKey as e:
        raise UserError(f"{path}: '{e}' is set twice; keep one") from None
    except (ValueError, TypeError, yaml.YAMLError, RecursionError) as e:  # TypeError: a list as a key
        raise UserError(f"{path}: not valid {kind} ({first_line(e)})") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UserError(f"{path}: expected flag names and their values, got a {type(settings).__name__}")
    return settings


def unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if duplicates := [key for i, key in enumerate(keys) if key in keys[:i]]:
        raise DuplicateKey(duplicates[0])
    return dict(pairs)


@functools.lru_cache(maxsize=None)
def unique_key_yaml_loader():
    """PyYAML's safe loader, refusing a mapping that gives a key twice (PyYAML keeps the last one silently), and
    reading only plain decimal integers as numbers: YAML 1.1 would read 010 as 8 and 1:00 as 60 (those stay text,
    which a number flag refuses)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            own = [key for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]  # `<<:` merges are allowed
            unique_keys([(self.construct_object(key, deep=deep), None) for key in own])
            return super().construct_mapping(node, deep)

    UniqueKeyLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9_]*)$"),
                                          list("-+0123456789"))
    return UniqueKeyLoader


@dataclass
class FlagType:
    """What a flag takes, as the config file check needs it."""

    kind: str  # bool, int, float, str, choice, list, other
    choices: tuple = ()
    mapping: bool = False  # a JSON object is accepted (a YAML mapping is written as one)


def config_flags(parser):
    """{flag: FlagType} from the parser's own actions (the first action of each flag; --no_X shares X's) and the
    dataclasses' annotations (whether a mapping is accepted)."""
    from transformers.hf_argparser import string_to_bool

    mapping = {name for cls in (ModelArguments, DataArguments, TrainingArguments, LoraArguments)
               for name, hint in typing.get_type_hints(cls).items()
               if any(arg is dict or typing.get_origin(arg) is dict for arg in (typing.get_args(hint) or (hint,)))}
    flags = {}
    for action in parser._actions:
        if action.dest in flags or not action.option_strings or action.dest == "help":
            continue
        if action.type is string_to_bool:
            kind = "bool"
        elif action.choices:
            kind = "choice"
        elif action.nargs == "+":
            kind = "list"
        else:
            kind = {int: "int", float: "float", str: "str"}.get(action.type, "other")
        flags[action.dest] = FlagType(kind, tuple(str(c) for c in action.choices or ()), action.dest in mapping)
    return flags


def config_value_arguments(value, flag, where):
    """A config value as the command-line words its flag takes, or one line saying what was expected. YAML's
    implicit typing is not trusted: an unquoted no/yes/on/off is a boolean, fine for a yes/no flag and an error
    for a text flag; a number where text is expected must be quoted; the one conversion made is 1e-4 (a string to
    YAML 1.1) to a float for a float flag."""
    if isinstance(value, dict):
        if flag.mapping:
            return [json.dumps(value, default=str)]  # a YAML date in it as its text
        raise UserError(f"{where} takes {describe_flag_type(flag)}, not a mapping")
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where} is an empty list: name at least one, or leave the key out")
        if flag.kind == "list" and all(isinstance(v, str) for v in value):
            return value
        raise UserError(f"{where} takes {describe_flag_type(flag)}, not {describe_value(value)}")
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool) or is_float_text(value),
          "str": isinstance(value, str), "list": isinstance(value, str),
          "choice": isinstance(value, str) and value in flag.choices,
          "other": isinstance(value, (str, int, float))}[flag.kind]
    if not ok:
        quote = " (YAML reads no/yes/on/off/true/false as a boolean: quote it)" if isinstance(value, bool) else ""
        raise UserError(f"{where} takes {describe_flag_type(flag)}, got {describe_value(value)}{quote}")
    return [str(value).lower() if isinstance(value, bool) else str(value)]


def is_float_text(value):
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def describe_flag_type(flag):
    return {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text",
            "list": "a list of names (or one text)", "other": "a value",
            "choice": f"one of {', '.join(flag.choices)}"}[flag.kind] + (" or a mapping" if flag.mapping else "")


def describe_value(value):
    kind = {bool: "a boolean", int: "a whole number", float: "a number", str: "text", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)
    if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
        kind = "a nested list"
    return f"{kind} ({json.dumps(value, default=str)[:60]})"


def check_arguments(data_args, training_args, lora_args):
    """Reject impossible combinations before anything slow happens."""
    if not data_args.data_path:
        raise UserError("--data_path is required (JSON, JSON Lines or Parquet files, folders or dataset ids)")
    if training_args.model_max_length < 2:
        raise UserError(f"--model_max_length must be at least 2, got {training_args.model_max_length}")
    if training_args.bf16 and training_args.fp16:
        raise UserError("choose one of --bf16 and --fp16")
    val_size = data_args.val_size
    if val_size < 0 or (val_size >= 1 and val_size != int(val_size)):
        raise UserError(f"--val_size is a fraction below 1 or a whole number of samples, got {val_size}")
    if val_size and data_args.eval_data_path:
        raise UserError("--val_size cannot be combined with --eval_data_path")
    check_numbers(training_args, lora_args)
    check_evaluation_flags(data_args, training_args)
    check_report_to(training_args.report_to)
    if lora_args.lora_weight_path and not os.path.isfile(os.path.join(lora_args.lora_weight_path, "adapter_config.json")):
        raise UserError(f"--lora_weight_path {lora_args.lora_weight_path}: no adapter_config.json in that folder")


def check_evaluation_flags(data_args, training_args):
    """Evaluation, its sample replies and early stopping: combinations the Trainer would only reject once the model
    has loaded (or at the first evaluation), refused now."""
    has_eval_data = bool(data_args.eval_data_path or data_args.val_size)
    evaluates = training_args.eval_strategy != "no"
    if evaluates and not has_eval_data:
        raise UserError(f"--eval_strategy {training_args.eval_strategy.value} needs evaluation data: --eval_data_path "
                        "or --val_size")
    if training_args.early_stopping_patience is not None:
        if training_args.early_stopping_patience < 1:
            raise UserError(f"--early_stopping_patience must be at least 1, got {training_args.early_stopping_patience}")
        if not evaluates:
            raise UserError("--early_stopping_patience needs evaluations to compare: --eval_strategy steps (with "
                            "--eval_steps) or epoch, and evaluation data")
    if training_args.early_stopping_threshold < 0:
        raise UserError(f"--early_stopping_threshold must be zero or more, got {training_args.early_stopping_threshold}")
    if training_args.load_best_model_at_end and training_args.save_strategy == "steps" and \
            training_args.save_steps != training_args.eval_steps:
        # The Trainer accepts a multiple; an evaluation without a checkpoint could then be the best, and the result
        # would silently be another one.
        raise UserError(f"--load_best_model_at_end (set by --early_stopping_patience) needs a checkpoint at every "
                        f"evaluation: --save_steps {training_args.save_steps:g} must equal --eval_steps "
                        f"{training_args.eval_steps:g}")
    metric = training_args.metric_for_best_model
    if metric is not None and metric.removeprefix("eval_") != "loss":  # prediction_loss_only: the loss is all
        raise UserError(f"--metric_for_best_model {metric}: evaluation computes eval_loss only; use eval_loss")
    if training_args.eval_generations < 0 or training_args.eval_max_new_tokens < 1:
        raise UserError("--eval_generations must be zero or more and --eval_max_new_tokens positive, got "
                        f"{training_args.eval_generations} and {training_args.eval_max_new_tokens}")
    if training_args.eval_generations and not has_eval_data:
        raise UserError("--eval_generations replies to evaluation prompts: give --eval_data_path or --val_size")
    if training_args.eval_generations and training_args.sequence_parallel_size > 1:
        raise UserError("--eval_generations cannot be combined with --sequence_parallel_size: a rank holds only a "
                        "slice of each sequence")


# The (pip package, import name) that each --report_to integration needs.
REPORT_TO_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                      "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio"),
                      "comet_ml": ("comet-ml", "comet_ml"), "neptune": ("neptune", "neptune"),
                      "clearml": ("clearml", "clearml"), "dvclive": ("dvclive", "dvclive"),
                      "swanlab": ("swanlab", "swanlab"), "codecarbon": ("codecarbon", "codecarbon"),
                      "azure_ml": ("azureml-core", "azureml"), "dagshub": ("dagshub", "dagshub"),
                      "flyte": ("flytekit", "flytekit")}


def check_report_to(report_to):
    """Every --report_to integration exists and its package is installed (the Trainer finds out after loading)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"--report_to {name}: not an integration; choose from "
                            f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, all or none")
        package, module = REPORT_TO_PACKAGES.get(name, (name, name))
        found = importlib.util.find_spec(module) is not None
        if name == "tensorboard":  # the Trainer writes through torch's writer (needs tensorboard) or tensorboardX
            found = found or importlib.util.find_spec("tensorboardX") is not None
        if not found:
            raise UserError(f"--report_to {name}: its package is not installed; pip install {package}")


def check_model_arguments(model_args):
    if model_args.rope_scaling is not None and not 1 < model_args.rope_scaling <= 1024:
        raise UserError(f"--rope_scaling is YaRN's factor: more than 1, at most 1024; got {model_args.rope_scaling}")
    native = model_args.rope_native_length
    if native is not None and not (model_args.rope_scaling and native > 0):
        raise UserError("--rope_native_length is a positive number of tokens, for --rope_scaling to stretch")


def check_numbers(training_args, lora_args):
    """Flags whose values cannot work, found now rather than after the model has loaded."""
    positive = {"per_device_train_batch_size": training_args.per_device_train_batch_size,
                "per_device_eval_batch_size": training_args.per_device_eval_batch_size,
                "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
                "loss_chunk_size": training_args.loss_chunk_size,
                "max_nonfinite_steps": training_args.max_nonfinite_steps,
                "sequence_parallel_size": training_args.sequence_parallel_size,
                "lora_r": lora_args.lora_r, "lora_alpha": lora_args.lora_alpha}
    non_negative = {"learning_rate": training_args.learning_rate, "weight_decay": training_args.weight_decay,
                    "num_train_epochs": training_args.num_train_epochs, "warmup_steps": training_args.warmup_steps,
                    "max_grad_norm": training_args.max_grad_norm}
    for name, value in positive.items():
        if not value > 0:
            raise UserError(f"--{name} must be positive, got {value}")
    for name, value in non_negative.items():
        if not value >= 0:  # also false for nan
            raise UserError(f"--{name} must be zero or more, got {value}")
    if training_args.router_aux_loss_coef is not None and training_args.router_aux_loss_coef < 0:
        raise UserError(f"--router_aux_loss_coef must be zero or more, got {training_args.router_aux_loss_coef}")
    if not 0 <= training_args.seed < 2 ** 32:  # what numpy's generators take
        raise UserError(f"--seed must be in [0, 2^32), got {training_args.seed}")
    if not 0 <= lora_args.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {lora_args.lora_dropout}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(training_args, name) < 1:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(training_args, name)}")
    for name in ("adam_epsilon", "dataloader_num_workers"):
        if getattr(training_args, name) < 0:
            raise UserError(f"--{name} must be zero or more, got {getattr(training_args, name)}")
    if training_args.max_steps == 0 or (training_args.max_steps < 0 and training_args.max_steps != -1):
        raise UserError(f"--max_steps must be positive (or -1: set by --num_train_epochs), got {training_args.max_steps}")


def parse_template_kwargs(value):
    """--chat_template_kwargs as a dict (a config file's mapping arrives as JSON text); {} when unset."""
    if value is None or isinstance(value, dict):
        return value or {}
    try:
        parsed = json.loads(value) if value.strip() else {}
    except ValueError as e:
        raise UserError(f"--chat_template_kwargs must be a JSON object, e.g. '{{\"preserve_thinking\": true}}' "
                        f"({first_line(e)})") from None
    if not isinstance(parsed, dict):
        raise UserError(f"--chat_template_kwargs must be a JSON object of template settings, got {value!r}")
    return parsed


def split_names(items):
    """['q_proj,k_proj', 'v_proj'] -> ['q_proj', 'k_proj', 'v_proj']: commas and spaces both separate a list."""
    items = [items] if isinstance(items, str) else items or []
    return [name for item in items for name in re.split(r"[,\s]+", item) if name]


# ----------------------------------------------------------------------------------------------------------
# 2. Distributed: torchrun / DDP, the deepspeed launcher, DeepSpeed ZeRO-2/3, sequence parallelism (Ulysses),
#    and which process speaks (rank, progress of long waits, one-line errors once per node).
# ----------------------------------------------------------------------------------------------------------

# -- who this process is, and who speaks

def is_main_process():
    """Global rank 0 (torchrun and the deepspeed launcher both set RANK); True for a plain `python` run. The one
    test of "this is rank 0", except where the Trainer decides which process writes files (args.should_save,
    which --save_on_each_node extends to every node's first process)."""
    return process_rank() == 0


def process_rank():
    """This process's global rank (torchrun and the deepspeed launcher set RANK); 0 for a plain `python` run."""
    return int(os.environ.get("RANK", "0"))


def is_local_main_process():
    """The first process of this machine (LOCAL_RANK 0): the one that builds what the machine's processes share."""
    return local_rank() == 0


def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size():
    """The number of processes the launcher started (before torch.distributed is up)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def become_helper_process():
    """In a forked helper (a tokenizing worker): leave signals to the parent, which stops its helpers with SIGTERM
    (the parent's handler would report a stop of its own); and end when the parent ends, even by SIGKILL, instead
    of running on (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    import ctypes

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # blocked while it was forked
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


PROGRESS_LOG_SECONDS = 30  # how often a long wait says how far it is, where the output is not a terminal


class Progress:
    """How far a long wait of this process is (samples tokenized, bytes hashed, ...): a tqdm bar on a terminal,
    else a log line every PROGRESS_LOG_SECONDS with the count, the rate and the time left, as the Trainer shows its
    steps; and a last line with the total. Only where `show` (the process that does the work, never every rank)."""

    def __init__(self, what, total=None, unit="samples", show=True):
        self.what, self.total, self.unit, self.show = what, total, unit, show
        self.done, self.started = 0, time.perf_counter()
        self.said = self.started
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", leave=False)

    def update(self, done):
        """The count so far (not an increment)."""
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        now = time.perf_counter()
        if self.show and self.bar is None and now - self.said >= PROGRESS_LOG_SECONDS:
            self.said = now
            rank_log.info(f"{self.what}: {self.describe(now)}")  # each node's builder speaks

    def describe(self, now):
        rate = self.done / max(now - self.started, 1e-9)
        line = f"{self.done:,}{f' of {self.total:,}' if self.total else ''} {self.unit} ({rate:,.0f}/s"
        if self.total and rate > 0:
            line += f", about {max(self.total - self.done, 0) / rate:,.0f} s left"
        return line + ")"

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.show and time.perf_counter() - self.started >= PROGRESS_LOG_SECONDS:  # a long wait: say it ended
            rank_log.info(f"{self.what}: done, {self.describe(time.perf_counter())}")


@contextlib.contextmanager
def announced(what):
    """Say that a long step (the final save of a large model) starts, and how long it took."""
    log.info(f"{what} ...")
    started = time.perf_counter()
    yield
    log.info(f"{what}: done in {time.perf_counter() - started:,.1f} s")


def report_error(message):
    """Print a one-line error from rank 0, and from the first process of every other node: a node with a missing
    file or a bad variable must say so, not hang silently."""
    if is_main_process():
        print(f"error: {message}", file=sys.stderr)
    elif is_local_main_process():
        print(f"error (rank {process_rank()}): {message}", file=sys.stderr)


# -- launching: the environment before torch.distributed starts, and what cannot work

def prepare_launch_environment(argv):
    """Fill in what a launcher or a GPU would have provided, before TrainingArguments starts torch.distributed.

    Returns the command line, with what the Trainer then needs added to it."""
    with_deepspeed = any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv)
    if with_deepspeed and "RANK" not in os.environ:
        # `python finetune.py --deepspeed ...`: a one-process group, as the deepspeed launcher would describe it.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        return argv
    # Workaround (DeepSpeed 0.19): imported by peft and accelerate whether used or not, it warns on every CPU run
    # that it found no GPU, unless told which accelerator it is on.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if with_deepspeed:
        # Workaround (accelerate 1.15): accelerate runs DeepSpeed on GPUs only, and on the CPU every rank would
        # believe it is alone. Start the group over gloo here, through accelerate's own PartialState and its
        # use_configured_state (internals, not a documented path), and have the Trainer use it. It can go when
        # accelerate starts DeepSpeed on a CPU itself; the distributed tests fail if this breaks.
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
        return argv + ["--accelerator_config", '{"use_configured_state": true}']
    if world_size() > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # else DDP ranks each train alone and exit 0
    return argv


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uses_zero3():
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def deepspeed_config(training_args):
    """The --deepspeed config as the Trainer parsed it (a dict), or None without DeepSpeed."""
    config = getattr(training_args, "hf_deepspeed_config", None)
    return config.config if training_args.deepspeed and config else None


def deepspeed_zero_stage(training_args):
    """The ZeRO stage of --deepspeed, or None without DeepSpeed."""
    config = deepspeed_config(training_args)
    return config.get("zero_optimization", {}).get("stage", 0) if config is not None else None


def check_distributed_setup(training_args, lora_args):
    """Stop at start-up, in one line, on a combination that cannot work or ranks that did not find each other."""
    if lora_args.q_lora and uses_zero3():
        raise UserError("--q_lora cannot be combined with ZeRO-3 here; use ds_config_zero2.json (or no --deepspeed)")
    launched = world_size()
    if launched > 1 and training_args.world_size != launched:
        raise UserError(
            f"the launcher started {launched} processes but they did not join one group "
            f"(this one sees a world of {training_args.world_size}); check the launcher's variables"
        )


DEFAULT_ATTENTION = "sdpa"  # what transformers loads Qwen models with when --attn_implementation is not given
SEQUENCE_PARALLEL_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def check_sequence_parallelism(training_args, attn_implementation):
    """--sequence_parallel_size N: DeepSpeed's Ulysses (ALST), driven by the Trainer's own parallelism_config.

    Each rank of a group of N holds 1/N of every sequence; around attention the ranks swap slices for heads, so
    each sees whole sequences for 1/N of the heads. Every group trains the batches its N ranks were given, one
    after another (world size = data-parallel groups x N). The loss is ours (FinetuneTrainer.sequence_parallel_loss).
    What the model itself must allow is checked on its config (check_sequence_parallel_model)."""
    n = training_args.sequence_parallel_size
    if n == 1:
        return
    flag = f"--sequence_parallel_size {n}"
    if not training_args.deepspeed:
        raise UserError(f"{flag} needs --deepspeed (ds_config_zero3.json or ds_config_zero2.json): DeepSpeed's "
                        "Ulysses splits the sequences")
    if training_args.world_size % n:
        raise UserError(f"{flag} must divide the number of processes ({training_args.world_size})")
    attention = attn_implementation or DEFAULT_ATTENTION
    if attention not in SEQUENCE_PARALLEL_ATTENTION:
        raise UserError(f"--attn_implementation {attention} cannot be split over ranks; with {flag} use one of "
                        f"{', '.join(SEQUENCE_PARALLEL_ATTENTION)}")
    if training_args.packing:
        # Ulysses drops the attention mask: sdpa then masks causally over the whole row. Flash attention could keep
        # packed samples apart by their position ids, but that path cannot be tested without a GPU.
        raise UserError(f"--packing cannot be combined with {flag}: the packed samples would attend to each other "
                        "(long samples fill a batch without packing)")


def check_sequence_parallel_model(training_args, model_config):
    """The model's side of --sequence_parallel_size: no recurrent layers, and heads that N can split."""
    n = training_args.sequence_parallel_size
    if n == 1:
        return
    flag = f"--sequence_parallel_size {n}"
    text_config = model_config.get_text_config()
    if "linear_attention" in (getattr(text_config, "layer_types", None) or []):
        raise UserError(f"{flag}: this model's linear-attention (Gated DeltaNet) layers carry a state along the whole "
                        "sequence, which cannot be split over ranks the way attention heads are; train without "
                        "sequence parallelism (ZeRO-3 and activation checkpointing still apply)")
    heads, kv_heads = text_config.num_attention_heads, text_config.num_key_value_heads
    if heads % n or (kv_heads % n and n % kv_heads):
        raise UserError(f"{flag}: the model has {heads} attention heads and {kv_heads} key/value heads; N must "
                        f"divide the attention heads, and divide or be a multiple of the key/value heads")


def with_distributed_settings(training_args, lora_args, attn_implementation):
    """The Trainer's arguments with what the launch decides for DDP and DeepSpeed, in a copy (the parsed flags stay
    as given): DDP told that a LoRA run's frozen base has no gradients (by design), and sequence parallelism as the
    Trainer's parallelism_config."""
    n = training_args.sequence_parallel_size
    lora_ddp = lora_args.use_lora and training_args.ddp_find_unused_parameters is None
    if n == 1 and not lora_ddp:
        return training_args
    training_args = copy.copy(training_args)
    if lora_ddp:
        training_args.ddp_find_unused_parameters = False
    if n == 1:
        return training_args
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    training_args.parallelism_config = ParallelismConfig(  # DeepSpeed's batch size counts the dp_shard groups
        sp_backend="deepspeed", sp_size=n, dp_shard_size=training_args.world_size // n,
        sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True,
                                                   sp_attn_implementation=attn_implementation or DEFAULT_ATTENTION))
    log.info(f"sequence parallelism: every sequence split over {n} ranks, "
             f"{training_args.world_size // n} data-parallel group(s)")
    return training_args


# -- sequence parallelism in the Trainer

def sequence_parallel_loss_weight(training_args):
    """What one rank's summed loss is multiplied by (before dividing by the step's trained tokens) for the reduced
    gradient to be that of the step's token-weighted mean.

    Workaround (DeepSpeed 0.19): ZeRO-1/2 sum the gradients of a sequence group and average over the data-parallel
    groups (weight: their number), but ZeRO-3's reduce-scatter averages over every rank, ignoring the sequence
    groups (weight: the world size). The tests compare gradient norms with and without sequence parallelism under
    both, so a DeepSpeed that changes this fails them."""
    if uses_zero3():
        return training_args.world_size
    return training_args.world_size // training_args.sequence_parallel_size


@contextlib.contextmanager
def patched(module, name, value):
    """`module.name` is `value` within the context, and what it was after: for the labelled workarounds only."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


@contextlib.contextmanager
def resumable_sequence_parallel_loader():
    """Workaround (transformers 5.24, DeepSpeed 0.19): resuming mid-epoch, the Trainer hands DeepSpeed's Ulysses
    data loader adapter to accelerate's skip_first_batches, which only knows data loaders. Within this context it
    skips the batches under the adapter instead (without loading them) and re-wraps them. It can go when the
    Trainer skips before it wraps."""
    import accelerate
    import transformers.trainer as trainer_module
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    def skip_first_batches(loader, num_batches=0):
        if not isinstance(loader, UlyssesSPDataLoaderAdapter):
            return accelerate.skip_first_batches(loader, num_batches)
        # The adapter yields N slices of the ranks' batches per batch of the loader under it.
        whole, part = divmod(num_batches, loader.sp_world_size)
        skipped = UlyssesSPDataLoaderAdapter(accelerate.skip_first_batches(loader.dl, whole), loader.sp_rank,
                                             loader.sp_group, loader.sp_world_size, loader.device)
        for _ in range(part):
            next(skipped)
        return skipped

    with patched(trainer_module, "skip_first_batches", skip_first_batches):
        yield


def sequence_parallel_row_length(model_max_length):
    """None (each batch padded to its longest), or the one length every batch is padded to.

    Workaround (DeepSpeed 0.19, torch's gloo backend): Ulysses' data loader adapter all-gathers the batches of a
    sequence group, and gloo, unlike NCCL, refuses tensors of different lengths. On the CPU every batch is therefore
    padded to --model_max_length (the pads are masked and come after every real token). It can go when the
    adapter pads to a common length itself."""
    return model_max_length if torch.distributed.get_backend() == "gloo" else None


# -- agreeing across ranks

def in_process_group():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def agreed_by_all_ranks(decide, *args):
    """Rank 0 decides and every rank follows (nodes may not share a disk); a UserError is raised everywhere."""
    if not in_process_group():
        return decide(*args)
    outcome, failure = [None], None
    if is_main_process():
        try:
            outcome = [("ok", decide(*args))]
        except UserError as e:
            outcome = [("error", str(e))]
        except Exception as e:  # rank 0 raises it as it is; the others must not wait for an answer forever
            outcome, failure = [("failed", f"rank 0 failed: {type(e).__name__}: {first_line(e)}")], e
    torch.distributed.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise UserError(value)
    if kind == "failed":
        raise RunFailed(value)
    return value


def any_rank(flag, device):
    """True on every rank when `flag` is true on any (all ranks must call it together)."""
    return each_on_any_rank([flag], device)[0]


def each_on_any_rank(flags, device):
    """For each flag, whether it is true on any rank; one collective (all ranks must call it together)."""
    if not in_process_group():
        return [bool(flag) for flag in flags]
    tensor = torch.tensor([int(bool(flag)) for flag in flags], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def sum_over_ranks(values, device):
    """Each of `values` summed over every rank (all ranks must call it together); as they are without a group."""
    if not in_process_group():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


# -- ZeRO-3: parameters split over the ranks

def weights_are_finite(model, device):
    """Whether every trainable weight is finite, on every rank. ZeRO-3: a rank holds only its partition."""
    finite = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in model.parameters() if p.requires_grad)
    return not any_rank(not finite, device)


def full_numel(param):
    """A parameter's number of elements. ZeRO-3: its local tensor is empty; DeepSpeed keeps the full count."""
    return getattr(param, "ds_numel", param.numel())


def whole_weight(weight):
    """A context in which `weight` is whole on this rank. ZeRO-3: gathered from every rank (all must enter)."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight])


def gather_expert_blocks_whole(model):
    """ZeRO-3: each mixture-of-experts block becomes a leaf for DeepSpeed (set_z3_leaf_modules), so that all its
    weights are gathered when it starts, whichever experts this rank's tokens go to: ranks that route differently
    then never wait for each other's gathers, and DeepSpeed's prefetching does not follow a routing order."""
    from deepspeed.utils import set_z3_leaf_modules

    blocks = {type(module) for module in model.modules() if is_expert_block(module)}
    if blocks:
        set_z3_leaf_modules(model, sorted(blocks, key=lambda block: block.__name__))


@contextlib.contextmanager
def without_zero3_init():
    """Build a module as without DeepSpeed (a skeleton on the meta device, to check flags against): under ZeRO-3,
    transformers would partition and initialise it, which fails on the meta device.

    Workaround (transformers 5.24): it has no public switch for this; the flag is the weak reference to the
    DeepSpeed config that is_deepspeed_zero3_enabled reads. If it moves, the ZeRO-3 tests fail at start-up."""
    from transformers.integrations import deepspeed as hf_deepspeed

    with patched(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None):
        yield


def whole_until_its_gradient_is_in(weight):
    """ZeRO-3: keep `weight` gathered until autograd has added to it the gradient being returned for it, then
    partition it again. A module's own backward gathers its weights itself; the chunked loss reads lm_head's
    weight outside any module call, and an untied lm_head (Qwen2.5-7B, Qwen3-8B, Qwen3.5) is used by nothing
    else, so without this its whole-shaped gradient would meet a partitioned weight. (A tied one is gathered by
    the embeddings' backward, which must then release it itself.) Nothing without ZeRO-3."""
    if not hasattr(weight, "ds_id"):
        return
    import deepspeed

    gathered = deepspeed.zero.GatheredParameters([weight])
    gathered.__enter__()

    def release(param):
        handle.remove()
        gathered.__exit__(None, None, None)

    handle = weight.register_post_accumulate_grad_hook(release)


def gather_trainable_state_dict(model, keep):
    """The trainable parameters at full shape, on the CPU where `keep` is true (None elsewhere); every rank must
    call it.

    Under ZeRO-3 each parameter is spread over the ranks: they are gathered one at a time, so memory stays near
    the size of the adapter, never the size of the model."""
    import deepspeed

    state_dict = {} if keep else None
    for name, param in model.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param]):
                if state_dict is not None:
                    state_dict[name] = param.detach().cpu().clone()
    return state_dict


# ----------------------------------------------------------------------------------------------------------
# 3. Run folder: one run per output folder, checkpoints that can resume, what a checkpoint records
#    (data fingerprint, run shape), and where a run resumes
# ----------------------------------------------------------------------------------------------------------

def claim_output_dir(output_dir, model_path):
    """A folder this run can write, that is not the model it starts from, and that no other run is using."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file, not a folder")
    if os.path.isdir(model_path) and os.path.realpath(model_path) == os.path.realpath(output_dir):
        raise UserError(f"--output_dir {output_dir} is the model folder: the result would overwrite the model it "
                        "starts from; choose another folder")
    if problem := write_problem(output_dir):
        raise UserError(f"--output_dir {output_dir}: cannot write there ({problem})")
    lock_output_dir(output_dir)


def write_problem(folder):
    """Why this process cannot write files into `folder` (made if missing), or None: the one write probe, for the
    output folder and the tokenized cache."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or str(e)


OUTPUT_LOCK = ".finetune.lock"
WAIT_REPORT_SECONDS = 300  # how often a process that waits for another one says so again
_held_lock = None  # the open lock file: the kernel releases it when this process ends, however it ends


def lock_output_dir(output_dir):
    """One run per output folder: the second stops and names the first; a lock left by a dead run is taken over.
    The lock file is never removed, so that every run locks the same file."""
    global _held_lock
    path = os.path.join(output_dir, OUTPUT_LOCK)
    try:
        _held_lock = acquire_lock(path)
    except BlockingIOError as e:
        raise UserError(f"--output_dir {output_dir} is in use by another run ({e.args[0] or 'holder unknown'}); wait "
                        "for it to end or choose another folder") from None
    except OSError as e:  # a file system without locks (some network and FUSE mounts)
        log.warning(f"--output_dir {output_dir}: cannot lock it ({e.strerror}); make sure no other run uses it")


def release_output_dir():
    global _held_lock
    if _held_lock is not None:
        _held_lock.truncate(0)  # released, not abandoned
        _held_lock.close()
        _held_lock = None


def acquire_lock(path, waiting=None):
    """An exclusive lock on the file `path` (created if missing), held until the returned file is closed; it says
    who holds it (pid, host, since). Held by another process: BlockingIOError naming the holder, or with `waiting`
    (what the holder does) wait for it, saying so now and every few minutes. The file locked is checked to be the
    one at `path` still, so that a holder removing it on release can never leave two processes holding "it"."""
    said = 0.0
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            if waiting is None:
                raise BlockingIOError(holder) from None
            if time.perf_counter() - said > WAIT_REPORT_SECONDS:
                said = time.perf_counter()
                log.info(f"waiting for another job ({holder or 'holder unknown'}) that is {waiting}")
            time.sleep(0.5)
            continue
        except OSError:
            lock.close()
            raise
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                lock.seek(0)
                if previous := lock.read().strip():
                    log.info(f"{path}: taking over the lock of a process that ended without releasing it ({previous})")
                lock.truncate(0)
                lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
                lock.flush()
                return lock
        lock.close()  # removed or replaced meanwhile: lock the file that is there now


def lock_holder(path):
    """Who holds the lock file `path` (pid, host, since), as its holder wrote it; None if nobody says."""
    with contextlib.suppress(OSError):
        with open(path) as f:
            return f.read().strip() or None
    return None


@contextlib.contextmanager
def locked_file(path, waiting):
    """acquire_lock as a context, removing the file when done (acquire_lock's check makes that safe); on a file
    system without locks, carry on unlocked (a second builder's result is as good as ours)."""
    try:
        lock = acquire_lock(path, waiting)
    except BlockingIOError:
        raise
    except OSError:
        lock = open(path, "a+")
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        lock.close()


def checkpoint_folder(output_dir, step):
    """Where the Trainer writes the checkpoint of `step`: its own name for it, checkpoint-N."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def checkpoint_steps(output_dir):
    """The steps of the checkpoint-N folders in output_dir, newest first ([] without the folder)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted((int(match[1]) for name in names if (match := re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name))),
                  reverse=True)


def newest_complete_checkpoint(output_dir):
    """The newest checkpoint-N in output_dir that can resume training, or None; says why it skips newer ones."""
    for step in checkpoint_steps(output_dir):
        folder = checkpoint_folder(output_dir, step)
        problem = checkpoint_problem(folder, step)
        if problem is None:
            return folder
        log.warning(f"skipping {folder}: {problem}")
    return None


def checkpoint_problem(folder, step=None):
    """Why this checkpoint cannot resume training, or None, judged on its content: a trainer_state.json that names
    its step (the Trainer writes it last, so a save cut short lacks it), weights and optimizer state present, and
    every weights and torch file complete (safetensors headers against file sizes, torch archives readable)."""
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            state = json.load(f)
    except OSError:
        return "it has no trainer_state.json (its save did not finish)"
    except ValueError:
        return "its trainer_state.json is not valid JSON"
    if not isinstance(state, dict) or (step is not None and state.get("global_step") != step):
        return f"its trainer_state.json does not name step {step}"
    names = set(os.listdir(folder))
    deepspeed_states = [name for name in names if name.startswith("global_step")]
    if not deepspeed_states and not holds_weights(names):
        return "it holds no model or adapter weights"
    if "optimizer.pt" not in names and not deepspeed_states:
        return "it holds no optimizer state (saved with --save_only_model?)"
    return weights_problem(folder, [os.path.join(d, name) for d in deepspeed_states
                                    if os.path.isdir(os.path.join(folder, d))
                                    for name in sorted(os.listdir(os.path.join(folder, d)))])


def holds_weights(names):
    """Whether a folder's file names include model or adapter weights (training_args.bin is the Trainer's flags)."""
    return any(name.endswith((".safetensors", ".bin")) and name != "training_args.bin" for name in names)


def weights_problem(folder, more_files=()):
    """The first thing wrong with a folder's weights (a model's or a checkpoint's), or None: a shard that an index
    lists and the folder lacks, or a weights or torch file cut short (`more_files`: paths under `folder` too)."""
    names = set(os.listdir(folder))
    for index in sorted(name for name in names if name.endswith(".index.json")):
        with open(os.path.join(folder, index)) as f:
            missing = sorted(set(json.load(f).get("weight_map", {}).values()) - names)
        if missing:
            return f"{missing[0]} (listed in {index}) is missing"
    for name in [*sorted(names), *more_files]:
        if problem := weights_file_problem(os.path.join(folder, name)):
            return f"{name} {problem}"
    return None


def weights_file_problem(path):
    """Why a .safetensors or torch file (.pt, .pth, .bin) is not complete, or None; reads headers, never tensors."""
    if path.endswith(".safetensors"):
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                if header_size > size - 8:
                    return "is truncated"
                header = json.loads(f.read(header_size))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "has a broken header"
        return None if 8 + header_size + end == size else f"is truncated ({size:,} of {8 + header_size + end:,} bytes)"
    if path.endswith((".pt", ".pth", ".bin")):
        try:
            with zipfile.ZipFile(path) as archive:  # torch.save writes a zip archive; its directory comes last
                members = archive.infolist()
        except (zipfile.BadZipFile, OSError):
            return "is truncated or corrupt"
        if any(m.header_offset + m.compress_size > os.path.getsize(path) for m in members):
            return "is truncated"
    return None


def check_checkpoint_fits(folder, model_args, lora_args):
    """A checkpoint trained with other LoRA flags or another model cannot be resumed: say which flag differs."""
    afresh = "or start afresh with --overwrite_output_dir true"
    adapter_config = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(adapter_config):
        if lora_args.use_lora:
            raise UserError(f"{folder} holds a full fine-tune, but this run trains a LoRA adapter (--use_lora); "
                            f"drop --use_lora to resume it, {afresh}")
        return
    if not lora_args.use_lora:
        raise UserError(f"{folder} holds a LoRA adapter, but this run fine-tunes every weight; add --use_lora true "
                        f"to resume it, {afresh}")
    try:
        with open(adapter_config) as f:
            config = json.load(f)
    except ValueError:
        raise UserError(f"{adapter_config} is not valid JSON; {afresh[3:]}") from None
    config["modules_to_save"] = sorted(config.get("modules_to_save") or [])
    flags = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_bias": "bias", "lora_modules_to_save": "modules_to_save"}
    if not lora_args.lora_weight_path:
        for flag, key in flags.items():
            value = getattr(lora_args, flag)
            value = sorted(value) if isinstance(value, list) else value
            if key in config and config[key] != value:
                raise UserError(f"{folder} was trained with --{flag} {config[key]}, this run asks for "
                                f"--{flag} {value}; use the same value to resume it, {afresh}")
    base = config.get("base_model_name_or_path")
    if base and not same_model(base, model_args.model_name_or_path):
        raise UserError(f"{folder} adapts {base}, but this run's --model_name_or_path is "
                        f"{model_args.model_name_or_path}; use that model to resume it, {afresh}")


def same_model(a, b):
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


def recorded_fingerprint(folder):
    return recorded_run_facts(folder).get("fingerprint")


def recorded_run_facts(folder):
    """What RecordTrainingData wrote into a checkpoint ({} for one written by an older release)."""
    return recorded_callback_state(folder, RecordTrainingData.__name__).get("args", {}) or {}


def recorded_callback_state(folder, name):
    """The state a checkpoint's trainer_state.json keeps for the callback class `name` ({} without one): the one
    place that reads the Trainer's stateful_callbacks (a list where several callbacks of the class were saved)."""
    with open(os.path.join(folder, "trainer_state.json")) as f:
        recorded = json.load(f).get("stateful_callbacks", {}).get(name) or {}
    if isinstance(recorded, list):
        recorded = recorded[-1] if recorded else {}
    return recorded


def run_shape(training_args):
    """How a run makes its global batch (the samples of one optimizer step): per device x accumulation x
    data-parallel processes (a sequence-parallel group of processes counts as one)."""
    data_parallel = training_args.world_size // training_args.sequence_parallel_size
    return {"processes": training_args.world_size, "data_parallel": data_parallel,
            "per_device": training_args.per_device_train_batch_size,
            "accumulation": training_args.gradient_accumulation_steps,
            "global_batch": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * data_parallel, "zero_stage": deepspeed_zero_stage(training_args), "optimizer": optimizer_name(training_args)}


def optimizer_name(training_args):
    """The optimizer a run trains with: --optim, or the `optimizer` block of a DeepSpeed config (which wins)."""
    block = (deepspeed_config(training_args) or {}).get("optimizer")
    if isinstance(block, dict):
        return f"deepspeed:{block.get('type', '?')}"
    return str(getattr(training_args.optim, "value", training_args.optim))


# The optimizers whose DeepSpeed state ds_to_universal converts (it reads Adam's exp_avg and exp_avg_sq; DeepSpeed
# 0.19): a checkpoint of any other cannot be resumed on another number of processes.
UNIVERSAL_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused",
                        "deepspeed:Adam", "deepspeed:AdamW", "deepspeed:adam", "deepspeed:adamw")


def fit_run_to_checkpoint(training_args, checkpoint):
    """The training arguments that resume `checkpoint` as it was trained, on however many processes this run has.

    The global batch (what the learning rate was tuned for) is kept: on another number of processes, or with
    another --per_device_train_batch_size, gradient accumulation is set so that a step holds the same samples;
    the Trainer's sampler orders samples independently of the processes, so step k+1 then trains exactly the
    samples it would have. A DeepSpeed checkpoint of another number of processes (its optimizer state is split
    per process) is converted into DeepSpeed's universal format and loaded from it. Returns `training_args` itself
    when nothing changes, else a copy: the parsed arguments stay as the user gave them."""
    recorded = recorded_run_facts(checkpoint).get("shape")
    now = run_shape(training_args)
    if not recorded or (recorded["global_batch"], recorded["processes"]) == (now["global_batch"], now["processes"]):
        return training_args
    per_pass = now["per_device"] * now["data_parallel"]
    accumulation, rest = divmod(recorded["global_batch"], per_pass)
    if rest or not accumulation:
        raise UserError(no_accumulation_fits(checkpoint, recorded, now))
    universal = recorded["processes"] != now["processes"] and now["zero_stage"] is not None
    if universal and recorded["zero_stage"] != now["zero_stage"]:
        raise UserError(f"{checkpoint} was written by DeepSpeed ZeRO-{recorded['zero_stage']}; resume it with the "
                        "same --deepspeed config")
    optimizer = recorded.get("optimizer") or now["optimizer"]  # older checkpoints do not record it
    if universal and optimizer not in UNIVERSAL_OPTIMIZERS:
        raise UserError(f"{checkpoint} was written by DeepSpeed on {recorded['processes']} processes with the "
                        f"optimizer {optimizer.removeprefix('deepspeed:')}, whose state DeepSpeed cannot convert for "
                        f"{now['processes']} (its universal checkpoints hold Adam's only: --optim "
                        f"{' or '.join(o for o in UNIVERSAL_OPTIMIZERS[:2])}); resume it on {recorded['processes']} "
                        "processes, or start afresh with --overwrite_output_dir true")
    if universal:
        agreed_by_all_ranks(make_universal_checkpoint, checkpoint)
    log.info(f"resuming {checkpoint} ({recorded['processes']} processes, {recorded['per_device']} per device x "
             f"{recorded['accumulation']} accumulation) on {now['processes']} processes, {now['per_device']} per "
             f"device: gradient accumulation {accumulation} keeps its global batch of {recorded['global_batch']}")
    return with_accumulation(training_args, accumulation, universal)


def no_accumulation_fits(checkpoint, recorded, now):
    """One line: why the global batch cannot be kept, and values that would keep it."""
    global_batch, sequence = recorded["global_batch"], now["processes"] // now["data_parallel"]
    sizes = [b for b in range(1, global_batch + 1) if global_batch % (b * now["data_parallel"]) == 0]
    processes = [d * sequence for d in range(1, global_batch // now["per_device"] + 1)
                 if global_batch % (now["per_device"] * d) == 0]
    ways = [f"--per_device_train_batch_size {' or '.join(map(str, sizes[:6]))} here"] if sizes else []
    if processes:
        ways.append(f"{' or '.join(map(str, processes[:6]))} processes"
                    + (f" with --per_device_train_batch_size {now['per_device']}" if not sizes else ""))
    return (f"{checkpoint} was trained with a global batch of {global_batch} samples a step ({recorded['per_device']} "
            f"per device x {recorded['accumulation']} accumulation x {recorded['data_parallel']} data-parallel "
            f"processes); {now['per_device']} per device on {now['data_parallel']} cannot make {global_batch} with "
            f"any accumulation{'' if sizes else ', nor can any other per-device batch size'}: use "
            f"{', or '.join(ways) or f'a number of data-parallel processes that divides {global_batch}'}")


def with_accumulation(training_args, accumulation, universal):
    """A copy of the arguments with another gradient accumulation, and for DeepSpeed a config made again from the
    user's file for it (the Trainer does the same when it changes its batch size), loading a universal checkpoint
    if `universal`."""
    adjusted = copy.copy(training_args)
    adjusted.gradient_accumulation_steps = accumulation
    if adjusted.deepspeed:
        from accelerate.utils import DeepSpeedPlugin
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        config = adjusted.deepspeed
        if not isinstance(config, dict):
            with open(config) as f:
                config = json.load(f)
        config = copy.deepcopy(config)
        if universal:
            config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
        adjusted.hf_deepspeed_config = HfTrainerDeepSpeedConfig(config)
        adjusted.hf_deepspeed_config.trainer_config_process(adjusted)
        adjusted.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=adjusted.hf_deepspeed_config)
    return adjusted


def make_universal_checkpoint(checkpoint):
    """DeepSpeed's universal form of a checkpoint's ZeRO state (every parameter's weights and optimizer state
    whole, loadable by any number of processes), made once with DeepSpeed's own ds_to_universal beside the
    original and named in `latest_universal`, which DeepSpeed reads when its config says load_universal."""
    from deepspeed.checkpoint import ds_to_universal

    with open(os.path.join(checkpoint, "latest")) as f:
        tag = f.read().strip()
    universal = os.path.join(checkpoint, f"{tag}_universal")
    if not os.path.isdir(universal):
        log.info(f"{checkpoint}: converting its DeepSpeed state to the universal format for another number of "
                 "processes (once)")
        building = universal + ".building"
        shutil.rmtree(building, ignore_errors=True)
        args = argparse.Namespace(input_folder=os.path.join(checkpoint, tag), output_folder=building,
                                  num_extract_workers=min(4, os.cpu_count() or 1), num_merge_workers=2,
                                  keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress report, in print()s
            ds_to_universal.main(args)
        os.rename(building, universal)
    with open(os.path.join(checkpoint, "latest_universal"), "w") as f:
        f.write(os.path.basename(universal))


def resolve_resume_checkpoint(training_args, model_args=None, lora_args=None, fingerprint=None):
    """(checkpoint to resume from, checkpoint to take only the weights from): where training starts.

    By default, the newest complete checkpoint in output_dir, so that repeating the command of an interrupted run
    continues it; --resume_from_checkpoint takes a folder, true (a checkpoint must exist) or false;
    --overwrite_output_dir starts afresh. A checkpoint trained on other data is refused, or with
    --resume_on_new_data only its weights are taken."""
    value = (training_args.resume_from_checkpoint or "").strip()
    explicit = value.lower() not in ("", "true", "yes", "1", "false", "no", "0")
    if explicit and training_args.overwrite_output_dir:
        raise UserError("--resume_from_checkpoint FOLDER and --overwrite_output_dir contradict each other; keep one")
    if value.lower() in ("false", "no", "0") or training_args.overwrite_output_dir:
        return None, None
    if explicit:
        if not os.path.isdir(value):
            raise UserError(f"--resume_from_checkpoint {value}: no such folder")
        if problem := checkpoint_problem(value):
            raise UserError(f"--resume_from_checkpoint {value}: cannot resume from it: {problem}")
        checkpoint = value
    else:
        checkpoint = newest_complete_checkpoint(training_args.output_dir)
        if checkpoint is None:
            if value:
                raise UserError(f"--resume_from_checkpoint true: no complete checkpoint-* folder in --output_dir "
                                f"{training_args.output_dir}")
            return None, None
    if model_args is not None:
        check_checkpoint_fits(checkpoint, model_args, lora_args)
    recorded = recorded_fingerprint(checkpoint)
    if recorded is None and fingerprint is not None:
        log.warning(f"{checkpoint} does not record what data it was trained on (an older release wrote it); "
                    "resuming on the data given now")
    if fingerprint is None or recorded is None or recorded == fingerprint:
        return checkpoint, None
    if training_args.resume_on_new_data:
        return None, set_aside_checkpoints(training_args.output_dir, checkpoint, recorded)
    raise UserError(f"{checkpoint} was trained on other data than --data_path now holds, or with other "
                    "--model_max_length, --template, --system_message, --chat_template_kwargs, --mask_history, "
                    f"--val_size or mix (content hash {recorded[:12]} then, {fingerprint[:12]} now); start afresh "
                    "with --overwrite_output_dir true, "
                    "or continue from its weights on the new data with --resume_on_new_data true")


def set_aside_checkpoints(output_dir, checkpoint, recorded):
    """--resume_on_new_data: the old data's checkpoints move to previous-data-HASH/, so that checkpoint rotation
    and later resumes see only the new run's; returns where `checkpoint` went."""
    aside = os.path.join(output_dir, f"previous-data-{recorded[:12]}")
    os.makedirs(aside, exist_ok=True)
    for step in checkpoint_steps(output_dir):
        shutil.move(checkpoint_folder(output_dir, step), checkpoint_folder(aside, step))
    log.info(f"moved the checkpoints trained on the earlier data to {aside}")
    return os.path.join(aside, os.path.basename(checkpoint))


# ----------------------------------------------------------------------------------------------------------
# 4. Data: sources resolved once -> read -> check -> render (chat template or ChatML) -> tokenize -> labels ->
#    datasets (one protocol: TrainingData) -> collator
# ----------------------------------------------------------------------------------------------------------

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."  # ChatML's system turn for samples without one
ASSISTANT_HEADER, TURN_END = "<|im_start|>assistant\n", "<|im_end|>"
EMPTY_THINKING = re.compile(r"<think>\s*</think>\n*")  # what the Qwen3 template writes for "no reasoning"
# What each role name of either format becomes: ShareGPT's function_call is an assistant turn that calls tools,
# its observation (like OpenAI's older function role) is a tool result.
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
              "tool": "tool", "function": "tool", "observation": "tool", "function_call": "assistant"}


@dataclass
class Conversation:
    system: Optional[str]  # None: the sample brings no system message (--system_message applies)
    # OpenAI-style messages: {"role", "content"} and, on assistant messages, "reasoning_content" / "tool_calls"
    messages: list
    tools: Optional[list] = None  # function definitions, as {"type": "function", "function": {...}}
    where: str = ""  # file and line or sample, for messages about it

    def has_empty_assistant_message(self):
        """An assistant message with nothing in it: only its <|im_end|> is trained (worth a notice, not an error)."""
        return any(m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls")
                   and not m.get("reasoning_content") for m in self.messages)

    def tool_or_reasoning_feature(self):
        """Name of the first feature plain ChatML cannot render, or None."""
        if self.tools:
            return "'tools'"
        for message in self.messages:
            if message["role"] == "tool":
                return "a tool message"
            if message.get("tool_calls"):
                return "tool calls"
            if message.get("reasoning_content"):
                return "'reasoning_content'"
        return None


HUB_PREFIX = "hf://"  # marks a source part that is a Hugging Face dataset id, not a file
FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
DATASET_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")  # org/name, or org/name:split


@dataclass
class Source:
    """One --data_path (or --eval_data_path) entry: its files (or dataset id), and how many samples to take."""

    spec: str  # as given, e.g. "chat.jsonl#20000"
    parts: list  # file paths, or one HUB_PREFIX + dataset id
    take: Optional[float] = None  # None: every sample; an int: that many; a float: that fraction
    mapping: Optional[dict] = None  # a LLaMA-Factory entry's formatting, columns and tags (from_llama_factory)
    flag: str = "--data_path"  # the flag it came from, for messages
    kinds: list = field(default_factory=list)  # each part's format (detect_format's), filled by resolve_sources

    @property
    def where(self):
        """How messages name it: the flag and the entry as given."""
        return f"{self.flag} {self.spec}"

    @property
    def matched_files(self):
        """How many files a glob pattern or folder stood for (None for a file or a dataset id)."""
        location = self.spec.rpartition("#")[0] if self.take is not None else self.spec
        pattern_or_folder = any(c in location for c in "*?[") or os.path.isdir(os.path.expanduser(location))
        return len(self.parts) if pattern_or_folder else None


def resolve_sources(specs, flag="--data_path"):
    """--data_path (or --eval_data_path) resolved once, for the whole run: every pattern, folder and
    dataset_info.json entry expanded to its files, and each file's format detected (a missing, empty or unreadable
    file is its own one-line error here). Rank 0 resolves and every rank uses the result (agreed_by_all_ranks), so
    the resume fingerprint and the datasets read the same files in the same order."""
    sources = parse_sources(split_names(specs), flag)
    for source in sources:
        source.kinds = [detect_format(part) for part in source.parts]
    return sources


def parse_sources(specs, flag="--data_path"):
    """--data_path entries as Sources: files, folders (every .json, .jsonl and .parquet inside, in name order), glob
    patterns, dataset ids, LLaMA-Factory dataset_info.json entries (PATH:NAME); each with an optional #count or
    #fraction."""
    sources = []
    for spec in specs:
        location, take, where = spec, None, f"{flag} {spec}"
        head, _, amount = spec.rpartition("#")
        if head and re.fullmatch(r"\d+|\d*\.\d+|\d+\.", amount):
            location, take = head, float(amount) if "." in amount else int(amount)
            check_amount(where, take)
        location = os.path.expanduser(location)
        if entry := llama_factory_location(location):
            parts, mapping, entry_take = llama_factory_source(*entry, where)
            if take is None and entry_take is not None:
                check_amount(f"{where} (its num_samples)", entry_take)
            sources.append(Source(spec, parts, take if take is not None else entry_take, mapping, flag))
        else:
            sources.append(Source(spec, source_parts(location), take, flag=flag))
    return sources


# What one taken sample costs in index arrays (the mix's, the sampler's, the Trainer's): bounds a #count.
INDEX_BYTES_PER_SAMPLE = 48


def check_amount(where, take):
    """A #count or #fraction that can be taken: positive, and a count whose indices alone fit in the memory this
    process may use (a typo of a few zeros would otherwise allocate it all); a fraction is bounded once the number
    of samples it multiplies is known."""
    if take <= 0:
        raise UserError(f"{where}: the amount after '#' must be positive")
    if isinstance(take, int):
        check_sample_count(where, take)


def check_sample_count(where, count):
    memory = usable_memory()
    if count * INDEX_BYTES_PER_SAMPLE > memory // 2:
        raise UserError(f"{where}: {count:,} samples would need {count * INDEX_BYTES_PER_SAMPLE / 2 ** 30:,.0f} GiB "
                        f"for their indices alone, more than half of the {memory / 2 ** 30:.0f} GiB this job may use")


def usable_memory():
    """Bytes of memory this process may use: the machine's, or less where a cgroup (a scheduler's job) limits it."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                limits.append(int(f.read().strip()))  # "max" (no limit) is not a number
    return min(limits)


def source_parts(location):
    if not os.path.exists(location) and any(char in location for char in "*?["):  # a file may be named run[1].jsonl
        files = files_matching(location)
        if not files:
            raise DataError(f"{location}: matches no file")
        return files
    if os.path.isdir(location):
        files = each_file_once(os.path.join(location, name) for name in sorted(os.listdir(location))
                               if name.endswith(FILE_SUFFIXES))
        if not files:
            raise DataError(f"{location}: a folder without .json, .jsonl or .parquet files")
        return files
    if not os.path.exists(location) and DATASET_ID.fullmatch(location) and not location.endswith(FILE_SUFFIXES):
        return [HUB_PREFIX + location]
    return [location]  # a file; a missing one is reported when it is read


def files_matching(pattern):
    """The files a glob pattern matches, in name order, each file once however many names it has (links, hard
    links). `**` (any number of folders) follows linked folders but enters each real folder once, so a link to a
    parent folder cannot make it loop (glob's own read one file 41 times). Hidden files and folders are left out,
    as the shell and glob do."""
    parts = pattern.split(os.sep)
    first_magic = next(i for i, part in enumerate(parts) if any(char in part for char in "*?["))
    if "**" not in parts[first_magic:]:
        return each_file_once(sorted(glob.glob(pattern)))
    base = os.sep.join(parts[:first_magic]) or (os.sep if pattern.startswith(os.sep) else os.curdir)
    wanted = parts[first_magic:] + (["*"] if parts[-1] == "**" else [])  # "data/**": every file below data
    matches, seen_folders = [], set()
    for folder, folders, names in os.walk(base, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen_folders:
            folders.clear()  # entered already, through another name
            continue
        seen_folders.add((stat.st_dev, stat.st_ino))
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        relative = os.path.relpath(folder, base).split(os.sep) if folder != base else []
        matches += [os.path.join(folder, name) for name in names
                    if not name.startswith(".") and path_matches(wanted, relative + [name])]
    return each_file_once(sorted(matches))


def path_matches(pattern_parts, path_parts):
    """Whether a path's parts match a pattern's, where a `**` part stands for any number of parts."""
    if not pattern_parts:
        return not path_parts
    if pattern_parts[0] == "**":
        return any(path_matches(pattern_parts[1:], path_parts[i:]) for i in range(len(path_parts) + 1))
    return bool(path_parts) and fnmatch.fnmatchcase(path_parts[0], pattern_parts[0]) and \
        path_matches(pattern_parts[1:], path_parts[1:])


def each_file_once(paths):
    """The files among `paths`, the first name of each (a link or hard link to one already there is left out)."""
    files, seen = [], set()
    for path in paths:
        if os.path.isfile(path) and (key := (os.stat(path).st_dev, os.stat(path).st_ino)) not in seen:
            seen.add(key)
            files.append(path)
    return files


LLAMA_FACTORY_INFO = "dataset_info.json"
# LLaMA-Factory's columns and tags when its dataset_info.json entry names none (an entry that names some leaves
# the others unset, as LLaMA-Factory reads it).
LLAMA_FACTORY_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None,
               "tools": None},
    "sharegpt": {"messages": "conversations", "system": None, "tools": None},
}
LLAMA_FACTORY_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                      "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# What each tag's role is among the roles parse_message knows.
LLAMA_FACTORY_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "observation",
                       "function_tag": "function_call", "system_tag": "system"}


def llama_factory_location(location):
    """(its dataset_info.json, the dataset's name) for PATH:NAME, PATH a LLaMA-Factory dataset_info.json or a folder
    holding one; else None."""
    head, colon, name = location.rpartition(":")
    if not colon or not head or not name:
        return None
    info = os.path.join(head, LLAMA_FACTORY_INFO) if os.path.isdir(head) else head
    return (info, name) if os.path.isfile(info) and info.endswith(".json") else None


def llama_factory_source(info_path, name, where):
    """(parts, sample mapping, #N) of a LLaMA-Factory dataset_info.json entry, read as LLaMA-Factory reads it: its
    file_name (or folder) beside the dataset_info.json, or its hf_hub_url from the local datasets cache; its
    formatting (alpaca or sharegpt), columns and tags; its num_samples. What cannot be honoured here is one line."""
    try:
        with open(info_path, encoding="utf-8-sig") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: cannot read {info_path} ({first_line(e)})") from None
    entry = info.get(name) if isinstance(info, dict) else None
    if not isinstance(entry, dict):
        known = ", ".join(sorted(info)[:8]) if isinstance(info, dict) else "nothing"
        raise UserError(f"{where}: {info_path} has no dataset '{name}' (it has {known}...)")
    if problem := llama_factory_problem(entry):
        raise UserError(f"{where}: the entry '{name}' {problem}")
    formatting = entry.get("formatting", "alpaca")
    columns = dict(LLAMA_FACTORY_COLUMNS[formatting])
    if isinstance(entry.get("columns"), dict):
        columns = {column: entry["columns"].get(column) for column in columns}
    tags = dict(LLAMA_FACTORY_TAGS)
    if formatting == "sharegpt" and isinstance(entry.get("tags"), dict):
        tags = {tag: entry["tags"].get(tag) for tag in tags}
    if "hf_hub_url" in entry:
        split = entry.get("split", "train")
        parts = [HUB_PREFIX + entry["hf_hub_url"] + (f":{split}" if split != "train" else "")]
    else:
        parts = source_parts(os.path.join(os.path.dirname(info_path), entry["file_name"]))
    return parts, {"formatting": formatting, "columns": columns, "tags": tags}, entry.get("num_samples")


# The values of a dataset_info.json entry that are read here, and what each must be.
LLAMA_FACTORY_TEXT_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "script_url", "formatting", "split", "subset",
                           "folder")


def llama_factory_value_problem(entry):
    """What is wrong with the values of a dataset_info.json entry (types LLaMA-Factory's own loader assumes), or None."""
    for key in LLAMA_FACTORY_TEXT_KEYS:
        if key in entry and not isinstance(entry[key], str):
            return f"has {key} {json.dumps(entry[key])}, which must be text"
    for key in ("columns", "tags"):
        value = entry.get(key)
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(name, str) or name is None for name in value.values())):
            return f"has {key} {json.dumps(value)[:80]}, which must map names to column names (text)"
    if "ranking" in entry and not isinstance(entry["ranking"], bool):
        return f"has ranking {json.dumps(entry['ranking'])}, which must be true or false"
    count = entry.get("num_samples")
    if count is not None and (type(count) is not int or count < 1):
        return f"has num_samples {json.dumps(count)}, which must be a positive whole number"
    return None


def llama_factory_problem(entry):
    """Why a dataset_info.json entry cannot be trained here as LLaMA-Factory would, or None."""
    if problem := llama_factory_value_problem(entry):
        return problem
    columns = entry.get("columns") or {}
    if entry.get("ranking") or any(columns.get(key) for key in ("chosen", "rejected", "kto_tag")):
        return "is preference data (chosen and rejected answers), which supervised fine-tuning does not train"
    if media := [key for key in ("images", "videos", "audios") if columns.get(key)]:
        return f"has {' and '.join(media)}: this script fine-tunes on text only"
    if entry.get("formatting", "alpaca") not in LLAMA_FACTORY_COLUMNS:
        return f"has formatting '{entry['formatting']}'; alpaca and sharegpt are read"
    if entry.get("formatting", "alpaca") == "alpaca" and "columns" in entry and not columns.get("response"):
        return ("is pretraining data (its columns name no 'response', the replies supervised fine-tuning trains); "
                "name the entry's response column, or train it with a pretraining tool")
    if entry.get("formatting") == "sharegpt" and "columns" in entry and not columns.get("messages"):
        return "names no 'messages' column (where its conversations are); name it in the entry's columns"
    if "hf_hub_url" not in entry and "file_name" not in entry:
        where = ("ModelScope (ms_hub_url)" if "ms_hub_url" in entry else "a loading script (script_url)"
                 if "script_url" in entry else "nowhere")
        return f"comes from {where}, which cannot be reached here; download it and give its file_name"
    if "hf_hub_url" in entry and (entry.get("subset") or entry.get("folder")):
        return "names a subset or folder of a hub dataset, which is not read here; download it and give its file_name"
    return None


def from_llama_factory(sample, mapping, where):
    """A sample of a LLaMA-Factory entry as the sample it stands for in our formats, through the entry's columns and
    tags; fields the entry does not name are left out, as LLaMA-Factory leaves them."""
    if not isinstance(sample, dict):
        return sample  # parse_sample says what is wrong with it
    check_no_media(sample, where)  # before the entry's columns would leave its media fields out unseen
    columns, tags = mapping["columns"], mapping["tags"]

    def column(key):
        return sample.get(columns[key]) if columns.get(key) else None

    if mapping["formatting"] == "alpaca":
        if column("response") is None:
            raise DataError(f"{where}: has no '{columns['response']}' (the entry's response column)")
        converted = {"instruction": column("prompt") or "", "input": column("query") or "",
                     "output": column("response")}
        if column("history") is not None:
            converted["history"] = column("history")
    else:
        turns = column("messages")
        if not isinstance(turns, list):
            raise DataError(f"{where}: its '{columns['messages']}' (the entry's messages column) is not a list")
        roles = {tags[tag]: role for tag, role in LLAMA_FACTORY_ROLES.items() if tags.get(tag)}
        role_tag, content_tag = tags["role_tag"], tags["content_tag"]
        converted_turns = []
        for i, turn in enumerate(turns):
            if isinstance(turn, dict):
                if turn.get(role_tag) not in roles:
                    raise DataError(f"{where}: message {i} has {role_tag} {turn.get(role_tag)!r}, none of the "
                                    f"entry's tags ({', '.join(map(str, roles))})")
                rest = {key: value for key, value in turn.items() if key not in (role_tag, content_tag)}
                turn = {**rest, "from": roles[turn[role_tag]], "value": turn.get(content_tag)}
            converted_turns.append(turn)
        converted = {"conversations": converted_turns}
    for key in ("system", "tools"):
        leading_system = key == "system" and converted.get("conversations") and \
            isinstance(converted["conversations"][0], dict) and converted["conversations"][0]["from"] == "system"
        if column(key) is not None and not leading_system:  # a leading system message wins, as in LLaMA-Factory
            converted[key] = column(key)
    return converted


def detect_format(path):
    """'hub' (a dataset id), 'parquet' (by suffix), 'json' for a file whose first non-blank character opens an
    array, else 'jsonl'; for JSON the suffix does not matter."""
    if path.startswith(HUB_PREFIX):
        return "hub"
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file")
    if path.endswith(".parquet"):
        return "parquet"
    with open(path, "rb") as f:
        for line in f:
            text = line.removeprefix(b"\xef\xbb\xbf").strip()  # a UTF-8 byte-order mark opens some files
            if text:
                return "json" if text.startswith(b"[") else "jsonl"
    raise DataError(f"{path}: the file is empty (no samples)")


def data_fingerprint(paths, fresh=False):
    """A content hash of data files (or dataset ids): their bytes, in order (not names or dates). A checkpoint
    records it, so that a resume on changed data is noticed; the tokenized cache names its entries by it. `fresh`:
    read the bytes again rather than take this process's memo of them."""
    digest = hashlib.sha256()
    hash_file = file_digest.__wrapped__ if fresh else file_digest
    for path in map(os.fspath, paths):
        # A dataset id: the bytes of the files the datasets library keeps it in.
        files = [f["filename"] for f in load_hub_dataset(path).cache_files] if path.startswith(HUB_PREFIX) else [path]
        for file in files:
            stat = os.stat(file)
            digest.update(hash_file(file, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def file_digest(path, size, mtime_ns, ctime_ns, inode):
    """One file's content hash, read once per process (resume and the cache key both want it); the file's size,
    dates and inode only tell whether this process has read this version already (a write changes its ctime,
    whatever is done to its mtime)."""
    digest = hashlib.sha256(f"{size}:".encode())  # where one file ends and the next begins
    progress = Progress(f"reading {path}", total=-(-size >> 20), unit="MB",
                        show=size > HASH_PROGRESS_BYTES and is_local_main_process())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            progress.update(progress.done + 1)
    progress.close()
    return digest.hexdigest()


HASH_PROGRESS_BYTES = 1 << 30  # files this large show the progress of their hashing (a few seconds a GB)


def sources_fingerprint(sources, data_args, training_args):
    """What a run trains on: the content of every resolved source in order, what is taken from each (by --seed),
    and the flags that decide which samples are kept and how they are cut (a resume skips batches by position)."""
    takes = [source.take for source in sources]
    selection = json.dumps([takes, training_args.seed if any(take is not None for take in takes) or
                            data_args.val_size else None, data_args.val_size, data_args.template,
                            data_args.system_message, data_args.chat_template_kwargs, data_args.mask_history,
                            [source.mapping for source in sources], training_args.model_max_length])
    return hashlib.sha256((data_fingerprint([p for s in sources for p in s.parts]) + selection).encode()).hexdigest()


def iter_raw_samples(path, kind, start=0, end=None, first_line_number=1):
    """Yield (where, sample, offset) for every sample of a file of format `kind` (detect_format's); `where` names
    the file and line or index for messages.

    For JSON Lines, `offset` is the byte offset of the sample's line (what the lazy dataset keeps), and only the
    lines from byte `start` (line number `first_line_number`) to byte `end` are read; for a JSON array it is the sample's
    index, for a table (Parquet, dataset id) the row's, from row `start` to row `end`."""
    if kind in ("parquet", "hub"):
        name = path.removeprefix(HUB_PREFIX)
        for row_number, row in enumerate(table_rows(path, kind, start, end), start=start):
            yield f"{name} row {row_number:,}", without_nulls(row), row_number
        return
    if kind == "json":
        with open(path, "rb") as f:
            raw = f.read()
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        try:
            text = raw[bom:].decode("utf-8")
        except UnicodeDecodeError as e:
            at = bom + e.start
            line = raw.count(b"\n", 0, at) + 1
            raise DataError(f"{path} line {line}: not UTF-8 (byte 0x{raw[at]:02x})") from None
        samples = parse_json(text, path, with_line=True)
        if not isinstance(samples, list):
            raise DataError(f"{path}: expected a JSON array of samples")
        for index, sample in enumerate(samples):
            yield f"{path} sample {index}", sample, index
        return
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        for line_number, line in enumerate(f, start=first_line_number):
            if end is not None and offset >= end:
                break
            if line.strip():
                yield f"{path} line {line_number}", parse_json(line, f"{path} line {line_number}"), offset
            offset += len(line)


def table_rows(path, kind, start=0, end=None):
    """The rows of a Parquet file or a dataset, from `start` to `end`, as dicts."""
    if kind == "hub":
        dataset = load_hub_dataset(path)
        yield from dataset.select(range(start, len(dataset) if end is None else end))
        return
    import pyarrow.parquet

    try:
        row = 0
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=1000):
            if row + batch.num_rows > start:
                for item in batch.slice(max(start - row, 0)).to_pylist():
                    if end is not None and row >= end:
                        return
                    yield item
                    row += 1
            else:
                row += batch.num_rows
    except pyarrow.ArrowException as e:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})") from None


def table_length(path, kind):
    if kind == "hub":
        return len(load_hub_dataset(path))
    import pyarrow.parquet

    try:
        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    except pyarrow.ArrowException as e:
        raise DataError(f"{path}: not a readable Parquet file ({first_line(e)})") from None


def without_nulls(value):
    """A table row as a sample: a table has every column in every row (null where a sample has no such field),
    and so has every struct in a list of messages; drop those nulls."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


@functools.lru_cache(maxsize=None)
def load_hub_dataset(part):
    """A dataset id's split through `datasets.load_dataset` (offline: only what the local datasets cache holds)."""
    import datasets

    name, _, split = part.removeprefix(HUB_PREFIX).partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the library raises many kinds (offline, no such dataset or split): all mean "cannot"
        raise DataError(f"{name}: cannot load this dataset{f' (split {split})' if split else ''}: {first_line(e)}; "
                        "offline, only a dataset already in the local datasets cache loads") from None


def refuse_constant(name):
    raise ValueError(f"{name} is not a JSON value")


def parse_json(text, where, with_line=False):
    """json.loads, with every way a text can fail as one DataError naming `where`: bad syntax, bytes that are not
    UTF-8, NaN/Infinity (which Python's json would accept), nesting too deep, numbers too long."""
    try:
        return json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as e:
        detail = f"{e.msg} at {f'line {e.lineno} column {e.colno}' if with_line else f'column {e.colno}'}"
    except UnicodeDecodeError:
        detail = "not UTF-8"
    except RecursionError:
        detail = "nested too deeply"
    except ValueError as e:  # refuse_constant, and integers of thousands of digits
        detail = first_line(e)
    raise DataError(f"{where}: not valid JSON ({detail})")


def parse_sample(sample: dict, where: str, forbidden_tokens: list[str], mask_history: bool = False) -> Conversation:
    """Check one raw sample in any supported format and return it as a Conversation; with `mask_history` only its
    last assistant message is trained."""
    if not isinstance(sample, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(sample).__name__}")
    check_no_media(sample, where)
    formats = [name for name, present in (("'conversations'", "conversations" in sample),
                                          ("'messages'", "messages" in sample),
                                          ("'instruction'/'output' (Alpaca)", "instruction" in sample or
                                           "output" in sample)) if present]
    if len(formats) != 1:
        raise DataError(f"{where}: expected one of the fields 'conversations', 'messages' or 'instruction' and "
                        f"'output' (Alpaca); it has {' and '.join(formats) if formats else 'none of them'}")
    if "messages" not in sample and "conversations" not in sample:
        sample = alpaca_as_messages(sample, where, forbidden_tokens)
    turns = sample.get("conversations", sample.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations'/'messages' must be a non-empty list of messages")
    messages = [parse_message(turn, f"{where}: message {i}", forbidden_tokens) for i, turn in enumerate(turns)]

    system = sample.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: the 'system' field must be a string, got {type(system).__name__}")
        check_text(system, f"{where}: the 'system' field", forbidden_tokens)
    if messages[0]["role"] == "system":
        if system is not None:
            raise DataError(f"{where}: has both a 'system' field and a leading system message; keep one")
        system = messages.pop(0)["content"]
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    if not any(is_trained(message) for message in messages):
        raise DataError(f"{where}: every assistant message has 'weight' 0, so nothing to train on")
    if mask_history:  # --mask_history: the earlier turns are context
        last = max(i for i, message in enumerate(messages) if is_trained(message))
        for message in messages[:last]:
            if message["role"] == "assistant":
                message["weight"] = 0
    return Conversation(system, messages, parse_tools(sample.get("tools"), where, forbidden_tokens), where)


ALPACA_TEXT_FIELDS = ("instruction", "input", "output")


def alpaca_as_messages(sample, where, forbidden_tokens):
    """An Alpaca record as the conversation it stands for: each `history` pair [instruction, output] a user and an
    assistant turn, then the instruction with the input on the line below it (joined by a newline where both are
    there, as LLaMA-Factory and Stanford Alpaca's data do) and the output; `system` and `tools` as they are."""
    fields = {}
    for key in ALPACA_TEXT_FIELDS:
        value = sample.get(key)
        if value is None and key != "output":
            value = ""
        if not isinstance(value, str):
            got = "nothing" if value is None else type(value).__name__
            raise DataError(f"{where}: the '{key}' field of an Alpaca record must be a string, got {got}")
        check_text(value, f"{where}: the '{key}' field", forbidden_tokens)
        fields[key] = value
    history = sample.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: 'history' must be a list of [instruction, output] pairs")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise DataError(f"{where}: history pair {i} is not [instruction, output], two strings")
        for text in pair:
            check_text(text, f"{where}: history pair {i}", forbidden_tokens)
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = "\n".join(part for part in (fields["instruction"], fields["input"]) if part)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]
    return {"messages": messages, **{key: sample[key] for key in ("system", "tools") if key in sample}}


def parse_message(turn, where, forbidden_tokens):
    """One message of any format as an OpenAI-style dict; `where` names the sample and the message."""
    if not isinstance(turn, dict):
        raise DataError(f"{where} is not a JSON object")
    role_key = "role" if "role" in turn else "from"
    text_key = "content" if "content" in turn else "value"
    role, text = turn.get(role_key), turn.get(text_key)
    if role is None:
        raise DataError(f"{where} has no 'role' (or 'from') field")
    if not isinstance(role, str) or role not in ROLE_NAMES:
        raise DataError(f"{where} has unknown role {role!r} (expected one of: {', '.join(ROLE_NAMES)})")
    message = {"role": ROLE_NAMES[role]}
    if role == "function_call":  # ShareGPT: the value is the call, or a list of calls, as JSON
        calls = parse_json(text, f"{where}: its function_call value") if isinstance(text, str) else text
        message["content"], message["tool_calls"] = "", parse_tool_calls(
            calls if isinstance(calls, list) else [calls], where, forbidden_tokens)
        return message
    turn = dict(turn)
    if isinstance(text, list):  # content as parts: text, and on an assistant message reasoning and tool calls
        text, reasoning, calls = content_parts(text, where)
        for key, value in (("reasoning_content", reasoning), ("tool_calls", calls)):
            if value:
                if turn.get(key):
                    raise DataError(f"{where}: has {key} both as content parts and as '{key}'; keep one")
                turn[key] = value
    for key in ("tool_calls", "function_call", "reasoning_content"):
        if turn.get(key) and message["role"] != "assistant":
            raise DataError(f"{where}: '{key}' belongs on assistant messages, not on a {role} message")
    calls = turn.get("tool_calls")
    if turn.get("function_call"):  # OpenAI's older form of one call
        if calls:
            raise DataError(f"{where}: has both 'tool_calls' and 'function_call'; keep one")
        calls = [turn["function_call"]]
    if calls is not None and calls != []:
        message["tool_calls"] = parse_tool_calls(calls, where, forbidden_tokens)
        text = "" if text is None else text  # OpenAI: an assistant message that only calls tools has null content
    if not isinstance(text, str):
        if text is None:
            problem = "has a null" if text_key in turn else "has no"
        else:
            problem = f"has a non-string ({type(text).__name__})"
        raise DataError(f"{where} {problem} 'content' (or 'value') field")
    check_text(text, where, forbidden_tokens)
    message["content"] = text
    if (weight := message_weight(turn, where)) is not None and message["role"] == "assistant":
        message["weight"] = weight
    reasoning = turn.get("reasoning_content")
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise DataError(f"{where}: 'reasoning_content' must be a string, got {type(reasoning).__name__}")
        check_text(reasoning, f"{where}: its 'reasoning_content'", forbidden_tokens)
        message["reasoning_content"] = reasoning
    return message


def message_weight(turn, where):
    """OpenAI's 'weight' (LLaMA-Factory's 'loss_weight'), 0 or 1: 0 keeps an assistant message out of training. Only
    assistant messages are trained: on any other, 0 says nothing new and 1 is refused."""
    keys = [key for key in ("weight", "loss_weight") if turn.get(key) is not None]
    if len(keys) > 1:
        raise DataError(f"{where}: has both 'weight' and 'loss_weight'; keep one")
    if not keys:
        return None
    weight = turn[keys[0]]
    if isinstance(weight, bool) or weight not in (0, 1):
        raise DataError(f"{where}: '{keys[0]}' must be 0 or 1, got {weight!r}")
    role = turn.get("role", turn.get("from"))
    if weight and ROLE_NAMES.get(role) != "assistant":
        raise DataError(f"{where}: '{keys[0]}' 1 on a {role} message: only what the assistant says is trained")
    return int(weight)


# The types of content parts (OpenAI's, LLaMA-Factory's) that are not text: refused, this script trains on text.
NON_TEXT_PARTS = ("image", "image_url", "input_image", "video", "video_url", "audio", "input_audio", "file")
# A multimodal record of LLaMA-Factory's (and ShareGPT's) kind: media listed beside the messages, each standing at
# a placeholder in the text. Trained as text, the media would be dropped and the placeholder learnt.
MEDIA_FIELDS = ("images", "videos", "audios")
MEDIA_PLACEHOLDERS = ("<image>", "<video>", "<audio>")
TEXT_ONLY = "this script fine-tunes on text only (leave images, audio and video out of the data)"


def check_no_media(sample, where):
    """A sample that lists images, videos or audio beside its messages is refused, not trained without them."""
    for key in MEDIA_FIELDS:
        if sample.get(key) not in (None, [], ""):
            raise DataError(f"{where}: has '{key}' (a multimodal record); {TEXT_ONLY}")


def content_parts(parts, where):
    """(text, reasoning, tool calls) of a content given as a list of typed parts, each kind joined in order as the
    Qwen3.5 chat template joins text parts (directly, no separator): {"type": "text", "text" or "value": ...},
    {"type": "reasoning", ...} (its reasoning_content), {"type": "tool_call", "value": a call as JSON}."""
    text, reasoning, calls = [], [], []
    for k, part in enumerate(parts):
        kind = part.get("type", "text") if isinstance(part, dict) else None
        if kind in NON_TEXT_PARTS or (isinstance(part, dict) and any(key in part for key in NON_TEXT_PARTS)):
            raise DataError(f"{where}: content part {k} is of type '{kind}'; {TEXT_ONLY}")
        value = part.get("text", part.get("value")) if isinstance(part, dict) else None
        if kind == "tool_call":
            calls.append(parse_json(value, f"{where}: content part {k}") if isinstance(value, str) else value)
            continue
        if kind not in ("text", "reasoning") or not isinstance(value, str):
            raise DataError(f"{where}: content part {k} is not a text, reasoning or tool_call part with a string "
                            f"'text' (or 'value'), got {json.dumps(part, ensure_ascii=False)[:80]}")
        (text if kind == "text" else reasoning).append(value)
    return "".join(text), "".join(reasoning) or None, calls


def parse_tool_calls(calls, where, forbidden_tokens):
    """Tool calls as {"type": "function", "function": {"name", "arguments"}}; arguments stay as given (an object,
    or a string that must hold one)."""
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: 'tool_calls' must be a non-empty list of calls")
    parsed = []
    for j, call in enumerate(calls):
        at = f"{where} tool call {j}"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise DataError(f"{at} is not a JSON object with a 'name' (or a 'function' holding one)")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{at} has no function 'name'")
        parsed_arguments = parse_json(arguments, f"{at} 'arguments'") if isinstance(arguments, str) else arguments
        if not isinstance(parsed_arguments, dict):
            got = "nothing" if parsed_arguments is None else type(parsed_arguments).__name__
            raise DataError(f"{at}: 'arguments' must be a JSON object (or a string holding one), got {got}")
        # Both spellings: the template may write the string as given or the parsed object (where "\u003c" is "<").
        written = json.dumps([name, arguments, parsed_arguments], ensure_ascii=False)
        check_text(written, at, forbidden_tokens)
        parsed.append({"type": "function", "function": {"name": name, "arguments": arguments}})
    return parsed


def parse_tools(tools, where, forbidden_tokens):
    """The sample's function definitions, each as {"type": "function", "function": {...}} (the form inference
    servers pass to the template); a bare definition, as ShareGPT files hold, is wrapped so."""
    if isinstance(tools, str):  # ShareGPT files keep them as a JSON string
        tools = parse_json(tools, f"{where}: 'tools'") if tools.strip() else None
    if not tools:
        return None
    if not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of function definitions, got {type(tools).__name__}")
    parsed = []
    for k, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise DataError(f"{where}: tool {k} in 'tools' has no function 'name'")
        if "function" not in tool:
            tool = {"type": "function", "function": tool}
        parsed.append(tool if "type" in tool else {"type": "function", **tool})
    check_text(json.dumps(parsed, ensure_ascii=False), f"{where}: 'tools'", forbidden_tokens)
    return parsed


def is_trained(message):
    return message["role"] == "assistant" and message.get("weight", 1) == 1


def check_text(text, where, forbidden_tokens):
    """Refuse text that cannot be tokenized as written: a lone surrogate (half of an emoji's escape, which no
    encoding can write) or a control token spelt out (it would be tokenized as that token)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where} holds a lone surrogate {text[e.start]!r} at character {e.start}, which is not "
                            "text (half of an escaped emoji?)") from None
    for token in forbidden_tokens:
        if token in text:
            raise DataError(f"{where} contains the control token {token!r}, which plain text must not hold")
    for placeholder in MEDIA_PLACEHOLDERS:
        if placeholder in text:
            raise DataError(f"{where} holds {placeholder}, the place of a medium in a multimodal record; {TEXT_ONLY}")


def render_chatml(conversation: Conversation, default_system: Optional[str]) -> tuple[str, list[Span]]:
    """ChatML text of a conversation and the character spans to train: each assistant content plus its <|im_end|>."""
    turns = conversation.messages
    system = conversation.system if conversation.system is not None else default_system or None
    if system is not None:  # the sample's own system message is a turn even when empty
        turns = [{"role": "system", "content": system}] + turns
    pieces, trained_spans, length = [], [], 0
    for message in turns:
        role, content = message["role"], message["content"]
        header = f"<|im_start|>{role}\n"
        turn = f"{header}{content}{TURN_END}\n"
        if is_trained(message):
            start = length + len(header)
            trained_spans.append((start, start + len(content) + len(TURN_END)))
        pieces.append(turn)
        length += len(turn)
    return "".join(pieces), trained_spans


def render_with_chat_template(tokenizer, conversation: Conversation, default_system: Optional[str],
                              template_kwargs: dict) -> tuple[str, list[Span]]:
    """The model's own chat template (--template auto): the text equals apply_chat_template's for the sample, with
    --chat_template_kwargs as the template's settings."""
    messages = conversation.messages
    system = conversation.system if conversation.system is not None else default_system
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    try:
        text = tokenizer.apply_chat_template(messages, tools=conversation.tools, tokenize=False, **template_kwargs)
    except Exception as e:  # the template is the model's own code; whatever it raises concerns this sample
        raise DataError(f"{conversation.where}: the chat template cannot render it: {type(e).__name__}: {e}") from None
    return text, assistant_spans(text, conversation)


def assistant_spans(text: str, conversation: Conversation) -> list[Span]:
    """The character spans to train in a template's rendering: each assistant turn from after its header through
    its <|im_end|> (content, reasoning, tool calls), less an empty thinking block at its start.

    Why the empty block is not trained: the Qwen3 template writes it into turns that have no reasoning, and at
    inference with enable_thinking=False it is part of the prompt, never something the model writes."""
    spans, position = [], 0
    while (start := text.find(ASSISTANT_HEADER, position)) >= 0:
        start += len(ASSISTANT_HEADER)
        end = text.find(TURN_END, start)
        if end < 0:
            break
        empty_thinking = EMPTY_THINKING.match(text, start)
        spans.append((empty_thinking.end() if empty_thinking else start, end + len(TURN_END)))
        position = end
    assistants = [message for message in conversation.messages if message["role"] == "assistant"]
    if len(spans) != len(assistants):
        raise DataError(f"{conversation.where}: the chat template wrote {len(spans)} complete assistant turns for "
                        f"{len(assistants)} assistant messages, so what to train is unclear (--template chatml "
                        "renders samples without tool data as plain ChatML)")
    return [span for span, message in zip(spans, assistants) if is_trained(message)]


def resolve_template(tokenizer, template, template_kwargs=None):
    """'auto' when the tokenizer has a ChatML-style chat template (every Qwen since 1.5), else 'chatml'.

    Raises UserError for a template that fails on, or does not write ChatML for, a plain exchange."""
    template_kwargs = template_kwargs or {}
    if template == "chatml" or not tokenizer.chat_template:
        if template_kwargs:
            raise UserError("--chat_template_kwargs are settings of the model's own chat template, which "
                            f"{'--template chatml does not use' if template == 'chatml' else 'this tokenizer lacks'}")
        if template != "chatml":
            log.info("the tokenizer has no chat template: rendering plain ChatML (as --template chatml)")
        return "chatml"
    try:
        probe = tokenizer.apply_chat_template(
            [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], tokenize=False,
            **template_kwargs)
    except Exception as e:
        settings = " with these --chat_template_kwargs" if template_kwargs else ""
        raise UserError(f"the tokenizer's chat template fails on a plain user/assistant exchange{settings} "
                        f"({type(e).__name__}: {first_line(e)}); use --template chatml") from None
    if ASSISTANT_HEADER not in probe or TURN_END not in probe:
        raise UserError("the tokenizer's chat template does not write ChatML turns (<|im_start|>assistant ... "
                        "<|im_end|>), so the trained tokens cannot be found in it; use --template chatml")
    return "auto"


@dataclass
class TemplateTraits:
    """What a chat template does with tool data; see probe_template."""

    writes_tools: bool  # the sample's tool list appears
    writes_tool_calls: bool
    wants_object_arguments: bool  # arguments given as a string would not come out as written (quoted, or an error)
    writes_reasoning: bool  # the reasoning_content of a final assistant turn appears


PROBE_ARGUMENTS = '{"probe_key": "probe_value"}'


def probe_template(tokenizer, template_kwargs=None):
    """Render a tiny conversation a few ways to learn what the template does with tools, tool calls and reasoning,
    so that nothing a sample holds is dropped or mangled without a word. A probe the template raises on counts as
    not written.

    Workaround (transformers 5): a chat template is Jinja code that declares nothing about what it renders; this
    can go if templates come to declare it."""
    template_kwargs = template_kwargs or {}
    tool = {"type": "function", "function": {"name": "probe_tool", "description": "probe_description",
                                             "parameters": {"type": "object", "properties": {}}}}

    def render(assistant, tools=None):
        try:
            return tokenizer.apply_chat_template([{"role": "user", "content": "q"}, assistant], tools=tools,
                                                 tokenize=False, **template_kwargs)
        except Exception:
            return ""

    def calling(arguments):
        call = {"type": "function", "function": {"name": "probe_tool", "arguments": arguments}}
        return render({"role": "assistant", "content": "", "tool_calls": [call]}, tools=[tool])

    with_string, with_object = calling(PROBE_ARGUMENTS), calling(json.loads(PROBE_ARGUMENTS))
    return TemplateTraits(
        writes_tools="probe_description" in render({"role": "assistant", "content": "a"}, tools=[tool]),
        writes_tool_calls="probe_value" in with_string + with_object,
        wants_object_arguments=PROBE_ARGUMENTS not in with_string,
        writes_reasoning="probe_reasoning" in render(
            {"role": "assistant", "content": "a", "reasoning_content": "probe_reasoning"}),
    )


def labels_from_offsets(input_ids: list[int], offsets: list[Span],
                        trained_spans: list[Span]) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels), int32 [tokens]: labels = input ids where the token's first character lies in a trained
    span, IGNORE_INDEX elsewhere. For "<|im_start|>assistant\nHi<|im_end|>\n", trained span "Hi<|im_end|>":
        tokens  <|im_start|>  assistant  \n    Hi   <|im_end|>  \n
        labels  -100          -100       -100  Hi   <|im_end|>  -100"""
    ids = np.asarray(input_ids, dtype=np.int32)
    token_starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
    span_starts = np.asarray([s for s, _ in trained_spans], dtype=np.int64)
    span_ends = np.asarray([e for _, e in trained_spans], dtype=np.int64)
    span = np.searchsorted(span_ends, token_starts, side="right")  # first span that ends after the token starts
    inside = span < len(span_ends)
    inside[inside] = token_starts[inside] >= span_starts[span[inside]]
    return ids, np.where(inside, ids, IGNORE_INDEX).astype(np.int32)


# Tokenizer settings that say where it was loaded from, not what it does: left out of its fingerprint.
TOKENIZER_LOCATION_KEYS = ("name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local",
                           "local_files_only", "cache_dir", "revision", "token", "_commit_hash", "trust_remote_code")


class ChatEncoder:
    """Turns Conversations into {input_ids, labels}: render once, tokenize the whole text at once, cut, label."""

    def __init__(self, tokenizer, model_max_length, system_message=None, template="auto", template_kwargs=None,
                 mask_history=False):
        if not tokenizer.is_fast:
            raise UserError(
                f"the tokenizer of this model ({type(tokenizer).__name__}) is not a fast tokenizer; exact labels "
                "need character offsets, which only fast tokenizers give (Qwen1.5 and later have one)"
            )
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.template_kwargs = template_kwargs or {}
        self.requested_template, self.template = template, resolve_template(tokenizer, template, self.template_kwargs)
        self.traits = probe_template(tokenizer, self.template_kwargs) if self.template == "auto" else None
        self.warned = set()
        log.info("rendering conversations with " + (
            "the model's own chat template (--template auto)" if self.template == "auto" else "plain ChatML"))
        # ChatML gets a default system turn; the model's own template brings its own default (Qwen2.5: one,
        # Qwen3: none) unless the user names a system message ("" names an empty one, which hides Qwen2.5's).
        if self.template == "chatml" and system_message is None:
            system_message = DEFAULT_SYSTEM_MESSAGE
        self.system_message = system_message
        self.mask_history = mask_history  # --mask_history: only the last assistant turn of each sample is trained
        self.mapping = None  # see for_source
        # Every special token is a control token: plain text spelling one would silently become it.
        self.forbidden_tokens = sorted(set(tokenizer.all_special_tokens))
        # No token spans more characters than the vocabulary's longest entry has bytes: text beyond twice that many
        # characters per kept token can never reach the model, so a huge sample is cut before it is tokenized
        # (the margin keeps the tokenizer's view of the words around the cut from reaching the kept tokens).
        self.max_chars = 2 * model_max_length * max(len(token) for token in tokenizer.get_vocab())
        check_text(self.system_message or "", "--system_message", self.forbidden_tokens)

    @functools.cached_property
    def tokenizer_fingerprint(self):
        """A hash of what decides how this tokenizer turns text into ids (once per run, not once per data file):
        its serialized form (vocabulary, merges, added and special tokens, normalisation, pre-tokenization), every
        setting it was created with (all of tokenizer_config.json: split_special_tokens, add_prefix_space, ...,
        not a list of the ones known to matter), and what it actually gives for a probe text: the same call as
        `encode` below, on text holding each special token, spaces, digits and non-Latin script."""
        tokenizer = self.tokenizer
        settings = {key: value for key, value in tokenizer.init_kwargs.items() if key not in TOKENIZER_LOCATION_KEYS}
        probe = " ".join(["Probe:  x\n\n\t12345 ½ ÄÖü 中文 🙂 <think>\n</think>", *tokenizer.all_special_tokens])
        encoded = tokenizer(probe, add_special_tokens=False, return_offsets_mapping=True)
        described = json.dumps([tokenizer.backend_tokenizer.to_str(), type(tokenizer).__name__, settings,
                                encoded["input_ids"], encoded["offset_mapping"]],
                               sort_keys=True, default=lambda value: getattr(value, "__getstate__", value.__repr__)())
        return hashlib.sha256(described.encode()).hexdigest()

    def for_source(self, mapping):
        """This encoder for the samples of one source: a LLaMA-Factory entry's mapping applied before parsing."""
        if not mapping:
            return self
        encoder = copy.copy(self)  # the tokenizer, template and probes shared
        encoder.mapping = mapping
        return encoder

    def parse(self, sample, where):
        if self.mapping:
            sample = from_llama_factory(sample, self.mapping, where)
        conversation = parse_sample(sample, where, self.forbidden_tokens, self.mask_history)
        if self.template == "chatml" and (feature := conversation.tool_or_reasoning_feature()):
            remedy = "this tokenizer has no chat template to render it with" if self.requested_template == "auto" \
                else "use --template auto (the model's own chat template) for tools, tool calls and reasoning"
            raise DataError(f"{where}: has {feature}, which plain ChatML cannot render; {remedy}")
        if self.traits:
            self.fit_to_template(conversation)
        return conversation

    def fit_to_template(self, conversation):
        """Refuse tool calls the template would drop (nothing of them could be trained); hand arguments given as a
        string over parsed where the template would quote them (Qwen2.5's), as OpenAI-compatible servers do, so
        that the model never learns to call a tool with a string; say once what context the template leaves out."""
        calls = [call for message in conversation.messages for call in message.get("tool_calls", ())]
        if calls and not self.traits.writes_tool_calls:
            raise DataError(f"{conversation.where}: has tool calls, which this model's chat template does not write, "
                            "so they could not be trained")
        for call in calls if self.traits.wants_object_arguments else ():
            if isinstance(call["function"]["arguments"], str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        if conversation.tools and not self.traits.writes_tools:
            self.warn_once("tools", f"{conversation.where}: this model's chat template does not write 'tools'; "
                           "the tool list of every sample is left out")
        if not self.traits.writes_reasoning and any(m.get("reasoning_content") for m in conversation.messages):
            self.warn_once("reasoning", f"{conversation.where}: this model's chat template does not write "
                           "'reasoning_content'; the reasoning of every sample is left out of training")

    def warn_once(self, what, message):
        if what not in self.warned:  # the same warning for every other sample would drown the log
            self.warned.add(what)
            log.warning(message)

    def render(self, conversation):
        """(text, character spans to train)."""
        if self.template == "chatml":
            return render_chatml(conversation, self.system_message)
        return render_with_chat_template(self.tokenizer, conversation, self.system_message, self.template_kwargs)

    def encode(self, conversations: list[Conversation]) -> list[Optional[dict[str, np.ndarray]]]:
        """Encode a batch into int32 arrays (4 bytes a token, not a Python int's 36); an entry is None when the
        sample keeps no trained token after truncation."""
        return [example for example, _ in self.encode_with_lengths(conversations)]

    def encode_with_lengths(self, conversations: list[Conversation]) -> list[tuple[Optional[dict], int]]:
        """[(example or None, its length in tokens before truncation)] for a batch of conversations."""
        rendered = [self.render(c) for c in conversations]
        batch = self.tokenizer(
            [text[: self.max_chars] for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
            verbose=False,
        )
        examples = []
        for ids, offsets, (_, spans) in zip(batch["input_ids"], batch["offset_mapping"], rendered):
            n = self.model_max_length
            input_ids, labels = labels_from_offsets(ids[:n], offsets[:n], spans)
            trained = bool((labels != IGNORE_INDEX).any())
            examples.append(({"input_ids": input_ids, "labels": labels} if trained else None, len(ids)))
        return examples

    def surely_keeps_a_trained_token(self, text, spans):
        """Cheap test on the rendered sample, without tokenizing, that truncation cannot drop it.

        Every token covers at least one byte, so the <|im_end|> closing the first assistant turn (always trained)
        has an index no larger than the number of UTF-8 bytes before it."""
        first_trained_end = text[: spans[0][1] - len(TURN_END)]
        return len(first_trained_end.encode("utf-8")) < self.model_max_length


# What a data set counts besides its samples: `dropped` (samples that keep no trained token within
# --model_max_length) and `empty_assistant` (samples with an empty assistant message), and how reports word them.
DROP_REASON_TRUNCATED = "no trained token within --model_max_length"
NOTICE_EMPTY_ASSISTANT = "an empty assistant message (only its <|im_end|> is trained)"


def trained_in(example: dict[str, np.ndarray]) -> int:
    """How many of an example's tokens have a label (are trained)."""
    return int((example["labels"] != IGNORE_INDEX).sum())


def as_lists(example: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """What a dataset hands out: plain lists, as a collator or a JSON dump expects."""
    return {"input_ids": example["input_ids"].tolist(), "labels": example["labels"].tolist()}


class TrainingData(Dataset):
    """The dataset protocol: what every dataset here (SupervisedDataset, LazySupervisedDataset, MixedDataset,
    ExampleSubset) offers, and who reads it.

      len(d); d[i] -> {"input_ids": [...], "labels": [...]}  the Trainer's data loader and collator, the
                                                             evaluation prompts (generation_prompts)
      d.example(i) -> the same as numpy arrays; d.examples   the preview and its dump
      d.group_lengths     one number per sample for --group_by_length to sort by: its token count, or for a lazy
                          dataset an estimate from its bytes (never reported as a token count)
      d.token_counts()    each sample's tokens, exact (a lazy dataset tokenizes every sample to answer)
      d.full_lengths      the length before truncation of every sample read, dropped ones too (the histogram)
      d.trained_tokens()  how many tokens have a label
      d.dropped, d.empty_assistant, d.reports   what reading counted, and one report line per source

    A subclass gives __len__, example, group_lengths and full_lengths; the rest follows from them here."""

    dropped = empty_assistant = 0
    reports = ()

    def __getitem__(self, i) -> dict[str, list[int]]:
        return as_lists(self.example(int(i)))

    @property
    def examples(self):
        return (self.example(i) for i in range(len(self)))

    def token_counts(self):
        return np.array([len(example["input_ids"]) for example in self.examples], dtype=np.int64)

    def trained_tokens(self):
        return sum(trained_in(example) for example in self.examples)


class SupervisedDataset(TrainingData):
    """Every sample read, checked and tokenized up front (in batched fast-tokenizer calls, by `num_workers`
    processes), kept as flat int32 arrays: example i is input_ids[offsets[i]:offsets[i + 1]] with its labels.

    With a `cache_dir` the arrays are built once per data version (see tokenized_cache_entry) and every later start
    and every rank memory-maps them: the operating system's page cache then holds one copy per machine."""

    def __init__(self, path, encoder, batch_size=1000, cache_dir=None, num_workers=1, kind=None):
        kind = kind or detect_format(path)  # resolve_sources has recorded it; detected here for a file given alone
        tokenized = load_or_build_tokenized(path, kind, encoder, cache_dir, num_workers, batch_size)
        self.dropped, self.empty_assistant = tokenized.meta["dropped"], tokenized.meta["empty_assistant"]
        self.input_ids, self.labels, self.offsets, self.full_lengths = (
            tokenized.arrays[name] for name in TOKENIZED_ARRAYS)
        if not len(self) and not self.dropped:
            raise DataError(f"{path}: holds no samples")

    def example(self, i):
        start, end = self.offsets[i], self.offsets[i + 1]
        return {"input_ids": self.input_ids[start:end], "labels": self.labels[start:end]}

    def token_counts(self):
        return np.diff(self.offsets)  # from the offsets: no pass over the tokens

    @property
    def group_lengths(self):
        return self.token_counts()

    def trained_tokens(self):
        return int((self.labels != IGNORE_INDEX).sum())

    def __len__(self):
        return max(len(self.offsets) - 1, 0)


# The files of a tokenized data set (name: dtype), each one flat array
TOKENIZED_ARRAYS = {"input_ids": np.int32, "labels": np.int32, "offsets": np.int64, "full_lengths": np.int32}
# Raise whenever rendering, tokenizing, labelling or the files written change: older cache entries then go unused.
TOKENIZED_FORMAT_VERSION = 3


@dataclass
class Tokenized:
    """A tokenized data file, checked and memory-mapped: meta.json's counts and the TOKENIZED_ARRAYS."""

    meta: dict
    arrays: dict


class DamagedEntry(Exception):
    """A cache entry whose files are not what its build wrote (cut short, replaced, half copied)."""


def default_cache_dir():
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.expanduser("~/.cache")  # a relative one is to be ignored (XDG spec)
    return os.path.join(base, "qwen-finetune", "tokenized")


def tokenized_cache_entry(path, encoder):
    """The name of a data file's tokenized form: a hash of everything that decides its tokens and labels, the data's
    bytes, the tokenizer (ChatEncoder.tokenizer_fingerprint), the chat template and its settings, the rendering
    flags and the format version; never names or dates."""
    decided_by = {
        "version": TOKENIZED_FORMAT_VERSION, "data": data_fingerprint([path]),
        "tokenizer": encoder.tokenizer_fingerprint,
        "special_tokens": encoder.forbidden_tokens, "chat_template": encoder.tokenizer.chat_template,
        "template": encoder.template, "system_message": encoder.system_message,
        "template_kwargs": encoder.template_kwargs, "mask_history": encoder.mask_history,
        "mapping": encoder.mapping,
        "model_max_length": encoder.model_max_length,
    }
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:32]


def load_or_build_tokenized(path, kind, encoder, cache_dir, num_workers, batch_size) -> Tokenized:
    """`path` tokenized. Without a cache it is built afresh in a temporary folder (removed once mapped). With one,
    the first process of each machine builds the entry (others wait on the file system, not on a collective whose
    timeout a long build would trip) and everyone maps the same files, each checking them first."""
    if cache_dir and (problem := write_problem(cache_dir)):
        log.warning(f"--data_cache_dir {cache_dir}: cannot write there ({problem}); tokenizing without a cache")
        cache_dir = None
    if not cache_dir:
        folder = tempfile.mkdtemp(prefix="tokenized-")
        try:
            build_tokenized(path, kind, encoder, folder, num_workers, batch_size)
            return read_tokenized(folder)  # the mapped files live on until unmapped
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if not is_local_main_process():
        return wait_for_cache_entry(path, encoder, cache_dir)
    for _ in range(3):  # a file that changes while it is tokenized is tokenized again, under its new hash
        built = load_or_build_cache_entry(path, kind, encoder, cache_dir, num_workers, batch_size)
        if built is not None:
            return built
    raise DataError(f"{path}: the file kept changing while it was being tokenized; run again once it is complete")


def load_or_build_cache_entry(path, kind, encoder, cache_dir, num_workers, batch_size) -> Optional[Tokenized]:
    """The checked entry for `path` as it is now, built if missing or damaged; None if the file changed while it
    was being tokenized (the build is then discarded: an entry holds the tokens of the bytes its name says)."""
    identity = file_identity(path)  # before its bytes are hashed for the name
    digest = data_fingerprint([path])
    entry = os.path.join(cache_dir, tokenized_cache_entry(path, encoder))
    if os.path.isdir(entry) and (tokenized := read_cache_entry(path, entry, set_aside=False)):
        return tokenized
    # One builder per entry, also across jobs sharing the cache.
    with locked_file(entry + ".lock", waiting=f"tokenizing {path} into {entry}") as lock:
        if os.path.isdir(entry) and (tokenized := read_cache_entry(path, entry, set_aside=True)):
            return tokenized  # built by whoever held the lock before
        if os.path.lexists(entry) and not os.path.isdir(entry):  # a file, or a link to nothing, in its place
            os.remove(entry)
            log.warning(f"{path}: {entry} in the cache was not a tokenized folder; removed, tokenizing again")
        remove_killed_builds(cache_dir, own=lock)
        error_file = entry + ".error"
        with contextlib.suppress(FileNotFoundError):
            os.remove(error_file)
        building = tempfile.mkdtemp(prefix=os.path.basename(entry) + ".building-", dir=cache_dir)
        os.chmod(building, 0o777 & ~current_umask())  # as readable as any folder this user makes (mkdtemp: 0700)
        started = time.perf_counter()
        try:
            workers = build_tokenized(path, kind, encoder, building, num_workers, batch_size)
            if file_identity(path) != identity or fresh_data_fingerprint(path) != digest:
                log.warning(f"{path} changed while it was being tokenized: its tokens are discarded and it is "
                            "tokenized again")
                shutil.rmtree(building, ignore_errors=True)
                return None
            publish(building, entry)
        except BaseException as e:
            shutil.rmtree(building, ignore_errors=True)
            if isinstance(e, DataError) and world_size() > 1:
                with open(error_file, "w") as f:  # the ranks waiting for this build report it too
                    f.write(str(e))
            raise
    log.info(f"{path}: tokenized by rank {process_rank()} with {workers} worker(s) in "
             f"{time.perf_counter() - started:.1f} s into the cache {entry}")
    return read_tokenized(entry)


def read_cache_entry(path, entry, set_aside) -> Optional[Tokenized]:
    """An entry, checked; a damaged one is None, and with `set_aside` (its builder's lock held) moved out of the
    way and removed, with one line saying why."""
    try:
        tokenized = read_tokenized(entry)
    except DamagedEntry as e:
        if set_aside:
            aside = f"{entry}.damaged-{os.getpid()}"
            os.rename(entry, aside)
            shutil.rmtree(aside, ignore_errors=True)
            log.warning(f"{path}: the cached tokens in {entry} are damaged ({e}); removed, tokenizing again")
        return None
    rank_log.info(f"rank {process_rank()}: {path}: loaded the tokenized data from the cache {entry}")
    return tokenized


def read_tokenized(folder) -> Tokenized:
    """A tokenized folder's meta.json and arrays, memory-mapped, after checking that they are what its build wrote:
    the format version, each array's size and checksum against meta.json, and the arrays against each other
    (offsets that start at 0, grow, and end at the number of tokens). Raises DamagedEntry saying what is wrong."""
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DamagedEntry("it has no meta.json") from None
    except (OSError, ValueError) as e:
        raise DamagedEntry(f"its meta.json cannot be read ({first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("version") != TOKENIZED_FORMAT_VERSION:
        raise DamagedEntry("its meta.json is not of this version's format")
    counts = [meta.get(key) for key in ("samples", "dropped", "empty_assistant")]
    if not all(type(count) is int and count >= 0 for count in counts):
        raise DamagedEntry("its meta.json lacks the counts of samples")
    try:
        arrays = {name: read_array(folder, name, dtype, meta["arrays"][name]) for name, dtype in
                  TOKENIZED_ARRAYS.items()}
    except (KeyError, TypeError) as e:
        raise DamagedEntry(f"its meta.json does not describe the array {first_line(e)}") from None
    samples, dropped = counts[:2]
    offsets, tokens = arrays["offsets"], len(arrays["input_ids"])
    if (len(offsets) != samples + 1 or offsets[0] != 0 or offsets[-1] != tokens or len(arrays["labels"]) != tokens
            or not (np.diff(offsets) > 0).all() or len(arrays["full_lengths"]) != samples + dropped):
        raise DamagedEntry("its arrays do not fit each other")
    return Tokenized(meta, arrays)


def read_array(folder, name, dtype, expected):
    """One array file, memory-mapped, if its size and CRC-32 are those recorded (about 6 GB/s: a 1M-sample entry
    is checked in a tenth of a second)."""
    path = os.path.join(folder, f"{name}.bin")
    try:
        size = os.path.getsize(path)
    except OSError:
        raise DamagedEntry(f"{name}.bin is missing") from None
    if type(expected["bytes"]) is not int or type(expected["crc32"]) is not int:
        raise TypeError(name)
    if size != expected["bytes"]:
        raise DamagedEntry(f"{name}.bin holds {size:,} bytes, not the {expected['bytes']:,} written")
    array = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    if zlib.crc32(memoryview(array).cast("B") if size else b"") != expected["crc32"]:
        raise DamagedEntry(f"{name}.bin does not hold the bytes written (checksum)")
    return array


def file_identity(path):
    """What changes whenever a file is written: its size, times and inode (for a dataset id, its cached files')."""
    files = [f["filename"] for f in load_hub_dataset(path).cache_files] if path.startswith(HUB_PREFIX) else [path]
    return [(s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) for s in map(os.stat, files)]


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fresh_data_fingerprint(path):
    """The content hash of one source part read again now, not the one remembered for this process (the others
    stay remembered: clearing them all made rank 0 hash every data file again on a first cache build)."""
    return data_fingerprint([path], fresh=True)


def publish(building, entry):
    """Rename a finished build into place: atomic, so a reader sees a complete entry or none. When another builder
    got there first (a file system where the lock does not hold), theirs is as good as ours."""
    try:
        os.rename(building, entry)
    except OSError:
        if not os.path.isdir(entry):
            raise
        shutil.rmtree(building, ignore_errors=True)


def remove_killed_builds(cache_dir, own):
    """Remove what builds killed before they finished left behind: a `.building-` folder whose entry's lock nobody
    holds (a live builder holds it from start to end; `own` is the lock this process holds)."""
    for name in os.listdir(cache_dir):
        entry, marker, _ = name.partition(".building-")
        if not marker or not os.path.isdir(os.path.join(cache_dir, name)):
            continue
        lock_path = os.path.join(cache_dir, entry + ".lock")
        try:
            with contextlib.nullcontext() if lock_path == own.name else locked_file(lock_path, waiting=None):
                shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
            log.info(f"removed {name} from the cache: a build that was killed before it finished")
        except BlockingIOError:
            pass  # being built now


def wait_for_cache_entry(path, encoder, cache_dir) -> Tokenized:
    """A rank other than its machine's first: wait for the entry that rank builds; a wait of more than a few seconds
    says whom it waits for, once per machine and again every few minutes; follow the file if it changes meanwhile
    (the builder then tokenizes it again)."""
    waited, rank = time.perf_counter(), process_rank()
    said = waited - WAIT_REPORT_SECONDS + 2  # the first line after 2 s: a quick build says nothing
    identity, entry = None, None
    while True:
        if file_identity(path) != identity:
            identity = file_identity(path)
            file_digest.cache_clear()
            entry = os.path.join(cache_dir, tokenized_cache_entry(path, encoder))
        if os.path.isdir(entry) and (tokenized := read_cache_entry(path, entry, set_aside=False)):
            rank_log.info(f"rank {rank}: {path}: the cache entry {entry}, which local rank 0 built, is ready (waited "
                          f"{time.perf_counter() - waited:.1f} s)")
            return tokenized
        if os.path.exists(entry + ".error"):
            with open(entry + ".error") as f:
                raise DataError(f.read())
        if time.perf_counter() - said > WAIT_REPORT_SECONDS and local_rank() == 1:  # one line per machine
            said = time.perf_counter()
            rank_log.info(f"rank {rank} and the other ranks of this machine: waiting for "
                          f"{lock_holder(entry + '.lock') or 'local rank 0'} to tokenize {path} into {entry}")
        time.sleep(0.5)


def build_tokenized(path, kind, encoder, folder, num_workers, batch_size):
    """Tokenize `path` (of format `kind`) into `folder` (TOKENIZED_ARRAYS as raw files, meta.json with their sizes
    and checksums last), in up to `num_workers` processes that each take a contiguous run of lines (or rows); the
    result is the same for any number of workers. Returns how many worked (a file under 1 MB is not split)."""
    parts = split_into_line_runs(path, kind, num_workers)
    progress = Progress(f"tokenizing {path}", total=count_samples(path, kind))
    try:
        if len(parts) == 1:
            results = [tokenize_part(path, kind, encoder, folder, 0, parts[0], batch_size, progress.update)]
        else:
            results = tokenize_in_workers(path, kind, encoder, folder, parts, batch_size, progress)
    finally:
        progress.close()
    meta = {"version": TOKENIZED_FORMAT_VERSION, "source": path, "dropped": sum(r["dropped"] for r in results),
            "empty_assistant": sum(r["empty_assistant"] for r in results), "arrays": {}}
    offset_base = 0
    for name in TOKENIZED_ARRAYS:
        checksum, size = 0, 0
        with open(os.path.join(folder, f"{name}.bin"), "wb") as out:
            for k, result in enumerate(results):
                part_file = os.path.join(folder, f"{name}.part{k}")
                if name == "offsets":  # each part counts from 0: shift, and keep a single leading 0
                    offsets = np.fromfile(part_file, dtype=np.int64)
                    chunk = (offsets[(1 if k else 0):] + offset_base).tobytes()
                    offset_base += int(offsets[-1])
                else:
                    with open(part_file, "rb") as part:
                        chunk = part.read()
                out.write(chunk)
                checksum, size = zlib.crc32(chunk, checksum), size + len(chunk)
                os.remove(part_file)
        meta["arrays"][name] = {"bytes": size, "crc32": checksum}
    meta["samples"] = meta["arrays"]["offsets"]["bytes"] // 8 - 1
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return len(parts)


def split_into_line_runs(path, kind, parts):
    """[(first byte, end byte, first line number)]: `parts` runs of whole lines of a JSON Lines file (one run for a
    JSON array, which must be parsed whole, and for a file under 1 MB); for a table, runs of rows
    [(first row, end row, first row)]."""
    if kind in ("parquet", "hub"):  # runs of rows
        rows = table_length(path, kind)
        bounds = [rows * k // max(parts, 1) for k in range(max(parts, 1) + 1)] if rows >= 1000 else [0, rows]
        return [(start, end, start) for start, end in zip(bounds, bounds[1:])]
    size = os.path.getsize(path)
    if parts <= 1 or size < (1 << 20) or kind == "json":
        return [(0, size, 1)]
    runs, start, line = [], 0, 1
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(start, size * k // parts))
            f.readline()  # to the end of the line the cut falls in
            end = f.tell()
            if end >= size:
                break
            f.seek(start)
            runs.append((start, end, line))
            line += f.read(end - start).count(b"\n")
            start = end
    return runs + [(start, size, line)]


def tokenize_in_workers(path, kind, encoder, folder, parts, batch_size, progress):
    """tokenize_part for each of `parts` in a process of its own, forked so that it inherits the tokenizer. A worker
    that dies (killed, out of memory) ends the build with one line instead of leaving it waiting; a signal to this
    process stops the workers with it; a signal during the forks waits until they are done (a handler that ran in
    a fork hook would have its exit ignored)."""
    context = multiprocessing.get_context("fork")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    workers = []
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        for k, part in enumerate(parts):
            workers.append(context.Process(target=tokenizing_worker, daemon=True,
                                           args=(path, kind, encoder, folder, k, part, batch_size)))
            workers[-1].start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a signal that came meanwhile is handled now
    failed = None  # the first worker that died, not the ones stopped after it
    try:
        while running := [worker for worker in workers if worker.exitcode is None]:
            if failed := next((worker for worker in workers if worker.exitcode not in (None, 0)), None):
                break  # the others' work is of no use
            multiprocessing.connection.wait([worker.sentinel for worker in running], timeout=1)
            progress.update(samples_done(folder, len(parts)))
        progress.update(samples_done(folder, len(parts)))
    finally:
        for worker in workers:
            if worker.exitcode is None:
                worker.terminate()
            worker.join()
    outcomes = [read_outcome(folder, k) for k in range(len(workers))]
    for outcome in outcomes:  # the first data error in the file's order, whatever stopped the other workers
        if outcome and "data_error" in outcome:
            raise DataError(outcome["data_error"])
    failed = failed or next((worker for worker, outcome in zip(workers, outcomes) if outcome is None), None)
    if failed is not None:
        how = (f"was killed by {signal.Signals(-failed.exitcode).name}" if failed.exitcode < 0
               else f"failed (exit {failed.exitcode})")
        raise UserError(f"{path}: a tokenizing worker {how}; if it ran out of memory, use fewer "
                        "--preprocessing_num_workers")
    return [outcome["counts"] for outcome in outcomes]


def samples_done(folder, parts):
    """How many samples the workers have tokenized so far: each writes a 4-byte length for every one it has done."""
    return sum(os.path.getsize(path) // 4 for k in range(parts)
               if os.path.exists(path := os.path.join(folder, f"full_lengths.part{k}")))


def count_samples(path, kind):
    """How many samples a file holds, for the progress of its build: its rows, or lines (JSON Lines, read fast);
    None for a JSON array (known only once parsed)."""
    if kind in ("parquet", "hub"):
        return table_length(path, kind)
    if kind == "json":
        return None
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")


def tokenizing_worker(path, kind, encoder, folder, k, part, batch_size):
    """A tokenizing process: it leaves its outcome in `outcome.part{k}`, its counts or the data error it met."""
    become_helper_process()
    try:
        outcome = {"counts": tokenize_part(path, kind, encoder, folder, k, part, batch_size)}
    except DataError as e:
        outcome = {"data_error": str(e)}
    with open(os.path.join(folder, f"outcome.part{k}"), "w") as f:
        json.dump(outcome, f)


def read_outcome(folder, k):
    """What worker k left, or None if it died first."""
    try:
        with open(os.path.join(folder, f"outcome.part{k}")) as f:
            outcome = json.load(f)
    except (OSError, ValueError):
        return None
    os.remove(os.path.join(folder, f"outcome.part{k}"))
    return outcome


def tokenize_part(path, kind, encoder, folder, k, part, batch_size, progress=None):
    """Tokenize one run of samples into `{name}.part{k}` files; returns what it dropped and noticed. `progress` is
    told the number of samples done after each batch."""
    files = {name: open(os.path.join(folder, f"{name}.part{k}"), "wb") for name in TOKENIZED_ARRAYS}
    dropped, empty_assistant, total, done = 0, 0, 0, 0
    np.zeros(1, np.int64).tofile(files["offsets"])

    def add(encoded):
        nonlocal total, dropped, done
        done += len(encoded)
        if progress:
            progress(done)
        for example, full_length in encoded:
            np.int32(full_length).tofile(files["full_lengths"])
            if example is None:
                dropped += 1
                continue
            example["input_ids"].tofile(files["input_ids"])
            example["labels"].tofile(files["labels"])
            total += len(example["input_ids"])
            np.int64(total).tofile(files["offsets"])

    try:
        for batch in parsed_batches(path, kind, encoder, batch_size, part):
            empty_assistant += sum(conversation.has_empty_assistant_message() for conversation in batch)
            add(encoder.encode_with_lengths(batch))
    finally:
        for f in files.values():
            f.close()
    return {"dropped": dropped, "empty_assistant": empty_assistant}


def parsed_batches(path, kind, encoder, batch_size, part=()):
    """The samples of a file (or of one run of it, `part`: iter_raw_samples' start, end, first line number) as
    conversations, in lists of up to `batch_size` for the tokenizer's batched calls."""
    batch = []
    for where, sample, _ in iter_raw_samples(path, kind, *part):
        batch.append(encoder.parse(sample, where))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class LazySupervisedDataset(TrainingData):
    """Checks every sample up front but tokenizes each one only when it is used.

    Memory stays flat as the file grows: for JSON Lines it keeps one byte offset per kept sample, never the
    parsed samples (a JSON array has to be parsed whole, so there the parsed samples are kept)."""

    def __init__(self, path, encoder, kind=None):
        self.path, self.encoder, self.dropped, self.empty_assistant = path, encoder, 0, 0
        self.kind = kind or detect_format(path)  # resolve_sources recorded it; detected here for a file given alone
        self.is_jsonl = self.kind == "jsonl"
        self.samples = None if self.is_jsonl else []
        self.locations = array("q")  # byte offset (JSONL) or index into self.samples (JSON) of each kept sample
        self.group_lengths = array("i")  # estimated tokens, capped at the token limit
        progress = Progress(f"checking {path}", total=count_samples(path, self.kind), show=is_local_main_process())
        for where, sample, location in iter_raw_samples(path, self.kind):
            progress.update(progress.done + 1)
            conversation = encoder.parse(sample, where)
            self.empty_assistant += conversation.has_empty_assistant_message()
            text, spans = encoder.render(conversation)
            if not encoder.surely_keeps_a_trained_token(text, spans) and encoder.encode([conversation])[0] is None:
                self.dropped += 1
                continue
            # Qwen's tokens average about 4 UTF-8 bytes in English and about 3 (one character) in Chinese.
            self.group_lengths.append(min(len(text.encode("utf-8")) // 4 + 1, encoder.model_max_length))
            if self.samples is not None:
                self.samples.append(sample)
                location = len(self.samples) - 1
            self.locations.append(location)
        progress.close()
        if not self.locations and not self.dropped:
            raise DataError(f"{path}: holds no samples")

    def __len__(self):
        return len(self.locations)

    def example(self, i):
        location = self.locations[i]
        if self.is_jsonl:
            with open(self.path, "rb") as f:
                f.seek(location)
                where = f"{self.path} at byte {location}"
                sample = parse_json(f.readline(), where)
        else:
            where, sample = f"{self.path} sample {location}", self.samples[location]
        return self.encoder.encode([self.encoder.parse(sample, where)])[0]

    @functools.cached_property
    def full_lengths(self):
        """Tokenizes every sample once (only the preview asks)."""
        return np.array([length for batch in parsed_batches(self.path, self.kind, self.encoder, 1000)
                         for _, length in self.encoder.encode_with_lengths(batch)], dtype=np.int64)


def make_dataset(sources, encoder, data_args, seed=0):
    """The samples of every resolved source (of --data_path or --eval_data_path), each file tokenized (or, with
    --lazy_preprocess, checked) on its own, and from each source the samples its #count or #fraction asks for,
    chosen by `seed`."""
    parts, part_of, index_in_part, reports = [], [], [], []
    for k, source in enumerate(sources):
        check_parts_still_there(source)
        source_encoder = encoder.for_source(source.mapping)
        datasets = [LazySupervisedDataset(path, source_encoder, kind) if data_args.lazy_preprocess else
                    SupervisedDataset(path, source_encoder, cache_dir=data_args.data_cache_dir,
                                      num_workers=data_args.preprocessing_num_workers, kind=kind)
                    for path, kind in zip(source.parts, source.kinds, strict=True)]  # resolve_sources filled kinds
        sizes = np.array([len(d) for d in datasets])
        if isinstance(source.take, float) and sizes.sum():
            if round(source.take * sizes.sum()) == 0:
                raise UserError(f"{source.where}: that fraction of its {sizes.sum():,} kept samples is "
                                "none; take a larger fraction or a count")
            check_sample_count(source.where, round(source.take * sizes.sum()))
        chosen = choose_samples(int(sizes.sum()), source.take, np.random.default_rng([seed, k]))
        which = np.searchsorted(np.cumsum(sizes), chosen, side="right")
        part_of.append(which + len(parts))
        index_in_part.append(chosen - np.concatenate([[0], np.cumsum(sizes)])[which])
        parts += datasets
        reports.append(report_source(source, datasets, len(chosen)))
    dataset = MixedDataset(parts, np.concatenate(part_of), np.concatenate(index_in_part), reports)
    if len(dataset) == 0:  # every source held samples: they were all dropped
        specs = ", ".join(source.spec for source in sources)
        raise DataError(f"{specs}: every sample was dropped ({DROP_REASON_TRUNCATED}); raise "
                        "--model_max_length")
    return dataset


def check_parts_still_there(source):
    """Rank 0 resolved the sources; on every other node (or after a file went away since) its files must still be
    there, or the run stops in one line instead of a traceback."""
    for part in source.parts:
        if not part.startswith(HUB_PREFIX) and not os.path.isfile(part):
            raise DataError(f"{part}: file not found on this machine ({source.where})")


def choose_samples(total, take, rng):
    """Indices of the samples a source gives: all; a count (every sample as often as it fits, the rest drawn
    without repeats); or a fraction of the total."""
    if take is None or total == 0:
        return np.arange(total)
    count = take if isinstance(take, int) else int(round(take * total))
    repeats, rest = divmod(count, total)
    return np.sort(np.concatenate([np.tile(np.arange(total), repeats), rng.choice(total, rest, replace=False)]))


def report_source(source, datasets, taken):
    """One line per source: samples read, kept, dropped (and why), taken; logged, and shown by --preprocess_only."""
    dropped, empty_assistant = sum(d.dropped for d in datasets), sum(d.empty_assistant for d in datasets)
    kept = sum(len(d) for d in datasets)
    why = f" ({dropped} with {DROP_REASON_TRUNCATED})" if dropped else ""
    files = f" from {source.matched_files} file(s)" if source.matched_files is not None else ""
    line = f"{source.spec}: {kept + dropped:,} read{files}, {kept:,} kept, {dropped:,} dropped{why}, {taken:,} taken"
    log.warning(line) if dropped else log.info(line)
    if empty_assistant:
        log.warning(f"{source.spec}: {empty_assistant} sample(s) with {NOTICE_EMPTY_ASSISTANT}")
    return line


class MixedDataset(TrainingData):
    """The samples taken from several data sets: sample i is parts[part_of[i]][index_in_part[i]]."""

    def __init__(self, parts, part_of, index_in_part, reports):
        self.parts, self.part_of, self.index_in_part, self.reports = parts, part_of, index_in_part, reports
        self.dropped = sum(part.dropped for part in parts)
        self.empty_assistant = sum(part.empty_assistant for part in parts)

    def __len__(self):
        return len(self.index_in_part)

    def example(self, i):
        return self.parts[self.part_of[i]].example(int(self.index_in_part[i]))

    def from_parts(self, per_part):
        """Each sample's value of `per_part(part)` (one value per sample of that part)."""
        values = np.zeros(len(self), dtype=np.int64)
        for k, part in enumerate(self.parts):
            mine = self.part_of == k
            values[mine] = np.asarray(per_part(part))[self.index_in_part[mine]]
        return values

    @property
    def group_lengths(self):
        return self.from_parts(lambda part: part.group_lengths)

    def token_counts(self):
        return self.from_parts(lambda part: part.token_counts())

    @property
    def full_lengths(self):
        return np.concatenate([np.asarray(part.full_lengths) for part in self.parts])


class ExampleSubset(TrainingData):
    """Part of a dataset (a side of the --val_size split): its own samples; the whole set's reading report (what was
    read, dropped, and the lengths before truncation)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices
        self.reports, self.dropped, self.empty_assistant = dataset.reports, dataset.dropped, dataset.empty_assistant

    def __len__(self):
        return len(self.indices)

    def example(self, i):
        return self.dataset.example(self.indices[i])

    @property
    def group_lengths(self):
        return np.asarray(self.dataset.group_lengths)[self.indices]

    def token_counts(self):
        return self.dataset.token_counts()[self.indices]

    @property
    def full_lengths(self):
        return self.dataset.full_lengths


def split_off_validation(dataset, val_size, seed):
    """(train, validation): a held-out fraction or number of samples, the same for the same --seed."""
    count = int(round(val_size * len(dataset))) if val_size < 1 else int(val_size)
    if not 0 < count < len(dataset):
        raise UserError(f"--val_size {val_size} leaves no training or no validation sample out of {len(dataset)}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    log.info(f"holding out {count} of {len(dataset)} training samples for evaluation (--val_size {val_size})")
    return ExampleSubset(dataset, sorted(order[count:].tolist())), ExampleSubset(dataset, sorted(order[:count].tolist()))


@dataclass
class PadToLongestCollator:
    """Pads a batch to its own longest sample, never to model_max_length."""

    pad_token_id: int
    # Sequence parallelism: rows split evenly over N ranks, positions that survive the split, maybe one length.
    multiple_of: int = 1
    position_ids: bool = False
    length: Optional[int] = None

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:  # each [batch, longest]
        longest = self.length or max(len(e["input_ids"]) for e in examples)
        longest = -(-longest // self.multiple_of) * self.multiple_of
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if self.position_ids:
            batch["position_ids"] = torch.arange(longest).expand(len(examples), longest).clone()
        return batch


def make_collator(tokenizer, packing, sequence_parallel_size=1, model_max_length=None):
    if sequence_parallel_size > 1:
        return PadToLongestCollator(tokenizer.pad_token_id, multiple_of=sequence_parallel_size, position_ids=True,
                                    length=sequence_parallel_row_length(model_max_length))
    if packing:
        # One row per batch, position ids restarting at 0 per sample, no attention mask: the attention
        # implementations then keep samples apart (tests check it); IGNORE_INDEX labels the first token of each.
        # The sample boundaries (cu_seq_lens_*) too: flash attention and the linear-attention layers take them.
        return transformers.DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                       return_flash_attn_kwargs=True)
    return PadToLongestCollator(tokenizer.pad_token_id)


def load_tokenizer(model_args, training_args):
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            model_max_length=training_args.model_max_length,
            padding_side="right",
            trust_remote_code=model_args.trust_remote_code,
        )
    except OSError as e:  # a mistyped folder or hub id, or a hub that cannot be reached: the first load to notice
        raise UserError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load a tokenizer from it "
                        f"({first_line(e)})") from None
    if tokenizer.pad_token is None:
        # Qwen's pad is <|endoftext|>; the attention mask, not the id, keeps pads out of attention.
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# 5. Preview: what exactly will be trained
# ----------------------------------------------------------------------------------------------------------

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def describe_dataset(dataset, tokens=None, trained=None):
    """A short report: samples kept and dropped, token counts, lengths. `tokens` (each sample's) and `trained` (the
    total) when a pass over the samples has counted them already."""
    tokens = dataset.token_counts() if tokens is None else np.asarray(tokens)
    trained = dataset.trained_tokens() if trained is None else trained
    lines = list(dataset.reports)
    lines += [f"samples kept: {len(dataset)}", f"samples dropped: {dataset.dropped}"]
    if dataset.dropped:
        lines.append(f"  {dataset.dropped} with {DROP_REASON_TRUNCATED}")
    if dataset.empty_assistant:
        lines.append(f"notice: {dataset.empty_assistant} sample(s) with {NOTICE_EMPTY_ASSISTANT}")
    if len(tokens):
        lines += [
            f"tokens: {tokens.sum()} in all, {trained} trained ({100 * trained / tokens.sum():.1f}%)",
            f"length in tokens: min {tokens.min()}, mean {tokens.mean():.1f}, max {tokens.max()}",
        ]
    return "\n".join(lines)


def length_histogram(full_lengths, model_max_length, rows=8, width=40):
    """Sample lengths (before truncation) in the terminal, with what --model_max_length cuts marked."""
    full_lengths = np.asarray(full_lengths)
    step = max(1, -(-model_max_length // rows))  # ceil
    edges = [(i * step, min((i + 1) * step, model_max_length)) for i in range(rows)]
    counts = [int(((full_lengths > lo) & (full_lengths <= hi)).sum()) for lo, hi in edges]
    labels = [f"{lo + 1:>6}-{hi:<6}" for lo, hi in edges]
    counts.append(int((full_lengths > model_max_length).sum()))
    labels.append(f"> {model_max_length:<11}")
    scale = width / max(max(counts), 1)
    lines = [f"sample lengths in tokens (before truncation), --model_max_length {model_max_length}:"]
    for label, count in zip(labels, counts):
        lines.append(f"  {label} {'#' * int(round(count * scale)):<{width}} {count}")
    lines[-1] += "  <- cut to model_max_length" if counts[-1] else ""
    return "\n".join(lines)


def show_trained_spans(example, tokenizer):
    """The example's text with every trained run of tokens between ⟦ and ⟧."""
    pieces, run, run_trained = [], [], None
    for token_id, label in list(zip(example["input_ids"], example["labels"])) + [(None, None)]:
        trained = label is not None and label != IGNORE_INDEX
        if run and (token_id is None or trained != run_trained):
            text = tokenizer.decode(run)
            pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if run_trained else text)
            run = []
        run.append(token_id)
        run_trained = trained
    return "".join(pieces)


def write_tokenized(dataset, path):
    """Every example as a JSON line; returns (each one's tokens, the trained tokens), counted on the way (a lazy
    dataset tokenizes each sample once for both)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tokens, trained = [], 0
    with open(path, "w", encoding="utf-8") as f:
        for example in dataset.examples:
            f.write(json.dumps(as_lists(example)) + "\n")
            tokens.append(len(example["input_ids"]))
            trained += trained_in(example)
    return tokens, trained


def preview(dataset, tokenizer, output_dir, model_max_length, held_out=0):
    dump_path = os.path.join(output_dir, "tokenized_train.jsonl")
    tokens, trained = write_tokenized(dataset, dump_path)
    if held_out:
        print(f"{held_out:,} samples are held out for evaluation (--val_size); the counts of kept samples and tokens "
              "and the dump below are of the samples trained")
    print(describe_dataset(dataset, tokens, trained))
    print("\n" + length_histogram(dataset.full_lengths, model_max_length))
    if len(dataset):
        print(f"\nfirst sample; trained tokens are between {TRAINED_OPEN} and {TRAINED_CLOSE}:\n")
        print(show_trained_spans(dataset[0], tokenizer))
    print(f"\nwrote every kept example (input_ids, labels) to {dump_path}")


# ----------------------------------------------------------------------------------------------------------
# 6. Model: full, LoRA or QLoRA
# ----------------------------------------------------------------------------------------------------------

def compute_dtype(training_args):
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def check_model_files(model_args):
    """A model folder with no config, an unknown model type, or missing or truncated weights: one line, before the
    data is tokenized, instead of a traceback after it."""
    path = model_args.model_name_or_path
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model_name_or_path {path}: cannot load its config ({first_line(e)})") from None
    if not os.path.isdir(path):
        return config  # a hub id: the hub's files are checked by the download
    if not holds_weights(os.listdir(path)):
        raise UserError(f"--model_name_or_path {path}: no model weights (*.safetensors) in that folder")
    if problem := weights_problem(path):
        raise UserError(f"--model_name_or_path {path}: {problem}")
    return config


def load_model(model_args, training_args, lora_args):
    dtype = compute_dtype(training_args)
    load_kwargs = {"dtype": dtype, "trust_remote_code": model_args.trust_remote_code}
    if model_args.attn_implementation:
        load_kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.experts_implementation:
        load_kwargs["experts_implementation"] = model_args.experts_implementation
    if model_args.rope_scaling:
        load_kwargs["config"] = with_yarn(model_args)
    if lora_args.q_lora:
        load_kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # lm_head (bitsandbytes' own default) and the gates stay in 16 bits: a few outputs each, nothing to
            # save, and they decide routing and recurrent decay, where 4-bit error costs most.
            llm_int8_skip_modules=["lm_head", *LORA_LEFT_OUT],
        )
        # A quantized model cannot be moved after loading: put it on this process's device right away.
        load_kwargs["device_map"] = {"": training_args.device}
    config = load_kwargs.get("config") or transformers.AutoConfig.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    try:
        model = model_class(config).from_pretrained(model_args.model_name_or_path, **load_kwargs)
    except (OSError, ValueError, KeyError) as e:  # files the start-up check could not see (a hub download)
        raise UserError(f"--model_name_or_path {model_args.model_name_or_path}: cannot load the model "
                        f"({first_line(e)})") from None
    set_use_cache(model, False)  # the cache only costs memory in training, and it would undo packing's isolation
    if dtype != torch.float32 and not lora_args.q_lora and not uses_zero3() and (
            folder := local_model_folder(model_args.model_name_or_path)):
        keep_stored_fp32(model, folder)  # ZeRO-3 has partitioned the weights: they are retyped when saved
    if training_args.packing:
        keep_packed_samples_apart(model)

    if lora_args.use_lora:
        # The adapter's random start follows --seed alone, not the random numbers loading used (ZeRO-3's
        # partitioned loading takes others than DDP's): the same run under either engine starts the same.
        transformers.set_seed(training_args.seed)
        model = add_lora(model, training_args, lora_args)
    else:
        freeze_all_but_the_language_model(model)
    if uses_zero3():
        gather_expert_blocks_whole(model)
    log_trainable_parameters(model)
    return model


# Model types on which the tests prove packed rows exact (each sample's logits as if run alone), attention kinds that
# keep packed samples apart by their position ids (flex attention was seen to give wrong values).
PACKING_MODEL_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_text",
                       "qwen3_5_moe", "qwen3_5_moe_text")
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def check_attention(model_config, attn_implementation):
    """An attention implementation the model's class does not support (Qwen3.8-Flash-Next's sparse attention has no
    flash-attention path): one line now, not an error from transformers after the data is tokenized."""
    mapping = model_class(model_config)._model_mapping
    if not attn_implementation or type(model_config) not in mapping:
        return
    cls = mapping[type(model_config)]
    supported = {"flash_attention_2": "_supports_flash_attn", "flash_attention_3": "_supports_flash_attn",
                 "sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}.get(attn_implementation)
    if supported and getattr(cls, supported, True) is False:
        raise UserError(f"--attn_implementation {attn_implementation}: {cls.__name__} ({model_config.model_type}) has "
                        "no such path; use sdpa or eager")


GDN_KERNELS = "flash-linear-attention and causal-conv1d"  # what the Gated DeltaNet layers' fast path needs


def gdn_kernels_available(device_type):
    """Whether the Gated DeltaNet layers will run on their kernels (both packages, on a device both support:
    CUDA), not on transformers' PyTorch reference (a loop over chunks in Python)."""
    from transformers.utils.import_utils import is_causal_conv1d_available, is_flash_linear_attention_available

    return device_type == "cuda" and is_flash_linear_attention_available() and is_causal_conv1d_available()


def is_hybrid(config):
    return "linear_attention" in (getattr(config.get_text_config(), "layer_types", None) or [])


def check_kernels(model_config, training_args):
    """A hybrid model on a GPU without its kernels would train several times slower, with one warning line per
    process from transformers: stopped in one line before anything slow, unless --allow_slow_kernels. On the CPU
    the reference is all there is (a line of the start-up report)."""
    device = training_args.device.type
    if not is_hybrid(model_config) or device == "cpu" or gdn_kernels_available(device):
        return
    if not training_args.allow_slow_kernels:
        raise UserError(f"this model's Gated DeltaNet layers need {GDN_KERNELS} on a GPU (pip install "
                        "flash-linear-attention causal-conv1d); without them they run on a PyTorch reference several "
                        "times slower: add --allow_slow_kernels true to train so on purpose")
    log.warning(f"the Gated DeltaNet layers run on their PyTorch reference (--allow_slow_kernels): without {GDN_KERNELS} "
                "a step takes several times longer")


def paths_that_run(model, model_args, training_args, lora_args):
    """The start-up report: one line per path a step takes, so that a slow fallback is seen before the first step
    rather than guessed from the speed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.config.get_text_config()
    attention = getattr(text, "_attn_implementation", None) or model_args.attn_implementation or DEFAULT_ATTENTION
    device = training_args.device.type
    packing = f"; packed samples kept apart ({'exact' if attention in PACKING_ATTENTION else 'not exact'})" \
        if training_args.packing else ""
    lines = [f"attention: {attention}{packing}"]
    if is_hybrid(base.config):
        kernels = f"{GDN_KERNELS} kernels" if gdn_kernels_available(device) else \
            f"their PyTorch reference ({GDN_KERNELS}: {'GPUs only' if device == 'cpu' else 'not installed'})"
        lines.append(f"Gated DeltaNet layers: {kernels}" + ("; a packed row runs sample by sample there"
                                                            if training_args.packing else ""))
    if is_moe(base.config):
        chosen = getattr(text, "_experts_implementation", None) or "eager"
        why = "--experts_implementation" if model_args.experts_implementation else "transformers' default for this torch"
        lines.append(f"experts: {chosen} ({why})")
    if lora_args.q_lora:
        import bitsandbytes

        lines.append(f"4-bit base: bitsandbytes {bitsandbytes.__version__}, NF4, on {device}")
    lines.append(f"loss: chunked, {training_args.loss_chunk_size} positions a chunk (no logits of every position)"
                 if training_args.chunked_loss else "loss: the model's own (logits of every position)")
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    lines.append(f"activation checkpointing: {'on' if training_args.activation_checkpointing else 'off'}; "
                 f"precision: {precision} on {device}")
    stage = deepspeed_zero_stage(training_args)
    if stage is not None:
        zero = deepspeed_config(training_args).get("zero_optimization", {})
        offload = [f"{what} to {zero[key]['device']}" for what, key in (("optimizer", "offload_optimizer"),
                                                                          ("parameters", "offload_param"))
                   if isinstance(zero.get(key), dict) and zero[key].get("device") not in (None, "none")]
        lines.append(f"DeepSpeed ZeRO-{stage}" + (f", offloading {' and '.join(offload)}" if offload else ""))
    return lines


def check_packing(model_config, attn_implementation, packing):
    """--packing only where it is exact: refused, before the model loads, for model types the tests do not cover."""
    if not packing:
        return
    model_type = model_config.model_type
    if model_type not in PACKING_MODEL_TYPES:
        raise UserError(f"--packing has not been verified on model type '{model_type}' (packed samples could see each "
                        f"other); it is on {', '.join(PACKING_MODEL_TYPES)}. Train without --packing")
    attention = attn_implementation or DEFAULT_ATTENTION
    if attention not in PACKING_ATTENTION:
        raise UserError(f"--packing with --attn_implementation {attention}: packed samples would see each other; use "
                        f"one of {', '.join(PACKING_ATTENTION)}")


def keep_packed_samples_apart(model):
    """Packing on a hybrid model (Qwen3.5/3.6/3.8, Qwen3-Next): attention layers keep packed samples apart by their
    position ids, but a linear-attention (Gated DeltaNet) layer carries a recurrent state and a causal convolution
    along the row, from one sample into the next. Each such layer instead runs on the row's samples as a batch of
    their own (cut at the collator's cu_seq_lens, padded at the end, which no earlier position sees): exact with
    the PyTorch fallback and with the flash-linear-attention kernels alike.

    Hooks, not a replaced forward: transformers 5.25 with the `kernels` package re-selects every layer's forward
    when the model changes between train() and eval(), which dropped a forward set on the layer."""
    for module in list(model.modules()):
        layer = getattr(module, "linear_attn", None)
        if isinstance(layer, torch.nn.Module):
            layer.packed_row_lengths = []  # a stack: one entry per call in progress (None: not a packed row)
            layer.register_forward_pre_hook(split_packed_row, with_kwargs=True)
            layer.register_forward_hook(join_packed_row, with_kwargs=True)


def split_packed_row(layer, args, kwargs):
    """Before a linear-attention layer: a packed row [1, tokens, hidden] becomes its samples [samples, longest,
    hidden], and the row's boundaries are taken out of what the layer sees."""
    boundaries = kwargs.pop("cu_seq_lens_q", None)
    layer.packed_row_lengths.append(None if boundaries is None else boundaries.diff().tolist())
    if boundaries is None:
        return args, kwargs
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    samples = torch.nn.utils.rnn.pad_sequence(hidden_states[0].split(layer.packed_row_lengths[-1]), batch_first=True)
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": samples, "attention_mask": None}
    return (samples, *args[1:]), {**kwargs, "attention_mask": None}


def join_packed_row(layer, args, kwargs, output):
    """After it: the samples' outputs [samples, longest, hidden] back into one row [1, tokens, hidden]."""
    lengths = layer.packed_row_lengths.pop()
    if lengths is None:
        return output
    real = torch.arange(output.shape[1], device=output.device)[None] < torch.tensor(lengths, device=output.device)[:, None]
    return output[real][None]


def model_class(config):
    """The class the checkpoint declares. Every Qwen3.5/3.6/3.8 checkpoint is a multimodal
    ...ForConditionalGeneration: loaded as such (AutoModelForCausalLM would give the text-only class), its vision tower
    is saved with the result, and adapter keys are those the checkpoint's own class (and vLLM) load."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    declared = (getattr(config, "architectures", None) or [None])[0]
    if declared is not None and declared == MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def set_use_cache(model, on):
    """In the language model's config: a multimodal model keeps it in a config of its own, where setting the top
    one would change nothing (and add a key to the saved config)."""
    model.config.get_text_config().use_cache = on


def language_model_parameters(model):
    """The parameters text training can reach: the language model (embeddings and decoder layers) and lm_head."""
    modules = [model.get_decoder(), model.get_output_embeddings()]
    return {id(p) for module in modules if module is not None for p in module.parameters()}


def freeze_all_but_the_language_model(model):
    """Full fine-tuning of a multimodal checkpoint: text data gives its vision tower no gradient, so it is frozen
    (DDP would otherwise wait for gradients that never come) and saved exactly as loaded; so are the modules no
    gradient reaches by design (NO_GRADIENT_MODULES)."""
    trained = language_model_parameters(model)
    frozen = [p for p in model.parameters() if id(p) not in trained]
    for p in frozen:
        p.requires_grad_(False)
    if frozen:
        log.info(f"full fine-tuning of the language model; {sum(full_numel(p) for p in frozen):,} parameters outside "
                 "it (the vision tower) are frozen and saved unchanged")
    without_gradient = [p for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in NO_GRADIENT_MODULES
                        for p in module.parameters() if p.requires_grad]
    for p in without_gradient:
        p.requires_grad_(False)
    if without_gradient:
        log.info(f"{sum(full_numel(p) for p in without_gradient):,} parameters of the sparse-attention indexer are "
                 "frozen: it selects the positions each query attends to, which passes no gradient back")


def with_yarn(model_args):
    """The model's config with its rotary positions stretched by YaRN: positions are interpolated by `factor`
    (the native context times `factor` becomes the model's length) and attention is rescaled to match. A
    multimodal checkpoint keeps them in its language model's config."""
    whole = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path,
                                                    trust_remote_code=model_args.trust_remote_code)
    config = whole.get_text_config()
    rope = dict(config.rope_parameters or {})
    native = rope.get("original_max_position_embeddings") if rope.get("rope_type") == "yarn" else None
    native = model_args.rope_native_length or native or config.max_position_embeddings
    factor = model_args.rope_scaling
    config.rope_parameters = {**rope, "rope_type": "yarn", "factor": factor,
                              "original_max_position_embeddings": native}
    config.max_position_embeddings = int(native * factor)
    log.info(f"YaRN: positions stretched {factor:g}x, from the model's native {native:,} to "
             f"{config.max_position_embeddings:,} tokens")
    return whole


def add_lora(model, training_args, lora_args):
    import peft  # imported here so that data errors and --preprocess_only never pay for it

    if lora_args.q_lora:
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=training_args.activation_checkpointing,  # peft 0.21 keeps the old names
            gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs,
        )
    if training_args.activation_checkpointing:
        # With frozen embeddings, checkpointed blocks would see inputs that need no grad and skip the adapters.
        model.enable_input_require_grads()
    if lora_args.lora_weight_path:
        log.info(f"continuing from the adapter in {lora_args.lora_weight_path}")
        model = peft.PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    else:
        targets = lora_targets(model, lora_args)
        config = peft.LoraConfig(
            r=lora_args.lora_r,
            lora_alpha=lora_args.lora_alpha,
            # peft applies no dropout to adapters of parameters (the experts): set per adapter below
            lora_dropout=0.0 if targets["target_parameters"] else lora_args.lora_dropout,
            bias=lora_args.lora_bias,
            modules_to_save=lora_args.lora_modules_to_save or None,
            task_type="CAUSAL_LM",
            **targets,
        )
        with warnings.catch_warnings():
            # Workaround (peft 0.21): on models whose checkpoints fuse their experts when loading (Qwen3-Next), peft
            # guesses that a shared expert's gate_proj/up_proj meant the fused experts and warns that its guess
            # matched nothing; the adapters are as asked. It can go when peft guesses only for expert names.
            warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
            model = peft.get_peft_model(model, config)
    apply_lora_dropout(model, lora_args.lora_dropout)
    return model


# Linear layers that LoRA leaves alone unless named: gates with a few outputs each, where an adapter of rank r is no
# smaller than the layer itself (Gated DeltaNet's per-head in_proj_a and in_proj_b, fused as in_proj_ba in
# Qwen3-Next; the shared expert's one-output gate), the MoE router ("gate"), and Qwen3.8-Flash-Next's sparse-attention
# indexer (index_qk_proj), which no gradient reaches. QLoRA keeps them in 16 bits.
LORA_LEFT_OUT = ("in_proj_a", "in_proj_b", "in_proj_ba", "shared_expert_gate", "gate", "index_qk_proj")
# Modules of a model that no gradient reaches by design: Qwen3.8-Flash-Next's (qwen4_exp) sparse-attention indexer
# picks the positions each query attends to (a top-k, which has no gradient). Frozen in full fine-tuning (DDP would
# wait for their gradients), never adapted by LoRA.
NO_GRADIENT_MODULES = ("indexer",)
EXPERTS = "experts"  # in --lora_target_modules: the fused expert weights of a MoE model


def lora_targets(model, lora_args):
    """peft's targets for --lora_target_modules, within the decoder layers of the language model (never the vision
    tower, never lm_head). 'all-linear': every linear projection there but LORA_LEFT_OUT, plus, on a MoE model, the
    experts' fused 3-D weights (through peft's target_parameters). Named modules must each match a projection of
    the decoder layers."""
    decoder = model.get_decoder()
    in_layers = [(name, module) for name, module in decoder.named_modules() if name.startswith("layers.")]
    linear_names = [name for name, module in in_layers if isinstance(module, torch.nn.Linear)]
    linear = {name.rsplit(".", 1)[-1] for name in linear_names}
    experts = sorted({".".join(name.split(".")[-2:]) for name, p in decoder.named_parameters()
                      if name.startswith("layers.") and name.split(".")[-2] == EXPERTS
                      and len(getattr(p, "ds_shape", p.shape)) == 3})  # [experts, out, in] each
    routers = sorted({f"{name.rsplit('.', 1)[-1]}.gate.weight" for name, module in in_layers if is_expert_block(module)})
    requested = lora_args.lora_target_modules
    if requested == ["all-linear"]:
        modules, parameters = sorted(linear - set(LORA_LEFT_OUT)), experts
    else:
        unknown = [name for name in requested if not (name == EXPERTS and experts) and not any(
            linear_name.endswith(f".{name}") for linear_name in linear_names)]  # peft's rule: a suffix of names
        if unknown:
            raise UserError(f"--lora_target_modules {','.join(unknown)}: matched nothing in the decoder layers of this "
                            f"model (its projections: {', '.join(sorted(linear))}"
                            f"{f'; {EXPERTS} for its fused expert weights' if experts else ''})")
        modules, parameters = [name for name in requested if name != EXPERTS], experts if EXPERTS in requested else []
    if lora_args.lora_router:
        parameters = [*parameters, *routers]
    in_decoder = {id(module) for _, module in in_layers}
    # Same-named projections elsewhere (a vision tower's) stay as they are.
    elsewhere = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                 and id(module) not in in_decoder and any(f".{name}".endswith(f".{target}") for target in modules)]
    return {"target_modules": modules, "target_parameters": parameters or None, "exclude_modules": elsewhere or None}


def check_lora_targets(model_config, lora_args):
    """--lora_target_modules resolved at start-up on the model's skeleton (its modules on the meta device, no
    weights): a name that matches nothing stops the run before the data is tokenized and the weights load."""
    mapping = model_class(model_config)._model_mapping  # the auto class's: model type -> class
    if not lora_args.use_lora or lora_args.lora_weight_path or type(model_config) not in mapping:
        return  # a model with code of its own: its targets are checked when it loads
    with torch.device("meta"), without_zero3_init():
        skeleton = mapping[type(model_config)](model_config)
    lora_targets(skeleton, lora_args)
    names = [name for name, _ in skeleton.named_modules()]
    if unknown := [target for target in lora_args.lora_modules_to_save
                   if not any(f".{name}".endswith(f".{target}") for name in names)]:
        raise UserError(f"--lora_modules_to_save {','.join(unknown)}: no module of this model has that name "
                        "(e.g. embed_tokens, lm_head)")


def is_expert_block(module):
    """A mixture-of-experts block (Qwen's ...SparseMoeBlock): its router `gate` and its fused `experts`."""
    return isinstance(getattr(module, EXPERTS, None), torch.nn.Module) and hasattr(module, "gate")


def is_moe(config):
    return bool(getattr(config.get_text_config(), "num_experts", 0))


def router_aux_loss_coef(config, training_args):
    """The weight of the router's load-balancing loss in ours: --router_aux_loss_coef, else the model's own."""
    if not is_moe(config):
        return 0.0
    if training_args.router_aux_loss_coef is not None:
        return training_args.router_aux_loss_coef
    return float(getattr(config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0)


def check_moe_flags(model_config, model_args, training_args, lora_args):
    """The MoE flags only on a model with experts; a router loss only where ours is exact."""
    if not is_moe(model_config):
        given = [flag for flag, value in (("--router_aux_loss_coef", training_args.router_aux_loss_coef),
                                          ("--lora_router", lora_args.lora_router or None),
                                          ("--experts_implementation", model_args.experts_implementation))
                 if value is not None]
        if given:
            raise UserError(f"{given[0]}: this model ({model_config.model_type}) has no experts; drop the flag")
        return
    if router_aux_loss_coef(model_config, training_args) and training_args.sequence_parallel_size > 1:
        # Each rank would balance its own slice of a sequence, which is not the balance over the whole sequence.
        raise UserError(f"--sequence_parallel_size {training_args.sequence_parallel_size}: the router's "
                        "load-balancing loss cannot be computed over split sequences; add --router_aux_loss_coef 0 "
                        "to train without it, or train without sequence parallelism")
    if lora_args.lora_router and not lora_args.use_lora:
        raise UserError("--lora_router adapts the router with LoRA: it needs --use_lora (full fine-tuning trains "
                        "the router anyway)")


def apply_lora_dropout(model, p):
    """peft refuses dropout on adapters of parameters (the MoE experts), so a model with any is given its adapters
    without dropout: put --lora_dropout back on the adapters of modules (attention, MLP), and say so once."""
    import peft

    layers = [module for module in model.modules() if isinstance(module, peft.tuners.lora.LoraLayer)]
    if not p or not any(isinstance(module, peft.tuners.lora.ParamWrapper) for module in layers):
        return
    for module in layers:
        if not isinstance(module, peft.tuners.lora.ParamWrapper):
            for name in module.lora_dropout:
                module.lora_dropout[name] = torch.nn.Dropout(p).train(module.training)
    log.info(f"--lora_dropout {p}: applied to the adapters of attention and MLP projections; the expert adapters "
             "train without dropout (peft cannot apply it to adapters of parameters)")


def log_trainable_parameters(model):
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(full_numel(p) for p in model.parameters())
    log.info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")


# ----------------------------------------------------------------------------------------------------------
# 7. Training: the Hugging Face Trainer, with a loss that skips masked positions, throughput logs, one save
# ----------------------------------------------------------------------------------------------------------

class CausalLMLoss:
    """The Trainer's `compute_loss_func`: next-token cross-entropy summed over the trained positions of a micro-batch
    and divided by the trained tokens of the whole accumulated step (num_items_in_batch), so that a step's loss is
    the mean over its trained tokens however they fall into micro-batches. (A model's own loss is that only when
    it takes num_items_in_batch; Qwen3.5's multimodal class does not, and averages per micro-batch.)

    On a MoE model, plus `router_aux_loss_coef` x the router's load-balancing loss (the model's own, from the
    router logits it returns when asked), weighted like the rest by the micro-batch's trained tokens: a step adds
    the coefficient times the token-weighted mean of its micro-batches' balancing losses, and a lone batch gets
    exactly the model's own loss + coefficient x balancing loss."""

    def __init__(self, router_aux_loss_coef=0.0):
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_aux_loss = None  # (the last micro-batch's balancing loss, its trained tokens), for the logs
        # Evaluation leaves the router's term out: eval_loss is the language-model loss alone, comparable across
        # coefficients and with dense models (the term is logged beside it as eval_router_aux_loss).
        self.with_router_term = True

    def __call__(self, outputs, labels, num_items_in_batch=None):
        next_tokens = labels[:, 1:]  # position i predicts token i + 1
        if num_items_in_batch is None:
            num_items_in_batch = max(int((next_tokens != IGNORE_INDEX).sum()), 1)
        return self.summed_loss(outputs, next_tokens) / num_items_in_batch

    def summed_loss(self, outputs, next_tokens):
        """The cross-entropy summed over trained positions, plus the router's term. next_tokens[b, i]: the token
        that position i of row b predicts, or IGNORE_INDEX."""
        total = self.summed_cross_entropy(outputs, next_tokens)
        if self.router_aux_loss_coef:
            trained = (next_tokens != IGNORE_INDEX).sum()
            if self.with_router_term:
                total = total + self.router_aux_loss_coef * outputs.aux_loss.to(total.dtype) * trained
            self.router_aux_loss = (outputs.aux_loss.detach(), trained)
        return total

    def summed_cross_entropy(self, outputs, next_tokens):
        """--chunked_loss false: from the logits of every position."""
        logits = outputs.logits[:, :next_tokens.shape[1]]
        return F.cross_entropy(logits.float().flatten(0, 1), next_tokens.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")


class ChunkedCausalLMLoss(CausalLMLoss):
    """Next-token cross-entropy over trained positions only, projected through lm_head a chunk at a time.

    The standard loss builds logits for every position: tokens x ~151k vocabulary floats (about 5 GB in fp32 for
    8k tokens) although most positions are masked. This loss takes the decoder's final hidden states, keeps the
    positions whose next token is trained, and scores them `chunk_size` at a time (ChunkedCrossEntropy), so its
    memory grows with the chunk, not with the batch."""

    def __init__(self, model, chunk_size, router_aux_loss_coef=0.0):
        super().__init__(router_aux_loss_coef)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
        self.lm_head = base.get_output_embeddings()  # under peft's modules_to_save, .weight is the trained copy
        # ZeRO-3: a weight tied to the input embeddings is gathered for their backward anyway (see
        # whole_until_its_gradient_is_in); an untied one is not.
        self.tied = self.lm_head.weight is base.get_input_embeddings().weight
        self.chunk_size = chunk_size
        self.hidden_states = None
        base.get_decoder().register_forward_hook(self._keep_hidden_states)

    def _keep_hidden_states(self, module, inputs, output):
        self.hidden_states = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def summed_cross_entropy(self, outputs, next_tokens):
        """From the hidden states of the forward just run (the model was asked for no logits)."""
        hidden_states, self.hidden_states = self.hidden_states, None  # [batch, positions, hidden]
        trained = next_tokens != IGNORE_INDEX
        hidden_states = hidden_states[:, :next_tokens.shape[1]][trained]  # [trained positions, hidden]
        # Even with no trained position the result depends on hidden_states: every weight gets its (zero) gradient.
        with whole_weight(self.lm_head.weight):
            return ChunkedCrossEntropy.apply(hidden_states, self.lm_head.weight, next_tokens[trained], self.chunk_size,
                                             self.tied)


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_states[i] @ weight.T, targets[i]), a chunk of positions at a time, with its
    gradients computed in the same pass: no chunk's logits outlive it, backward only scales what forward kept
    (the gradients for the hidden states, and for the weight when it is trained), and the weight is read only
    here, once per micro-batch (which ZeRO-3 needs: it gathers the weight from every rank for the whole call)."""

    @staticmethod
    def forward(ctx, hidden_states, weight, targets, chunk_size, tied=False):
        total = torch.zeros((), dtype=torch.float32, device=hidden_states.device)
        grad_hidden = torch.empty_like(hidden_states)  # [positions, hidden]
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, len(targets), chunk_size):
            hidden, target = hidden_states[start:start + chunk_size], targets[start:start + chunk_size]
            logits = (hidden @ weight.T).float()  # [chunk, vocabulary]
            target_logits = logits.gather(1, target[:, None]).squeeze(1)
            # One pass of exp over the chunk, in place of the logits (logsumexp and then the softmax took two:
            # benchmarks/profile_step.py measured the loss's elementwise work at 30% of a step): exp(logit - max),
            # its sum, then d loss / d logits = softmax - one-hot(target).
            top = logits.amax(dim=-1, keepdim=True)
            grad_logits = logits.sub_(top).exp_()
            normaliser = grad_logits.sum(dim=-1, keepdim=True)
            total += (top.squeeze(1) + normaliser.squeeze(1).log() - target_logits).sum()
            grad_logits.div_(normaliser)
            grad_logits[torch.arange(len(target), device=target.device), target] -= 1
            grad_logits = grad_logits.to(hidden.dtype)
            grad_hidden[start:start + chunk_size] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ hidden).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.weight, ctx.tied = weight.dtype, weight, tied
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
            if not ctx.tied:
                whole_until_its_gradient_is_in(ctx.weight)  # ZeRO-3: the gradient is of the whole weight
        return grad_hidden, grad_weight, None, None, None


SAVE_NOW, STOP_NOW = "SAVE_NOW", "STOP_NOW"  # files a user creates in the output folder to ask for a checkpoint


class StopOnRequest(transformers.TrainerCallback):
    """Stopping or saving when the user asks, without losing a step.

    SIGTERM (what a cluster sends before it preempts a job) or Ctrl-C: stop at the next micro-batch, drop the
    unfinished gradient accumulation and write the checkpoint of the last completed optimizer step at once (the
    weights are still those of that step), so that it is on disk within a launcher's grace period and repeating
    the command resumes there. A second Ctrl-C ends the process at once; a repeated SIGTERM does not (schedulers
    and launchers often both send one).

    A SAVE_NOW file in the output folder: a checkpoint at the end of the next optimizer step; STOP_NOW: that
    checkpoint, then the run ends (exit 0) and the same command resumes it. Rank 0 looks for the files and every
    rank learns the answer in the same collective as the signals; a file is removed once its checkpoint is
    complete on every rank."""

    def __init__(self, divergence=None):
        self.stop_reason, self.stopped_at_step = None, None  # a signal's name, or STOP_NOW
        self.signal_name = None  # a signal received by this process
        self.divergence = divergence  # a step that went wrong is not checkpointed, signal or not
        self.saved_step = None  # the step of the newest checkpoint on disk (or resumed from)
        self.answered = []  # trigger files whose checkpoint is being written

    def on_train_begin(self, args, state, control, **kwargs):
        self.saved_step = state.global_step
        for sig in (signal.SIGTERM, signal.SIGINT):  # kept after training: a signal then waits for the final save
            try:
                signal.signal(sig, self._note)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step
        self._remove_answered(args)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at_step is not None:  # the epoch's own evaluation and save would spend the grace period
            control.should_evaluate = False
            control.should_save = self._should_save(state)

    def _note(self, signum, frame):
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)

    def on_substep_end(self, args, state, control, **kwargs):
        if any_rank(self.signal_name is not None, args.device):  # every rank stops at the same micro-batch
            self._stop(self.signal_name or "SIGTERM", state, control)

    def on_step_end(self, args, state, control, **kwargs):
        files = [os.path.exists(os.path.join(args.output_dir, name)) and is_main_process()
                 for name in (SAVE_NOW, STOP_NOW)]
        signalled, save_now, stop_now = each_on_any_rank([self.signal_name is not None, *files], args.device)
        self.answered = [name for name, asked in ((SAVE_NOW, save_now), (STOP_NOW, stop_now)) if asked]
        if signalled:
            self._stop(self.signal_name or "SIGTERM", state, control)
        elif stop_now:
            self._stop(STOP_NOW, state, control)
        elif save_now:
            control.should_save = self._should_save(state)
        if self.answered and control.should_save:
            checkpoint = os.path.basename(checkpoint_folder(args.output_dir, state.global_step))
            log.info(f"{' and '.join(self.answered)} in {args.output_dir}: writing {checkpoint}")
        elif self.answered and (stop_now or state.global_step == self.saved_step):  # nothing (more) to write
            self._remove_answered(args)
        else:
            self.answered = []  # the step went wrong: the file is answered at the next good one

    def _stop(self, reason, state, control):
        self.stop_reason, self.stopped_at_step = reason, state.global_step
        control.should_training_stop = True
        control.should_evaluate = False  # the grace period is for the checkpoint
        control.should_save = self._should_save(state)

    def _should_save(self, state):
        """A checkpoint of the last completed step, unless it is on disk already or that step went wrong."""
        went_wrong = self.divergence is not None and self.divergence.in_a_row > 0
        return state.global_step > 0 and state.global_step != self.saved_step and not went_wrong

    def _remove_answered(self, args):
        if not self.answered:
            return
        if in_process_group():
            torch.distributed.barrier()  # every rank's part of the checkpoint is written
        if is_main_process():
            for name in self.answered:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(args.output_dir, name))
        self.answered = []


class StopOnDivergence(transformers.TrainerCallback):
    """A step whose loss or gradient norm is not finite is skipped (its gradients dropped before the optimizer
    sees them) and never checkpointed; `limit` such steps in a row stop training, and the result is not saved.

    Under DeepSpeed the engine steps inside backward, so there the step cannot be skipped: the weights turn
    non-finite, every following step counts, and the run stops with the last good checkpoint as its result."""

    def __init__(self, limit, loss_scaling=False):
        self.limit, self.in_a_row, self.first_bad_step = limit, 0, None
        # fp16 loss scaling overflows the gradients now and then by design; the scaler skips those steps itself.
        self.loss_scaling = loss_scaling
        self.loss_finite = True  # of every micro-batch of the current step, on this rank
        self.grad_norm = None
        self.step_is_bad = False  # agreed by every rank before the optimizer step
        self.stopped = False

    def note_loss(self, loss):
        self.loss_finite = self.loss_finite and bool(torch.isfinite(loss).all())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        overflow = self.grad_norm is not None and not math.isfinite(self.grad_norm) and not self.loss_scaling
        bad = not self.loss_finite or overflow
        self.step_is_bad = any_rank(bad, args.device)
        if self.step_is_bad and model is not None:
            model.zero_grad(set_to_none=True)  # torch optimizers skip parameters without a gradient

    def on_step_end(self, args, state, control, **kwargs):
        bad, self.step_is_bad, self.loss_finite, self.grad_norm = self.step_is_bad, False, True, None
        if not bad:
            self.in_a_row, self.first_bad_step = 0, None
            return
        self.in_a_row += 1
        self.first_bad_step = self.first_bad_step or state.global_step
        control.should_save = False  # never checkpoint a step that went wrong
        log.warning(f"step {state.global_step}: the loss or gradient norm is not finite; the step is skipped "
                    f"({self.in_a_row} in a row, --max_nonfinite_steps {self.limit})")
        if self.in_a_row >= self.limit:
            control.should_training_stop, self.stopped = True, True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.in_a_row:  # an epoch that ends on a bad step is not saved either
            control.should_save = False


class RecordTrainingData(transformers.TrainerCallback, transformers.trainer_callback.ExportableState):
    """Writes into every checkpoint's trainer_state.json what a resume compares: the training data's content hash,
    and the run's shape (run_shape: processes, per-device batch, accumulation, global batch, engine)."""

    def __init__(self, fingerprint, shape=None):
        self.fingerprint, self.shape = fingerprint, shape

    def on_train_begin(self, args, state, control, **kwargs):
        # transformers 5.x: a resumed state (an older checkpoint) has an older entry, or none; the Trainer's
        # checkpoint save looks every exportable callback up by name.
        state.stateful_callbacks[type(self).__name__] = self.state()

    def state(self):
        return {"args": {"fingerprint": self.fingerprint, "shape": self.shape}, "attributes": {}}


EVAL_GENERATIONS = "eval_generations.jsonl"


def generation_prompts(dataset, count):
    """The first `count` evaluation samples as (sample index, prompt ids, reference ids). The prompt is the sample up
    to where its last trained reply starts, as it was rendered for training (the model's template with its
    --chat_template_kwargs thinking settings, the earlier turns), so it ends where the assistant's turn starts; the
    reference is that reply."""
    prompts = []
    for i in range(min(count, len(dataset))):
        example = dataset[i]
        labels = np.asarray(example["labels"])
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        if trained.size == 0:
            continue
        end = start = int(trained[-1]) + 1
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        prompts.append((i, [int(t) for t in example["input_ids"][:start]],
                        [int(t) for t in example["input_ids"][start:end]]))
    return prompts


class EvalGenerations(transformers.TrainerCallback):
    """--eval_generations: after every evaluation, greedy replies to fixed evaluation prompts (generation_prompts),
    appended with the step to eval_generations.jsonl in the output folder, logged, and handed to the --report_to
    integrations that show text (TensorBoard) or tables (W&B, Trackio, MLflow).

    Under ZeRO-3 every rank generates together (each forward gathers the layers' weights from all ranks); otherwise
    rank 0 alone, while the others wait at the next step's collective."""

    def __init__(self, prompts, tokenizer, max_new_tokens, callbacks):
        self.prompts, self.tokenizer, self.callbacks = prompts, tokenizer, callbacks
        stop = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} | {tokenizer.eos_token_id}
        self.generation_config = transformers.GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(t for t in stop if t is not None),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not self.prompts or not (is_main_process() or uses_zero3()):
            return
        replies = self.generate(model, args.device)
        if not is_main_process():
            return
        rows = [{"step": state.global_step, "epoch": state.epoch, "sample": i,
                 "prompt": self.tokenizer.decode(prompt), "reference": self.decode(reference), "reply": reply}
                for (i, prompt, reference), reply in zip(self.prompts, replies)]
        path = os.path.join(args.output_dir, EVAL_GENERATIONS)
        with open(path, "a") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        log.info(f"step {state.global_step}: replies to {len(rows)} evaluation prompts in {path}; the first: "
                 f"{rows[0]['reply'][:200]!r}")
        self.report(rows, args.report_to, state.global_step)

    @torch.no_grad()
    def generate(self, model, device):
        was_training = model.training
        model.eval()
        set_use_cache(model, True)
        replies = []
        try:
            for _, prompt, _ in self.prompts:
                input_ids = torch.tensor([prompt], device=device)
                output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        generation_config=self.generation_config,
                                        synced_gpus=uses_zero3() and world_size() > 1)
                replies.append(self.decode(output[0, len(prompt):]))
        finally:
            set_use_cache(model, False)
            model.train(was_training)
        return replies

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def report(self, rows, report_to, step):
        """Best effort: a dashboard that fails to show them costs a warning, never the run."""
        for name in report_to:
            try:
                if name == "tensorboard":
                    writer = next((c.tb_writer for c in self.callbacks
                                   if isinstance(c, transformers.integrations.TensorBoardCallback)), None)
                    if writer is not None:
                        writer.add_text("eval/generations", generations_markdown(rows), step)
                        writer.flush()
                elif name in ("wandb", "trackio"):
                    import pandas

                    backend = importlib.import_module(name)
                    backend.log({"eval/generations": backend.Table(dataframe=pandas.DataFrame(rows))})
                elif name == "mlflow":
                    import mlflow
                    import pandas

                    mlflow.log_table(pandas.DataFrame(rows), artifact_file=f"eval_generations/step_{step}.json")
            except Exception as e:  # noqa: BLE001 - a dashboard's own failure
                log.warning(f"--report_to {name}: could not show the evaluation replies ({first_line(e)})")


def generations_markdown(rows, prompt_chars=600):
    """The replies as Markdown for TensorBoard's text tab: each sample's prompt end, reference and reply."""
    def block(text):
        return "\n".join("    " + line for line in (text or "(empty)").splitlines() or [""])

    sections = [f"### sample {row['sample']} (step {row['step']})\n\n**prompt** (its end)\n\n"
                f"{block(row['prompt'][-prompt_chars:])}\n\n**reference**\n\n{block(row['reference'])}\n\n"
                f"**reply**\n\n{block(row['reply'])}" for row in rows]
    return "\n\n".join(sections)


def early_stopping(training_args, resume_from):
    """transformers' EarlyStoppingCallback, with the count of evaluations without improvement that a resumed
    checkpoint recorded (the Trainer restores callback states only all at once, which would also restore
    RecordTrainingData's shape of the old run)."""
    callback = transformers.EarlyStoppingCallback(training_args.early_stopping_patience,
                                                  training_args.early_stopping_threshold)
    if resume_from:
        recorded = recorded_callback_state(resume_from, type(callback).__name__)
        callback.early_stopping_patience_counter = recorded.get("attributes", {}).get(
            "early_stopping_patience_counter", 0)
    return callback


def report_best_checkpoint(state, training_args, early_stopper):
    """Where the best checkpoint is (trainer_state.json names it too), and whether early stopping ended the run."""
    if early_stopper is not None and early_stopper.early_stopping_patience_counter >= early_stopper.early_stopping_patience:
        log.info(f"early stopping at step {state.global_step}: {training_args.metric_for_best_model} did not improve "
                 f"by more than {training_args.early_stopping_threshold:g} in "
                 f"{early_stopper.early_stopping_patience} evaluations in a row")
    if state.best_model_checkpoint:
        kept = " (the result: --load_best_model_at_end)" if training_args.load_best_model_at_end else ""
        log.info(f"best checkpoint: {state.best_model_checkpoint}, {training_args.metric_for_best_model} "
                 f"{state.best_metric:.4f} at step {state.best_global_step}{kept}")


MODEL_CARD = "README.md"


class WriteModelCard(transformers.TrainerCallback):
    """The model card (model_card) in every checkpoint, as it stands at that step."""

    def __init__(self, facts):
        self.facts = facts

    def on_save(self, args, state, control, **kwargs):
        folder = checkpoint_folder(args.output_dir, state.global_step)
        if args.should_save and os.path.isdir(folder):
            model_card(self.facts, state, final=False).save(os.path.join(folder, MODEL_CARD))


def run_facts(run, model, encoder, train_dataset, eval_dataset):
    """What a model card says about how the model was made, gathered once at the start (rank 0 only: it hashes
    the sources, which that rank has read already)."""
    model_args, data_args, training_args, lora_args = run.model_args, run.data_args, run.training_args, run.lora_args
    config = getattr(model, "get_base_model", lambda: model)().config
    peft_config = next(iter(model.peft_config.values())) if hasattr(model, "peft_config") else None
    sources = [{"spec": source.spec, "sha256": data_fingerprint(source.parts),
                "dataset": source.parts[0][len(HUB_PREFIX):].partition(":")[0]
                if source.parts[0].startswith(HUB_PREFIX) else None}
               for source in run.sources]
    packages = ["torch", "transformers", "accelerate", "peft", "bitsandbytes", "deepspeed", "datasets"]
    return {
        "base_model": model_args.model_name_or_path,
        "hub_base_model": not os.path.exists(os.path.expanduser(model_args.model_name_or_path)),
        "model_type": config.model_type, "loader": model_class(config).__name__,
        "multimodal": config is not config.get_text_config(),
        "method": "QLoRA" if lora_args.q_lora else "LoRA" if lora_args.use_lora else "full fine-tune",
        "lora": None if peft_config is None else {
            "r": peft_config.r, "alpha": peft_config.lora_alpha, "dropout": lora_args.lora_dropout,
            "target_modules": sorted(peft_config.target_modules or []),
            "target_parameters": sorted(peft_config.target_parameters or []),
            "modules_to_save": sorted(peft_config.modules_to_save or []), "bias": peft_config.bias},
        "sources": sources,
        "source_reports": list(train_dataset.reports),
        "train_samples": len(train_dataset), "eval_samples": len(eval_dataset) if eval_dataset is not None else 0,
        "eval_source": ", ".join(data_args.eval_data_path) or
                       (f"--val_size {data_args.val_size:g} of the training data" if data_args.val_size else None),
        "template": "the model's own chat template" if encoder.template == "auto" else "ChatML",
        "template_kwargs": data_args.chat_template_kwargs,
        "mask_history": data_args.mask_history, "system_message": data_args.system_message,
        "settings": {"learning_rate": training_args.learning_rate,
                     "lr_scheduler": str(training_args.lr_scheduler_type.value),
                     "warmup_steps": training_args.warmup_steps, "num_train_epochs": training_args.num_train_epochs,
                     "max_steps": training_args.max_steps, "model_max_length": training_args.model_max_length,
                     "packing": training_args.packing, "seed": training_args.seed,
                     "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
                     **{key: value for key, value in run_shape(training_args).items() if value is not None}},
        "best_is_result": training_args.load_best_model_at_end,
        "untrained": untrained_parts(model, peft_config, training_args.save_mtp),
        "expert_lora": bool(peft_config is not None and any(
            EXPERTS in target for target in peft_config.target_parameters or [])),
        "versions": {name: importlib.metadata.version(name) for name in packages
                     if importlib.util.find_spec(name) is not None},
    }


def untrained_parts(model, peft_config, save_mtp):
    """What a model card lists as not trained: frozen parts of a full fine-tune, and what was carried over."""
    if peft_config is not None:
        return ["every weight of the base model (the adapter holds what was trained)"]
    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    parts = []
    for what, found in (("the vision tower (text data gives it no gradient)", lambda n: ".visual." in f".{n}"),
                        ("the sparse-attention indexer (no gradient reaches it)", lambda n: ".indexer." in n)):
        if count := sum(full_numel(p) for name, p in frozen if found(name)):
            parts.append(f"{what}: {count:,} parameters, frozen and saved as loaded")
    base = local_model_folder(getattr(model, "name_or_path", "") or "")
    mtp = [name for name in not_loaded_by(model, stored_tensors(base) if base else {}) if name.startswith(MTP_PREFIX)]
    if mtp:
        parts.append(f"the multi-token-prediction block ({len(mtp)} tensors), which transformers does not load: "
                     + ("carried over unchanged (speculative decoding stays correct; its drafts may be accepted less "
                        "often for the fine-tuned model)" if save_mtp else "left out (--save_mtp false) and out of the "
                        "config"))
    return parts


def model_card(facts, state, final=True):
    """A Hugging Face model card: metadata the hub reads (base_model, library_name, tags, pipeline_tag, datasets),
    then what the model is, from what, on what data, with which settings, with what results, and how to load it.
    `final`: the run's result (else a checkpoint's, whose weights are always its own step's)."""
    from huggingface_hub import ModelCard, ModelCardData

    lora, settings = facts["lora"], facts["settings"]
    data = ModelCardData(
        base_model=facts["base_model"] if facts["hub_base_model"] else None,
        library_name="peft" if lora else "transformers",
        pipeline_tag="image-text-to-text" if facts["multimodal"] else "text-generation",
        tags=["qwen-finetune", "sft", facts["method"].split()[0].lower(), facts["model_type"]],
        datasets=[s["dataset"] for s in facts["sources"] if s["dataset"]] or None,
    )
    losses = [entry for entry in state.log_history if "loss" in entry]
    evals = [entry for entry in state.log_history if "eval_loss" in entry]
    lines = [
        f"# {facts['method']} of {facts['base_model']}", "",
        f"Fine-tuned with qwen-finetune's `finetune.py` ({facts['method']}) from `{facts['base_model']}` "
        f"({facts['model_type']}, loaded as `{facts['loader']}`) on the conversations below; only what the assistant "
        "says was trained.", "",
        "## Data", "",
        *[f"- `{s['spec']}`: sha256 `{s['sha256']}`" for s in facts["sources"]], "",
        "What each source gave (the mix):", "",
        *[f"- {report}" for report in facts["source_reports"]], "",
        f"{facts['train_samples']:,} training samples; {facts['eval_samples']:,} for evaluation"
        + (f" ({facts['eval_source']})" if facts["eval_source"] else "") + ".", "",
        f"Template: {facts['template']}" + (f" with `{json.dumps(facts['template_kwargs'])}`"
                                              if facts["template_kwargs"] else "")
        + ("; only the last assistant turn trained (`--mask_history`)" if facts["mask_history"] else "")
        + (f"; default system message {facts['system_message']!r}" if facts["system_message"] is not None else ""),
        "", "## Training", "",
        *[f"- {key}: {value}" for key, value in settings.items()],
        *([f"- LoRA: {json.dumps(lora)}"] if lora else []), "",
        "## Results", "",
        f"- steps: {state.global_step}, epochs: {state.epoch or 0:.2f}",
        f"- tokens seen: {state.num_input_tokens_seen:,}" if state.num_input_tokens_seen else "- tokens seen: not counted",
        f"- final train loss: {losses[-1]['loss']:.4f} (step {losses[-1]['step']})" if losses else "- train loss: not logged yet",
        f"- final eval loss: {evals[-1]['eval_loss']:.4f} (step {evals[-1]['step']})" if evals else "- eval loss: none",
        *([f"- best checkpoint: `{os.path.basename(state.best_model_checkpoint)}` (eval loss {state.best_metric:.4f})"
           + ("; the weights here are its (`--load_best_model_at_end`)" if facts["best_is_result"] and final else "")]
          if state.best_model_checkpoint else []), "",
        "## How to load it", "", "```python", "import transformers",
        *(["import peft", "", f'model = transformers.{facts["loader"]}.from_pretrained("{facts["base_model"]}")',
           'model = peft.PeftModel.from_pretrained(model, "THIS_FOLDER_OR_REPO")'] if lora else
          ["", f'model = transformers.{facts["loader"]}.from_pretrained("THIS_FOLDER_OR_REPO")']),
        'tokenizer = transformers.AutoTokenizer.from_pretrained("THIS_FOLDER_OR_REPO")', "```", "",
        *(["To serve one model without peft: `python merge_adapter.py --adapter THIS_FOLDER --output merged`.", ""]
          if lora else []),
        "## What was not trained", "", *[f"- {part}" for part in facts.get("untrained") or ["nothing"]], "",
        "## How to serve it", "", *serving_lines(facts), "",
        "## Versions", "", ", ".join(f"{name} {version}" for name, version in facts["versions"].items()), "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


EXPERT_ADAPTER = ("LoRA on the fused MoE experts, which llama.cpp's LoRA converter refuses and serving engines do not "
                  "all load")


def serving_lines(facts):
    """How the output is served by vLLM and llama.cpp (the model card's and the README's advice)."""
    if facts.get("expert_lora"):
        return [f"This adapter has {EXPERT_ADAPTER}: merge it and serve the merged model "
                "(`python merge_adapter.py --adapter THIS_FOLDER --output merged`; then as a full model below).", "",
                "- vLLM: `vllm serve merged`",
                "- llama.cpp: `python convert_hf_to_gguf.py merged --outfile model.gguf`, then `llama-cli -m model.gguf`"]
    if facts["lora"]:
        return ["- vLLM: `vllm serve BASE_MODEL --enable-lora --lora-modules mine=THIS_FOLDER` (or merge it first)",
                "- llama.cpp: `python convert_lora_to_gguf.py THIS_FOLDER --base BASE_MODEL_FOLDER --outfile "
                "adapter.gguf`, then `llama-cli -m base.gguf --lora adapter.gguf`"]
    return ["- vLLM: `vllm serve THIS_FOLDER`" + (" (its multi-token-prediction block serves speculative decoding)"
                                                  if any("multi-token" in p for p in facts.get("untrained") or [])
                                                  else ""),
            "- llama.cpp: `python convert_hf_to_gguf.py THIS_FOLDER --outfile model.gguf`, then "
            "`llama-cli -m model.gguf`"]


def plot_training_curves(log_history, path):
    """Train and eval loss, and the learning rate, against the step, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        return [(entry["step"], entry[key]) for entry in log_history if key in entry]

    figure, (loss_axes, lr_axes) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), height_ratios=[3, 1])
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = series(key)
        if points:
            loss_axes.plot(*zip(*points), marker="o" if key == "eval_loss" else None, markersize=3, label=label)
    loss_axes.set_ylabel("loss")
    if loss_axes.lines:  # a run too short to log a loss has nothing to name
        loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    if series("learning_rate"):
        lr_axes.plot(*zip(*series("learning_rate")), color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class SeededLengthGroupedSampler(transformers.trainer_pt_utils.LengthGroupedSampler):
    """Length grouping by global batch (samples of similar length in one optimizer step), in an order that depends on
    --seed and the epoch alone, like the Trainer's own sampler: not on the number of processes, not on the random
    state of the moment. A run resumed on other processes then trains the same samples in each step.

    The epoch is the Trainer state's (`epoch_of`): resuming mid-epoch under several processes, accelerate wraps
    the sampler one level deeper than its set_epoch reaches, and the order would be the first epoch's."""

    def __init__(self, global_batch, dataset, lengths, seed, epoch_of):
        super().__init__(global_batch, dataset=dataset, lengths=lengths)
        self.seed, self.epoch_of = seed, epoch_of

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch_of())
        return super().__iter__()


class FinetuneTrainer(transformers.Trainer):
    """The Hugging Face Trainer, plus: the chunked loss, length grouping from the dataset's group_lengths,
    tokens/s per device in the logs, and one save for checkpoints and the final result.

    Besides its documented hooks (compute_loss_func, loss_is_scaled_for_ga, compute_loss, training_step, log,
    save_model, train), it relies on this private surface of transformers, which an upgrade may rename without
    notice; tests/test_trainer_surface.py checks that each still exists and is still used:
      Trainer._get_grad_norm             the step's gradient norm, for StopOnDivergence (lost: a diverging
                                         gradient would go unnoticed)
      Trainer._get_num_items_in_batch    the step's trained tokens on every rank, under sequence parallelism
      Trainer._get_train_sampler         --group_by_length from the dataset's group_lengths
      LengthGroupedSampler.generator     set per epoch by SeededLengthGroupedSampler (reproducible order)
      Trainer.save_model(_internal_call) our save_model's signature, as the Trainer calls it for checkpoints
      Trainer.callback_handler.callbacks, TensorBoardCallback.tb_writer   where EvalGenerations finds the
                                         writer for its replies
      trainer_state.json "stateful_callbacks"   where RecordTrainingData's facts and EarlyStoppingCallback's
                                         count are read back from a checkpoint
      transformers.trainer.skip_first_batches   replaced while resuming under sequence parallelism
                                         (resumable_sequence_parallel_loader)
      transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref   cleared while a skeleton is built on
                                         the meta device under ZeRO-3 (without_zero3_init)
    and elsewhere in this file (each also checked there):
      HfTrainerDeepSpeedConfig.trainer_config_process   a DeepSpeed config for another accumulation
                                         (with_accumulation)
      integration_utils.INTEGRATION_TO_CALLBACK   the --report_to names (check_report_to)
      modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES   which checkpoints load multimodal (model_class)
      AutoModel*._model_mapping          the class of a skeleton for --lora_target_modules (check_lora_targets)
      EarlyStoppingCallback.early_stopping_patience_counter   restored on resume (early_stopping)
      ArgumentParser._actions            every flag's type (check_finite, config_flags)
      AcceleratorConfig.use_configured_state with accelerate's PartialState   DeepSpeed on the CPU
                                         (prepare_launch_environment)
      UlyssesSPDataLoaderAdapter fields (dl, sp_rank, sp_group, sp_world_size, device)   re-wrapped on resume
                                         (resumable_sequence_parallel_loader)
      ds_to_universal.main(args)         called with a hand-built Namespace (make_universal_checkpoint)
      peft.tuners.lora.ParamWrapper      adapters of parameters, which peft gives no dropout (apply_lora_dropout)
      PreTrainedModel._keys_to_ignore_on_load_unexpected   what a class does not load, carried over on save
                                         (complete_saved_model)
      PretrainedConfig._attn_implementation, _experts_implementation   what the start-up report names
                                         (paths_that_run)"""

    def __init__(self, model, args, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        config = model.config
        if config is not config.get_text_config() and "use_cache" in vars(config):
            # Workaround (transformers 5.24): the Trainer sets use_cache on the top config, which for a multimodal
            # checkpoint is not its language model's (set_use_cache did that) and would reach the saved config as a
            # key the checkpoint never had. It can go when the Trainer sets the text config's.
            delattr(config, "use_cache")
        router_coef = router_aux_loss_coef(config, self.args)
        self.compute_loss_func = CausalLMLoss(router_coef)
        if self.args.chunked_loss and self.args.n_gpu > 1:
            # One process driving several GPUs (DataParallel): each replica would overwrite the hidden states.
            log.warning("several GPUs in one process: the chunked loss is off; launch with torchrun or the "
                        "launchers (one process per GPU) to keep it")
        elif self.args.chunked_loss:
            self.compute_loss_func = ChunkedCausalLMLoss(self.model, self.args.loss_chunk_size, router_coef)
        if router_coef:
            log.info(f"the router's load-balancing loss is part of the loss, weighted {router_coef:g} "
                     "(--router_aux_loss_coef); logged as router_aux_loss")
        self.sequence_parallel = self.args.sequence_parallel_size
        if self.sequence_parallel > 1:
            self.loss_is_scaled_for_ga = True  # sequence_parallel_loss divides by the whole step's trained tokens
            self.sequence_parallel_weight = sequence_parallel_loss_weight(self.args)
        self.divergence = StopOnDivergence(self.args.max_nonfinite_steps, loss_scaling=self.args.fp16)
        self.add_callback(self.divergence)
        self._tokens = self._trained_tokens = 0  # this device's, since the last log
        self._total_tokens = self._total_trained_tokens = 0
        # The trained-token-weighted balancing loss since the last log, of training and of evaluation: [sum, tokens]
        self._router_losses = {"train": [0.0, 0], "eval": [0.0, 0]}
        self._window_start = None  # first training step after the previous log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._window_start = self._window_start or time.perf_counter()
            mask = inputs.get("attention_mask")
            self._tokens += mask.sum() if mask is not None else inputs["input_ids"].numel()
            labels = inputs["labels"] if "labels" in inputs else inputs["shift_labels"]  # the latter: a slice's
            self._trained_tokens += (labels != IGNORE_INDEX).sum()
        if isinstance(self.compute_loss_func, ChunkedCausalLMLoss):
            # The chunked loss projects the trained positions itself: the model keeps no logits at all.
            no_positions = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
            inputs = {**inputs, "logits_to_keep": no_positions}
        if self.compute_loss_func.router_aux_loss_coef:
            inputs = {**inputs, "output_router_logits": True}  # the model then computes its balancing loss
        if model.training and self.sequence_parallel > 1:  # Sequence parallelism: this rank holds slices
            return self.sequence_parallel_loss(model, inputs, num_items_in_batch, return_outputs)
        self.compute_loss_func.with_router_term = model.training
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.compute_loss_func.router_aux_loss is not None:
            router_loss, trained = self.compute_loss_func.router_aux_loss
            window = self._router_losses["train" if model.training else "eval"]
            window[0] += float(router_loss) * int(trained)
            window[1] += int(trained)
        self.compute_loss_func.router_aux_loss = None
        return result

    def train(self, *args, **kwargs):
        # Sequence parallelism: resuming mid-epoch must skip batches under DeepSpeed's data loader adapter.
        with resumable_sequence_parallel_loader() if self.sequence_parallel > 1 else contextlib.nullcontext():
            return super().train(*args, **kwargs)

    def sequence_parallel_loss(self, model, inputs, num_items_in_batch, return_outputs=False):
        """The loss under sequence parallelism (replacing the Trainer's, which builds logits for every position and
        averages micro-batches instead of tokens).

        This rank holds one slice of each sequence, its labels already shifted by DeepSpeed's data loader adapter
        (`shift_labels`). It sums the loss of its own trained positions and divides by the trained tokens of the
        whole step on all ranks (num_items_in_batch); weighted for the way DeepSpeed reduces the ranks' gradients
        (sequence_parallel_loss_weight), the gradient is that of the step's token-weighted mean, exactly as
        without sequence parallelism."""
        inputs = dict(inputs)
        next_tokens = inputs.pop("shift_labels")
        outputs = model(**inputs)  # without logits for the chunked loss (compute_loss asked for none)
        total = self.compute_loss_func.summed_loss(outputs, next_tokens)
        loss = total * self.sequence_parallel_weight / num_items_in_batch
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples, device):
        if self.sequence_parallel == 1:
            return super()._get_num_items_in_batch(batch_samples, device)
        # Sequence parallelism: the trained tokens of the step on every rank, each counting its own slices'.
        count = sum((batch["shift_labels"] != IGNORE_INDEX).sum() for batch in batch_samples).to(device)
        return self.accelerator.gather(count.reshape(1)).sum()

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.divergence.note_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # transformers 5.x: the Trainer's hook for the step's gradient norm (after clipping computes it); we note it
        # for StopOnDivergence, which no callback argument carries.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.divergence.grad_norm = None if grad_norm is None else float(grad_norm)
        return grad_norm

    def log(self, logs, *args, **kwargs):
        """Add this device's tokens/s and trained tokens/s to every training log and to the final summary."""
        if self.sequence_parallel > 1:
            # Sequence parallelism: the Trainer logs the mean of the ranks' losses, whose sum is the step's loss
            # times the weight.
            for key in ("loss", "train_loss"):
                if key in logs:
                    logs[key] *= self.args.world_size / self.sequence_parallel_weight
        for kind, key, logged in (("train", "router_aux_loss", "loss"), ("eval", "eval_router_aux_loss", "eval_loss")):
            if logged in logs and self.compute_loss_func.router_aux_loss_coef:
                router_loss, weight = sum_over_ranks(self._router_losses[kind], self.args.device)
                self._router_losses[kind] = [0.0, 0]
                logs[key] = round(router_loss / max(weight, 1), 6)
        if "loss" in logs or "train_runtime" in logs:
            tokens, trained = int(self._tokens), int(self._trained_tokens)
            self._tokens = self._trained_tokens = 0
            self._total_tokens += tokens
            self._total_trained_tokens += trained
            if "loss" in logs:  # training time since the previous log (eval and saving between are left out)
                now = time.perf_counter()
                elapsed, self._window_start = max(now - (self._window_start or now), 1e-9), None
            else:  # the whole run
                elapsed, tokens, trained = logs["train_runtime"], self._total_tokens, self._total_trained_tokens
            logs["tokens_per_second_per_device"] = round(tokens / elapsed, 1)
            logs["trained_tokens_per_second_per_device"] = round(trained / elapsed, 1)
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, TrainingData):
            return SeededLengthGroupedSampler(run_shape(self.args)["global_batch"], dataset=dataset,
                                              lengths=list(dataset.group_lengths),
                                              seed=self.args.data_seed or self.args.seed,
                                              epoch_of=lambda: int(self.state.epoch or 0))
        return super()._get_train_sampler(train_dataset)

    def save_model(self, output_dir=None, _internal_call=False):
        """The adapter only with LoRA, else the full model; plus the tokenizer. Every rank must call it.

        With LoRA under ZeRO-3 only the adapter's parameters are gathered (the Trainer's own save would gather
        the whole model layer by layer); a full model under ZeRO-3 is gathered by the Trainer through
        stage3_gather_16bit_weights_on_model_save."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        set_use_cache(model, True)  # training turned it off; whoever loads the result wants it back
        if hasattr(model, "peft_config") and uses_zero3():  # ZeRO-3: the adapter is spread over the ranks
            state_dict = gather_trainable_state_dict(model, keep=self.args.should_save)  # every rank takes part
            if self.args.should_save:
                model.save_pretrained(output_dir, state_dict=state_dict)
                self.processing_class.save_pretrained(output_dir)
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        if hasattr(model, "peft_config") and self.args.should_save:
            save_base_config_changes(model.get_base_model().config, output_dir)
        elif self.args.should_save:  # a full model: with what its class does not load, in the stored dtypes
            carried, retyped = complete_saved_model(model, output_dir, self.args.save_mtp)
            done = [f"{len(carried)} tensors of {model.name_or_path} that the model class does not load (the "
                    "multi-token-prediction block) carried over unchanged"] if carried else []
            done += [f"{len(retyped)} tensors saved in the dtype the checkpoint stores them in"] if retyped else []
            if done and not _internal_call:
                log.info(f"{output_dir}: {'; '.join(done)}")
        set_use_cache(model, False)


# -- what a saved model holds: every tensor of the checkpoint it started from, in the dtype that one stored it in

@dataclass
class StoredTensor:
    """One tensor of a model folder's safetensors files, as its header describes it (nothing is read)."""

    file: str
    dtype: str  # safetensors' name: F32, BF16, F16, ...
    shape: list
    nbytes: int


def stored_tensors(folder) -> dict:
    """{name: StoredTensor} of a model folder: the files its index lists, else its model*.safetensors files."""
    index = os.path.join(folder, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = list(dict.fromkeys(json.load(f)["weight_map"].values()))
    else:
        files = sorted(name for name in os.listdir(folder) if name.startswith("model") and name.endswith(".safetensors"))
    from safetensors import safe_open

    tensors = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                shape = list(part.get_shape())
                tensors[key] = StoredTensor(name, part.get_dtype(), shape, math.prod(shape) * DTYPE_BYTES[part.get_dtype()])
    return tensors


SAFE_INDEX = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MTP_PREFIX = "mtp."  # the multi-token-prediction block of Qwen3.5/3.6/3.8 and Qwen3-Next checkpoints


def local_model_folder(name_or_path):
    """The folder a model was loaded from: itself, or a hub id's snapshot in the local cache; None if neither."""
    if os.path.isdir(name_or_path):
        return name_or_path
    with contextlib.suppress(Exception):  # offline, not cached, not a hub id: nothing to compare with
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=True)
    return None


# Parameters whose layer computes in fp32 and returns its input's dtype: Gated DeltaNet's decay (A_log), its dt_bias
# and its gated norm. A checkpoint that stores them in fp32 (Qwen3.5's A_log and norm) keeps them so in a 16-bit run.
FP32_PARAMETERS = ("linear_attn.A_log", "linear_attn.dt_bias", "linear_attn.norm.weight")


def keep_stored_fp32(model, folder):
    """In a 16-bit run, the FP32_PARAMETERS the checkpoint stores in fp32 are loaded again at that precision (the
    16-bit load rounded them): they train and save in fp32, as the model's own code computes with them."""
    try:
        stored = stored_tensors(folder)
    except (OSError, ValueError, KeyError):  # files the load itself would have refused; nothing to restore
        return
    wanted = {name: param for name, param in model.named_parameters()
              if name.endswith(FP32_PARAMETERS) and param.dtype != torch.float32
              and name in stored and stored[name].dtype == "F32"}
    from safetensors import safe_open

    for file in sorted({stored[name].file for name in wanted}):
        with safe_open(os.path.join(folder, file), framework="pt") as f:
            for name in (name for name in wanted if stored[name].file == file):
                wanted[name].data = f.get_tensor(name).to(wanted[name].device)
    if wanted:
        log.info(f"{len(wanted)} parameters the checkpoint stores in fp32 ({', '.join(FP32_PARAMETERS)}) train and "
                 "save in fp32")


def complete_saved_model(model, output_dir, keep_mtp=True, stored_dtypes=True):
    """What save_pretrained wrote, made whole: the tensors of the starting checkpoint that the model class does not
    load (its _keys_to_ignore_on_load_unexpected: the multi-token-prediction block) carried over unchanged, and every
    tensor in the dtype that checkpoint stored it in. Without `keep_mtp` the MTP block is left out on purpose and
    the config says so (mtp_num_hidden_layers 0), so that engines do not look for it; without `stored_dtypes` the
    tensors stay in the dtype they were saved in. Returns the names (carried, retyped)."""
    base = local_model_folder(getattr(model, "name_or_path", "") or "")
    if base is None or os.path.realpath(base) == os.path.realpath(output_dir):
        return [], []
    if os.path.isfile(os.path.join(output_dir, "model.safetensors")):
        # One file just written: an index beside it is an earlier save's, whose shards save_pretrained removed.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, SAFE_INDEX))
    try:
        before = stored_tensors(base)
    except (OSError, ValueError, KeyError) as e:  # a hub snapshot cached in part, a file that is not safetensors
        log.warning(f"{output_dir}: cannot read the files of {base} ({first_line(e)}): what its class does not load is "
                    "not carried over, and the saved dtypes are the run's")
        return [], []
    saved = stored_tensors(output_dir)
    if not saved:  # not written as safetensors: nothing to complete
        return [], []
    carried = [name for name in not_loaded_by(model, before) if name not in saved
               and (keep_mtp or not name.startswith(MTP_PREFIX))]
    retyped = [name for name, tensor in saved.items() if stored_dtypes and name in before and tensor.dtype !=
               before[name].dtype and tensor.shape == before[name].shape and before[name].dtype in TORCH_DTYPES]
    restore_stored_dtypes(output_dir, saved, {name: before[name].dtype for name in retyped})
    if carried:
        add_shard(output_dir, base, before, carried)
    if not keep_mtp:
        declare_no_mtp(output_dir)
    return carried, retyped


def not_loaded_by(model, names):
    """The tensor names of a checkpoint that the model's class drops when it loads (its
    _keys_to_ignore_on_load_unexpected: the multi-token-prediction block of Qwen3.5/3.6/3.8 and Qwen3-Next)."""
    patterns = getattr(type(model), "_keys_to_ignore_on_load_unexpected", None) or []
    return [name for name in names if any(re.search(pattern, name) for pattern in patterns)]


def restore_stored_dtypes(folder, saved, dtypes):
    """Rewrite the files holding tensors saved in another dtype than the checkpoint's, one file at a time."""
    from safetensors.torch import load_file, save_file

    for file in sorted({saved[name].file for name in dtypes}):
        path = os.path.join(folder, file)
        tensors = load_file(path)
        for name in tensors.keys() & dtypes.keys():
            tensors[name] = tensors[name].to(TORCH_DTYPES[dtypes[name]])
        save_file(tensors, path, metadata={"format": "pt"})


def add_shard(folder, base, before, names):
    """The tensors `names` of the checkpoint in `base`, byte for byte, as one more shard of the model in `folder`,
    in the layout every loader reads: model-0000K-of-0000N.safetensors files and the index naming them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    saved = stored_tensors(folder)
    files = list(dict.fromkeys(tensor.file for tensor in saved.values()))
    total = len(files) + 1
    renamed = {file: f"model-{k:05d}-of-{total:05d}.safetensors" for k, file in enumerate(files, start=1)}
    for old, new in renamed.items():
        os.replace(os.path.join(folder, old), os.path.join(folder, new))
    extra, carried = f"model-{total:05d}-of-{total:05d}.safetensors", {}
    for file in sorted({before[name].file for name in names}):
        with safe_open(os.path.join(base, file), framework="pt") as f:
            carried.update({name: f.get_tensor(name) for name in names if before[name].file == file})
    save_file(carried, os.path.join(folder, extra), metadata={"format": "pt"})
    weight_map = {name: renamed[tensor.file] for name, tensor in saved.items()} | {name: extra for name in names}
    size = sum(tensor.nbytes for tensor in saved.values()) + sum(before[name].nbytes for name in names)
    with open(os.path.join(folder, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)


def declare_no_mtp(folder):
    """The saved config without a multi-token-prediction block (its MTP tensors were left out on purpose)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    for part in (config, config.get("text_config") or {}):
        if part.get("mtp_num_hidden_layers"):
            part["mtp_num_hidden_layers"] = 0
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


BASE_CONFIG_CHANGES = "base_config_changes.json"


def save_base_config_changes(config, output_dir):
    """An adapter folder holds no model config: what --rope_scaling changed in the base's (its language model's, for
    a multimodal checkpoint) is written beside it, for merge_adapter.py and examples/chat.py to apply."""
    config = config.get_text_config()
    if (config.rope_parameters or {}).get("rope_type") != "yarn":
        return
    changes = {"rope_parameters": config.rope_parameters, "max_position_embeddings": config.max_position_embeddings}
    with open(os.path.join(output_dir, BASE_CONFIG_CHANGES), "w") as f:
        json.dump(changes, f, indent=1)


# ----------------------------------------------------------------------------------------------------------
# 8. main
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A run as decided before anything is loaded: the flags as parsed (never changed afterwards: where a resume
    needs other values, decide_start makes adjusted copies), the sources resolved once, and where training starts."""

    model_args: ModelArguments
    data_args: DataArguments
    training_args: TrainingArguments
    lora_args: LoraArguments
    sources: list  # of --data_path, resolved (resolve_sources)
    eval_sources: Optional[list] = None  # of --eval_data_path
    fingerprint: Optional[str] = None  # what the data is, recorded in every checkpoint (sources_fingerprint)
    resume_from: Optional[str] = None  # the checkpoint this run continues


@dataclass
class Watch:
    """What watches a training run from outside the Trainer's own loop, and what the end of the run reads from it."""

    stop_on_request: "StopOnRequest"
    early_stopper: Optional[transformers.EarlyStoppingCallback]
    card_facts: Optional[dict]  # what the model card says of the run (run_facts), on the process that writes files


def train(argv=None):
    """The run as a recipe: prepare it, build what it trains, train, finish. --preprocess_only stops after the data."""
    run = prepare(argv)
    if run.data_args.preprocess_only:
        return preview_data(run)
    run = decide_start(run)
    tokenizer, encoder = load_encoder(run)
    check_model_against_flags(run)
    train_dataset, eval_dataset = build_datasets(run, encoder)
    trainer, watch = build_trainer(run, tokenizer, encoder, train_dataset, eval_dataset)
    fit(trainer, run, watch)
    finish(trainer, run, watch)


def prepare(argv):
    """The flags parsed and checked, the output folder claimed, the data sources resolved: before anything slow."""
    model_args, data_args, training_args, lora_args = parse_arguments(argv)
    report_versions()
    agreed_by_all_ranks(claim_output_dir, training_args.output_dir, model_args.model_name_or_path)
    sources = agreed_by_all_ranks(resolve_sources, data_args.data_path)
    eval_sources = agreed_by_all_ranks(resolve_sources, data_args.eval_data_path, "--eval_data_path") \
        if data_args.eval_data_path else None
    return Run(model_args, data_args, training_args, lora_args, sources, eval_sources)


# The libraries a run's results depend on, whose versions every run reports; constraints.txt (beside this script)
# holds the versions the test suite passed with.
RUN_LIBRARIES = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "deepspeed", "datasets", "safetensors")
CONSTRAINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "constraints.txt")


def tested_versions(path=None):
    """{package: version} from a constraints file of `name==version` lines ({} without the file)."""
    versions = {}
    with contextlib.suppress(OSError), open(path or CONSTRAINTS) as f:
        for line in f:
            name, pinned, version = line.split("#")[0].strip().partition("==")
            if pinned:
                versions[name.strip().lower().replace("_", "-")] = version.strip()
    return versions


def installed_versions(names=RUN_LIBRARIES):
    versions = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def report_versions():
    """The installed versions of the libraries beside those the test suite passed with, and one line naming every
    one that differs (a library release can change results: users of other tools have seen releases break
    training); the build tag of torch (+cpu, +cu128) does not count."""
    tested, installed = tested_versions(), installed_versions()
    if not tested:
        log.info("libraries: " + ", ".join(f"{name} {version}" for name, version in installed.items()) +
                 f" (no {os.path.basename(CONSTRAINTS)} beside finetune.py to compare them with)")
        return
    log.info("libraries, installed (tested): " + ", ".join(
        f"{name} {version} ({tested.get(name, 'not tested')})" for name, version in installed.items()))
    untested = [name for name, version in installed.items() if version.split("+")[0] != tested.get(name)]
    if untested:
        log.warning(f"{', '.join(f'{name} {installed[name]}' for name in untested)}: not the version"
                    f"{'s' if len(untested) > 1 else ''} the test suite passed with "
                    f"({', '.join(tested.get(name, 'none') for name in untested)}, {CONSTRAINTS}); the run may "
                    "still be right, but nothing has shown it")


def preview_data(run):
    """--preprocess_only: the training data exactly as it would be trained, without loading the model."""
    tokenizer, encoder = load_encoder(run)
    train_dataset, eval_dataset = build_datasets(run, encoder, with_eval_data=False)
    # The held-out samples of --val_size are not shown as trained (the same split as training).
    held_out = len(eval_dataset) if eval_dataset is not None else 0
    preview(train_dataset, tokenizer, run.training_args.output_dir, run.training_args.model_max_length, held_out)


def decide_start(run):
    """Where training starts: afresh, from a checkpoint (on however many processes this run has), or from a
    checkpoint's weights on new data (--resume_on_new_data). The flags that this changes are changed in copies."""
    fingerprint = agreed_by_all_ranks(sources_fingerprint, run.sources, run.data_args, run.training_args)
    resume_from, weights_from = agreed_by_all_ranks(
        resolve_resume_checkpoint, run.training_args, run.model_args, run.lora_args, fingerprint)
    model_args, lora_args, training_args = run.model_args, run.lora_args, run.training_args
    if weights_from:
        model_args, lora_args = start_from_weights_of(weights_from, model_args, lora_args)
    if resume_from:
        training_args = fit_run_to_checkpoint(training_args, resume_from)
    return dataclasses.replace(run, model_args=model_args, lora_args=lora_args, training_args=training_args,
                               fingerprint=fingerprint, resume_from=resume_from)


def load_encoder(run):
    """The tokenizer, and the ChatEncoder that renders and labels samples with it as the flags say."""
    tokenizer = load_tokenizer(run.model_args, run.training_args)
    data_args = run.data_args
    return tokenizer, ChatEncoder(tokenizer, run.training_args.model_max_length, data_args.system_message,
                                  data_args.template, data_args.chat_template_kwargs, data_args.mask_history)


def check_model_against_flags(run):
    """What the flags ask of the model, checked on its files and config before the data is tokenized and the
    weights load."""
    model_config = check_model_files(run.model_args)
    attention = run.model_args.attn_implementation
    check_sequence_parallel_model(run.training_args, model_config)
    check_attention(model_config, attention)
    check_kernels(model_config, run.training_args)
    check_packing(model_config, attention, run.training_args.packing)
    check_moe_flags(model_config, run.model_args, run.training_args, run.lora_args)
    check_lora_targets(model_config, run.lora_args)


def build_datasets(run, encoder, with_eval_data=True):
    """(training data, evaluation data or None): --eval_data_path (unless not `with_eval_data`), or --val_size held
    out of the training data."""
    seed = run.training_args.seed
    train_dataset = make_dataset(run.sources, encoder, run.data_args, seed)
    if run.eval_sources and with_eval_data:
        return train_dataset, make_dataset(run.eval_sources, encoder, run.data_args, seed)
    if run.data_args.val_size:
        return split_off_validation(train_dataset, run.data_args.val_size, seed)
    return train_dataset, None


def build_trainer(run, tokenizer, encoder, train_dataset, eval_dataset):
    """The model, the Trainer around it, and the callbacks that watch the run."""
    args = with_distributed_settings(run.training_args, run.lora_args, run.model_args.attn_implementation)
    transformers.set_seed(args.seed)  # before the adapter's random init, so that --seed repeats a run
    model = load_model(run.model_args, args, run.lora_args)
    log.info("what will run:\n" + "\n".join(f"  {line}" for line in paths_that_run(model, run.model_args, args,
                                                                                     run.lora_args)))
    trainer = FinetuneTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              data_collator=make_collator(tokenizer, args.packing, args.sequence_parallel_size,
                                                          args.model_max_length),
                              processing_class=tokenizer)
    facts = run_facts(run, model, encoder, train_dataset, eval_dataset) if args.should_save else None
    watch = Watch(StopOnRequest(trainer.divergence),
                  early_stopping(args, run.resume_from) if args.early_stopping_patience else None, facts)
    trainer.add_callback(watch.stop_on_request)
    trainer.add_callback(RecordTrainingData(run.fingerprint, run_shape(args)))
    trainer.add_callback(WriteModelCard(facts))
    if args.eval_generations:
        trainer.add_callback(EvalGenerations(generation_prompts(eval_dataset, args.eval_generations), tokenizer,
                                             args.eval_max_new_tokens, trainer.callback_handler.callbacks))
    if watch.early_stopper:
        trainer.add_callback(watch.early_stopper)
    return trainer, watch


def fit(trainer, run, watch):
    """Train, from the checkpoint decided or afresh; a stop on request or a signal exits here, a divergence or
    weights that are not finite end the run without saving them."""
    args = trainer.args
    if run.resume_from:
        log.info(f"resuming from {run.resume_from}")
    elif args.overwrite_output_dir:
        remove_checkpoints(args.output_dir)
    trainer.train(resume_from_checkpoint=run.resume_from)
    if watch.stop_on_request.stopped_at_step is not None:
        report_stop(watch.stop_on_request, args)
    if trainer.divergence.stopped:
        newest = agreed_by_all_ranks(newest_complete_checkpoint, args.output_dir)  # every rank stopped
        raise RunFailed(f"training diverged: the loss or gradient norm was not finite in {trainer.divergence.in_a_row} "
                        f"steps in a row from step {trainer.divergence.first_bad_step} on, so the result was not "
                        f"saved (newest good checkpoint: {newest or 'none'}); lower --learning_rate, prefer --bf16 "
                        "to --fp16, or look at the data of those steps")
    if not weights_are_finite(trainer.model, args.device):
        raise RunFailed("the trained weights are not finite, so the result was not saved; lower --learning_rate or "
                        "prefer --bf16 to --fp16")


def finish(trainer, run, watch):
    """After the last step: a last evaluation where none was scheduled, the best checkpoint named, the result and
    the tokenizer saved (every rank takes part), then its model card and training curves."""
    args = trainer.args
    if trainer.eval_dataset is not None and args.eval_strategy == "no":
        trainer.log_metrics("eval", trainer.evaluate())  # eval data without an eval schedule: once, at the end
    report_best_checkpoint(trainer.state, args, watch.early_stopper)
    trainer.save_state()
    kind = "LoRA adapter" if run.lora_args.use_lora else "model"
    with announced(f"saving the {kind} and the tokenizer to {args.output_dir}"):
        trainer.save_model(args.output_dir)  # every rank: ZeRO-3 gathers across them
    if args.should_save:
        card = os.path.join(args.output_dir, MODEL_CARD)
        model_card(watch.card_facts, trainer.state).save(card)
        if watch.card_facts.get("expert_lora"):
            log.warning(f"{args.output_dir} holds {EXPERT_ADAPTER}: to serve it, merge it with python "
                        f"merge_adapter.py --adapter {args.output_dir} --output {args.output_dir.rstrip('/')}-merged")
        curves = os.path.join(args.output_dir, "training_curves.png")
        plot_training_curves(trainer.state.log_history, curves)
        log.info(f"model card: {card}; loss and learning-rate curves: {curves}")
    if watch.stop_on_request.signal_name:  # it came after the last step: the result was saved first
        log.warning(f"{watch.stop_on_request.signal_name} received during the final save, which was completed")
        exit_after_signal(getattr(signal, watch.stop_on_request.signal_name))


def report_stop(stop_on_request, training_args):
    """One line on what a signal or STOP_NOW left behind (rank 0 says it), then exit: 0 after STOP_NOW, 128 + the
    signal after a signal (or what the launcher asks for)."""
    step, why = stop_on_request.stopped_at_step, stop_on_request.stop_reason
    if is_main_process():
        checkpoint = checkpoint_folder(training_args.output_dir, step)
        log.warning(f"stopped by {why} {what_a_stop_left(step, checkpoint, training_args)}")
    if why == STOP_NOW:
        sys.exit(0)
    exit_after_signal(getattr(signal, why))


def what_a_stop_left(step, checkpoint, training_args):
    if step == 0:
        return "before the first optimizer step; nothing to save"
    if training_args.save_only_model:
        return (f"at step {step}; {os.path.basename(checkpoint)} holds the weights only (--save_only_model), so a rerun "
                f"starts afresh; they are in {checkpoint}")
    if checkpoint_problem(checkpoint, step) is not None:
        return f"at step {step}, which went wrong: nothing saved; a rerun resumes from the newest good checkpoint"
    return f"at step {step}; the checkpoint is {checkpoint}; run the same command again to resume from it"


def exit_after_signal(signum):
    """Exit 128 + the signal, or what our launcher asks for under torchrun (0, so that torchrun reports no failure;
    the launcher exits 143 itself). The launcher repeats its SIGTERM until we are gone: ignore it from here on,
    or it would end the interpreter's shutdown."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(int(os.environ.get("FINETUNE_SIGNAL_EXIT_CODE", 128 + signum)))


def start_from_weights_of(checkpoint, model_args, lora_args):
    """--resume_on_new_data: (model_args, lora_args) copies that start from the checkpoint's adapter or model, with a
    fresh optimizer, schedule and epoch count."""
    log.warning(f"{checkpoint} was trained on other data: starting from its weights on the new data "
                "(--resume_on_new_data), with a fresh optimizer, schedule and epoch count")
    if lora_args.use_lora:
        return model_args, dataclasses.replace(lora_args, lora_weight_path=checkpoint)
    return dataclasses.replace(model_args, model_name_or_path=checkpoint), lora_args


def remove_checkpoints(output_dir):
    """--overwrite_output_dir: old checkpoints would otherwise be resumed from, or rotated in, later."""
    if is_main_process():
        for step in checkpoint_steps(output_dir):
            shutil.rmtree(checkpoint_folder(output_dir, step))
            log.info(f"--overwrite_output_dir: removed {os.path.basename(checkpoint_folder(output_dir, step))}")


def stop_before_training(signum, frame):
    log.warning(f"stopped by {signal.Signals(signum).name} before training started; nothing to save")
    exit_after_signal(signum)


def not_the_carried_tensors_warning(record):
    """False for the Trainer's warning about unexpected keys when they are all the MTP block's."""
    message = record.getMessage()
    if not message.startswith("There were unexpected keys in the checkpoint model loaded"):
        return True
    return not all(key.startswith(MTP_PREFIX) for key in re.findall(r"'([^']+)'", message))


def main(argv=None):
    logging.basicConfig(format="[%(asctime)s] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # Workaround (peft 0.21): it still calls transformers 5's deprecated is_gradient_checkpointing; it can go when
    # peft calls is_activation_checkpointing.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Workaround (DeepSpeed 0.19 on torch 2.13): ZeRO-3 calls collectives that torch has renamed, and torch warns on
    # every rank; it can go when DeepSpeed calls the new names.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                            "deprecated", category=FutureWarning)
    log.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    rank_log.setLevel(logging.INFO)
    # Workaround (transformers 5.25): resuming a full fine-tune, the Trainer loads a checkpoint's weights and warns
    # that its multi-token-prediction tensors (carried over on purpose, see complete_saved_model) are unexpected.
    transformers.utils.logging.get_logger("transformers.trainer").addFilter(not_the_carried_tensors_warning)
    for sig in (signal.SIGTERM, signal.SIGINT):  # until training starts (and StopOnRequest takes over): just stop
        signal.signal(sig, stop_before_training)
    try:
        train(argv)
    except RunFailed as e:  # the run went wrong (not the user's flags or data): exit 1
        report_error(e)
        sys.exit(1)
    except UserError as e:
        report_error(e)
        sys.exit(2)
    finally:
        release_output_dir()


if __name__ == "__main__":
    main()
