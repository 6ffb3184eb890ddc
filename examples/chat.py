"""Load a fine-tuned result and answer one message with it.

    python examples/chat.py --model OUTPUT_DIR "Hello!"                   # a full fine-tune or a merged model
    python examples/chat.py --base BASE_MODEL --adapter OUTPUT_DIR "Hi"   # a LoRA / QLoRA adapter on its base
"""
import argparse
import logging
import os
import sys
import warnings

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from finetune import model_class  # noqa: E402
from merge_adapter import load_base_of  # noqa: E402

# Workarounds, for output a user can act on: bitsandbytes 0.50, imported with transformers' model classes and by
# peft, warns on every CPU machine that an optional 4-bit kernel package is missing; peft 0.21 still calls
# transformers 5's deprecated is_gradient_checkpointing (gone when peft calls is_activation_checkpointing).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def load(model=None, base=None, adapter=None):
    if adapter:
        import peft

        tokenizer = transformers.AutoTokenizer.from_pretrained(adapter)  # finetune.py saves it with the adapter
        loaded, _ = load_base_of(adapter, base, dtype="auto")  # with --rope_scaling's YaRN, if the run used it
        return peft.PeftModel.from_pretrained(loaded, adapter), tokenizer
    config = transformers.AutoConfig.from_pretrained(model)
    return (model_class(config).from_pretrained(model, dtype="auto"), transformers.AutoTokenizer.from_pretrained(model))


def reply(model, tokenizer, message, system="You are a helpful assistant.", max_new_tokens=48, thinking=True):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
    # enable_thinking=False makes Qwen3's template put the empty <think></think> block into the prompt: what a model
    # fine-tuned on answers without reasoning saw (other templates ignore the flag).
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                           enable_thinking=thinking)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message")
    parser.add_argument("--model", help="folder of a full model")
    parser.add_argument("--base", help="base model of the adapter")
    parser.add_argument("--adapter", help="folder written by a LoRA or QLoRA run")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--no_thinking", action="store_true", help="Qwen3: answer without a <think> block")
    args = parser.parse_args()
    if not args.model and not (args.base and args.adapter):
        parser.error("give --model, or --base and --adapter")
    model, tokenizer = load(args.model, args.base, args.adapter)
    print(f"user: {args.message}")
    answer = reply(model, tokenizer, args.message, max_new_tokens=args.max_new_tokens, thinking=not args.no_thinking)
    print(f"assistant: {answer}")
