"""Continuous batching with speculation on (decoding/batch.py): sequences that join at
different steps and leave early decode as they do alone (greedy token for token, sampled
with the same seeds), their caches equal plain decoding's, and the server with
max_batch 4 answers 4 concurrent clients as it answers them one at a time."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model
from test_decode import assert_cache_matches, perfect_drafter, plain, with_draft_vocab

from specstream_mlx.decoding.batch import BatchDecoder, BatchKVCache
from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.decoding.step import generate_step, last_accepted
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError
from specstream_mlx.models.config import StreamArgs

PROMPTS = [[3, 17, 42, 8, 91, 5], [5, 6, 7], list(range(1, 40)), [44, 55], [9] * 12]
STREAMS = StreamArgs(num_streams=3, msa_layers=2)


def tokens_of(events) -> list[int]:
    return [e.token for e in events]


def run_batch(decoder: BatchDecoder, requests: list[dict], joins: dict[int, list[int]],
              stop_after: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Drive `decoder`: request i (keyword arguments of add, "prompt" included) joins
    before step s for each i in joins[s], or once there is room; with stop_after[i] = k,
    request i leaves after k tokens (as a client that stops reading). Returns each
    request's tokens."""
    got: dict[int, list[int]] = {}
    index: dict[int, int] = {}
    stop_after = stop_after or {}
    step, waiting = 0, []
    while step <= max(joins) or decoder.active or waiting:
        waiting += joins.get(step, [])
        while waiting and len(decoder.active) < decoder.max_batch:
            i = waiting.pop(0)
            kwargs = dict(requests[i])
            seq, first = decoder.add(kwargs.pop("prompt"), **kwargs)
            index[id(seq)], got[i] = i, [first.token]
        for seq, events in decoder.step():
            i = index[id(seq)]
            got[i] += tokens_of(events)
            if i in stop_after and len(got[i]) >= stop_after[i] and seq.active:
                got[i] = got[i][: stop_after[i]]
                decoder.finish(seq, stop_after[i])
        step += 1
    return got


@pytest.mark.parametrize("arch,cond", [("llama", 0), ("qwen3", 0), ("qwen2", 2)])
def test_greedy_batched_equals_single(arch, cond):
    """Five prompts of different lengths joining at steps 0, 0, 2, 3 and 7 (more than the
    batch holds at first: the fifth waits for a place) give each its single-run answer."""
    sa = StreamArgs(num_streams=3, msa_layers=2, next_token_rank=cond)
    model = tiny_model(arch, seed=1, streams=sa)
    n = [24, 30, 16, 28, 20]
    want = [tokens_of(generate_step(model, p, max_tokens=k))
            for p, k in zip(PROMPTS, n, strict=True)]
    assert want[0] == plain(model, PROMPTS[0], n[0])
    decoder = BatchDecoder(model, max_batch=4)
    requests = [{"prompt": p, "max_tokens": k} for p, k in zip(PROMPTS, n, strict=True)]
    got = run_batch(decoder, requests, {0: [0, 1], 2: [2], 3: [3], 12: [4]})
    assert [got[i] for i in range(5)] == want
    assert not decoder.active and len(decoder.cache) == 0


@pytest.mark.parametrize("first", [True, False])
def test_perfect_drafts_batched(first):
    """Drafters holding the true continuation (with the accepted path contiguous or not
    in the flat tree) are accepted in the batch as alone: same tokens, fewer passes, and
    each cache left equal to plain decoding's."""
    model = tiny_model("llama", seed=0, streams=STREAMS)
    requests, want = [], []
    for p in PROMPTS[:3]:
        reference = p + plain(model, p, 40)
        want.append(reference[len(p): len(p) + 18])
        requests.append({"prompt": p, "max_tokens": 18,
                         "drafter": perfect_drafter(reference, 97, first=first)})
    requests.append({"prompt": PROMPTS[3], "max_tokens": 18})  # beside them: adaptive
    want.append(tokens_of(generate_step(model, PROMPTS[3], max_tokens=18)))
    decoder = BatchDecoder(model, max_batch=4)
    seqs, got = [], {}
    for i, r in enumerate(requests):
        kwargs = dict(r)
        seq, first_event = decoder.add(kwargs.pop("prompt"), **kwargs)
        seqs.append(seq)
        got[i] = [first_event.token]
    passes = {}
    while decoder.active:
        for seq, events in decoder.step():
            i = seqs.index(seq)
            got[i] += tokens_of(events)
            passes[i] = events[-1].passes
    assert [got[i] for i in range(4)] == want
    assert max(passes[i] for i in range(3)) <= 8  # about 4 tokens a pass
    for i, seq in enumerate(seqs):
        cache = decoder.finish(seq)
        assert_cache_matches(cache, model, requests[i]["prompt"] + got[i][:-1])


