"""load(path) -> (model, tokenizer): config, quantization, weights, precision, streams."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import dequantize_model, load_config, load_model, load_tokenizer

import specstream_mlx.matmul_plan as matmul_plan
from specstream_mlx.blas import blas_info
from specstream_mlx.checkpoint import (
    CONFIG_KEY,
    CORPUS_FILE,
    RETIRED_TENSORS,
    STREAMS_FILE,
    read_corpus,
    resolve_source,
)
from specstream_mlx.decoding import pass_curve
from specstream_mlx.decoding.corpus import CorpusIndex
from specstream_mlx.decoding.drafter import model_corpus
from specstream_mlx.decoding.priors import read_priors
from specstream_mlx.errors import ModelLoadError, SpecstreamError
from specstream_mlx.models import get_classes, is_quantized, read_config
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.shipped import ASSETS, ShippedSet, install, streams_source

PRECISIONS = ("auto", "native", "float32", "float16", "bfloat16")


def resolve_path(path_or_hub_id: str | Path | None) -> Path:
    """A local model folder; the embedded default model for None; else a hub download."""
    if path_or_hub_id is None:
        from specstream_mlx.convert.embedded import ensure_embedded_model

        return ensure_default_streams(ensure_embedded_model())

    patterns = ["*.json", "model*.safetensors", STREAMS_FILE, CORPUS_FILE, "tokenizer.model",
                "*.txt", "*.jinja"]
    return resolve_source(path_or_hub_id, patterns, ModelLoadError)


# Trained streams shipped with the package for the embedded model (see README, Training).
SHIPPED_STREAMS = ASSETS / "smollm2-135m-instruct"


def ensure_default_streams(path: Path) -> Path:
    """Give the embedded model's folder (ours: in the cache) the shipped set trained on
    it, written into the folder and kept in step with the package (shipped.install: the
    same check and copy as `specstream convert`); untrained streams when the package has
    none, so the speculative path always runs. Other folders without streams get the set
    that fits them in memory, at `load` (shipped.streams_source)."""
    from specstream_mlx.checkpoint import init_streams, save_streams

    if (SHIPPED_STREAMS / STREAMS_FILE).is_file():
        install(ShippedSet.at(SHIPPED_STREAMS), path, ModelLoadError)
    elif not (path / STREAMS_FILE).is_file():
        model, _ = _load_weights(path, read_config(path))
        init_streams(model)
        save_streams(model, path)
    return path


def _load_weights(path: Path, config: dict) -> tuple[nn.Module, dict]:
    """Build the model through mlx-lm's loader (quantization, sharded safetensors)."""
    if not list(path.glob("model*.safetensors")):
        raise ModelLoadError(f"{path} has no model*.safetensors weights")

    def classes(config: dict):
        return get_classes(config["model_type"])

    try:
        return load_model(path, get_model_classes=classes)
    except SpecstreamError:
        raise
    except Exception as e:  # corrupt file, missing or mis-shaped tensor
        raise ModelLoadError(f"cannot load weights from {path}: {e}") from e


def set_precision(model: nn.Module, precision: str) -> str:
    """Apply a precision choice; returns what the weights now are, e.g. "float32".

    "auto": on the CPU, quantized and half-precision kernels cost time linear in the
    rows of a pass while fp32 goes through BLAS, so use float32 there; elsewhere keep
    the checkpoint's own precision.
    """
    if precision not in PRECISIONS:
        raise ModelLoadError(f"precision must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "float32" if mx.default_device() == mx.cpu else "native"
    if precision != "native":
        if is_quantized(model):
            dequantize_model(model)
        dtype = getattr(mx, precision)
        model.update(
            tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                     model.parameters())
        )
        return precision
    return describe_precision(model)


def describe_precision(model: nn.Module) -> str:
    """"4-bit (group 32)" for quantized models (the most common width first, e.g.
    "4-bit (group 32) + 8-bit"), else the dtype of the embeddings."""
    widths: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            key = f"{m.bits}-bit (group {m.group_size})"
            widths[key] = widths.get(key, 0) + m.weight.size
    if widths:
        ranked = sorted(widths, key=widths.get, reverse=True)
        return " + ".join([ranked[0]] + [k.split(" ")[0] for k in ranked[1:]])
    return str(model.model.embed_tokens.weight.dtype).removeprefix("mlx.core.")


def _sampled_budget(sa: StreamArgs) -> str:
    """" (N when sampling)" where the config sets a sampled tree budget of its own."""
    budget = sa.sampled_tree_budget
    return "" if budget is None or budget == sa.tree_budget else f" ({budget} when sampling)"


def describe_model(model: nn.Module) -> str:
    """One line: architecture, precision and streams, as the CLI shows it."""
    sa = model.stream_args
    streams = (
        f"{sa.num_streams} streams in the top {sa.msa_layers} layers"
        f"{' (seeing the next token)' if sa.conditioned else ''}, tree budget "
        f"{sa.tree_budget}{_sampled_budget(sa)}, top-k {sa.top_k} ({sa.sampled_top_k} "
        "when sampling)"
        if sa else "no streams (plain decoding)"
    )
    corpus = model_corpus(model)
    if corpus is not None:
        streams += f", corpus of {len(corpus) // 1000}k tokens"
    precision = getattr(model, "precision", None) or describe_precision(model)
    device = str(mx.default_device()).removeprefix("Device(").split(",")[0]
    blas = f" via {blas_info()}" if mx.default_device() == mx.cpu else ""
    return (f"{model.model_type}, {len(model.layers)} layers, {precision} weights on "
            f"{device}{blas}, {streams}")


