"""Hugging Face checkpoints -> specstream model folders (`specstream convert`).

    from specstream_mlx.convert.hf import ConvertOptions, convert
    from specstream_mlx.convert.quantize import QuantPolicy
    convert("Qwen/Qwen2.5-0.5B-Instruct", "qwen-4bit",
            ConvertOptions(quantize=QuantPolicy(bits=4), init_streams=(3, 4)))

Input: a local folder or a hub id (downloaded with huggingface_hub) holding
`config.json` (model_type llama, mistral, smollm, qwen2 or qwen3), safetensors weights
(`model.safetensors`, or shards listed by `model.safetensors.index.json`) with Hugging
Face names, and tokenizer files. Pickled weights (`*.bin`, `*.pt`, ...) are never
loaded: unpickling an untrusted file can run arbitrary code. An MLX folder (mlx-lm's,
or one this tool wrote, quantized or not, with streams or not) is accepted too, and a
path ending in `.gguf` goes through `convert.gguf.convert_gguf` first.

Output, written to a hidden sibling folder and renamed into place when complete: the
mlx-lm layout (`config.json` with mlx-lm's `quantization` block when quantized,
`model.safetensors` + index, tokenizer files copied as they are) plus, when the model
has streams, `streams.safetensors` and the `speculative_streaming` block of config.json
(see convert/streams.py); an output left without streams receives the package's trained
streams for its base model when it ships some (specstream_mlx/shipped.py; off with
`shipped_streams=False`, `--no-shipped-streams`). Steps, in order: read and check every
tensor against the architecture; dequantize when the weights must change; fuse a LoRA
adapter or turn it into stream-only adapters (convert/peft.py); cast (`dtype`, default
the checkpoint's `torch_dtype`); quantize (convert/quantize.py); write; attach shipped
streams. A quantized input is dequantized
only when its weights change (`dtype`, `quantize`, a fused adapter); without `quantize`
the result then stays float.

Speculative-streaming tensors of a checkpoint fine-tuned elsewhere (hidden =
hidden_size, gamma = number of streams), found in any weight file or in
`streams.safetensors`:

    name in the checkpoint                               shape            stored as
    speculative_streaming.stream_embeddings              (gamma, hidden)  streams.embeddings
    streams.<name> (specstream's own names, checkpoint.py)                streams.<name>

The paper's early-exit (pruning) adapter, `speculative_streaming.pruning_adapter.*` or
`streams.pruning_*`, is left out: decoding does not use it (convert/stream_tensors.py).

N_s comes from the `speculative_streaming` block of config.json
(`{"num_streams": 3, "msa_layers": 4}`; other StreamArgs keys are kept) or from
`msa_layers` (`--msa-layers`); num_streams and the ranks default to the tensors' shapes.
A checkpoint without them gets fresh streams with `init_streams=(gamma, N_s)`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model, infer_quant_config, save_config, save_model
from tqdm import tqdm

from specstream_mlx.checkpoint import (
    CONFIG_KEY,
    STREAMS_FILE,
    init_streams,
    resolve_source,
    save_streams,
)
from specstream_mlx.convert.gguf import convert_gguf
from specstream_mlx.convert.output import check_target, install, staging_folder
from specstream_mlx.convert.peft import fuse_adapter, read_adapter, stream_adapter_tensors
from specstream_mlx.convert.quantize import DTYPES, QuantPolicy, cast, quantize
from specstream_mlx.convert.stream_tensors import plan_streams, split_stream_tensors
from specstream_mlx.errors import ConversionError, ModelLoadError
from specstream_mlx.models import get_classes, is_quantized, read_config
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.shipped import attach_fitting

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json")
# What a hub download fetches: never pickles, never duplicate `consolidated.*` weights.
HUB_PATTERNS = ["*.json", "model*.safetensors", STREAMS_FILE, "tokenizer.model", "*.txt", "*.jinja"]
ADAPTER_MODES = ("fused", "streams")


@dataclass
class ConvertOptions:
    """What to change on the way; the defaults copy the checkpoint as it is.

    dtype: float16 | bfloat16 | float32; None keeps config.json's `torch_dtype`.
    quantize: the quantization policy, None for float weights.
    init_streams: (gamma, N_s): fresh, untrained streams for a checkpoint without any.
    msa_layers: N_s of stream tensors found in the checkpoint without a config block.
    adapter_path: a PEFT LoRA adapter folder or hub id; adapter_mode "fused" (task
        mode) or "streams" (lossless mode, stream-only adapters).
    seed: seed of the fresh streams.
    shipped_streams: an output without streams receives the package's trained streams
        for its base model, when it ships some (specstream_mlx/shipped.py).
    """

    dtype: str | None = None
    quantize: QuantPolicy | None = None
    init_streams: tuple[int, int] | None = None
    msa_layers: int | None = None
    adapter_path: str | Path | None = None
    adapter_mode: str = "fused"
    seed: int = 0
    shipped_streams: bool = True

    def validate(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.adapter_mode not in ADAPTER_MODES:
            raise ConversionError(
                f"adapter mode must be fused or streams, got {self.adapter_mode!r}"
            )
        if self.quantize is not None:
            self.quantize.validate()
        if self.init_streams is not None and self.msa_layers is not None:
            raise ConversionError("give N_s once: --init-streams gamma,N_s or --msa-layers N_s")


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    options: ConvertOptions | None = None,
    *,
    force: bool = False,
) -> Path:
    """Convert a Hugging Face folder, hub id, MLX folder or `.gguf` file into `mlx_path`.

    Returns `mlx_path` as a Path. Raises ConversionError with a message naming the file,
    tensor or key at fault; `mlx_path` is then left as it was (absent, or the old folder).
    """
    options = options or ConvertOptions()
    options.validate()
    mlx_path = Path(mlx_path)
    check_target(mlx_path, force)
    if str(hf_path).endswith(".gguf"):
        return _convert_gguf(Path(hf_path), mlx_path, options, force)
    source = resolve_source(hf_path, HUB_PATTERNS)
    with staging_folder(mlx_path) as staging:
        write_folder(source, staging, options)
        if options.shipped_streams:  # in the staging folder: renamed into place with it
            attach_fitting(staging, shown=mlx_path)
        install(staging, mlx_path, force)
    return mlx_path


def _convert_gguf(path: Path, mlx_path: Path, options: ConvertOptions, force: bool) -> Path:
    """The GGUF importer, then (when something must change) the folder pipeline."""
    if replace(options, shipped_streams=True) == ConvertOptions():
        return convert_gguf(path, mlx_path, force=force, shipped_streams=options.shipped_streams)
    mlx_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=mlx_path.parent, prefix=f".{mlx_path.name}.gguf-") as tmp:
        raw = convert_gguf(path, Path(tmp) / "model")
        return convert(raw, mlx_path, options, force=force)


# --- the pipeline ----------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint on its way through the pipeline.

    config: config.json as it will be written; model: the architecture holding the
    weights; stream_args: the output's streams (None: none); stream_tensors: what to
    load into them (`embeddings`, `adapters.0.q_proj_a`, ...: names without `streams.`).
    """

    source: Path
    config: dict
    model: nn.Module
    stream_args: StreamArgs | None
    stream_tensors: dict[str, mx.array]
    tokenizer_files: list[str]


