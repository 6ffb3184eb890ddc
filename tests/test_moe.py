"""Mixture-of-experts Qwen: LoRA on the experts with the default flags, the router's load-balancing loss in our loss
(exactly the model's own on a batch, token-weighted across micro-batches, logged), flags that only fit MoE, and
ZeRO-3 against DDP with tokens routed unevenly."""
import logging
import os

import pytest
import torch
import transformers
from fp32 import assert_changed_beyond_rounding, assert_fp32_close, backward_depth, forward_depth
from helpers import (AGENT_DATA, DATA, LORA, PROMPT, SHORT_RUN, assert_success, log_history, logits_of, make_encoder,
                     run_cli, training_args, write_jsonl)
from safetensors.torch import load_file

import finetune

MOE = ["qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 times 13?"}, {"role": "assistant", "content": "156."}],
    [{"role": "user", "content": "Name a colour and say why you like it."},
     {"role": "assistant", "content": "Blue, like the sky at noon, because it is calm."}],
]


@pytest.fixture(scope="module")
def batch(tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", [{"messages": c} for c in CONVERSATIONS])
    dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer))
    return [dataset[i] for i in range(len(dataset))]


def load(model_dir, tmp_path, **lora):
    args = finetune.LoraArguments(**{"lora_r": 4, "lora_alpha": 8, **lora}) if lora else finetune.LoraArguments()
    return finetune.load_model(finetune.ModelArguments(model_name_or_path=model_dir), training_args(tmp_path), args)


def adapted(model):
    return {name.split(".lora_")[0].replace(".base_layer", "").split("layers.0.")[-1]
            for name, p in model.named_parameters() if p.requires_grad and "layers.0." in name}


@pytest.mark.parametrize("arch", MOE)
def test_lora_with_the_default_flags_adapts_attention_and_experts_and_leaves_the_router(arch, tiny_models, tmp_path,
                                                                                       caplog):
    with caplog.at_level(logging.INFO, logger="finetune"):
        model = load(tiny_models(arch), tmp_path, use_lora=True)  # --lora_dropout 0.05, as the launchers have it
    names = adapted(model)
    assert "mlp.experts" in names and not any(name.endswith("gate") for name in names)  # no router, no gates
    assert any(name.startswith(("self_attn.", "linear_attn.")) for name in names)
    assert "the expert adapters train without dropout" in caplog.text
    import peft

    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    dropouts = {type(m).__name__: m.lora_dropout["default"] for m in layers}
    assert isinstance(dropouts["ParamWrapper"], torch.nn.Identity) and dropouts["Linear"].p == 0.05
    routed = load(tiny_models(arch), tmp_path, use_lora=True, lora_router=True)
    assert "mlp.gate" in adapted(routed)  # asked for: the router's weight gets an adapter too


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen3_5_moe"])
@pytest.mark.parametrize("chunked", [True, False])
def test_our_loss_with_the_router_term_is_the_models_own_loss_plus_its_balancing_loss(arch, chunked, tiny_models,
                                                                                   tmp_path, batch, tokenizer):
    model = load(tiny_models(arch), tmp_path)
    collated = finetune.make_collator(tokenizer, packing=False)(batch)
    coef = model.config.get_text_config().router_aux_loss_coef
    own = model(**collated, output_router_logits=True).loss  # the model's own: mean cross-entropy + coef x aux
    loss = finetune.ChunkedCausalLMLoss(model, 7, coef) if chunked else finetune.CausalLMLoss(coef)
    inputs = {key: value for key, value in collated.items() if key != "labels"}
    ours = loss(model(**inputs, output_router_logits=True, logits_to_keep=torch.empty(0, dtype=torch.long))
                if chunked else model(**inputs, output_router_logits=True), collated["labels"])
    trained = int((collated["labels"][:, 1:] != -100).sum())
    assert_fp32_close(ours, own, trained, "loss")  # the same per-token terms, summed in another order


def router_gradient(model, collated, coef):
    model.zero_grad()
    inputs = {key: value for key, value in collated.items() if key != "labels"}
    finetune.CausalLMLoss(coef)(model(**inputs, output_router_logits=True), collated["labels"]).backward()
    return model.model.layers[0].mlp.gate.weight.grad.clone()


def test_the_coefficient_changes_the_routers_gradient(tiny_models, tmp_path, batch, tokenizer):
    model = load(tiny_models("qwen3_moe"), tmp_path)
    collated = finetune.make_collator(tokenizer, packing=False)(batch)
    tokens = collated["input_ids"].numel()
    without, weak, strong = (router_gradient(model, collated, coef) for coef in (0.0, 0.001, 1.0))
    assert_changed_beyond_rounding(weak, without, backward_depth(tokens), "router gradient, 0.001 against 0")
    assert_changed_beyond_rounding(strong, weak, backward_depth(tokens), "router gradient, 1 against 0.001")
    # Linear in the coefficient: the balancing loss's own gradient, scaled.
    assert_fp32_close(strong - without, (weak - without) * 1000, 1000 * backward_depth(tokens), "scaling")


