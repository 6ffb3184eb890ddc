"""The tokenized-data cache: built once per data version, keyed on content, safe under crashes and concurrency,
read memory-mapped; and the parallel build, identical to one worker."""
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import pytest
import transformers
from helpers import CHILD_ENV, GOOD, ROOT, make_encoder, write_jsonl

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
    assert len(finetune.split_into_line_runs(big_file, "jsonl", 2)) == 2
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


def test_a_waiting_rank_reports_the_builders_data_error(tokenizer, tmp_path):
    path, encoder = write_jsonl(tmp_path / "train.jsonl", SAMPLES[:2]), make_encoder(tokenizer)
    entry = tmp_path / finetune.tokenized_cache_entry(path, encoder)
    with open(f"{entry}.error", "w") as f:
        f.write("train.jsonl line 7: message 0 has unknown role 'bot'")
    with pytest.raises(finetune.DataError, match="^train.jsonl line 7: message 0 has unknown role 'bot'$"):
        finetune.wait_for_cache_entry(path, encoder, str(tmp_path))


def test_the_lazy_length_estimate_is_on_the_scale_of_tokens(tokenizer, tmp_path):
    samples = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]}
               for text in ("short.", "a much longer answer " * 40, "中文的回答" * 60)]
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    encoder = make_encoder(tokenizer, model_max_length=4096)
    lazy, eager = finetune.LazySupervisedDataset(path, encoder), finetune.SupervisedDataset(path, encoder)
    for estimate, tokens in zip(lazy.group_lengths, eager.group_lengths):
        assert tokens / 2 <= estimate <= tokens * 2, (estimate, tokens)


# ---------------------------------------------------------------------------------------------------------
# Verified before it is served: damaged entries, keys, bytes, killed builds, waiting
# ---------------------------------------------------------------------------------------------------------

def damage_entry(entry, damage):
    path = lambda name: os.path.join(entry, name)  # noqa: E731
    if damage == "truncated tokens":
        os.truncate(path("input_ids.bin"), os.path.getsize(path("input_ids.bin")) - 8)
    elif damage == "labels replaced by another array":  # same size: only the checksum can tell
        shutil.copy(path("input_ids.bin"), path("labels.bin"))
    elif damage == "odd size":
        with open(path("offsets.bin"), "ab") as f:
            f.write(b"\0")
    elif damage == "missing file":
        os.remove(path("full_lengths.bin"))
    elif damage == "empty folder":
        for name in os.listdir(entry):
            os.remove(path(name))
    elif damage == "unparsable meta.json":
        with open(path("meta.json"), "w") as f:
            f.write('{"version": 3, "arr')
    elif damage == "meta.json of another version":
        meta = json.load(open(path("meta.json")))
        json.dump({**meta, "version": 2}, open(path("meta.json"), "w"))
    elif damage == "a count as text":
        meta = json.load(open(path("meta.json")))
        json.dump({**meta, "dropped": str(meta["dropped"])}, open(path("meta.json"), "w"))
    elif damage == "one flipped byte":
        with open(path("input_ids.bin"), "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))


DAMAGES = ["truncated tokens", "labels replaced by another array", "odd size", "missing file", "empty folder",
           "unparsable meta.json", "meta.json of another version", "one flipped byte", "a count as text"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_entry_is_set_aside_and_built_again(tokenizer, tmp_path, damage, caplog):
    path, cache = write_jsonl(tmp_path / "d.jsonl", SAMPLES[:50]), str(tmp_path / "cache")
    expected = finetune.SupervisedDataset(path, make_encoder(tokenizer))
    finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=cache)
    [entry] = os.listdir(cache)
    damage_entry(os.path.join(cache, entry), damage)
    with pytest.raises(finetune.DamagedEntry):
        finetune.read_tokenized(os.path.join(cache, entry))
    with caplog.at_level(logging.INFO, logger="finetune"):
        rebuilt = finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=cache)
    assert_same(rebuilt, expected)
    assert os.listdir(cache) == [entry]  # the damaged one is gone, the new one in its place
    warnings = [r.message for r in caplog.records if "are damaged" in r.message]
    assert len(warnings) == 1 and f"the cached tokens in {os.path.join(cache, entry)} are damaged" in warnings[0]
    finetune.read_tokenized(os.path.join(cache, entry))  # and it checks out