def write_folder(source: Path, out: Path, options: ConvertOptions) -> None:
    """Convert the folder `source` into the existing, empty folder `out`."""
    ckpt = read_checkpoint(source, options)
    fused = options.adapter_path is not None and options.adapter_mode == "fused"
    if is_quantized(ckpt.model) and (options.dtype or options.quantize or fused):
        _dequantize(ckpt, requantize=options.quantize is not None)
    if options.adapter_path is not None:
        add_adapter(ckpt, options.adapter_path, fused)
    dtype = options.dtype or (None if is_quantized(ckpt.model) else checkpoint_dtype(ckpt.config))
    if dtype is not None:
        cast(ckpt.model, dtype)
        ckpt.config["torch_dtype"] = dtype
        if "dtype" in ckpt.config:  # transformers >= 4.56 writes this key instead
            ckpt.config["dtype"] = dtype
    if options.quantize is not None:
        msa_layers = ckpt.stream_args.msa_layers if ckpt.stream_args else None
        ckpt.config = quantize(ckpt.model, ckpt.config, options.quantize, msa_layers)
    save_checkpoint(ckpt, out, options.seed)


def read_checkpoint(source: Path, options: ConvertOptions) -> Checkpoint:
    """Read and check config.json, tokenizer files, weights and stream tensors."""
    config = read_source_config(source)
    tokenizer_files = find_tokenizer_files(source)
    weights = read_weights(find_weight_files(source))
    file = source / STREAMS_FILE
    in_file = read_weights([file]) if file.is_file() else {}
    weights, found_streams = split_stream_tensors(weights, in_file, source)
    model = build_model(config, weights, source)
    stream_args, stream_tensors = plan_streams(model, config, found_streams,
                                               options.init_streams, options.msa_layers)
    return Checkpoint(source, config, model, stream_args, stream_tensors, tokenizer_files)


