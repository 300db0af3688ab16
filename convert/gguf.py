"""GGUF files (llama.cpp) -> MLX model folders in the mlx-lm layout.

`convert_gguf("model.Q4_1.gguf", "out/")` writes:
- `config.json`: Hugging Face keys (plus mlx-lm's `quantization` block when quantized);
- `model.safetensors`: Hugging Face tensor names, quantized tensors kept packed;
- `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
  `generation_config.json` (its `eos_token_id` lists every end-of-generation token),
  rebuilt from the tokenizer stored in the GGUF metadata (convert/gguf_tokenizer.py).
`mlx_lm.utils.load("out/")` and `specstream_mlx.load("out/")` load the result as it is.

Architectures (`general.architecture`, see FAMILIES): `llama` (Llama 2/3, Mistral 7B's
layout, SmolLM), `qwen2` (Qwen2 / Qwen2.5: biases on q, k, v) and `qwen3` (dense: q/k
RMS norms per head). Everything that can refuse a file is checked first, from the
header alone (metadata and the table of tensors, no tensor data), in one line: the
architecture, the tokenizer and its pre-tokenizer, the tensor types, every metadata
key, the tensor names and shapes, and that the file holds all the data it announces.

What a GGUF file needs undone:
- tensor names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, ...;
- the rows of `q_proj` and `k_proj` of `llama` files: llama.cpp's converter (its
  LlamaModel) reorders each head's rows from Hugging Face's "two rotary halves"
  layout to interleaved pairs (see `unpermute_rows`); its Qwen2 and Qwen3 converters
  write them as they are;
- a tied head: a file without `output.weight` uses the embedding (tie_word_embeddings);
- Llama 3.1+ rotary scaling, stored as the `rope_freqs` tensor of per-pair factors,
  back to the `llama3` rope_scaling block (see `llama3_rope_scaling`);
- quantization: MLX reads Q4_0, Q4_1 and Q8_0 tensors as affine triples
  (`weight` uint32, `scales`, `biases`; group size 32), which are exactly mlx-lm's
  quantized layout, so files holding only those (and F32/F16/BF16) stay packed. MLX
  expands Q2_K and Q6_K next to them to float16 (kept, with a warning). MLX cannot
  read most other types, and its Q4_K reader (mlx 0.32) gives every second 32-weight
  sub-block the scale and min of the one before it; a file with any such type
  (K-quants, Q5_0, IQ*, ...) is read with llama.cpp's own `gguf` package (the optional
  extra `specstream-mlx[gguf]`): every quantized tensor is dequantized by its
  reference code to float32, which holds the dequantized values exactly (float16
  does not: an f16 scale times a 5-bit integer needs 16 bits of mantissa). Cast with
  `specstream convert --dtype`, re-quantize with `-q`.
"""

from __future__ import annotations

import collections
import math
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from specstream_mlx.convert.gguf_tokenizer import (
    _REQUIRED,
    build_tokenizer,
    check_tokenizer,
    end_of_generation_ids,
    meta,
    save_tokenizer,
)
from specstream_mlx.convert.output import check_target
from specstream_mlx.convert.output import install as _install
from specstream_mlx.convert.output import staging_folder as _staging_folder
from specstream_mlx.convert.output import write_json as _write_json
from specstream_mlx.errors import ConversionError
from specstream_mlx.shipped import attach_fitting

# ggml tensor type ids (ggml.h) -> names, and what MLX's GGUF reader does with each.
# fmt: off
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
}
# (weights per block, bytes per block) of the types MLX reads; the gguf package knows the rest.
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
          "Q8_0": (32, 34), "Q2_K": (256, 84), "Q6_K": (256, 210)}
# fmt: on
PACKED_TYPES = {"Q4_0", "Q4_1", "Q8_0"}  # read as affine (weight, scales, biases)
FLOAT_TYPES = {"F32", "F16", "BF16"}
DEQUANTIZED_TYPES = {"Q2_K", "Q6_K"}  # MLX expands these to float16 (checked correct)
MLX_READABLE_TYPES = PACKED_TYPES | FLOAT_TYPES | DEQUANTIZED_TYPES
GGUF_EXTRA_HINT = "pip install 'specstream-mlx[gguf]'"


