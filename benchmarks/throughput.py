"""Throughput of the ways to batch and score SFT data, side by side in one run, on the CPU.

    python benchmarks/throughput.py [--samples 12] [--modes abcdefghijk] [--workdir /tmp/qwen-finetune-bench]
    python benchmarks/throughput.py --smoke      # every mode on a tiny model in one process: a check, no numbers

One random-weight Qwen2 model (hidden 256, 4 layers, the real 151,680-entry vocabulary: ~42M parameters) and one
synthetic data set (token lengths log-normal, median ~300, capped at 2048; 40% prompt, 60% answer) are built once;
each mode then fine-tunes the full model for one epoch over the same samples in a fresh process, and the table
gives real (non-pad) tokens/s, trained tokens/s, peak resident memory and the ratio to the first row:
  (a) pad every sample to model_max_length (what the reference scripts do)
  (b) pad each batch to its longest sample          (c) (b) + --group_by_length
  (d) --packing (standard loss)                      (e) --packing + the chunked loss (our default loss)
  (f) TRL's SFTTrainer with packing (padding-free), if trl is installed (pip install -r benchmarks/requirements.txt)
And on a Qwen3.5-style hybrid of the same width (three Gated DeltaNet linear-attention layers to one attention
layer, a multimodal checkpoint with a small vision tower), both with the chunked loss:
  (g) pad each batch to its longest sample          (h) --packing, each sample kept apart in the linear layers
And on a Qwen3-MoE of the same width (8 experts of width 352, 2 per token: the active MLP is the dense one's),
with packing and the chunked loss, the experts run three ways (--experts_implementation):
  (i) eager, a loop over the experts              (j) grouped_mm                (k) batched_mm
Then the loss alone at 8 x 1024 tokens: peak memory of the standard loss and of the chunked loss, forward+backward.

MFU (model FLOPs utilisation): the model's own training FLOPs per second over the peak of a large fp32 matmul
measured on the same machine in the same run. The model's FLOPs, per epoch: 6 x the non-embedding parameters per
real token, plus causal attention (6 x layers x heads x head_dim x length^2 per sample: QK^T and AV, forward and
backward, half the square), plus lm_head (6 x hidden x vocabulary) for every trained position, the positions a
fine-tuning loss has to score. Pads, untrained positions' logits and recomputation count as overhead, not work.
For the hybrid, only its language model's parameters count, and attention only in its attention layers (a linear
layer's work per token is in its parameters' count, near enough). For the MoE, only the parameters a token uses:
everything but the experts, plus 2 of the 8 experts.
"""
import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

