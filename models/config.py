"""Configs named as in Hugging Face config.json: the fields every supported architecture
shares (BaseArgs) and the `speculative_streaming` block that describes the streams
(StreamArgs)."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, fields

from specstream_mlx.errors import ModelLoadError


@dataclass
class BaseArgs:
    model_type: str = ""
    hidden_size: int = 0
    num_hidden_layers: int = 0
    intermediate_size: int = 0
    num_attention_heads: int = 0
    rms_norm_eps: float = 1e-6
    vocab_size: int = 0
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = True

    # Keys a config.json must have; the loader names the first one missing.
    required = ("hidden_size", "num_hidden_layers", "intermediate_size",
                "num_attention_heads", "vocab_size")

    @classmethod
    def from_dict(cls, params: dict):
        """Build from a config.json dict, ignoring keys this architecture does not use."""
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in known})

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is None and self.rope_parameters:
            rope = self.rope_parameters
            self.rope_theta = rope.get("rope_theta", self.rope_theta)
            if rope.get("rope_type", "default") != "default":
                self.rope_scaling = rope


@dataclass
class StreamArgs:
    """Shape of the speculative streams added to a base model.

    num_streams:       gamma, the streams predicting tokens t+2 .. t+gamma+1.
    msa_layers:        N_s, the top layers that carry stream rows (multi-stream attention).
                       Main rows never attend to stream rows (the paper's v1), so the main
                       stream is exactly the base model.
    adapter_rank:      rank of stream-only LoRA adapters in the stream layers (0: none).
    adapter_scale:     scale applied to the stream-only adapters' output.
    tree_budget:       default number of draft nodes per pass (the root is extra).
    top_k:             default candidates taken from each stream.
    min_draft_prob:    default floor on a stream node's path probability (the product of
                       its streams' probabilities along the path); 0 keeps the whole budget.
    lookup_depth:      default length of the context draft added to each tree: the tokens
                       that followed the last occurrence of the current n-gram (0: off).
    corpus_depth:      default length of a corpus draft (tokens voted from the folder's
                       corpus.npy, a datastore of the model's own answers; 0: off). Used
                       only when the folder has that file.
    draft_vocab_size:  streams draft from this many token ids (`streams.draft_vocab`, the
                       most frequent tokens of the training data); 0 means the full vocab.
                       Verification always uses the full head, so this stays lossless.
    next_token_rank:   rank of the projection of the next token's embedding (the main
                       stream's choice after the streams' row, known once the pass has
                       verified) added where streams start, so stream j predicts token
                       t+1+j knowing t+1 (as EAGLE's drafter does); 0: streams do not see it
                       (the paper). The stream rows then run after verification
                       (DecoderModel.stream_pass).
    sampled_tree_budget, sampled_top_k, sampled_min_draft_prob: tree_budget, top_k and
                       min_draft_prob when the generation samples (sampled_tree_budget
                       None: tree_budget). A sampled target takes the second or third
                       candidate far more often than a greedy one, so sampling drafts wider
                       by default (candidates past the draft vocabulary's size are not
                       taken).
    """

    num_streams: int = 3
    msa_layers: int = 4
    adapter_rank: int = 0
    adapter_scale: float = 1.0
    tree_budget: int = 6
    top_k: int = 3
    lookup_depth: int = 0
    min_draft_prob: float = 0.0
    corpus_depth: int = 8
    draft_vocab_size: int = 0
    next_token_rank: int = 0
    sampled_top_k: int = 8
    sampled_min_draft_prob: float = 0.0
    sampled_tree_budget: int | None = None

    # Fields that only set decoding defaults (the rest give the streams' shape).
    DECODING_DEFAULTS = ("tree_budget", "top_k", "lookup_depth", "min_draft_prob",
                         "corpus_depth", "sampled_top_k", "sampled_min_draft_prob",
                         "sampled_tree_budget")

    def shape(self) -> dict:
        """The fields that shape the streams and their cost, without decoding defaults."""
        return {k: v for k, v in asdict(self).items() if k not in self.DECODING_DEFAULTS}

    @classmethod
    def from_dict(cls, params: dict) -> StreamArgs:
        """Build from a config block, ignoring unknown keys (forward compatibility; older
        blocks also carry `pruning_rank` and `main_sees_streams: false`)."""
        if params.get("main_sees_streams"):  # the masks keep main rows blind to streams
            raise ModelLoadError("main_sees_streams true (main rows attending to their own "
                                 "stream rows) is no longer supported: retrain these streams")
        known = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, num_hidden_layers: int) -> None:
        """Raise ModelLoadError when the streams cannot fit the model."""
        if self.num_streams < 1:
            raise ModelLoadError(f"num_streams must be >= 1, got {self.num_streams}")
        if not 1 <= self.msa_layers <= num_hidden_layers:
            raise ModelLoadError(
                f"msa_layers must be in 1..{num_hidden_layers} (the model's layers), "
                f"got {self.msa_layers}"
            )
        if self.draft_vocab_size < 0 or 0 < self.draft_vocab_size < self.top_k:
            raise ModelLoadError(
                f"draft_vocab_size must be 0 (full vocabulary) or >= top_k ({self.top_k}), "
                f"got {self.draft_vocab_size}"
            )
        for name in ("min_draft_prob", "sampled_min_draft_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ModelLoadError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("lookup_depth", "corpus_depth"):
            if getattr(self, name) < 0:
                raise ModelLoadError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tree_budget < 0 or self.top_k < 1:
            raise ModelLoadError(
                f"tree_budget must be >= 0 and top_k >= 1, got {self.tree_budget}, {self.top_k}"
            )
        if self.sampled_tree_budget is not None and not (
                type(self.sampled_tree_budget) is int and self.sampled_tree_budget >= 0):
            raise ModelLoadError("sampled_tree_budget must be null (the tree_budget) or an "
                                 f"integer >= 0, got {self.sampled_tree_budget!r}")
        if self.sampled_top_k < 1:
            raise ModelLoadError(f"sampled_top_k must be >= 1, got {self.sampled_top_k}")
        for f in fields(self):
            if f.name.endswith("rank") and getattr(self, f.name) < 0:
                raise ModelLoadError(f"{f.name} must be >= 0")

    @property
    def conditioned(self) -> bool:
        """Stream rows take the next token's embedding (next_token_rank > 0)."""
        return self.next_token_rank > 0