@dataclass(frozen=True)
class Family:
    """How the tensors and metadata of one `general.architecture` map onto Hugging Face.

    model_type, hf_class: config.json's `model_type` and `architectures`;
    permuted_qk: llama.cpp's converter reordered the q/k rows (see unpermute_rows);
    layer_tensors: per-layer GGUF tensors beyond the Llama set, e.g. "attn_q.bias".
    """

    model_type: str
    hf_class: str
    permuted_qk: bool
    layer_tensors: tuple[str, ...] = ()


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", permuted_qk=False,
                    layer_tensors=("attn_q.bias", "attn_k.bias", "attn_v.bias")),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", permuted_qk=False,
                    layer_tensors=("attn_q_norm.weight", "attn_k_norm.weight")),
}

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
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
LLAMA_LAYER_TENSORS = tuple(f"{name}.weight" for name in (
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
    "attn_norm", "ffn_norm"))
SUFFIXES = ("weight", "bias", "scales", "biases")  # scales, biases: MLX's packed triples
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+: per-pair rotary factors (no HF tensor)


def convert_gguf(
    gguf_path: str | Path, mlx_path: str | Path, *, force: bool = False, dtype: str = "float32",
    shipped_streams: bool = False,
) -> Path:
    """Convert a llama, qwen2 or qwen3 GGUF file into an MLX model folder.

    Args:
        gguf_path: the `.gguf` file.
        mlx_path: the folder to create; its parent is created when missing.
        force: replace an existing `mlx_path` (only once the new folder is complete).
        dtype: float type of the tensors dequantized with the gguf package
            (float32, float16 or bfloat16; float32 keeps them exact).
        shipped_streams: attach the package's trained streams for this model, when it
            ships some (`specstream convert` does; the raw import alone does not).

    Returns:
        `mlx_path` as a Path.

    Raises:
        ConversionError: missing, truncated or non-GGUF file; unsupported architecture,
            tokenizer, pre-tokenizer, tensor type or rope scaling; a missing, unknown or
            misshapen tensor; `mlx_path` exists and `force` is False. All are raised
            before any tensor data is read, from the header, but for a `rope_freqs`
            tensor that is not Llama 3 scaling (read, a few hundred bytes, after them).

    Everything is written to a hidden sibling folder renamed into place at the end, so
    an interrupted conversion never leaves a half-written `mlx_path`.
    """
    gguf_path, mlx_path = Path(gguf_path), Path(mlx_path)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConversionError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    check_target(mlx_path, force)
    gguf_file = read_gguf(gguf_path, lambda m: check_metadata(m, gguf_path, complete=False))
    family = check_metadata(gguf_file.metadata, gguf_path)
    header = read_header(gguf_path, gguf_file)
    config = hf_config(gguf_file, family, gguf_path)
    check_tensors(header, config, family, gguf_path)
    check_data(gguf_file, gguf_path)
    if ROPE_FREQS in gguf_file.tensors:  # a few hundred bytes, read after every check
        config["rope_scaling"] = llama3_rope_scaling(
            read_tensor(gguf_file, ROPE_FREQS, np.float32), config, gguf_path)
    tokenizer = build_tokenizer(gguf_file.metadata, gguf_path)

    if all(kind in MLX_READABLE_TYPES for kind, _ in header.values()):
        tensors = _load(gguf_path)
    else:
        tensors = load_with_gguf_package(gguf_file, getattr(mx, dtype))
    tensors.pop(ROPE_FREQS, None)
    weights = hf_weights(tensors, config, family, gguf_path)
    quantization = quantization_config(weights, header, gguf_path)
    if quantization is not None:
        config["quantization"] = config["quantization_config"] = quantization

    with _staging_folder(mlx_path) as staging:
        _write_json(staging / "config.json", config)
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        save_tokenizer(tokenizer, staging)
        eos = end_of_generation_ids(gguf_file.metadata, gguf_path)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
        if len(eos) > 1:
            generation["eos_token_id"] = eos
        _write_json(staging / "generation_config.json", generation)
        if shipped_streams:
            attach_fitting(staging, shown=mlx_path)
        _install(staging, mlx_path, force)
    return mlx_path


# --- reading the header -------------------------------------------------------------------


@dataclass
class TensorInfo:
    """One entry of the GGUF tensor table: ggml type name and id, row-major shape (as
    Hugging Face and MLX write it: GGUF lists dims fastest first), absolute byte offset
    of its data, and its byte size (None for a type whose block size is not known)."""

    kind: str
    type_id: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int | None


@dataclass
class GGUFFile:
    """A GGUF file's metadata (Python values) and tensor table, read without its data."""

    path: Path
    size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)