MAX_LENGTH = 2048
BATCH = 4
# The benchmark's models: ~42M parameters with the real vocabulary; --smoke's is a tiny one, to check that every mode
# still runs (the default test run executes it, so that the benchmark cannot rot unseen).
SHAPE = dict(vocab_size=151680, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
SMOKE_SHAPE = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16)
SMOKE_MAX_LENGTH = 256
MODES = {
    "a": "pad to model_max_length",
    "b": "dynamic padding",
    "c": "dynamic padding + group_by_length",
    "d": "packing",
    "e": "packing + chunked loss",
    "f": "TRL SFTTrainer, packing",
    "g": "hybrid: dynamic padding",
    "h": "hybrid: packing, samples kept apart",
    "i": "MoE: experts eager (a loop)",
    "j": "MoE: experts grouped_mm",
    "k": "MoE: experts batched_mm",
}
HYBRID_MODES, MOE_MODES = "gh", "ijk"
WORDS = ("the of and a to in is you that it he was for on are as with his they at be this from have or by one had "
         "not but what all were when we there can an your which their said if do will each about how up out them "
         "then she many some so these would other into has more her two like him see time could no make than first "
         "been its who now people my made over did down only way find use may water long little very after words "
         "called just where most know get through back much before go good new write our used me man too any day "
         "same right look think also around another came come work three word must because does part even place").split()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(workdir, samples, seed=0, shape=SHAPE):
    """The model and the data set, written once and shared by every mode."""
    import transformers
    from tiny_qwen import qwen_tokenizer_dir

    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    shape = dict(shape, max_position_embeddings=4096, eos_token_id=151645, pad_token_id=151643, bos_token_id=151643)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(tie_word_embeddings=True, **shape),
                                                          dtype=torch.float32)
    model.save_pretrained(os.path.join(workdir, "model"))
    tokenizer.save_pretrained(os.path.join(workdir, "model"))
    hybrid = transformers.Qwen3_5Config(
        text_config=dict(**{**shape, "num_hidden_layers": 4}, layer_types=["linear_attention"] * 3 + ["full_attention"],
                         linear_key_head_dim=shape["head_dim"], linear_value_head_dim=shape["head_dim"],
                         linear_num_key_heads=2, linear_num_value_heads=4),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=shape["hidden_size"]))
    torch.manual_seed(seed)
    transformers.AutoModelForImageTextToText.from_config(hybrid, dtype=torch.float32).save_pretrained(
        os.path.join(workdir, "hybrid"))
    tokenizer.save_pretrained(os.path.join(workdir, "hybrid"))
    moe = transformers.Qwen3MoeConfig(**shape, num_experts=8, num_experts_per_tok=2,
                                      moe_intermediate_size=shape["intermediate_size"] // 2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(moe, dtype=torch.float32).save_pretrained(os.path.join(workdir, "moe"))
    tokenizer.save_pretrained(os.path.join(workdir, "moe"))

    rng = random.Random(seed)
    with open(os.path.join(workdir, "data.jsonl"), "w") as f:
        for _ in range(samples):
            tokens = min(int(rng.lognormvariate(math.log(300), 0.8)), MAX_LENGTH - 40)
            words = [rng.choice(WORDS) for _ in range(max(tokens - 30, 4))]  # ~1 token a word, ~30 for the template
            cut = max(1, int(len(words) * 0.4))
            f.write(json.dumps({"messages": [{"role": "user", "content": " ".join(words[:cut])},
                                             {"role": "assistant", "content": " ".join(words[cut:])}]}) + "\n")
    return model.num_parameters()


class PadToMaxLength:
    """The reference behaviour: every sample padded to model_max_length."""

    def __init__(self, pad_token_id, length):
        import finetune

        self.pad = finetune.PadToLongestCollator(pad_token_id)
        self.length = length

    def __call__(self, examples):
        filler = {"input_ids": [self.pad.pad_token_id] * self.length, "labels": [-100] * self.length}
        batch = self.pad(list(examples) + [filler])
        batch = {k: v[:-1] for k, v in batch.items()}
        return batch


def run_mode(mode, workdir):
    """Train one epoch in this process; return its numbers."""
    import finetune

    import torch

    torch.manual_seed(0)
    model_dir = os.path.join(workdir, "hybrid" if mode in HYBRID_MODES else "moe" if mode in MOE_MODES else "model")
    data = os.path.join(workdir, "data.jsonl")
    if mode == "f":
        return run_trl(model_dir, data, workdir)
    argv = ["--model_name_or_path", model_dir, "--data_path", data, "--output_dir", os.path.join(workdir, mode),
            "--model_max_length", str(MAX_LENGTH), "--per_device_train_batch_size", str(BATCH),
            "--num_train_epochs", "1", "--learning_rate", "1e-4", "--save_strategy", "no", "--logging_steps", "1000",
            "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
            "--chunked_loss", str(mode in "egh" + MOE_MODES).lower(),
            "--packing", str(mode in "deh" + MOE_MODES).lower(),
            "--group_by_length", str(mode == "c").lower()]
    if mode in MOE_MODES:
        argv += ["--experts_implementation", {"i": "eager", "j": "grouped_mm", "k": "batched_mm"}[mode]]
    model_args, data_args, training_args, lora_args = finetune.parse_arguments(argv)
    tokenizer = finetune.load_tokenizer(model_args, training_args)
    encoder = finetune.ChatEncoder(tokenizer, MAX_LENGTH, data_args.system_message, data_args.template)
    dataset = finetune.SupervisedDataset(data, encoder)
    collator = (PadToMaxLength(tokenizer.pad_token_id, MAX_LENGTH) if mode == "a"
                else finetune.make_collator(tokenizer, training_args.packing))
    model = finetune.load_model(model_args, training_args, lora_args)
    trainer = finetune.FinetuneTrainer(model=model, args=training_args, train_dataset=dataset,
                                       data_collator=collator, processing_class=tokenizer)
    seconds = trainer.train().metrics["train_runtime"]
    real = sum(len(e["input_ids"]) for e in dataset.examples)
    trained = sum(int((e["labels"][1:] != -100).sum()) for e in dataset.examples)
    squares = sum(len(e["input_ids"]) ** 2 for e in dataset.examples)
    return {"seconds": seconds, "real_tokens": real, "trained_tokens": trained, "squared_lengths": squares}


def run_trl(model_dir, data, workdir):
    import datasets
    import transformers
    import trl

    rows = []
    with open(data) as f:
        for line in f:
            messages = json.loads(line)["messages"]
            rows.append({"prompt": [{"role": "system", "content": "You are a helpful assistant."}, messages[0]],
                         "completion": [messages[1]]})
    dataset = datasets.Dataset.from_list(rows)
    config = trl.SFTConfig(output_dir=os.path.join(workdir, "f"), max_length=MAX_LENGTH, packing=True, padding_free=True,
                           per_device_train_batch_size=1, num_train_epochs=1, learning_rate=1e-4,
                           save_strategy="no", logging_steps=1000, use_cpu=True, report_to="none",
                           disable_tqdm=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    real = sum(len(r["input_ids"]) for r in trainer.train_dataset)
    trained = sum(sum(label != -100 for label in r["labels"][1:]) for r in trainer.train_dataset)
    # A packed row holds several samples (seq_lengths); attention work is per sample.
    squares = sum(sum(n ** 2 for n in r.get("seq_lengths") or [len(r["input_ids"])]) for r in trainer.train_dataset)
    seconds = trainer.train().metrics["train_runtime"]
    return {"seconds": seconds, "real_tokens": real, "trained_tokens": trained, "squared_lengths": squares,
            "trl": trl.__version__}


def loss_memory(kind, batch=8, length=1024, vocab=151680, hidden=256, chunk=1024):
    """Peak memory added by one forward+backward of the loss alone (hidden states in, gradients out)."""
    import finetune

    import torch

    torch.manual_seed(0)
    lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    hidden_states = torch.randn(batch, length, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, : length // 2] = -100  # half the positions are prompt
    before = peak_rss_mb()
    start = time.perf_counter()
    if kind == "standard":
        logits = lm_head(hidden_states).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    else:
        class Holder(torch.nn.Module):
            """What ChunkedCausalLMLoss asks of a model: its lm_head, its input embeddings (here tied to it, which
            only matters under ZeRO-3) and its decoder, whose output the loss would keep (set directly below)."""

            def get_output_embeddings(self):
                return lm_head

            def get_input_embeddings(self):
                return lm_head

            def get_decoder(self):
                return torch.nn.Identity()

        loss_fn = finetune.ChunkedCausalLMLoss(Holder(), chunk)
        loss_fn.hidden_states = hidden_states
        loss = loss_fn(None, labels)
    loss.backward()
    return {"peak_added_mb": peak_rss_mb() - before, "seconds": time.perf_counter() - start, "loss": loss.item()}


def matmul_peak(size=2048, repeats=10):
    """FLOP/s of the fastest of `repeats` fp32 (size x size) @ (size x size) products: what this machine can do."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return {"flops_per_second": 2 * size ** 3 / best}


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def model_flops(config, params, result, embeddings=1):
    """The model's training FLOPs for one epoch of `result`'s data (see the docstring); `params` counts the
    language model's parameters, `embeddings` its embedding matrices (1 when lm_head is tied to them, else 2)."""
    heads, head_dim = config["num_attention_heads"], config.get("head_dim") or config["hidden_size"] // config[
        "num_attention_heads"]
    embedding = config["vocab_size"] * config["hidden_size"]
    dense = 6 * (params - embeddings * embedding) * result["real_tokens"]
    # Causal: L^2 / 2 query-key pairs, 2 FLOPs per pair and dimension in QK^T and again in AV, x3 with backward.
    layers = (config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]).count("full_attention")
    attention = 6 * layers * heads * head_dim * result["squared_lengths"]
    lm_head = 6 * embedding * result["trained_tokens"]
    return dense + attention + lm_head


def active_size(model_dir):
    """(decoder config, parameters one token uses: all but the experts, plus top-k of them; embedding matrices)."""
    import transformers

    import torch

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))
    config = model.config
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    total = sum(p.numel() for p in model.parameters())
    return config.to_dict(), total - experts + experts * config.num_experts_per_tok // config.num_experts, 1


