"""DecoderModel: embeddings, layers and head, split at the first MSA layer into `lower`
(main rows only) and `upper` (main rows plus stream rows); `stream_pass` runs the stream
rows of chosen main rows afterwards. Row layout and masks: see masks.py."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from specstream_mlx.errors import ModelLoadError
from specstream_mlx.models.config import StreamArgs

from .kernels import matmul_t
from .layers import LanguageModel, Rows, rope_table
from .masks import msa_mask, prefix_mask, sdpa_mask, stream_mask
from .streams import Streams

# Stream-only passes with more rows than this attend group by group (grouped_attention):
# training passes hundreds; a decode pass has one node's few (kernels.attention's path).
GROUPED_ROWS = 64


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

    def pass_rows(self, positions: mx.array, mask, cache, n_main: int, pending: int = 0,
                  group: int = 0) -> Rows:
        """The Rows of a pass, with the RoPE table computed once for all its layers."""
        attn = self.layers[0].self_attn
        table = rope_table(attn.rope, positions, attn.head_dim, self.model.norm.weight.dtype)
        return Rows(positions, mask, cache, n_main, pending, table, group)

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

    def upper(self, h, positions, tree_mask=None, cache=None, stream_rows=None,
              embedding_scale: float = 1.0, next_tokens=None):
        """Layers split .. N-1, with stream rows for `stream_rows` (S,) when given.

        h: (B, L, hidden) from `lower`. Returns the final-normed main rows (B, L, hidden)
        and stream rows (B, S, gamma, hidden), or None without streams. The stream
        embeddings enter as streams.embeddings * embedding_scale (training keeps them at
        unit scale: Adam moves each weight by ~lr a step, whatever its size).
        next_tokens: (B, S) int32, the token after each stream row's main row, for
        streams conditioned on it (StreamArgs.next_token_rank; teacher forcing only: a
        decode pass learns it from its own main rows, see stream_pass).
        """
        B, L, _ = h.shape
        prefix = cache.offset if cache is not None else 0
        streams = stream_rows is not None and self.stream_args is not None
        if not streams:
            rows = self.pass_rows(positions, sdpa_mask(tree_mask, prefix, L), cache, L)
        else:
            g = self.stream_args.num_streams
            mask = msa_mask(prefix_mask(tree_mask, prefix, L), stream_rows, g)
            stream_pos = positions[stream_rows][:, None] + mx.arange(1, g + 1)
            pos = mx.concatenate([positions, stream_pos.reshape(-1)])
            rows = self.pass_rows(pos, mask, cache, L)
            s = self.stream_inputs(mx.take(h, stream_rows, axis=1), embedding_scale,
                                   next_tokens)
            h = mx.concatenate([h, s.reshape(B, -1, h.shape[-1])], axis=1)
        for i in range(self.split, len(self.layers)):
            adapter = self.streams.adapter(i - self.split) if streams else None
            h = self.layers[i](h, rows, i, adapter)
        h = self.model.norm(h)
        if h.shape[1] == L:
            return h, None
        return h[:, :L], h[:, L:].reshape(B, -1, self.stream_args.num_streams, h.shape[-1])

    def stream_inputs(self, h: mx.array, embedding_scale: float = 1.0,
                      next_tokens: mx.array | None = None) -> mx.array:
        """Where stream rows start: S[t, j] = M[t] + P[j] (+ the next token's projection
        when conditioned). h: (B, S, hidden) -> (B, S, gamma, hidden)."""
        s = h[:, :, None, :] + self.streams.embeddings * embedding_scale
        if not self.stream_args.conditioned:
            return s
        if next_tokens is None:
            raise ValueError("these streams are conditioned on the next token: pass "
                             "next_tokens")
        e = self.streams.next_token(self.model.embed_tokens(next_tokens).astype(h.dtype))
        return s + (e * embedding_scale)[:, :, None, :]

    def stream_pass(self, h: mx.array, positions: mx.array, seen: mx.array, cache,
                    pending: int, embedding_scale: float = 1.0,
                    next_tokens: mx.array | None = None) -> mx.array:
        """Stream rows of S main rows, run after their main rows went through the MSA layers
        (which left their K/V in `cache`): valid since main rows never see stream rows.

        h: (B, S, hidden) the main rows' hidden states entering the first MSA layer;
        positions: (S,) int32 their positions; seen: (S, offset + pending) bool, what each
        main row saw among the cache's committed slots and the `pending` slots after them;
        or positions (B, S) and seen (B, S, offset + pending), each batch entry's own rows
        (training); embedding_scale as in `upper`; next_tokens (B, S) int32, the token
        each main row chose (verified, sampled or the data's), for conditioned streams.
        Returns (B, S, gamma, hidden), final-normed.
        """
        B, S, H = h.shape
        g = self.stream_args.num_streams
        pos = (positions[..., None] + mx.arange(1, g + 1)).astype(mx.int32)
        pos = pos.reshape(*positions.shape[:-1], -1)
        if seen.ndim == 3 or S * g > GROUPED_ROWS:  # skip the (S*g)^2 stream-stream block
            rows = self.pass_rows(pos, mx.repeat(seen, g, axis=-2), cache, 0, pending, g)
        else:  # decoding (S = 1): the few-rows attention under one full mask
            rows = self.pass_rows(pos, stream_mask(seen, mx.arange(S), g), cache, 0, pending)
        s = self.stream_inputs(h, embedding_scale, next_tokens).reshape(B, -1, H)
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

    def __call__(self, tokens, positions=None, tree_mask=None, cache=None, stream_rows=None,
                 next_tokens=None):
        """Logits of main rows (B, L, vocab) and of stream rows (B, S, gamma, vocab) or None.

        positions default to cache offset + arange(L): plain causal decoding; next_tokens
        as in `upper`.
        """
        if positions is None:
            start = cache.offset if cache is not None else 0
            positions = mx.arange(start, start + tokens.shape[1], dtype=mx.int32)
        h = self.lower(tokens, positions, tree_mask, cache)
        h, hs = self.upper(h, positions, tree_mask, cache, stream_rows, next_tokens=next_tokens)
        return self.head(h), (self.head(hs) if hs is not None else None)


def check_args(args, model_type: str) -> None:
    """Shape checks that would otherwise fail deep inside a matmul."""
    heads, kv = args.num_attention_heads, args.num_key_value_heads
    if heads % kv:
        raise ModelLoadError(
            f"{model_type}: num_attention_heads ({heads}) must be a multiple of "
            f"num_key_value_heads ({kv})"
        )
