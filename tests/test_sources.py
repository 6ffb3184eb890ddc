"""Several data sources (JSON Lines, Parquet, folders, globs, dataset ids), mixing by count or fraction, and the
launcher running an example config file over them (config files themselves: test_config.py)."""
import collections
import glob
import json
import logging
import os
import shutil

import pytest
from helpers import (GOOD, ROOT, assert_success, dataset_of, make_encoder, run_cli, train_losses, training_args,
                     write_jsonl, write_parquet)

import finetune


def conversation(name, tools=False):
    messages = [{"role": "user", "content": f"Tell me about {name}."},
                {"role": "assistant", "content": f"{name} is a sample of its own."}]
    if tools:  # null content next to tool calls, as OpenAI writes them
        call = {"type": "function", "function": {"name": "lookup", "arguments": json.dumps({"q": name})}}
        messages[1:1] = [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "content": f"facts about {name}"}]
    return {"messages": messages}


def data_args(tmp_path, **kwargs):
    return finetune.DataArguments(data_path="unused", data_cache_dir=str(tmp_path / "cache"), **kwargs)


def names_of(dataset, encoder, samples_by_name):
    """Which named sample each example of the dataset is (by its token ids)."""
    ids = {tuple(encoder.encode([encoder.parse(sample, name)])[0]["input_ids"].tolist()): name
           for name, sample in samples_by_name.items()}
    return [ids[tuple(dataset[i]["input_ids"])] for i in range(len(dataset))]


@pytest.fixture
def three_sources(tmp_path):
    samples = {f"A{i}": conversation(f"A{i}") for i in range(10)}
    samples.update({f"B{i}": conversation(f"B{i}") for i in range(8)})
    samples.update({f"C{i}": conversation(f"C{i}") for i in range(6)})
    a = write_jsonl(tmp_path / "a.jsonl", [samples[f"A{i}"] for i in range(10)])
    b = write_parquet(tmp_path / "b.parquet", [samples[f"B{i}"] for i in range(8)])
    os.makedirs(tmp_path / "c")
    write_jsonl(tmp_path / "c" / "1.jsonl", [samples[f"C{i}"] for i in range(3)])
    write_parquet(tmp_path / "c" / "2.parquet", [samples[f"C{i}"] for i in range(3, 6)])
    (tmp_path / "c" / "notes.txt").write_text("not data")
    return samples, [f"{a}#25", f"{b}#0.5", str(tmp_path / "c")]


def test_sources_mixed_by_count_and_fraction_are_exact_and_follow_the_seed(tokenizer, tmp_path, three_sources):
    samples, specs = three_sources
    encoder = make_encoder(tokenizer)
    dataset = dataset_of(specs, encoder, data_args(tmp_path), seed=1)
    taken = collections.Counter(names_of(dataset, encoder, samples))
    assert len(dataset) == 25 + 4 + 6
    assert sorted(taken[f"A{i}"] for i in range(10)) == [2] * 5 + [3] * 5  # 25 of 10: every one twice, 5 again
    assert sum(taken[f"B{i}"] for i in range(8)) == 4 and max(taken[f"B{i}"] for i in range(8)) == 1
    assert all(taken[f"C{i}"] == 1 for i in range(6))  # a folder: its files in name order, taken whole
    assert dataset.reports[0] == f"{specs[0]}: 10 read, 10 kept, 0 dropped, 25 taken"
    assert dataset.reports[1] == f"{specs[1]}: 8 read, 8 kept, 0 dropped, 4 taken"

    again = dataset_of(specs, encoder, data_args(tmp_path), seed=1)
    assert names_of(again, encoder, samples) == names_of(dataset, encoder, samples)  # every rank, every start
    others = [names_of(dataset_of(specs, encoder, data_args(tmp_path), seed=seed), encoder, samples)
              for seed in (2, 3, 4)]
    assert any(other != names_of(dataset, encoder, samples) for other in others)
    def fingerprint(seed, **flags):  # what a checkpoint records: resume knows the mix and what cuts samples
        return finetune.sources_fingerprint(finetune.resolve_sources(specs),
                                            finetune.DataArguments(data_path=specs, **flags),
                                            training_args(tmp_path, seed=seed))

    assert fingerprint(1) == fingerprint(1) != fingerprint(2)
    assert fingerprint(1) != fingerprint(1, template="chatml")
    assert fingerprint(1) != fingerprint(1, chat_template_kwargs='{"preserve_thinking": true}')


