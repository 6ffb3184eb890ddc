"""--template auto: the model's own chat template (Qwen3 thinking, tools, tool calls) and its label rule.

Each case checks finetune.py three ways: the ids equal the template's own tokens (apply_chat_template), the labels
equal those of the independent labeller in reference_labels.py, and the trained runs decode to the exact text
each assistant message should teach, written out by hand below.
"""
import json

import pytest
from helpers import WEATHER_TOOL, encode, make_encoder, trained_runs, with_template, write_json, write_jsonl
from reference_labels import QWEN25_STYLE_TEMPLATE, official_template, template_ids_and_labels, template_messages

import finetune

NOTE_TOOL = {"name": "save_note", "description": "Keep a note.",
             "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}
USER = {"role": "user", "content": "q"}


def call(arguments, name="get_weather"):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]}


# Reasoning on an earlier turn and on the last ones, a tool call with null content, two tool results, non-ASCII.
AGENT_MESSAGES = [
    {"role": "system", "content": "Tu es un assistant météo."},
    {"role": "user", "content": "Bonjour !"},
    {"role": "assistant", "reasoning_content": "A greeting; answer briefly.", "content": "Bonjour ! ☀️"},
    {"role": "user", "content": "Quel temps à Lyon et à Nice ?"},
    {"role": "assistant", "content": None, "reasoning_content": "Two cities, two calls.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Lyon\"}"}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Nice"}}}]},
    {"role": "tool", "tool_call_id": "a", "content": "{\"sky\": \"pluie\", \"c\": 12}"},
    {"role": "tool", "tool_call_id": "b", "content": "{\"sky\": \"soleil\", \"c\": 21}"},
    {"role": "assistant", "reasoning_content": "\nRain in Lyon, sun in Nice.\n",
     "content": "Pluie à Lyon (12 °C), soleil à Nice (21 °C)."},
]


PLAIN_CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def check_against_the_template(tokenizer, example, messages, tools=None, chat_template=None, objects=None,
                               **template_kwargs):
    objects = chat_template == QWEN25_STYLE_TEMPLATE if objects is None else objects
    messages = template_messages(messages, arguments_as_objects=objects)
    text, ids, labels = template_ids_and_labels(tokenizer, messages, tools, chat_template, **template_kwargs)
    assert example["input_ids"] == ids
    assert example["labels"] == labels
    return text


@pytest.mark.parametrize("lazy", [False, True])
def test_qwen3_template_reasoning_tool_calls_and_tool_results(tokenizer, tmp_path, lazy):
    path = write_jsonl(tmp_path / "d.jsonl", [{"tools": [WEATHER_TOOL], "messages": AGENT_MESSAGES}])
    [example] = encode(tokenizer, path, lazy=lazy)
    text = check_against_the_template(tokenizer, example, AGENT_MESSAGES, [WEATHER_TOOL])
    assert "A greeting" not in text  # Qwen3 drops reasoning before the last user query, as at inference
    assert trained_runs(tokenizer, example) == [
        "Bonjour ! ☀️<|im_end|>",
        "<think>\nTwo cities, two calls.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call><|im_end|>',
        "<think>\nRain in Lyon, sun in Nice.\n</think>\n\nPluie à Lyon (12 °C), soleil à Nice (21 °C).<|im_end|>",
    ]
    # The tool results and the tools block are context, never trained.
    assert "<tool_response>" in text and all("tool_response" not in run for run in trained_runs(tokenizer, example))


def test_qwen3_empty_thinking_block_the_template_inserts_is_not_trained(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "  See you."}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    [example] = encode(tokenizer, path)
    text = check_against_the_template(tokenizer, example, messages)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n  See you.<|im_end|>\n")
    assert trained_runs(tokenizer, example) == ["Hello.<|im_end|>", "  See you.<|im_end|>"]
    think = tokenizer.convert_tokens_to_ids("<think>")
    assert think in example["input_ids"] and think not in example["labels"]


