"""Qwen3 (dense): RMS-normed queries and keys per head, explicit head_dim, no biases."""

from __future__ import annotations

from dataclasses import dataclass

from .config import BaseArgs
from .decoder import DecoderModel, check_args


@dataclass
class ModelArgs(BaseArgs):
    model_type: str = "qwen3"
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 40960


class Model(DecoderModel):
    def __init__(self, args: ModelArgs):
        check_args(args, "qwen3")
        super().__init__(args, qk_norm=True)
