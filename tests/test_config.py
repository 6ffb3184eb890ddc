"""Flags and config files: every value checked against its flag's type, every bad one a single line naming it."""
import json

import pytest
from helpers import DATA

import finetune

BAD_CONFIGS = {
    "no for a text flag": ("system_message: no\n", "'system_message' takes text, got a boolean (false) (YAML reads "
                                                  "no/yes/on/off/true/false as a boolean: quote it)"),
    "number for a text flag": ("system_message: 42\n", "'system_message' takes text, got a whole number (42)"),
    "nested list": ("lora_target_modules: [[q_proj], v_proj]\n", "'lora_target_modules' takes a list of names (or "
                                                                "one text), not a nested list"),
    "mapping for a text flag": ("output_dir: {a: 1}\n", "'output_dir' takes text, not a mapping"),
    "fraction for a count": ("model_max_length: 1.5\n", "'model_max_length' takes a whole number, got a number (1.5)"),
    "text for a number": ("learning_rate: fast\n", "'learning_rate' takes a number, got text (\"fast\")"),
    "text for a yes/no flag": ("use_lora: maybe\n", "'use_lora' takes true or false, got text (\"maybe\")"),
    "boolean for a choice": ("template: yes\n", "'template' takes one of auto, chatml, got a boolean (true)"),
    "two spellings": ("model-max-length: 8\nmodel_max_length: 9\n",
                      "'model-max-length' and 'model_max_length' set the same flag; keep one"),
    "the same key twice": ("lora_r: 4\nlora_r: 8\n", "'lora_r' is set twice; keep one"),
    "a key twice inside a mapping": ("chat_template_kwargs: {a: 1, a: 2}\n", "'a' is set twice; keep one"),
    "help": ("help: true\n", "unknown key 'help'"),
    "not UTF-8": (b"system_message: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 19)"),
    "not a mapping": ("- lora_r\n", "expected flag names and their values, got a list"),
    "YAML 1.1 octal": ("seed: 010\n", "'seed' takes a whole number, got text (\"010\")"),
    "YAML 1.1 base 60": ("model_max_length: 1:00\n", "'model_max_length' takes a whole number, got text"),
    "an empty list": ("lora_target_modules: []\n", "'lora_target_modules' is an empty list: name at least one"),
    "a list as a key": ("? [a, b]\n: 1\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_config_value_of_the_wrong_type_is_one_line_naming_the_file_and_the_key(tmp_path, case):
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(finetune.UserError) as error:
        finetune.parse_arguments([str(path), "--data_path", "d.jsonl", "--output_dir", str(tmp_path)])
    assert str(error.value) == f"{path}: {expected}" or str(error.value).startswith(f"{path}: {expected}")
    assert "\n" not in str(error.value)


def test_a_json_config_refuses_a_key_given_twice(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"lora_r": 4, "lora_r": 8}')
    with pytest.raises(finetune.UserError, match=f"^{path}: 'lora_r' is set twice; keep one$"):
        finetune.parse_arguments([str(path)])


def test_mappings_dates_merges_dashes_and_a_byte_order_mark_are_taken_as_meant(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("activation_checkpointing_kwargs: {use_reentrant: false}\nsystem_message: '-v means verbose'\n"
                    "chat_template_kwargs: {date_string: 2025-01-01}\noutput_dir: " + str(tmp_path) + "\n"
                    "data_path: d.jsonl\n")
    _, data, training, _ = finetune.parse_arguments([str(path)])
    assert training.activation_checkpointing_kwargs == {"use_reentrant": False}  # a flag typed dict[str, Any]
    assert data.system_message == "-v means verbose"  # text that starts with a dash is not taken for a flag
    assert data.chat_template_kwargs == {"date_string": "2025-01-01"}  # a YAML date, as the text it was written as
    merged = tmp_path / "merged.yaml"
    merged.write_text("data_path: d.jsonl\nchat_template_kwargs: {<<: {enable_thinking: false}, preserve_thinking: "
                      "true}\n")
    assert finetune.parse_arguments([str(merged)])[1].chat_template_kwargs == {"enable_thinking": False,
                                                                               "preserve_thinking": True}
    with_bom = tmp_path / "run.json"
    with_bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"data_path": "d.jsonl", "output_dir": str(tmp_path),
                                                        "lora_r": 8}).encode())
    assert finetune.parse_arguments([str(with_bom)])[3].lora_r == 8