def test_reasoning_written_inside_the_content_is_trained_like_reasoning_content(tokenizer, tmp_path):
    inline = [{"role": "user", "content": "Is 91 prime?"},
              {"role": "assistant", "content": "<think>\n91 = 7 × 13.\n</think>\n\nNo."}]
    separate = [inline[0], {"role": "assistant", "reasoning_content": "91 = 7 × 13.", "content": "No."}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": inline}, {"messages": separate}])
    first, second = encode(tokenizer, path)
    assert first == second
    assert trained_runs(tokenizer, first) == ["<think>\n91 = 7 × 13.\n</think>\n\nNo.<|im_end|>"]


def test_sharegpt_function_call_and_observation_equal_the_openai_form(tokenizer, tmp_path):
    sharegpt = {"system": "Be useful.", "tools": json.dumps([NOTE_TOOL]), "conversations": [
        {"from": "human", "value": "Remember: milk."},
        {"from": "function_call", "value": json.dumps({"name": "save_note", "arguments": {"text": "milk"}})},
        {"from": "observation", "value": "saved"},
        {"from": "gpt", "value": "Noted."}]}
    openai = {"tools": [{"type": "function", "function": NOTE_TOOL}], "messages": [
        {"role": "system", "content": "Be useful."}, {"role": "user", "content": "Remember: milk."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "save_note", "arguments": "{\"text\": \"milk\"}"}}]},
        {"role": "tool", "content": "saved"}, {"role": "assistant", "content": "Noted."}]}
    path = write_json(tmp_path / "d.json", [sharegpt, openai])
    from_sharegpt, from_openai = encode(tokenizer, path)
    assert from_sharegpt == from_openai
    check_against_the_template(tokenizer, from_openai, openai["messages"], openai["tools"])
    assert trained_runs(tokenizer, from_openai) == [
        '<tool_call>\n{"name": "save_note", "arguments": {"text": "milk"}}\n'
        "</tool_call><|im_end|>", "Noted.<|im_end|>"]


