"""The data path: reading both formats, the label contract token for token (a message's 'weight' 0 included),
truncation, errors (text that cannot be tokenized as written included), datasets, the held-out validation split,
the collator, and the preview's report."""
import json
import logging

import pytest
import torch
from helpers import DATA, GOOD, GOOD_LINE, dataset_of, make_encoder, write_json, write_jsonl
from reference_labels import IGNORE, reference_ids_and_labels
from tiny_qwen import qwen_tokenizer_dir

import finetune

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643


def encode_file(tokenizer, path, lazy=False, **encoder_kwargs):
    encoder = make_encoder(tokenizer, **encoder_kwargs)
    dataset = (finetune.LazySupervisedDataset if lazy else finetune.SupervisedDataset)(path, encoder)
    return dataset, [dataset[i] for i in range(len(dataset))]


MULTI_TURN = [
    {"role": "user", "content": "Hi! 我想学习 Python 😀"},
    {"role": "assistant", "content": "Sure, let's start with `print('hello')`.\n"},
    {"role": "user", "content": "  And then?  "},
    {"role": "assistant", "content": "\n\nThen variables: x = 1 🐍🐍"},
    {"role": "system", "content": "Now answer in French."},
    {"role": "user", "content": "Merci"},
    {"role": "assistant", "content": " De rien !"},
]


# ---------------------------------------------------------------------------------------------------------
# The label contract
# ---------------------------------------------------------------------------------------------------------

def test_exact_ids_and_labels_of_a_small_sample(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}])
    _, [example] = encode_file(tokenizer, path, system_message="")
    # <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n
    assert example["input_ids"] == [IM_START, 872, 198, 13048, IM_END, 198, IM_START, 77091, 198, 9707, 0, IM_END, 198]
    assert example["labels"] == [IGNORE] * 9 + [9707, 0, IM_END, IGNORE]


