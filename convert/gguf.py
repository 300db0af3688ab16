"""GGUF files (llama.cpp) -> MLX model folders in the mlx-lm layout.

`convert_gguf("model.Q4_1.gguf", "out/")` writes:
- `config.json`: Hugging Face keys (plus mlx-lm's `quantization` block when quantized);
- `model.safetensors`: Hugging Face tensor names, quantized tensors kept packed;
- `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
  `generation_config.json`, rebuilt from the tokenizer stored in the GGUF metadata.
`mlx_lm.utils.load("out/")` loads the result as it is.

What a GGUF file needs undone:
- tensor names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...;
- the rows of `q_proj` and `k_proj`: llama.cpp reorders each head's rows from Hugging
  Face's "two rotary halves" layout to interleaved pairs (see `unpermute_rows`);
- quantization: MLX reads Q4_0, Q4_1 and Q8_0 tensors as affine triples
  (`weight` uint32, `scales`, `biases`; group size 32), which are exactly mlx-lm's
  quantized layout, so they stay packed. F32, F16 and BF16 load as float; MLX expands
  Q2_K and Q6_K to float16 (kept, with a warning: the folder grows). MLX cannot read
  most other types, and its Q4_K reader (mlx 0.32) gives every second 32-weight
  sub-block the scale and min of the one before it; files with such types (K-quants,
  Q5_0, IQ*, ...) are read with llama.cpp's own `gguf` package (the optional extra
  `specstream-mlx[gguf]`), every quantized tensor dequantized to float16, or rejected
  when it is not installed. Re-quantize with `specstream convert -q`.
Only `general.architecture == "llama"` (Llama, Mistral, SmolLM) and the byte-level BPE
tokenizer (`tokenizer.ggml.model == "gpt2"`) are handled for now.
"""

from __future__ import annotations

import collections
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx

from specstream_mlx.convert.gguf_tokenizer import _REQUIRED, build_tokenizer, meta, save_tokenizer
from specstream_mlx.convert.output import check_target
from specstream_mlx.convert.output import install as _install
from specstream_mlx.convert.output import staging_folder as _staging_folder
from specstream_mlx.convert.output import write_json as _write_json
from specstream_mlx.errors import ConversionError

# ggml tensor type ids (ggml.h) -> names, and what MLX's GGUF reader does with each.
# fmt: off
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
}
# fmt: on
PACKED_TYPES = {"Q4_0", "Q4_1", "Q8_0"}  # read as affine (weight, scales, biases)
FLOAT_TYPES = {"F32", "F16", "BF16"}
DEQUANTIZED_TYPES = {"Q2_K", "Q6_K"}  # MLX expands these to float16 (checked correct)
MLX_READABLE_TYPES = PACKED_TYPES | FLOAT_TYPES | DEQUANTIZED_TYPES
GGUF_EXTRA_HINT = "pip install 'specstream-mlx[gguf]'"

# GGUF tensor names -> Hugging Face module names.
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
SUFFIXES = ("weight", "scales", "biases")



def convert_gguf(gguf_path: str | Path, mlx_path: str | Path, *, force: bool = False) -> Path:
    """Convert a Llama-architecture GGUF file into an MLX model folder.

    Args:
        gguf_path: the `.gguf` file.
        mlx_path: the folder to create; its parent is created when missing.
        force: replace an existing `mlx_path` (only once the new folder is complete).

    Returns:
        `mlx_path` as a Path.

    Raises:
        ConversionError: missing, truncated or non-GGUF file; unsupported architecture,
            tensor type or tokenizer; `mlx_path` exists and `force` is False.

    Everything is written to a hidden sibling folder renamed into place at the end, so
    an interrupted conversion never leaves a half-written `mlx_path`.
    """
    gguf_path, mlx_path = Path(gguf_path), Path(mlx_path)
    check_target(mlx_path, force)
    header = read_header(gguf_path)
    if all(kind in MLX_READABLE_TYPES for kind, _ in header.values()):
        tensors, metadata = _load(gguf_path)
    else:
        tensors, metadata = load_with_gguf_package(gguf_path)
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ConversionError(
            f"{gguf_path}: architecture {architecture!r} is not supported (only 'llama')"
        )
    config = llama_config(metadata, tensors, gguf_path)
    weights = hf_weights(tensors, config, gguf_path)
    quantization = quantization_config(weights, header, gguf_path)
    if quantization is not None:
        config["quantization"] = config["quantization_config"] = quantization
    tokenizer = build_tokenizer(metadata, gguf_path)

    with _staging_folder(mlx_path) as staging:
        _write_json(staging / "config.json", config)
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        save_tokenizer(tokenizer, staging)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        _write_json(staging / "generation_config.json", generation)
        _install(staging, mlx_path, force)
    return mlx_path


