"""The tokenized-data cache: built once per data version, keyed on content, safe under crashes and concurrency,
read memory-mapped; and the parallel build, identical to one worker."""
import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import transformers
from conftest import make_encoder, write_jsonl

import finetune

SAMPLES = [{"messages": [{"role": "user",
                          "content": f"Question {i}: how deep is the sea near island {i}? " * (3 if i % 10 else 20)},
                         {"role": "assistant", "content": f"Answer {i}: about {i * 7} metres. " * (1 + i % 5)}]}
           for i in range(3500)]  # ~1.2 MB: large enough to be split between workers


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "big.jsonl", SAMPLES)
    assert os.path.getsize(path) > 1 << 20
    return path


def arrays(dataset):
    return {name: np.asarray(getattr(dataset, name)) for name in finetune.TOKENIZED_ARRAYS}


def assert_same(a, b):
    for name, values in arrays(a).items():
        np.testing.assert_array_equal(values, arrays(b)[name], err_msg=name)
    assert a.dropped == b.dropped and a.empty_assistant == b.empty_assistant


def test_two_workers_give_exactly_what_one_gives_in_order(tokenizer, big_file):
    encoder = make_encoder(tokenizer, model_max_length=128)  # every tenth sample loses its trained tokens: dropped
    one = finetune.SupervisedDataset(big_file, encoder, num_workers=1)
    two = finetune.SupervisedDataset(big_file, encoder, num_workers=2)
    assert len(finetune.split_into_line_runs(big_file, 2)) == 2
    assert_same(one, two)
    assert one.dropped > 0 and len(one) + one.dropped == len(SAMPLES)
    kept = [i for i in range(len(SAMPLES)) if i % 10]
    assert one.dropped == len(SAMPLES) - len(kept)
    assert one[1234] == finetune.as_lists(encoder.encode([encoder.parse(SAMPLES[kept[1234]], "x")])[0])


def test_a_bad_line_in_a_later_part_is_named_by_its_line_number(tokenizer, big_file, tmp_path):
    lines = open(big_file).read().splitlines()
    lines[3000] = '{"messages": [{"role": "bot", "content": "a"}]}'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(finetune.DataError, match=f"^{path} line 3001: message 0 has unknown role 'bot'"):
        finetune.SupervisedDataset(str(path), make_encoder(tokenizer), cache_dir=str(tmp_path / "cache"),
                                   num_workers=2)
    assert not os.listdir(tmp_path / "cache")  # a failed build leaves nothing behind


