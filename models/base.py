"""Shared pieces of the decoder models: RoPE at explicit positions, attention with an
explicit mask, and multi-stream attention (MSA) in the top layers.

Row layout of one pass (B = batch, L = main rows, S = rows carrying streams, g = gamma):

    lower layers:  L main rows                     keys: P cached + L main
    MSA layers:    L main rows, then S*g stream rows  keys: P cached + L main + S*g stream

Stream row (s, j) belongs to main row a = stream_rows[s] and stream j (1..g). It sits at
position positions[a] + j, attends to what main row a sees (prefix, a's ancestors, a)
and to stream rows (s, 1..j). Only main-row keys/values enter the cache.

Worked example: L = 2 main rows (a chain 0 -> 1), P = 1 cached token, stream_rows = [1],
g = 2, main rows blind to streams. Columns: p0 | m0 m1 | s1.1 s1.2

    m0    1 | 1 0 | 0 0
    m1    1 | 1 1 | 0 0
    s1.1  1 | 1 1 | 1 0
    s1.2  1 | 1 1 | 1 1
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from specstream_mlx.config import StreamArgs
from specstream_mlx.errors import ModelLoadError


def apply_rope(rope: nn.Module, x: mx.array, positions: mx.array) -> mx.array:
    """Rotate `x` (B, R, H, D) at per-row `positions` (R,) int32; returns (B, H, R, D).

    mlx-lm's RoPE modules take one offset per batch entry, so every row becomes its own
    batch entry of length 1: per-token positions with the fused kernel and any scaling.
    """
    B, R, H, D = x.shape
    offsets = mx.tile(positions, B) if B > 1 else positions
    y = rope(x.reshape(B * R, H, 1, D), offset=offsets)
    return y.reshape(B, R, H, D).transpose(0, 2, 1, 3)


def prefix_mask(tree_mask: mx.array | None, prefix: int, rows: int) -> mx.array:
    """Boolean mask (rows, prefix + rows) of main rows over cached prefix + main rows.

    tree_mask: (rows, rows) bool, True where row i may see row j; None means causal.
    """
    if tree_mask is None:
        tree_mask = mx.tril(mx.ones((rows, rows), dtype=mx.bool_))
    if prefix == 0:
        return tree_mask
    return mx.concatenate([mx.ones((rows, prefix), dtype=mx.bool_), tree_mask], axis=1)


def msa_mask(
    main_mask: mx.array, stream_rows: mx.array, num_streams: int, main_sees_streams: bool
) -> mx.array:
    """Mask of an MSA layer (see the module docstring for a worked example).

    main_mask:   (L, P + L) bool, the lower layers' mask.
    stream_rows: (S,) int32, main rows that carry streams.
    Returns (L + S*g, P + L + S*g) bool.
    """
    L = main_mask.shape[0]
    S, g = stream_rows.shape[0], num_streams
    owner = mx.repeat(stream_rows, g)  # (S*g,) main row of each stream row
    step = mx.tile(mx.arange(g), S)  # (S*g,) stream index j-1
    node = mx.repeat(mx.arange(S), g)
    stream_stream = (node[:, None] == node[None, :]) & (step[:, None] >= step[None, :])
    if main_sees_streams:
        main_stream = mx.arange(L)[:, None] == owner[None, :]
    else:
        main_stream = mx.zeros((L, S * g), dtype=mx.bool_)
    top = mx.concatenate([main_mask, main_stream], axis=1)
    bottom = mx.concatenate([main_mask[owner], stream_stream], axis=1)
    return mx.concatenate([top, bottom], axis=0)


def sdpa_mask(tree_mask: mx.array | None, prefix: int, rows: int) -> mx.array | str | None:
    """The cheapest mask argument for mx.fast.scaled_dot_product_attention."""
    if tree_mask is None:
        return "causal" if rows > 1 else None
    return prefix_mask(tree_mask, prefix, rows)


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

    def __call__(self, x, positions, mask, cache, layer: int, n_main: int) -> mx.array:
        """x: (B, R, hidden) rows; positions: (R,); mask: (R, keys) bool, "causal" or None.

        The first `n_main` rows are main rows: their K/V go to `cache` (slots after its
        offset); the others are stream rows whose K/V live only in this call.
        """
        B, R, _ = x.shape
        q = self.q_proj(x).reshape(B, R, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, R, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, R, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(self.rope, q, positions), apply_rope(self.rope, k, positions)
        if cache is not None:
            keys, values = cache.write(layer, k[:, :, :n_main], v[:, :, :n_main])
            if R > n_main:
                keys = mx.concatenate([keys, k[:, :, n_main:]], axis=2)
                values = mx.concatenate([values, v[:, :, n_main:]], axis=2)
        else:
            keys, values = k, v
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, R, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args, attention_bias: bool = False, qk_norm: bool = False):
        super().__init__()
        self.self_attn = Attention(args, bias=attention_bias, qk_norm=qk_norm)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, getattr(args, "mlp_bias", False))
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, positions, mask, cache, layer: int, n_main: int) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), positions, mask, cache, layer, n_main)
        return h + self.mlp(self.post_attention_layernorm(h))


class Streams(nn.Module):
    """The speculative-streaming parameters: gamma*hidden + 2*rank*hidden numbers.

    embeddings: (gamma, hidden) stream-identifier embeddings P[j], added where streams start.
    pruning_down / pruning_up: rank-r residual adapter o(h) = h + up(down(h)) on the hidden
    state entering the stream layers; LMHead(o(h)) estimates the next token early.
    """

    def __init__(self, args: StreamArgs, hidden: int):
        super().__init__()
        self.embeddings = mx.random.normal((args.num_streams, hidden)) * 0.02
        if args.pruning_rank > 0:
            self.pruning_down = mx.random.normal((args.pruning_rank, hidden)) * hidden**-0.5
            self.pruning_up = mx.zeros((hidden, args.pruning_rank))

    def early_exit(self, h: mx.array) -> mx.array:
        """h: (..., hidden) -> (..., hidden), the pruning adapter's estimate input."""
        if "pruning_down" not in self:
            return h
        return h + (h @ self.pruning_down.T) @ self.pruning_up.T


