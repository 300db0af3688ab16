"""PEFT LoRA adapters: fused into the weights (task mode) or kept as stream-only
adapters (lossless mode).

Input: a folder (or hub id) with PEFT's `adapter_config.json` and
`adapter_model.safetensors` (`adapter_model.bin` is a pickle and is refused):

    adapter_config.json: {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                          "target_modules": ["q_proj", "v_proj"], "use_rslora": false}
    base_model.model.model.layers.{N}.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.{N}.self_attn.q_proj.lora_B.weight   (out, r)

An adapter name before `.weight` (`lora_A.default.weight`) is accepted, and so is an
adapter of the bare `LlamaModel` (`base_model.model.layers.{N}...`). The scale of a
module is lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `rank_pattern`
and `alpha_pattern` entries override r and lora_alpha for the modules they match.
DoRA, `fan_in_fan_out`, LoRA biases, embedding LoRA and `modules_to_save` are refused
with the name of the tensor or key.

Task mode (`fuse_adapter`):  W' = W + scale * B @ A, computed in float32 and stored in
W's dtype; main and stream rows both see it.

Lossless mode (`stream_adapter_tensors`): every adapted module must be a projection
(q/k/v/o/gate/up/down_proj) of one of the top N_s layers, which carry the stream rows;
layer N - N_s + i becomes `streams.adapters.{i}`:

    streams.adapters.{i}.{proj}_a = A                              (rank, in)
    streams.adapters.{i}.{proj}_b = B * scale / adapter_scale      (out, rank)

with rank = the largest r (smaller ones padded with zeros) and adapter_scale = the
common scale (1.0 when modules differ). Projections without LoRA get zeros. The main
stream stays the base model exactly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from specstream_mlx.errors import ConversionError
from specstream_mlx.jsonl import read_json_object
from specstream_mlx.models.layers import PROJECTIONS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# base_model.model.<module>.lora_A[.<adapter name>].weight
LORA_NAME = re.compile(
    r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight"
)
LAYER_PROJECTION = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")


@dataclass
class LoraPair:
    """The LoRA update of one linear module: delta W = scale * b @ a.

    module: Hugging Face module path, e.g. `model.layers.3.self_attn.q_proj`;
    a: (r, in); b: (out, r); a_name, b_name: the tensors' names in the adapter file.
    """

    module: str
    a: mx.array
    b: mx.array
    scale: float
    a_name: str
    b_name: str

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def read_adapter(folder: Path) -> list[LoraPair]:
    """The LoRA pairs of a PEFT adapter folder, checked against each other (not the model)."""
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    found: dict[str, dict[str, tuple[str, mx.array]]] = {}
    for name, value in tensors.items():
        match = LORA_NAME.fullmatch(name)
        if match is None:
            raise ConversionError(
                f"{folder / WEIGHTS_FILE}: tensor {name!r} is not a LoRA A or B matrix; only "
                f"plain LoRA on linear layers is supported (no biases, DoRA, modules_to_save)"
            )
        module = match["module"]
        if not module.startswith(("model.", "lm_head")):  # adapter of the bare LlamaModel
            module = f"model.{module}"
        found.setdefault(module, {})[match["ab"]] = (name, value)
    if not found:
        raise ConversionError(f"{folder / WEIGHTS_FILE} holds no LoRA tensors")

    pairs = []
    for module, ab in sorted(found.items()):
        if len(ab) != 2:
            ((have, (name, _)),) = ab.items()
            raise ConversionError(
                f"{folder / WEIGHTS_FILE}: {name!r} has no matching "
                f"lora_{'B' if have == 'A' else 'A'} tensor"
            )
        (a_name, a), (b_name, b) = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ConversionError(
                f"{folder / WEIGHTS_FILE}: {a_name!r} {tuple(a.shape)} and {b_name!r} "
                f"{tuple(b.shape)} are not a LoRA pair (A: (r, in), B: (out, r))"
            )
        scale = _scale(config, module, a.shape[0])
        pairs.append(LoraPair(module, a, b, scale, a_name, b_name))
    return pairs


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
    config = read_json_object(path, ConversionError)
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{path}: peft_type {config['peft_type']!r} is not supported (LORA)")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise ConversionError(f"{path}: {key!r} adapters are not supported")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ConversionError(f"{path}: missing key {key!r}")
    return config


def _read_tensors(folder: Path) -> dict[str, mx.array]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickled = folder / "adapter_model.bin"
        if pickled.is_file():
            raise ConversionError(
                f"{pickled} is a pickle, which is never loaded (unpickling can run code); "
                f"save the adapter with safetensors (PEFT's default)"
            )
        raise ConversionError(f"{folder} has no {WEIGHTS_FILE}")
    try:
        return mx.load(str(path))
    except Exception as e:
        raise ConversionError(f"{path}: cannot read it as safetensors ({e})") from None


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the end of the path."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, quantized (packed uint32 columns) or not."""
    out_dim, cols = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return out_dim, cols * 32 // layer.bits
    return out_dim, cols