def test_accumulated_steps_weight_the_router_loss_by_trained_tokens_and_log_it(tiny_models, tmp_path, batch,
                                                                                  tokenizer):
    model = load(tiny_models("qwen3_moe"), tmp_path)
    coef = 0.5
    sums, auxes, counts = [], [], []
    with torch.no_grad():  # what the first optimizer step sees: the initial weights on both micro-batches
        for example in batch:
            out = model(input_ids=torch.tensor([example["input_ids"]]), output_router_logits=True)
            labels = torch.tensor(example["labels"][1:])
            sums.append(torch.nn.functional.cross_entropy(out.logits[0, :-1], labels, ignore_index=-100,
                                                          reduction="sum"))
            auxes.append(out.aux_loss)
            counts.append(int((labels != -100).sum()))
    assert counts[0] != counts[1]
    args = training_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
                         logging_steps=1, learning_rate=0.0, train_sampling_strategy="sequential",
                         router_aux_loss_coef=coef, save_strategy="no")
    trainer = finetune.FinetuneTrainer(model=model, args=args, train_dataset=batch, processing_class=tokenizer,
                                       data_collator=finetune.make_collator(tokenizer, packing=False))
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    weighted_aux = sum(a * n for a, n in zip(auxes, counts)) / sum(counts)
    assert_fp32_close(logged["loss"], (sum(sums) + coef * weighted_aux * sum(counts)) / sum(counts), sum(counts),
                      "loss")
    assert_fp32_close(logged["router_aux_loss"], weighted_aux, 1e6 / sum(counts), "router_aux_loss")  # rounded to 6


@pytest.mark.parametrize("flags, message", [
    (dict(training=dict(router_aux_loss_coef=0.01)), r"--router_aux_loss_coef: this model \(qwen2\) has no experts"),
    (dict(lora=dict(use_lora=True, lora_router=True)), r"--lora_router: this model \(qwen2\) has no experts"),
    (dict(model=dict(experts_implementation="eager")), r"--experts_implementation: this model \(qwen2\) has no"),
], ids=["coefficient", "router", "experts"])
def test_moe_flags_on_a_dense_model_are_one_line(tiny_qwen2, tmp_path, flags, message):
    config = transformers.AutoConfig.from_pretrained(tiny_qwen2)
    with pytest.raises(finetune.UserError, match=message):
        finetune.check_moe_flags(config, finetune.ModelArguments(**flags.get("model", {})),
                                 training_args(tmp_path, **flags.get("training", {})),
                                 finetune.LoraArguments(**flags.get("lora", {})))


def test_moe_flags_that_cannot_work_are_one_line(tiny_models, tmp_path):
    config = transformers.AutoConfig.from_pretrained(tiny_models("qwen3_moe"))
    with pytest.raises(finetune.UserError, match="--router_aux_loss_coef must be zero or more, got -0.1"):
        finetune.parse_arguments(["--data_path", "d.jsonl", "--output_dir", str(tmp_path), "--router_aux_loss_coef",
                                  "-0.1"])
    sp = training_args(tmp_path)
    sp.sequence_parallel_size = 2
    with pytest.raises(finetune.UserError, match="the router's load-balancing loss cannot be computed over split"):
        finetune.check_moe_flags(config, finetune.ModelArguments(), sp, finetune.LoraArguments())
    sp.router_aux_loss_coef = 0.0  # without it, the split is allowed
    finetune.check_moe_flags(config, finetune.ModelArguments(), sp, finetune.LoraArguments())
    with pytest.raises(finetune.UserError, match="--lora_router adapts the router with LoRA: it needs --use_lora"):
        finetune.check_moe_flags(config, finetune.ModelArguments(), training_args(tmp_path),
                                 finetune.LoraArguments(lora_router=True))


def tokens_per_expert(model, input_ids):
    """How many of the tokens of `input_ids` each MoE layer sends to each expert."""
    counts, hooks = [], []
    for module in model.modules():
        if finetune.is_expert_block(module):
            experts = module.gate.weight.shape[0]
            hooks.append(module.gate.register_forward_hook(
                lambda m, i, out, n=experts: counts.append(tuple(torch.bincount(out[2].flatten(), minlength=n).tolist()))))
    with torch.no_grad():
        model(input_ids=torch.tensor([input_ids]))
    for hook in hooks:
        hook.remove()
    return tuple(counts)


def torchrun(*args):
    from helpers import torchrun as two_processes

    return run_cli(two_processes(*args))


