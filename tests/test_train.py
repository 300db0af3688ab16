"""Stream training on tiny model folders: the loss rows of a batch, the loss against a
per-example reference, frozen hidden states, lossless and task runs end to end (output
folders load, greedy speculative == plain, the base stays exact in lossless mode),
resuming from a checkpoint, bad input, and the `specstream train` command."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model
from mlx.utils import tree_flatten
from tiny_folder import make_tiny_folder

from specstream_mlx import load
from specstream_mlx.checkpoint import CONFIG_KEY, STREAMS_FILE, init_streams
from specstream_mlx.cli import main
from specstream_mlx.decoding.step import budget_drafter, generate_step
from specstream_mlx.errors import InputError
from specstream_mlx.jsonl import write_jsonl
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.training.batch import build_draft_vocab, make_batch, vocab_lookup
from specstream_mlx.training.data import Example, load_examples
from specstream_mlx.training.hidden import Sample, frozen_hidden, hidden_key
from specstream_mlx.training.train import TrainArgs, evaluate, losses, train

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def counting_records(n: int, seed: int) -> list[dict]:
    """Learnable data: each completion counts up the alphabet from a random letter, so
    token t+1+j follows from token t."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        i = rng.randrange(26)
        run = "".join(LETTERS[(i + k) % 26] for k in range(rng.randint(10, 16)))
        records.append({"prompt": f"count from {LETTERS[i]}", "completion": run})
    return records


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A base folder (no streams) and train / valid JSONL files."""
    root = tmp_path_factory.mktemp("train")
    folder, model = make_tiny_folder(root / "base")
    write_jsonl(root / "train.jsonl", counting_records(48, seed=0))
    write_jsonl(root / "valid.jsonl", counting_records(8, seed=1))
    return root, folder, model


def small_args(root, folder, run: str, **overrides) -> TrainArgs:
    settings = dict(data=str(root / "train.jsonl"), valid=str(root / "valid.jsonl"),
                    model=str(folder), run_dir=str(root / run), num_streams=2, msa_layers=2,
                    adapter_rank=4, lr=1e-2, warmup=2, epochs=4,
                    batch_size=8, max_length=96, steps_per_report=4, steps_per_eval=8,
                    steps_per_checkpoint=100)
    return TrainArgs(**{**settings, **overrides})


def run_train(args: TrainArgs) -> tuple[dict, list[str]]:
    logs: list[str] = []
    with pytest.warns(UserWarning, match="no speculative streams"):
        result = train(args, log=logs.append)
    return result, logs


def validations(logs: list[str]) -> list[dict]:
    return [ast.literal_eval(line.split("validation: ", 1)[1])
            for line in logs if "validation: " in line]


def greedy(model, prompt: list[int], speculative: bool, max_tokens: int = 24) -> list[int]:
    return [e.token for e in generate_step(model, prompt, max_tokens=max_tokens,
                                           speculative=speculative)]


def prompt_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                              add_generation_prompt=True))


# --- batch arithmetic -----------------------------------------------------------------


def test_make_batch_rows_and_targets():
    H = 4
    s0 = Sample(np.arange(10, 17), 4, mx.random.normal((7, H)))  # prompt 10..13
    s1 = Sample(np.arange(20, 25), 2, mx.random.normal((5, H)))  # prompt 20, 21
    batch = make_batch([s0, s1], gamma=2)
    T = 32  # padded to a multiple of 32
    assert batch.hidden.shape == (2, T, H)
    assert np.array_equal(np.array(batch.hidden[0, :7]), np.array(s0.hidden))
    assert np.array_equal(np.array(batch.hidden[1, :5]), np.array(s1.hidden))
    assert not np.array(batch.hidden[0, 7:]).any() and not np.array(batch.hidden[1, 5:]).any()
    assert batch.positions.tolist() == list(range(T))
    # Rows carrying streams start at the earliest last-prompt token (s1: t = 1).
    first = 1
    assert batch.stream_rows.tolist() == list(range(first, T - 1))
    S = T - 1 - first
    # Main rows: t = start-1 .. n-2 (the last prompt token predicts the first completion token).
    assert batch.main_index.tolist() == [3, 4, 5, T + 1, T + 2, T + 3]
    assert batch.main_target.tolist() == [14, 15, 16, 22, 23, 24]
    # Stream j at row t targets t+1+j, only inside the sequence.
    want = [  # (b, t, j, target)
        (0, 3, 1, 15), (0, 3, 2, 16), (0, 4, 1, 16),
        (1, 1, 1, 23), (1, 1, 2, 24), (1, 2, 1, 24),
    ]
    assert batch.stream_index.tolist() == [(b * S + t - first) * 2 + j - 1
                                           for b, t, j, _ in want]
    assert batch.stream_target.tolist() == [y for *_, y in want]
    assert batch.stream_id.tolist() == [j - 1 for _, _, j, _ in want]
    assert batch.tokens == 3 + 3  # completion tokens
    # Conditioned streams are given the token after their row (0 past a sample's end).
    nxt = np.array(batch.stream_next)
    assert nxt.shape == (2, S)
    assert nxt[0, : 6 - first].tolist() == list(range(11 + first, 17)) and not nxt[0, 6:].any()
    assert nxt[1, : 4 - first].tolist() == list(range(21 + first, 25)) and not nxt[1, 4:].any()
    # The first completion token is a target of main only: streams start one later.
    assert 14 not in batch.stream_target.tolist() and 22 not in batch.stream_target.tolist()


def test_make_batch_per_sample_rows_cover_each_completion_only():
    H = 4
    s0 = Sample(np.arange(10, 17), 4, mx.random.normal((7, H)))  # rows 3, 4 have targets
    s1 = Sample(np.arange(20, 26), 2, mx.random.normal((6, H)))  # rows 1, 2, 3
    shared = make_batch([s0, s1], gamma=2)
    batch = make_batch([s0, s1], gamma=2, per_sample=True)
    # Each sample's own rows t = start-1 .. n-3; the shorter repeats its last row.
    assert batch.stream_rows.tolist() == [[3, 4, 4], [1, 2, 3]]
    assert batch.stream_next.tolist() == [[14, 15, 15], [22, 23, 24]]
    S = 3
    want = [(0, 0, 1, 15), (0, 0, 2, 16), (0, 1, 1, 16),
            (1, 0, 1, 23), (1, 0, 2, 24), (1, 1, 1, 24), (1, 1, 2, 25), (1, 2, 1, 25)]
    assert batch.stream_index.tolist() == [(b * S + s) * 2 + j - 1 for b, s, j, _ in want]
    assert batch.stream_target.tolist() == [y for *_, y in want]
    # Same main rows, same targets in the same order as the shared layout.
    for name in ("main_index", "main_target", "stream_target"):
        assert getattr(batch, name).tolist() == getattr(shared, name).tolist(), name
    assert batch.stream_id.tolist() == shared.stream_id.tolist()


def test_make_batch_single_sample_first_row():
    s = Sample(np.arange(40, 50), 6, mx.zeros((10, 3)))
    batch = make_batch([s], gamma=3)
    assert batch.stream_rows[0].item() == 5
    assert batch.main_index.tolist() == list(range(5, 9))
    assert batch.main_target.tolist() == list(range(46, 50))
    assert batch.stream_target.tolist() == [47, 48, 49, 48, 49, 49]
    assert batch.stream_id.tolist() == [0, 1, 2, 0, 1, 0]


def test_build_draft_vocab_takes_the_most_frequent_then_the_lowest_ids():
    examples = [Example([9, 9, 9, 4, 4, 7], 2), Example([7, 9, 50], 1)]
    # counts: 9 x4, 7 x2, 4 x2, 50 x1; ties and the fill keep ascending ids.
    assert build_draft_vocab(examples, 3, 100).tolist() == [4, 7, 9]
    assert build_draft_vocab(examples, 6, 100).tolist() == [0, 1, 4, 7, 9, 50]
    assert build_draft_vocab(examples, 500, 100).tolist() == list(range(100))
    lookup = vocab_lookup(np.array([4, 7, 9]), 12)
    assert lookup.tolist() == [-1, -1, -1, -1, 0, -1, -1, 1, -1, 2, -1, -1]


def test_make_batch_maps_targets_into_the_draft_vocab_and_counts_misses():
    s = Sample(np.array([1, 2, 3, 10, 11, 12, 13, 14]), 3, mx.zeros((8, 3)))
    lookup = vocab_lookup(np.array([1, 2, 3, 11, 13]), 20)
    batch = make_batch([s], gamma=2, lookup=lookup)
    # main rows t = 2..6 predict 10, 11, 12, 13, 14 (all kept: main uses the full head)
    assert batch.main_target.tolist() == [10, 11, 12, 13, 14]
    # stream j at t targets t+1+j: (2,1)->11 (2,2)->12x (3,1)->12x (3,2)->13 (4,1)->13
    # (4,2)->14x (5,1)->14x (x: outside, missed); row (t - first) * gamma + j - 1, first 2
    assert batch.stream_index.tolist() == [0, 3, 4]
    assert batch.stream_target.tolist() == [3, 4, 4]
    assert batch.stream_id.tolist() == [0, 1, 0]
    assert batch.stream_missed.tolist() == [2, 2]


def test_losses_over_a_draft_vocab_match_a_restricted_reference():
    model = tiny_model("llama", seed=6, streams=StreamArgs(num_streams=2, msa_layers=2,
                                                           draft_vocab_size=30))
    ids = np.arange(3, 97, 3)[:30].astype(np.int32)
    model.streams.draft_vocab = mx.array(ids)
    rng = np.random.default_rng(2)
    examples = [Example(rng.integers(3, 97, n).tolist(), start) for n, start in [(14, 4), (9, 3)]]
    samples = frozen_hidden(model, examples)
    lookup = vocab_lookup(ids, 97)
    _, (_, per_stream, hits) = losses(model, make_batch(samples, 2, lookup), 0.0, 1.0)
    stream, hit = [[], []], [[], []]
    for ex in examples:
        tok, n = ex.tokens, len(ex.tokens)
        _, hs = model.upper(model.lower(mx.array([tok]), mx.arange(n)), mx.arange(n),
                            stream_rows=mx.arange(n, dtype=mx.int32))
        logits = np.array(model.head(hs))[..., ids]  # full head, restricted afterwards
        lse = lambda x: np.log(np.exp(x - x.max()).sum()) + x.max()  # noqa: E731
        for t in range(ex.completion_start - 1, n - 1):
            for j in (1, 2):
                if t + 1 + j < n and lookup[tok[t + 1 + j]] >= 0:
                    row, y = logits[0, t, j - 1], lookup[tok[t + 1 + j]]
                    stream[j - 1].append(lse(row) - row[y])
                    hit[j - 1].append(int(np.argmax(row) == y))
    assert all(stream)  # the example hits the vocabulary
    np.testing.assert_allclose(np.array(per_stream), [np.mean(x) for x in stream], rtol=1e-4)
    assert sum(np.array(hits).tolist()) == sum(map(sum, hit))


def test_losses_match_a_per_example_reference():
    streams = StreamArgs(num_streams=2, msa_layers=2, adapter_rank=3)
    model = tiny_model("qwen2", seed=4, streams=streams)
    live_adapters(model)  # non-zero stream adapters, so every part takes part
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(3, 97, n).tolist(), start)
                for n, start in [(12, 5), (7, 2), (20, 15)]]
    samples = frozen_hidden(model, examples)
    loss, (main_ce, per_stream, hits) = losses(model, make_batch(samples, 2), 1.0, 0.5)

    def ce(logits, target):
        return float(mx.logsumexp(logits) - logits[target])

    main, stream, hit = [], [[], []], [[], []]
    for ex in examples:
        tok, n = ex.tokens, len(ex.tokens)
        logits, slogits = model(mx.array([tok]), stream_rows=mx.arange(n, dtype=mx.int32))
        for t in range(ex.completion_start - 1, n - 1):
            main.append(ce(logits[0, t], tok[t + 1]))
            for j in (1, 2):
                if t + 1 + j < n:
                    stream[j - 1].append(ce(slogits[0, t, j - 1], tok[t + 1 + j]))
                    hit[j - 1].append(mx.argmax(slogits[0, t, j - 1]).item() == tok[t + 1 + j])
    np.testing.assert_allclose(main_ce.item(), np.mean(main), rtol=1e-4)
    np.testing.assert_allclose(np.array(per_stream), [np.mean(s) for s in stream], rtol=1e-4)
    want = np.mean(main) + 0.5 * sum(np.mean(s) for s in stream)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-4)
    assert sum(np.array(hits).tolist()) == sum(map(sum, hit))
    # Main weight 0 (lossless default) drops the main term.
    loss0, _ = losses(model, make_batch(samples, 2), 0.0, 0.5)
    np.testing.assert_allclose(loss0.item(), want - np.mean(main), rtol=1e-4)


@pytest.mark.parametrize("per_sample", [False, True])
def test_soft_targets_match_a_per_example_reference(per_sample):
    """Soft targets: each stream target's CE mixes the data token's CE with the CE to the
    base model's own distribution (over the draft vocabulary) at the row that predicts
    that token; stream_source points at that row."""
    model = tiny_model("llama", seed=6, streams=StreamArgs(num_streams=2, msa_layers=2,
                                                           adapter_rank=3,
                                                           draft_vocab_size=30))
    ids = np.arange(3, 97, 3)[:30].astype(np.int32)
    model.streams.draft_vocab = mx.array(ids)
    live_adapters(model)
    rng = np.random.default_rng(3)
    examples = [Example(rng.choice(ids, n).tolist(), start) for n, start in [(14, 4), (9, 3)]]
    samples = frozen_hidden(model, examples)
    lookup = vocab_lookup(ids, 97)
    batch = make_batch(samples, 2, lookup, per_sample)
    T = batch.hidden.shape[1]
    src = np.array(batch.stream_source)
    flat = np.concatenate([np.pad(np.array(e.tokens), (0, T - len(e.tokens)))
                           for e in examples])
    np.testing.assert_array_equal(lookup[flat[src + 1]], np.array(batch.stream_target))
    w = 0.7
    _, (_, per_stream, _) = losses(model, batch, 0.0, 1.0, True, soft_targets=w)
    stream = [[], []]
    lse = lambda x: np.log(np.exp(x - x.max()).sum()) + x.max()  # noqa: E731
    for ex in examples:
        tok, n = ex.tokens, len(ex.tokens)
        logits, slogits = model(mx.array([tok]), stream_rows=mx.arange(n, dtype=mx.int32))
        main = np.array(logits[0], dtype=np.float64)[:, ids]
        streams = np.array(slogits[0], dtype=np.float64)[..., ids]
        for t in range(ex.completion_start - 1, n - 1):
            for j in (1, 2):
                if t + 1 + j < n:
                    row = streams[t, j - 1]
                    logq = row - lse(row)
                    p = np.exp(main[t + j] - lse(main[t + j]))
                    hard = -logq[lookup[tok[t + 1 + j]]]
                    stream[j - 1].append((1 - w) * hard - w * (p * logq).sum())
    np.testing.assert_allclose(np.array(per_stream), [np.mean(x) for x in stream], rtol=1e-4)
    with pytest.raises(ValueError, match="soft targets"):
        losses(model, make_batch(samples, 2, lookup), 1.0, 1.0, False, soft_targets=w)


def test_soft_targets_settings_are_checked(workdir):
    root, folder, _ = workdir
    with pytest.raises(InputError, match="--soft-targets must be in 0 .. 1"):
        small_args(root, folder, "s", soft_targets=1.5).validate()
    with pytest.raises(InputError, match="--soft-targets needs the frozen base model"):
        small_args(root, folder, "s", soft_targets=0.5, mode="task").validate()


def test_soft_target_run_learns(workdir):
    """A lossless run with --soft-targets 0.5 lowers the (hard) validation loss and
    raises top-1, as the default run does."""
    root, folder, _ = workdir
    args = small_args(root, folder, "soft", soft_targets=0.5)
    _, logs = run_train(args)
    evals = validations(logs)
    before = untrained(root, small_args(root, folder, "unused"))
    assert evals[-1]["valid_loss"] < 0.5 * before["valid_loss"]
    assert np.mean(evals[-1]["valid_top1"]) > np.mean(before["valid_top1"]) + 0.3


def live_adapters(model) -> None:
    """Non-zero stream-only adapters (they start at zero), so they take part."""
    for adapter in model.streams.adapters:
        for name, value in list(adapter.parameters().items()):
            if name.endswith("_b"):
                setattr(adapter, name, mx.random.normal(value.shape) * 0.1)


def assert_frozen_path_equals_the_full_pass(arch: str, seed: int, full_batch,
                                            frozen_batch, next_token_rank: int = 0) -> None:
    """Loss, per-stream CE, hits and every trainable gradient of the frozen-main path
    (upper_streams) on the batch `frozen_batch(model)` equal the full MSA pass's on
    `full_batch(model)`."""
    import mlx.nn as nn

    streams = StreamArgs(num_streams=3, msa_layers=2, adapter_rank=3,
                         next_token_rank=next_token_rank)
    model = tiny_model(arch, seed=seed, streams=streams)
    live_adapters(model)
    model.freeze()
    model.streams.unfreeze()
    results = []
    for frozen, batch in ((False, full_batch(model)), (True, frozen_batch(model))):
        fn = nn.value_and_grad(model, lambda m, b, f=frozen: losses(m, b, 0.0, 0.3, f))
        (loss, (_, per_stream, hits)), grads = fn(model, batch)
        results.append((loss, per_stream, hits, dict(tree_flatten(grads))))
    (l0, s0, h0, g0), (l1, s1, h1, g1) = results
    np.testing.assert_allclose(l1.item(), l0.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(s1), np.array(s0), rtol=1e-5)
    assert np.array(h1).tolist() == np.array(h0).tolist()
    assert g1.keys() == g0.keys() and len(g0) > 5
    for name, grad in g0.items():
        np.testing.assert_allclose(np.array(g1[name]), np.array(grad), rtol=1e-3, atol=1e-6,
                                   err_msg=name)


def random_samples(model, seed: int, sizes: list[tuple[int, int]]) -> list[Sample]:
    """Frozen hidden states of random token sequences of (length, completion start)."""
    rng = np.random.default_rng(seed)
    return frozen_hidden(model, [Example(rng.integers(3, 97, n).tolist(), start)
                                 for n, start in sizes])


def test_frozen_main_path_gives_the_same_loss_and_gradients(arch):
    """upper_streams (main rows forward once, stream rows over their cached K/V) equals
    the full MSA pass in loss and in every trainable gradient."""
    def batch(model):
        return make_batch(random_samples(model, 1, [(14, 6), (9, 3), (22, 12)]), 3)

    assert_frozen_path_equals_the_full_pass(arch, 6, batch, batch)


@pytest.mark.parametrize("per_sample", [False, True])
def test_conditioned_streams_frozen_path_equals_the_full_pass(per_sample):
    """With streams conditioned on the next token, the frozen-main path (shared or
    per-sample rows) gives the full MSA pass's loss, hits and gradients, the next-token
    projection's included."""
    sizes = [(14, 6), (9, 3), (22, 12)]
    assert_frozen_path_equals_the_full_pass(
        "qwen3", 8, lambda model: make_batch(random_samples(model, 3, sizes), 3),
        lambda model: make_batch(random_samples(model, 3, sizes), 3, per_sample=per_sample),
        next_token_rank=4)


