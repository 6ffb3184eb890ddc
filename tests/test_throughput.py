"""Packing isolation, the chunked loss against the standard loss, token-weighted accumulation, length grouping."""
import pytest
import torch
import transformers
from fp32 import assert_fp32_close, backward_depth, forward_depth
from helpers import lora_args, make_encoder, training_args, write_jsonl

import finetune

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 times 13?"}, {"role": "assistant", "content": "156."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky at noon."},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}],
    [{"role": "user", "content": "Say something long, please, with many words in it."},
     {"role": "assistant", "content": "Here is a sentence that goes on for a while so that this sample is longer "
                                      "than the others and the batch needs padding or packing to hold it."}],
]


@pytest.fixture(scope="module")
def examples(tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", [{"messages": c} for c in CONVERSATIONS])
    dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer))
    return [dataset[i] for i in range(len(dataset))]


def load(model_dir, tmp_path, attn="sdpa", packing=False, **lora_kwargs):
    model_args = finetune.ModelArguments(model_name_or_path=model_dir, attn_implementation=attn)
    args = lora_args(**lora_kwargs) if lora_kwargs else finetune.LoraArguments()
    model = finetune.load_model(model_args, training_args(tmp_path, packing=packing), args)
    torch.manual_seed(0)
    with torch.no_grad():  # a LoRA B starts at zero: give the adapter weights that matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def summed_loss(logits, labels):
    """Sum of next-token cross-entropy over trained positions: the quantity both losses normalise."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="sum")


# Every model family packing is accepted on (finetune.PACKING_MODEL_TYPES), with the attention kinds tested.
PACKING_CASES = [("qwen2", "sdpa"), ("qwen2", "eager"), ("qwen3", "sdpa"), ("qwen3", "eager"), ("qwen2_moe", "sdpa"),
                 ("qwen3_moe", "sdpa"), ("qwen3_next", "sdpa"), ("qwen3_5", "sdpa"), ("qwen3_5", "eager"),
                 ("qwen3_5_moe", "sdpa"), ("qwen3_5_text", "sdpa"), ("qwen3_5_moe_text", "sdpa"),
                 ("qwen3_5", "sdpa+lora")]


@pytest.mark.parametrize("arch,attn", PACKING_CASES, ids=[f"{a}-{b}" for a, b in PACKING_CASES])
def test_packed_samples_do_not_see_each_other(tiny_models, tmp_path, examples, tokenizer, arch, attn):
    lora = {"lora_dropout": 0.0} if attn.endswith("+lora") else {}
    model = load(tiny_models(arch), tmp_path, attn=attn.split("+")[0], packing=True, **lora)
    model.train()  # a switch of mode (as the Trainer makes) must keep the samples apart: with the `kernels` package,
    model.eval()  # transformers 5.25 re-selects each layer's forward then
    layers = model.config.get_text_config().num_hidden_layers
    packed = finetune.make_collator(tokenizer, packing=True)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for e in examples for p in range(len(e["input_ids"]))]
    inputs = {key: value for key, value in packed.items() if key != "labels"}  # with the sample boundaries
    with torch.no_grad():
        packed_logits = model(**inputs).logits[0]
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
    start, packed_sum, alone_sum, trained = 0, 0.0, 0.0, 0
    for example, logits in zip(examples, alone):
        end = start + len(example["input_ids"])
        # Same sums, other shapes: each logit is behind the forward's chain of sums over this sample.
        assert_fp32_close(packed_logits[start:end], logits, forward_depth(len(example["input_ids"]), layers), "logits")
        labels = torch.tensor(example["labels"])
        packed_sum += summed_loss(packed_logits[start:end], labels)
        alone_sum += summed_loss(logits, labels)
        trained += int((labels[1:] != -100).sum())
        start = end
    # The packed row's own loss (labels of the flattened batch, one mean) equals the mean over separate samples.
    with torch.no_grad():
        packed_loss = model(**packed).loss
    # A mean of `trained` per-token losses (the logits' own rounding is checked above).
    assert_fp32_close(packed_loss, alone_sum / trained, trained, "loss")


def test_packing_is_tested_on_every_model_type_it_is_accepted_on(tiny_models):
    tested = {transformers.AutoConfig.from_pretrained(tiny_models(arch)).model_type for arch, _ in PACKING_CASES}
    assert tested == set(finetune.PACKING_MODEL_TYPES)


@pytest.mark.parametrize("config, attention, message", [
    (transformers.LlamaConfig(), "sdpa", "--packing has not been verified on model type 'llama'"),
    (transformers.Qwen2VLConfig(), "sdpa", "--packing has not been verified on model type 'qwen2_vl'"),
    (transformers.Qwen3Config(), "flex_attention", "--packing with --attn_implementation flex_attention: packed "
                                                   "samples would see each other"),
], ids=["llama", "qwen2_vl", "flex"])
def test_packing_is_refused_where_it_is_not_verified(config, attention, message):
    with pytest.raises(finetune.UserError, match=message) as error:
        finetune.check_packing(config, attention, packing=True)
    assert "\n" not in str(error.value)
    finetune.check_packing(config, attention, packing=False)  # nothing to check without packing


def standard_and_chunked(model, batch, num_items_in_batch=None):
    """(loss, grads) of the model's own loss and of the chunked loss on the same batch."""
    results = []
    chunked = finetune.ChunkedCausalLMLoss(model, chunk_size=7)
    for use_chunked in (False, True):
        model.zero_grad()
        if use_chunked:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            outputs = model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long))
            assert outputs.logits.shape[1] == 0  # no logits were built for the batch
            loss = chunked(outputs, batch["labels"], num_items_in_batch)
        else:
            loss = model(**batch, num_items_in_batch=num_items_in_batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    return results


@pytest.mark.parametrize("kind", ["full", "lora", "lora+lm_head", "qlora", "packed"])
def test_chunked_loss_equals_the_standard_loss_and_gradients(tiny_qwen2, tmp_path, examples, tokenizer, kind):
    # No LoRA dropout: both losses must see the same forward. lora+lm_head: the chunked loss must train peft's copy.
    lora = {"lora": {"lora_dropout": 0.0}, "qlora": {"q_lora": True, "lora_dropout": 0.0},
            "lora+lm_head": {"lora_dropout": 0.0, "lora_modules_to_save": ["lm_head"]}}.get(kind, {})
    model = load(tiny_qwen2, tmp_path, **lora).train()
    batch = finetune.make_collator(tokenizer, packing=kind == "packed")(examples)
    for num_items in (None, 57):  # a micro-batch alone, and one of an accumulated step of 57 trained tokens
        (standard, standard_grads), (chunked, chunked_grads) = standard_and_chunked(model, batch, num_items)
        trained = int((batch["labels"][:, 1:] != -100).sum())
        assert_fp32_close(chunked, standard, trained, "loss")  # a sum of `trained` per-token losses, then a division
        assert standard_grads.keys() == chunked_grads.keys() and standard_grads
        assert kind != "lora+lm_head" or any("modules_to_save" in name for name in chunked_grads)
        for name in standard_grads:  # other chunk shapes: the gradients sum over the batch's tokens in another order
            assert_fp32_close(chunked_grads[name], standard_grads[name], backward_depth(batch["input_ids"].numel()),
                              name)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3_5"])  # Qwen3.5's own loss would average per micro-batch
def test_accumulated_step_loss_is_the_mean_over_all_its_trained_tokens(tiny_models, tmp_path, examples, tokenizer,
                                                                        chunked, arch):
    model = load(tiny_models(arch), tmp_path)
    with torch.no_grad():  # what the first optimizer step sees: the initial weights on both micro-batches
        sums = [summed_loss(model(input_ids=torch.tensor([e["input_ids"]])).logits[0], torch.tensor(e["labels"]))
                for e in examples[:2]]
    counts = [sum(label != -100 for label in e["labels"][1:]) for e in examples[:2]]
    assert counts[0] != counts[1]  # so that the mean of means would differ
    args = training_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
                         logging_steps=1, learning_rate=0.0, train_sampling_strategy="sequential",
                         chunked_loss=chunked, save_strategy="no")
    trainer = finetune.FinetuneTrainer(model=model, args=args, train_dataset=examples[:2],
                                       data_collator=finetune.make_collator(tokenizer, packing=False),
                                       processing_class=tokenizer)
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    # The Trainer's sum over the step's trained tokens, against ours: the same terms added in another order.
    assert_fp32_close(logged["loss"], sum(sums) / sum(counts), sum(counts), "loss")
    assert logged["trained_tokens_per_second_per_device"] > 0 and logged["tokens_per_second_per_device"] > 0


@pytest.mark.parametrize("lazy", [False, True])
def test_group_by_length_uses_the_datasets_own_lengths(tokenizer, tmp_path, tiny_qwen2, lazy, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CONVERSATIONS] * 4)
    encoder = make_encoder(tokenizer)
    dataset = (finetune.LazySupervisedDataset if lazy else finetune.SupervisedDataset)(path, encoder)
    monkeypatch.setattr(encoder, "encode", lambda *a: pytest.fail("a second tokenization pass"))
    args = training_args(tmp_path, group_by_length=True, per_device_train_batch_size=2)
    trainer = finetune.FinetuneTrainer(model=load(tiny_qwen2, tmp_path), args=args, train_dataset=dataset,
                                       data_collator=finetune.make_collator(tokenizer, False), processing_class=tokenizer)
    sampler = trainer._get_train_sampler()
    assert sampler.lengths == list(dataset.group_lengths) and len(set(sampler.lengths)) == 3
    assert sorted(sampler) == list(range(12))
