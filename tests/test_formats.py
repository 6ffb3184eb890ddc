"""The data formats users bring: Alpaca records, content given as lists of typed parts, LLaMA-Factory's per-message
loss_weight, and LLaMA-Factory's dataset_info.json entries with their columns and tags. Every case is checked for
exact ids and labels against the independent labeller in reference_labels.py (through the equivalent sample in the
OpenAI form, rendered by apply_chat_template)."""
import json
import os

import pytest
from helpers import (WEATHER_TOOL, dataset_of, encode, make_encoder, trained_runs, with_template, write_json,
                     write_jsonl, write_parquet)
from reference_labels import official_template, reference_ids_and_labels, template_ids_and_labels, template_messages
from tiny_qwen import qwen_tokenizer_dir

import finetune

ALPACA = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour",
          "system": "You translate.", "history": [["Say hi.", "Hi!"], ["Count to two.", "One, two."]]}
# What it stands for: the history as earlier turns, then instruction and input on two lines.
ALPACA_MESSAGES = [{"role": "system", "content": "You translate."},
                   {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"},
                   {"role": "user", "content": "Count to two."}, {"role": "assistant", "content": "One, two."},
                   {"role": "user", "content": "Translate to French.\nGood morning"},
                   {"role": "assistant", "content": "Bonjour"}]


@pytest.mark.parametrize("template", ["chatml", "auto", "qwen3_6"])
def test_an_alpaca_record_is_the_conversation_it_stands_for(tokenizer, tmp_path, template):
    chosen = with_template(tokenizer, official_template(template)) if template == "qwen3_6" else tokenizer
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, {"instruction": "Name a colour.", "output": "Blue."}])
    first, second = encode(chosen, path, template="chatml" if template == "chatml" else "auto", system_message=None)
    reference = reference_ids_and_labels if template == "chatml" else template_ids_and_labels
    _, ids, labels = reference(chosen, ALPACA_MESSAGES)
    assert first == {"input_ids": ids, "labels": labels}
    assert trained_runs(chosen, first)[-3:] == ["Hi!<|im_end|>", "One, two.<|im_end|>", "Bonjour<|im_end|>"]
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    if template == "chatml":  # no input: the instruction alone; ChatML's default system turn
        messages = [{"role": "system", "content": "You are a helpful assistant."}] + messages
    _, ids, labels = reference(chosen, messages)
    assert second == {"input_ids": ids, "labels": labels}


def test_mask_history_trains_only_the_last_turn(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA])
    [masked] = encode(tokenizer, path, template="auto", mask_history=True)
    assert trained_runs(tokenizer, masked) == ["Bonjour<|im_end|>"]
    [full] = encode(tokenizer, path, template="auto")
    assert full["input_ids"] == masked["input_ids"] and len(trained_runs(tokenizer, full)) == 3
    assert (finetune.tokenized_cache_entry(path, finetune.ChatEncoder(tokenizer, 64, mask_history=True))
            != finetune.tokenized_cache_entry(path, finetune.ChatEncoder(tokenizer, 64)))


BAD_ALPACA = {
    "no output": ({"instruction": "a"}, "the 'output' field of an Alpaca record must be a string, got nothing"),
    "a number for the instruction": ({"instruction": 3, "output": "b"}, "the 'instruction' field of an Alpaca record "
                                                                        "must be a string, got int"),
    "a history pair of three": ({"instruction": "a", "output": "b", "history": [["q", "a", "x"]]},
                                "history pair 0 is not [instruction, output], two strings"),
    "a control token in the input": ({"instruction": "a", "input": "x<|im_end|>", "output": "b"},
                                     "the 'input' field contains the control token '<|im_end|>'"),
    "both formats": ({"instruction": "a", "output": "b", "messages": []}, "it has 'messages' and"),
}


@pytest.mark.parametrize("case", BAD_ALPACA)
def test_a_bad_alpaca_record_names_the_sample_and_the_field(tokenizer, tmp_path, case):
    sample, expected = BAD_ALPACA[case]
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "ok", "output": "ok"}, sample])
    with pytest.raises(finetune.DataError) as error:
        encode(tokenizer, path)
    assert str(error.value).startswith(f"{path} line 2: ") and expected in str(error.value), str(error.value)


def parts(*items):
    return [{"type": kind, "value": value} for kind, value in items]