def test_a_cached_data_set_is_built_once_and_then_mapped(tokenizer, big_file, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    built = finetune.SupervisedDataset(big_file, make_encoder(tokenizer), cache_dir=cache, num_workers=2)
    [entry] = os.listdir(cache)
    uncached = finetune.SupervisedDataset(big_file, make_encoder(tokenizer), num_workers=1)
    encoder = make_encoder(tokenizer)
    monkeypatch.setattr(encoder, "encode_with_lengths", lambda *a: pytest.fail("tokenized again"))
    monkeypatch.setattr(finetune, "build_tokenized", lambda *a: pytest.fail("built again"))
    loaded = finetune.SupervisedDataset(big_file, encoder, cache_dir=cache)
    assert isinstance(loaded.input_ids, np.memmap) and loaded.input_ids.filename.startswith(os.path.join(cache, entry))
    assert_same(loaded, built)
    assert_same(loaded, uncached)


def tokenizer_with(tokenizer, tmp_path, change):
    """A copy of the tokenizer with one thing changed in its files."""
    folder = tmp_path / f"tokenizer_{change}"
    tokenizer.save_pretrained(folder)
    with open(folder / "tokenizer.json") as f:
        spec = json.load(f)
    if change == "merge":
        spec["model"]["merges"] = spec["model"]["merges"][1:]
    elif change == "vocabulary":
        vocab = spec["model"]["vocab"]
        a, b = "hello", "world"
        vocab[a], vocab[b] = vocab[b], vocab[a]
    elif change == "added token":
        spec["added_tokens"][-1]["content"] = "<|something_else|>"
    with open(folder / "tokenizer.json", "w") as f:
        json.dump(spec, f)
    changed = transformers.AutoTokenizer.from_pretrained(folder)
    if change == "chat template":
        changed.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|>", 1) + "{# x #}"
    return changed


@pytest.mark.parametrize("change", ["one byte of one sample", "merge", "vocabulary", "added token", "chat template",
                                    "template", "system message", "template kwargs", "model_max_length",
                                    "format version"])
def test_the_cache_key_covers_everything_that_decides_the_tokens(tokenizer, tmp_path, change, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", SAMPLES[:3])
    base = {"model_max_length": 512, "system_message": "Be brief.", "template": "auto"}
    key = finetune.tokenized_cache_entry(path, make_encoder(tokenizer, **base))
    assert finetune.tokenized_cache_entry(shutil.copy(path, tmp_path / "renamed.jsonl"),
                                          make_encoder(tokenizer, **base)) == key  # names do not matter
    kwargs, tok = dict(base), tokenizer
    if change == "one byte of one sample":
        text = open(path).read()
        at = text.index("Answer 1: about 7")
        open(path, "w").write(text[:at] + "Answer 1: about 8" + text[at + len("Answer 1: about 7"):])
        finetune.file_digest.cache_clear()  # as a new process would: within one, a file's date may not have moved
    elif change in ("merge", "vocabulary", "added token", "chat template"):
        tok = tokenizer_with(tokenizer, tmp_path, change)
    elif change == "template":
        kwargs["template"] = "chatml"
    elif change == "system message":
        kwargs["system_message"] = "Be brief!"
    elif change == "template kwargs":
        kwargs["template_kwargs"] = {"preserve_thinking": True}
    elif change == "model_max_length":
        kwargs["model_max_length"] = 513
    else:
        monkeypatch.setattr(finetune, "TOKENIZED_FORMAT_VERSION", finetune.TOKENIZED_FORMAT_VERSION + 1)
    assert finetune.tokenized_cache_entry(path, make_encoder(tok, **kwargs)) != key


def build_in_another_process(path, cache, queue):
    tokenizer = transformers.AutoTokenizer.from_pretrained(finetune_tokenizer_dir())
    dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=cache, num_workers=1)
    queue.put(dataset.input_ids.filename)


def finetune_tokenizer_dir():
    from tiny_qwen import qwen_tokenizer_dir

    return qwen_tokenizer_dir()


def test_two_jobs_building_the_same_entry_at_once_end_with_one_valid_entry(tokenizer, big_file, tmp_path):
    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    # A build killed half-way in an earlier run: never read, never in the way.
    os.makedirs(os.path.join(cache, finetune.tokenized_cache_entry(big_file, make_encoder(tokenizer)) + ".building-x"))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    jobs = [context.Process(target=build_in_another_process, args=(big_file, cache, queue)) for _ in range(2)]
    for job in jobs:
        job.start()
    files = [queue.get(timeout=300) for _ in jobs]
    for job in jobs:
        job.join()
        assert job.exitcode == 0
    assert files[0] == files[1]
    entries = [name for name in os.listdir(cache) if "." not in name]
    assert len(entries) == 1 and not any(name.endswith(".lock") for name in os.listdir(cache))
    assert_same(finetune.SupervisedDataset(big_file, make_encoder(tokenizer), cache_dir=cache),
                finetune.SupervisedDataset(big_file, make_encoder(tokenizer)))


def test_a_waiting_rank_reports_the_builders_data_error(tmp_path):
    entry = str(tmp_path / "abc")
    with open(entry + ".error", "w") as f:
        f.write("train.jsonl line 7: message 0 has unknown role 'bot'")
    with pytest.raises(finetune.DataError, match="^train.jsonl line 7: message 0 has unknown role 'bot'$"):
        finetune.wait_for_cache_entry("train.jsonl", entry, rank=1)


def test_the_lazy_length_estimate_is_on_the_scale_of_tokens(tokenizer, tmp_path):
    samples = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]}
               for text in ("short.", "a much longer answer " * 40, "中文的回答" * 60)]
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    encoder = make_encoder(tokenizer, model_max_length=4096)
    lazy, eager = finetune.LazySupervisedDataset(path, encoder), finetune.SupervisedDataset(path, encoder)
    for estimate, tokens in zip(lazy.lengths, eager.lengths):
        assert tokens / 2 <= estimate <= tokens * 2, (estimate, tokens)