def test_a_parquet_table_gives_the_ids_and_labels_of_the_same_samples_as_json_lines(tokenizer, tmp_path):
    samples = [conversation("tides", tools=True), {"system": "Answer briefly.", **conversation("reefs")},
               {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    encoder = make_encoder(tokenizer, template="auto", system_message=None)
    from_jsonl = finetune.SupervisedDataset(write_jsonl(tmp_path / "s.jsonl", samples), encoder)
    from_table = finetune.SupervisedDataset(write_parquet(tmp_path / "s.parquet", samples), encoder)
    assert len(from_table) == 3 and [from_table[i] for i in range(3)] == [from_jsonl[i] for i in range(3)]
    lazy = finetune.LazySupervisedDataset(str(tmp_path / "s.parquet"), encoder)
    assert [lazy[i] for i in range(3)] == [from_jsonl[i] for i in range(3)]


def cache_a_hub_dataset(folder, repo, samples, tmp_path):
    """Lay out `repo` in a datasets cache as the datasets library leaves a dataset it downloaded."""
    import datasets

    source = write_parquet(tmp_path / "hub.parquet", samples)
    builder = datasets.load_dataset_builder("parquet", data_files={"train": source}, cache_dir=str(tmp_path / "b"))
    builder.download_and_prepare()
    org, name = repo.split("/")
    target = os.path.join(folder, f"{org}___{name}", "default", "0.0.0", os.path.basename(builder.cache_dir))
    shutil.copytree(builder.cache_dir, target)
    for file in glob.glob(os.path.join(target, "parquet-*")):
        os.rename(file, file.replace(f"{os.sep}parquet-", f"{os.sep}{name}-"))


def test_a_dataset_id_loads_offline_from_the_local_cache_and_a_missing_one_is_one_line(tokenizer, tmp_path,
                                                                                         monkeypatch):
    import datasets

    samples = [conversation(f"H{i}") for i in range(4)]
    cache = str(tmp_path / "hf_datasets")
    cache_a_hub_dataset(cache, "acme/sea-chat", samples, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    encoder = make_encoder(tokenizer)
    dataset = dataset_of(["acme/sea-chat:train"], encoder, data_args(tmp_path))
    expected = finetune.SupervisedDataset(write_jsonl(tmp_path / "h.jsonl", samples), encoder)
    assert [dataset[i] for i in range(len(dataset))] == [expected[i] for i in range(4)]
    with pytest.raises(finetune.DataError) as error:
        dataset_of(["acme/not-here"], encoder, data_args(tmp_path))
    assert str(error.value).startswith("acme/not-here: cannot load this dataset: ")
    assert "offline, only a dataset already in the local datasets cache loads" in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_rows_and_empty_sources_are_one_line_errors(tokenizer, tmp_path):
    rows = [conversation("a"), conversation("b"), {"messages": [{"role": "user", "content": "x"},
                                                               {"role": "assistant"}]}]
    table = write_parquet(tmp_path / "tools.parquet", rows)
    for workers in (1, 2):
        with pytest.raises(finetune.DataError, match=r"^.*tools.parquet row 2: message 1 has no 'content'"):
            dataset_of([table], make_encoder(tokenizer), data_args(tmp_path,
                                                                              preprocessing_num_workers=workers))
    with pytest.raises(finetune.DataError, match="nothing-here-\\*.jsonl: matches no file"):
        dataset_of([str(tmp_path / "nothing-here-*.jsonl")], make_encoder(tokenizer), data_args(tmp_path))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(finetune.DataError, match="empty: a folder without .json, .jsonl or .parquet files"):
        dataset_of([str(tmp_path / "empty")], make_encoder(tokenizer), data_args(tmp_path))
    with pytest.raises(finetune.UserError, match="the amount after '#' must be positive"):
        finetune.parse_sources([f"{table}#0"])


@pytest.mark.e2e
def test_the_launcher_runs_an_example_config_with_overrides(tiny_qwen2, tmp_path, three_sources):
    _, specs = three_sources
    out = str(tmp_path / "out")
    result = run_cli(["bash", "finetune_lora.sh", "-c", os.path.join("examples", "lora_one_gpu.yaml"), "-m", tiny_qwen2,
                      "-o", out, "--data_path", *specs, "--bf16", "false", "--max_steps", "3", "--save_strategy",
                      "no", "--logging_steps", "1", "--per_device_train_batch_size", "4",
                      "--gradient_accumulation_steps", "1", "--lora_alpha", "16"])
    assert_success(result)
    assert "--config examples/lora_one_gpu.yaml" in result.stdout
    with open(os.path.join(out, "adapter_config.json")) as f:
        adapter = json.load(f)
    assert adapter["r"] == 32 and adapter["lora_alpha"] == 16  # the file over the launcher, the command line over both
    logged = [e for e in json.load(open(os.path.join(out, "trainer_state.json")))["log_history"] if "loss" in e]
    assert len(train_losses(out)) == 3
    assert max(e["learning_rate"] for e in logged) == pytest.approx(2e-4)  # the file's rate, not the launcher's
    assert f"{specs[0]}: 10 read, 10 kept, 0 dropped, 25 taken" in result.stderr
    parser = finetune.transformers.HfArgumentParser((finetune.ModelArguments, finetune.DataArguments,
                                                     finetune.TrainingArguments, finetune.LoraArguments))
    for example in ("qlora.yaml", "full_zero3_node.yaml", "qwen3_6_27b_lora.yaml",
                    "qwen3_6_35b_a3b_lora.yaml"):  # every key of the other examples is a flag
        arguments = finetune.expand_config_files([os.path.join(ROOT, "examples", example)], parser)
        assert any(word.startswith("--data_path=examples/data.jsonl") for word in arguments)


def test_a_glob_never_follows_a_link_loop_and_counts_each_real_file_once(tokenizer, tmp_path, caplog):
    os.makedirs(tmp_path / "data" / "sub")
    write_jsonl(tmp_path / "data" / "sub" / "a.jsonl", [conversation(f"A{i}") for i in range(3)])
    os.symlink("..", tmp_path / "data" / "sub" / "loop")  # a link to its own parent
    os.symlink("a.jsonl", tmp_path / "data" / "sub" / "same.jsonl")  # a second name of one file
    pattern = str(tmp_path / "data" / "**" / "*.jsonl")
    assert finetune.files_matching(pattern) == [str(tmp_path / "data" / "sub" / "a.jsonl")]
    with caplog.at_level(logging.INFO, logger="finetune"):
        dataset = dataset_of([pattern], make_encoder(tokenizer), data_args(tmp_path))
    assert len(dataset) == 3
    assert f"{pattern}: 3 read from 1 file(s), 3 kept" in caplog.text  # how many files the pattern matched


def test_amounts_that_cannot_be_taken_are_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [conversation(f"A{i}") for i in range(10)])
    with pytest.raises(finetune.UserError, match=r"#100000000000: 100,000,000,000 samples would need .* GiB for "
                                                 r"their indices alone, more than half of the .* GiB this job may use"):
        finetune.parse_sources([f"{path}#100000000000"])
    with pytest.raises(finetune.UserError, match=rf"--data_path {path}#0.01: that fraction of its 10 kept samples is "
                                                 "none; take a larger fraction or a count"):
        dataset_of([f"{path}#0.01"], make_encoder(tokenizer), data_args(tmp_path))
    with pytest.raises(finetune.UserError, match=r"--seed must be in \[0, 2\^32\)"):
        finetune.parse_arguments(["--data_path", f"{path}#5", "--seed", "-1", "--output_dir", str(tmp_path)])


def test_a_data_path_may_start_with_a_tilde(tokenizer, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", [conversation("A")])
    monkeypatch.setenv("HOME", str(tmp_path))
    [source] = finetune.parse_sources(["~/a.jsonl#2"])
    assert source.parts == [str(tmp_path / "a.jsonl")]


def test_every_name_of_one_file_counts_once_and_names_that_look_like_patterns_are_files(tmp_path):
    os.makedirs(tmp_path / "g" / "sub")
    first = write_jsonl(tmp_path / "g" / "a.jsonl", [conversation("A")])
    os.link(first, tmp_path / "g" / "hard.jsonl")  # a hard link: another name, the same file
    os.symlink(tmp_path / "g", tmp_path / "g" / "sub" / "up")  # a loop through a linked folder
    os.makedirs(tmp_path / "elsewhere")
    write_jsonl(tmp_path / "elsewhere" / "e.jsonl", [conversation("E")])
    os.symlink(tmp_path / "elsewhere", tmp_path / "g" / "linked")  # a linked folder without a loop: followed
    assert finetune.files_matching(str(tmp_path / "g" / "**" / "*.jsonl")) == [
        first, str(tmp_path / "g" / "linked" / "e.jsonl")]
    assert finetune.files_matching(str(tmp_path / "g" / "**")) == [first, str(tmp_path / "g" / "linked" / "e.jsonl")]
    assert finetune.source_parts(str(tmp_path / "g")) == [first]  # a folder: its own files, each once
    bracketed = write_jsonl(tmp_path / "run[1].jsonl", [conversation("R")])
    assert finetune.source_parts(bracketed) == [bracketed]  # a file of that name, not a pattern


def test_a_fraction_above_one_is_bounded_like_a_count(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [conversation(f"A{i}") for i in range(10)])
    with pytest.raises(finetune.UserError, match=r"#50000000000000000.0: 500,000,000,000,000,000 samples would need"):
        dataset_of([f"{path}#50000000000000000.0"], make_encoder(tokenizer), data_args(tmp_path))


def test_sources_are_resolved_once_with_each_files_format_and_trained_as_resolved(tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "mix"
    os.makedirs(folder)
    samples = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(9)]
    write_jsonl(folder / "a.jsonl", samples[:3])
    from helpers import write_json

    write_json(folder / "b.json", samples[3:6])
    write_parquet(folder / "c.parquet", samples[6:])
    [source] = finetune.resolve_sources([str(folder)])
    assert [os.path.basename(p) for p in source.parts] == ["a.jsonl", "b.json", "c.parquet"]
    assert source.kinds == ["jsonl", "json", "parquet"]
    # What resolution found is what is fingerprinted and trained: no second glob, no second format detection.
    write_jsonl(folder / "d.jsonl", samples[:1])  # arrives after the run resolved its sources
    monkeypatch.setattr(finetune, "detect_format", lambda path: pytest.fail(f"{path}: format detected again"))
    encoder = make_encoder(tokenizer)
    expected = [finetune.as_lists(encoder.encode([encoder.parse(sample, "x")])[0]) for sample in samples]
    for lazy in (False, True):
        dataset = finetune.make_dataset([source], encoder, data_args(tmp_path, lazy_preprocess=lazy))
        assert [dataset[i] for i in range(len(dataset))] == expected
    assert finetune.sources_fingerprint([source], finetune.DataArguments(data_path=[str(folder)]),
                                        training_args(tmp_path)) != finetune.sources_fingerprint(
        [finetune.Source(source.spec, source.parts[:2], kinds=source.kinds[:2])],
        finetune.DataArguments(data_path=[str(folder)]), training_args(tmp_path))
    monkeypatch.undo()
    os.remove(folder / "b.json")  # gone since rank 0 resolved it (or never there on this node)
    with pytest.raises(finetune.DataError) as error:
        finetune.make_dataset([source], encoder, data_args(tmp_path))
    assert str(error.value) == f"{folder / 'b.json'}: file not found on this machine (--data_path {folder})"


def test_eval_sources_are_named_by_their_own_flag(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [GOOD])
    with pytest.raises(finetune.UserError, match=r"^--eval_data_path .*e.jsonl#0: the amount after '#' must be positive"):
        finetune.resolve_sources([f"{path}#0"], "--eval_data_path")
    [source] = finetune.resolve_sources([f"{path}#0.01"], "--eval_data_path")
    with pytest.raises(finetune.UserError, match=r"^--eval_data_path .*e.jsonl#0.01: that fraction of its 1 kept"):
        finetune.make_dataset([source], make_encoder(tokenizer), data_args(tmp_path))
