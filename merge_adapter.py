"""Merge a LoRA or QLoRA adapter written by finetune.py into its base model: one standalone model to serve.

    python merge_adapter.py --adapter output_lora --output merged [--base MODEL] [--dtype base|bf16|fp16|fp32]
        [--no_mtp]

The base model is loaded as the class its checkpoint declares (a multimodal Qwen3.5/3.6/3.8 with its vision tower),
in the precision its checkpoint is stored in (a QLoRA adapter too: it merges into the 16-bit base, not into 4-bit
weights), the adapter is folded into its weights, and the output folder gets the model in safetensors with the
tokenizer and chat template saved beside the adapter. Every tensor of the base checkpoint is written, in the dtype the
checkpoint stores it in: what the model class does not load (the multi-token-prediction block of Qwen3.5/3.6/3.8,
which vLLM and llama.cpp read) is carried over unchanged, unless --no_mtp. --dtype bf16|fp16|fp32 writes every
tensor the model loads in that dtype instead. By default the base is the one the adapter names.
"""
import argparse
import json
import os
import sys
import time

import torch
import transformers

from finetune import (BASE_CONFIG_CHANGES, complete_saved_model, first_line, keep_stored_fp32,
                      local_model_folder, model_class)

DTYPES = {"base": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class MergeError(Exception):
    """What the user can fix (a folder, a model name), said in one line."""


def merge(adapter_dir, output_dir, base=None, dtype="base", trust_remote_code=False, keep_mtp=True):
    import peft

    started = time.perf_counter()
    model, base = load_base_of(adapter_dir, base, DTYPES[dtype], trust_remote_code)
    if dtype == "base" and (folder := local_model_folder(base)):
        keep_stored_fp32(model, folder)  # what the checkpoint stores in fp32 besides its 16-bit weights
    say(f"loaded {base} ({dtype}) in {time.perf_counter() - started:,.1f} s; merging {adapter_dir} into it")
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    started = time.perf_counter()
    merged.save_pretrained(output_dir)
    carried, _ = complete_saved_model(merged, output_dir, keep_mtp, stored_dtypes=dtype == "base")
    say(f"saved the merged model to {output_dir} in {time.perf_counter() - started:,.1f} s"
        + (f" (with the {len(carried)} tensors of the base that the model class does not load: its multi-token-"
           "prediction block, unchanged)" if carried else ""))
    tokenizer_source = adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) else base
    transformers.AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code).save_pretrained(
        output_dir)
    return output_dir


def say(line):
    """Progress of a merge, which takes minutes on a large model: on stderr, so that stdout keeps the result line."""
    print(line, file=sys.stderr, flush=True)


def load_base_of(adapter_dir, base=None, dtype=torch.float32, trust_remote_code=False):
    """(the base model an adapter was trained on, its name): the one the adapter names unless `base` is given,
    with what finetune.py --rope_scaling changed in its config."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise MergeError(f"{adapter_dir}: no adapter_config.json (is it a LoRA output folder?)")
    with open(config_path) as f:
        base = base or json.load(f)["base_model_name_or_path"]
    try:
        config = transformers.AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MergeError(f"base model {base}: cannot load its config ({first_line(e)})") from None
    changes_path = os.path.join(adapter_dir, BASE_CONFIG_CHANGES)  # finetune.py --rope_scaling
    if os.path.isfile(changes_path):
        with open(changes_path) as f:
            for key, value in json.load(f).items():
                setattr(config.get_text_config(), key, value)  # a multimodal model's language model's settings
    try:
        model = model_class(config).from_pretrained(base, config=config, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise MergeError(f"base model {base}: cannot load it ({first_line(e)})") from None
    return model, base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="folder written by a LoRA or QLoRA run")
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--base", help="base model (default: the one recorded in the adapter's config)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="base",
                        help="precision of the merged model (base: each tensor as the base checkpoint stores it)")
    parser.add_argument("--no_mtp", action="store_true",
                        help="leave the base's multi-token-prediction block out (and out of the config)")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    try:
        merge(args.adapter, args.output, args.base, args.dtype, args.trust_remote_code, keep_mtp=not args.no_mtp)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.base or 'its base model'}: {args.output} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