def test_sampling_batched_equals_single():
    """Sampled sequences (own seeds, temperatures) beside greedy ones draw the tokens their
    single runs draw with the same samplers."""
    model = tiny_model("llama", seed=2, streams=STREAMS)
    samplers = [PositionSampler(0.8, seed=1), None, PositionSampler(1.0, top_p=0.9, seed=7),
                PositionSampler(0.6, seed=3)]
    requests = [{"prompt": p, "max_tokens": 20, "sampler": s}
                for p, s in zip(PROMPTS[:4], samplers, strict=True)]
    want = [tokens_of(generate_step(model, r["prompt"], max_tokens=20, sampler=r["sampler"]))
            for r in requests]
    got = run_batch(BatchDecoder(model, max_batch=4), requests, {0: [0, 1], 1: [2], 4: [3]})
    assert [got[i] for i in range(4)] == want
    # and not the greedy answers: the seeds matter
    assert got[0] != tokens_of(generate_step(model, PROMPTS[0], max_tokens=20))


def test_shipped_layout_batched_equals_single():
    """Streams as shipped (conditioned on the next token, stream-only adapters, a draft
    vocabulary), greedy and sampled sequences together: as alone."""
    sa = StreamArgs(num_streams=3, msa_layers=2, next_token_rank=2, adapter_rank=4)
    model = tiny_model("qwen2", seed=5, streams=sa)
    with_draft_vocab(model, list(range(0, 97, 2)))
    samplers = [None, PositionSampler(0.7, seed=11), None, PositionSampler(0.9, seed=12)]
    requests = [{"prompt": p, "max_tokens": 22, "sampler": s}
                for p, s in zip(PROMPTS[:4], samplers, strict=True)]
    want = [tokens_of(generate_step(model, r["prompt"], max_tokens=22, sampler=r["sampler"]))
            for r in requests]
    got = run_batch(BatchDecoder(model, max_batch=3), requests, {0: [0, 1, 2], 3: [3]})
    assert [got[i] for i in range(4)] == want


def test_a_sequence_leaving_mid_batch():
    """A sequence that stops after 5 tokens leaves at once: its cache holds its prompt and
    the tokens it delivered but the last, and the others go on as alone."""
    model = tiny_model("llama", seed=0, streams=STREAMS)
    requests = [{"prompt": p, "max_tokens": 24} for p in PROMPTS[:3]]
    want = [tokens_of(generate_step(model, r["prompt"], max_tokens=24)) for r in requests]
    decoder = BatchDecoder(model, max_batch=3)
    got = run_batch(decoder, requests, {0: [0, 1, 2]}, stop_after={1: 5})
    assert got[0] == want[0] and got[2] == want[2]
    assert got[1] == want[1][:5]


def test_leaving_cache_matches_plain():
    model = tiny_model("qwen2", seed=0, streams=STREAMS)
    decoder = BatchDecoder(model, max_batch=2)
    a, first_a = decoder.add(PROMPTS[0], max_tokens=30)
    b, first_b = decoder.add(PROMPTS[1], max_tokens=30)
    out = {id(a): [first_a.token], id(b): [first_b.token]}
    for _ in range(3):
        for seq, events in decoder.step():
            out[id(seq)] += tokens_of(events)
    cache = decoder.finish(a, 4)  # the client read 4 tokens
    assert_cache_matches(cache, model, PROMPTS[0] + out[id(a)][:3])
    assert len(decoder.active) == 1 and len(decoder.cache) == 1
    while decoder.active:
        for seq, events in decoder.step():
            out[id(seq)] += tokens_of(events)
    assert out[id(b)] == tokens_of(generate_step(model, PROMPTS[1], max_tokens=30))


