"""Qwen2 / Qwen2.5: Llama layout with biases on the q, k, v projections."""

from __future__ import annotations

from dataclasses import dataclass

from .config import BaseArgs
from .decoder import DecoderModel, check_args


@dataclass
class ModelArgs(BaseArgs):
    model_type: str = "qwen2"
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768


class Model(DecoderModel):
    def __init__(self, args: ModelArgs):
        check_args(args, "qwen2")
        super().__init__(args, attention_bias=True)