def test_older_and_partial_openai_shapes_mean_the_same(tokenizer, tmp_path):
    tool_calls = {"tools": [WEATHER_TOOL], "messages": [
        USER, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "snow"}, {"role": "assistant", "content": "Snow.", "tool_calls": []}]}
    older = {"tools": [{"function": WEATHER_TOOL["function"]}], "messages": [  # no "type"; function_call; function
        USER, {"role": "assistant", "content": None,
               "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
        {"role": "function", "name": "get_weather", "content": "snow"}, {"role": "assistant", "content": "Snow."}]}
    bare = {**older, "tools": [WEATHER_TOOL["function"]]}
    path = write_jsonl(tmp_path / "d.jsonl", [tool_calls, older, bare])
    first, second, third = encode(tokenizer, path)
    assert first == second == third
    check_against_the_template(tokenizer, first, tool_calls["messages"], tool_calls["tools"])


def test_whitespace_only_reasoning_is_an_empty_thinking_block(tokenizer, tmp_path):
    samples = [{"messages": [USER, {"role": "assistant", "reasoning_content": reasoning, "content": "a"}]}
               for reasoning in ["", "  ", "\n\n"]]
    samples.append({"messages": [USER, {"role": "assistant", "content": "<think> </think>a"}]})
    for example in encode(tokenizer, write_jsonl(tmp_path / "d.jsonl", samples)):
        assert trained_runs(tokenizer, example) == ["a<|im_end|>"]


def test_qwen25_style_template_with_default_system_tools_and_tool_calls(tokenizer, tmp_path):
    qwen25 = with_template(tokenizer, QWEN25_STYLE_TEMPLATE)
    messages = AGENT_MESSAGES[1:]  # no system message: the template's default applies
    path = write_jsonl(tmp_path / "d.jsonl", [{"tools": [WEATHER_TOOL], "messages": messages}])
    [example] = encode(qwen25, path)
    text = check_against_the_template(qwen25, example, messages, [WEATHER_TOOL], QWEN25_STYLE_TEMPLATE)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    assert trained_runs(qwen25, example) == [  # this template has no reasoning: none is rendered, none trained
        "Bonjour ! ☀️<|im_end|>",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call><|im_end|>',
        "Pluie à Lyon (12 °C), soleil à Nice (21 °C).<|im_end|>",
    ]
    # --system_message replaces the template's default for samples without one.
    [example] = encode(qwen25, path, system_message="Be terse.")
    assert qwen25.decode(example["input_ids"]).startswith("<|im_start|>system\nBe terse.\n\n# Tools")
    [example] = encode(qwen25, path, system_message="")  # an empty one hides the template's default
    assert qwen25.decode(example["input_ids"]).startswith("<|im_start|>system\n\n\n# Tools")


def test_string_arguments_reach_qwen3_as_written_and_qwen25_as_an_object(tokenizer, tmp_path):
    messages = [USER, call('{"city":"Lyon",  "days": [1,2]}')]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    [qwen3] = encode(tokenizer, path)
    check_against_the_template(tokenizer, qwen3, messages)  # the sample's own string, byte for byte
    assert '"arguments": {"city":"Lyon",  "days": [1,2]}}' in tokenizer.decode(qwen3["input_ids"])
    qwen25 = with_template(tokenizer, QWEN25_STYLE_TEMPLATE)
    [example] = encode(qwen25, path)
    check_against_the_template(qwen25, example, messages, chat_template=QWEN25_STYLE_TEMPLATE)
    # Handed over as given, this template would have written "arguments": "{\"city\":...}", a quoted string.
    assert '"arguments": {"city": "Lyon", "days": [1, 2]}}' in qwen25.decode(example["input_ids"])


def test_truncation_in_auto_mode_cuts_the_same_tokens_and_drops_the_same_samples(tokenizer, tmp_path):
    long_tools = [{"type": "function", "function": {**WEATHER_TOOL["function"], "description": "weather " * 300}}]
    samples = [{"tools": [WEATHER_TOOL], "messages": AGENT_MESSAGES},
               {"tools": long_tools, "messages": [USER, {"role": "assistant", "content": "lost"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    [full, _] = encode(tokenizer, path)
    for lazy in (False, True):
        [cut] = encode(tokenizer, path, lazy=lazy, model_max_length=200)  # the long tool list leaves nothing
        assert cut["input_ids"] == full["input_ids"][:200] and cut["labels"] == full["labels"][:200]


def test_what_each_template_does_with_tool_data(tokenizer):
    qwen25 = with_template(tokenizer, QWEN25_STYLE_TEMPLATE)
    assert finetune.probe_template(tokenizer) == finetune.TemplateTraits(
        writes_tools=True, writes_tool_calls=True, wants_object_arguments=False, writes_reasoning=True)
    assert finetune.probe_template(qwen25) == finetune.TemplateTraits(
        writes_tools=True, writes_tool_calls=True, wants_object_arguments=True, writes_reasoning=False)


def test_a_template_that_only_takes_object_arguments_gets_them(tokenizer, tmp_path):
    # Like templates that loop over arguments|items: a string there is an error, not a call the template drops.
    qwen3 = tokenizer.chat_template
    start = qwen3.index("{%- if tool_call.arguments is string %}")
    end = qwen3.index("{%- endif %}", start) + len("{%- endif %}")
    items = with_template(tokenizer, qwen3[:start] + "{%- for k, v in tool_call.arguments|items %}{{ k }}={{ v }};"
                                                     "{%- endfor %}" + qwen3[end:])
    assert finetune.probe_template(items).wants_object_arguments
    messages = [USER, call('{"city": "Oslo", "days": 2}')]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    [example] = encode(items, path)
    assert trained_runs(items, example) == ['<tool_call>\n{"name": "get_weather", "arguments": city=Oslo;days=2;}\n'
                                            "</tool_call><|im_end|>"]


def test_a_template_that_would_drop_tool_data_is_not_silent(tokenizer, tmp_path, caplog):
    plain = with_template(tokenizer, PLAIN_CHATML)  # content only, like Qwen1.5's template
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [USER, call({"city": "Oslo"})]}])
    with pytest.raises(finetune.DataError, match="line 1: has tool calls, which this model's chat template does not"):
        encode(plain, path)
    reasoning = {"role": "assistant", "content": "a", "reasoning_content": "think"}
    path = write_jsonl(tmp_path / "r.jsonl", [{"tools": [WEATHER_TOOL], "messages": [USER, reasoning]}] * 2)
    with caplog.at_level("WARNING", logger="finetune"):
        [example, _] = encode(plain, path)
    warnings = [r.message for r in caplog.records if "does not write" in r.message]
    assert len(warnings) == 2 and all(w.startswith(f"{path} line 1:") for w in warnings)  # once each, not per sample
    assert "does not write 'tools'" in warnings[0] and "does not write 'reasoning_content'" in warnings[1]
    assert trained_runs(plain, example) == ["a<|im_end|>"]


def test_template_choice(tokenizer, tmp_path):
    assert finetune.ChatEncoder(tokenizer, 64).template == "auto"
    assert finetune.ChatEncoder(tokenizer, 64, template="chatml").template == "chatml"
    none = with_template(tokenizer, None)
    assert finetune.ChatEncoder(none, 64).template == "chatml"  # nothing to follow: plain ChatML
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [USER, call("{}")]}])
    with pytest.raises(finetune.DataError, match="line 1: has tool calls, which plain ChatML cannot render; this "
                                                 "tokenizer has no chat template"):
        encode(none, path)
    other = with_template(tokenizer, "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    with pytest.raises(finetune.UserError, match="does not write ChatML turns.*--template chatml"):
        finetune.ChatEncoder(other, 64)
    picky = with_template(tokenizer, "{{ raise_exception('a system message is required') }}")
    with pytest.raises(finetune.UserError, match="fails on a plain user/assistant exchange .*a system message is "
                                                 "required.*--template chatml"):
        finetune.ChatEncoder(picky, 64)


# ---------------------------------------------------------------------------------------------------------
# The current generation's official templates: Qwen3.5 (think / nothink), Qwen3.6, Qwen3.8
# ---------------------------------------------------------------------------------------------------------

XML_CALLS = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nLyon\n</parameter>\n</function>\n</tool_call>"
             "\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNice\n</parameter>\n</function>\n</tool_call>")
