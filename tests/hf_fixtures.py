"""Tiny Hugging Face checkpoints and PEFT adapters on disk, written with numpy + safetensors.

    folder, weights = write_hf_checkpoint(tmp_path / "hf", "qwen2")
    adapter = write_peft_adapter(tmp_path / "lora", weights, ["q_proj", "v_proj"])

A checkpoint folder holds config.json (conftest's tiny config plus `architectures` and
`torch_dtype`), model.safetensors or shards with model.safetensors.index.json (float32,
Hugging Face names, shapes taken from mlx-lm's own model of the architecture), and a
byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json with a chat template)
covering the 97 ids of the tiny vocabulary.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
from conftest import TINY_CONFIGS
from mlx.utils import tree_flatten
from safetensors.numpy import save_file
from tiny_folder import save_tokenizer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
def tiny_config(arch: str) -> dict:
    """The Hugging Face config.json of a tiny model of `arch` (a conftest.TINY_CONFIGS key)."""
    config = dict(TINY_CONFIGS[arch])
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    config["torch_dtype"] = "float32"
    return config


def tiny_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights under Hugging Face names; matrices (out, in).

    Names and shapes come from mlx-lm's implementation of the architecture (which keeps
    Hugging Face names), so they do not depend on the converter or on models/.
    """
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    reference = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(reference.parameters()):
        shape = tuple(value.shape)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name:
            w = rng.standard_normal(shape)
        else:  # large enough that logits are far from uniform and argmax ties are rare
            w = 1.5 * rng.standard_normal(shape) / np.sqrt(shape[1])
        weights[name] = w.astype(np.float32)
    return weights


def write_hf_checkpoint(
    folder: Path,
    arch: str = "llama",
    seed: int = 0,
    shards: int = 1,
    extra: dict[str, np.ndarray] | None = None,
    config: dict | None = None,
) -> tuple[Path, dict[str, np.ndarray]]:
    """A Hugging Face model folder; returns it and the weights it holds (without `extra`).

    shards > 1 writes `model-0000i-of-0000n.safetensors` and the index file;
    extra: more tensors for the weight files (e.g. speculative-streaming tensors);
    config: replaces tiny_config(arch).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = config or tiny_config(arch)
    weights = tiny_weights(config, seed)
    tensors = {**weights, **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(folder)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder, weights
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names), shards)):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder, weights


def write_peft_adapter(
    folder: Path,
    weights: dict[str, np.ndarray],
    targets: list[str],
    layers: list[int] | None = None,
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 1,
    in_dim_offset: int = 0,
    **config_extra,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA adapter folder for the model holding `weights`.

    targets: projection names (q_proj, ..., down_proj); layers: which layers (all when
    None). in_dim_offset > 0 writes A matrices for a model with a larger input size.
    Returns module path -> (A (r, in), B (out, r)), e.g. `model.layers.0.self_attn.q_proj`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs, tensors = {}, {}
    for name, w in sorted(weights.items()):
        module = name.removesuffix(".weight")
        parts = module.split(".")
        if parts[-1] not in targets or (layers is not None and int(parts[2]) not in layers):
            continue
        out_dim, in_dim = w.shape
        a = (rng.standard_normal((r, in_dim + in_dim_offset)) / np.sqrt(in_dim)).astype(np.float32)
        b = (0.5 * rng.standard_normal((out_dim, r))).astype(np.float32)
        pairs[module] = (a, b)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, **config_extra,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return pairs
