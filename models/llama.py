"""Llama family: Llama 2/3, Mistral, SmolLM (Hugging Face `LlamaForCausalLM` weights)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import BaseArgs
from .decoder import DecoderModel, check_args


@dataclass
class ModelArgs(BaseArgs):
    model_type: str = "llama"
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_traditional: bool = False


class Model(DecoderModel):
    def __init__(self, args: ModelArgs):
        check_args(args, "llama")
        super().__init__(args, attention_bias=args.attention_bias)