GREETING, ANSWER = "Bonjour ! ☀️<|im_end|>", "Pluie à Lyon (12 °C), soleil à Nice (21 °C).<|im_end|>"
THOUGHT = "<think>\nA greeting; answer briefly.\n</think>\n\n"
# What each template trains of AGENT_MESSAGES with each setting: the last query's turns always with their reasoning;
# the earlier greeting with its reasoning only where thinking is preserved (Qwen3.8 by default).
CURRENT_TEMPLATES = {
    ("qwen3_5_think", "{}"): False, ("qwen3_5_nothink", "{}"): False,
    ("qwen3_6", "{}"): False, ("qwen3_6", '{"preserve_thinking": true}'): True,
    ("qwen3_8", "{}"): True, ("qwen3_8", '{"preserve_thinking": false}'): False,
    ("qwen3_8", '{"reasoning_effort": "low"}'): True, ("qwen3_8", '{"enable_thinking": false}'): True,
}


@pytest.mark.parametrize("name,settings", CURRENT_TEMPLATES, ids=[f"{n} {s}" for n, s in CURRENT_TEMPLATES])
def test_current_qwen_templates_reasoning_xml_tool_calls_and_tool_results(tokenizer, tmp_path, name, settings):
    template = with_template(tokenizer, official_template(name))
    kwargs = json.loads(settings)
    path = write_jsonl(tmp_path / "d.jsonl", [{"tools": [WEATHER_TOOL], "messages": AGENT_MESSAGES}])
    encoder = finetune.ChatEncoder(template, 8192, template_kwargs=kwargs)
    # XML calls loop over the arguments' items: a string would fail, so the template is handed objects.
    assert encoder.traits == finetune.TemplateTraits(
        writes_tools=True, writes_tool_calls=True, wants_object_arguments=True, writes_reasoning=True)
    for lazy in (False, True):
        [example] = encode(template, path, lazy=lazy, template_kwargs=kwargs)
        text = check_against_the_template(template, example, AGENT_MESSAGES, [WEATHER_TOOL], objects=True, **kwargs)
        assert trained_runs(template, example) == [
            (THOUGHT if CURRENT_TEMPLATES[name, settings] else "") + GREETING,
            "<think>\nTwo cities, two calls.\n</think>\n\n" + XML_CALLS + "<|im_end|>",
            "<think>\nRain in Lyon, sun in Nice.\n</think>\n\n" + ANSWER]
        assert "<tool_response>" in text and all("tool_response" not in run for run in trained_runs(template, example))
    if "reasoning_effort" in kwargs:  # the effort instruction goes to the system prompt, which is never trained
        assert "Reasoning effort is set to low" in text
    elif name == "qwen3_8" and kwargs.get("enable_thinking", True):
        assert "Reasoning effort is set to xhigh" in text


