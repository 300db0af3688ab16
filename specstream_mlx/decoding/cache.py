"""Preallocated KV cache written at explicit slots, with commit of an accepted path.

Slots 0 .. offset-1 hold committed tokens. A pass writes its main rows at slots
offset .. offset+n-1 ("pending"); `commit(path)` keeps the pending rows `path` and moves
them to offset .. offset+len(path)-1. Rejected rows need no cleanup: the next pass
overwrites them. Example: pending rows [root, a, b, c] with a accepted and then c
(path [0, 1, 3]): slot offset+2 receives row 3, and offset grows by 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx


class KVCache:
    """Keys and values of every layer, (B, kv_heads, capacity, head_dim) each.

    Storage grows by `step` slots at a time (never per decode step).
    """

    step = 256

    def __init__(self, num_layers: int):
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self.offset = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def _grow(self, layer: int, k: mx.array, v: mx.array, end: int) -> None:
        size = -(-end // self.step) * self.step
        old_k, old_v = self.keys[layer], self.values[layer]
        B, H, _, D = k.shape
        new_k = mx.zeros((B, H, size, D), dtype=k.dtype)
        new_v = mx.zeros((B, H, size, v.shape[3]), dtype=v.dtype)
        if old_k is not None:
            n = old_k.shape[2]
            new_k[..., :n, :] = old_k
            new_v[..., :n, :] = old_v
        self.keys[layer], self.values[layer] = new_k, new_v

    def write(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write pending rows k, v (B, kv_heads, n, head_dim) at slots offset..offset+n-1.

        Returns keys and values of slots 0 .. offset+n-1 for attention.
        """
        end = self.offset + k.shape[2]
        if self.keys[layer] is None or end > self.keys[layer].shape[2]:
            self._grow(layer, k, v, end)
        self.keys[layer][..., self.offset : end, :] = k
        self.values[layer][..., self.offset : end, :] = v
        return self.keys[layer][..., :end, :], self.values[layer][..., :end, :]

    def read(self, layer: int, pending: int = 0) -> tuple[mx.array, mx.array]:
        """Keys and values of slots 0 .. offset+pending-1: the committed tokens and the first
        `pending` rows a pass already wrote (stream rows attend to them, never write)."""
        end = self.offset + pending
        return self.keys[layer][..., :end, :], self.values[layer][..., :end, :]

    def commit(self, path: Sequence[int]) -> None:
        """Keep pending rows `path` (increasing indices from 0) as the next committed slots."""
        n = len(path)
        if list(path) != list(range(n)):  # already contiguous: nothing to copy
            src = mx.array(path, dtype=mx.int32) + self.offset
            lo, hi = self.offset, self.offset + n
            for k, v in zip(self.keys, self.values, strict=True):
                if k is not None:  # in-place update of the stored array
                    k[..., lo:hi, :] = mx.take(k, src, axis=2)
                    v[..., lo:hi, :] = mx.take(v, src, axis=2)
        self.offset += n

    def trim(self, n: int) -> int:
        """Forget the last `n` committed tokens; returns how many were dropped."""
        n = max(0, min(n, self.offset))
        self.offset -= n
        return n

    def copy_prefix(self, n: int) -> KVCache:
        """A new cache holding a copy of the first `n` committed slots; this one is left as
        it is (storage rounded up to `step` slots, like any grown cache)."""
        n = max(0, min(n, self.offset))
        out = KVCache(len(self.keys))
        if n == 0:
            return out
        size = -(-n // self.step) * self.step
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                B, H, _, D = k.shape
                out.keys[i] = mx.zeros((B, H, size, D), dtype=k.dtype)
                out.values[i] = mx.zeros((B, H, size, v.shape[3]), dtype=v.dtype)
                out.keys[i][..., :n, :] = k[..., :n, :]
                out.values[i][..., :n, :] = v[..., :n, :]
        out.offset = n
        mx.eval(out.state())  # own the copy now: the source's arrays need not stay alive
        return out

    def state(self) -> list[mx.array]:
        """Every stored array (for mx.eval)."""
        return [a for a in self.keys + self.values if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state())


def kv_layout(model) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of each layer: the shape of one token's K (and V) there."""
    return [(layer.self_attn.n_kv_heads, layer.self_attn.head_dim) for layer in model.layers]


def kv_dtype(model) -> mx.Dtype:
    """The dtype the cache stores: the activations', which the final norm's weight has
    (norms are never quantized, so this holds for quantized models too)."""
    return model.model.norm.weight.dtype


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V one token takes in every layer's cache."""
    return sum(2 * h * d for h, d in kv_layout(model)) * kv_dtype(model).size
