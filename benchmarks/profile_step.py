"""Where a training step's time goes on the CPU: one run of throughput.py's mode (e) (packing + the chunked loss, the
default) under torch.profiler, the step's CPU time split into matmuls, attention, elementwise work, the optimizer,
the data loader, the loss and the rest.

    python benchmarks/profile_step.py [--samples 12] [--steps 3] [--workdir /tmp/qwen-finetune-bench]
    python benchmarks/profile_step.py --smoke     # a tiny model: that it runs

The model and data are throughput.py's (random Qwen2, hidden 256, 4 layers, the real vocabulary). The first step
is left out (warm-up); the next --steps are profiled. Each operator's own CPU time (not its children's) is given to
the optimizer step or the data loader when it runs within them; else to the loss (our chunked cross-entropy, marked
while it runs) or the model (forward and backward), each split by the operator's name into matrix products,
attention, elementwise work and reductions, and the rest (copies, views, autograd's own work).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import throughput  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "aten::_grouped_mm")
ATTENTION = ("scaled_dot_product", "_flash_attention", "_efficient_attention")
ELEMENTWISE = ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::silu", "aten::exp", "aten::pow", "aten::rsqrt",
               "aten::mean", "aten::sum", "aten::neg", "aten::sigmoid", "aten::cat", "aten::logsumexp", "aten::where",
               "aten::softmax", "aten::_softmax", "aten::gelu", "aten::tanh", "aten::cos", "aten::sin", "aten::sqrt",
               "aten::clamp", "aten::lerp", "aten::addcmul", "aten::addcdiv", "aten::threshold", "aten::fill_",
               "aten::zero_", "aten::embedding", "aten::index", "aten::gather", "aten::scatter")
SCOPES = (("loss", "loss"), ("optimizer", "Optimizer.step"), ("data", "DataLoader"))
KINDS = ("matmuls", "attention", "elementwise", "other")
CATEGORIES = tuple(f"{scope} {kind}" for scope in ("model", "loss") for kind in KINDS) + ("optimizer", "data")


def kind(name):
    """What an operator does, by its name."""
    if any(name == m or name.startswith(m + "_") for m in MATMUL):
        return "matmuls"
    if any(marker in name for marker in ATTENTION):
        return "attention"
    if any(name == e or name.startswith(e + "_") or name.startswith(e + ".") for e in ELEMENTWISE):
        return "elementwise"
    return "other"


def category(event):
    """The category of an operator's own time: the optimizer and the data loader whole; the loss (lm_head's products
    for the trained positions, the softmax, the gradients it computes as it goes) and the rest of the step (the
    model, forward and backward) each split by what the operator does."""
    parent, scope = event, "model"
    while parent is not None:
        found = next((name for name, marker in SCOPES if marker in parent.name), None)
        if found:
            scope = found
            break
        parent = parent.cpu_parent
    return scope if scope in ("optimizer", "data") else f"{scope} {kind(event.name)}"


def profiled_run(workdir, steps, max_length):
    """Mode (e) for 1 + `steps` optimizer steps; {category: CPU seconds} over the profiled steps."""
    import torch
    import transformers

    import finetune

    class Window(transformers.TrainerCallback):
        """The profiler on from the second step's start to the last step's end."""

        def __init__(self):
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1 + steps:
                self.profiler.__exit__(None, None, None)

    loss_call = finetune.ChunkedCausalLMLoss.__call__

    def marked_loss(self, *args, **kwargs):
        with torch.profiler.record_function("loss"):
            return loss_call(self, *args, **kwargs)

    finetune.ChunkedCausalLMLoss.__call__ = marked_loss
    argv = ["--model_name_or_path", os.path.join(workdir, "model"), "--data_path", os.path.join(workdir, "data.jsonl"),
            "--output_dir", os.path.join(workdir, "profile"), "--model_max_length", str(max_length),
            "--per_device_train_batch_size", str(throughput.BATCH), "--max_steps", str(1 + steps),
            "--learning_rate", "1e-4", "--save_strategy", "no", "--logging_steps", "1000", "--use_cpu", "true",
            "--report_to", "none", "--disable_tqdm", "true", "--packing", "true", "--chunked_loss", "true",
            "--overwrite_output_dir", "true", "--data_cache_dir", "none"]
    model_args, data_args, training_args, lora_args = finetune.parse_arguments(argv)
    tokenizer = finetune.load_tokenizer(model_args, training_args)
    encoder = finetune.ChatEncoder(tokenizer, max_length, data_args.system_message, data_args.template)
    dataset = finetune.SupervisedDataset(os.path.join(workdir, "data.jsonl"), encoder)
    model = finetune.load_model(model_args, training_args, lora_args)
    window = Window()
    trainer = finetune.FinetuneTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                                       data_collator=finetune.make_collator(tokenizer, packing=True),
                                       callbacks=[window])
    trainer.train()
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in window.profiler.events():
        seconds[category(event)] += event.self_cpu_time_total / 1e6
    return seconds


def two_exp_passes(hidden, weight, target):
    """The chunked loss's chunk as it was computed before 2026-12-04 (logsumexp, then exp again for the softmax),
    for the side-by-side timing below; returns what ChunkedCrossEntropy computes: the summed loss and both
    gradients."""
    import torch

    logits = (hidden @ weight.T).float()
    log_normaliser = torch.logsumexp(logits, dim=-1)
    loss = (log_normaliser - logits.gather(1, target[:, None]).squeeze(1)).sum()
    grad_logits = logits.sub_(log_normaliser[:, None]).exp_()
    grad_logits[torch.arange(len(target)), target] -= 1
    return loss, grad_logits @ weight, grad_logits.T @ hidden


def loss_side_by_side(positions, hidden_size=256, vocab=151680, repeats=3):
    """Seconds (best of `repeats`) of one chunk of the loss, forward with its gradients, both ways; and the
    largest difference of their gradients."""
    import time

    import torch

    import finetune

    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden_size) * 0.02).requires_grad_()
    hidden = torch.randn(positions, hidden_size, requires_grad=True)
    target = torch.randint(0, vocab, (positions,))

    def ours():
        loss = finetune.ChunkedCrossEntropy.apply(hidden, weight, target, positions)
        loss.backward()
        return loss, hidden.grad, weight.grad

    def before():
        with torch.no_grad():
            return two_exp_passes(hidden.detach(), weight.detach(), target)

    times, results = {}, {}
    for name, run in (("before", before), ("now", ours)) * repeats:
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        results[name] = [t.detach().clone() for t in run()]
        times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
    difference = max(float((a - b).abs().max()) for a, b in zip(results["before"][1:], results["now"][1:]))
    return times, difference


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/qwen-finetune-bench")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 2 profiled steps: that it runs")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.makedirs(args.workdir, exist_ok=True)
    max_length = throughput.SMOKE_MAX_LENGTH if args.smoke else throughput.MAX_LENGTH
    throughput.MAX_LENGTH = max_length
    samples = max(args.samples, throughput.BATCH * (1 + args.steps)) if not args.smoke else throughput.BATCH * 3
    throughput.build(args.workdir, samples, shape=throughput.SMOKE_SHAPE if args.smoke else throughput.SHAPE)
    seconds = profiled_run(args.workdir, args.steps, max_length)
    total = sum(seconds.values())
    print(f"\nmode (e), packing + chunked loss: CPU time of {args.steps} profiled steps, by what it was spent on "
          f"({total:.2f} s of operator time in all)")
    for name in CATEGORIES:
        print(f"  {name:<17} {seconds[name]:>8.2f} s  {seconds[name] / max(total, 1e-9):>6.1%}")
    positions = 64 if args.smoke else 1024
    times, difference = loss_side_by_side(positions)
    print(f"\none chunk of the loss ({positions} positions x 151,680, hidden 256, forward with its gradients), best of "
          f"3: {times['before']:.3f} s with two passes of exp (before 2026-12-04), {times['now']:.3f} s now: "
          f"{times['before'] / times['now']:.2f}x; gradients differ by at most {difference:.1e}")


if __name__ == "__main__":
    main()