def test_a_rank_that_finds_a_damaged_entry_waits_for_the_one_built_again(tokenizer, tmp_path):
    path, cache = write_jsonl(tmp_path / "d.jsonl", SAMPLES[:50]), str(tmp_path / "cache")
    finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=cache)
    [entry] = os.listdir(cache)
    damage_entry(os.path.join(cache, entry), "truncated tokens")
    waited = {}
    waiter = threading.Thread(target=lambda: waited.update(
        tokenized=finetune.wait_for_cache_entry(path, make_encoder(tokenizer), cache)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive()  # it does not serve the damaged entry
    finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=cache)  # local rank 0 builds it again
    waiter.join(timeout=30)
    np.testing.assert_array_equal(waited["tokenized"].arrays["input_ids"],
                                  finetune.SupervisedDataset(path, make_encoder(tokenizer)).input_ids)


def tokenizer_config_with(tokenizer, tmp_path, setting, value):
    """A copy of the tokenizer with one setting of its tokenizer_config.json changed."""
    folder = tmp_path / f"tokenizer_{setting}"
    tokenizer.save_pretrained(folder)
    if setting is not None:  # (None: the same tokenizer, saved in another folder)
        config = json.load(open(folder / "tokenizer_config.json"))
        json.dump({**config, setting: value}, open(folder / "tokenizer_config.json", "w"))
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("setting, value", [("split_special_tokens", True), ("add_prefix_space", True)])
def test_the_cache_key_covers_every_tokenizer_setting_that_changes_the_tokens(tokenizer, tmp_path, setting, value):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi  there"},
                                                            {"role": "assistant", "content": "ok\n"}]}])
    changed = tokenizer_config_with(tokenizer, tmp_path, setting, value)
    same = tokenizer_config_with(tokenizer, tmp_path, None, None)  # only saved elsewhere
    tokens = {name: finetune.SupervisedDataset(path, make_encoder(t))[0]["input_ids"]
              for name, t in (("before", tokenizer), ("after", changed))}
    assert tokens["before"] != tokens["after"]  # the setting does change what the data becomes
    key = finetune.tokenized_cache_entry(path, make_encoder(tokenizer))
    assert finetune.tokenized_cache_entry(path, make_encoder(changed)) != key
    assert finetune.tokenized_cache_entry(path, make_encoder(same)) == key


def test_an_entry_holds_the_tokens_of_the_bytes_its_name_says(tokenizer, tmp_path, monkeypatch, caplog):
    path, cache = write_jsonl(tmp_path / "d.jsonl", SAMPLES[:30]), str(tmp_path / "cache")
    edited = [json.dumps(sample) for sample in SAMPLES[30:60]]
    build = finetune.build_tokenized

    def edited_during_the_first_build(*args):
        result = build(*args)
        if edited:  # the file changes after the build has read it
            with open(path, "w") as f:
                f.write("\n".join(edited) + "\n")
            edited.clear()
        return result

    monkeypatch.setattr(finetune, "build_tokenized", edited_during_the_first_build)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=cache)
    assert f"{path} changed while it was being tokenized" in caplog.text
    monkeypatch.setattr(finetune, "build_tokenized", build)
    assert_same(dataset, finetune.SupervisedDataset(path, make_encoder(tokenizer)))  # the file as it is now
    finetune.file_digest.cache_clear()
    assert os.listdir(cache) == [finetune.tokenized_cache_entry(path, make_encoder(tokenizer))]

    def always_edited(*args):
        result = build(*args)
        with open(path, "a") as f:
            f.write(json.dumps(SAMPLES[0]) + "\n")
        return result

    monkeypatch.setattr(finetune, "build_tokenized", always_edited)
    with open(path, "a") as f:  # new content: not in the cache yet
        f.write(json.dumps(SAMPLES[1]) + "\n")
    with pytest.raises(finetune.DataError, match=f"{path}: the file kept changing while it was being tokenized"):
        finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=cache)


def test_killed_builds_are_removed_by_the_next_build_and_live_ones_kept(tokenizer, tmp_path):
    path, cache = write_jsonl(tmp_path / "d.jsonl", SAMPLES[:20]), tmp_path / "cache"
    own = finetune.tokenized_cache_entry(path, make_encoder(tokenizer))
    for name in (f"{own}.building-a", "deadbeef.building-b", "livebuild.building-c"):
        os.makedirs(cache / name)
        (cache / name / "input_ids.part0").write_bytes(b"\0" * 1000)
    live = finetune.acquire_lock(str(cache / "livebuild.lock"))  # another job still building that one
    try:
        finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=str(cache))
    finally:
        live.close()
    assert sorted(os.listdir(cache)) == sorted([own, "livebuild.building-c", "livebuild.lock"])


def test_a_job_waiting_for_another_jobs_build_says_whom_it_waits_for(tokenizer, tmp_path, monkeypatch, caplog):
    path, cache = write_jsonl(tmp_path / "d.jsonl", SAMPLES[:20]), tmp_path / "cache"
    os.makedirs(cache)
    entry = finetune.tokenized_cache_entry(path, make_encoder(tokenizer))
    other = finetune.acquire_lock(str(cache / f"{entry}.lock"))
    monkeypatch.setattr(finetune, "WAIT_REPORT_SECONDS", 0.2)
    with caplog.at_level(logging.INFO, logger="finetune"):
        job = threading.Thread(target=finetune.SupervisedDataset, args=(path, make_encoder(tokenizer)),
                               kwargs={"cache_dir": str(cache)})
        job.start()
        time.sleep(1)
        other.close()  # the other job ends
        job.join(timeout=60)
    waiting = [r.message for r in caplog.records if r.message.startswith("waiting for another job")]
    assert len(waiting) >= 2 and f"(pid {os.getpid()} on " in waiting[0]
    assert f"that is tokenizing {path} into {cache / entry}" in waiting[0]