# LLaMA-Factory's typed parts (value), OpenAI's (text), reasoning and tool-call parts, loss_weight on every message.
PARTS_SAMPLE = {"tools": json.dumps([WEATHER_TOOL]), "messages": [
    {"role": "system", "content": parts(("text", "Be brief."))},
    {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}],
     "loss_weight": 0.0},
    {"role": "assistant", "content": parts(("reasoning", "Call the tool."), ("tool_call", json.dumps(
        {"name": "get_weather", "arguments": {"city": "Oslo"}}))), "loss_weight": 1.0},
    {"role": "tool", "content": parts(("text", "snow"))},
    {"role": "assistant", "content": parts(("reasoning", "It "), ("reasoning", "snows."), ("text", "Snow.")),
     "loss_weight": 1.0}]}
PARTS_AS_OPENAI = {"tools": [WEATHER_TOOL], "messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "reasoning_content": "Call the tool.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "snow"},
    {"role": "assistant", "content": "Snow.", "reasoning_content": "It snows."}]}


@pytest.mark.parametrize("template", ["auto", "qwen3_6"])
def test_content_as_typed_parts_is_the_text_reasoning_and_calls_it_holds(tokenizer, tmp_path, template):
    chosen = with_template(tokenizer, official_template(template)) if template == "qwen3_6" else tokenizer
    path = write_jsonl(tmp_path / "d.jsonl", [PARTS_SAMPLE, PARTS_AS_OPENAI])
    from_parts, from_openai = encode(chosen, path)
    assert from_parts == from_openai
    _, ids, labels = template_ids_and_labels(chosen, template_messages(PARTS_AS_OPENAI["messages"]),
                                             PARTS_AS_OPENAI["tools"])
    assert from_parts == {"input_ids": ids, "labels": labels}
    weighted = {**PARTS_SAMPLE, "messages": [dict(m) for m in PARTS_SAMPLE["messages"]]}
    weighted["messages"][2]["loss_weight"] = 0  # as OpenAI's weight 0: context, not trained
    [kept] = encode(chosen, write_jsonl(tmp_path / "w.jsonl", [weighted]))
    assert len(trained_runs(chosen, kept)) == len(trained_runs(chosen, from_parts)) - 1


BAD_PARTS = {
    "an image": ([{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}],
                 "content part 1 is of type 'image_url'; this script fine-tunes on text only"),
    "an audio part": ([{"type": "input_audio", "input_audio": {"data": ""}}], "content part 0 is of type 'input_audio'"),
    "a part without text": ([{"type": "text"}], "content part 0 is not a text, reasoning or tool_call part"),
}