class _Reader:
    """Little-endian GGUF header fields, read from the start of a file a chunk at a time."""

    SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
    ARRAYS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
              10: "<u8", 11: "<i8", 12: "<f8"}
    STRING, ARRAY = 8, 9
    CHUNK = 1 << 22

    def __init__(self, f, path: Path):
        self.f, self.path, self.buf, self.pos = f, path, b"", 0

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            more = self.f.read(max(n + self.pos - len(self.buf), self.CHUNK))
            self.buf = self.buf[self.pos:] + more
            self.pos = 0
            if n > len(self.buf):
                raise ConversionError(f"{self.path}: file ends inside the GGUF header (truncated?)")

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        self.need(size)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def peek_count(self) -> int:
        """The item count of the array value about to be read (nothing is consumed)."""
        self.need(12)
        return struct.unpack_from("<Q", self.buf, self.pos + 4)[0]

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        self.need(n)
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8")

    def value(self, kind: int) -> Any:
        if kind in self.SCALARS:
            return self.unpack(self.SCALARS[kind])[0]
        if kind == self.STRING:
            return self.string()
        if kind != self.ARRAY:
            raise ConversionError(f"{self.path}: unknown GGUF metadata type {kind}")
        item_kind, count = self.unpack("<IQ")
        if item_kind in self.ARRAYS:
            dtype = np.dtype(self.ARRAYS[item_kind])
            self.need(dtype.itemsize * count)
            values = np.frombuffer(self.buf, dtype, count, self.pos)
            self.pos += dtype.itemsize * count
            return values.tolist()
        if item_kind == self.STRING:
            return self.strings(count)
        return [self.value(item_kind) for _ in range(count)]

    def strings(self, count: int) -> list[str]:
        """`count` strings; the vocabulary's 150k tokens and merges pass through here, so
        the loop stays tight."""
        out, unpack = [], struct.unpack_from
        for _ in range(count):
            if self.pos + 8 > len(self.buf):
                self.need(8)
            (n,) = unpack("<Q", self.buf, self.pos)
            start = self.pos + 8
            if start + n > len(self.buf):
                self.pos += 8
                self.need(n)
                start = self.pos
            out.append(self.buf[start:start + n].decode("utf-8"))
            self.pos = start + n
        return out


