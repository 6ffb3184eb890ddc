"""Does a real engine read what finetune.py writes? llama.cpp's own converters and runtime on a full fine-tune, a
merge and an adapter of tiny Qwen3, Qwen3.5 (laid out as released: vision tower, multi-token-prediction block) and
Qwen3-MoE models, with the logits compared to transformers'. Slow: not part of the default test run.

    pip install llama-cpp-python sentencepiece   # compiles llama.cpp: 7 to 25 minutes on 2 CPU cores
    python benchmarks/engines.py [--workdir /tmp/qwen-finetune-engines] [--llama-cpp SOURCE_FOLDER]

llama.cpp's converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py and the gguf package beside them) come from
--llama-cpp, a llama.cpp source folder, or else from the source release of llama-cpp-python, downloaded with pip
into the work folder (vendor/llama.cpp). Each output is converted to an f32 GGUF and run by llama-cpp-python on the
token ids of one conversation; the largest difference of its logits from transformers' (the output loaded as its own
class, fp32), relative to the largest logit, is printed per output. An f32 GGUF computes what transformers computes,
in another order of sums: it must agree to 1e-3 of the logits' scale (the tiny models' logits are about 1). The
adapter of LoRA on the fused MoE experts is expected to be refused by llama.cpp's LoRA converter ("Unprocessed
experts"): finetune.py says that such an adapter must be merged to be served, and the merge is checked instead.
Exits non-zero if any other output fails to convert, load or agree.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

TOLERANCE = 1e-3  # of the largest logit: f32 both sides, sums in another order
CONVERSATION = [{"role": "user", "content": "What is 12 times 13? Answer in one line."},
                {"role": "assistant", "content": "12 times 13 is 156."}]
FAMILIES = ("qwen3", "qwen3_5", "qwen3_moe")


def llama_cpp_source(workdir, given):
    """The llama.cpp source folder with the converters: --llama-cpp, or llama-cpp-python's source release."""
    if given:
        return given
    found = glob.glob(os.path.join(workdir, "llama_cpp_python-*", "vendor", "llama.cpp"))
    if found:
        return sorted(found)[-1]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", workdir,
                    "llama-cpp-python"], check=True, capture_output=True)
    with tarfile.open(sorted(glob.glob(os.path.join(workdir, "llama_cpp_python-*.tar.gz")))[-1]) as archive:
        archive.extractall(workdir, filter="data")
    return sorted(glob.glob(os.path.join(workdir, "llama_cpp_python-*", "vendor", "llama.cpp")))[-1]


def tiny_model(workdir, arch):
    """A tiny model of the family with the settings llama.cpp's converter reads as Qwen's releases have them: the
    rotary sections of Qwen3.5's MRoPE fitted to its tiny head (16 x 0.25 = 4 rotary dimensions: [1, 1, 0]) and
    Qwen3-MoE's normalised top-k routing."""
    from tiny_qwen import build_tiny_qwen

    folder = os.path.join(workdir, f"base_{arch}")
    if not os.path.isdir(folder):
        build_tiny_qwen(folder, arch)
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        if arch == "qwen3_5":
            config["text_config"]["rope_parameters"]["mrope_section"] = [1, 1, 0]
        if arch == "qwen3_moe":
            config["norm_topk_prob"] = True
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    return folder