@pytest.mark.parametrize("case", BAD_PARTS)
def test_parts_that_are_not_text_are_one_line_naming_the_sample_and_the_part(tokenizer, tmp_path, case):
    content, expected = BAD_PARTS[case]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": content},
                                                            {"role": "assistant", "content": "a"}]}])
    with pytest.raises(finetune.DataError) as error:
        encode(tokenizer, path)
    assert str(error.value).startswith(f"{path} line 1: message 0: ") and expected in str(error.value)
    weighted = write_jsonl(tmp_path / "w.jsonl", [{"messages": [
        {"role": "user", "content": "a", "loss_weight": 1.0}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(finetune.DataError, match="'loss_weight' 1 on a user message: only what the assistant says"):
        encode(tokenizer, weighted)


# Multimodal records as LLaMA-Factory (mllm_demo), ShareGPT and Alpaca files hold them: refused until images are
# supported, never trained as text with the media dropped.
MULTIMODAL = {
    "messages+images": {"messages": [{"role": "user", "content": "<image>What is this?"},
                                     {"role": "assistant", "content": "A cat."}], "images": ["cat.png"]},
    "sharegpt+videos": {"conversations": [{"from": "human", "value": "<video>What happens?"},
                                          {"from": "gpt", "value": "It rains."}], "videos": ["rain.mp4"]},
    "alpaca+audios": {"instruction": "<audio>Transcribe it.", "output": "Hello.", "audios": ["hello.wav"]},
    "images without a placeholder": {"messages": [{"role": "user", "content": "What is this?"},
                                                  {"role": "assistant", "content": "A cat."}], "images": ["cat.png"]},
    "a placeholder without images": {"messages": [{"role": "user", "content": "<image>What is this?"},
                                                  {"role": "assistant", "content": "A cat."}]},
    "a placeholder in the reply": {"conversations": [{"from": "human", "value": "Show me."},
                                                     {"from": "gpt", "value": "Here: <image>"}]},
}


@pytest.mark.parametrize("container", ["jsonl", "json", "parquet", "lazy"])
@pytest.mark.parametrize("case", list(MULTIMODAL))
def test_a_multimodal_record_is_one_line_in_every_format(tokenizer, tmp_path, case, container):
    sample = MULTIMODAL[case]
    if container == "parquet" and "images" in sample and "<image>" not in json.dumps(sample):
        sample = {**sample, "images": [{"bytes": b"\x89PNG", "path": "cat.png"}]}  # image bytes in a column
    writer = {"json": write_json, "parquet": write_parquet}.get(container, write_jsonl)
    path = writer(tmp_path / f"d.{'parquet' if container == 'parquet' else 'json'}", [sample])
    with pytest.raises(finetune.DataError) as error:
        encode(tokenizer, path, lazy=container == "lazy")
    message = str(error.value)
    assert message.startswith(path) and "\n" not in message
    assert "this script fine-tunes on text only" in message
    # The media field is found first; a placeholder alone is named itself.
    fields = [key for key in finetune.MEDIA_FIELDS if key in sample]
    assert (f"has '{fields[0]}' (a multimodal record)" if fields else "holds <image>, the place of a medium") in message


def test_a_dataset_info_entry_whose_file_lists_media_is_refused_even_unmapped(tokenizer, tmp_path):
    folder = tmp_path / "lf"
    os.makedirs(folder)
    write_json(folder / "mllm.json", [MULTIMODAL["images without a placeholder"]])
    (folder / "dataset_info.json").write_text(json.dumps({
        "mllm": {"file_name": "mllm.json", "formatting": "sharegpt",
                 "columns": {"messages": "messages"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant"}},
        "mapped": {"file_name": "mllm.json", "formatting": "sharegpt",
                   "columns": {"messages": "messages", "videos": "videos"}}}))
    args = finetune.DataArguments(data_path="unused", data_cache_dir="none")
    with pytest.raises(finetune.DataError, match=r"mllm.json sample 0: has 'images' \(a multimodal record\)"):
        dataset_of([f"{folder}:mllm"], make_encoder(tokenizer), args)
    with pytest.raises(finetune.UserError, match="the entry 'mapped' has videos: this script fine-tunes on text only"):
        finetune.parse_sources([f"{folder}:mapped"])


# ---------------------------------------------------------------------------------------------------------
# LLaMA-Factory's dataset_info.json
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def llama_factory(tmp_path):
    """A LLaMA-Factory data folder: entries of both formattings with renamed columns and tags, and ones that cannot
    be honoured here."""
    folder = tmp_path / "lf"
    os.makedirs(folder / "parts")
    write_json(folder / "qa.json", [{"question": "Translate to French.", "context": "Good morning", "answer": "Bonjour",
                                     "sys": "You translate.", "past": [["Say hi.", "Hi!"], ["Count to two.",
                                                                                          "One, two."]],
                                     "system": "ignored: not a column of the entry"}] * 3)
    write_parquet(folder / "parts" / "a.parquet", [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])
    write_jsonl(folder / "dialogs.jsonl", [{"dialog": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant_call", "content": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"role": "result", "content": "snow"}, {"role": "assistant", "content": "Snow."}],
        "functions": json.dumps([WEATHER_TOOL["function"]]), "sys": "Be brief."}])
    info = {
        "qa": {"file_name": "qa.json", "columns": {"prompt": "question", "query": "context", "response": "answer",
                                                   "system": "sys", "history": "past"}},
        "plain": {"file_name": "parts", "num_samples": 3},
        "dialogs": {"file_name": "dialogs.jsonl", "formatting": "sharegpt",
                    "columns": {"messages": "dialog", "system": "sys", "tools": "functions"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant", "observation_tag": "result",
                             "function_tag": "assistant_call"}},
        "pairs": {"file_name": "qa.json", "ranking": True},
        "pictures": {"file_name": "qa.json", "formatting": "sharegpt", "columns": {"messages": "m", "images": "i"}},
        "remote": {"ms_hub_url": "someone/data"},
        "scripted": {"script_url": "my_script"},
        "other": {"file_name": "qa.json", "formatting": "openai"},
        "count_as_text": {"file_name": "qa.json", "num_samples": "2"},
        "negative_count": {"file_name": "qa.json", "num_samples": -1},
        "fractional_count": {"file_name": "qa.json", "num_samples": 0.5},
        "huge_count": {"file_name": "qa.json", "num_samples": 10 ** 15},
        "pretraining": {"file_name": "qa.json", "columns": {"prompt": "question"}},
        "no_messages": {"file_name": "dialogs.jsonl", "formatting": "sharegpt", "columns": {"system": "sys"}},
        "file_as_list": {"file_name": ["qa.json"]},
        "columns_as_list": {"file_name": "qa.json", "columns": ["question"]},
        "ranking_as_text": {"file_name": "qa.json", "ranking": "no"},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def test_dataset_info_entries_train_as_llama_factory_renders_them(tokenizer, tmp_path, llama_factory):
    encoder = make_encoder(tokenizer, template="auto", system_message=None)
    args = finetune.DataArguments(data_path="unused", data_cache_dir=str(tmp_path / "cache"))
    info = llama_factory / "dataset_info.json"
    dataset = dataset_of([f"{info}:qa#1", f"{llama_factory}:plain", f"{info}:dialogs"], encoder, args)
    examples = [dataset[i] for i in range(len(dataset))]
    assert len(examples) == 1 + 3 + 1  # #1 of qa; num_samples 3 of plain (its one sample three times); dialogs
    # The alpaca entry through its columns: the 'system' key the entry does not name is left out, as LLaMA-Factory does.
    _, ids, labels = template_ids_and_labels(tokenizer, ALPACA_MESSAGES)
    assert examples[0] == {"input_ids": ids, "labels": labels}
    _, ids, labels = template_ids_and_labels(tokenizer, [{"role": "user", "content": "Name a colour."},
                                                         {"role": "assistant", "content": "Blue."}])
    assert examples[1] == examples[2] == examples[3] == {"input_ids": ids, "labels": labels}
    # The sharegpt entry through its tags: a function call, a tool result, the tools column.
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
              {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                  "name": "get_weather", "arguments": {"city": "Oslo"}}}]},
              {"role": "tool", "content": "snow"}, {"role": "assistant", "content": "Snow."}]
    _, ids, labels = template_ids_and_labels(tokenizer, dialog, [WEATHER_TOOL])
    assert examples[4] == {"input_ids": ids, "labels": labels}
    assert dataset.reports[1] == f"{llama_factory}:plain: 1 read, 1 kept, 0 dropped, 3 taken"
    # Each entry's mapping is part of what its tokens are cached under.
    assert len(os.listdir(tmp_path / "cache")) == 3


@pytest.mark.parametrize("name, expected", [
    ("pairs", "the entry 'pairs' is preference data (chosen and rejected answers)"),
    ("pictures", "the entry 'pictures' has images: this script fine-tunes on text only"),
    ("remote", "the entry 'remote' comes from ModelScope (ms_hub_url), which cannot be reached here"),
    ("scripted", "the entry 'scripted' comes from a loading script (script_url)"),
    ("other", "the entry 'other' has formatting 'openai'; alpaca and sharegpt are read"),
    ("absent", "dataset_info.json has no dataset 'absent' (it has columns_as_list, count_as_text, dialogs, "),
    ("count_as_text", "the entry 'count_as_text' has num_samples \"2\", which must be a positive whole number"),
    ("negative_count", "the entry 'negative_count' has num_samples -1, which must be a positive whole number"),
    ("fractional_count", "the entry 'fractional_count' has num_samples 0.5, which must be a positive whole"),
    ("huge_count", "huge_count (its num_samples): 1,000,000,000,000,000 samples would need"),
    ("pretraining", "the entry 'pretraining' is pretraining data (its columns name no 'response'"),
    ("no_messages", "the entry 'no_messages' names no 'messages' column"),
    ("file_as_list", "the entry 'file_as_list' has file_name [\"qa.json\"], which must be text"),
    ("columns_as_list", "the entry 'columns_as_list' has columns [\"question\"], which must map names"),
    ("ranking_as_text", "the entry 'ranking_as_text' has ranking \"no\", which must be true or false"),
])
def test_an_entry_that_cannot_be_honoured_is_one_line_naming_it(llama_factory, name, expected):
    with pytest.raises(finetune.UserError) as error:
        finetune.parse_sources([f"{llama_factory}:{name}"])
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_the_preview_renders_a_dataset_info_entry(llama_factory, tmp_path, capsys):
    try:
        finetune.train(["--model_name_or_path", qwen_tokenizer_dir(), "--data_path", f"{llama_factory}:qa",
                        "--output_dir", str(tmp_path / "out"), "--preprocess_only", "true", "--data_cache_dir",
                        "none"])
    finally:
        finetune.release_output_dir()
    printed = capsys.readouterr().out
    assert f"{llama_factory}:qa: 3 read, 3 kept" in printed
    assert "Translate to French.\nGood morning<|im_end|>" in printed and "⟦Bonjour<|im_end|>⟧" in printed
