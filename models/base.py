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

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from specstream_mlx.errors import ModelLoadError
from specstream_mlx.models.config import StreamArgs

from .kernels import attention, linear, matmul_t

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Rows:
    """What every layer needs to know about the rows of one pass.

    positions: (R,) int32 position of each row; mask: (R, keys) bool, "causal" or None;
    cache: the KV cache or None; n_main: the first n_main rows are main rows, the rest
    stream rows; pending: with n_main 0 (a pass of stream rows only), how many rows an
    earlier pass wrote after the cache's committed slots that these rows also see;
    rotation: the RoPE table of `positions`, shared by every layer of the pass.
    """

    positions: mx.array
    mask: mx.array | str | None
    cache: object | None
    n_main: int
    pending: int = 0
    rotation: tuple[mx.array, mx.array] | None = None  # rope_table(...) of `positions`


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


def prefix_mask(tree_mask: mx.array | None, prefix: int, rows: int) -> mx.array:
    """Boolean mask (rows, prefix + rows) of main rows over cached prefix + main rows.

    tree_mask: (rows, rows) bool, True where row i may see row j; None means causal.
    """
    if tree_mask is None:
        tree_mask = mx.tril(mx.ones((rows, rows), dtype=mx.bool_))
    if prefix == 0:
        return tree_mask
    return mx.concatenate([mx.ones((rows, prefix), dtype=mx.bool_), tree_mask], axis=1)


def stream_mask(main_mask: mx.array, stream_rows: mx.array, num_streams: int) -> mx.array:
    """The stream rows' part of an MSA mask: (S*g, P + L + S*g) bool. Stream row (s, j)
    sees what its main row sees and stream rows (s, 1..j).

    main_mask: (L, P + L) bool; stream_rows: (S,) int32, main rows that carry streams.
    """
    S, g = stream_rows.shape[0], num_streams
    owner = mx.repeat(stream_rows, g)  # (S*g,) main row of each stream row
    step = mx.tile(mx.arange(g), S)  # (S*g,) stream index j-1
    node = mx.repeat(mx.arange(S), g)
    stream_stream = (node[:, None] == node[None, :]) & (step[:, None] >= step[None, :])
    return mx.concatenate([main_mask[owner], stream_stream], axis=1)


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
    if main_sees_streams:
        main_stream = mx.arange(L)[:, None] == mx.repeat(stream_rows, g)[None, :]
    else:
        main_stream = mx.zeros((L, S * g), dtype=mx.bool_)
    top = mx.concatenate([main_mask, main_stream], axis=1)
    return mx.concatenate([top, stream_mask(main_mask, stream_rows, g)], axis=0)


def sdpa_mask(tree_mask: mx.array | None, prefix: int, rows: int) -> mx.array | str | None:
    """The cheapest mask argument for mx.fast.scaled_dot_product_attention.

    A 4-D tree_mask (B, 1, rows, prefix + rows) is already complete (batched decoding
    with padding) and is used as given.
    """
    if tree_mask is None:
        return "causal" if rows > 1 else None
    if tree_mask.ndim == 4:
        return tree_mask
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
    delta = adapter.delta(name, x[:, n_main:])
    return mx.concatenate([y[:, :n_main], y[:, n_main:] + delta], axis=1)


class StreamAdapter(nn.Module):
    """Low-rank updates of one MSA layer's projections that act on stream rows only.

    For each projection p: delta = scale * (x @ p_a.T) @ p_b.T, with p_a (rank, in) and
    p_b (out, rank); p_b starts at zero, so a fresh adapter changes nothing. Main rows
    never see it: the base model stays exact (lossless mode).
    """

    def __init__(self, args, rank: int, scale: float):
        super().__init__()
        hidden = args.hidden_size
        head_dim = args.head_dim or hidden // args.num_attention_heads
        q_out, kv_out = args.num_attention_heads * head_dim, args.num_key_value_heads * head_dim
        dims = {
            "q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden), "gate_proj": (hidden, args.intermediate_size),
            "up_proj": (hidden, args.intermediate_size),
            "down_proj": (args.intermediate_size, hidden),
        }
        self.scale = scale
        for name, (d_in, d_out) in dims.items():
            setattr(self, f"{name}_a", mx.random.normal((rank, d_in)) * d_in**-0.5)
            setattr(self, f"{name}_b", mx.zeros((d_out, rank)))

    def delta(self, name: str, x: mx.array) -> mx.array:
        """x: (B, rows, in) -> (B, rows, out)."""
        a, b = self[f"{name}_a"], self[f"{name}_b"]
        return ((x @ a.T) @ b.T) * self.scale


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)

    def __call__(self, x: mx.array, n_main: int = 0, adapter=None) -> mx.array:
        gate = project(self, "gate_proj", x, adapter, n_main)
        h = nn.silu(gate) * project(self, "up_proj", x, adapter, n_main)
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


