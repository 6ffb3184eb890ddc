"""An implementation of the label rule independent of finetune.py, for the tests to check it against.

It renders with `apply_chat_template` (plain ChatML written here, a Qwen2.5-style template with tools written here,
or the Qwen3 template that ships with the tokenizer) and finds where each token starts from the tokens' own
byte-level strings, not from the tokenizer's offset mapping that finetune.py uses.
"""
import copy
import importlib.util
import json
import os

IGNORE = -100

# A Qwen2.5-style ChatML template: the rendering finetune.py must reproduce.
CHATML_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
)


# In the style of Qwen2.5's template: a default system message, tools listed in the system turn, tool calls as
# <tool_call> JSON (arguments through tojson), consecutive tool results in one user turn. Written for these tests.
QWEN25_STYLE_TEMPLATE = """
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}
{%- endif %}
{{- '<|im_start|>system\n' + system }}
{%- if tools %}
    {{- '\n\n# Tools\n\nFunctions you may call:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\n</tools>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for m in messages %}
    {%- if m.role == 'assistant' and m.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if m.content %}
            {{- '\n' + m.content }}
        {%- endif %}
        {%- for call in m.tool_calls %}
            {{- '\n<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' }}
            {{- (call.function.arguments | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif m.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def official_template(name):
    """An official Qwen chat template (qwen3_5_think, qwen3_5_nothink, qwen3_6, qwen3_8) from the copies TRL ships in
    its wheel, read without importing TRL."""
    spec = importlib.util.find_spec("trl")
    assert spec is not None, "the tests need the package trl (pip install -r requirements.txt): it ships the templates"
    with open(os.path.join(list(spec.submodule_search_locations)[0], "chat_templates", f"{name}.jinja")) as f:
        return f.read()


def byte_level_alphabet():
    """The byte <-> printable-character table of byte-level BPE (bytes that print stand for themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_byte_starts(tokenizer, ids):
    """Byte offset in the UTF-8 text where each token starts, computed from the tokens' own strings."""
    alphabet, special = byte_level_alphabet(), set(tokenizer.all_special_ids)
    starts, position = [], 0
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        starts.append(position)
        position += len(token.encode("utf-8")) if token_id in special else len(bytes(alphabet[c] for c in token))
    return starts


def expected_labels(tokenizer, text, ids):
    """Labels by the contract: trained = tokens starting inside an assistant turn's body (after its header, through
    its <|im_end|>), except an empty thinking block "<think>" + whitespace + "</think>" + newlines at its start."""
    data = text.encode("utf-8")
    header, end = b"<|im_start|>assistant\n", b"<|im_end|>"
    spans, position = [], 0
    while (found := data.find(header, position)) >= 0:
        body_start = found + len(header)
        body_end = data.index(end, body_start)
        if data.startswith(b"<think>", body_start):
            think_end = data.find(b"</think>", body_start)
            if 0 <= think_end < body_end and not data[body_start + len(b"<think>"):think_end].strip():
                body_start = think_end + len(b"</think>")
                while data[body_start:body_start + 1] == b"\n":
                    body_start += 1
        spans.append((body_start, body_end + len(end)))
        position = body_end
    starts = token_byte_starts(tokenizer, ids)
    return [i if any(s <= b < e for s, e in spans) else IGNORE for i, b in zip(ids, starts)]


def template_messages(messages, arguments_as_objects=False):
    """The messages as apply_chat_template takes them: tool-call-only content as "" (the templates cannot take a
    null content), and for templates that would quote string arguments, the arguments as objects."""
    messages = copy.deepcopy(messages)
    for message in messages:
        if message.get("content") is None:
            message["content"] = ""
        for call in message.get("tool_calls", []) if arguments_as_objects else []:
            if isinstance(call["function"]["arguments"], str):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return messages


def template_ids_and_labels(tokenizer, messages, tools=None, chat_template=None, **template_kwargs):
    """What --template auto must produce: the chat template's own text and tokens, labelled by the rule above."""
    text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat_template, tokenize=False,
                                         **template_kwargs)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, ids, expected_labels(tokenizer, text, ids)


def reference_ids_and_labels(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, ids, expected_labels(tokenizer, text, ids)