@pytest.mark.parametrize("file_format", ["conversations_jsonl", "messages_json"])
def test_multi_turn_labels_match_the_chat_template_and_an_independent_labeller(tokenizer, tmp_path, file_format):
    system = "You are a careful tutor."
    if file_format == "conversations_jsonl":
        roles = {"user": "human", "assistant": "gpt", "system": "system"}
        sample = {"system": system, "conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in MULTI_TURN]}
        path = write_jsonl(tmp_path / "d.jsonl", [sample])
    else:
        sample = {"messages": [{"role": "system", "content": system}] + MULTI_TURN}
        path = write_json(tmp_path / "d.json", [sample])

    _, [example] = encode_file(tokenizer, path)
    text, ids, labels = reference_ids_and_labels(tokenizer, [{"role": "system", "content": system}] + MULTI_TURN)
    assert example["input_ids"] == ids
    assert example["labels"] == labels
    # Every assistant turn is trained, and what is trained decodes to the assistant's words plus <|im_end|>.
    trained_runs, run = [], []
    for token, label in zip(ids + [None], labels + [IGNORE]):
        if label != IGNORE:
            run.append(label)
        elif run:
            trained_runs.append(tokenizer.decode(run))
            run = []
    assert len(trained_runs) == 3
    assert trained_runs[0] == "Sure, let's start with `print('hello')`.\n<|im_end|>"
    assert trained_runs[2] == " De rien !<|im_end|>"
    # "\n\n" after the role header is one token that starts on the header's newline: by the rule it is not trained.
    assert trained_runs[1] == "Then variables: x = 1 🐍🐍<|im_end|>"


def test_default_system_message_applies_only_when_the_sample_has_none(tokenizer, tmp_path):
    samples = [
        {"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]},
        {"system": "Custom.", "conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]},
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    for system_message in ["Be brief.", ""]:
        _, examples = encode_file(tokenizer, path, system_message=system_message)
        texts = [tokenizer.decode(e["input_ids"]) for e in examples]
        default_turn = f"<|im_start|>system\n{system_message}<|im_end|>\n" if system_message else ""
        assert texts[0] == default_turn + "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        assert texts[1].startswith("<|im_start|>system\nCustom.<|im_end|>\n<|im_start|>user")
        assert texts[2].startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user")  # the sample's own, empty


def test_assistant_first_and_empty_assistant_content_are_trained(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [
        {"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "hey"},
        {"role": "assistant", "content": ""}]}])
    _, [example] = encode_file(tokenizer, path, system_message="")
    text, ids, labels = reference_ids_and_labels(tokenizer, [
        {"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "hey"},
        {"role": "assistant", "content": ""}])
    assert (example["input_ids"], example["labels"]) == (ids, labels)
    assert [label for label in labels if label != IGNORE].count(IM_END) == 2


@pytest.mark.parametrize("template", ["chatml", "auto"])
def test_weight_0_keeps_an_assistant_message_out_of_training(tokenizer, tmp_path, template):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    weighted = [dict(m) for m in messages]
    weighted[1]["weight"], weighted[3]["weight"] = 0, 1
    path = write_jsonl(tmp_path / "w.jsonl", [{"messages": messages}, {"messages": weighted}])
    dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer, template=template, system_message=None))
    plain, with_weight = dataset[0], dataset[1]
    assert plain["input_ids"] == with_weight["input_ids"]

    def trained_text(example):
        return tokenizer.decode([t for t in example["labels"] if t != -100])

    assert trained_text(plain) == "Hello there.<|im_end|>Goodbye.<|im_end|>"
    assert trained_text(with_weight) == "Goodbye.<|im_end|>"


# ---------------------------------------------------------------------------------------------------------
# Truncation and dropping
# ---------------------------------------------------------------------------------------------------------

def long_prompt_samples():
    return [
        {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "kept " * 50}]},
        {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "lost"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ok"}]},
    ]


@pytest.mark.parametrize("lazy", [False, True])
def test_truncation_keeps_the_first_tokens_and_drops_samples_left_without_trained_tokens(tokenizer, tmp_path, lazy):
    path = write_jsonl(tmp_path / "d.jsonl", long_prompt_samples())
    dataset, examples = encode_file(tokenizer, path, lazy=lazy, model_max_length=32, system_message="")
    assert len(examples) == 2 and dataset.dropped == 1
    _, full_ids, full_labels = reference_ids_and_labels(tokenizer, long_prompt_samples()[0]["messages"])
    assert len(full_ids) > 32
    assert examples[0]["input_ids"] == full_ids[:32] and examples[0]["labels"] == full_labels[:32]
    assert tokenizer.decode(examples[1]["input_ids"]).startswith("<|im_start|>user\nq<|im_end|>")


def test_every_sample_dropped_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", long_prompt_samples()[1:2])
    with pytest.raises(finetune.DataError, match="every sample was dropped"):
        dataset_of(path, make_encoder(tokenizer, model_max_length=32),
                              finetune.DataArguments(data_path=path, data_cache_dir="none"))


def test_a_huge_sample_is_cut_before_it_is_tokenized_whole(tokenizer, tmp_path, monkeypatch):
    huge = {"messages": [{"role": "user", "content": "Summarise:"},
                         {"role": "assistant", "content": "the sea is wide, " * 300_000}]}  # 5 MB of text
    path = write_jsonl(tmp_path / "huge.jsonl", [huge])
    encoder = make_encoder(tokenizer, model_max_length=256)
    longest = []
    real_tokenizer = encoder.tokenizer
    monkeypatch.setattr(encoder, "tokenizer", lambda texts, **kw: longest.append(max(map(len, texts))) or
                        real_tokenizer(texts, **kw))
    [example] = [finetune.SupervisedDataset(path, encoder)[0]]
    assert longest[0] <= encoder.max_chars < 100_000
    text, _ = encoder.render(encoder.parse(huge, "huge"))
    assert example["input_ids"] == real_tokenizer(text[:20_000], add_special_tokens=False)["input_ids"][:256]


# ---------------------------------------------------------------------------------------------------------
# Errors: each names the file, the line or sample, and the problem
# ---------------------------------------------------------------------------------------------------------

BAD_SAMPLES = {
    "unknown role": ({"messages": [{"role": "bot", "content": "a"}]}, "message 0 has unknown role 'bot'"),
    "missing content": ({"conversations": [{"from": "user"}]}, "message 0 has no 'content' (or 'value') field"),
    "non-string content": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 7}]},
        "message 1 has a non-string (int) 'content'"),
    "missing role": ({"messages": [{"content": "a"}]}, "message 0 has no 'role' (or 'from') field"),
    "non-string role": ({"messages": [{"role": ["user"], "content": "a"}]}, "message 0 has unknown role ['user']"),
    "no assistant": ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    "no messages field": ({"text": "hello"}, "expected one of the fields 'conversations', 'messages' or "
                                             "'instruction' and 'output' (Alpaca); it has none of them"),
    "two formats": ({"instruction": "a", "output": "b", **GOOD}, "it has 'messages' and 'instruction'/'output'"),
    "empty messages": ({"messages": []}, "must be a non-empty list"),
    "not an object": (["user", "hi"], "expected a JSON object, got list"),
    "non-string system": ({"system": 3, **GOOD}, "the 'system' field must be a string"),
    "two system messages": (
        {"system": "x", "messages": [{"role": "system", "content": "y"}] + GOOD["messages"]}, "keep one"),
    "im_start in text": (
        {"messages": [{"role": "user", "content": "a <|im_start|>system"}, {"role": "assistant", "content": "b"}]},
        "message 0 contains the control token '<|im_start|>'"),
    "im_end in text": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b<|im_end|>"}]},
        "message 1 contains the control token '<|im_end|>'"),
    "endoftext in system": ({"system": "x<|endoftext|>", **GOOD}, "'system' field contains the control token"),
}


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_in_jsonl_names_file_line_and_problem(tokenizer, tmp_path, case, lazy):
    sample, problem = BAD_SAMPLES[case]
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, sample])
    with pytest.raises(finetune.DataError) as error:
        encode_file(tokenizer, path, lazy=lazy)
    assert str(error.value).startswith(f"{path} line 3: ")
    assert problem in str(error.value)


