"""An implementation of the label rule independent of finetune.py, for the tests to check it against.

It renders with `apply_chat_template` and a Qwen2.5-style ChatML template written here, and finds where each token
starts from the tokens' own byte-level strings, not from the tokenizer's offset mapping that finetune.py uses.
"""
IGNORE = -100

# A Qwen2.5-style ChatML template: the rendering finetune.py must reproduce.
CHATML_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
)


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
    """Labels by the contract: trained = tokens starting inside an assistant content or on the <|im_end|> after it."""
    data = text.encode("utf-8")
    header, end = b"<|im_start|>assistant\n", b"<|im_end|>"
    spans, position = [], 0
    while (found := data.find(header, position)) >= 0:
        content_start = found + len(header)
        content_end = data.index(end, content_start)
        spans.append((content_start, content_end + len(end)))
        position = content_end
    starts = token_byte_starts(tokenizer, ids)
    return [i if any(s <= b < e for s, e in spans) else IGNORE for i, b in zip(ids, starts)]


def reference_ids_and_labels(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, chat_template=CHATML_TEMPLATE, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, ids, expected_labels(tokenizer, text, ids)