class Streams(nn.Module):
    """The speculative-streaming parameters: gamma*hidden + 2*rank*hidden numbers.

    embeddings: (gamma, hidden) stream-identifier embeddings P[j], added where streams start.
    pruning_down / pruning_up: rank-r residual adapter o(h) = h + up(down(h)) on the hidden
    state entering the stream layers; LMHead(o(h)) estimates the next token early.
    draft_vocab: (V_d,) int32 token ids the streams draft from (with draft_vocab_size > 0).
    """

    def __init__(self, args: StreamArgs, model_args):
        super().__init__()
        hidden = model_args.hidden_size
        self.embeddings = mx.random.normal((args.num_streams, hidden)) * 0.02
        # Training may keep `embeddings` at unit scale and put the hidden state's scale
        # here (Adam's steps are ~lr per element); saving folds it back in.
        self.embedding_scale = 1.0
        if args.pruning_rank > 0:
            self.pruning_down = mx.random.normal((args.pruning_rank, hidden)) * hidden**-0.5
            self.pruning_up = mx.zeros((hidden, args.pruning_rank))
        if args.draft_vocab_size > 0:  # replaced by the trained/loaded ids
            self.draft_vocab = mx.arange(args.draft_vocab_size, dtype=mx.int32)
        if args.adapter_rank > 0:  # adapters[i] belongs to MSA layer i (layer N - N_s + i)
            self.adapters = [
                StreamAdapter(model_args, args.adapter_rank, args.adapter_scale)
                for _ in range(args.msa_layers)
            ]

    def adapter(self, i: int):
        """The stream-only adapter of MSA layer i, or None."""
        return self.adapters[i] if "adapters" in self else None

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
        if stream_args.draft_vocab_size > self.args.vocab_size:
            raise ModelLoadError(
                f"draft_vocab_size ({stream_args.draft_vocab_size}) exceeds the model's "
                f"vocabulary ({self.args.vocab_size})"
            )
        self.stream_args = stream_args
        self.streams = Streams(stream_args, self.args)

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

    def pass_rows(self, positions: mx.array, mask, cache, n_main: int, pending: int = 0
                  ) -> Rows:
        """The Rows of a pass, with the RoPE table computed once for all its layers."""
        attn = self.layers[0].self_attn
        table = rope_table(attn.rope, positions, attn.head_dim, self.model.norm.weight.dtype)
        return Rows(positions, mask, cache, n_main, pending, table)

    def head(self, h: mx.array) -> mx.array:
        """Normalised hidden states (..., hidden) -> logits (..., vocab)."""
        head = self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head
        if "scales" in head:
            return head.as_linear(h) if self.args.tie_word_embeddings else head(h)
        return matmul_t(h, head.weight)

    def lower(self, tokens, positions, tree_mask=None, cache=None) -> mx.array:
        """Layers 0 .. split-1 on main rows.

        tokens: (B, L) int32; positions: (L,) int32; tree_mask: (L, L) bool or None
        (causal). Returns the hidden state entering the first MSA layer, (B, L, hidden).
        """
        L = tokens.shape[1]
        prefix = cache.offset if cache is not None else 0
        rows = self.pass_rows(positions, sdpa_mask(tree_mask, prefix, L), cache, L)
        h = self.model.embed_tokens(tokens)
        for i in range(self.split):
            h = self.layers[i](h, rows, i)
        return h

    def upper(self, h, positions, tree_mask=None, cache=None, stream_rows=None):
        """Layers split .. N-1, with stream rows for `stream_rows` (S,) when given.

        h: (B, L, hidden) from `lower`. Returns the final-normed main rows (B, L, hidden)
        and stream rows (B, S, gamma, hidden), or None without streams.
        """
        B, L, _ = h.shape
        prefix = cache.offset if cache is not None else 0
        streams = stream_rows is not None and self.stream_args is not None
        if not streams:
            rows = self.pass_rows(positions, sdpa_mask(tree_mask, prefix, L), cache, L)
        else:
            g = self.stream_args.num_streams
            mask = msa_mask(
                prefix_mask(tree_mask, prefix, L),
                stream_rows,
                g,
                self.stream_args.main_sees_streams,
            )
            stream_pos = positions[stream_rows][:, None] + mx.arange(1, g + 1)
            pos = mx.concatenate([positions, stream_pos.reshape(-1)])
            rows = self.pass_rows(pos, mask, cache, L)
            # S[t, j] = M[t] + P[j]: (B, S, g, hidden)
            P = self.streams.embeddings * self.streams.embedding_scale
            s = mx.take(h, stream_rows, axis=1)[:, :, None, :] + P
            h = mx.concatenate([h, s.reshape(B, -1, h.shape[-1])], axis=1)
        for i in range(self.split, len(self.layers)):
            adapter = self.streams.adapter(i - self.split) if streams else None
            h = self.layers[i](h, rows, i, adapter)
        h = self.model.norm(h)
        if h.shape[1] == L:
            return h, None
        return h[:, :L], h[:, L:].reshape(B, -1, self.stream_args.num_streams, h.shape[-1])

    def stream_pass(self, h: mx.array, positions: mx.array, seen: mx.array, cache,
                    pending: int) -> mx.array:
        """Stream rows of S main rows, run after their main rows went through the MSA layers
        (which left their K/V in `cache`): valid when main rows do not see their streams.

        h: (B, S, hidden) the main rows' hidden states entering the first MSA layer;
        positions: (S,) int32 their positions; seen: (S, offset + pending) bool, what each
        main row saw among the cache's committed slots and the `pending` slots after them.
        Returns (B, S, gamma, hidden), final-normed.
        """
        sa = self.stream_args
        if sa.main_sees_streams:
            raise ValueError("stream_pass needs main rows that do not see their streams")
        B, S, H = h.shape
        g = sa.num_streams
        mask = stream_mask(seen, mx.arange(S), g)
        pos = (positions[:, None] + mx.arange(1, g + 1)).reshape(-1).astype(mx.int32)
        rows = self.pass_rows(pos, mask, cache, 0, pending)
        P = self.streams.embeddings * self.streams.embedding_scale
        s = (h[:, :, None, :] + P).reshape(B, -1, H)
        for i in range(self.split, len(self.layers)):
            s = self.layers[i](s, rows, i, self.streams.adapter(i - self.split))
        return self.model.norm(s).reshape(B, S, g, H)

    @property
    def has_draft_vocab(self) -> bool:
        return self.stream_args is not None and "draft_vocab" in self.streams

    def draft_logits(self, h: mx.array, weight: mx.array | None = None) -> mx.array:
        """Stream rows' logits over the draft vocabulary: (..., hidden) -> (..., V_d), or
        the full head (..., vocab) without one. Map indices back with `draft_tokens`.
        `weight`: `draft_head()`, gathered once by a caller that drafts many times."""
        if not self.has_draft_vocab:
            return self.head(h)
        return matmul_t(h, weight if weight is not None else self.draft_head())

    def draft_tokens(self, idx: mx.array) -> mx.array:
        """Indices into the draft vocabulary -> token ids (identity without one)."""
        if not self.has_draft_vocab:
            return idx
        return self.streams.draft_vocab[idx]

    def draft_head(self) -> mx.array | None:
        """The head's rows for the draft vocabulary, (V_d, hidden) in the model's dtype (a
        dense copy, dequantized if needed, a few MB), or None without a draft vocabulary."""
        if not self.has_draft_vocab:
            return None
        ids = self.streams.draft_vocab
        head = self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head
        if self.args.tie_word_embeddings:
            w = head(ids)  # dequantizes a quantized embedding
        elif isinstance(head, nn.QuantizedLinear):
            biases = head["biases"][ids] if "biases" in head else None
            w = mx.dequantize(head.weight[ids], head.scales[ids], biases,
                              group_size=head.group_size, bits=head.bits,
                              mode=getattr(head, "mode", "affine"))
        else:
            w = head.weight[ids]
        return w.astype(self.model.norm.weight.dtype)

    def early_exit_logits(self, h: mx.array) -> mx.array:
        """Pruning estimate from the hidden state entering the MSA layers, over the draft
        vocabulary: (..., V_d) (or (..., vocab) without one)."""
        return self.draft_logits(self.model.norm(self.streams.early_exit(h)))

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