def read_gguf(path: Path, early_check: Callable[[dict[str, Any]], None] | None = None
              ) -> GGUFFile:
    """The metadata and tensor table of a GGUF file (v2 or v3), without any tensor data.

    early_check(metadata) runs once on the keys read before the first large array (the
    vocabulary: most of the header, and 1 s of parsing for 150k tokens), or at the end
    of the metadata: llama.cpp writes `general.*`, the architecture's keys and the
    tokenizer's kind before it, so a file we refuse is refused in milliseconds.
    Raises ConversionError naming the file when it is missing, not GGUF, or ends
    inside its header.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            reader = _Reader(f, path)
            reader.need(4)
            if reader.buf[:4] != b"GGUF":
                raise ConversionError(f"{path} is not a GGUF file (no 'GGUF' magic)")
            reader.pos = 4
            (version,) = reader.unpack("<I")
            if version < 2:
                raise ConversionError(f"{path}: GGUF version {version} is too old; reconvert it")
            if version > 0xFFFF:
                raise ConversionError(f"{path}: big-endian GGUF files are not supported")
            n_tensors, n_kv = reader.unpack("<QQ")
            gguf_file = GGUFFile(path, size)
            for _ in range(n_kv):
                key = reader.string()
                (kind,) = reader.unpack("<I")
                if early_check is not None and kind == reader.ARRAY and reader.peek_count() > 4096:
                    early_check(gguf_file.metadata)
                    early_check = None
                gguf_file.metadata[key] = reader.value(kind)
            if early_check is not None:
                early_check(gguf_file.metadata)
            table = []
            for _ in range(n_tensors):
                name = reader.string()
                (n_dims,) = reader.unpack("<I")
                dims = reader.unpack(f"<{n_dims}Q")
                type_id, offset = reader.unpack("<IQ")
                table.append((name, dims, type_id, offset))
            header_end = f.tell() - len(reader.buf) + reader.pos
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{path}: cannot read the GGUF header ({e})") from None

    alignment = gguf_file.metadata.get("general.alignment", 32)
    data_start = -(-header_end // alignment) * alignment
    for name, dims, type_id, offset in table:
        kind = GGML_TYPES.get(type_id, f"type {type_id}")
        gguf_file.tensors[name] = TensorInfo(kind, type_id, tuple(reversed(dims)),
                                             data_start + offset, _nbytes(kind, dims))
    return gguf_file


def _nbytes(kind: str, dims: tuple[int, ...]) -> int | None:
    block = BLOCKS.get(kind)
    if block is None and (gguf := _gguf_package()) is not None:
        qtype = getattr(gguf.GGMLQuantizationType, kind, None)
        block = gguf.GGML_QUANT_SIZES.get(qtype) if qtype is not None else None
    if block is None:
        return None
    return math.prod(dims) // block[0] * block[1]


def check_metadata(metadata: dict[str, Any], path: Path, complete: bool = True
                   ) -> Family | None:
    """The Family of `general.architecture`, its tokenizer checked; ConversionError (one
    line) for anything we do not convert. complete=False checks only the keys present
    (the start of the header); it then returns None."""
    architecture = metadata.get("general.architecture")
    if (complete or architecture is not None) and architecture not in FAMILIES:
        raise ConversionError(
            f"{path}: architecture {architecture!r} is not supported "
            f"(supported: {', '.join(FAMILIES)})"
        )
    check_tokenizer(metadata, path, complete)
    return FAMILIES[architecture] if complete else None


def read_header(path: Path, gguf_file: GGUFFile | None = None
                ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (ggml type name, shape in row-major order), types checked.

    Types MLX cannot read need the gguf package: without it they are refused here, by
    name. MLX's reader names neither the tensor nor the type it fails on, and silently
    drops some types (TQ1_0, TQ2_0), so the types are checked before any reading.
    """
    gguf_file = gguf_file or read_gguf(path)
    header = {name: (t.kind, t.shape) for name, t in gguf_file.tensors.items()}
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
    for name, t in gguf_file.tensors.items():
        if t.nbytes is None:
            raise ConversionError(f"{path}: tensor {name!r} is {t.kind}, which cannot be read")
    quantized = {t for t, _ in header.values() if t not in FLOAT_TYPES}
    if unreadable:
        warnings.warn(
            f"{path.name}: {sorted(quantized)} tensors are dequantized (llama.cpp's gguf "
            f"package); the converted folder is larger than the file (cast it with "
            f"`specstream convert --dtype`, re-quantize it with `-q`)",
            stacklevel=3,
        )
    elif expanded := sorted(quantized & DEQUANTIZED_TYPES):
        warnings.warn(
            f"{path.name}: {expanded} tensors are expanded to float16 (MLX keeps only "
            f"Q4_0/Q4_1/Q8_0 packed); the converted folder is larger than the file "
            f"(re-quantize it with `specstream convert -q`)",
            stacklevel=3,
        )
    return header


def check_data(gguf_file: GGUFFile, path: Path) -> None:
    """Every tensor's data lies inside the file (a truncated download fails here, named)."""
    for name, t in gguf_file.tensors.items():
        if t.nbytes is not None and t.offset + t.nbytes > gguf_file.size:
            raise ConversionError(
                f"{path}: the file ends inside tensor {name!r} ({gguf_file.size:,} bytes, "
                f"its data ends at {t.offset + t.nbytes:,}): truncated?"
            )


# --- reading tensors ---------------------------------------------------------------------


def _load(path: Path) -> dict[str, mx.array]:
    """MLX's GGUF reader (quantized tensors packed), with its errors naming the file."""
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ConversionError(f"{path}: cannot load the GGUF file ({e})") from None


def _gguf_package():
    """llama.cpp's `gguf` package (the optional extra), or None when it is not installed."""
    try:
        import gguf
    except ImportError:
        return None
    return gguf


def read_tensor(gguf_file: GGUFFile, name: str, dtype=np.float32) -> np.ndarray:
    """One F32/F16 tensor's data as numpy (row-major shape), read straight from the file."""
    t = gguf_file.tensors[name]
    source = {"F32": np.float32, "F16": np.float16}.get(t.kind)
    if source is None:
        raise ConversionError(f"{gguf_file.path}: tensor {name!r} is {t.kind}, expected F32")
    with open(gguf_file.path, "rb") as f:
        f.seek(t.offset)
        data = np.frombuffer(f.read(t.nbytes), source)
    return data.reshape(t.shape).astype(dtype)


