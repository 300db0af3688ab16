"""Shared fixtures: tiny seeded models of every architecture, and the --real switch."""

from __future__ import annotations

import specstream_mlx  # noqa: F401  first: it preloads OpenBLAS before mlx.core loads

# isort: split
import os
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from specstream_mlx.blas import cache_file
from specstream_mlx.models import get_classes
from specstream_mlx.models.config import StreamArgs

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 97,
    "max_position_embeddings": 512,
}
TINY_CONFIGS = {
    "llama": {**TINY, "model_type": "llama", "tie_word_embeddings": False},
    "qwen2": {**TINY, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {
        **TINY, "model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
    },
    "llama3": {
        **TINY,
        "model_type": "llama",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
}


@pytest.fixture(autouse=True, scope="session")
def private_home(tmp_path_factory):
    """Tests measure into copies of this machine's measurement files ($SPECSTREAM_HOME or
    the user's cache folder), so the tiny models' pass-cost curves and matmul plans never
    land in the user's, while the real model's measurements are still reused (and its
    converted folder, linked, not converted again)."""
    home = tmp_path_factory.mktemp("specstream-home")
    source = cache_file("blas.json").parent
    for entry in sorted(source.iterdir()) if source.is_dir() else ():
        if entry.is_dir():
            (home / entry.name).symlink_to(entry, target_is_directory=True)
        elif entry.suffix == ".json":
            shutil.copy(entry, home / entry.name)
    old = os.environ.get("SPECSTREAM_HOME")
    os.environ["SPECSTREAM_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SPECSTREAM_HOME", None)
    else:
        os.environ["SPECSTREAM_HOME"] = old


def pytest_addoption(parser):
    parser.addoption("--real", action="store_true", help="also run real-model tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--real"):
        return
    skip = pytest.mark.skip(reason="real-model test: run with --real")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


def tiny_model(name: str = "llama", seed: int = 0, streams: StreamArgs | None = None):
    """A seeded random model of the given tiny config (fp32), optionally with streams.

    Weights are scaled up so that logits are far from uniform and argmax ties are rare.
    """
    config = dict(TINY_CONFIGS[name])
    model_cls, args_cls = get_classes(config["model_type"])
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    params = [(k, v * 3.0 if v.ndim == 2 else v) for k, v in tree_flatten(model.parameters())]
    model.load_weights(params)
    if streams is not None:
        model.attach_streams(streams)
        model.streams.embeddings = mx.random.normal(model.streams.embeddings.shape)
        if streams.next_token_rank:  # it starts at zero: make the next token matter
            model.streams.next_token_up = mx.random.normal(model.streams.next_token_up.shape)
    mx.eval(model.parameters())
    model.eval()
    return model


def reference_model(name: str, model: nn.Module):
    """mlx-lm's implementation of the same architecture with the same weights."""
    import importlib

    config = dict(TINY_CONFIGS[name])
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    ref = module.Model(module.ModelArgs.from_dict(config))
    weights = [(k, v) for k, v in tree_flatten(model.parameters()) if not k.startswith("streams")]
    ref.load_weights(weights)
    return ref


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A tiny model folder on disk with fresh streams (3 streams in the top 2 layers), one
    per test module."""
    from tiny_folder import make_tiny_folder  # it imports this module

    streams = StreamArgs(num_streams=3, msa_layers=2)
    return str(make_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny", streams=streams)[0])


@pytest.fixture(scope="module")
def loaded(folder):
    """`load(folder)`: the model and tokenizer of `folder`."""
    from specstream_mlx import load

    return load(folder)


def cut_at_first_stop(pieces: list[str], stops: list[str]) -> tuple[str, int | None]:
    """The reference: the text up to the first token whose text so far holds a stop, cut
    before the earliest stop in it, and that token's count (None: no stop was hit)."""
    text = ""
    for n, piece in enumerate(pieces, 1):
        text += piece
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return text[: min(hits)], n
    return text, None