@pytest.mark.parametrize("case", ["unknown role", "im_end in text"])
def test_bad_sample_in_json_array_names_the_sample_index(tokenizer, tmp_path, case):
    sample, problem = BAD_SAMPLES[case]
    path = write_json(tmp_path / "train.json", [GOOD, sample])
    with pytest.raises(finetune.DataError, match=rf"^{path} sample 1: .*{problem.replace('|', '.')}"):
        encode_file(tokenizer, path)


@pytest.mark.parametrize("content, problem", [
    ("", "the file is empty"),
    ("  \n\n ", "the file is empty"),
    ("[]", "holds no samples"),
    ('{"messages": [}\n', "line 1: not valid JSON"),
    (json.dumps(GOOD) + "\n{oops\n", "line 2: not valid JSON"),
    ('[{"messages": 1},', "not valid JSON"),
])
def test_unreadable_files(tokenizer, tmp_path, content, problem):
    path = tmp_path / "train.data"
    path.write_text(content)
    with pytest.raises(finetune.DataError, match=problem):
        encode_file(tokenizer, str(path))


def test_missing_file(tokenizer, tmp_path):
    with pytest.raises(finetune.DataError, match="nope.jsonl: file not found"):
        encode_file(tokenizer, str(tmp_path / "nope.jsonl"))


def test_control_token_in_system_message_flag(tokenizer):
    with pytest.raises(finetune.UserError, match="--system_message contains the control token '<|im_end|>'"):
        make_encoder(tokenizer, system_message="hi<|im_end|>")


def test_a_byte_order_mark_does_not_change_the_format(tokenizer, tmp_path):
    for writer, name in ((write_json, "bom.json"), (write_jsonl, "bom.jsonl")):
        path = writer(tmp_path / name, [GOOD])
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + data)
        assert encode_file(tokenizer, path)[1] == encode_file(tokenizer, writer(tmp_path / f"plain_{name}", [GOOD]))[1]


def test_format_is_decided_by_content_not_suffix(tokenizer, tmp_path):
    as_json = write_json(tmp_path / "looks_like.jsonl", [GOOD, GOOD])
    as_jsonl = write_jsonl(tmp_path / "looks_like.json", [GOOD, GOOD])
    assert encode_file(tokenizer, as_json)[1] == encode_file(tokenizer, as_jsonl)[1]


BAD_LINES = {
    "lone surrogate": ('{"messages": [{"role": "user", "content": "smile \\ud83d"}, '
                       '{"role": "assistant", "content": "ok"}]}',
                       "line 2: message 0 holds a lone surrogate '\\ud83d' at character 6"),
    "surrogate in reasoning": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                               '"content": "b", "weight": 1, "reasoning_content": "\\udc00"}]}',
                               "line 2: message 1: its 'reasoning_content' holds a lone surrogate"),
    "nested brackets": ("[" * 100_000 + "]" * 100_000, "line 2: not valid JSON (nested too deeply)"),
    "huge integer": ('{"n": ' + "9" * 5000 + "}", "line 2: not valid JSON (Exceeds the limit"),
    "Infinity literal": (GOOD_LINE[:-1] + ', "score": Infinity}', "line 2: not valid JSON (Infinity is not a JSON"),
    "weight on a user message": ('{"messages": [{"role": "user", "content": "a", "weight": 1}, '
                                 '{"role": "assistant", "content": "b"}]}',
                                 "line 2: message 0: 'weight' 1 on a user message: only what the assistant says"),
    "weight 2": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
                 '"weight": 2}]}', "'weight' must be 0 or 1"),
    "every weight 0": ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", '
                       '"weight": 0}]}', "line 2: every assistant message has 'weight' 0"),
}


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_text_that_cannot_be_tokenized_is_refused_at_start_naming_the_line(tokenizer, tmp_path, case, lazy):
    line, problem = BAD_LINES[case]
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD_LINE + "\n" + line + "\n", encoding="utf-8")
    dataset_class = finetune.LazySupervisedDataset if lazy else finetune.SupervisedDataset
    with pytest.raises(finetune.DataError) as error:
        dataset_class(str(path), make_encoder(tokenizer))
    assert str(error.value).startswith(f"{path} line 2") and problem in str(error.value), str(error.value)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_latin1_byte_in_a_json_array_names_its_line(tokenizer, tmp_path, bom):
    path = tmp_path / "train.json"
    path.write_bytes(bom + b'[\n' + GOOD_LINE.encode() + b',\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n]')
    with pytest.raises(finetune.DataError, match=r"train.json line 3: not UTF-8 \(byte 0xe9\)"):
        finetune.SupervisedDataset(str(path), make_encoder(tokenizer))


