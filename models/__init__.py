"""Model architectures with multi-stream attention, keyed by Hugging Face `model_type`."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import mlx.nn as nn

from specstream_mlx.errors import ModelLoadError
from specstream_mlx.jsonl import read_json_object

# model_type -> module; Mistral and SmolLM checkpoints use the Llama layout.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "smollm": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


def get_classes(model_type: str):
    """(Model class, ModelArgs class) for a `model_type`; KeyError when unsupported."""
    module = importlib.import_module(f"{__name__}.{ARCHITECTURES[model_type]}")
    return module.Model, module.ModelArgs


def read_config(path: Path) -> dict:
    """config.json of a model folder, checked for a supported model_type and its keys."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a model folder")
    config = read_json_object(config_path, ModelLoadError)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"{config_path}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    _, args_cls = get_classes(model_type)
    for key in args_cls.required:
        if key not in config:
            raise ModelLoadError(f"{config_path}: missing key {key!r}")
    check_fields(config, config_path)
    return config


# config.json fields whose type a model needs: positive integers, positive numbers, flags.
POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "intermediate_size",
                 "num_attention_heads", "num_key_value_heads", "vocab_size",
                 "max_position_embeddings", "head_dim")
POSITIVE_REALS = ("rms_norm_eps", "rope_theta")
FLAGS = ("tie_word_embeddings",)


def check_fields(config: dict, where: Path) -> None:
    """Typed fields of config.json, so a "576" or a -1 fails here, named, and not deep in
    a matmul."""
    for key in POSITIVE_INTS + POSITIVE_REALS + FLAGS:
        value = config.get(key)
        if value is None:
            continue
        if key in FLAGS:
            ok, want = isinstance(value, bool), "true or false"
        elif key in POSITIVE_INTS:
            ok, want = type(value) is int and value > 0, "a positive integer"
        else:
            ok = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value) and value > 0)
            want = "a positive number"
        if not ok:
            raise ModelLoadError(f"{where}: {key} must be {want}, got {value!r}")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for m in model.modules())
