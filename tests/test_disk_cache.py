"""The prompt cache on disk: K/V of conversations kept in safetensors files across
restarts (a new store over the same folder), checked against the model, bounded in bytes
(least recently used out), written atomically; a file cut short or corrupted is skipped
with a log line, never loaded; answers after a restore equal a fresh prefill's."""

from __future__ import annotations

import logging
import os
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model

from specstream_mlx import stream_generate
from specstream_mlx.decoding.cache import KVCache, kv_bytes_per_token
from specstream_mlx.decoding.disk_cache import SUFFIX, DiskPromptStore, model_fingerprint
from specstream_mlx.decoding.prompt_cache import PromptCache
from specstream_mlx.errors import InputError
from specstream_mlx.loader import set_precision

LOG = "specstream.prompt_cache"


def run(loaded, ids, prompt_cache=None, **kw):
    model, tok = loaded
    out = list(stream_generate(model, tok, ids, max_tokens=kw.pop("max_tokens", 10),
                               prompt_cache=prompt_cache, **kw))
    return [r.token for r in out], out[-1]


def restart(loaded, folder, **kw) -> PromptCache:
    """A new process's view of the folder: a new store and an empty memory."""
    return PromptCache(loaded[0], disk=DiskPromptStore(folder, loaded[0], min_tokens=8, **kw))


def files(folder) -> list:
    return sorted(p for p in folder.iterdir() if p.suffix == SUFFIX)


def conversation(loaded, folder, text="tell me about the sea and the sky, please"):
    """One generation through a disk-backed cache, written; returns its prompt and
    answer tokens."""
    tok = loaded[1]
    pc = restart(loaded, folder)
    prompt = tok.encode(text)
    answer, _ = run(loaded, prompt, pc)
    pc.disk.flush()
    return prompt, answer


@pytest.mark.parametrize("speculative", [True, False], ids=["speculative", "plain"])
def test_a_restart_reuses_the_prefix_from_disk_with_the_same_answer(loaded, tmp_path,
                                                                    speculative):
    tok = loaded[1]
    prompt, answer = conversation(loaded, tmp_path)
    assert len(files(tmp_path)) == 1
    turn2 = prompt + answer + tok.encode(" and the wind?")
    pc = restart(loaded, tmp_path)
    got, last = run(loaded, turn2, pc, speculative=speculative)
    assert last.prompt_cached_tokens == len(prompt) + len(answer) - 1
    assert last.prompt_cache_source == "disk"
    assert got == run(loaded, turn2, speculative=speculative)[0]  # a fresh prefill's
    assert pc.disk_hits == 1 and pc.disk.loads == 1
    # The next turn comes from memory, and the disk keeps one file: turn 2's replaced 1's.
    turn3 = turn2 + got + tok.encode(" ok")
    _, last = run(loaded, turn3, pc)
    assert last.prompt_cache_source == "memory" and last.prompt_cached_tokens > len(turn2)
    pc.disk.flush()
    assert len(files(tmp_path)) == 1


def test_sampled_answers_after_a_restore_equal_a_fresh_prefills(loaded, tmp_path):
    tok = loaded[1]
    prompt, answer = conversation(loaded, tmp_path)
    turn2 = prompt + answer + tok.encode(" more")
    mx.random.seed(3)
    got, last = run(loaded, turn2, restart(loaded, tmp_path), temp=0.8)
    assert last.prompt_cache_source == "disk"
    mx.random.seed(3)
    assert got == run(loaded, turn2, temp=0.8)[0]


def test_a_truncated_file_is_skipped_with_a_log_line(loaded, tmp_path, caplog):
    tok = loaded[1]
    prompt, answer = conversation(loaded, tmp_path)
    (path,) = files(tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)  # a crash mid-copy
    with caplog.at_level(logging.WARNING, logger=LOG):
        pc = restart(loaded, tmp_path)
    assert any(path.name in r.message and "cut short" in r.message for r in caplog.records)
    assert len(pc.disk) == 0 and not path.exists()
    turn2 = prompt + answer + tok.encode(" next")
    got, last = run(loaded, turn2, pc)
    assert last.prompt_cached_tokens == 0 and got == run(loaded, turn2)[0]


def test_a_corrupted_file_fails_its_checksum_and_is_never_loaded(loaded, tmp_path, caplog):
    tok = loaded[1]
    prompt, answer = conversation(loaded, tmp_path)
    (path,) = files(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))
    pc = restart(loaded, tmp_path)
    assert len(pc.disk) == 1  # the scan reads headers only
    turn2 = prompt + answer + tok.encode(" next")
    with caplog.at_level(logging.WARNING, logger=LOG):
        got, last = run(loaded, turn2, pc)
    assert any("checksum" in r.message for r in caplog.records)
    assert last.prompt_cached_tokens == 0 and got == run(loaded, turn2)[0]
    assert not path.exists()


def test_another_models_file_is_skipped_with_a_log_line(loaded, tmp_path, caplog):
    prompt, _ = conversation(loaded, tmp_path)
    other = tiny_model("llama", seed=1)  # the same shapes, other weights
    with caplog.at_level(logging.WARNING, logger=LOG):
        store = DiskPromptStore(tmp_path, other, min_tokens=8)
    assert any("another model" in r.message for r in caplog.records)
    assert store.best(prompt) == (None, 0)
    assert len(files(tmp_path)) == 1  # kept for its own model, counted in the bound
    assert store.nbytes == files(tmp_path)[0].stat().st_size


def test_fingerprint_follows_weights_and_precision(loaded):
    model = loaded[0]
    assert model_fingerprint(model) == model_fingerprint(model)
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(model)
    set_precision(b, "float16")
    assert model_fingerprint(b) != model_fingerprint(a)