def test_reused_cache_and_first_token_only():
    """A prompt whose start is already in a cache (a PromptCache's) prefills the rest;
    max_tokens 1 ends at the prefill without joining."""
    model = tiny_model("llama", seed=0, streams=STREAMS)
    prompt = PROMPTS[2]
    cache = KVCache(len(model.layers))
    list(generate_step(model, prompt[:20], max_tokens=1, cache=cache))
    assert cache.offset == 20
    decoder = BatchDecoder(model, max_batch=2)
    seq, first = decoder.add(prompt, max_tokens=12, cache=cache)
    got = [first.token]
    while decoder.active:
        for _, events in decoder.step():
            got += tokens_of(events)
    assert got == tokens_of(generate_step(model, prompt, max_tokens=12))
    one, event = decoder.add(PROMPTS[0], max_tokens=1)
    assert event.final and not one.active and not decoder.active
    assert decoder.finish(one).offset == len(PROMPTS[0])


def test_full_batch_and_bad_input_refused():
    model = tiny_model("llama", seed=0, streams=STREAMS)
    decoder = BatchDecoder(model, max_batch=1)
    decoder.add(PROMPTS[0], max_tokens=5)
    with pytest.raises(InputError, match="full"):
        decoder.add(PROMPTS[1], max_tokens=5)
    with pytest.raises(InputError):
        BatchDecoder(model, max_batch=0)
    with pytest.raises(InputError):
        BatchDecoder(model, max_batch=2).add([1000], max_tokens=3)


def test_plain_and_speculative_sequences_together():
    """A sequence with speculation off and one with a model's streams share passes."""
    model = tiny_model("llama", seed=0, streams=STREAMS)
    requests = [{"prompt": PROMPTS[0], "max_tokens": 16, "speculative": False},
                {"prompt": PROMPTS[1], "max_tokens": 16, "adaptive": False}]
    got = run_batch(BatchDecoder(model, max_batch=2), requests, {0: [0, 1]})
    assert got[0] == plain(model, PROMPTS[0], 16)
    assert got[1] == plain(model, PROMPTS[1], 16)


def test_batch_cache_commit_moves_each_rows_path():
    """BatchKVCache: rows written at each sequence's own slots; commit keeps each path;
    a leave moves the last row into the freed one."""
    model = tiny_model("llama", seed=0)
    cache = BatchKVCache(model, 3)
    for length in (3, 5):
        c = KVCache(len(model.layers))
        c.write(0, mx.zeros((1, 2, length, 16)), mx.zeros((1, 2, length, 16)))
        for layer in range(1, len(model.layers)):
            c.write(layer, mx.zeros((1, 2, length, 16)), mx.zeros((1, 2, length, 16)))
        c.commit(range(length))
        cache.join(c)
    assert list(cache.lengths) == [3, 5]
    assert cache.begin(4) == 9
    k = mx.arange(2 * 2 * 4 * 16, dtype=mx.float32).reshape(2, 2, 4, 16) + 1
    for layer in range(len(model.layers)):
        keys, _ = cache.write(layer, k, k)
    assert keys.shape == (2, 2, 9, 16)
    cache.commit([[0, 2], [0, 1, 2]])
    assert list(cache.lengths) == [5, 8]
    got = np.array(cache.keys[0])
    np.testing.assert_array_equal(got[0, :, 3:5], np.array(k)[0][:, [0, 2]])
    np.testing.assert_array_equal(got[1, :, 5:8], np.array(k[1, :, :3]))
    before = np.array(cache.keys[0][1, :, :8])
    cache.leave(0)  # the last row moves into the freed one
    assert list(cache.lengths) == [8]
    np.testing.assert_array_equal(np.array(cache.keys[0][0, :, :8]), before)
    cache.leave(0)
    assert len(cache) == 0 and cache.capacity == 0