def test_what_yaml_writes_naturally_means_what_it_says(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data_path: [a.jsonl, b.jsonl]\noutput_dir: " + str(tmp_path) + "\nlearning_rate: 1e-4\n"
                    "system_message: 'no'\nuse_lora: yes\nlora_dropout: 0\nchat_template_kwargs: {preserve_thinking: "
                    "true}\ntemplate: chatml\nwarmup_steps: 10\nuse_cpu: true\n")
    _, data, training, lora = finetune.parse_arguments([str(path)])
    assert training.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as text: made a number for a number flag
    assert data.system_message == "no" and data.template == "chatml" and data.data_path == ["a.jsonl", "b.jsonl"]
    assert lora.use_lora is True and lora.lora_dropout == 0.0
    assert data.chat_template_kwargs == {"preserve_thinking": True} and training.warmup_steps == 10


def test_a_config_file_with_command_line_overrides_and_unknown_keys(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data_path: a.jsonl, b.parquet#0.5\noutput_dir: " + str(tmp_path / "out") + "\n"
                      "learning_rate: 2.0e-4\nuse_lora: true\nlora_r: 32\nlora_target_modules: [q_proj, v_proj]\n"
                      "use_cpu: true\npacking: true\nchat_template_kwargs: {preserve_thinking: true}\n")
    model, data, training, lora = finetune.parse_arguments([str(config), "--lora_r", "8"])
    assert data.data_path == ["a.jsonl", "b.parquet#0.5"]
    assert data.chat_template_kwargs == {"preserve_thinking": True}  # a mapping, as the template takes it
    assert training.learning_rate == 2e-4 and training.packing and lora.use_lora
    assert lora.lora_r == 8 and lora.lora_target_modules == ["q_proj", "v_proj"]  # the command line wins
    # --config anywhere: the flags before it are defaults it overrides (what the launchers do).
    _, _, training, lora = finetune.parse_arguments(["--lora_r", "4", "--learning_rate", "1e-3", "--config",
                                                     str(config), "--learning_rate", "5e-5"])
    assert lora.lora_r == 32 and training.learning_rate == 5e-5
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"data_path": "a.jsonl", "output_dir": str(tmp_path / "o"), "use_cpu": True}))
    assert finetune.parse_arguments([str(as_json)])[1].data_path == ["a.jsonl"]
    (tmp_path / "typo.yaml").write_text("data_path: a.jsonl\nlearning_rat: 1e-4\n")
    with pytest.raises(finetune.UserError, match=f"{tmp_path / 'typo.yaml'}: unknown key 'learning_rat'"):
        finetune.parse_arguments([str(tmp_path / "typo.yaml")])
    (tmp_path / "broken.yaml").write_text("data_path: [a.jsonl\n")
    with pytest.raises(finetune.UserError, match="broken.yaml: not valid YAML"):
        finetune.parse_arguments([str(tmp_path / "broken.yaml")])


