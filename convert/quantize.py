"""Precision of a converted model: `--dtype` casts and the `-q` quantization policy.

Quantization is mlx-lm's (`mlx_lm.utils.quantize_model`: affine, `nn.quantize` with a
class predicate), recorded in config.json's `quantization` block the way mlx-lm's
loader reads it. The policy can keep some parts at a higher precision; they get
per-module entries, e.g. 4-bit with `keep_high=("embeddings", "streams")`, N_s = 2 of 30:

    "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                     "model.embed_tokens": {"group_size": 64, "bits": 8, "mode": "affine"},
                     "model.layers.28.self_attn.q_proj": {... "bits": 8 ...}, ...}

Parts: "embeddings" (`model.embed_tokens`), "head" (`lm_head`; the embedding when the
head is tied to it), "streams" (every linear layer of the top N_s layers, which carry
the stream rows). With `high_bits=None` those modules stay unquantized. The stream
tensors themselves (`streams.safetensors`) are never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.utils import quantize_model

from specstream_mlx.errors import ConversionError

DTYPES = ("float16", "bfloat16", "float32")
KEEP_HIGH_PARTS = ("streams", "embeddings", "head")
BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode supports
GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantPolicy:
    """How to quantize: `bits` and `group_size` for most layers, `high_bits` for the
    `keep_high` parts (None: leave them unquantized, in the model's float dtype)."""

    bits: int = 4
    group_size: int = 64
    keep_high: tuple[str, ...] = ()
    high_bits: int | None = 8

    def validate(self) -> None:
        if self.bits not in BITS:
            raise ConversionError(f"quantization bits must be one of {BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ConversionError(
                f"quantization group size must be one of {GROUP_SIZES}, got {self.group_size}"
            )
        if unknown := sorted(set(self.keep_high) - set(KEEP_HIGH_PARTS)):
            raise ConversionError(
                f"cannot keep {unknown[0]!r} at high precision; parts: {', '.join(KEEP_HIGH_PARTS)}"
            )
        if self.keep_high and self.high_bits is not None and (
            self.high_bits not in BITS or self.high_bits <= self.bits
        ):
            raise ConversionError(
                f"high-precision bits must be one of {BITS} and above the {self.bits} bits of "
                f"the other layers (or float), got {self.high_bits}"
            )


def cast(model: nn.Module, dtype: str) -> None:
    """Cast every floating-point parameter (quantization scales and biases too)."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = getattr(mx, dtype)
    model.update(
        tree_map(lambda p: p.astype(target) if mx.issubdtype(p.dtype, mx.floating) else p,
                 model.parameters())
    )


def high_precision_modules(
    model: nn.Module, parts: tuple[str, ...], msa_layers: int | None
) -> set[str]:
    """Module paths (e.g. `model.layers.29.mlp.down_proj`) of the `keep_high` parts."""
    modules: set[str] = set()
    if "embeddings" in parts:
        modules.add("model.embed_tokens")
    if "head" in parts:
        modules.add("lm_head" if "lm_head" in model else "model.embed_tokens")
    if "streams" in parts:
        if msa_layers is None:
            raise ConversionError(
                "keeping the stream layers at high precision needs streams: add them with "
                "--init-streams gamma,N_s or convert a checkpoint that has them"
            )
        first = len(model.layers) - msa_layers
        prefixes = tuple(f"model.layers.{i}." for i in range(first, len(model.layers)))
        modules |= {
            name for name, m in model.named_modules()
            if name.startswith(prefixes) and hasattr(m, "to_quantized")
        }
    return modules


def quantize(
    model: nn.Module, config: dict, policy: QuantPolicy, msa_layers: int | None = None
) -> dict:
    """Quantize `model` in place; returns `config` with mlx-lm's `quantization` block.

    `msa_layers` (N_s) is needed only when the policy keeps "streams" high. Layers whose
    input size is not a multiple of the group size stay unquantized (as in mlx-lm).
    """
    policy.validate()
    high = high_precision_modules(model, policy.keep_high, msa_layers)
    high_params: bool | dict = False  # False: nn.quantize leaves the module as it is
    if policy.high_bits is not None:
        high_params = {"group_size": policy.group_size, "bits": policy.high_bits, "mode": "affine"}

    def predicate(path: str, module: nn.Module) -> bool | dict:
        return high_params if path in high else True

    _, config = quantize_model(
        model, config, policy.group_size, policy.bits, quant_predicate=predicate
    )
    return config