def test_template_kwargs_reach_every_render_and_are_checked(tokenizer, tmp_path):
    qwen36 = with_template(tokenizer, official_template("qwen3_6"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello.", "reasoning_content": "r"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    [plain] = encode(qwen36, path)
    [preserved] = encode(qwen36, path, template_kwargs={"preserve_thinking": True})
    assert trained_runs(qwen36, plain) == ["Hello.<|im_end|>", "See you.<|im_end|>"]
    assert trained_runs(qwen36, preserved) == ["<think>\nr\n</think>\n\nHello.<|im_end|>", "See you.<|im_end|>"]
    with pytest.raises(finetune.UserError, match="--chat_template_kwargs are settings of the model's own chat "
                                                 "template, which --template chatml does not use"):
        finetune.ChatEncoder(tokenizer, 64, template="chatml", template_kwargs={"enable_thinking": False})
    qwen38 = with_template(tokenizer, official_template("qwen3_8"))
    with pytest.raises(finetune.UserError, match="fails on a plain user/assistant exchange with these "
                                                 "--chat_template_kwargs .*Unexpected reasoning effort"):
        finetune.ChatEncoder(qwen38, 64, template_kwargs={"reasoning_effort": "max"})
    for bad, expected in (("{not json", "must be a JSON object, e.g."), ("[1]", "must be a JSON object of template")):
        with pytest.raises(finetune.UserError, match=expected):
            finetune.DataArguments(data_path=["d.jsonl"], chat_template_kwargs=bad)
    assert finetune.DataArguments(data_path=["x"], chat_template_kwargs=' {"a": 1}').chat_template_kwargs == {"a": 1}


# ---------------------------------------------------------------------------------------------------------
# Errors name the file, the sample, the message and the call
# ---------------------------------------------------------------------------------------------------------

BAD_TOOL_SAMPLES = {
    "arguments not JSON": ({"messages": [USER, call("{city: Lyon}")]},
                           "message 1 tool call 0 'arguments': not valid JSON"),
    "arguments a list": ({"messages": [USER, call("[1, 2]")]},
                         "message 1 tool call 0: 'arguments' must be a JSON object (or a string holding one), got list"),
    "arguments missing": ({"messages": [USER, call(None)]}, "message 1 tool call 0: 'arguments' must be a JSON object"),
    "no name": ({"messages": [USER, call("{}", name="")]}, "message 1 tool call 0 has no function 'name'"),
    "call not an object": ({"messages": [USER, {"role": "assistant", "content": "", "tool_calls": ["get_weather"]}]},
                           "message 1 tool call 0 is not a JSON object"),
    "tool_calls not a list": ({"messages": [USER, {"role": "assistant", "content": "x", "tool_calls": {"name": "f"}}]},
                              "message 1: 'tool_calls' must be a non-empty list"),
    "tool_calls on a user": ({"messages": [{**USER, "tool_calls": [{}]}, {"role": "assistant", "content": "a"}]},
                             "message 0: 'tool_calls' belongs on assistant messages, not on a user message"),
    "null content, no calls": ({"messages": [USER, {"role": "assistant", "content": None}]},
                               "message 1 has a null 'content' (or 'value') field"),
    "reasoning not a string": ({"messages": [USER, {"role": "assistant", "content": "a", "reasoning_content": 3}]},
                               "message 1: 'reasoning_content' must be a string, got int"),
    "function_call not JSON": ({"conversations": [{"from": "human", "value": "q"},
                                                  {"from": "function_call", "value": "save_note(milk)"}]},
                               "message 1: its function_call value: not valid JSON"),
    "tools not a list": ({"tools": {"name": "f"}, "messages": [USER, {"role": "assistant", "content": "a"}]},
                         "'tools' must be a list of function definitions, got dict"),
    "tool without a name": ({"tools": [{"description": "?"}], "messages": [USER, {"role": "assistant", "content": "a"}]},
                            "tool 0 in 'tools' has no function 'name'"),
    "control token in arguments": ({"messages": [USER, call({"text": "<|im_end|>"})]},
                                   "message 1 tool call 0 contains the control token '<|im_end|>'"),
    "control token escaped in arguments": ({"messages": [USER, call('{"text": "\\u003c|im_start|>"}')]},
                                           "message 1 tool call 0 contains the control token '<|im_start|>'"),
}


@pytest.mark.parametrize("case", BAD_TOOL_SAMPLES)
def test_malformed_tool_data_names_the_sample(tokenizer, tmp_path, case):
    sample, expected = BAD_TOOL_SAMPLES[case]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [USER, {"role": "assistant", "content": "a"}]}, sample])
    with pytest.raises(finetune.DataError) as error:
        encode(tokenizer, path)
    assert str(error.value).startswith(f"{path} line 2: ") and expected in str(error.value), str(error.value)