def _target(model: nn.Module, pair: LoraPair) -> nn.Module:
    """The model's linear layer `pair` adapts, with the pair's shapes checked against it."""
    layer = dict(model.named_modules()).get(pair.module)
    if not isinstance(layer, nn.Linear | nn.QuantizedLinear):
        what = "has no such module" if layer is None else f"has a {type(layer).__name__} there"
        raise ConversionError(
            f"adapter tensor {pair.a_name!r} adapts {pair.module!r}, but the model {what}"
        )
    out_dim, in_dim = linear_dims(layer)
    for name, shape, expected in (
        (pair.a_name, pair.a.shape, (pair.rank, in_dim)),
        (pair.b_name, pair.b.shape, (out_dim, pair.rank)),
    ):
        if tuple(shape) != expected:
            raise ConversionError(
                f"adapter tensor {name!r} has shape {tuple(shape)}, but {pair.module}.weight "
                f"({out_dim}, {in_dim}) needs {expected}: the adapter belongs to another model"
            )
    return layer


def fuse_adapter(model: nn.Module, pairs: list[LoraPair]) -> None:
    """Task mode: W <- W + scale * B @ A for every pair (the model must be unquantized)."""
    for pair in pairs:
        layer = _target(model, pair)
        if isinstance(layer, nn.QuantizedLinear):
            raise ConversionError(f"cannot fuse into the quantized {pair.module}; dequantize first")
        delta = (pair.b.astype(mx.float32) @ pair.a.astype(mx.float32)) * pair.scale
        layer.weight = (layer.weight.astype(mx.float32) + delta).astype(layer.weight.dtype)


def stream_adapter_tensors(
    model: nn.Module, pairs: list[LoraPair], msa_layers: int
) -> tuple[dict[str, mx.array], int, float]:
    """Lossless mode: (tensors named `adapters.{i}.{proj}_a|_b`, rank, adapter_scale).

    Raises ConversionError naming the first pair that adapts anything but a projection
    of the top `msa_layers` layers.
    """
    n_layers = len(model.layers)
    split = n_layers - msa_layers
    for pair in pairs:
        match = LAYER_PROJECTION.fullmatch(pair.module)
        if match is None or match[2] not in PROJECTIONS:
            raise ConversionError(
                f"adapter tensor {pair.a_name!r} adapts {pair.module!r}; stream-only adapters "
                f"exist for the projections of the stream layers only (use --adapter-mode fused)"
            )
        if int(match[1]) < split:
            raise ConversionError(
                f"adapter tensor {pair.a_name!r} adapts layer {match[1]}, but the streams live "
                f"in layers {split}..{n_layers - 1} (N_s = {msa_layers}): stream-only adapters "
                f"need every adapted layer among the top N_s layers; use --adapter-mode fused "
                f"or streams in at least {n_layers - int(match[1])} layers"
            )
        _target(model, pair)
    rank = max(p.rank for p in pairs)
    scales = {p.scale for p in pairs}
    adapter_scale = scales.pop() if len(scales) == 1 else 1.0

    tensors = {}
    for i in range(msa_layers):  # zeros everywhere first: a zero B is no update
        for proj in PROJECTIONS:
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out_dim, in_dim = linear_dims(model.layers[split + i][part][proj])
            tensors[f"adapters.{i}.{proj}_a"] = mx.zeros((rank, in_dim))
            tensors[f"adapters.{i}.{proj}_b"] = mx.zeros((out_dim, rank))
    for pair in pairs:
        layer, proj = LAYER_PROJECTION.fullmatch(pair.module).groups()
        i, pad = int(layer) - split, rank - pair.rank
        a = mx.pad(pair.a.astype(mx.float32), [(0, pad), (0, 0)])
        b = mx.pad(pair.b.astype(mx.float32), [(0, 0), (0, pad)]) * (pair.scale / adapter_scale)
        tensors[f"adapters.{i}.{proj}_a"], tensors[f"adapters.{i}.{proj}_b"] = a, b
    return tensors, rank, adapter_scale