class LanguageModel(nn.Module):
    """Embeddings, blocks and final norm, under Hugging Face names (`model.*`)."""

    def __init__(self, args, block_kwargs: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            TransformerBlock(args, **block_kwargs) for _ in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class DecoderModel(nn.Module):
    """A decoder-only model whose top layers can carry speculative stream rows.

    The model is pure: it maps tokens, positions, a mask and a cache to logits. Without
    streams (or with `stream_rows=None`) it computes exactly the base model.
    """

    def __init__(self, args, attention_bias: bool = False, qk_norm: bool = False):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LanguageModel(args, {"attention_bias": attention_bias, "qk_norm": qk_norm})
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.stream_args: StreamArgs | None = None

    # --- structure -------------------------------------------------------------------

    @property
    def layers(self) -> list:
        return self.model.layers

    def attach_streams(self, stream_args: StreamArgs) -> None:
        """Add freshly initialised stream parameters (load trained ones afterwards)."""
        stream_args.validate(len(self.layers))
        self.stream_args = stream_args
        self.streams = Streams(stream_args, self.args.hidden_size)

    @property
    def split(self) -> int:
        """Index of the first MSA layer (N - N_s), or N when there are no streams."""
        if self.stream_args is None:
            return len(self.layers)
        return len(self.layers) - self.stream_args.msa_layers

    def sanitize(self, weights: dict) -> dict:
        """Drop tensors mlx-lm also drops (rotary tables, tied heads)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    # --- forward ---------------------------------------------------------------------

    def head(self, h: mx.array) -> mx.array:
        """Normalised hidden states (..., hidden) -> logits (..., vocab)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def lower(self, tokens, positions, tree_mask=None, cache=None) -> mx.array:
        """Layers 0 .. split-1 on main rows.

        tokens: (B, L) int32; positions: (L,) int32; tree_mask: (L, L) bool or None
        (causal). Returns the hidden state entering the first MSA layer, (B, L, hidden).
        """
        L = tokens.shape[1]
        prefix = cache.offset if cache is not None else 0
        mask = sdpa_mask(tree_mask, prefix, L)
        h = self.model.embed_tokens(tokens)
        for i in range(self.split):
            h = self.layers[i](h, positions, mask, cache, i, L)
        return h

    def upper(self, h, positions, tree_mask=None, cache=None, stream_rows=None):
        """Layers split .. N-1, with stream rows for `stream_rows` (S,) when given.

        h: (B, L, hidden) from `lower`. Returns the final-normed main rows (B, L, hidden)
        and stream rows (B, S, gamma, hidden), or None without streams.
        """
        B, L, _ = h.shape
        prefix = cache.offset if cache is not None else 0
        if stream_rows is None or self.stream_args is None:
            mask = sdpa_mask(tree_mask, prefix, L)
            rows_pos = positions
        else:
            g = self.stream_args.num_streams
            mask = msa_mask(
                prefix_mask(tree_mask, prefix, L),
                stream_rows,
                g,
                self.stream_args.main_sees_streams,
            )
            stream_pos = positions[stream_rows][:, None] + mx.arange(1, g + 1)
            rows_pos = mx.concatenate([positions, stream_pos.reshape(-1)])
            # S[t, j] = M[t] + P[j]: (B, S, g, hidden)
            s = mx.take(h, stream_rows, axis=1)[:, :, None, :] + self.streams.embeddings
            h = mx.concatenate([h, s.reshape(B, -1, h.shape[-1])], axis=1)
        for i in range(self.split, len(self.layers)):
            h = self.layers[i](h, rows_pos, mask, cache, i, L)
        h = self.model.norm(h)
        if h.shape[1] == L:
            return h, None
        return h[:, :L], h[:, L:].reshape(B, -1, self.stream_args.num_streams, h.shape[-1])

    def early_exit_logits(self, h: mx.array) -> mx.array:
        """Pruning estimate from the hidden state entering the MSA layers: (..., vocab)."""
        return self.head(self.model.norm(self.streams.early_exit(h)))

    def __call__(self, tokens, positions=None, tree_mask=None, cache=None, stream_rows=None):
        """Logits of main rows (B, L, vocab) and of stream rows (B, S, gamma, vocab) or None.

        positions default to cache offset + arange(L): plain causal decoding.
        """
        if positions is None:
            start = cache.offset if cache is not None else 0
            positions = mx.arange(start, start + tokens.shape[1], dtype=mx.int32)
        h = self.lower(tokens, positions, tree_mask, cache)
        h, hs = self.upper(h, positions, tree_mask, cache, stream_rows)
        return self.head(h), (self.head(hs) if hs is not None else None)


def check_args(args, model_type: str) -> None:
    """Shape checks that would otherwise fail deep inside a matmul."""
    heads, kv = args.num_attention_heads, args.num_key_value_heads
    if heads % kv:
        raise ModelLoadError(
            f"{model_type}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv})"
        )