def test_chatml_template_refuses_what_it_cannot_render(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [USER, call("{}")]}])
    with pytest.raises(finetune.DataError, match=r"line 1: has tool calls, which plain ChatML cannot render; "
                                                 r"use --template auto"):
        encode(tokenizer, path, template="chatml")


def test_template_that_raises_is_reported_for_the_sample(tokenizer, tmp_path):
    strict = with_template(tokenizer, "{% for m in messages %}{% if m.role == 'tool' %}"
                                      "{{ raise_exception('no tools here') }}{% endif %}<|im_start|>{{ m.role }}\n"
                                      "{{ m.content }}<|im_end|>\n{% endfor %}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [USER, {"role": "tool", "content": "r"},
                                                            {"role": "assistant", "content": "a"}]}])
    with pytest.raises(finetune.DataError, match=r"line 1: the chat template cannot render it: .*no tools here"):
        encode(strict, path)


def test_nan_in_tool_arguments_is_refused(tokenizer, tmp_path):
    call = {"type": "function", "function": {"name": "f", "arguments": '{"x": NaN}'}}
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "done"}]}])
    with pytest.raises(finetune.DataError, match="message 1 tool call 0 'arguments': not valid JSON "
                                                 r"\(NaN is not a JSON value\)"):
        finetune.SupervisedDataset(path, make_encoder(tokenizer, template="auto", system_message=None))
