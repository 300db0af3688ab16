"""The decoder's layers over explicit per-row positions and masks: RoPE at any positions,
grouped-query attention writing its main rows into a KV cache, the MLP and the block, and
the stream-only adapter hook (`project`) that leaves main rows exact."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from .kernels import attention, grouped_attention, linear, silu_mul

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Rows:
    """What every layer needs to know about the rows of one pass.

    positions: (R,) int32 position of each row; mask: (R, keys) bool, "causal" or None;
    cache: the KV cache or None; n_main: the first n_main rows are main rows, the rest
    stream rows; pending: with n_main 0 (a pass of stream rows only), how many rows an
    earlier pass wrote after the cache's committed slots that these rows also see;
    rotation: the RoPE table of `positions`, shared by every layer of the pass;
    group: with n_main 0, rows come in groups of this many streams of one node, each
    seeing its own group causally, and `mask` (R, keys) covers the cache's keys only
    (kernels.grouped_attention); 0: `mask` covers every key.
    """

    positions: mx.array
    mask: mx.array | str | None
    cache: object | None
    n_main: int
    pending: int = 0
    rotation: tuple[mx.array, mx.array] | None = None  # rope_table(...) of `positions`
    group: int = 0


def apply_rope(rope: nn.Module, x: mx.array, positions: mx.array) -> mx.array:
    """Rotate `x` (B, R, H, D) at `positions` (R,) or (B, R) int32; returns (B, H, R, D).

    mlx-lm's RoPE modules take one offset per batch entry, so every row becomes its own
    batch entry of length 1: per-token positions with the fused kernel and any scaling.
    """
    B, R, H, D = x.shape
    if positions.ndim == 2:  # (B, R): each batch row at its own positions
        offsets = positions.reshape(-1)
    else:
        offsets = mx.tile(positions, B) if B > 1 else positions
    y = rope(x.reshape(B * R, H, 1, D), offset=offsets)
    return y.reshape(B, R, H, D).transpose(0, 2, 1, 3)


def rope_table(rope: nn.Module, positions: mx.array, head_dim: int, dtype
               ) -> tuple[mx.array, mx.array] | None:
    """cos and sin of each row's rotation, (B, 1, R, head_dim / 2) each, for positions (R,)
    or (B, R): the layer's own RoPE module applied to unit vectors, so any scaling it does
    is included. Computed once per pass instead of once per layer (SmolLM2: the 60
    rotations of a pass take 6 ms instead of 16). None for a module that rotates part
    of the head or interleaved pairs (apply_rope then runs in each layer)."""
    if getattr(rope, "dims", None) != head_dim or getattr(rope, "traditional", True):
        return None
    half = head_dim // 2
    B = positions.shape[0] if positions.ndim == 2 else 1
    unit = mx.concatenate([mx.ones((half,)), mx.zeros((half,))])
    y = apply_rope(rope, mx.broadcast_to(unit, (B, positions.shape[-1], 1, head_dim)),
                   positions).astype(dtype)
    return y[..., :half], y[..., half:]


_rotate_halves = mx.compile(lambda x1, x2, c, s: (x1 * c - x2 * s, x1 * s + x2 * c),
                            shapeless=True)


def rotate(x: mx.array, table: tuple[mx.array, mx.array]) -> mx.array:
    """x (B, H, R, D) rotated by a rope_table (one fused kernel)."""
    half = x.shape[-1] // 2
    return mx.concatenate(_rotate_halves(x[..., :half], x[..., half:], *table), axis=-1)


class Attention(nn.Module):
    """Grouped-query attention over explicit positions and an explicit mask."""

    def __init__(self, args, bias: bool = False, qk_norm: bool = False):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim or dim // self.n_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            self.head_dim,
            args.rope_theta,
            getattr(args, "rope_traditional", False),
            args.rope_scaling,
            args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, rows: Rows, layer: int, adapter=None) -> mx.array:
        """x: (B, R, hidden) -> (B, R, hidden).

        Main rows' K/V go to the cache (slots after its offset); stream rows' K/V live
        only in this call. `adapter` (StreamAdapter) changes stream rows only.
        """
        B, R, _ = x.shape
        n_main, cache = rows.n_main, rows.cache
        q = project(self, "q_proj", x, adapter, n_main).reshape(B, R, self.n_heads, -1)
        k = project(self, "k_proj", x, adapter, n_main).reshape(B, R, self.n_kv_heads, -1)
        v = project(self, "v_proj", x, adapter, n_main).reshape(B, R, self.n_kv_heads, -1)
        v = v.transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        if rows.rotation is not None:
            q = rotate(q.transpose(0, 2, 1, 3), rows.rotation)
            k = rotate(k.transpose(0, 2, 1, 3), rows.rotation)
        else:
            q, k = apply_rope(self.rope, q, rows.positions), apply_rope(self.rope, k,
                                                                        rows.positions)
        if rows.group:  # stream rows only, over the cache's keys plus their own group's
            keys, values = cache.read(layer, rows.pending)
            out = grouped_attention(q, keys, values, k, v, self.scale, rows.mask, rows.group)
        else:
            if cache is not None:
                if n_main:
                    keys, values = cache.write(layer, k[:, :, :n_main], v[:, :, :n_main])
                else:
                    keys, values = cache.read(layer, rows.pending)
                if R > n_main:
                    keys = mx.concatenate([keys, k[:, :, n_main:]], axis=2)
                    values = mx.concatenate([values, v[:, :, n_main:]], axis=2)
            else:
                keys, values = k, v
            out = attention(q, keys, values, self.scale, rows.mask)
        return project(self, "o_proj", out.transpose(0, 2, 1, 3).reshape(B, R, -1), adapter, n_main)


def project(module: nn.Module, name: str, x: mx.array, adapter, n_main: int) -> mx.array:
    """module.<name>(x), plus the stream-only adapter's update on rows n_main: onwards."""
    y = linear(getattr(module, name), x)
    if adapter is None or x.shape[1] == n_main:
        return y
    if n_main == 0:  # stream rows only: no main rows to keep apart
        return y + adapter.delta(name, x)
    delta = adapter.delta(name, x[:, n_main:])
    return mx.concatenate([y[:, :n_main], y[:, n_main:] + delta], axis=1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)

    def __call__(self, x: mx.array, n_main: int = 0, adapter=None) -> mx.array:
        gate = project(self, "gate_proj", x, adapter, n_main)
        h = silu_mul(gate, project(self, "up_proj", x, adapter, n_main))
        return project(self, "down_proj", h, adapter, n_main)


class TransformerBlock(nn.Module):
    def __init__(self, args, attention_bias: bool = False, qk_norm: bool = False):
        super().__init__()
        self.self_attn = Attention(args, bias=attention_bias, qk_norm=qk_norm)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, getattr(args, "mlp_bias", False))
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, rows: Rows, layer: int, adapter=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), rows, layer, adapter)
        return h + self.mlp(self.post_attention_layernorm(h), rows.n_main, adapter)


class LanguageModel(nn.Module):
    """Embeddings, blocks and final norm, under Hugging Face names (`model.*`)."""

    def __init__(self, args, block_kwargs: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            TransformerBlock(args, **block_kwargs) for _ in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
