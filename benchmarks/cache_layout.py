"""Why the tokenized-data cache is flat memory-mapped numpy, not Hugging Face `datasets` Arrow files: both layouts
of the same tokenized data, side by side in one run.

    pip install -r benchmarks/requirements.txt      # datasets
    python benchmarks/cache_layout.py [--samples 100000]

The data (synthetic conversations, median ~300 tokens, as in preprocess.py) is tokenized once by finetune.py into
its cache; the same arrays are then written as an Arrow dataset (`save_to_disk`, a list<int32> column per array)
and each layout is opened and read sample by sample in a fresh process, as a training epoch reads it: time to
open, time to read every sample, time to read 10,000 random samples, and the private memory added (RssAnon).
"""
import argparse
import json
import os
import random
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from preprocess import private_mb, write_data  # noqa: E402
from throughput import result_of  # noqa: E402


def encoder():
    import transformers
    from tiny_qwen import qwen_tokenizer_dir

    import finetune

    return finetune.ChatEncoder(transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir()), 8192,
                                template="chatml")


def write_arrow(flat, folder):
    """The same examples as a `datasets` Arrow dataset, written without a Python list per sample."""
    import datasets
    import pyarrow as pa

    offsets = pa.array(flat.offsets, type=pa.int32() if flat.offsets[-1] < 2**31 else pa.int64())
    make = pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray
    table = pa.table({"input_ids": make.from_arrays(offsets, pa.array(flat.input_ids)),
                      "labels": make.from_arrays(offsets, pa.array(flat.labels))})
    start = time.perf_counter()
    datasets.Dataset(table).save_to_disk(folder)
    return time.perf_counter() - start


def read(kind, folder, path):
    if kind == "numpy":
        import finetune

        chat_encoder = encoder()
    before = private_mb()
    start = time.perf_counter()
    if kind == "numpy":  # opening includes hashing the data file and the tokenizer: how an entry is found
        dataset = finetune.SupervisedDataset(path, chat_encoder, cache_dir=folder)
        get = dataset.__getitem__
    else:
        import datasets

        dataset = datasets.load_from_disk(folder)
        get = dataset.__getitem__
    opened = time.perf_counter() - start
    start = time.perf_counter()
    tokens = sum(len(get(i)["input_ids"]) for i in range(len(dataset)))
    every = time.perf_counter() - start
    picks = random.Random(0).sample(range(len(dataset)), min(10_000, len(dataset)))
    start = time.perf_counter()
    for i in picks:
        get(i)
    random_reads = time.perf_counter() - start
    return {"open_s": opened, "every_s": every, "random_s": random_reads, "tokens": tokens,
            "private_mb": private_mb() - before, "samples": len(dataset)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--workdir", default="/tmp/qwen-finetune-bench")
    parser.add_argument("--smoke", action="store_true", help="300 samples: that both layouts still read")
    parser.add_argument("--child")
    parser.add_argument("--folder")
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(read(args.child, args.folder, args.path)), flush=True)
        return
    import finetune

    if args.smoke:
        args.samples = 300
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, f"layout_{args.samples}.jsonl")
    write_data(path, args.samples, median_tokens=300)
    numpy_cache = os.path.join(args.workdir, "layout_numpy")
    arrow = os.path.join(args.workdir, "layout_arrow")
    shutil.rmtree(numpy_cache, ignore_errors=True)
    shutil.rmtree(arrow, ignore_errors=True)
    start = time.perf_counter()
    flat = finetune.SupervisedDataset(path, encoder(), cache_dir=numpy_cache, num_workers=2)
    print(f"{args.samples:,} samples, {len(flat.input_ids):,} tokens; tokenized into the numpy cache in "
          f"{time.perf_counter() - start:.1f} s; the same arrays written as Arrow in {write_arrow(flat, arrow):.1f} s")
    sizes = {name: sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
             for name, folder in (("numpy", numpy_cache), ("arrow", arrow))}
    print(f"{'layout':<8} {'on disk MB':>10} {'open s':>7} {'read all s':>10} {'10k random s':>12} {'private MB':>10}")
    results, failed = {}, False
    for kind, folder in (("numpy", numpy_cache), ("arrow", arrow)):
        results[kind] = result_of([sys.executable, __file__, "--child", kind, "--folder", folder, "--path", path])
        r = results[kind]
        if "error" in r:
            print(f"{kind:<8} failed: {r['error']}")
            failed = True
            continue
        print(f"{kind:<8} {sizes[kind] / 2**20:>10.0f} {r['open_s']:>7.2f} {r['every_s']:>10.1f} {r['random_s']:>12.2f} "
              f"{r['private_mb']:>10.0f}")
    if "error" not in results["numpy"] and "error" not in results["arrow"]:
        assert results["numpy"]["tokens"] == results["arrow"]["tokens"]
        print(f"reading every sample: numpy {results['arrow']['every_s'] / results['numpy']['every_s']:.1f}x faster")
    if failed:
        sys.exit("failed: a layout could not be read")


if __name__ == "__main__":
    main()