@pytest.mark.parametrize("per_sample", [False, True])
def test_grouped_stream_rows_give_the_full_pass_loss_and_gradients(arch, per_sample,
                                                                  monkeypatch):
    """Stream rows attending group by group (kernels.grouped_attention, forced here for
    every stream-only pass), in the shared or the per-sample row layout, give the loss,
    hits and gradients of the full MSA pass under one mask."""
    from specstream_mlx.models import decoder

    monkeypatch.setattr(decoder, "GROUPED_ROWS", 0)
    sizes = [(14, 6), (9, 3), (22, 12), (3, 2)]
    assert_frozen_path_equals_the_full_pass(
        arch, 7, lambda model: make_batch(random_samples(model, 2, sizes), 3),
        lambda model: make_batch(random_samples(model, 2, sizes), 3, per_sample=per_sample))


def test_per_sample_rows_need_the_frozen_main_path():
    model = tiny_model("llama", seed=8, streams=StreamArgs(num_streams=2, msa_layers=2))
    samples = frozen_hidden(model, [Example(list(range(3, 15)), 5)])
    with pytest.raises(ValueError, match="frozen-main"):
        losses(model, make_batch(samples, 2, per_sample=True), 1.0, 0.3, True)


@pytest.mark.parametrize("batch_tokens", [4096, 20, 1])
def test_frozen_hidden_equals_lower_on_each_example_alone(batch_tokens):
    model = tiny_model("llama", seed=5, streams=StreamArgs(num_streams=2, msa_layers=2))
    rng = np.random.default_rng(1)
    examples = [Example(rng.integers(3, 97, n).tolist(), max(1, n // 2))
                for n in (9, 3, 17, 9, 5)]
    samples = frozen_hidden(model, examples, batch_tokens=batch_tokens)
    assert len(samples) == len(examples)
    for ex, s in zip(examples, samples, strict=True):
        assert s.tokens.tolist() == ex.tokens and s.start == ex.completion_start
        alone = model.lower(mx.array([ex.tokens]), mx.arange(len(ex.tokens), dtype=mx.int32))
        assert s.hidden.shape == (len(ex.tokens), 64)
        np.testing.assert_allclose(np.array(s.hidden), np.array(alone[0]), rtol=1e-5, atol=1e-4)


# --- end-to-end runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lossless_run(workdir):
    root, folder, _ = workdir
    return run_train(small_args(root, folder, "lossless"))


@pytest.fixture(scope="module")
def task_run(workdir):
    root, folder, _ = workdir
    return run_train(small_args(root, folder, "task", mode="task"))


def untrained(root, args: TrainArgs) -> dict:
    """Validation metrics of freshly initialised streams, as training starts from."""
    with pytest.warns(UserWarning):
        model, tokenizer = load(args.model, precision="float32")
    init_streams(model, StreamArgs(num_streams=args.num_streams, msa_layers=args.msa_layers,
                                   adapter_rank=args.adapter_rank), seed=args.seed)
    valid = frozen_hidden(model, load_examples(args.valid, tokenizer, args.max_length))
    return evaluate(model, valid, args)


def test_lossless_validation_loss_decreases(workdir, lossless_run):
    root, folder, _ = workdir
    result, logs = lossless_run
    evals = validations(logs)
    assert len(evals) == 3  # 48 examples / 8 per batch * 4 epochs = 24 steps, every 8
    assert result["valid_loss"] == evals[-1]["valid_loss"]
    before = untrained(root, small_args(root, folder, "unused"))
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"] < before["valid_loss"]
    assert evals[-1]["valid_loss"] < 0.5 * before["valid_loss"]
    assert np.mean(evals[-1]["valid_top1"]) > np.mean(before["valid_top1"]) + 0.3
    assert any(line.startswith("step 24/24 loss") for line in logs)


def test_lossless_output_keeps_the_base_model_exact(workdir, lossless_run):
    root, folder, base = workdir
    out = root / "lossless" / "model"
    assert lossless_run[0]["output"] == str(out)
    # Base weights and tokenizer are the input's; config.json only gains the stream block.
    for f in folder.iterdir():
        if f.name != "config.json":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    config = json.loads((out / "config.json").read_text())
    stream_block = config.pop("speculative_streaming")
    assert config == json.loads((folder / "config.json").read_text())
    assert stream_block["num_streams"] == 2 and stream_block["msa_layers"] == 2
    assert stream_block["adapter_rank"] == 4
    assert not {"pruning_rank", "main_sees_streams"} & set(stream_block)  # removed fields

    model, tokenizer = load(out)
    assert model.stream_args.num_streams == 2
    # The streams were trained: stream-only adapters start at zero.
    assert any(np.abs(np.array(a.q_proj_b)).max() > 0 for a in model.streams.adapters)
    # The checkpoint's trainable parameters are what the folder holds.
    saved = mx.load(str(root / "lossless" / "checkpoint" / "trainable.safetensors"))
    on_disk = mx.load(str(out / STREAMS_FILE))
    assert sorted(saved) == sorted(on_disk)
    # Training keeps P at unit scale times embedding_scale; the file stores the product.
    state = json.loads((root / "lossless" / "checkpoint" / "state.json").read_text())
    saved["streams.embeddings"] = saved["streams.embeddings"] * state["embedding_scale"]
    for k in saved:
        assert np.array_equal(np.array(saved[k]), np.array(on_disk[k])), k
    # Main logits are the base model's, with stream rows attached or not.
    tokens = mx.array([prompt_ids(tokenizer, "count from c") + [5, 6, 7]])
    n = tokens.shape[1]
    want, _ = base(tokens)
    got, streams = model(tokens, stream_rows=mx.arange(n, dtype=mx.int32))
    assert streams is not None
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
    for text in ["count from c", "count from x", "hello"]:
        ids = prompt_ids(tokenizer, text)
        assert greedy(model, ids, True) == greedy(model, ids, False) == greedy(base, ids, False)


def test_progress_lines_show_loss_top1_and_tokens_per_second(lossless_run):
    _, logs = lossless_run
    lines = [line for line in logs if line.startswith("step ") and "tokens/s" in line]
    assert len(lines) == 6  # 24 steps, a line every 4
    for line in lines:
        top1 = [float(x) for x in line.split("top-1 [", 1)[1].split("]", 1)[0].split()]
        assert len(top1) == 2 and all(0.0 <= x <= 1.0 for x in top1)
        assert float(line.split(" tokens/s")[0].rsplit(" ", 1)[1]) > 0
    # Counting data is learnable: stream 1's top-1 rises from the first window to the last.
    first, last = (float(x.split("top-1 [", 1)[1].split()[0]) for x in (lines[0], lines[-1]))
    assert last > first


def test_warm_start_continues_from_the_folders_streams(workdir, lossless_run):
    root, folder, _ = workdir
    trained = root / "lossless" / "model"
    args = small_args(root, folder, "warm", model=str(trained), warm_start=True, lr=1e-9,
                      epochs=0.2)
    logs: list[str] = []
    result = train(args, log=logs.append)
    assert any("warm start from the streams of" in line for line in logs)
    # Before its first update the run reports the loaded streams' validation.
    step0 = [line for line in logs if line.startswith("step 0 validation: ")]
    assert len(step0) == 1 and "valid_loss" in step0[0]
    metrics0 = ast.literal_eval(step0[0].removeprefix("step 0 validation: "))
    np.testing.assert_allclose(metrics0["valid_loss"], lossless_run[0]["valid_loss"], rtol=1e-3)
    # One step at a learning rate of 1e-7: the streams and their validation loss are the
    # trained ones (fresh streams would score like an untrained model).
    np.testing.assert_allclose(result["valid_loss"], lossless_run[0]["valid_loss"], rtol=1e-3)
    before = mx.load(str(trained / STREAMS_FILE))
    after = mx.load(str(Path(result["output"]) / STREAMS_FILE))
    assert sorted(before) == sorted(after)
    for k in before:
        np.testing.assert_allclose(np.array(after[k]), np.array(before[k]), atol=1e-4,
                                   err_msg=k)


def test_warm_start_adds_next_token_conditioning(workdir, lossless_run):
    """Warm-started streams without conditioning gain it: at step 0 they validate as
    loaded (the fresh projection adds zero); the run trains the projection, writes it
    (scaled like the embeddings) with next_token_rank in the config, and the folder
    decodes greedily as the base model, with its trace replaying generate_step."""
    from specstream_mlx.tools.tune import replay, trace

    root, folder, _ = workdir
    trained = root / "lossless" / "model"
    args = small_args(root, folder, "warm-cond", model=str(trained), warm_start=True,
                      next_token_rank=8, epochs=2)
    logs: list[str] = []
    result = train(args, log=logs.append)
    metrics0 = validations(logs)[0]
    np.testing.assert_allclose(metrics0["valid_loss"], lossless_run[0]["valid_loss"], rtol=1e-3)
    out = Path(result["output"])
    saved = mx.load(str(out / STREAMS_FILE))
    assert saved["streams.next_token_down"].shape == (8, 64)
    assert np.abs(np.array(saved["streams.next_token_up"])).max() > 0
    config = json.loads((out / "config.json").read_text())
    assert config[CONFIG_KEY]["next_token_rank"] == 8
    model, tokenizer = load(out)
    assert model.stream_args.conditioned
    prompt = prompt_ids(tokenizer, "count from c")
    plain = greedy(model, prompt, False)
    assert greedy(model, prompt, True) == plain
    events = list(generate_step(model, prompt, max_tokens=24, adaptive=False))
    tr = trace(model, prompt, plain, top_k=model.stream_args.top_k)
    rp = replay(tr, budget_drafter(model.stream_args.tree_budget))
    assert rp.passes == events[-1].passes - 1
    # A second warm start keeps the conditioning, and a different rank is refused.
    with pytest.raises(InputError, match="next_token_rank 8, this run asks for 4"):
        train(small_args(root, folder, "warm-cond-bad", model=str(out), warm_start=True,
                         next_token_rank=4), log=lambda _: None)


def test_warm_start_needs_matching_streams(workdir, lossless_run):
    root, folder, _ = workdir
    trained = str(root / "lossless" / "model")
    with pytest.raises(InputError, match="have num_streams 2, this run asks for 3"):
        train(small_args(root, folder, "warm-bad", model=trained, warm_start=True,
                         num_streams=3), log=lambda _: None)
    with pytest.raises(InputError, match="adapter_rank 4, this run asks for 8 .--adapter-rank"):
        train(small_args(root, folder, "warm-bad", model=trained, warm_start=True,
                         adapter_rank=8), log=lambda _: None)
    with pytest.raises(InputError, match="has no streams to start from"), \
            pytest.warns(UserWarning, match="no speculative streams"):
        train(small_args(root, folder, "warm-bad", warm_start=True), log=lambda _: None)


def test_draft_vocab_is_trained_saved_and_used(workdir):
    root, folder, _ = workdir
    args = small_args(root, folder, "draft-vocab", draft_vocab=40, epochs=1, valid=None)
    result, logs = run_train(args)
    assert any("the 40 most frequent training tokens" in line for line in logs)
    out = Path(result["output"])
    config = json.loads((out / "config.json").read_text())
    assert config["speculative_streaming"]["draft_vocab_size"] == 40
    ids = mx.load(str(out / STREAMS_FILE))["streams.draft_vocab"]
    assert ids.dtype == mx.int32 and ids.tolist() == sorted(set(ids.tolist()))
    model, tokenizer = load(out)
    assert model.streams.draft_vocab.tolist() == ids.tolist()
    for text in ["count from c", "hello"]:
        prompt = prompt_ids(tokenizer, text)
        events = list(generate_step(model, prompt, max_tokens=24))
        assert [e.token for e in events] == greedy(model, prompt, False)
        assert all(e.token in set(ids.tolist()) for e in events if e.from_draft)


def test_task_mode_fuses_and_changes_the_main_model(workdir, task_run):
    root, folder, base = workdir
    result, logs = task_run
    out = root / "task" / "model"
    assert result["output"] == str(out)
    evals = validations(logs)
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"]
    weights = mx.load(str(out / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or k.startswith("streams")]
    assert sorted(weights) == sorted(mx.load(str(folder / "model.safetensors")))
    config = json.loads((out / "config.json").read_text())
    assert config["speculative_streaming"]["adapter_rank"] == 0  # LoRA is fused instead
    # Layers below the stream layers are untouched; the top two changed.
    original = mx.load(str(folder / "model.safetensors"))
    for k, v in weights.items():
        same = np.array_equal(np.array(v), np.array(original[k]))
        if k.startswith("model.layers.") and "_proj" in k:
            assert same == (int(k.split(".")[2]) < 2), k
    model, tokenizer = load(out)
    assert "lora" not in json.dumps([k for k, _ in model.parameters().items()])
    tokens = mx.array([prompt_ids(tokenizer, "count from c")])
    got, _ = model(tokens)
    want, _ = base(tokens)
    assert np.abs(np.array(got) - np.array(want)).max() > 1e-2
    for text in ["count from c", "count from q", "hello"]:
        ids = prompt_ids(tokenizer, text)
        assert greedy(model, ids, True) == greedy(model, ids, False)


def test_resume_continues_at_the_saved_step(workdir):
    root, folder, _ = workdir
    common = dict(valid=None, data=str(root / "train.jsonl"), epochs=1, batch_size=8,
                  steps_per_report=1, steps_per_checkpoint=3)  # 6 steps
    straight, _ = run_train(small_args(root, folder, "straight", **common))

    class Stop(Exception):
        pass

    def crash_at_step_5(line: str) -> None:
        if line.startswith("step 5/"):  # after step 5, before its checkpoint (if any)
            raise Stop

    args = small_args(root, folder, "resumed", **common)
    with pytest.warns(UserWarning), pytest.raises(Stop):
        train(args, log=crash_at_step_5)
    ckpt = root / "resumed" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert not (root / "resumed" / "model").exists()
    # As a run saved while training had an early-exit (pruning) adapter: its tensors,
    # their optimizer moments and its settings are there too, and resuming ignores them.
    old = {"streams.pruning_down": mx.ones((4, 64)), "streams.pruning_up": mx.ones((64, 4))}
    trainable = mx.load(str(ckpt / "trainable.safetensors"))
    mx.save_safetensors(str(ckpt / "trainable.safetensors"), {**trainable, **old})
    moments = mx.load(str(ckpt / "optimizer.safetensors"))
    suffixes = [k.removeprefix("streams.embeddings") for k in moments
                if k.startswith("streams.embeddings.")]
    assert suffixes  # AdamW's moments
    mx.save_safetensors(str(ckpt / "optimizer.safetensors"),
                        {**moments, **{k + s: v for k, v in old.items() for s in suffixes}})
    state = json.loads((ckpt / "state.json").read_text())
    state["args"].update(pruning_rank=4, pruning_weight=0.1)
    (ckpt / "state.json").write_text(json.dumps(state))

    args.resume = True
    _, logs = run_train(args)
    assert "resumed at step 3" in logs
    assert any(line.startswith("frozen hidden states reused") for line in logs)
    steps = [int(line.split()[1].split("/")[0]) for line in logs if line.startswith("step ")]
    assert steps == [4, 5, 6]
    assert json.loads((ckpt / "state.json").read_text())["step"] == 6
    want = mx.load(str(root / "straight" / "checkpoint" / "trainable.safetensors"))
    got = mx.load(str(ckpt / "trainable.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), atol=1e-6, err_msg=k)
    opt_want = mx.load(str(root / "straight" / "checkpoint" / "optimizer.safetensors"))
    opt_got = mx.load(str(ckpt / "optimizer.safetensors"))
    assert opt_got["step"].item() == opt_want["step"].item() == 6


# --- bad input and the command line ---------------------------------------------------


def test_no_usable_examples(workdir, tmp_path):
    root, folder, _ = workdir
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"prompt": "only a prompt"}, {"messages": []}])
    with pytest.warns(UserWarning), pytest.raises(InputError, match="no usable examples"):
        train(small_args(root, folder, "bad", data=str(bad), valid=None), log=lambda _: None)


def test_bad_mode(workdir):
    root, folder, _ = workdir
    with pytest.raises(InputError, match="mode must be 'lossless' or 'task', got 'foo'"):
        train(small_args(root, folder, "foo", mode="foo"), log=lambda _: None)


def test_resume_without_checkpoint(workdir, tmp_path):
    root, folder, _ = workdir
    args = small_args(root, folder, "x", run_dir=str(tmp_path / "fresh"), resume=True,
                      valid=None)
    with pytest.warns(UserWarning), pytest.raises(InputError, match="no checkpoint to resume"):
        train(args, log=lambda _: None)


def test_cli_train(workdir, tmp_path, capsys):
    root, folder, _ = workdir
    data = tmp_path / "d.jsonl"
    write_jsonl(data, counting_records(8, seed=2))
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning):
        code = main(["train", "--data", str(data), "--model", str(folder),
                     "--run-dir", str(run_dir), "--epochs", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"streams written to {run_dir / 'model'}" in out
    assert "step 1/1 loss" in out
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["speculative_streaming"]["num_streams"] == TrainArgs.num_streams
    model, _ = load(run_dir / "model")
    assert model.stream_args.msa_layers == TrainArgs.msa_layers


def test_cli_train_bad_input(workdir, tmp_path, capsys):
    root, folder, _ = workdir
    code = main(["train", "--data", str(tmp_path / "missing.jsonl"), "--model", str(folder),
                 "--run-dir", str(tmp_path / "run"), "--mode", "foo"])
    assert code == 2
    assert "error: --mode must be" in capsys.readouterr().err


def test_hidden_key_follows_the_base_weights_not_the_folder(tmp_path):
    """A copy of the base (an earlier run's model folder) keeps the frozen-hidden cache;
    other weights, another split layer, other tokens or a touched file do not; the streams
    file does not count (the frozen states are the base's)."""
    folder = make_tiny_folder(tmp_path / "base")[0]
    examples = [Example(tokens=[1, 5, 6, 7], completion_start=2)]
    key = hidden_key(folder, 1, examples)
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))  # copy2 keeps the times
    assert hidden_key(copy, 1, examples) == key
    (copy / STREAMS_FILE).write_bytes(b"other streams")
    assert hidden_key(copy, 1, examples) == key
    assert hidden_key(copy, 2, examples) != key
    assert hidden_key(copy, 1, [Example(tokens=[1, 5, 6, 8], completion_start=2)]) != key
    assert hidden_key(copy, 1, [Example(tokens=[1, 5, 6, 7], completion_start=3)]) != key
    weights = sorted(f for f in copy.glob("*.safetensors") if f.name != STREAMS_FILE)[0]
    stamp = weights.stat().st_mtime_ns + 1_000_000_000
    os.utime(weights, ns=(stamp, stamp))
    assert hidden_key(copy, 1, examples) != key