def load_with_gguf_package(gguf_file: GGUFFile, dtype: mx.Dtype = mx.float32
                           ) -> dict[str, mx.array]:
    """Every tensor of the file as MLX arrays, quantized ones dequantized by the gguf
    package's reference code to float32, then cast to `dtype`.

    F32, F16 and BF16 tensors keep their type. Shapes are row-major, as MLX reads them.
    Tensors are read one at a time, so the peak is the converted weights plus one
    tensor in float32.
    """
    gguf = _gguf_package()
    tensors = {}
    with open(gguf_file.path, "rb") as f:
        for name, t in gguf_file.tensors.items():
            f.seek(t.offset)
            raw = np.frombuffer(f.read(t.nbytes), np.uint8)
            if t.kind in FLOAT_TYPES:
                view = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[t.kind])
                array = mx.array(view.reshape(t.shape))
                tensors[name] = array.view(mx.bfloat16) if t.kind == "BF16" else array
                continue
            qtype = gguf.GGMLQuantizationType(t.type_id)
            try:  # blocks run along rows: (rows, bytes per row) -> (rows, weights per row)
                w = gguf.quants.dequantize(raw.reshape(math.prod(t.shape[:-1]), -1), qtype)
            except NotImplementedError:
                raise ConversionError(
                    f"{gguf_file.path}: tensor {name!r} is {t.kind}, which the gguf package "
                    f"cannot dequantize"
                ) from None
            array = mx.array(w.reshape(t.shape))
            tensors[name] = array if dtype == mx.float32 else array.astype(dtype)
            mx.eval(tensors[name])  # now, so the float32 copy is freed before the next one
    return tensors


# --- config and weights ----------------------------------------------------------------


def hf_config(gguf_file: GGUFFile, family: Family, path: Path) -> dict:
    """Hugging Face `config.json` of the file (no quantization block), from metadata."""
    metadata = gguf_file.metadata
    arch = metadata["general.architecture"]

    def get(key: str, default: Any = _REQUIRED) -> Any:
        return meta(metadata, f"{arch}.{key}", path, default)

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise ConversionError(f"{path}: value heads differ in size from key heads")
    rope_dims = get("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ConversionError(
            f"{path}: partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported"
        )
    embedding = gguf_file.tensors.get("token_embd.weight")
    vocab = embedding.shape[0] if embedding is not None else None
    config = {
        "model_type": family.model_type,
        "architectures": [family.hf_class],
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "vocab_size": get("vocab_size", vocab),
        "tie_word_embeddings": "output.weight" not in gguf_file.tensors,
    }
    if vocab is not None and config["vocab_size"] != vocab:
        raise ConversionError(
            f"{path}: {arch}.vocab_size is {config['vocab_size']} but token_embd has {vocab} rows"
        )
    tokens = metadata.get("tokenizer.ggml.tokens", ())
    if config["vocab_size"] is not None and len(tokens) > config["vocab_size"]:
        raise ConversionError(
            f"{path}: the tokenizer has {len(tokens)} tokens but the embedding only "
            f"{config['vocab_size']} rows"
        )
    if (rope_scaling := _rope_scaling(metadata, arch, path)) is not None:
        config["rope_scaling"] = rope_scaling
    for name in ("bos", "eos"):
        if (token_id := meta(metadata, f"tokenizer.ggml.{name}_token_id", path, None)) is not None:
            config[f"{name}_token_id"] = token_id
    # float32 metadata comes back as 9.999999747378752e-06; keep the decimal it stands for.
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.7g}")
    config["rope_theta"] = float(f"{config['rope_theta']:.7g}")
    return config


def _rope_scaling(metadata: dict[str, Any], arch: str, path: Path) -> dict | None:
    kind = meta(metadata, f"{arch}.rope.scaling.type", path, "none")
    factor = meta(metadata, f"{arch}.rope.scaling.factor", path, None)
    if factor is None and f"{arch}.rope.scale_linear" in metadata:  # older files
        kind, factor = "linear", meta(metadata, f"{arch}.rope.scale_linear", path)
    if kind == "none" or factor in (None, 0.0, 1.0):
        return None
    if kind != "linear":
        raise ConversionError(f"{path}: rope scaling type {kind!r} is not supported (only linear)")
    return {"rope_type": "linear", "factor": float(f"{factor:.7g}")}