@pytest.mark.parametrize("flags, expected", [
    (["--learning_rate", "fast"], "--learning_rate: invalid float value: 'fast'"),
    (["--template", "jinja"], "--template: invalid choice: 'jinja' (choose from 'auto', 'chatml')"),
    (["--use_lora", "maybe"], "--use_lora: Truthy value expected: got maybe"),
    (["--num_train_epochs", "inf"], "--num_train_epochs must be a finite number, got inf"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    (["--rope_scaling", "inf"], "--rope_scaling must be a finite number, got inf"),
    (["--val_size", "nan"], "--val_size must be a finite number, got nan"),
    (["--val_size", "inf"], "--val_size must be a finite number, got inf"),
    (["--val_size", "2.5"], "--val_size is a fraction below 1 or a whole number of samples, got 2.5"),
    (["--val_size", "-1"], "--val_size is a fraction below 1 or a whole number of samples, got -1.0"),
    (["--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
    (["--chat_template_kwargs", "[1]"], "--chat_template_kwargs must be a JSON object of template settings"),
    (["--rope_scaling", "1e308"], "--rope_scaling is YaRN's factor: more than 1, at most 1024; got 1e+308"),
    (["--adam_beta1", "7"], "--adam_beta1 must be in [0, 1), got 7.0"),
    (["--adam_epsilon", "-1"], "--adam_epsilon must be zero or more, got -1.0"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be zero or more, got -1"),
    (["--preprocessing_num_workers", "0"], "--preprocessing_num_workers must be at least 1, got 0"),
    # Evaluation and watching: what the Trainer would only refuse after loading the model, or at an evaluation.
    (["--eval_strategy", "steps"], "--eval_strategy steps needs evaluation data: --eval_data_path or --val_size"),
    (["--val_size", "2", "--early_stopping_patience", "2"], "--early_stopping_patience needs evaluations to compare"),
    (["--val_size", "2", "--eval_strategy", "steps", "--early_stopping_patience", "0"],
     "--early_stopping_patience must be at least 1, got 0"),
    (["--val_size", "2", "--eval_strategy", "steps", "--metric_for_best_model", "accuracy"],
     "--metric_for_best_model accuracy: evaluation computes eval_loss only; use eval_loss"),
    (["--eval_generations", "2"], "--eval_generations replies to evaluation prompts: give --eval_data_path or"),
    (["--val_size", "2", "--eval_max_new_tokens", "0"], "--eval_generations must be zero or more and "
                                                        "--eval_max_new_tokens positive, got 0 and 0"),
    (["--val_size", "2", "--eval_strategy", "steps", "--eval_steps", "3", "--save_steps", "5",
      "--early_stopping_patience", "2"], "--load_best_model_at_end requires the saving steps to be a round multiple"),
    (["--val_size", "2", "--eval_strategy", "steps", "--eval_steps", "3", "--save_steps", "6",
      "--early_stopping_patience", "2"], "--load_best_model_at_end (set by --early_stopping_patience) needs a "
                                         "checkpoint at every evaluation: --save_steps 6 must equal --eval_steps 3"),
    (["--val_size", "2", "--eval_strategy", "steps", "--save_strategy", "epoch", "--load_best_model_at_end", "true"],
     "--load_best_model_at_end requires the save and eval strategy to match, except when --save_strategy=\"best\", "
     "but found Evaluation strategy: IntervalStrategy.STEPS Save strategy: SaveStrategy.EPOCH"),
    (["--report_to", "tensorbored"], "--report_to tensorbored: not an integration; choose from azure_ml, clearml,"),
    (["--report_to", "swanlab"], "--report_to swanlab: its package is not installed; pip install swanlab"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_a_bad_flag_on_the_command_line_is_one_line_not_the_usage(tmp_path, flags, expected):
    with pytest.raises(finetune.UserError) as error:
        finetune.parse_arguments(["--data_path", "d.jsonl", "--output_dir", str(tmp_path), *flags])
    assert str(error.value).startswith(expected) and "\n" not in str(error.value) and "usage" not in str(error.value)


@pytest.mark.parametrize("flags, problem", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be positive, got 0"),
    (["--learning_rate=-1e-4"], "--learning_rate must be zero or more, got -0.0001"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be positive"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1), got 1.5"),
    (["--max_steps", "0"], "--max_steps must be positive"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps must be positive"),
    (["--sequence_parallel_size", "0"], "--sequence_parallel_size must be positive"),
    (["--rope_scaling", "0.5"], "--rope_scaling is YaRN's factor: more than 1, at most 1024; got 0.5"),
    (["--rope_native_length", "4096"], "--rope_native_length is a positive number of tokens, for --rope_scaling"),
])
def test_impossible_numbers_are_refused(tmp_path, flags, problem):
    with pytest.raises(finetune.UserError, match=problem.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        finetune.parse_arguments(["--data_path", DATA, "--output_dir", str(tmp_path / "o"), "--use_cpu", "true",
                                  *flags])


def test_lora_targets_that_match_nothing_stop_the_run_before_the_model_loads(tiny_qwen3_5, monkeypatch):
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_qwen3_5)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("weights loaded")))
    lora = finetune.LoraArguments(use_lora=True, lora_target_modules=["q_proj,k_prj"])
    with pytest.raises(finetune.UserError, match="--lora_target_modules k_prj: matched nothing"):
        finetune.check_lora_targets(config, lora)
    finetune.check_lora_targets(config, finetune.LoraArguments(use_lora=True))


def test_lora_names_are_suffixes_as_peft_takes_them_and_modules_to_save_must_exist(tiny_qwen3_5):
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny_qwen3_5)
    finetune.check_lora_targets(config, finetune.LoraArguments(use_lora=True, lora_target_modules=["self_attn.q_proj"]))
    with pytest.raises(finetune.UserError, match="--lora_modules_to_save foo: no module of this model has that name"):
        finetune.check_lora_targets(config, finetune.LoraArguments(use_lora=True, lora_modules_to_save=["lm_head,foo"]))


def test_lora_arguments_are_normalised_where_they_are_defined():
    args = finetune.LoraArguments(q_lora=True, lora_target_modules=["q_proj,k_proj", "v_proj"],
                                  lora_modules_to_save="embed_tokens lm_head")
    assert args.use_lora  # --q_lora implies it
    assert args.lora_target_modules == ["q_proj", "k_proj", "v_proj"]
    assert args.lora_modules_to_save == ["embed_tokens", "lm_head"]
    assert finetune.LoraArguments(lora_weight_path="adapter").use_lora
    assert not finetune.LoraArguments().use_lora and finetune.LoraArguments().lora_target_modules == ["all-linear"]