@pytest.mark.e2e
@pytest.mark.distributed
@pytest.mark.parametrize("arch, kind", [("qwen3_5_moe", "lora"), ("qwen3_moe", "full")])
def test_zero3_trains_a_moe_as_ddp_does_with_tokens_routed_unevenly(arch, kind, tiny_models, tmp_path, tokenizer):
    from helpers import zero3_config

    model_dir = tiny_models(arch)
    base = finetune.model_class(transformers.AutoConfig.from_pretrained(model_dir)).from_pretrained(model_dir)
    dataset = finetune.SupervisedDataset(DATA, make_encoder(tokenizer, template="auto", system_message=None))
    loads = [tokens_per_expert(base, dataset[i]["input_ids"]) for i in range(len(dataset))]
    # Uneven: within a sample some experts get more tokens than others, and the samples (so the ranks) differ.
    assert len(set(loads)) == len(loads) and all(len(set(layer)) > 1 for load in loads for layer in load)
    lora = ["--use_lora", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0"] if kind == "lora" else []
    common = ["--model_name_or_path", model_dir, "--data_path", DATA, "--max_steps", "2", "--per_device_train_batch_size",
              "2", "--logging_steps", "1", "--seed", "0", "--save_strategy", "no", "--learning_rate",
              "1e-2" if lora else "1e-3", *lora]
    runs = {}
    for engine, extra in (("ddp", []), ("zero3", ["--deepspeed", zero3_config(tmp_path)])):
        runs[engine] = str(tmp_path / engine)
        assert_success(torchrun(*common, "--output_dir", runs[engine], *extra))
    tokens = max(e["num_input_tokens_seen"] for e in log_history(runs["ddp"]) if "loss" in e)
    ddp, zero3 = ([e for e in log_history(runs[engine]) if "loss" in e] for engine in ("ddp", "zero3"))
    assert len(ddp) == len(zero3) == 2
    # Every step's loss (a sum over its tokens) and balancing loss, equal up to the other summation order.
    assert_fp32_close([e["loss"] for e in zero3], [e["loss"] for e in ddp], 2 * tokens, "losses")
    assert_fp32_close([e["router_aux_loss"] for e in zero3], [e["router_aux_loss"] for e in ddp], 2 * tokens,
                      "router_aux_loss")
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    expected, got = (load_file(os.path.join(runs[engine], name)) for engine in ("ddp", "zero3"))
    assert expected.keys() == got.keys() and all(t.numel() > 0 for t in got.values())  # complete, nothing empty
    if lora:
        assert any(".experts." in key for key in got)
    for key in expected:
        assert_fp32_close(got[key], expected[key], 2 * backward_depth(tokens), key)


@pytest.mark.e2e
def test_the_launchers_defaults_train_a_qwen3_5_moe_whose_adapter_loads_merges_and_answers(tiny_models, tmp_path):
    import peft

    import merge_adapter

    model_dir, out = tiny_models("qwen3_5_moe"), str(tmp_path / "lora")
    result = run_cli(["bash", "finetune_lora.sh", "-m", model_dir, "-d", AGENT_DATA, "-o", out, "--max_steps", "4",
                      "--learning_rate", "1e-2", "--save_strategy", "no", *LORA, *SHORT_RUN])
    assert_success(result)  # the launchers' --lora_dropout 0.05 and all-linear: no traceback on the experts
    logged = [e for e in log_history(out) if "loss" in e]
    assert len(logged) == 4 and all(e["router_aux_loss"] > 0 for e in logged)
    assert "router_aux_loss" in result.stdout + result.stderr  # users see it
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any(".mlp.experts." in key for key in saved) and not any(".mlp.gate." in key for key in saved)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    adapted = peft.PeftModel.from_pretrained(transformers.AutoModelForImageTextToText.from_pretrained(model_dir), out)
    loaded = {n.replace(".default.", "."): p for n, p in adapted.named_parameters() if ".lora_" in n}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)  # every tensor
    merged = transformers.AutoModelForImageTextToText.from_pretrained(
        merge_adapter.merge(out, str(tmp_path / "merged"), dtype="fp32"))
    assert type(merged).__name__ == "Qwen3_5MoeForConditionalGeneration"
    depth = forward_depth(len(tokenizer(PROMPT)["input_ids"]), layers=4) + 8
    assert_fp32_close(logits_of(merged, tokenizer), logits_of(adapted, tokenizer), depth, "merged logits")


def test_eval_loss_is_the_language_model_loss_whatever_the_router_coefficient(tiny_models, tmp_path, batch,
                                                                                tokenizer):
    model = load(tiny_models("qwen3_moe"), tmp_path)
    collated = finetune.make_collator(tokenizer, packing=False)(batch)
    with torch.no_grad():
        own = model(**collated)  # the model's own mean cross-entropy: no router term without router logits
        aux = model(**collated, output_router_logits=True).aux_loss
    trained = int((collated["labels"][:, 1:] != -100).sum())
    metrics = {}
    for coef in (0.0, 0.5):
        args = training_args(tmp_path, per_device_eval_batch_size=2, router_aux_loss_coef=coef)
        trainer = finetune.FinetuneTrainer(model=model, args=args, eval_dataset=batch, processing_class=tokenizer,
                                           data_collator=finetune.make_collator(tokenizer, packing=False))
        metrics[coef] = trainer.evaluate()
        assert_fp32_close(metrics[coef]["eval_loss"], own.loss, trained, f"eval_loss with coefficient {coef}")
    assert "eval_router_aux_loss" not in metrics[0.0]  # no router term in that run's loss at all
    assert_fp32_close(metrics[0.5]["eval_router_aux_loss"], aux, 1e6 / trained, "eval_router_aux_loss")  # 6 places
    logged = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert logged and logged[-1]["eval_router_aux_loss"] == metrics[0.5]["eval_router_aux_loss"]