def _dequantize(ckpt: Checkpoint, requantize: bool) -> None:
    """Float weights from a quantized checkpoint, whose weights are about to change."""
    if requantize:
        warnings.warn(
            f"{ckpt.source.name} is quantized already: quantizing it again adds rounding "
            f"error (convert the float checkpoint instead when there is one)",
            stacklevel=4,
        )
    dequantize_model(ckpt.model)
    ckpt.config.pop("quantization", None)
    ckpt.config.pop("quantization_config", None)


def add_adapter(ckpt: Checkpoint, adapter_path: str | Path, fused: bool) -> None:
    """Fuse a PEFT LoRA adapter into the weights, or add it as stream-only adapters."""
    pairs = read_adapter(resolve_source(adapter_path, ["*.json", "*.safetensors"]))
    if fused:
        fuse_adapter(ckpt.model, pairs)
        return
    if ckpt.stream_args is None:
        raise ConversionError(
            "--adapter-mode streams needs streams: add fresh ones with --init-streams "
            "gamma,N_s or convert a checkpoint that has them"
        )
    if ckpt.stream_args.adapter_rank > 0:
        raise ConversionError("the checkpoint already has stream-only adapters")
    adapters, rank, scale = stream_adapter_tensors(ckpt.model, pairs, ckpt.stream_args.msa_layers)
    ckpt.stream_tensors.update(adapters)
    ckpt.stream_args.adapter_rank, ckpt.stream_args.adapter_scale = rank, scale


def save_checkpoint(ckpt: Checkpoint, out: Path, seed: int) -> None:
    """Weights, config.json, tokenizer files and (when there are streams) streams."""
    materialize(ckpt.model)
    save_model(out, ckpt.model)  # before the streams are attached: they have their own file
    ckpt.config.pop(CONFIG_KEY, None)  # save_streams writes the block of the output's streams
    save_config(ckpt.config, out / "config.json")
    for name in ckpt.tokenizer_files:
        shutil.copy2(ckpt.source / name, out / name)
    if ckpt.stream_args is not None:
        init_streams(ckpt.model, ckpt.stream_args, seed=seed)  # fresh, then overwritten
        ckpt.model.streams.load_weights(list(ckpt.stream_tensors.items()), strict=False)
        save_streams(ckpt.model, out)


def read_source_config(source: Path) -> dict:
    """config.json, checked for a supported model_type, its keys and its quantization."""
    try:
        config = read_config(source)
    except ModelLoadError as e:
        raise ConversionError(str(e)) from None
    hf_quant = config.get("quantization_config")
    if hf_quant is not None and "quantization" not in config:  # mlx-lm writes both
        method = hf_quant.get("quant_method") if isinstance(hf_quant, dict) else hf_quant
        raise ConversionError(
            f"{source / 'config.json'}: pre-quantized checkpoints (quantization_config, "
            f"quant_method {method!r}) are not supported; convert the unquantized checkpoint "
            f"and quantize with -q"
        )
    return config


