"""Fields every supported architecture shares, named as in Hugging Face config.json."""

from __future__ import annotations

import inspect
from dataclasses import dataclass


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
