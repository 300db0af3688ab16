"""Training batches: the draft vocabulary, padded batches with the gather indices of every
loss (main, stream j), and batches of similar length in random order."""

from __future__ import annotations

import random
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from specstream_mlx.training.data import Example
from specstream_mlx.training.hidden import Sample


def build_draft_vocab(examples: list[Example], size: int, vocab_size: int) -> np.ndarray:
    """The `size` token ids the streams will draft from: the most frequent tokens of the
    training examples (prompts included: completions copy from them), then the lowest
    unseen ids (BPE gives low ids to frequent merges). (size,) int32, ascending."""
    size = min(size, vocab_size)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for e in examples:
        np.add.at(counts, np.asarray(e.tokens), 1)
    # Stable sort: ties (e.g. unseen tokens) keep ascending id order.
    order = np.argsort(-counts, kind="stable")
    return np.sort(order[:size]).astype(np.int32)


def vocab_lookup(draft_vocab: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """Token id -> index in the draft vocabulary, -1 outside it: (vocab_size,)."""
    if draft_vocab is None:
        return np.arange(vocab_size, dtype=np.int64)
    lookup = np.full(vocab_size, -1, dtype=np.int64)
    lookup[draft_vocab] = np.arange(len(draft_vocab))
    return lookup


@dataclass
class Batch:
    """Padded samples: hidden (B, T, hidden), tokens (B, T), gather indices for the loss.

    stream_rows: the main rows that carry streams, (S,) shared by the batch (every row
    from the earliest completion on), or (B, S) each sample's own completion rows (the
    per-sample layout: padding and prompt rows carry no stream rows).
    Stream targets are indices into the draft vocabulary; targets outside it
    cannot be drafted, so they are left out of the loss and counted in `stream_missed`.
    """

    hidden: mx.array
    positions: mx.array
    stream_rows: mx.array
    main_index: mx.array  # (M,) flat (b, t) rows predicting their next token
    main_target: mx.array  # (M,) token ids
    stream_index: mx.array  # (K,) flat (b, s, j) stream rows with a draftable target
    stream_target: mx.array  # (K,) draft-vocabulary indices
    stream_source: mx.array  # (K,) flat (b, t + j) main row whose next token each targets
    stream_id: np.ndarray  # (K,) which stream each target belongs to
    stream_missed: np.ndarray  # (gamma,) targets per stream outside the draft vocab
    tokens: int  # completion tokens in the batch
    stream_next: mx.array | None = None  # (B, S) the token after each stream row's row


def make_batch(samples: list[Sample], gamma: int, lookup: np.ndarray | None = None,
               per_sample: bool = False) -> Batch:
    """Loss rows: position t predicts t+1 (main) and t+1+j (stream j), for targets
    inside the completion; t starts at the last prompt token, which drafts too.
    lookup: token id -> draft-vocabulary index or -1 (see `vocab_lookup`); None: the
    whole vocabulary. per_sample: stream rows (B, S) per sample, only the rows with a
    stream target (a shorter sample repeats its last row; those copies carry no loss)."""
    if lookup is None:
        lookup = vocab_lookup(None, max(int(s.tokens.max()) for s in samples) + 1)
    B = len(samples)
    T = -(-max(len(s.tokens) for s in samples) // 32) * 32  # few distinct shapes
    hidden = mx.zeros((B, T, samples[0].hidden.shape[-1]), dtype=samples[0].hidden.dtype)
    for b, s in enumerate(samples):
        hidden[b, : len(s.tokens)] = s.hidden
    if per_sample:
        # Row t has a stream target when t + 2 < n.
        own = [np.arange(max(0, s.start - 1), len(s.tokens) - 2) for s in samples]
        S = max(1, max(len(r) for r in own))
        rows = np.stack([np.pad(r, (0, S - len(r)), mode="edge") if len(r) else np.zeros(S)
                         for r in own]).astype(np.int64)
    else:
        first = max(0, min(s.start for s in samples) - 1)
        rows = np.arange(first, T - 1)
        S = len(rows)
    main_idx, main_tgt, st_idx, st_tgt, st_id, st_src = [], [], [], [], [], []
    missed = np.zeros(gamma, dtype=np.int64)
    for b, s in enumerate(samples):
        n = len(s.tokens)
        for t in range(max(0, s.start - 1), n - 1):
            main_idx.append(b * T + t)
            main_tgt.append(s.tokens[t + 1])
        for si, t in enumerate(own[b] if per_sample else rows):
            if t < s.start - 1 or t + 1 >= n:
                continue
            for j in range(1, gamma + 1):
                if t + 1 + j < n:
                    target = lookup[s.tokens[t + 1 + j]]
                    if target < 0:
                        missed[j - 1] += 1
                        continue
                    st_idx.append((b * S + si) * gamma + (j - 1))
                    st_tgt.append(target)
                    st_id.append(j - 1)
                    st_src.append(b * T + t + j)
    # The token after each stream row (what conditioned streams are given; 0 past the end,
    # where rows carry no loss).
    at = np.broadcast_to(rows, (B, S)) if rows.ndim == 1 else rows
    nxt = np.zeros((B, S), dtype=np.int32)
    for b, s in enumerate(samples):
        ok = at[b] + 1 < len(s.tokens)
        nxt[b, ok] = np.asarray(s.tokens)[at[b][ok] + 1]
    as_int = lambda x: mx.array(np.array(x, dtype=np.int32))  # noqa: E731
    return Batch(hidden, mx.arange(T, dtype=mx.int32), as_int(rows), as_int(main_idx),
                 as_int(main_tgt), as_int(st_idx),
                 as_int(st_tgt), as_int(st_src), np.array(st_id, dtype=np.int64), missed,
                 sum(len(s.tokens) - s.start for s in samples), mx.array(nxt))


def index_batches(sizes: list[tuple[int, int]], size: int, rng: random.Random,
                  by_completion: bool = False) -> list[list[int]]:
    """Batches of indices of examples of similar length (little padding), in random
    order; sizes: (tokens, completion start) of each example. by_completion: similar
    completion length (the per-sample layout's stream rows)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i][0] - by_completion * sizes[i][1]
                   + rng.random())
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    rng.shuffle(groups)
    return groups


def batches(samples: list[Sample], size: int, rng: random.Random,
            by_completion: bool = False) -> list[list[Sample]]:
    """`index_batches` of samples, as samples."""
    sizes = [(len(s.tokens), s.start) for s in samples]
    return [[samples[i] for i in group]
            for group in index_batches(sizes, size, rng, by_completion)]
