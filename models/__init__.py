"""Model architectures with multi-stream attention, keyed by Hugging Face `model_type`."""

from __future__ import annotations

import importlib

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