def load_streams(model: nn.Module, path: Path, config: dict) -> None:
    """Attach the streams described in config.json and stored in streams.safetensors."""
    block = config.get(CONFIG_KEY)
    file = path / STREAMS_FILE
    if block is None:
        if file.exists():
            raise ModelLoadError(f"{file} exists but config.json has no {CONFIG_KEY!r} block")
        warnings.warn(
            f"{path} has no speculative streams: decoding plainly (one token per pass)",
            stacklevel=3,
        )
        return
    model.attach_streams(StreamArgs.from_dict(block))
    if not file.exists():
        raise ModelLoadError(f"config.json describes streams but {file} is missing")
    try:
        tensors = mx.load(str(file))
    except Exception as e:
        raise ModelLoadError(f"cannot read {file}: {e}") from e
    tensors = {k: v for k, v in tensors.items() if k not in RETIRED_TENSORS}
    expected = {f"streams.{k}": v for k, v in tree_flatten(model.streams.parameters())}
    for key, value in expected.items():
        if key not in tensors:
            raise ModelLoadError(f"{file}: missing tensor {key!r}")
        if tensors[key].shape != value.shape:
            raise ModelLoadError(
                f"{file}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                f"the model needs {tuple(value.shape)}"
            )
    if extra := sorted(set(tensors) - set(expected)):
        raise ModelLoadError(f"{file}: tensor {extra[0]!r} is not part of the streams that "
                             f"config.json describes ({CONFIG_KEY!r} block)")
    ids = tensors.get("streams.draft_vocab")
    if ids is not None and (mx.issubdtype(ids.dtype, mx.floating) or ids.size == 0
                            or ids.min().item() < 0
                            or ids.max().item() >= model.args.vocab_size):
        raise ModelLoadError(f"{file}: streams.draft_vocab must hold token ids in "
                             f"0..{model.args.vocab_size - 1}")
    dtype = model.model.norm.weight.dtype
    model.streams.load_weights(
        [(k.removeprefix("streams."), v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating)
          else v) for k, v in tensors.items()], strict=False)
    mx.eval(model.streams.parameters())


def load_corpus(model: nn.Module, path: Path) -> None:
    """Attach the folder's corpus-draft datastore as `model.corpus` (a CorpusIndex; None
    without a corpus file or without streams: decoding-time data, not a parameter)."""
    file = path / CORPUS_FILE
    model.corpus = None
    if model.stream_args is not None and file.is_file():
        model.corpus = CorpusIndex(read_corpus(file, model.args.vocab_size))


def load_priors(model: nn.Module, path: Path) -> None:
    """Attach the folder's drafting priors as `model.drafting_priors` (priors.py; neutral
    without the file): the controller's starting beliefs, decoding-time data."""
    model.drafting_priors = read_priors(path) if model.stream_args is not None else None


def load_tokenizer_of(path: Path) -> TokenizerWrapper:
    """mlx-lm's tokenizer wrapper of a model folder, without loading its weights; its end
    tokens are every one the folder names (generation_config.json's list over
    config.json's one, as mlx-lm's load reads them: Qwen ends at <|im_end|> and
    <|endoftext|>)."""
    try:
        eos = load_config(path).get("eos_token_id")
    except (OSError, ValueError):  # read_config reports a broken config.json itself
        eos = None
    eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else None
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=eos)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {path}: {e}") from e
    # Too-long prompts get our own one-line error (against the model's real context), not
    # transformers' warning about the tokenizer's nominal maximum.
    if hasattr(tokenizer._tokenizer, "model_max_length"):
        tokenizer._tokenizer.model_max_length = sys.maxsize
    return tokenizer


def load(
    path_or_hub_id: str | Path | None = None, *, precision: str = "auto"
) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a model folder (or hub id, or the embedded SmolLM2 when None).

    Returns the model (with the folder's streams; for a folder without any, the shipped
    set trained on its base model, read in place: shipped.py) and mlx-lm's tokenizer
    wrapper. `model.precision` says which weights are in use.
    """
    path = resolve_path(path_or_hub_id)
    config = read_config(path)
    model, _ = _load_weights(path, config)
    model.precision = set_precision(model, precision)
    streams_path, config = streams_source(path, config)  # a shipped set, for none of its own
    load_streams(model, streams_path, config)
    load_corpus(model, streams_path)
    load_priors(model, streams_path)
    tokenizer = load_tokenizer_of(path)
    mx.eval(model.parameters())
    check_finite(model, path)
    matmul_plan.apply(model)
    pass_curve.apply(model)
    return model, tokenizer


def check_finite(model: nn.Module, path: Path) -> None:
    """A NaN or infinite weight (a corrupt or badly converted checkpoint) would make
    every answer garbage; name the first such tensor instead (one read-back)."""
    params = [(k, v) for k, v in tree_flatten(model.parameters())
              if mx.issubdtype(v.dtype, mx.floating)]
    finite = mx.stack([mx.all(mx.isfinite(v)) for _, v in params])
    if not finite.all().item():
        bad = params[int(mx.argmin(finite).item())][0]
        raise ModelLoadError(f"{path}: weights are not finite (NaN or inf) in {bad}")