def test_last_accepted_of_a_batch_and_of_one_tree_agree_with_the_host():
    """step.last_accepted on the device, one tree or a padded batch, equals the last node
    of DraftTree.accept's path (the host's walk)."""
    rng = np.random.default_rng(0)
    trees = [DraftTree([5, 6, 7, 8], [0, 1, 0, 3]), DraftTree([1, 2], [0, 0]), DraftTree()]
    R = 5
    for _ in range(20):
        rows = []
        for t in trees:
            targets = rng.integers(0, 9, size=len(t)).tolist()
            targets[0] = t.tokens[0] if t.tokens and rng.random() < 0.7 else targets[0]
            rows.append(targets)
        want = [t.accept(tg)[0][-1] for t, tg in zip(trees, rows, strict=True)]
        one = [int(last_accepted(mx.array([0] + t.tokens), mx.array(tg),
                                 mx.array([0] + t.parents), mx.array(t.mask),
                                 mx.array(t.depths)).item())
               for t, tg in zip(trees, rows, strict=True)]
        assert one == want
        pad = lambda xs, fill=0: [list(x) + [fill] * (R - len(x)) for x in xs]  # noqa: E731
        mask = np.zeros((3, R, R), dtype=bool)
        for b, t in enumerate(trees):
            mask[b, : len(t), : len(t)] = t.mask
            mask[b, np.arange(len(t), R), np.arange(len(t), R)] = True
        got = last_accepted(
            mx.array(pad([[0] + t.tokens for t in trees])), mx.array(pad(rows)),
            mx.array(pad([[0] + t.parents for t in trees])), mx.array(mask),
            mx.array(pad([t.depths.tolist() for t in trees], -1)))
        assert got.tolist() == want


# --- the server ------------------------------------------------------------------------

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def servers(loaded):
    from test_serve import Server

    from specstream_mlx.serve.app import ServeConfig, create_app

    model, tok = loaded
    batched = Server(create_app(model, tok, ServeConfig(model_name="tiny", max_batch=4,
                                                        max_tokens_limit=64)))
    single = Server(create_app(model, tok, ServeConfig(model_name="tiny", max_batch=1,
                                                       max_tokens_limit=64)))
    yield batched, single
    batched.stop()
    single.stop()


def ask(url: str, i: int, stream: bool) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    kwargs = {"model": "tiny", "max_tokens": 24 + 4 * i,
              "messages": [{"role": "user", "content": f"prompt number {i}: " + "ab " * i}]}
    if i % 2:
        kwargs.update(temperature=0.8, seed=100 + i)
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in
                   client.chat.completions.create(stream=True, **kwargs) if c.choices)


def test_server_batches_concurrent_clients(servers):
    """4 concurrent streaming clients (2 greedy, 2 sampled with seeds) and 2 whole ones get
    the answers of one-at-a-time requests, and those of a server without batching; the
    requests did decode together."""
    batched, single = servers
    alone = [ask(batched.url, i, stream=True) for i in range(6)]
    assert alone == [ask(single.url, i, stream=True) for i in range(6)]
    got: dict[int, str] = {}

    def client(i):
        got[i] = ask(batched.url, i, stream=i < 4)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got.get(i) for i in range(6)] == alone
    import httpx

    metrics = httpx.get(batched.url + "/metrics").text
    sizes = [line for line in metrics.splitlines()
             if line.startswith("specstream_batch_size_bucket") and 'le="1.0"' in line]
    served = [line for line in metrics.splitlines()
              if line.startswith("specstream_batch_size_count")]
    assert sizes and served
    assert float(sizes[0].split()[-1]) < float(served[0].split()[-1])  # some ran beside others
    assert httpx.get(batched.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("rows", [1, 3])
def test_attention_under_a_batched_mask_equals_mlx(rows):
    """models.kernels.attention with a 4-D mask (B, 1, R, S) (the folded CPU path) equals
    MLX's kernel, a row that sees nothing (left padding) included."""
    from specstream_mlx.models.kernels import attention

    mx.random.seed(0)
    q = mx.random.normal((2, 4, rows, 16))
    k, v = mx.random.normal((2, 2, 7, 16)), mx.random.normal((2, 2, 7, 16))
    mask = mx.array(np.random.default_rng(0).random((2, 1, rows, 7)) < 0.6)
    mask[0, 0, 0] = False
    got = attention(q, k, v, 0.25, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
