"""The memory guard: how much KV cache a request needs, and the server's budget for it.

A request's cache holds its prompt, its answer and, during a pass, the draft rows above
them, in slots that grow KVCache.step at a time. The server refuses, before any work,
a request whose prompt plus max_tokens exceeds the model's context or whose cache would
exceed the budget: `--max-kv-mb`, by default the whole context's cache, capped at half
of the memory left beside the weights and the in-memory prompt cache, divided by
`--max-batch` (the requests whose caches may be held together).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from specstream_mlx.decoding.cache import KVCache, kv_bytes_per_token


def device_memory_bytes() -> int | None:
    """Memory of the default device: Metal's recommended working set, the GPU's memory,
    else the machine's RAM (the CPU backend); None when nothing says."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if isinstance(info.get(key), int) and info[key] > 0:
            return info[key]
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def draft_rows(model) -> int:
    """The most rows a pass writes above the committed tokens: the root, the larger tree
    budget and the longer chain of the model's drafting defaults."""
    s = getattr(model, "stream_args", None)
    if s is None:
        return 1
    return 1 + max(s.tree_budget, s.sampled_tree_budget or 0) + max(s.lookup_depth,
                                                                     s.corpus_depth)


@dataclass
class KVBudget:
    """The model's context and the bytes of KV cache one request may take."""

    context: int
    per_token: int  # bytes of one token's K and V in every layer
    rows: int  # draft rows a pass adds
    max_bytes: int

    def need(self, tokens: int) -> int:
        """Bytes of the cache of a request of `tokens` prompt and answer tokens."""
        slots = -(-(tokens + self.rows) // KVCache.step) * KVCache.step
        return slots * self.per_token

    def room(self, prompt: int) -> int:
        """The most tokens a prompt of `prompt` tokens may generate (< 1: none)."""
        slots = self.max_bytes // self.per_token // KVCache.step * KVCache.step
        return min(self.context, slots - self.rows) - prompt

    def refusal(self, prompt: int, max_tokens: int) -> str | None:
        """Why a request of `prompt` tokens and `max_tokens` cannot run, or None."""
        total = prompt + max_tokens
        if total > self.context:
            return (f"the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) is {total} "
                    f"tokens, over the model's context of {self.context} tokens")
        if self.need(total) > self.max_bytes:
            return (f"the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) needs "
                    f"{self.need(total) / 2**20:.1f} MB of KV cache; this server allows "
                    f"{self.max_bytes / 2**20:.1f} MB (--max-kv-mb), room for "
                    f"{max(self.room(prompt), 0)} tokens after this prompt")
        return None


def kv_budget(model, max_bytes: int | None = None, reserved: int = 0,
              batch: int = 1) -> KVBudget:
    """The budget of `model`: `max_bytes`, or by default the whole context's cache capped
    at half the device memory left beside the weights and `reserved` bytes (the prompt
    cache), shared by the `batch` requests that may decode together (a batch's cache
    gives each of them as many slots as its longest needs), and never under one slot
    step."""
    budget = KVBudget(model.args.max_position_embeddings, kv_bytes_per_token(model),
                      draft_rows(model), 0)
    if max_bytes is None:
        max_bytes = budget.need(budget.context)
        memory = device_memory_bytes()
        if memory is not None:
            weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
            free = (memory - weights - reserved) // 2 // max(batch, 1)
            max_bytes = min(max_bytes, max(free, KVCache.step * budget.per_token))
    budget.max_bytes = max_bytes
    return budget
