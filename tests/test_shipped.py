"""Tests of specstream_mlx/shipped.py: the packaged stream sets, the fingerprint that
finds the one trained on a model, the check that its streams fit, and where they are
attached (`specstream convert` writes them, `load` reads them in place).

Each test builds a fake assets root (`fake_set`: streams made for a tiny model folder,
a block, a corpus, priors and fits.json) and points the module at it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hf_fixtures import write_hf_checkpoint
from mlx.utils import tree_flatten
from tiny_folder import make_tiny_folder

from specstream_mlx import shipped
from specstream_mlx.checkpoint import (
    CONFIG_KEY,
    CORPUS_FILE,
    STREAMS_FILE,
    init_streams,
    save_corpus,
    save_streams,
)
from specstream_mlx.cli import main as cli_main
from specstream_mlx.convert.gguf import convert_gguf
from specstream_mlx.convert.hf import ConvertOptions, convert
from specstream_mlx.decoding import priors as priors_module
from specstream_mlx.decoding.priors import DraftingPriors, Priors, write_priors
from specstream_mlx.decoding.step import generate_step
from specstream_mlx.errors import ConversionError
from specstream_mlx.loader import SHIPPED_STREAMS, load
from specstream_mlx.models.config import StreamArgs

# Adapters (heads and intermediate size in their shapes), a draft vocabulary (ids checked).
SET_ARGS = StreamArgs(num_streams=2, msa_layers=2, adapter_rank=4, draft_vocab_size=64,
                      tree_budget=5, lookup_depth=6)
SET_PRIORS = DraftingPriors(greedy=Priors((0.8, 0.5), 2.0, {2: 0.3}, 0.6, {}, 0.5),
                            source="a fake set")
PROMPT = [1, 40, 77, 3, 50, 12]


def fake_set(root: Path, folder: Path, name: str = "tiny-set", seed: int = 1) -> Path:
    """A stream set in `root`/`name` made for the model in `folder`, as a training
    session ships one: streams, their block alone in config.json, corpus, priors,
    fits.json."""
    model, _ = load(folder, precision="float32")
    init_streams(model, SET_ARGS, seed=seed)
    donor = root.parent / f"{name}-donor"
    donor.mkdir(parents=True)
    shutil.copy(folder / "config.json", donor / "config.json")
    save_streams(model, donor)
    path = root / name
    path.mkdir(parents=True)
    shutil.copy(donor / STREAMS_FILE, path / STREAMS_FILE)
    block = json.loads((donor / "config.json").read_text())[CONFIG_KEY]
    (path / "config.json").write_text(json.dumps({CONFIG_KEY: block}, indent=2))
    save_corpus([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 11]], path / CORPUS_FILE)
    write_priors(path, SET_PRIORS)
    shipped.write_fits(folder, path, name="Tiny-Instruct")
    return path


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """(assets root, the set in it): made for the tiny llama folder of seed 0."""
    base, _ = make_tiny_folder(tmp_path / "base")
    root = tmp_path / "assets"
    with pytest.warns(UserWarning, match="no speculative streams"):
        path = fake_set(root, base)
    monkeypatch.setattr(shipped, "ASSETS", root)
    return root, path


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def lines(text: str, word: str) -> list[str]:
    return [line for line in text.splitlines() if word in line]


def greedy_equal(model) -> list[int]:
    """Speculative greedy decoding equals plain decoding; returns the tokens."""
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=32, speculative=False)]
    assert [e.token for e in generate_step(model, PROMPT, max_tokens=32)] == plain
    return plain


# --- the fingerprint ------------------------------------------------------------------------


def test_one_model_has_one_fingerprint_whatever_its_files(tmp_path):
    """Hugging Face safetensors, our converted folder, a quantized MLX folder: one
    fingerprint, since it is of the config's shape fields and the vocabulary only."""
    mlx_folder, _ = make_tiny_folder(tmp_path / "mlx")
    hf, _ = write_hf_checkpoint(tmp_path / "hf", "llama")
    converted = convert(hf, tmp_path / "converted", ConvertOptions(shipped_streams=False))
    quantized, _ = make_tiny_folder(tmp_path / "q4", seed=3,
                                    quantize={"group_size": 32, "bits": 4})
    prints = [shipped.fingerprint(f) for f in (mlx_folder, hf, converted, quantized)]
    assert all(p == prints[0] for p in prints) and prints[0]["tokenizer"].startswith("sha256:")
    assert prints[0]["config"]["head_dim"] == 16  # resolved: config.json does not say it