def language_model_size(model_dir):
    """(its decoder config, parameters of its language model and lm_head, embedding matrices among them)."""
    import transformers

    import torch

    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(transformers.AutoConfig.from_pretrained(model_dir))
    params = sum(p.numel() for p in model.get_decoder().parameters()) + model.get_output_embeddings().weight.numel()
    return model.config.get_text_config().to_dict(), params, 2


def measured(what, workdir, smoke=False):
    """One measurement's numbers (in the process of its own that run_child starts, or in this one for --smoke)."""
    if what == "peak":
        result = matmul_peak(size=256 if smoke else 2048)
    elif what.startswith("loss:"):
        result = loss_memory(what[5:], **(dict(batch=2, length=128) if smoke else {}))
    else:
        result = run_mode(what, workdir)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def child(args):
    print("RESULT " + json.dumps(measured(args.child, args.workdir)), flush=True)


def result_of(command, **env):
    """Run one measurement in a fresh process; its 'RESULT {json}' line, or the last line of its error."""
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def run_child(what, workdir, smoke=False):
    if smoke:  # every mode's code runs, in this process: its memory and speed mean nothing
        try:
            return measured(what, workdir, smoke=True)
        except Exception as e:  # noqa: BLE001 - reported in the table, as a child's failure is
            return {"error": f"{type(e).__name__}: {e}"}
    return result_of([sys.executable, __file__, "--child", what, "--workdir", workdir],
                     HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--workdir", default="/tmp/qwen-finetune-bench")
    parser.add_argument("--modes", default="abcdefghijk")
    parser.add_argument("--smoke", action="store_true",
                        help="every mode on a tiny model (4 samples) in this process, to check that it runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    global MAX_LENGTH
    if args.smoke:
        MAX_LENGTH, args.samples = SMOKE_MAX_LENGTH, min(args.samples, 4)
        os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.makedirs(args.workdir, exist_ok=True)
    params = build(args.workdir, args.samples, shape=SMOKE_SHAPE if args.smoke else SHAPE)
    print(f"model: random Qwen2, {params / 1e6:.1f}M parameters; data: {args.samples} samples, log-normal lengths "
          f"(median ~300 tokens, max {MAX_LENGTH}); batch {BATCH}; fp32; {os.cpu_count()} CPU cores; "
          f"{time.strftime('%Y-%m-%d')}\n")
    peak = run_child("peak", args.workdir, args.smoke)
    with open(os.path.join(args.workdir, "model", "config.json")) as f:
        config = json.load(f)
    if "error" not in peak:
        print(f"peak of an fp32 2048 x 2048 matmul on this machine: {peak['flops_per_second'] / 1e9:.1f} GFLOP/s\n")
    hybrid = language_model_size(os.path.join(args.workdir, "hybrid"))
    moe = active_size(os.path.join(args.workdir, "moe"))
    first = {}  # the first row of each model's table: what its ratios are against
    headers = {"hybrid": f"\nthe Qwen3.5-style hybrid of the same width: {hybrid[1] / 1e6:.1f}M language-model "
                         "parameters (lm_head untied), 3 linear-attention layers to 1 attention layer",
               "moe": f"\nthe Qwen3-MoE of the same width: {moe[1] / 1e6:.1f}M parameters active per token"}
    failures = [] if "error" not in peak else ["peak"]
    print(f"{'mode':<40} {'real tok/s':>10} {'trained tok/s':>13} {'peak RSS MB':>11} {'x first':>7} {'MFU':>6}")
    for mode in args.modes:
        family = "hybrid" if mode in HYBRID_MODES else "moe" if mode in MOE_MODES else "dense"
        if family not in first and family in headers:
            print(headers[family])
        result = run_child(mode, args.workdir, args.smoke)
        if "error" in result:
            print(f"({mode}) {MODES[mode]:<36} failed: {result['error'][:120]}")
            failures.append(mode)
            continue
        real = result["real_tokens"] / result["seconds"]
        trained = (result["trained_tokens"] or 0) / result["seconds"]
        base = first.setdefault(family, real)
        model_config, model_params, embeddings = {"hybrid": hybrid, "moe": moe}.get(family, (config, params, 1))
        flops = model_flops(model_config, model_params, result, embeddings)
        mfu = f"{flops / result['seconds'] / peak['flops_per_second']:>6.1%}" if "error" not in peak else f"{'-':>6}"
        print(f"({mode}) {MODES[mode]:<36} {real:>10.1f} {trained:>13.1f} {result['peak_rss_mb']:>11.0f} "
              f"{real / base:>7.2f} {mfu}")

    print(f"\nloss alone, {'2 x 128' if args.smoke else '8 x 1024'} tokens, vocabulary 151,680, half the positions "
          "trained (forward + backward):")
    memory = {kind: run_child(f"loss:{kind}", args.workdir, args.smoke) for kind in ("standard", "chunked")}
    for kind, result in memory.items():
        if "error" in result:
            print(f"  {kind:<9} failed: {result['error'][:120]}")
            failures.append(f"loss:{kind}")
        else:
            print(f"  {kind:<9} peak memory added {result['peak_added_mb']:>7.0f} MB, {result['seconds']:.2f} s, "
                  f"loss {result['loss']:.6f}")
    if all("error" not in r for r in memory.values()):
        ratio = memory["standard"]["peak_added_mb"] / max(memory["chunked"]["peak_added_mb"], 1)
        print(f"  the chunked loss needs {ratio:.1f}x less memory")
    if failures:
        sys.exit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()