def find_tokenizer_files(source: Path) -> list[str]:
    """Names of the tokenizer files to copy; at least one tokenizer model must be there."""
    names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not any(name in names for name in TOKENIZER_MODELS):
        raise ConversionError(f"{source} has no tokenizer ({', '.join(TOKENIZER_MODELS)})")
    return names


def find_weight_files(source: Path) -> list[Path]:
    """The safetensors weight files: those of the index when there is one, else model*."""
    index = source / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as e:
            raise ConversionError(f"{index} is not a safetensors index ({e!r})") from None
        for name in names:
            if not (source / name).is_file():
                raise ConversionError(f"{index} lists {name}, which is missing")
        return [source / name for name in names]
    files = sorted(source.glob("model*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in source.glob(pattern))
    if pickles:
        raise ConversionError(
            f"{source} has only pickled weights ({', '.join(pickles)}), which are never "
            f"loaded: unpickling an untrusted file can run arbitrary code. Save the model "
            f"with safetensors (transformers: save_pretrained(path, safe_serialization=True))"
        )
    raise ConversionError(f"{source} has no model*.safetensors weights")


def read_weights(files: list[Path]) -> dict[str, mx.array]:
    """All tensors of `files` (lazily: read when first evaluated), names unique."""
    weights: dict[str, mx.array] = {}
    for path in tqdm(files, desc="reading", unit="file", disable=len(files) < 2 or None):
        try:
            tensors = mx.load(str(path))
        except Exception as e:  # truncated, or not safetensors at all
            raise ConversionError(f"{path}: cannot read it as safetensors ({e})") from None
        if repeated := sorted(tensors.keys() & weights.keys()):
            raise ConversionError(f"{path}: tensor {repeated[0]!r} is also in another file")
        weights.update(tensors)
    return weights


def build_model(config: dict, weights: dict[str, mx.array], source: Path) -> nn.Module:
    """The architecture of `config` holding `weights`, every name and shape checked."""
    config.setdefault("tie_word_embeddings", "lm_head.weight" not in weights)  # as HF does
    model_cls, args_cls = get_classes(config["model_type"])
    try:
        model = model_cls(args_cls.from_dict(config))
    except (ModelLoadError, TypeError, ValueError) as e:
        raise ConversionError(f"{source / 'config.json'}: {e}") from None
    weights = model.sanitize(weights)
    if (quantization := config.get("quantization")) is not None:
        _quantize_like(model, quantization, weights)
    expected = dict(tree_flatten(model.parameters()))
    for name, value in expected.items():
        if name not in weights:
            raise ConversionError(
                f"{source}: tensor {name!r} {tuple(value.shape)} is missing from the weights"
            )
    for name, value in weights.items():
        if name not in expected:
            raise ConversionError(
                f"{source}: tensor {name!r} does not belong to a {config['model_type']} model "
                f"with this config.json"
            )
        if value.shape != expected[name].shape:
            raise ConversionError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, but config.json "
                f"makes it {tuple(expected[name].shape)}"
            )
    model.load_weights(list(weights.items()))
    model.eval()
    return model


def _quantize_like(model: nn.Module, quantization: dict, weights: dict[str, mx.array]) -> None:
    """Give `model` the quantized layers an mlx-lm folder was saved with (as its loader)."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, quantization["group_size"], quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def checkpoint_dtype(config: dict) -> str | None:
    """The dtype config.json declares (`torch_dtype`, or `dtype` in newer transformers)."""
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if dtype in DTYPES else None


def materialize(model: nn.Module) -> None:
    """Evaluate the weights part by part (reading, fusing, casting, quantizing happen
    here), with a progress bar on a terminal."""
    parts = [model.model.embed_tokens, *model.layers, model.model.norm]
    if "lm_head" in model:
        parts.append(model.lm_head)
    for part in tqdm(parts, desc="converting", unit="part", disable=None):
        mx.eval(part.parameters())


