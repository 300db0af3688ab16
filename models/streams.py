"""The speculative-streaming parameters: stream embeddings, the draft vocabulary, the
next-token projection, and stream-only low-rank adapters of the MSA layers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from specstream_mlx.models.config import StreamArgs


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


class Streams(nn.Module):
    """The speculative-streaming parameters: the stream embeddings (gamma*hidden numbers)
    and the optional parts below.

    embeddings: (gamma, hidden) stream-identifier embeddings P[j], added where streams start.
    draft_vocab: (V_d,) int32 token ids the streams draft from (with draft_vocab_size > 0).
    next_token_down / next_token_up: rank-r projection of the next token's (normalised)
    embedding, added to every stream row of a node (next_token_rank > 0); up starts at
    zero, so fresh ones change nothing (warm starts keep the loaded streams' output).
    """

    def __init__(self, args: StreamArgs, model_args):
        super().__init__()
        hidden = model_args.hidden_size
        self.embeddings = mx.random.normal((args.num_streams, hidden)) * 0.02
        if args.draft_vocab_size > 0:  # replaced by the trained/loaded ids
            self.draft_vocab = mx.arange(args.draft_vocab_size, dtype=mx.int32)
        if args.next_token_rank > 0:
            self.add_next_token(args.next_token_rank, hidden)
        if args.adapter_rank > 0:  # adapters[i] belongs to MSA layer i (layer N - N_s + i)
            self.adapters = [
                StreamAdapter(model_args, args.adapter_rank, args.adapter_scale)
                for _ in range(args.msa_layers)
            ]

    def adapter(self, i: int):
        """The stream-only adapter of MSA layer i, or None."""
        return self.adapters[i] if "adapters" in self else None

    def add_next_token(self, rank: int, hidden: int) -> None:
        """A fresh next-token projection of `rank` (zero `up`: it adds nothing yet)."""
        self.next_token_down = mx.random.normal((rank, hidden)) * hidden**-0.5
        self.next_token_up = mx.zeros((hidden, rank))

    def next_token(self, e: mx.array) -> mx.array:
        """e: (..., hidden) the next tokens' embeddings -> (..., hidden), what each of their
        stream rows adds. RMS-normalised first: SmolLM2's embeddings (RMS 0.12) are ~150x
        smaller than the hidden states they join (~20), and training moves `up` at the
        stream embeddings' scale (it is multiplied by the same embedding_scale)."""
        e = e * mx.rsqrt(mx.mean(e * e, axis=-1, keepdims=True) + 1e-6)
        return (e @ self.next_token_down.T) @ self.next_token_up.T