def report_helper_state(queue):
    import ctypes

    finetune.become_helper_process()
    death_signal = ctypes.c_int()
    ctypes.CDLL("libc.so.6").prctl(2, ctypes.byref(death_signal))  # PR_GET_PDEATHSIG
    queue.put((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), death_signal.value))


def test_tokenizing_workers_leave_signals_to_the_parent_and_end_with_it():
    old = signal.signal(signal.SIGTERM, lambda *a: None)  # the parent's own handler, as finetune.main installs one
    try:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        helper = context.Process(target=report_helper_state, args=(queue,))
        helper.start()
        assert queue.get(timeout=30) == (signal.SIG_DFL, signal.SIG_IGN, signal.SIGKILL)
        helper.join()
    finally:
        signal.signal(signal.SIGTERM, old)


BUILD_AND_REPORT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import finetune, transformers
from tiny_qwen import qwen_tokenizer_dir
signal.signal(signal.SIGTERM, finetune.stop_before_training)
tokenizer = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
encoder = finetune.ChatEncoder(tokenizer, 128, None, "chatml")
finetune.build_tokenized({path!r}, "jsonl", encoder, {folder!r}, 2, 50)
print("BUILT", flush=True)
"""


@pytest.mark.parametrize("kill", ["a worker", "the group"])
def test_a_build_whose_workers_are_killed_ends_in_one_line_and_leaves_nothing_running(big_file, tmp_path, kill):
    import subprocess

    script = BUILD_AND_REPORT.format(root=ROOT, path=big_file, folder=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", script], cwd=os.path.join(ROOT, "examples"), env=CHILD_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("input_ids.part1")) and time.time() < deadline:  # both workers are at work
        time.sleep(0.05)
    workers = [int(line.split()[0]) for line in subprocess.run(["ps", "-o", "pid=", "--ppid", str(process.pid)],
                                                               capture_output=True, text=True).stdout.splitlines()]
    assert len(workers) == 2
    if kill == "a worker":
        os.kill(workers[1], signal.SIGKILL)
    else:  # what a scheduler's scancel does: the whole process group
        os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    if kill == "a worker":
        assert process.returncode == 1 and "a tokenizing worker was killed by SIGKILL" in stderr, stderr[-2000:]
    else:
        assert process.returncode == 143 and stderr.count("stopped by SIGTERM") == 1, stderr[-2000:]
    assert "BUILT" not in stdout
    for pid in workers:  # no worker runs on
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_cache_folder_may_start_with_a_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = finetune.DataArguments(data_path=["d.jsonl"], data_cache_dir="~/tokens")
    assert args.data_cache_dir == str(tmp_path / "tokens")


@pytest.mark.parametrize("what", ["a file", "a link to nothing"])
def test_something_else_where_an_entry_belongs_is_removed_and_the_entry_built(tokenizer, tmp_path, what, caplog):
    path, cache = write_jsonl(tmp_path / "d.jsonl", SAMPLES[:20]), tmp_path / "cache"
    os.makedirs(cache)
    entry = cache / finetune.tokenized_cache_entry(path, make_encoder(tokenizer))
    if what == "a file":
        entry.write_text("partial copy")
    else:
        os.symlink(tmp_path / "nowhere", entry)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=str(cache))
    assert_same(dataset, finetune.SupervisedDataset(path, make_encoder(tokenizer)))
    assert entry.is_dir() and "was not a tokenized folder; removed" in caplog.text


def test_an_edit_that_keeps_the_size_and_date_is_still_noticed_once(tokenizer, tmp_path, monkeypatch, caplog):
    path, cache = write_jsonl(tmp_path / "d.jsonl", SAMPLES[:20]), str(tmp_path / "cache")
    build, builds = finetune.build_tokenized, []

    def edited_in_place_once(*args):
        builds.append(1)
        result = build(*args)
        if len(builds) == 1:  # one byte changed, the date put back: only the ctime and the bytes say so
            stat = os.stat(path)
            text = open(path).read()
            open(path, "w").write(text.replace("Answer 1:", "Answer 2:", 1))
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return result

    monkeypatch.setattr(finetune, "build_tokenized", edited_in_place_once)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=cache)
    assert len(builds) == 2 and caplog.text.count("changed while it was being tokenized") == 1


def test_a_relative_xdg_cache_home_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert finetune.default_cache_dir() == str(tmp_path / ".cache" / "qwen-finetune" / "tokenized")


def test_an_unwritable_cache_folder_tokenizes_without_the_cache(tokenizer, tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    (tmp_path / "a_file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        dataset = finetune.SupervisedDataset(path, make_encoder(tokenizer), cache_dir=str(tmp_path / "a_file" / "c"))
    assert len(dataset) == 1 and "--data_cache_dir" in caplog.text and "tokenizing without a cache" in caplog.text
