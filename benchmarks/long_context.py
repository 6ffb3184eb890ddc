"""Peak memory per rank and tokens/s of one long sample, with and without sequence parallelism, in one run on the CPU.

    python benchmarks/long_context.py [--lengths 8192,16384] [--workdir /tmp/qwen-finetune-long]
    python benchmarks/long_context.py --smoke     # one short sample on a tiny model, N = 1 and 2: a check, no numbers

The benchmark's random Qwen2 (benchmarks/throughput.py: ~42M parameters, the real 151,680-entry vocabulary) is
stretched with --rope_scaling 4 (YaRN) and fully fine-tuned for one optimizer step under ZeRO-3 with the chunked
loss, on 2 processes (torchrun, gloo): N = 1 is plain data parallelism (each rank trains its own sample of the
length), N = 2 splits one sample over both ranks (--sequence_parallel_size 2). Every sample is one conversation,
40% prompt and 60% answer, exactly as long as the row. The activation part of a rank's peak is its peak resident
memory minus that of the same configuration on a short sample (--base tokens): what the length itself costs.
"""
import argparse
import atexit
import json
import os
import random
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from throughput import SHAPE, SMOKE_SHAPE, WORDS, build, peak_rss_mb  # noqa: E402

CHUNK = 256  # --loss_chunk_size: its logits (chunk x vocabulary floats) are a fixed cost of every length


def write_sample(path, tokens, copies, seed=0):
    """`copies` conversations of more than `tokens` tokens (~1 token a word); the row cuts them to `tokens`."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(copies):
            words = [rng.choice(WORDS) for _ in range(tokens + 64)]
            cut = int(len(words) * 0.4)
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(words[:cut])},
                                             {"role": "assistant", "content": " ".join(words[cut:])}]}) + "\n")


def worker(argv, peaks_dir):
    """One rank under torchrun: finetune.py, then its peak resident memory into peaks_dir."""
    import finetune

    def record():
        with open(os.path.join(peaks_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump({"peak_rss_mb": peak_rss_mb()}, f)

    atexit.register(record)
    finetune.main(argv)


def measure(workdir, tokens, split, port):
    """One optimizer step on 2 processes; per-rank peaks, tokens/s and the step's loss."""
    name = f"L{tokens}_N{split}"
    out, peaks = os.path.join(workdir, name), os.path.join(workdir, name + "_peaks")
    os.makedirs(peaks, exist_ok=True)
    data = os.path.join(workdir, f"data_{tokens}.jsonl")
    write_sample(data, tokens, copies=2)  # N = 1: one sample per rank
    args = ["--model_name_or_path", os.path.join(workdir, "model"), "--data_path", data, "--output_dir", out,
            "--overwrite_output_dir", "true", "--model_max_length", str(tokens), "--rope_scaling", "4",
            "--deepspeed", os.path.join(ROOT, "ds_config_zero3.json"), "--sequence_parallel_size", str(split),
            "--per_device_train_batch_size", "1", "--max_steps", "1", "--learning_rate", "1e-5",
            "--loss_chunk_size", str(CHUNK), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--data_cache_dir", os.path.join(workdir, "cache")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               __file__, "--worker", peaks, "--", *args]
    proc = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    with open(os.path.join(out, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    step = next(entry for entry in history if "loss" in entry)
    runtime = next(entry["train_runtime"] for entry in history if "train_runtime" in entry)
    ranks = [json.load(open(os.path.join(peaks, name))) for name in sorted(os.listdir(peaks))]
    return {"peak_mb": max(r["peak_rss_mb"] for r in ranks), "loss": step["loss"],
            "tokens_per_second": step["num_input_tokens_seen"] / runtime}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--base", type=int, default=1024, help="the short sample whose peak is the fixed part")
    parser.add_argument("--workdir", default="/tmp/qwen-finetune-long")
    parser.add_argument("--smoke", action="store_true",
                        help="one sample of 256 tokens on a tiny model, without the short base run: that it runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(rest[1:] if rest[:1] == ["--"] else rest, args.worker)

    if args.smoke:
        args.lengths, args.base = "256", 0
    os.makedirs(args.workdir, exist_ok=True)
    params = build(args.workdir, samples=0, shape=SMOKE_SHAPE if args.smoke else SHAPE)
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"model: random Qwen2, {params / 1e6:.1f}M parameters, YaRN x4; ZeRO-3, chunked loss (chunks of {CHUNK}), "
          f"fp32, 2 processes (gloo); {os.cpu_count()} CPU cores; {time.strftime('%Y-%m-%d')}\n")
    print(f"{'tokens':>7} {'N':>2} {'peak RSS/rank MB':>16} {'activations MB':>14} {'tokens/s':>9} {'loss':>9}")
    results, failed = {}, []
    for split in (1, 2):
        for tokens in [args.base, *lengths] if args.base else lengths:  # --base 0: no base run
            results[tokens, split] = result = measure(args.workdir, tokens, split, free_port())
            if "error" in result:
                print(f"{tokens:>7} {split:>2} failed: {result['error'][:120]}")
                failed.append(f"{tokens} tokens, N = {split}")
                continue
            base = results.get((args.base, split), {})
            result["activations_mb"] = result["peak_mb"] - base.get("peak_mb", result["peak_mb"])
            print(f"{tokens:>7} {split:>2} {result['peak_mb']:>16.0f} {result['activations_mb']:>14.0f} "
                  f"{result['tokens_per_second']:>9.1f} {result['loss']:>9.4f}", flush=True)
    print()
    for tokens in lengths if args.base else ():  # the comparisons need the base run's fixed part
        one, two = results.get((tokens, 1), {}), results.get((tokens, 2), {})
        if "activations_mb" in one and "activations_mb" in two:
            print(f"{tokens} tokens: activations per rank {one['activations_mb'] / max(two['activations_mb'], 1):.2f}x "
                  f"lower with N = 2; tokens/s {two['tokens_per_second'] / one['tokens_per_second']:.2f}x of N = 1")
    if len(lengths) >= 2 and all("activations_mb" in results.get((n, s), {}) for n in lengths[-2:] for s in (1, 2)):
        short, long_ = lengths[-2:]
        for split in (1, 2):
            grown = results[long_, split]["activations_mb"] - results[short, split]["activations_mb"]
            per_token = grown / (long_ - short)
            print(f"N = {split}: {per_token * 1024:.0f} MB per 1k tokens of sample per rank "
                  f"({long_ - short} tokens from {short} to {long_})")
    if failed:
        sys.exit(f"failed: {'; '.join(failed)}")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
