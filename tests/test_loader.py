"""load(folder): weights, tokenizer and streams round-trip; precision choices; and a clear
ModelLoadError, naming the problem, for every way a folder can be broken."""

from __future__ import annotations

import json
import shutil
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_CONFIGS, tiny_model
from mlx.utils import tree_flatten
from tiny_folder import make_tiny_folder

from specstream_mlx import load, stream_generate
from specstream_mlx.checkpoint import CONFIG_KEY, STREAMS_FILE, init_streams, save_streams
from specstream_mlx.errors import ModelLoadError
from specstream_mlx.loader import describe_model
from specstream_mlx.models import ARCHITECTURES, get_classes, is_quantized
from specstream_mlx.models.config import StreamArgs

STREAMS = StreamArgs(num_streams=3, msa_layers=2, adapter_rank=2)
PROMPT = mx.array([[1, 40, 75, 76, 3, 87, 75, 72, 2]])


def load_quietly(folder, **kwargs):
    """load() without the plain-decoding warning of stream-less folders."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load(folder, **kwargs)


def logits(model) -> np.ndarray:
    return np.array(model(PROMPT)[0].astype(mx.float32))


def read_json(path):
    return json.loads(path.read_text())


def write_json(path, data):
    path.write_text(json.dumps(data))


def param_dtypes(model) -> set:
    return {v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype,
                                                                                     mx.floating)}


@pytest.fixture
def plain_folder(tmp_path):
    return make_tiny_folder(tmp_path / "plain")[0]


@pytest.fixture
def streams_folder(tmp_path):
    return make_tiny_folder(tmp_path / "streams", streams=STREAMS)


# --- round trips -------------------------------------------------------------------------


def test_folder_without_streams_loads_with_a_plain_decoding_warning(plain_folder):
    with pytest.warns(UserWarning, match="plain"):
        model, tokenizer = load(plain_folder)
    assert model.stream_args is None
    assert "streams" not in model
    assert tokenizer.eos_token_ids == {2}


def test_every_end_token_the_folder_names_ends_generation(plain_folder):
    """generation_config.json's list of end tokens (Qwen: <|im_end|> and <|endoftext|>)
    joins the tokenizer's own, as mlx-lm's load reads it."""
    from specstream_mlx.loader import load_tokenizer_of

    (plain_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert load_tokenizer_of(plain_folder).eos_token_ids == {2, 5}
    (plain_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_tokenizer_of(plain_folder).eos_token_ids == {2, 7}


def test_streams_round_trip(streams_folder):
    folder, original = streams_folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder with streams loads without a warning
        model, _ = load(folder)
    assert model.stream_args == STREAMS
    saved = dict(tree_flatten(original.streams.parameters()))
    loaded = dict(tree_flatten(model.streams.parameters()))
    assert sorted(saved) == sorted(loaded) and len(saved) == 1 + 2 * 2 * 7  # P, 2 layers' A, B
    for name, value in saved.items():
        np.testing.assert_array_equal(np.array(loaded[name]), np.array(value), err_msg=name)


def test_draft_vocab_round_trip_keeps_integer_ids(tmp_path):
    streams = StreamArgs(num_streams=2, msa_layers=2, draft_vocab_size=5)
    folder, original = make_tiny_folder(tmp_path / "dv", streams=streams)
    original.streams.draft_vocab = mx.array([4, 8, 15, 16, 23], dtype=mx.int32)
    save_streams(original, folder)
    model, _ = load(folder, precision="float16")
    assert model.stream_args.draft_vocab_size == 5
    assert model.streams.draft_vocab.dtype == mx.int32
    assert model.streams.draft_vocab.tolist() == [4, 8, 15, 16, 23]


@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 97], [-1, 1, 2, 3, 4]])
def test_draft_vocab_outside_the_vocabulary_is_refused(tmp_path, ids):
    streams = StreamArgs(num_streams=2, msa_layers=2, draft_vocab_size=5)
    folder, original = make_tiny_folder(tmp_path / "dv", streams=streams)
    original.streams.draft_vocab = mx.array(ids, dtype=mx.int32)
    save_streams(original, folder)
    with pytest.raises(ModelLoadError, match="draft_vocab must hold token ids in 0..96"):
        load(folder)


def test_loaded_logits_equal_the_original_model(streams_folder):
    folder, original = streams_folder
    model, _ = load(folder, precision="float32")
    np.testing.assert_array_equal(logits(model), logits(original))
    # ... and the stream rows too.
    h = mx.array([[3, 17, 42]])
    _, s_loaded = model(h, stream_rows=mx.array([2], dtype=mx.int32))
    _, s_original = original(h, stream_rows=mx.array([2], dtype=mx.int32))
    np.testing.assert_array_equal(np.array(s_loaded), np.array(s_original))


# --- precision ---------------------------------------------------------------------------


@pytest.fixture
def half_folder(tmp_path):
    """Weights stored in float16, with streams (stored in float32 by save_streams)."""
    return make_tiny_folder(tmp_path / "half", streams=STREAMS, dtype=mx.float16)[0]


@pytest.mark.parametrize(
    "precision, dtype",
    [("float32", mx.float32), ("bfloat16", mx.bfloat16), ("float16", mx.float16),
     ("native", mx.float16)],
)
def test_precision_casts_every_parameter(half_folder, precision, dtype):
    model, _ = load(half_folder, precision=precision)
    assert param_dtypes(model) == {dtype}  # streams follow the base weights
    assert model.precision == str(dtype).removeprefix("mlx.core.")
    assert str(dtype).removeprefix("mlx.core.") in describe_model(model)


def test_auto_precision_on_cpu_is_float32(half_folder):
    if mx.default_device() != mx.cpu:
        pytest.skip("auto keeps the stored precision off the CPU")
    model, _ = load(half_folder)
    assert model.precision == "float32"
    assert param_dtypes(model) == {mx.float32}


def test_invalid_precision_is_refused(plain_folder):
    with pytest.raises(ModelLoadError, match="precision must be one of"):
        load_quietly(plain_folder, precision="fp8")


@pytest.fixture
def quantized_folder(tmp_path):
    assert TINY_CONFIGS["llama"]["hidden_size"] % 32 == 0
    return make_tiny_folder(tmp_path / "q4", quantize={"group_size": 32, "bits": 4})


def test_quantized_folder_native_stays_quantized(quantized_folder):
    folder, original = quantized_folder
    model, _ = load_quietly(folder, precision="native")
    assert is_quantized(model)
    assert model.precision == "4-bit (group 32)"
    assert "4-bit (group 32)" in describe_model(model)
    np.testing.assert_array_equal(logits(model), logits(original))


def test_quantized_folder_auto_on_cpu_dequantizes_to_float32(quantized_folder):
    if mx.default_device() != mx.cpu:
        pytest.skip("auto dequantizes only on the CPU")
    folder, original = quantized_folder
    model, _ = load_quietly(folder)
    assert not any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding)
                   for m in model.modules())
    assert model.precision == "float32"
    assert param_dtypes(model) == {mx.float32}
    np.testing.assert_allclose(logits(model), logits(original), atol=1e-4, rtol=1e-5)


# --- describe_model ----------------------------------------------------------------------


def test_describe_model_names_precision_and_streams(streams_folder, plain_folder):
    model, _ = load(streams_folder[0], precision="bfloat16")
    line = describe_model(model)
    assert "llama" in line and "bfloat16" in line
    assert "3 streams in the top 2 layers, tree" in line  # not conditioned
    model.stream_args.next_token_rank = 4
    assert "3 streams in the top 2 layers (seeing the next token), tree" in describe_model(model)
    assert f"tree budget {STREAMS.tree_budget}" in line and f"top-k {STREAMS.top_k}" in line
    plain, _ = load_quietly(plain_folder)
    assert "float32" in describe_model(plain)
    assert "no streams (plain decoding)" in describe_model(plain)


# --- broken folders ----------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="not found") as e:
        load(missing)
    assert str(missing) in str(e.value)


def test_folder_without_config(plain_folder):
    (plain_folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(plain_folder)


def test_invalid_json_config(plain_folder):
    (plain_folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load(plain_folder)


def test_unsupported_model_type_lists_the_supported_ones(plain_folder):
    config = read_json(plain_folder / "config.json")
    write_json(plain_folder / "config.json", {**config, "model_type": "gpt_neox"})
    with pytest.raises(ModelLoadError, match="'gpt_neox' is not supported") as e:
        load(plain_folder)
    for name in ARCHITECTURES:
        assert name in str(e.value)


def test_config_without_model_type(plain_folder):
    config = read_json(plain_folder / "config.json")
    del config["model_type"]
    write_json(plain_folder / "config.json", config)
    with pytest.raises(ModelLoadError, match="model_type None is not supported"):
        load(plain_folder)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_config_missing_a_required_key_names_it(plain_folder, key):
    config = read_json(plain_folder / "config.json")
    del config[key]
    write_json(plain_folder / "config.json", config)
    with pytest.raises(ModelLoadError, match=f"missing key '{key}'"):
        load(plain_folder)


def test_folder_without_weights(plain_folder):
    (plain_folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\*\.safetensors"):
        load(plain_folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights(plain_folder, damage):
    path = plain_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not safetensors" * 8,
                      "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match="cannot load weights from") as e:
        load(plain_folder)
    assert str(plain_folder) in str(e.value)


def test_weights_missing_a_tensor(plain_folder):
    path = plain_folder / "model.safetensors"
    weights = mx.load(str(path))
    del weights["lm_head.weight"]
    mx.save_safetensors(str(path), weights)
    with pytest.raises(ModelLoadError, match="lm_head"):
        load(plain_folder)


def test_streams_saved_for_another_num_streams(tmp_path):
    folder, _ = make_tiny_folder(tmp_path / "m", streams=StreamArgs(num_streams=2, msa_layers=2))
    config = read_json(folder / "config.json")
    config[CONFIG_KEY]["num_streams"] = 3
    write_json(folder / "config.json", config)
    with pytest.raises(ModelLoadError, match=r"'streams\.embeddings' has shape \(2, 64\)") as e:
        load(folder)
    assert "(3, 64)" in str(e.value)


def test_streams_saved_from_a_model_of_another_hidden_size(tmp_path):
    folder, _ = make_tiny_folder(tmp_path / "m")
    other_config = {**TINY_CONFIGS["llama"], "hidden_size": 32}
    model_cls, args_cls = get_classes("llama")
    other = model_cls(args_cls.from_dict(other_config))
    init_streams(other, STREAMS)
    save_streams(other, folder)  # writes the same config block, tensors of hidden 32
    with pytest.raises(ModelLoadError, match=r"'streams\.embeddings' has shape \(3, 32\)") as e:
        load(folder)
    assert "(3, 64)" in str(e.value)


def test_streams_file_missing_a_tensor(streams_folder):
    folder, _ = streams_folder
    tensors = mx.load(str(folder / STREAMS_FILE))
    del tensors["streams.adapters.1.q_proj_b"]
    mx.save_safetensors(str(folder / STREAMS_FILE), tensors)
    with pytest.raises(ModelLoadError, match=r"missing tensor 'streams\.adapters\.1\.q_proj_b'"):
        load(folder)


def test_streams_file_with_a_tensor_the_config_block_does_not_describe(streams_folder):
    """A tensor the streams do not have (here: next-token conditioning the block lost) is
    refused rather than silently dropped."""
    folder, _ = streams_folder
    tensors = mx.load(str(folder / STREAMS_FILE))
    tensors["streams.next_token_up"] = mx.zeros((64, 4))
    mx.save_safetensors(str(folder / STREAMS_FILE), tensors)
    with pytest.raises(ModelLoadError, match=r"tensor 'streams\.next_token_up' is not part of"):
        load(folder)


def test_older_streams_with_the_pruning_adapter_load_and_decode_the_same(streams_folder,
                                                                         tmp_path):
    """A folder written before the early-exit (pruning) adapter was dropped: its tensors
    and its block's `pruning_rank` / `main_sees_streams: false` are ignored; the streams
    and the speculative decoding are exactly those of the same folder without them."""
    folder, _ = streams_folder
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    tensors = mx.load(str(old / STREAMS_FILE))
    tensors["streams.pruning_down"] = mx.random.normal((8, 64))
    tensors["streams.pruning_up"] = mx.random.normal((64, 8))
    mx.save_safetensors(str(old / STREAMS_FILE), tensors, metadata={"format": "mlx"})
    config = read_json(old / "config.json")
    block = config[CONFIG_KEY]
    config[CONFIG_KEY] = {"num_streams": block.pop("num_streams"),
                          "msa_layers": block.pop("msa_layers"),
                          "main_sees_streams": False, "pruning_rank": 8, **block}
    write_json(old / "config.json", config)

    (new_model, tokenizer), (old_model, _) = load(folder), load(old)
    assert old_model.stream_args == new_model.stream_args
    assert "pruning_down" not in old_model.streams
    new_params = dict(tree_flatten(new_model.streams.parameters()))
    old_params = dict(tree_flatten(old_model.streams.parameters()))
    assert sorted(old_params) == sorted(new_params)
    for name, value in new_params.items():
        np.testing.assert_array_equal(np.array(old_params[name]), np.array(value))

    def decode(model):
        return [(r.token, r.from_draft) for r in stream_generate(
            model, tokenizer, "a tree", max_tokens=24, adaptive=False, tree_budget=4)]
    assert decode(old_model) == decode(new_model)


def test_streams_whose_main_rows_see_them_are_refused_in_one_line(streams_folder):
    folder, _ = streams_folder
    config = read_json(folder / "config.json")
    config[CONFIG_KEY]["main_sees_streams"] = True
    write_json(folder / "config.json", config)
    with pytest.raises(ModelLoadError, match=r"^main_sees_streams true .* no longer supported: "
                                             r"retrain these streams$"):
        load(folder)


def test_corrupt_streams_file(streams_folder):
    folder, _ = streams_folder
    (folder / STREAMS_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(ModelLoadError, match=f"cannot read .*{STREAMS_FILE}"):
        load(folder)


def test_config_block_without_streams_file(streams_folder):
    folder, _ = streams_folder
    (folder / STREAMS_FILE).unlink()
    with pytest.raises(ModelLoadError, match=f"describes streams but .*{STREAMS_FILE} is missing"):
        load(folder)


def test_streams_file_without_config_block(streams_folder):
    folder, _ = streams_folder
    config = read_json(folder / "config.json")
    del config[CONFIG_KEY]
    write_json(folder / "config.json", config)
    with pytest.raises(ModelLoadError, match=f"no '{CONFIG_KEY}' block"):
        load(folder)


def test_config_block_that_does_not_fit_the_model(streams_folder):
    folder, _ = streams_folder
    config = read_json(folder / "config.json")
    config[CONFIG_KEY]["msa_layers"] = 9
    write_json(folder / "config.json", config)
    with pytest.raises(ModelLoadError, match="msa_layers must be in 1..4"):
        load(folder)


@pytest.mark.parametrize("key, value, message", [
    ("lookup_depth", -2, "lookup_depth must be >= 0"),
    ("min_draft_prob", 2.0, "min_draft_prob must be in"),
    ("sampled_min_draft_prob", -0.5, "sampled_min_draft_prob must be in"),
    ("sampled_top_k", 0, "sampled_top_k must be >= 1"),
    ("sampled_tree_budget", -1, "sampled_tree_budget must be null"),
    ("sampled_tree_budget", 2.5, "sampled_tree_budget must be null"),
    ("draft_vocab_size", 2, "draft_vocab_size must be 0"),  # smaller than top_k (3)
    ("draft_vocab_size", 200, "exceeds the model's vocabulary"),
])
def test_bad_draft_settings_in_the_config_block(streams_folder, key, value, message):
    folder, _ = streams_folder
    config = read_json(folder / "config.json")
    config[CONFIG_KEY][key] = value
    write_json(folder / "config.json", config)
    with pytest.raises(ModelLoadError, match=message):
        load(folder)


def test_broken_tokenizer(plain_folder):
    (plain_folder / "tokenizer.json").write_text("{")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_quietly(plain_folder)


def test_shipped_streams_are_installed_into_the_default_folder(tmp_path, monkeypatch):
    """The embedded model's folder receives the streams shipped in the package (and a
    changed shipped file replaces an older copy); untrained ones only without them."""
    from specstream_mlx import loader

    shipped = tmp_path / "assets"
    donor, _ = make_tiny_folder(tmp_path / "donor", streams=StreamArgs(num_streams=2))
    shipped.mkdir()
    (shipped / STREAMS_FILE).write_bytes((donor / STREAMS_FILE).read_bytes())
    (shipped / "config.json").write_text((donor / "config.json").read_text())
    monkeypatch.setattr(loader, "SHIPPED_STREAMS", shipped)

    target, _ = make_tiny_folder(tmp_path / "target")
    loader.ensure_default_streams(target)
    assert (target / STREAMS_FILE).read_bytes() == (shipped / STREAMS_FILE).read_bytes()
    assert read_json(target / "config.json")[CONFIG_KEY]["num_streams"] == 2
    model, _ = load_quietly(target)
    assert model.stream_args.num_streams == 2

    other, _ = make_tiny_folder(tmp_path / "other", streams=StreamArgs(num_streams=3), seed=1)
    (shipped / STREAMS_FILE).write_bytes((other / STREAMS_FILE).read_bytes())
    (shipped / "config.json").write_text((other / "config.json").read_text())
    loader.ensure_default_streams(target)
    assert read_json(target / "config.json")[CONFIG_KEY]["num_streams"] == 3
    assert (target / STREAMS_FILE).read_bytes() == (other / STREAMS_FILE).read_bytes()

    # New decoding defaults with the same streams file reach the folder too.
    config = read_json(shipped / "config.json")
    config[CONFIG_KEY]["lookup_depth"] = 7
    (shipped / "config.json").write_text(json.dumps(config))
    loader.ensure_default_streams(target)
    assert read_json(target / "config.json")[CONFIG_KEY]["lookup_depth"] == 7

    monkeypatch.setattr(loader, "SHIPPED_STREAMS", tmp_path / "nothing")
    bare, _ = make_tiny_folder(tmp_path / "bare")
    loader.ensure_default_streams(bare)
    assert (bare / STREAMS_FILE).is_file()


def test_the_default_folder_refuses_shipped_streams_that_do_not_fit(tmp_path, monkeypatch):
    """The embedded model's set goes through the same check as any other: streams of
    another hidden size are one error naming the tensor, and nothing is written."""
    from specstream_mlx import loader

    shipped = tmp_path / "assets"
    donor, _ = make_tiny_folder(tmp_path / "donor", streams=StreamArgs(num_streams=2))
    shipped.mkdir()
    tensors = dict(mx.load(str(donor / STREAMS_FILE)))
    tensors["streams.embeddings"] = mx.zeros((2, 32))
    mx.save_safetensors(str(shipped / STREAMS_FILE), tensors)
    (shipped / "config.json").write_text((donor / "config.json").read_text())
    monkeypatch.setattr(loader, "SHIPPED_STREAMS", shipped)
    target, _ = make_tiny_folder(tmp_path / "target")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(ModelLoadError, match=r"do not fit.*streams.embeddings.*\(2, 32\)"):
        loader.ensure_default_streams(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


@pytest.mark.parametrize("sampled, shown", [(None, False), (6, False), (16, True)])
def test_describe_model_names_a_sampled_budget_of_its_own(sampled, shown):
    model = tiny_model("llama", streams=StreamArgs(num_streams=2, msa_layers=1,
                                                   tree_budget=6, sampled_tree_budget=sampled))
    line = describe_model(model)
    assert "tree budget 6" in line
    assert ("(16 when sampling)" in line) == shown
