"""Frozen hidden states: everything below the stream layers is frozen, so the hidden state
entering layer N - N_s is computed once per example (batched by length) and cached on
disk under a key of the base weights and the token data."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from specstream_mlx.checkpoint import STREAMS_FILE
from specstream_mlx.training.data import Example


@dataclass
class Sample:
    """An example with the frozen hidden states entering the stream layers (T, hidden)."""

    tokens: np.ndarray
    start: int
    hidden: mx.array


def frozen_hidden(model, examples: list[Example], batch_tokens: int = 4096,
                  progress=None) -> list[Sample]:
    """Run the frozen lower layers once over every example (batched by length);
    `progress(done, total)` is called after each batch."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    samples: list[Sample | None] = [None] * len(examples)
    i = 0
    while i < len(order):
        # Sorted by length, so the group's last example sets its padded length.
        size = 1
        while (i + size < len(order)
               and (size + 1) * len(examples[order[i + size]].tokens) <= batch_tokens):
            size += 1
        group = order[i : i + size]
        T = len(examples[group[-1]].tokens)
        tokens = np.zeros((len(group), T), dtype=np.int32)
        for row, j in enumerate(group):
            tokens[row, : len(examples[j].tokens)] = examples[j].tokens
        # Padding sits after each sequence, so causal attention keeps it out of the rows.
        h = model.lower(mx.array(tokens), mx.arange(T, dtype=mx.int32))
        mx.eval(h)
        for row, j in enumerate(group):
            n = len(examples[j].tokens)
            samples[j] = Sample(np.array(examples[j].tokens), examples[j].completion_start,
                                h[row, :n])
        i += len(group)
        if progress is not None:
            progress(i, len(order))
    return samples


def cached_hidden(model, examples: list[Example], cache: Path, key: str, log=print
                  ) -> list[Sample]:
    """`frozen_hidden`, stored in `cache` (safetensors) and reused while `key` (the base
    model and the exact token sequences) is unchanged: resuming or re-running a training
    skips the frozen layers' minutes of work."""
    if cache.exists():
        tensors, meta = mx.load(str(cache), return_metadata=True)
        if meta.get("key") == key and len(tensors) == len(examples):
            log(f"frozen hidden states reused from {cache}")
            return [Sample(np.array(e.tokens), e.completion_start, tensors[str(i)])
                    for i, e in enumerate(examples)]
    tic = last = time.perf_counter()

    def progress(done: int, total: int) -> None:  # a line a minute: this takes a while
        nonlocal last
        if done == total or time.perf_counter() - last > 60:
            last = time.perf_counter()
            log(f"frozen hidden states: {done}/{total} examples, {last - tic:.0f} s")

    samples = frozen_hidden(model, examples, progress=progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".tmp-{cache.name}")
    mx.save_safetensors(str(tmp), {str(i): s.hidden for i, s in enumerate(samples)},
                        metadata={"key": key})
    tmp.replace(cache)
    return samples


def hidden_key(source: Path, split: int, examples: list[Example]) -> str:
    """Identity of a frozen-hidden cache: model weights, split layer and token data.

    The weights are known by their files' names, sizes and times, not the folder's path:
    a copy of the same base (an earlier run's output, warm-started from) reuses the cache.
    """
    h = hashlib.sha256(f"{split}".encode())
    for f in sorted(source.glob("*.safetensors")):
        if f.name != STREAMS_FILE:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for e in examples:
        h.update(np.asarray(e.tokens, dtype=np.int32).tobytes())
        h.update(str(e.completion_start).encode())
    return h.hexdigest()