def train(base, out, *flags):
    if not os.path.isdir(out):
        subprocess.run([sys.executable, os.path.join(ROOT, "finetune.py"), "--model_name_or_path", base, "--data_path",
                        os.path.join(ROOT, "examples", "data.jsonl"), "--output_dir", out, "--max_steps", "3",
                        "--learning_rate", "1e-2", "--per_device_train_batch_size", "2", "--save_strategy", "no",
                        "--use_cpu", "true", "--report_to", "none", "--lora_dropout", "0", *flags],
                       check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def token_ids(base):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    return list(tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"])


def transformers_logits(folder, ids, adapter=None):
    import torch
    import transformers

    import finetune

    config = transformers.AutoConfig.from_pretrained(folder)
    model = finetune.model_class(config).from_pretrained(folder, dtype=torch.float32).eval()
    if adapter:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def convert(source, script, args, outfile):
    env = {**os.environ, "PYTHONPATH": os.path.join(source, "gguf-py"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, os.path.join(source, script), *args, "--outtype", "f32", "--outfile",
                           outfile], capture_output=True, text=True, env=env)
    if proc.returncode:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeError(next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "?"))
    return outfile


def llama_cpp_logits(gguf_file, ids, lora=None):
    import llama_cpp
    import numpy as np

    model = llama_cpp.Llama(gguf_file, lora_path=lora, n_ctx=max(256, len(ids)), logits_all=True, verbose=False,
                            n_threads=2)
    model.eval(ids)
    return np.array(model.scores[:len(ids)])


def compare(name, expected, got):
    import numpy as np

    difference = float(np.abs(expected - got).max() / max(np.abs(expected).max(), 1e-9))
    same_argmax = bool((expected.argmax(-1) == got.argmax(-1)).all())
    ok = difference <= TOLERANCE and same_argmax
    print(f"  {name:<9} largest difference {difference:.2e} of the largest logit, same next token everywhere: "
          f"{same_argmax}  {'ok' if ok else 'MISMATCH'}", flush=True)
    return ok


def check_family(arch, workdir, source):
    """True when the family's full fine-tune, merge and adapter convert and run with transformers' logits."""
    import merge_adapter

    base = tiny_model(workdir, arch)
    ids = token_ids(base)
    full = train(base, os.path.join(workdir, f"full_{arch}"))
    adapter = train(base, os.path.join(workdir, f"lora_{arch}"), "--use_lora", "true", "--lora_r", "8")
    merged = os.path.join(workdir, f"merged_{arch}")
    if not os.path.isdir(merged):
        merge_adapter.merge(adapter, merged)
    mtp = sum(name.startswith("mtp.") for name in __import__("finetune").stored_tensors(full))
    print(f"{arch}: {len(ids)} tokens; the full fine-tune holds {mtp} MTP tensors", flush=True)
    ok = True
    for name, folder in (("full", full), ("merge", merged)):
        try:
            gguf_file = convert(source, "convert_hf_to_gguf.py", [folder], os.path.join(workdir, f"{name}_{arch}.gguf"))
            ok &= compare(name, transformers_logits(folder, ids), llama_cpp_logits(gguf_file, ids))
        except Exception as e:  # noqa: BLE001 - reported as this output's failure
            print(f"  {name:<9} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
            ok = False
    experts = "moe" in arch
    try:
        base_gguf = convert(source, "convert_hf_to_gguf.py", [base], os.path.join(workdir, f"base_{arch}.gguf"))
        lora_gguf = convert(source, "convert_lora_to_gguf.py", [adapter, "--base", base],
                            os.path.join(workdir, f"adapter_{arch}.gguf"))
        ok &= compare("adapter", transformers_logits(base, ids, adapter), llama_cpp_logits(base_gguf, ids, lora_gguf))
        if experts:
            print("  (llama.cpp's LoRA converter took LoRA on the fused experts: the README can say so)")
    except Exception as e:  # noqa: BLE001
        if experts and "Unprocessed experts" in str(e):
            print("  adapter   refused by llama.cpp's LoRA converter (LoRA on the fused experts), as finetune.py "
                  "says at the end of such a run: merge it (checked above)", flush=True)
        else:
            print(f"  adapter   FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
            ok = False
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/qwen-finetune-engines")
    parser.add_argument("--llama-cpp", help="a llama.cpp source folder (default: llama-cpp-python's source release)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python sentencepiece (it compiles llama.cpp)")
    os.makedirs(args.workdir, exist_ok=True)
    source = llama_cpp_source(args.workdir, args.llama_cpp)
    print(f"llama.cpp converters from {source}; llama-cpp-python {__import__('llama_cpp').__version__}\n")
    results = {arch: check_family(arch, args.workdir, source) for arch in args.families.split(",")}
    print("\n" + ", ".join(f"{arch}: {'ok' if ok else 'FAILED'}" for arch, ok in results.items()))
    if not all(results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
