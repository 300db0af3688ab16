"""Tests of `specstream convert` (convert/hf.py, peft.py, quantize.py, output.py, the
GGUF route and the CLI subcommand).

Every test writes its own tiny checkpoint (tests/hf_fixtures.py: numpy + safetensors in
Hugging Face layout), converts it, and checks the folder against mlx-lm's loader, an
independent numpy computation or mlx-lm's own model built from the original weights.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hf_fixtures import tiny_config, write_hf_checkpoint, write_peft_adapter
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load

from specstream_mlx.cli import main as cli_main
from specstream_mlx.convert import gguf as gguf_module
from specstream_mlx.convert.gguf import convert_gguf
from specstream_mlx.convert.hf import ConvertOptions, convert
from specstream_mlx.convert.quantize import QuantPolicy
from specstream_mlx.decoding.step import generate_step
from specstream_mlx.errors import ConversionError
from specstream_mlx.loader import load

pytestmark = pytest.mark.filterwarnings("ignore:.*no speculative streams:UserWarning")

PROMPT = mx.array([[1, 5, 40, 77, 3, 50, 12, 9, 60, 2, 33]])
# fp32 logits up to ~20 through two models' op orders: a tuned BLAS (MKL) differs from the
# reference by ~1e-5 relative; a conversion error differs by whole units.
ATOL = 1e-4


def ours(folder: Path, precision: str = "native") -> nn.Module:
    return load(folder, precision=precision)[0]


def theirs(folder: Path) -> nn.Module:
    return mlx_lm_load(str(folder))[0]


def main_logits(model: nn.Module) -> mx.array:
    """(L, vocab) logits of PROMPT from either implementation."""
    out = model(PROMPT)
    return (out[0] if isinstance(out, tuple) else out)[0]


def reference_logits(config: dict, weights: dict[str, np.ndarray]) -> mx.array:
    """mlx-lm's model of the architecture on the original weights: no converter involved."""
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model(PROMPT)[0]


def saved(folder: Path, name: str) -> mx.array:
    """One tensor of the converted folder's weights."""
    return mx.load(str(folder / "model.safetensors"))[name]


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders a conversion may have left beside its output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(params=["llama", "qwen2", "qwen3"])
def hf_arch(request) -> str:
    return request.param


# --- round trips ---------------------------------------------------------------------------