# ---------------------------------------------------------------------------------------------------------
# Datasets and collator
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", [write_jsonl, write_json])
def test_eager_and_lazy_datasets_yield_identical_examples(tokenizer, tmp_path, writer):
    samples = [{"messages": MULTI_TURN}] + long_prompt_samples() + [GOOD] * 3
    path = writer(tmp_path / "d.data", samples)
    eager, eager_examples = encode_file(tokenizer, path, model_max_length=40)
    lazy, lazy_examples = encode_file(tokenizer, path, lazy=True, model_max_length=40)
    assert len(eager_examples) == 6 and eager.dropped == 1 and eager.dropped == lazy.dropped
    assert eager_examples == lazy_examples


def test_lazy_jsonl_dataset_keeps_offsets_not_samples(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 50)
    dataset, _ = encode_file(tokenizer, path, lazy=True)
    assert dataset.samples is None and len(dataset.locations) == 50


def test_eager_tokenizes_in_batches_not_per_sample(tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MULTI_TURN}] * 250)
    encoder = make_encoder(tokenizer)
    calls = []
    original = encoder.tokenizer.__class__.__call__
    monkeypatch.setattr(encoder.tokenizer.__class__, "__call__",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    dataset = finetune.SupervisedDataset(path, encoder, batch_size=100)
    assert len(dataset) == 250 and len(calls) == 3


def test_collator_pads_to_the_longest_in_the_batch(tokenizer):
    collate = finetune.PadToLongestCollator(tokenizer.pad_token_id)
    batch = collate([
        {"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]},
        {"input_ids": [4, 5, 6, 7, 8], "labels": [IGNORE, IGNORE, 6, 7, 8]},
    ])
    assert tokenizer.pad_token_id == ENDOFTEXT
    assert batch["input_ids"].tolist() == [[1, 2, 3, ENDOFTEXT, ENDOFTEXT], [4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, IGNORE], [IGNORE, IGNORE, 6, 7, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"].dtype == torch.long


def test_preview_shows_trained_spans_and_reports_counts(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] + long_prompt_samples())
    dataset, _ = encode_file(tokenizer, path, model_max_length=32, system_message="")
    shown = finetune.show_trained_spans(dataset[0], tokenizer)
    assert shown == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n⟦b<|im_end|>⟧\n"
    report = finetune.describe_dataset(dataset)
    assert "samples kept: 3" in report and "samples dropped: 1" in report
    assert "1 with no trained token within --model_max_length" in report


def test_the_preview_holds_out_the_validation_samples_training_holds_out(tokenizer, tmp_path, capsys):
    samples = [{"messages": [{"role": "user", "content": f"question {i}"},
                             {"role": "assistant", "content": f"answer {i}"}]} for i in range(10)]
    path, out = write_jsonl(tmp_path / "d.jsonl", samples), tmp_path / "out"
    try:
        finetune.train(["--model_name_or_path", qwen_tokenizer_dir(), "--data_path", path, "--output_dir", str(out),
                        "--preprocess_only", "true", "--val_size", "0.3", "--seed", "7", "--template", "chatml",
                        "--data_cache_dir", "none"])
    finally:
        finetune.release_output_dir()
    printed = capsys.readouterr().out
    assert "3 samples are held out for evaluation (--val_size)" in printed and "samples kept: 7" in printed
    dumped = [json.loads(line)["input_ids"] for line in open(out / "tokenized_train.jsonl")]
    dataset = dataset_of([path], make_encoder(tokenizer), finetune.DataArguments(data_path=path,
                                                                                            data_cache_dir="none"))
    train, held_out = finetune.split_off_validation(dataset, 0.3, seed=7)
    assert dumped == [train[i]["input_ids"] for i in range(len(train))]  # what training trains, none held out
    assert not set(map(tuple, dumped)) & {tuple(held_out[i]["input_ids"]) for i in range(len(held_out))}


def test_empty_assistant_messages_are_counted_in_the_report(tokenizer, tmp_path, caplog):
    empty = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}
    path = write_jsonl(tmp_path / "e.jsonl", [GOOD, empty, empty])
    for lazy in (False, True):
        with caplog.at_level(logging.WARNING, logger="finetune"):
            dataset = dataset_of(path, make_encoder(tokenizer), finetune.DataArguments(
                data_path=path, lazy_preprocess=lazy, data_cache_dir=str(tmp_path / "cache")))
        assert dataset.empty_assistant == 2 and len(dataset) == 3
        assert f"{path}: 2 sample(s) with an empty assistant message" in caplog.text
    assert "notice: 2 sample(s) with an empty assistant message" in finetune.describe_dataset(
        finetune.SupervisedDataset(path, make_encoder(tokenizer)))


def test_length_histogram_shows_what_truncation_cuts():
    text = finetune.length_histogram([10, 20, 70, 300, 900], model_max_length=256, rows=4)
    lines = text.splitlines()
    assert lines[0].endswith("--model_max_length 256:")
    assert lines[1].split()[0] == "1-64" and lines[1].split()[-1] == "2"
    assert lines[-1].split()[:2] == [">", "256"] and lines[-1].endswith("2  <- cut to model_max_length")


def test_val_size_holds_out_the_same_samples_for_the_same_seed(tokenizer, tmp_path):
    from helpers import make_encoder

    dataset = finetune.SupervisedDataset(DATA, make_encoder(tokenizer))
    train, held_out = finetune.split_off_validation(dataset, 0.25, seed=3)
    assert (len(train), len(held_out)) == (6, 2) and not set(train.indices) & set(held_out.indices)
    assert finetune.split_off_validation(dataset, 0.25, seed=3)[1].indices == held_out.indices
    assert list(train.group_lengths) == [dataset.group_lengths[i] for i in train.indices]
    with pytest.raises(finetune.UserError, match="leaves no training or no validation sample"):
        finetune.split_off_validation(dataset, 8, seed=3)


@pytest.mark.parametrize("val_size", ["0", "0.3"])
def test_the_preview_of_a_lazy_dataset_is_the_preview_of_the_eager_one(tokenizer, tmp_path, capsys, monkeypatch,
                                                                       val_size):
    """Preview reads a dataset only through the dataset protocol, so --lazy_preprocess shows the same report, length
    histogram, first sample and dump."""
    samples = [GOOD] + long_prompt_samples() + [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(6)]
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    printed, dumped = {}, {}
    for lazy in ("false", "true"):
        out = tmp_path / f"out-{lazy}"
        if lazy == "true":  # the preview must read the lazy dataset itself
            monkeypatch.setattr(finetune, "SupervisedDataset", lambda *a, **k: pytest.fail("tokenized up front"))
        try:
            finetune.train(["--model_name_or_path", qwen_tokenizer_dir(), "--data_path", path, "--output_dir", str(out),
                            "--preprocess_only", "true", "--lazy_preprocess", lazy, "--model_max_length", "32",
                            "--val_size", val_size, "--template", "chatml", "--system_message", "",
                            "--data_cache_dir", "none"])
        finally:
            finetune.release_output_dir()
        printed[lazy] = capsys.readouterr().out.replace(str(out), "OUT")
        dumped[lazy] = open(out / "tokenized_train.jsonl").read()
    assert printed["true"] == printed["false"] and dumped["true"] == dumped["false"]
    kept = 9 - (3 if val_size == "0.3" else 0)  # 10 read, 1 dropped, 3 of 9 held out
    assert f"samples kept: {kept}" in printed["true"] and "samples dropped: 1" in printed["true"]
    assert "<- cut to model_max_length" in printed["true"] and len(dumped["true"].splitlines()) == kept
    encoder = make_encoder(tokenizer, model_max_length=32, system_message="")
    monkeypatch.undo()
    lazy = finetune.LazySupervisedDataset(path, encoder)
    eager = finetune.SupervisedDataset(path, encoder)
    assert finetune.describe_dataset(lazy) == finetune.describe_dataset(eager)
    assert list(lazy.full_lengths) == list(eager.full_lengths) and list(lazy.token_counts()) == list(eager.token_counts())
    assert [lazy.example(i)["labels"].tolist() for i in range(len(lazy))] == [eager[i]["labels"] for i in range(9)]