# --- reading ---------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (ggml type name, shape in row-major order) from the GGUF header.

    MLX's reader names neither the tensor nor the type it fails on, and silently drops
    some types (TQ1_0, TQ2_0), so the types are checked here first.
    """
    try:
        with open(path, "rb") as f:
            reader = _HeaderReader(f, path)
            if f.read(4) != b"GGUF":
                raise ConversionError(f"{path} is not a GGUF file (no 'GGUF' magic)")
            (version,) = reader.unpack("<I")
            if version < 2:
                raise ConversionError(f"{path}: GGUF version {version} is too old; reconvert it")
            n_tensors, n_kv = reader.unpack("<QQ")
            for _ in range(n_kv):
                reader.string()
                reader.skip_value(reader.unpack("<I")[0])
            header = {}
            for _ in range(n_tensors):
                name = reader.string()
                (n_dims,) = reader.unpack("<I")
                dims = reader.unpack(f"<{n_dims}Q")
                type_id, _offset = reader.unpack("<IQ")
                header[name] = (GGML_TYPES.get(type_id, f"type {type_id}"), tuple(reversed(dims)))
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except (OSError, struct.error, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot read the GGUF header ({e})") from None

    unreadable = {n: t for n, (t, _) in header.items() if t not in MLX_READABLE_TYPES}
    if unreadable and _gguf_package() is None:
        name, kind = next(iter(unreadable.items()))
        raise ConversionError(
            f"{path}: {len(unreadable)} tensor(s) of type(s) {sorted(set(unreadable.values()))} "
            f"cannot be read correctly by MLX (e.g. {name!r} is {kind}); supported: "
            f"F32/F16/BF16, Q4_0/Q4_1/Q8_0, Q2_K/Q6_K. Install the optional extra for "
            f"K-quants and the rest ({GGUF_EXTRA_HINT}), use a Q4_0, Q4_1 or Q8_0 file, "
            f"or convert the Hugging Face checkpoint instead"
        )
    quantized = {t for t, _ in header.values() if t not in FLOAT_TYPES}
    expanded = sorted(quantized if unreadable else quantized & DEQUANTIZED_TYPES)
    if expanded:
        warnings.warn(
            f"{path.name}: {expanded} tensors are expanded to float16 (MLX keeps only "
            f"Q4_0/Q4_1/Q8_0 packed); the converted folder is larger than the file "
            f"(re-quantize it with `specstream convert -q`)",
            stacklevel=3,
        )
    return header


class _HeaderReader:
    """Sequential little-endian reads of GGUF header fields from a binary file."""

    # GGUF metadata value types with a fixed size: uint8 ... float64, bool.
    SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    STRING, ARRAY = 8, 9

    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ConversionError(f"{self.path}: file ends inside the GGUF header (truncated?)")
        return data

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        return self.read(n).decode("utf-8")

    def skip_value(self, kind: int) -> None:
        if kind in self.SCALAR_SIZES:
            self.read(self.SCALAR_SIZES[kind])
        elif kind == self.STRING:
            self.f.seek(self.unpack("<Q")[0], os.SEEK_CUR)
        elif kind == self.ARRAY:
            item_kind, count = self.unpack("<IQ")
            if item_kind in self.SCALAR_SIZES:
                self.f.seek(self.SCALAR_SIZES[item_kind] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.skip_value(item_kind)
        else:
            raise ConversionError(f"{self.path}: unknown GGUF metadata type {kind}")


def _load(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """MLX's GGUF reader, with its errors (truncated data, ...) naming the file."""
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ConversionError(f"{path}: cannot load the GGUF file ({e})") from None


