"""The private parts of transformers, accelerate, DeepSpeed and peft that finetune.py relies on (FinetuneTrainer's
docstring lists them): each must still exist, one test each so that an upgrade that moves one fails here by its name
instead of silently in a user's run (a lost gradient-norm hook would hide a divergence); and the Trainer's hooks must
still be called in a short run."""
import argparse
import collections
import importlib.util
import inspect
import json

import pytest
import transformers
from helpers import DATA, make_encoder

import finetune

PRIVATE_HOOKS = ("_get_grad_norm", "_get_num_items_in_batch", "_get_train_sampler")


def has_tensorboard():
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def tensorboard_writer():
    if not has_tensorboard():
        pytest.skip("TensorBoard is not installed (pip install tensorboard): TensorBoardCallback cannot be built")
    return hasattr(transformers.integrations.TensorBoardCallback(), "tb_writer")


def ulysses_adapter_fields():
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    return {"dl", "sp_rank", "sp_group", "sp_world_size", "device"} <= set(
        inspect.signature(UlyssesSPDataLoaderAdapter.__init__).parameters) | set(
        inspect.getsource(UlyssesSPDataLoaderAdapter.__init__).replace("self.", " ").split())


def ds_to_universal_arguments():
    from deepspeed.checkpoint import ds_to_universal

    source = inspect.getsource(ds_to_universal)
    return callable(ds_to_universal.main) and all(f"args.{name}" in source for name in (
        "input_folder", "output_folder", "num_extract_workers", "num_merge_workers", "keep_temp_folder", "strict",
        "inject_missing_state"))


def parser_actions():
    parser = transformers.HfArgumentParser((finetune.ModelArguments,))
    return isinstance(parser, argparse.ArgumentParser) and all(
        isinstance(action, argparse.Action) for action in parser._actions)


# Each private name we use, and the check that it is still there as used.
SURFACE = {
    **{f"Trainer.{name}": (lambda name=name: callable(getattr(transformers.Trainer, name, None))
                           and name in vars(finetune.FinetuneTrainer)) for name in PRIVATE_HOOKS},
    "transformers.trainer.skip_first_batches": lambda: callable(getattr(transformers.trainer, "skip_first_batches",
                                                                        None)),
    "Trainer.save_model(_internal_call)": lambda: "_internal_call" in inspect.signature(
        transformers.Trainer.save_model).parameters,
    "LengthGroupedSampler.generator": lambda: "self.generator" in inspect.getsource(
        transformers.trainer_pt_utils.LengthGroupedSampler.__iter__),
    "TensorBoardCallback.tb_writer": tensorboard_writer,
    "integrations.deepspeed._hf_deepspeed_config_weak_ref": lambda: hasattr(transformers.integrations.deepspeed,
                                                                            "_hf_deepspeed_config_weak_ref"),
    "HfTrainerDeepSpeedConfig.trainer_config_process": lambda: callable(getattr(
        transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig, "trainer_config_process", None)),
    "integration_utils.INTEGRATION_TO_CALLBACK": lambda: "tensorboard" in
        transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK,
    "modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": lambda: transformers.models.auto.modeling_auto
        .MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get("qwen3_5") == "Qwen3_5ForConditionalGeneration",
    "AutoModel*._model_mapping": lambda: transformers.Qwen3Config in
        transformers.AutoModelForCausalLM._model_mapping,
    "EarlyStoppingCallback.early_stopping_patience_counter": lambda: hasattr(
        transformers.EarlyStoppingCallback(1), "early_stopping_patience_counter"),
    "argparse ArgumentParser._actions": parser_actions,
    "AcceleratorConfig.use_configured_state": lambda: "use_configured_state" in inspect.signature(
        transformers.trainer_pt_utils.AcceleratorConfig).parameters,
    "UlyssesSPDataLoaderAdapter fields": ulysses_adapter_fields,
    "ds_to_universal.main(args)": ds_to_universal_arguments,
    "peft.tuners.lora.ParamWrapper": lambda: issubclass(__import__("peft").tuners.lora.ParamWrapper,
                                                        __import__("peft").tuners.lora.LoraLayer),
    "PreTrainedModel._keys_to_ignore_on_load_unexpected": lambda: r"^mtp.*" in transformers
        .Qwen3_5ForConditionalGeneration._keys_to_ignore_on_load_unexpected,
    "PretrainedConfig._attn_implementation, _experts_implementation": lambda: all(
        hasattr(transformers.Qwen3MoeConfig(), name) for name in ("_attn_implementation", "_experts_implementation")),
}


@pytest.mark.parametrize("name", SURFACE)
def test_each_private_name_we_use_is_still_there(name):
    assert SURFACE[name](), f"{name} has moved or changed: finetune.py uses it (see FinetuneTrainer's docstring)"


def test_every_private_name_tested_is_listed_in_the_docstring():
    listed = finetune.FinetuneTrainer.__doc__
    for name in SURFACE:
        assert name.split("(")[0].split(" fields")[0].split(".")[-1] in listed, name


def test_the_private_trainer_surface_exists_and_is_called(tiny_qwen2, tokenizer, tmp_path, monkeypatch):
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