def test_float32_round_trip_loads_in_both(tmp_path, hf_arch):
    src, weights = write_hf_checkpoint(tmp_path / "hf", hf_arch)
    out = convert(src, tmp_path / "out")

    for name, value in weights.items():
        assert np.array_equal(np.array(saved(out, name)), value), name
    assert set(mx.load(str(out / "model.safetensors"))) == set(weights)
    expected = reference_logits(tiny_config(hf_arch), weights)
    assert mx.allclose(main_logits(ours(out)), expected, atol=ATOL, rtol=ATOL)
    assert mx.allclose(main_logits(theirs(out)), expected, atol=ATOL, rtol=ATOL)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_folders_load_in_both_and_agree(tmp_path, bits):
    src, weights = write_hf_checkpoint(tmp_path / "hf", "llama")
    options = ConvertOptions(quantize=QuantPolicy(bits=bits, group_size=32))
    out = convert(src, tmp_path / "out", options)

    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    ours_model, theirs_model = ours(out), theirs(out)
    assert isinstance(ours_model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(ours_model.model.embed_tokens, nn.QuantizedEmbedding)
    a, b = main_logits(ours_model), main_logits(theirs_model)
    assert mx.allclose(a, b, atol=1e-4, rtol=1e-4)
    error = mx.abs(a - reference_logits(tiny_config("llama"), weights)).mean().item()
    assert error < {4: 0.8, 8: 0.05}[bits]  # close to float, closer with more bits


def test_float_from_quantized_folder_is_exact_dequantization(tmp_path):
    src, _ = write_hf_checkpoint(tmp_path / "hf", "qwen2")
    q4 = convert(src, tmp_path / "q4", ConvertOptions(quantize=QuantPolicy(bits=4)))
    back = convert(q4, tmp_path / "back", ConvertOptions(dtype="float32"))

    packed = mx.load(str(q4 / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj"
    expected = mx.dequantize(packed[f"{name}.weight"], packed[f"{name}.scales"],
                             packed[f"{name}.biases"], group_size=64, bits=4)
    assert mx.array_equal(saved(back, f"{name}.weight"), expected.astype(mx.float32))
    assert "quantization" not in json.loads((back / "config.json").read_text())
    assert mx.allclose(main_logits(ours(back)), main_logits(ours(q4)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype(tmp_path, dtype):
    src, weights = write_hf_checkpoint(tmp_path / "hf", "qwen3")
    out = convert(src, tmp_path / "out", ConvertOptions(dtype=dtype))

    stored = mx.load(str(out / "model.safetensors")).values()
    assert all(v.dtype == getattr(mx, dtype) for v in stored)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    a, b = main_logits(ours(out)), main_logits(theirs(out))
    assert a.dtype == getattr(mx, dtype)
    assert mx.allclose(a, b, atol=1e-2, rtol=1e-2)
    expected = reference_logits(tiny_config("qwen3"), weights)
    assert mx.abs(a.astype(mx.float32) - expected).mean().item() < 0.2


def test_default_dtype_is_the_checkpoints_torch_dtype(tmp_path):
    config = {**tiny_config("llama"), "torch_dtype": "bfloat16"}
    src, _ = write_hf_checkpoint(tmp_path / "hf", config=config)
    out = convert(src, tmp_path / "out")
    assert saved(out, "model.norm.weight").dtype == mx.bfloat16


def test_sharded_checkpoint_equals_single_file(tmp_path):
    single, _ = write_hf_checkpoint(tmp_path / "one", "qwen2")
    sharded, _ = write_hf_checkpoint(tmp_path / "three", "qwen2", shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    a = mx.load(str(convert(single, tmp_path / "a") / "model.safetensors"))
    b = mx.load(str(convert(sharded, tmp_path / "b") / "model.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


def test_rotary_tables_and_tied_head_copies_are_dropped(tmp_path):
    extra = {
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
        "lm_head.weight": np.ones((97, 64), np.float32),  # a tied model's duplicate head
    }
    src, _ = write_hf_checkpoint(tmp_path / "hf", "qwen2", extra=extra)
    names = mx.load(str(convert(src, tmp_path / "out") / "model.safetensors")).keys()
    assert not any("inv_freq" in n or n.startswith("lm_head") for n in names)


# --- quantization policy -------------------------------------------------------------------


def test_keep_high_policy_and_float_streams(tmp_path):
    src, _ = write_hf_checkpoint(tmp_path / "hf", "llama")
    policy = QuantPolicy(bits=4, group_size=32, keep_high=("streams", "embeddings", "head"))
    out = convert(src, tmp_path / "out", ConvertOptions(quantize=policy, init_streams=(3, 2)))

    quantization = json.loads((out / "config.json").read_text())["quantization"]
    high = {"group_size": 32, "bits": 8, "mode": "affine"}
    for module in ["model.embed_tokens", "lm_head", "model.layers.2.self_attn.q_proj",
                   "model.layers.3.mlp.down_proj"]:
        assert quantization[module] == high, module
    assert "model.layers.1.self_attn.q_proj" not in quantization  # the 4-bit default
    model = ours(out)
    assert model.layers[3].mlp.down_proj.bits == 8 and model.layers[1].mlp.down_proj.bits == 4
    assert model.lm_head.bits == 8
    assert all(v.dtype == mx.float32 for v in mx.load(str(out / "streams.safetensors")).values())
    assert mx.allclose(main_logits(model), main_logits(theirs(out)), atol=1e-4, rtol=1e-4)


def test_keep_high_as_float(tmp_path):
    src, _ = write_hf_checkpoint(tmp_path / "hf", "qwen2")  # tied: the head is the embedding
    policy = QuantPolicy(bits=8, group_size=32, keep_high=("head",), high_bits=None)
    model = ours(convert(src, tmp_path / "out", ConvertOptions(quantize=policy)))
    assert type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


# --- PEFT adapters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, scale_of",
    [
        ({}, lambda module, r, alpha: alpha / r),
        ({"use_rslora": True}, lambda module, r, alpha: alpha / np.sqrt(r)),
        ({"alpha_pattern": {"down_proj": 2.0}},
         lambda module, r, alpha: (2.0 if module.endswith("down_proj") else alpha) / r),
    ],
    ids=["lora", "rslora", "alpha_pattern"],
)
def test_fused_adapter_equals_numpy(tmp_path, extra, scale_of):
    src, weights = write_hf_checkpoint(tmp_path / "hf", "llama")
    pairs = write_peft_adapter(tmp_path / "lora", weights, ["q_proj", "v_proj", "down_proj"],
                               r=4, alpha=8.0, **extra)
    options = ConvertOptions(adapter_path=tmp_path / "lora", adapter_mode="fused")
    out = convert(src, tmp_path / "out", options)

    assert len(pairs) == 12
    for module, (a, b) in pairs.items():
        expected = weights[f"{module}.weight"] + scale_of(module, 4, 8.0) * (b @ a)
        np.testing.assert_allclose(np.array(saved(out, f"{module}.weight")), expected,
                                   atol=1e-6, rtol=1e-6)
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert np.array_equal(np.array(saved(out, untouched)), weights[untouched])


def test_stream_only_adapter_keeps_main_stream(tmp_path):
    src, weights = write_hf_checkpoint(tmp_path / "hf", "llama")
    pairs = write_peft_adapter(tmp_path / "lora", weights, ["q_proj", "v_proj", "gate_proj"],
                               layers=[2, 3], r=4, alpha=8.0)
    base = convert(src, tmp_path / "base", ConvertOptions(init_streams=(3, 2)))
    options = ConvertOptions(init_streams=(3, 2), adapter_path=tmp_path / "lora",
                             adapter_mode="streams")
    adapted = convert(src, tmp_path / "adapted", options)

    block = json.loads((adapted / "config.json").read_text())["speculative_streaming"]
    assert block["adapter_rank"] == 4 and block["adapter_scale"] == 2.0
    streams = mx.load(str(adapted / "streams.safetensors"))
    a, b = pairs["model.layers.3.self_attn.v_proj"]
    assert np.array_equal(np.array(streams["streams.adapters.1.v_proj_a"]), a)
    assert np.array_equal(np.array(streams["streams.adapters.1.v_proj_b"]), b)
    assert not np.any(np.array(streams["streams.adapters.0.o_proj_b"]))  # not adapted: zero

    rows = mx.arange(PROMPT.shape[1], dtype=mx.int32)
    base_main, base_streams = ours(base)(PROMPT, stream_rows=rows)
    main, stream_logits = ours(adapted)(PROMPT, stream_rows=rows)
    assert mx.array_equal(main, base_main)
    assert mx.abs(stream_logits - base_streams).max().item() > 1e-2
    for name in weights:  # the base weights are untouched
        assert np.array_equal(np.array(saved(adapted, name)), weights[name])


def test_stream_only_adapter_needs_top_layers(tmp_path):
    src, weights = write_hf_checkpoint(tmp_path / "hf", "qwen2")
    write_peft_adapter(tmp_path / "lora", weights, ["q_proj"], layers=[1, 2, 3])
    options = ConvertOptions(init_streams=(3, 2), adapter_path=tmp_path / "lora",
                             adapter_mode="streams")
    with pytest.raises(ConversionError, match=r"adapts layer 1, but the streams live in layers 2"):
        convert(src, tmp_path / "out", options)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --- speculative-streaming tensors ---------------------------------------------------------


def stream_tensors(hidden: int = 64, gamma: int = 3, rank: int = 8) -> dict[str, np.ndarray]:
    """A PyTorch export's stream tensors, with the paper's early-exit (pruning) adapter,
    which conversion leaves out."""
    rng = np.random.default_rng(7)
    return {
        "speculative_streaming.stream_embeddings": rng.standard_normal((gamma, hidden)),
        "speculative_streaming.pruning_adapter.down.weight": rng.standard_normal((rank, hidden)),
        "speculative_streaming.pruning_adapter.up.weight": rng.standard_normal((hidden, rank)),
    }


@pytest.mark.parametrize("via", ["config", "flag"])
def test_imported_stream_tensors(tmp_path, via):
    extra = {k: v.astype(np.float32) for k, v in stream_tensors().items()}
    config = tiny_config("qwen3")
    if via == "config":  # with the keys of an older block, which are ignored
        config["speculative_streaming"] = {"num_streams": 3, "msa_layers": 2, "top_k": 2,
                                           "pruning_rank": 8, "main_sees_streams": False}
    src, _ = write_hf_checkpoint(tmp_path / "hf", config=config, extra=extra)
    options = ConvertOptions(msa_layers=2 if via == "flag" else None)
    out = convert(src, tmp_path / "out", options)

    model = ours(out)
    assert (model.stream_args.num_streams, model.stream_args.msa_layers) == (3, 2)
    assert model.stream_args.top_k == (2 if via == "config" else 3)
    assert np.array_equal(np.array(model.streams.embeddings),
                          extra["speculative_streaming.stream_embeddings"])
    # The pruning adapter is left out: of the streams file, its config block, the weights.
    assert list(mx.load(str(out / "streams.safetensors"))) == ["streams.embeddings"]
    block = json.loads((out / "config.json").read_text())["speculative_streaming"]
    assert not {"pruning_rank", "main_sees_streams"} & set(block)
    assert not any(n.startswith("speculative_streaming")
                   for n in mx.load(str(out / "model.safetensors")))
    # A second conversion (here to 8 bits) carries the streams over unchanged.
    again = convert(out, tmp_path / "again", ConvertOptions(quantize=QuantPolicy(bits=8)))
    stream_file = "streams.safetensors"
    assert (again / stream_file).read_bytes() == (out / stream_file).read_bytes()


def test_streams_whose_main_rows_see_them_are_refused(tmp_path):
    extra = {k: v.astype(np.float32) for k, v in stream_tensors().items()}
    config = {**tiny_config("llama"),
              "speculative_streaming": {"msa_layers": 2, "main_sees_streams": True}}
    src, _ = write_hf_checkpoint(tmp_path / "hf", config=config, extra=extra)
    with pytest.raises(ConversionError, match=r"^streams: main_sees_streams true .* no longer "
                                              r"supported: retrain these streams$"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_stream_tensors_need_their_layer_count(tmp_path):
    extra = {k: v.astype(np.float32) for k, v in stream_tensors().items()}
    src, _ = write_hf_checkpoint(tmp_path / "hf", extra=extra)
    with pytest.raises(ConversionError, match="--msa-layers N_s"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_greedy_speculative_equals_plain_after_conversion(tmp_path, hf_arch):
    src, _ = write_hf_checkpoint(tmp_path / "hf", hf_arch)
    out = convert(src, tmp_path / "out", ConvertOptions(init_streams=(3, 2), seed=3))
    model = ours(out, precision="float32")
    prompt = [1, 40, 77, 3, 50, 12]
    plain = [e.token for e in generate_step(model, prompt, max_tokens=40, speculative=False)]
    events = list(generate_step(model, prompt, max_tokens=40, speculative=True))
    assert [e.token for e in events] == plain
    assert events[-1].passes <= len(plain)


# --- bad inputs ------------------------------------------------------------------------------


def _truncated(src: Path) -> None:
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])


def _drop_config_key(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    del config["intermediate_size"]
    (src / "config.json").write_text(json.dumps(config))


def _pickle_only(src: Path) -> None:
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")


def _model_type(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))


def _retensor(src: Path, change) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(src / "model.safetensors"))


def _no_tokenizer(src: Path) -> None:
    (src / "tokenizer.json").unlink()


def _missing_shard(src: Path) -> None:
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


BAD_INPUTS = {
    "truncated": (_truncated, {}, r"model.safetensors: cannot read it as safetensors"),
    "config_key": (_drop_config_key, {}, r"config.json: missing key 'intermediate_size'"),
    "pickle_only": (_pickle_only, {}, r"only pickled weights \(pytorch_model.bin\)"),
    "model_type": (_model_type, {}, r"model_type 'gpt2' is not supported"),
    "missing_tensor": (
        lambda src: _retensor(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        {}, r"tensor 'model.layers.1.mlp.up_proj.weight' \(96, 64\) is missing",
    ),
    "wrong_shape": (
        lambda src: _retensor(src, lambda t: t.update(
            {"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})),
        {}, r"'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\).*\(32, 64\)",
    ),
    "unknown_tensor": (
        lambda src: _retensor(src, lambda t: t.update({"model.extra.weight": np.zeros(3, "f4")})),
        {}, r"tensor 'model.extra.weight' does not belong to a llama model",
    ),
    "no_tokenizer": (_no_tokenizer, {}, r"has no tokenizer"),
    "missing_shard": (_missing_shard, {}, r"lists model-00002-of-00002.safetensors, which is"),
    "adapter_hidden": (
        None, {"adapter_path": "lora", "in_dim_offset": 32},
        r"adapter tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' "
        r"has shape \(4, 96\).*needs \(4, 64\)",
    ),
    "adapter_pickle": (None, {"adapter_path": "lora", "pickle": True}, r"is a pickle"),
    "init_twice": (None, {"streams": True}, r"already has speculative streams"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_leaves_nothing(tmp_path, case):
    damage, setup, message = BAD_INPUTS[case]
    extra = {k: v.astype(np.float32) for k, v in stream_tensors().items()}
    src, weights = write_hf_checkpoint(tmp_path / "hf", "llama",
                                       extra=extra if setup.get("streams") else None)
    if damage is not None:
        damage(src)
    options = ConvertOptions(msa_layers=None)
    if "adapter_path" in setup:
        write_peft_adapter(tmp_path / "lora", weights, ["q_proj"],
                           in_dim_offset=setup.get("in_dim_offset", 0))
        if setup.get("pickle"):
            (tmp_path / "lora" / "adapter_model.safetensors").rename(
                tmp_path / "lora" / "adapter_model.bin")
        options.adapter_path = tmp_path / "lora"
    if setup.get("streams"):
        config = json.loads((src / "config.json").read_text())
        config["speculative_streaming"] = {"msa_layers": 2}
        (src / "config.json").write_text(json.dumps(config))
        options.init_streams = (3, 2)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out", options)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_force(tmp_path):
    src, _ = write_hf_checkpoint(tmp_path / "hf", "qwen2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ConversionError, match="exists; pass force=True"):
        convert(src, out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    _drop_config_key(src)  # a failing forced conversion keeps the old folder too
    with pytest.raises(ConversionError):
        convert(src, out, force=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"] and leftovers(tmp_path) == []

    src, _ = write_hf_checkpoint(tmp_path / "hf2", "qwen2")
    convert(src, out, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


# --- GGUF input ------------------------------------------------------------------------------


def tiny_gguf_case(tmp_path: Path):
    """The Q4_1/Q4_0/Q8_0 tiny GGUF of test_gguf.py and its dequantized HF weights."""
    from test_gguf import tiny_hf_weights, tiny_metadata, write_quantized_gguf

    path = tmp_path / "tiny.Q4_1.gguf"
    return path, write_quantized_gguf(path, tiny_hf_weights(tied=True), tiny_metadata())


def test_gguf_input_dequantized_and_requantized(tmp_path):
    path, dequantized = tiny_gguf_case(tmp_path)
    plain = convert(path, tmp_path / "plain")  # nothing to change: the GGUF importer alone
    assert (plain / "model.safetensors").read_bytes() == (
        convert_gguf(path, tmp_path / "direct") / "model.safetensors"
    ).read_bytes()

    f32 = convert(path, tmp_path / "f32", ConvertOptions(dtype="float32"))
    for name, value in dequantized.items():
        np.testing.assert_allclose(np.array(saved(f32, name)), value, atol=2e-3, rtol=1e-3)
    with pytest.warns(UserWarning, match="quantized already"):
        q8 = convert(path, tmp_path / "q8", ConvertOptions(quantize=QuantPolicy(bits=8)))
    assert json.loads((q8 / "config.json").read_text())["quantization"]["bits"] == 8
    assert mx.allclose(main_logits(ours(q8)), main_logits(theirs(q8)), atol=1e-4, rtol=1e-4)
    assert leftovers(tmp_path) == []


def test_gguf_input_without_shipped_streams_is_the_importer_alone(tmp_path):
    """`--no-shipped-streams` changes nothing else: no pass through the folder pipeline."""
    path, _ = tiny_gguf_case(tmp_path)
    out = convert(path, tmp_path / "out", ConvertOptions(shipped_streams=False))
    direct = convert_gguf(path, tmp_path / "direct")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in direct.iterdir())
    assert (out / "model.safetensors").read_bytes() == (direct / "model.safetensors").read_bytes()


def q4_k_blocks(rows: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K super-blocks (rows, 144) uint8: d, dmin (f16), 12 scale bytes, 128 quants."""
    blocks = rng.integers(0, 256, (rows, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.full((rows, 1), 0.002, "<f2").view(np.uint8)
    blocks[:, 2:4] = np.full((rows, 1), 0.004, "<f2").view(np.uint8)
    return blocks


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """llama.cpp's dequantize_row_q4_K, in numpy: (rows, 144) uint8 -> (rows, 256) float32."""
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)
    dmin = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    q, qs = blocks[:, 4:16].astype(np.int32), blocks[:, 16:]
    scale = [q[:, j] & 63 if j < 4 else (q[:, j + 4] & 15) | ((q[:, j - 4] >> 6) << 4)
             for j in range(8)]
    low = [q[:, j + 4] & 63 if j < 4 else (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4)
           for j in range(8)]
    out = []
    for c in range(4):  # 64 weights: the low nibbles of 32 bytes, then their high nibbles
        chunk = qs[:, 32 * c : 32 * c + 32].astype(np.float32)
        for j, nibbles in ((2 * c, chunk % 16), (2 * c + 1, chunk // 16)):
            out.append(d * scale[j][:, None] * nibbles - dmin * low[j][:, None])
    return np.concatenate(out, axis=1)


def write_q4_k_gguf(path: Path) -> dict[str, np.ndarray]:
    """A tiny Llama (hidden 256) whose matrices are Q4_K; returns the HF weights they hold."""
    from test_gguf import ARGS, F32, llama_cpp_layout, tiny_metadata, tiny_vocab, write_gguf

    rng = np.random.default_rng(0)
    hidden, kv_rows, vocab = 256, ARGS["num_key_value_heads"] * 64, len(tiny_vocab()[0])
    shapes = {"model.embed_tokens.weight": vocab, "model.norm.weight": None}
    for i in range(ARGS["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.k_proj.weight": kv_rows, p + "self_attn.v_proj.weight": kv_rows}
        shapes |= {p + m + ".weight": hidden for m in ("self_attn.q_proj", "self_attn.o_proj",
                                                        "mlp.gate_proj", "mlp.up_proj",
                                                        "mlp.down_proj")}
        shapes |= {p + "input_layernorm.weight": None, p + "post_attention_layernorm.weight": None}
    blocks = {n: q4_k_blocks(rows, rng) if rows else np.ones(hidden, np.float32)
              for n, rows in shapes.items()}
    q4_k = 12
    tensors = {
        name: (F32, b.shape, b.tobytes()) if b.dtype == np.float32 else
              (q4_k, (b.shape[0], 256), b.tobytes())
        for name, b in llama_cpp_layout(blocks).items()
    }
    metadata = tiny_metadata(**{"llama.embedding_length": hidden, "llama.feed_forward_length":
                                hidden, "llama.rope.dimension_count": 64})
    write_gguf(path, tensors, metadata)
    return {n: dequantize_q4_k(b) if b.dtype == np.uint8 else b for n, b in blocks.items()}


def test_gguf_k_quants_with_the_gguf_package(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "tiny.Q4_K.gguf"
    expected = write_q4_k_gguf(path)
    with pytest.warns(UserWarning, match="Q4_K"):
        out = convert(path, tmp_path / "out", ConvertOptions(dtype="float32"))
    for name, value in expected.items():
        np.testing.assert_allclose(np.array(saved(out, name)), value, atol=1e-3, rtol=1e-3)
    assert mx.allclose(main_logits(ours(out)), main_logits(theirs(out)), atol=1e-4, rtol=1e-4)


def test_gguf_k_quants_without_the_package_name_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "tiny.Q4_K.gguf"
    write_q4_k_gguf(path)
    monkeypatch.setattr(gguf_module, "_gguf_package", lambda: None)
    with pytest.raises(ConversionError, match=r"is Q4_K.*pip install 'specstream-mlx\[gguf\]'"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --- command line ----------------------------------------------------------------------------


def test_cli_convert(tmp_path, capsys):
    src, _ = write_hf_checkpoint(tmp_path / "hf", "llama")
    out = tmp_path / "out"
    argv = ["convert", "--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-bits", "8",
            "--q-group-size", "32", "--init-streams", "2,2", "--q-keep-high", "streams,head"]
    assert cli_main(argv) == 0
    assert "converted" in capsys.readouterr().err
    model = ours(out)
    assert model.stream_args.num_streams == 2
    assert isinstance(model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert type(model.lm_head) is type(model.layers[3].mlp.up_proj) is nn.Linear  # 8 bits: float


@pytest.mark.parametrize(
    "flags, message",
    [([], "missing key 'intermediate_size'"), (["--q-keep-high", "head"], "need -q")],
)
def test_cli_bad_input_returns_2(tmp_path, capsys, flags, message):
    src, _ = write_hf_checkpoint(tmp_path / "hf", "llama")
    _drop_config_key(src)
    argv = ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), *flags]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_cli_convert_has_no_decode_flags():
    with pytest.raises(SystemExit):
        cli_main(["convert", "--hf-path", "x", "--max-tokens", "3"])


def test_streams_do_not_change_the_saved_base_weights(tmp_path):
    src, weights = write_hf_checkpoint(tmp_path / "hf", "qwen2")
    out = convert(src, tmp_path / "out", ConvertOptions(init_streams=(3, 4)))
    names = set(mx.load(str(out / "model.safetensors")))
    assert names == set(weights) and not any(n.startswith("streams") for n in names)
    flat = dict(tree_flatten(ours(out).streams.parameters()))
    assert list(flat) == ["embeddings"] and flat["embeddings"].shape == (3, 64)


def test_readme_worked_example(tmp_path):
    """convert/README_SECTION.md's example at tiny scale: streams.safetensors with the
    documented names, a config block, a lossless-mode PEFT adapter, 4 bits + 8 for streams."""
    from safetensors.numpy import save_file

    config = {**tiny_config("llama"), "speculative_streaming": {"num_streams": 3, "msa_layers": 2}}
    src, weights = write_hf_checkpoint(tmp_path / "finetune", config=config)
    trained = {k: v.astype(np.float32) for k, v in stream_tensors().items()}
    save_file(trained, str(src / "streams.safetensors"))
    pairs = write_peft_adapter(src / "lora", weights, ["q_proj", "v_proj"], layers=[2, 3])
    policy = QuantPolicy(bits=4, group_size=32, keep_high=("streams",))
    options = ConvertOptions(quantize=policy, adapter_path=src / "lora", adapter_mode="streams")
    out = convert(src, tmp_path / "finetune-mlx", options)

    block = json.loads((out / "config.json").read_text())["speculative_streaming"]
    assert (block["num_streams"], block["msa_layers"]) == (3, 2) and "pruning_rank" not in block
    assert (block["adapter_rank"], block["adapter_scale"]) == (4, 2.0)
    streams = mx.load(str(out / "streams.safetensors"))
    assert not any("pruning" in name for name in streams)  # the early-exit adapter is dropped
    a, _ = pairs["model.layers.2.self_attn.q_proj"]
    assert np.array_equal(np.array(streams["streams.adapters.0.q_proj_a"]), a)
    model = ours(out)
    assert model.layers[2].self_attn.q_proj.bits == 8 and model.layers[1].mlp.up_proj.bits == 4
    assert mx.allclose(main_logits(model), main_logits(theirs(out)), atol=1e-4, rtol=1e-4)


@pytest.mark.real
def test_real_embedded_model_to_float32_and_8_bit(tmp_path):
    """The embedded SmolLM2 GGUF (Q4_1) -> float32 folder -> 8-bit folder; both still
    answer the question the GGUF tests ask."""
    from mlx_lm import generate

    from specstream_mlx.checkpoint import CONFIG_KEY, STREAMS_FILE
    from specstream_mlx.convert.embedded import embedded_gguf_path
    from specstream_mlx.loader import SHIPPED_STREAMS

    f32 = convert(embedded_gguf_path(), tmp_path / "f32", ConvertOptions(dtype="float32"))
    q8 = convert(f32, tmp_path / "q8", ConvertOptions(quantize=QuantPolicy(bits=8)))
    # SmolLM2's shipped streams found by its fingerprint, attached, then carried along.
    assert (f32 / STREAMS_FILE).read_bytes() == (SHIPPED_STREAMS / STREAMS_FILE).read_bytes()
    block = json.loads((SHIPPED_STREAMS / "config.json").read_text())[CONFIG_KEY]
    assert json.loads((q8 / "config.json").read_text())[CONFIG_KEY] == block
    for folder in (f32, q8):
        model, tokenizer = mlx_lm_load(str(folder))
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
        assert "Paris" in generate(model, tokenizer, prompt=prompt, max_tokens=20), folder


def test_next_token_rank_is_inferred_from_the_stream_tensors(tmp_path):
    """Streams conditioned on the next token convert like the others: the projection's
    rank comes from its tensors when the config block does not say it."""
    from safetensors.numpy import save_file

    config = {**tiny_config("llama"), "speculative_streaming": {"num_streams": 3, "msa_layers": 2}}
    src, _ = write_hf_checkpoint(tmp_path / "finetune", config=config)
    trained = {k: v.astype(np.float32) for k, v in stream_tensors().items()}
    rng = np.random.default_rng(0)
    trained["streams.next_token_down"] = rng.standard_normal((5, 64)).astype(np.float32)
    trained["streams.next_token_up"] = rng.standard_normal((64, 5)).astype(np.float32)
    save_file(trained, str(src / "streams.safetensors"))
    out = convert(src, tmp_path / "out", ConvertOptions())
    block = json.loads((out / "config.json").read_text())["speculative_streaming"]
    assert block["next_token_rank"] == 5
    model = ours(out)
    assert model.stream_args.conditioned
    assert np.array_equal(np.array(model.streams.next_token_up),
                          trained["streams.next_token_up"])