def llama3_rope_scaling(factors: np.ndarray, config: dict, path: Path) -> dict:
    """Hugging Face's `llama3` rope_scaling from llama.cpp's `rope_freqs` tensor.

    factors: (head_dim / 2,) float32, what llama.cpp's converter computes per rotary
    pair from factor, low_freq_factor, high_freq_factor and the original context L:
    1 for short wavelengths, `factor` for long ones, and 1 / ((1 - s) / factor + s) in
    between, with s = (L / wavelength - low) / (high - low). Only A = L / (high - low)
    and B = low / (high - low) matter (the bounds are s = 0 and s = 1), so they are
    fitted on the pairs in between and given back with low = 1, as Llama 3.x has it;
    the result must reproduce every factor, or the file is refused.
    """
    head_dim, theta = config["head_dim"], config["rope_theta"]
    if config.get("rope_scaling") is not None or factors.shape != (head_dim // 2,):
        raise ConversionError(f"{path}: rope_freqs of shape {factors.shape} does not fit the "
                              f"model (head_dim {head_dim}) or its rope scaling")
    factors = factors.astype(np.float64)
    factor = float(factors.max())
    wavelength = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    between = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    scaling = None
    if factor > 1 and between.sum() >= 2:
        s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        a, minus_b = np.polyfit(1 / wavelength[between], s, 1)
        low = 1.0
        high = low * (1 - 1 / minus_b)
        original = round(a * (high - low))
        scaling = {"rope_type": "llama3", "factor": float(f"{factor:.7g}"),
                   "low_freq_factor": low, "high_freq_factor": float(f"{high:.6g}"),
                   "original_max_position_embeddings": original}
    if scaling is None or not np.allclose(_llama3_factors(scaling, wavelength), factors,
                                          rtol=1e-4, atol=0):
        raise ConversionError(f"{path}: the rope_freqs tensor is not Llama 3 rotary scaling "
                              f"that can be recovered")
    return scaling


def _llama3_factors(scaling: dict, wavelength: np.ndarray) -> np.ndarray:
    """Per-pair factors of a llama3 rope_scaling, as llama.cpp's converter writes them."""
    factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    original = scaling["original_max_position_embeddings"]
    s = (original / wavelength - low) / (high - low)
    middle = 1 / ((1 - s) / factor + s)
    return np.where(wavelength < original / high, 1.0,
                    np.where(wavelength > original / low, factor, middle))


def expected_shapes(config: dict, family: Family) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> row-major shape, for the model `config` describes."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim, vocab = config["head_dim"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    per_layer = {
        "attn_q.weight": (q, hidden), "attn_k.weight": (kv, hidden),
        "attn_v.weight": (kv, hidden), "attn_output.weight": (hidden, q),
        "ffn_gate.weight": (inter, hidden), "ffn_up.weight": (inter, hidden),
        "ffn_down.weight": (hidden, inter), "attn_norm.weight": (hidden,),
        "ffn_norm.weight": (hidden,), "attn_q.bias": (q,), "attn_k.bias": (kv,),
        "attn_v.bias": (kv,), "attn_q_norm.weight": (head_dim,),
        "attn_k_norm.weight": (head_dim,),
    }
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        for name in LLAMA_LAYER_TENSORS + family.layer_tensors:
            shapes[f"blk.{i}.{name}"] = per_layer[name]
    return shapes


def check_tensors(header: dict[str, tuple[str, tuple[int, ...]]], config: dict,
                  family: Family, path: Path) -> None:
    """Every tensor of the architecture is there with its shape, and nothing else."""
    expected = expected_shapes(config, family)
    present = {name for name in header if name != ROPE_FREQS}
    if missing := [name for name in expected if name not in present]:
        hf = hf_name(missing[0], path).removesuffix(".weight")
        raise ConversionError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r} "
                              f"({hf})")
    if extra := sorted(present - expected.keys()):
        raise ConversionError(f"{path}: tensor {extra[0]!r} does not belong to the "
                              f"{config['model_type']} layout")
    for name, shape in expected.items():
        if header[name][1] != shape:
            raise ConversionError(f"{path}: tensor {name!r} has shape {header[name][1]}, but "
                                  f"the metadata makes it {shape}")
    if ROPE_FREQS in header and not family.permuted_qk:
        raise ConversionError(f"{path}: tensor {ROPE_FREQS!r} is only known in llama files")


def hf_weights(tensors: dict[str, mx.array], config: dict, family: Family,
               path: Path) -> dict[str, mx.array]:
    """GGUF tensors renamed to Hugging Face names; q/k rows back in HF order for llama.

    Quantized tensors stay packed: `name.weight` (out, in * bits / 32) uint32,
    `name.scales` and `name.biases` (out, in / group_size).
    """
    weights = {hf_name(name, path): array for name, array in tensors.items()}
    if not family.permuted_qk:
        return weights
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
    raise ConversionError(f"{path}: tensor {gguf_name!r} has no Hugging Face equivalent")


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
        if name.endswith(".weight") and name != ROPE_FREQS
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