def test_fingerprint_is_the_base_models_whatever_its_streams(loaded, tmp_path):
    """Streams never change a committed token's K/V: retrained or retuned streams (or
    none) keep the files usable, and a prefix cached under one set is reused under
    another with the answer of a fresh prefill."""
    from specstream_mlx.models.config import StreamArgs

    plain = tiny_model("llama", seed=1)
    one = tiny_model("llama", seed=1, streams=StreamArgs(num_streams=3, msa_layers=2))
    mx.random.seed(7)
    two = tiny_model("llama", seed=1, streams=StreamArgs(num_streams=2, msa_layers=1,
                                                         next_token_rank=4))
    assert model_fingerprint(plain) == model_fingerprint(one) == model_fingerprint(two)
    assert model_fingerprint(tiny_model("llama", seed=2)) != model_fingerprint(plain)
    tok = loaded[1]
    ids = list(range(5, 45))
    first = PromptCache(one, disk=DiskPromptStore(tmp_path, one, min_tokens=8))
    list(stream_generate(one, tok, ids, max_tokens=6, prompt_cache=first))
    first.disk.flush()
    again = PromptCache(two, disk=DiskPromptStore(tmp_path, two, min_tokens=8))
    got = list(stream_generate(two, tok, ids + [50, 51], max_tokens=6, prompt_cache=again))
    fresh = list(stream_generate(two, tok, ids + [50, 51], max_tokens=6))
    assert got[-1].prompt_cached_tokens > 0
    assert [r.token for r in got] == [r.token for r in fresh]


def test_lru_by_bytes_and_the_order_survives_a_restart(loaded, tmp_path):
    tok = loaded[1]
    texts = [f"conversation number {i} about boats and rivers" for i in range(3)]
    conversation(loaded, tmp_path, texts[0])
    one = files(tmp_path)[0].stat().st_size
    conversation(loaded, tmp_path, texts[1])
    # Room for two files: the third write evicts the least recently used.
    pc = restart(loaded, tmp_path, max_bytes=2 * one + one // 2)
    time.sleep(0.01)
    run(loaded, tok.encode(texts[0]) + tok.encode("!"), pc)  # reads 0: now the freshest
    assert pc.disk_hits == 1
    pc.disk.flush()
    pc2 = restart(loaded, tmp_path, max_bytes=2 * one + one // 2)
    time.sleep(0.01)
    run(loaded, tok.encode(texts[2]), pc2)
    pc2.disk.flush()
    assert len(files(tmp_path)) == 2 and pc2.disk.nbytes <= 2 * one + one // 2
    kept = restart(loaded, tmp_path)
    assert kept.disk.best(tok.encode(texts[1]))[1] < len(tok.encode(texts[1]))  # evicted
    for text in (texts[0], texts[2]):
        assert kept.disk.best(tok.encode(text))[1] == len(tok.encode(text))


def test_small_and_oversized_entries_are_not_written(loaded, tmp_path):
    model, tok = loaded
    pc = PromptCache(model, disk=DiskPromptStore(tmp_path, model, min_tokens=64))
    run(loaded, tok.encode("short"), pc)
    pc.disk.flush()
    assert files(tmp_path) == []
    tiny = DiskPromptStore(tmp_path, model, max_bytes=kv_bytes_per_token(model) * 10,
                           min_tokens=1)
    pc = PromptCache(model, disk=tiny)
    run(loaded, tok.encode("a prompt longer than ten tokens"), pc)
    tiny.flush()
    assert files(tmp_path) == []


def test_writes_are_atomic(loaded, tmp_path, monkeypatch):
    """A write that fails before its rename leaves no file under a final name and no
    temporary file; a stale temporary file from a crash is never read."""
    model, tok = loaded
    store = DiskPromptStore(tmp_path, model, min_tokens=8)
    pc = PromptCache(model, disk=store)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    run(loaded, tok.encode("a conversation that will not be written"), pc)
    store.flush()
    assert list(tmp_path.iterdir()) == [] and len(store) == 0
    monkeypatch.undo()
    stale = tmp_path / ".0123.tmp-1-2"
    stale.write_bytes(b"half a file")
    assert len(DiskPromptStore(tmp_path, model)) == 0 and stale.exists()  # ignored, young
    os.utime(stale, (0, 0))
    DiskPromptStore(tmp_path, model)
    assert not stale.exists()  # an old one is cleaned up


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_half_precision_caches_round_trip(tmp_path, precision):
    model = tiny_model("qwen2", seed=2)
    set_precision(model, precision)
    cache = KVCache(len(model.layers))
    for i in range(len(model.layers)):
        k = mx.random.normal((1, 2, 40, 16)).astype(getattr(mx, precision))
        cache.write(i, k, k * 2)
    cache.offset = 40
    store = DiskPromptStore(tmp_path, model, min_tokens=8)
    assert store.save(list(range(40)), cache)
    store.flush()
    again = DiskPromptStore(tmp_path, model, min_tokens=8)
    entry, n = again.best(list(range(50)))
    assert n == 40
    loaded = again.load(entry)
    assert loaded.offset == 40
    for a, b in zip(cache.state(), loaded.state(), strict=True):
        assert a.dtype == b.dtype
        assert np.array_equal(np.array(a[..., :40, :].astype(mx.float32)),
                              np.array(b.astype(mx.float32)))


def test_bad_arguments(loaded, tmp_path):
    model = loaded[0]
    with pytest.raises(InputError, match="max_bytes"):
        DiskPromptStore(tmp_path, model, max_bytes=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="cannot create"):
        DiskPromptStore(tmp_path / "file" / "sub", model)
