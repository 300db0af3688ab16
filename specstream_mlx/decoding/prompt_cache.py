"""KV caches of recent generations, reused by later prompts that extend them.

A conversation's turn n+1 starts with the tokens of turn n (its prompt and answer), so
its prefill only needs the new tokens. PromptCache keeps the caches of recent
generations of one model, least recently used first out once their bytes exceed a bound;
`take(tokens)` hands out the cache sharing the longest prefix with `tokens`, trimmed to
that prefix, and `put` gives it back after the generation. A cache is in one generation
at a time (taken out while in use), so concurrent requests never share one.

    cache = PromptCache(model, max_bytes=1 << 30)
    for r in stream_generate(model, tok, messages_1, prompt_cache=cache): ...
    for r in stream_generate(model, tok, messages_2, prompt_cache=cache): ...  # reuses 1

With `disk` (a DiskPromptStore, disk_cache.py) the caches also go to files that outlive
the process: `take` reads one when it holds a longer prefix than memory does, and `put`
queues every finished generation for writing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.disk_cache import DiskPromptStore
from specstream_mlx.errors import InputError


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class PromptCache:
    """LRU of (tokens, KVCache) for one model, bounded by `max_bytes` of cache storage,
    optionally backed by a DiskPromptStore."""

    def __init__(self, model, max_bytes: int = 1 << 30, disk: DiskPromptStore | None = None):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InputError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.num_layers = len(model.layers)
        self.max_bytes = max_bytes
        self.disk = disk
        self._entries: list[tuple[list[int], KVCache]] = []  # least recently used first
        self._lock = threading.Lock()
        self.hits = self.misses = self.reused_tokens = 0
        self.disk_hits = self.disk_reused_tokens = 0

    def _best(self, tokens: Sequence[int]) -> tuple[int | None, int]:
        """Index and common prefix of the memory entry sharing most with `tokens`."""
        best, best_len = None, 0
        for i, (stored, _) in enumerate(self._entries):
            n = common_prefix(stored, tokens)
            if n > best_len:
                best, best_len = i, n
        return best, best_len

    def take(self, tokens: Sequence[int]) -> tuple[KVCache, int]:
        """A cache for a generation after `tokens` and how many of them it already holds:
        the stored cache sharing the longest prefix with them (removed from the LRU; a
        copy of the shared part instead when that is under a quarter of it), trimmed to
        that prefix and to at most len(tokens) - 1 (the last prompt token must be fed); a
        new empty cache when none shares a token."""
        cache, keep, _ = self.take_with_source(tokens)
        return cache, keep

    def take_with_source(self, tokens: Sequence[int]) -> tuple[KVCache, int, str | None]:
        """`take`, and where the reused tokens came from: "memory", "disk" or None. A
        disk entry is read when it shares more than memory does (and is worth a read)."""
        if self.disk is not None:
            with self._lock:
                _, in_memory = self._best(tokens)
            entry, on_disk = self.disk.best(tokens)
            keep = min(on_disk, len(tokens) - 1)
            if (entry is not None and keep > min(in_memory, len(tokens) - 1)
                    and self.disk.worth(entry, keep)
                    and (cache := self.disk.load(entry)) is not None):
                cache.trim(cache.offset - keep)
                with self._lock:
                    self.hits += 1
                    self.disk_hits += 1
                    self.reused_tokens += keep
                    self.disk_reused_tokens += keep
                return cache, keep, "disk"
        with self._lock:
            best, best_len = self._best(tokens)
            if best is None:
                self.misses += 1
                return KVCache(self.num_layers), 0, None
            stored, cache = self._entries[best]
            keep = min(best_len, len(tokens) - 1)
            if 4 * keep < len(stored):
                # A small share (often the chat template's opening or a system prompt):
                # copy it and leave the other conversation's cache whole for its next turn.
                return self._counted(cache.copy_prefix(keep), keep)
            self._entries.pop(best)
            cache.trim(cache.offset - keep)
            return self._counted(cache, keep)

    def _counted(self, cache: KVCache, keep: int) -> tuple[KVCache, int, str]:
        """A memory hit of `keep` tokens, counted (the caller holds the lock)."""
        self.hits += 1
        self.reused_tokens += keep
        return cache, keep, "memory"

    def put(self, tokens: Sequence[int], cache: KVCache) -> None:
        """Keep `cache`, which holds the K/V of `tokens` (its first cache.offset tokens are
        used), as the most recently used entry; evict the least recently used beyond
        max_bytes. With a disk store, the entry is also queued for writing."""
        if cache.offset == 0:
            return
        if self.disk is not None:
            self.disk.save(tokens, cache)
        if cache.nbytes > self.max_bytes:
            return
        tokens = list(tokens[: cache.offset])
        with self._lock:
            self._entries.append((tokens, cache))
            while sum(c.nbytes for _, c in self._entries) > self.max_bytes:
                self._entries.pop(0)

    def close(self) -> None:
        """Finish the disk store's pending writes."""
        if self.disk is not None:
            self.disk.close()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for _, c in self._entries)

    def __len__(self) -> int:
        return len(self._entries)