def _gguf_package():
    """llama.cpp's `gguf` package (the optional extra), or None when it is not installed."""
    try:
        import gguf
    except ImportError:
        return None
    return gguf


def load_with_gguf_package(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Tensors and metadata read with the `gguf` package, as `_load` returns them.

    Quantized tensors (K-quants, Q5_0, IQ*, and Q4_0/Q4_1/Q8_0 next to them) are
    dequantized by llama.cpp's reference code to float16, as MLX does for Q6_K; F32,
    F16 and BF16 keep their type. Shapes are row-major, as MLX reads them.
    """
    import numpy as np

    gguf = _gguf_package()
    try:
        reader = gguf.GGUFReader(path)
        metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # truncated file, bad offsets: numpy's and struct's errors
        raise ConversionError(f"{path}: cannot load the GGUF file ({e})") from None
    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in ("F32", "F16"):
            tensors[t.name] = mx.array(np.array(t.data))
            continue
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ConversionError(
                f"{path}: tensor {t.name!r} is {kind}, which the gguf package cannot dequantize"
            ) from None
        tensors[t.name] = mx.array(w).astype(mx.bfloat16 if kind == "BF16" else mx.float16)
    return tensors, metadata


# --- config and weights ----------------------------------------------------------------


def llama_config(metadata: dict[str, Any], tensors: dict[str, mx.array], path: Path) -> dict:
    """Hugging Face `config.json` for a `llama` GGUF file (no quantization block)."""

    def get(key: str, default: Any = _REQUIRED) -> Any:
        return meta(metadata, key, path, default)

    hidden = get("llama.embedding_length")
    heads = get("llama.attention.head_count")
    head_dim = get("llama.attention.key_length", hidden // heads)
    rope_dims = get("llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ConversionError(
            f"{path}: partial rotary embedding ({rope_dims} of {head_dim} dims) is not Llama"
        )
    vocab = tensors["token_embd.weight"].shape[0] if "token_embd.weight" in tensors else None
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": get("llama.feed_forward_length"),
        "num_hidden_layers": get("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": get("llama.context_length"),
        "vocab_size": get("llama.vocab_size", vocab),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if vocab is not None and config["vocab_size"] != vocab:
        raise ConversionError(
            f"{path}: llama.vocab_size is {config['vocab_size']} but token_embd has {vocab} rows"
        )
    if (rope_scaling := _rope_scaling(metadata, path)) is not None:
        config["rope_scaling"] = rope_scaling
    for name in ("bos", "eos"):
        if (token_id := get(f"tokenizer.ggml.{name}_token_id", None)) is not None:
            config[f"{name}_token_id"] = token_id
    # float32 metadata comes back as 9.999999747378752e-06; keep the decimal it stands for.
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.7g}")
    config["rope_theta"] = float(f"{config['rope_theta']:.7g}")
    return config


def _rope_scaling(metadata: dict[str, Any], path: Path) -> dict | None:
    kind = meta(metadata, "llama.rope.scaling.type", path, "none")
    factor = meta(metadata, "llama.rope.scaling.factor", path, None)
    if factor is None and "llama.rope.scale_linear" in metadata:  # older files
        kind, factor = "linear", meta(metadata, "llama.rope.scale_linear", path)
    if kind == "none" or factor in (None, 0.0, 1.0):
        return None
    if kind != "linear":
        raise ConversionError(f"{path}: rope scaling type {kind!r} is not supported (only linear)")
    return {"rope_type": "linear", "factor": float(f"{factor:.7g}")}


def hf_weights(tensors: dict[str, mx.array], config: dict, path: Path) -> dict[str, mx.array]:
    """GGUF tensors renamed to Hugging Face names, with q/k rows back in HF order.

    Quantized tensors stay packed: `name.weight` (out, in * bits / 32) uint32,
    `name.scales` and `name.biases` (out, in / group_size).
    """
    weights = {hf_name(name, path): array for name, array in tensors.items()}
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name, array in weights.items():
        module = name.rsplit(".", 2)[-2]
        if module in heads:
            if array.shape[0] % (2 * heads[module]):
                raise ConversionError(
                    f"{path}: tensor {name!r} has {array.shape[0]} rows, which do not split "
                    f"into {heads[module]} heads of rotary pairs"
                )
            weights[name] = unpermute_rows(array, heads[module])

    expected = {"model.embed_tokens", "model.norm"} | {
        f"model.layers.{i}.{module}"
        for i in range(config["num_hidden_layers"])
        for module in LAYER_NAMES.values()
    }
    if not config["tie_word_embeddings"]:
        expected.add("lm_head")
    present = {name.rsplit(".", 1)[0] for name in weights}
    if missing := sorted(expected - present):
        raise ConversionError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    if extra := sorted(present - expected):
        raise ConversionError(f"{path}: tensor {extra[0]!r} does not belong to the Llama layout")
    return weights


def hf_name(gguf_name: str, path: Path) -> str:
    """`blk.3.attn_q.scales` -> `model.layers.3.self_attn.q_proj.scales`."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix in SUFFIXES:
        if stem in GLOBAL_NAMES:
            return f"{GLOBAL_NAMES[stem]}.{suffix}"
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
        if match and match[2] in LAYER_NAMES:
            return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}.{suffix}"
    raise ConversionError(f"{path}: tensor {gguf_name!r} has no Llama (Hugging Face) equivalent")


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row order: (n_heads * head_dim, ...) -> same shape.

    Hugging Face keeps each head's rotary halves apart (rows 0..d/2-1 pair with rows
    d/2..d-1); llama.cpp's converter interleaves them so pairs are adjacent:
    `w.reshape(n_heads, 2, d // 2, ...).swapaxes(1, 2)`. The inverse swaps back. Only
    rows move, so it applies unchanged to a packed weight and to its scales and biases
    (quantization groups run along the input dimension).
    Example, one head with d = 4: GGUF rows [r0, r2, r1, r3] -> HF rows [r0, r1, r2, r3].
    """
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def quantization_config(
    weights: dict[str, mx.array], header: dict[str, tuple[str, tuple[int, ...]]], path: Path
) -> dict | None:
    """mlx-lm's `quantization` block, or None when no tensor is quantized.

    The most common (group_size, bits) is the default; modules quantized differently
    (SmolLM2's Q4_1 file keeps token_embd at Q8_0) get their own entry, and float
    modules next to quantized ones get `false`, as mlx-lm's mixed recipes record them.
    """
    in_dims = {
        hf_name(name, path).removesuffix(".weight"): shape[-1]
        for name, (_, shape) in header.items()
        if name.endswith(".weight")
    }
    params: dict[str, dict[str, Any]] = {}
    for name in weights:
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            bits = weights[f"{module}.weight"].shape[-1] * 32 // in_dims[module]
            group_size = in_dims[module] // weights[name].shape[-1]
            params[module] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    if not params:
        return None
    counts = collections.Counter(tuple(p.items()) for p in params.values())
    default = dict(counts.most_common(1)[0][0])
    config: dict[str, Any] = dict(default)
    for module, p in sorted(params.items()):
        if p != default:
            config[module] = p
    for name in sorted(weights):
        module = name.removesuffix(".weight")
        if module != name and module not in params and "norm" not in module:
            config[module] = False
    return config


# --- tokenizer -------------------------------------------------------------------------
