"""The private parts of transformers' Trainer that FinetuneTrainer relies on (its docstring lists them): each must
still exist and still be called in a short run, so that a transformers upgrade that renames one fails here instead
of silently in a user's run (a lost gradient-norm hook would hide a divergence)."""
import collections
import inspect
import json

import transformers
from helpers import DATA, make_encoder

import finetune

PRIVATE_HOOKS = ("_get_grad_norm", "_get_num_items_in_batch", "_get_train_sampler")


def test_the_private_trainer_surface_exists_and_is_called(tiny_qwen2, tokenizer, tmp_path, monkeypatch):
    for name in PRIVATE_HOOKS:
        assert callable(getattr(transformers.Trainer, name, None)), f"transformers.Trainer.{name} is gone"
        assert name in vars(finetune.FinetuneTrainer), f"FinetuneTrainer no longer overrides {name}"
    assert callable(getattr(transformers.trainer, "skip_first_batches", None))
    assert "_internal_call" in inspect.signature(transformers.Trainer.save_model).parameters
    # SeededLengthGroupedSampler seeds the generator that LengthGroupedSampler draws its order from.
    assert "self.generator" in inspect.getsource(transformers.trainer_pt_utils.LengthGroupedSampler.__iter__)
    assert hasattr(transformers.integrations.TensorBoardCallback(), "tb_writer")
    assert hasattr(transformers.integrations.deepspeed, "_hf_deepspeed_config_weak_ref")  # without_zero3_init
    calls, returned = collections.Counter(), collections.defaultdict(list)

    def spy(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            returned[name].append(function(*args, **kwargs))
            return returned[name][-1]
        return counted

    for name in PRIVATE_HOOKS:
        monkeypatch.setattr(finetune.FinetuneTrainer, name, spy(name, getattr(finetune.FinetuneTrainer, name)))
    monkeypatch.setattr(transformers.trainer, "skip_first_batches",
                        spy("skip_first_batches", transformers.trainer.skip_first_batches))
    dataset = finetune.SupervisedDataset(DATA, make_encoder(tokenizer))  # 8 samples: 4 steps of 2 an epoch
    lora_args = finetune.LoraArguments(use_lora=True, lora_r=4, lora_alpha=8)

    def train(max_steps, resume_from=None):
        args = finetune.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none",
                                          per_device_train_batch_size=2, max_steps=max_steps, save_steps=1,
                                          learning_rate=1e-3, train_sampling_strategy="group_by_length")
        model = finetune.load_model(finetune.ModelArguments(model_name_or_path=tiny_qwen2), args, lora_args)
        trainer = finetune.FinetuneTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                           data_collator=finetune.make_collator(tokenizer, False))
        trainer.train(resume_from_checkpoint=resume_from)
        return trainer

    trainer = train(max_steps=2)
    assert trainer.divergence in trainer.callback_handler.callbacks  # the list EvalGenerations reads
    with open(tmp_path / "out" / "checkpoint-1" / "trainer_state.json") as f:
        assert "stateful_callbacks" in json.load(f)  # where a checkpoint's recorded facts are read back
    assert calls["_get_train_sampler"] >= 1
    assert isinstance(trainer._get_train_sampler(), finetune.SeededLengthGroupedSampler)
    assert calls["_get_num_items_in_batch"] >= 2  # once a step
    assert calls["_get_grad_norm"] == 2 and all(norm > 0 for norm in returned["_get_grad_norm"])  # StopOnDivergence's
    assert calls["skip_first_batches"] == 0
    train(max_steps=3, resume_from=str(tmp_path / "out" / "checkpoint-1"))  # mid-epoch: a batch to skip
    assert calls["skip_first_batches"] == 1