def retoken(folder: Path, change) -> None:
    """Apply `change` to the vocabulary of the folder's tokenizer.json."""
    data = json.loads((folder / "tokenizer.json").read_text())
    change(data["model"]["vocab"])
    (folder / "tokenizer.json").write_text(json.dumps(data))


def test_one_token_or_the_hidden_size_changes_the_fingerprint(tmp_path):
    base, _ = make_tiny_folder(tmp_path / "base")
    reference = shipped.fingerprint(base)

    token, _ = make_tiny_folder(tmp_path / "token")
    retoken(token, lambda vocab: vocab.update({"Z!": vocab.pop("Z")}))
    assert shipped.fingerprint(token)["tokenizer"] != reference["tokenizer"]

    hidden, _ = make_tiny_folder(tmp_path / "hidden")
    config = json.loads((hidden / "config.json").read_text())
    (hidden / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    assert shipped.fingerprint(hidden)["config"] != reference["config"]
    assert shipped.fingerprint(hidden)["tokenizer"] == reference["tokenizer"]


def test_llama_cpp_padding_tokens_are_not_part_of_the_fingerprint(tmp_path):
    """A GGUF pads its vocabulary to the embedding's rows with `[PAD<id>]` tokens that a
    Hugging Face tokenizer does not have; the same model must still match."""
    base, _ = make_tiny_folder(tmp_path / "base")
    padded, _ = make_tiny_folder(tmp_path / "padded")
    retoken(padded, lambda vocab: vocab.update({"[PAD97]": 97, "[PAD98]": 98}))
    assert shipped.tokenizer_fingerprint(padded) == shipped.tokenizer_fingerprint(base)
    named, _ = make_tiny_folder(tmp_path / "named")
    retoken(named, lambda vocab: vocab.update({"[PAD3]": 97}))  # not a filler of its own id
    assert shipped.tokenizer_fingerprint(named) != shipped.tokenizer_fingerprint(base)


def test_a_folder_without_a_tokenizer_matches_nothing(tmp_path, assets):
    folder, _ = make_tiny_folder(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    assert shipped.tokenizer_fingerprint(folder) is None
    assert shipped.find_shipped(folder) is None


def test_find_compares_the_config_before_reading_the_tokenizer(tmp_path, assets, monkeypatch):
    _, path = assets
    same, _ = make_tiny_folder(tmp_path / "same", seed=4)
    assert shipped.find_shipped(same).path == path
    other, _ = make_tiny_folder(tmp_path / "other", name="qwen2")  # another family
    monkeypatch.setattr(shipped, "tokenizer_fingerprint", lambda folder: pytest.fail("read"))
    assert shipped.find_shipped(other) is None


# --- convert ---------------------------------------------------------------------------------


def test_convert_attaches_the_set_that_fits(tmp_path, assets, capsys):
    """No flag: the output without streams receives the set, written into it, and decodes
    speculatively with greedy output equal to plain decoding."""
    _, path = assets
    hf, _ = write_hf_checkpoint(tmp_path / "hf", "llama")
    out = convert(hf, tmp_path / "out")
    for name in (STREAMS_FILE, CORPUS_FILE, priors_module.PRIORS_FILE):
        assert (out / name).read_bytes() == (path / name).read_bytes(), name
    block = json.loads((path / "config.json").read_text())[CONFIG_KEY]
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY] == block
    assert lines(capsys.readouterr().err, "shipped streams") == [
        f"attached the shipped streams of Tiny-Instruct to {out}"]
    model, _ = load(out, precision="float32")
    assert model.stream_args == StreamArgs.from_dict(block)
    assert model.corpus is not None and model.drafting_priors == SET_PRIORS
    assert "shipped streams" not in capsys.readouterr().err  # its own streams now
    greedy_equal(model)


def test_convert_of_a_gguf_file_attaches_the_set(tmp_path, monkeypatch, capsys):
    """`specstream convert --hf-path x.gguf --mlx-path DIR`, no other flag."""
    from test_gguf import tiny_hf_weights, tiny_metadata, write_quantized_gguf

    gguf = tmp_path / "tiny.Q4_1.gguf"
    write_quantized_gguf(gguf, tiny_hf_weights(tied=True), tiny_metadata())
    raw = convert_gguf(gguf, tmp_path / "raw")  # the raw import attaches nothing
    assert not (raw / STREAMS_FILE).exists()
    root = tmp_path / "assets"
    with pytest.warns(UserWarning, match="no speculative streams"):
        path = fake_set(root, raw)
    monkeypatch.setattr(shipped, "ASSETS", root)
    assert cli_main(["convert", "--hf-path", str(gguf), "--mlx-path", str(tmp_path / "o")]) == 0
    assert "attached the shipped streams of Tiny-Instruct" in capsys.readouterr().err
    assert (tmp_path / "o" / STREAMS_FILE).read_bytes() == (path / STREAMS_FILE).read_bytes()
    greedy_equal(load(tmp_path / "o", precision="float32")[0])


def test_no_shipped_streams_flag_attaches_nothing(tmp_path, assets, capsys):
    hf, _ = write_hf_checkpoint(tmp_path / "hf", "llama")
    argv = ["convert", "--hf-path", str(hf), "--mlx-path", str(tmp_path / "out"),
            "--no-shipped-streams"]
    assert cli_main(argv) == 0
    assert not lines(capsys.readouterr().err, "shipped streams")
    assert not (tmp_path / "out" / STREAMS_FILE).exists()
    assert CONFIG_KEY not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_convert_keeps_the_checkpoints_own_streams(tmp_path, assets, capsys):
    hf, _ = write_hf_checkpoint(tmp_path / "hf", "llama")
    out = convert(hf, tmp_path / "out", ConvertOptions(init_streams=(3, 2)))
    assert json.loads((out / "config.json").read_text())[CONFIG_KEY]["num_streams"] == 3
    assert not lines(capsys.readouterr().err, "shipped streams")


# --- load ------------------------------------------------------------------------------------


def test_load_attaches_in_memory_and_leaves_the_folder_alone(tmp_path, assets, capsys):
    _, path = assets
    folder, _ = make_tiny_folder(tmp_path / "mine")
    before = files(folder)
    model, _ = load(folder, precision="float32")
    assert files(folder) == before  # not a byte written, nothing added
    assert lines(capsys.readouterr().err, "shipped streams") == [
        f"{folder} has no streams of its own: using the shipped streams of Tiny-Instruct "
        f"(in memory; `specstream convert` writes them into a folder)"]
    assert model.stream_args.num_streams == 2 and model.drafting_priors == SET_PRIORS
    assert model.corpus is not None
    stored = mx.load(str(path / STREAMS_FILE))
    for key, value in tree_flatten(model.streams.parameters()):
        assert mx.array_equal(value, stored[f"streams.{key}"]), key
    greedy_equal(model)


def test_a_folder_with_its_own_streams_keeps_them(tmp_path, assets, capsys):
    folder, _ = make_tiny_folder(tmp_path / "own", streams=StreamArgs(num_streams=3))
    before = files(folder)
    model, _ = load(folder)
    assert model.stream_args.num_streams == 3 and model.corpus is None
    assert files(folder) == before and not lines(capsys.readouterr().err, "shipped streams")


def test_another_model_loads_plainly(tmp_path, assets, capsys):
    folder, _ = make_tiny_folder(tmp_path / "qwen", name="qwen2")
    with pytest.warns(UserWarning, match="no speculative streams"):
        model, _ = load(folder)
    assert model.stream_args is None and not lines(capsys.readouterr().err, "shipped streams")


# --- sets that do not fit --------------------------------------------------------------------


def wrong_hidden(path: Path) -> None:
    tensors = dict(mx.load(str(path / STREAMS_FILE)))
    tensors["streams.embeddings"] = mx.zeros((2, 32))
    mx.save_safetensors(str(path / STREAMS_FILE), tensors)


def wrong_ids(path: Path) -> None:
    tensors = dict(mx.load(str(path / STREAMS_FILE)))
    tensors["streams.draft_vocab"] = mx.arange(60, 124, dtype=mx.int32)
    mx.save_safetensors(str(path / STREAMS_FILE), tensors)


def too_many_layers(path: Path) -> None:
    data = json.loads((path / "config.json").read_text())
    data[CONFIG_KEY]["msa_layers"] = 9
    (path / "config.json").write_text(json.dumps(data))


def bad_corpus(path: Path) -> None:
    np.save(path / CORPUS_FILE, np.array([5, 500, -1], dtype=np.int32))


@pytest.mark.parametrize("spoil, message", [
    (wrong_hidden, "'streams.embeddings' is (2, 32), the model needs (2, 64)"),
    (wrong_ids, "draft vocabulary holds ids outside 0..96"),
    (too_many_layers, "msa_layers"),
    (bad_corpus, "corpus"),
])
def test_a_set_whose_streams_do_not_fit_is_refused_with_one_line(tmp_path, assets, capsys,
                                                                  spoil, message):
    _, path = assets
    spoil(path)
    folder, _ = make_tiny_folder(tmp_path / "mine")
    with pytest.raises(ConversionError, match="do not fit") as error:
        shipped.install(shipped.ShippedSet.at(path), folder)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (folder / STREAMS_FILE).exists()

    with pytest.warns(UserWarning, match="no speculative streams"):
        model, _ = load(folder)
    assert model.stream_args is None
    refused = lines(capsys.readouterr().err, "do not fit")
    assert len(refused) == 1 and message in refused[0] and refused[0].endswith("not attached")

    hf, _ = write_hf_checkpoint(tmp_path / "hf", "llama")
    out = convert(hf, tmp_path / "out")
    assert not (out / STREAMS_FILE).exists()
    assert len(lines(capsys.readouterr().err, "do not fit")) == 1


def test_checking_a_set_leaves_the_random_state_alone(tmp_path, assets):
    """`load` checks a set after a seeded caller (training) set its seed."""
    _, path = assets
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    mx.random.seed(11)
    expected = mx.random.normal((4,))
    mx.random.seed(11)
    shipped.check_fit(shipped.ShippedSet.at(path), config)
    assert mx.array_equal(mx.random.normal((4,)), expected)


def test_write_fits_checks_the_streams_against_the_model(tmp_path, assets):
    _, path = assets
    other, _ = make_tiny_folder(tmp_path / "qwen3", name="qwen3")  # head_dim 32, not 16
    with pytest.raises(ConversionError, match="do not fit"):
        shipped.write_fits(other, path)


def test_the_write_fits_script(tmp_path, assets, capsys):
    import runpy

    main = runpy.run_path(str(Path(__file__).parents[1] / "experiments" / "write_fits.py"))["main"]
    root, path = assets
    (path / shipped.FITS_FILE).unlink()
    assert main([str(tmp_path / "base"), str(path), "--name", "Tiny"]) == 0
    assert json.loads((path / shipped.FITS_FILE).read_text())["name"] == "Tiny"
    assert shipped.find_shipped(tmp_path / "base", root=root).path == path


# --- the sets in the package -----------------------------------------------------------------


def test_every_shipped_set_fits_the_model_it_names():
    """Each packaged set: fits.json, a block, streams that fit the model fits.json
    describes, and at most 16 MB attached to a folder. SmolLM2's is one of them."""
    sets = shipped.shipped_sets()
    assert SHIPPED_STREAMS in [s.path for s in sets]
    for found in sets:
        fits = found.fits
        assert set(fits["config"]) == set(shipped.FIT_FIELDS), found.path
        assert fits["tokenizer"].startswith("sha256:") and fits["name"]
        shipped.check_fit(found, fits["config"])
        assert shipped.set_size(found) <= shipped.MAX_SET_BYTES, found.path


@pytest.mark.real
def test_the_embedded_model_finds_its_shipped_set():
    from specstream_mlx.convert.embedded import ensure_embedded_model

    assert shipped.find_shipped(ensure_embedded_model()).path == SHIPPED_STREAMS


def test_tune_write_refuses_streams_that_come_from_the_package(tmp_path, assets, capsys):
    """`tune --write` stores settings and priors in the folder's own block: a folder whose
    streams come from the package in memory has none, so it is refused before any replay
    and nothing is written."""
    from specstream_mlx.cli import main
    from specstream_mlx.jsonl import write_jsonl

    folder, _ = make_tiny_folder(tmp_path / "mine")
    before = files(folder)
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "task": "chat", "prompt": "hi"}])
    assert main(["tune", "--prompts", str(tmp_path / "p.jsonl"), "--model", str(folder),
                 "--write", "--max-tokens", "4"]) == 2
    assert "has no streams of its own" in capsys.readouterr().err
    assert files(folder) == before
