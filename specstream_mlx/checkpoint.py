"""Stream tensors on disk: `streams.safetensors` beside an MLX model folder, described by
the `speculative_streaming` block of its config.json.

Tensor names (float32 unless noted; hidden = the model's hidden_size):
    streams.embeddings    (num_streams, hidden)   stream-identifier embeddings P[j]
    streams.draft_vocab   (draft_vocab_size,) int32  token ids the streams draft from
    streams.adapters.{i}.{proj}_a  (adapter_rank, in)   stream-only LoRA of MSA layer i
    streams.adapters.{i}.{proj}_b  (out, adapter_rank)  (layer N - N_s + i), proj one of
        q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; applied to stream rows only
    streams.next_token_down (next_token_rank, hidden)  projection of the next token's
    streams.next_token_up   (hidden, next_token_rank)  embedding (conditioned streams)

Older files also hold `streams.pruning_down` / `streams.pruning_up` (an early-exit adapter
that decoding never used), their config blocks `pruning_rank` and `main_sees_streams:
false`: reading ignores them (RETIRED_TENSORS, StreamArgs.from_dict).

An optional `corpus.npy` beside them holds the datastore of corpus drafts
(decoding/corpus.py): one int32 array (N,) of token ids, documents separated by -1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from specstream_mlx.errors import ConversionError, ModelLoadError
from specstream_mlx.models.config import StreamArgs

STREAMS_FILE = "streams.safetensors"
CONFIG_KEY = "speculative_streaming"
CORPUS_FILE = "corpus.npy"
# The drafting controller's starting beliefs for these streams (decoding/priors.py).
PRIORS_FILE = "drafting_priors.json"
CORPUS_SEPARATOR = -1
# The early-exit (pruning) adapter of older streams files: decoding never used it, so skip it.
RETIRED_TENSORS = frozenset({"streams.pruning_down", "streams.pruning_up"})


def save_corpus(documents: list[list[int]], path: str | Path) -> Path:
    """Write token-id documents as one corpus array (atomic)."""
    tokens = [t for doc in documents for t in (*doc, CORPUS_SEPARATOR)]
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        np.save(f, np.array(tokens, dtype=np.int32))
    os.replace(tmp, path)
    return path


def read_corpus(path: str | Path, vocab_size: int) -> np.ndarray:
    """The corpus array of `path`, checked: 1-D integers in -1 .. vocab_size-1."""
    try:
        tokens = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if (tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer)
            or (tokens.size and (tokens.min() < CORPUS_SEPARATOR or tokens.max() >= vocab_size))):
        raise ModelLoadError(f"{path}: a corpus must be a 1-D integer array of token ids in "
                             f"0..{vocab_size - 1}, documents separated by {CORPUS_SEPARATOR}")
    return tokens.astype(np.int32)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file so a crash never leaves half a config."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_cache_json(path: Path) -> dict:
    """A per-machine measurement cache ({} when missing, unreadable or not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache_json(path: Path, data: dict) -> None:
    """Store a measurement cache; a read-only home only costs a measurement per process."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except OSError:
        pass


def save_streams(model, folder: str | Path) -> Path:
    """Write the model's stream parameters and their config block into `folder`."""
    if model.stream_args is None:
        raise ConversionError("the model has no streams to save")
    folder = Path(folder)
    tensors = {f"streams.{k}": v for k, v in tree_flatten(model.streams.parameters())}
    tmp = folder / f".tmp-{os.getpid()}-{STREAMS_FILE}"  # MLX keeps the .safetensors suffix
    mx.save_safetensors(str(tmp), tensors, metadata={"format": "mlx"})
    os.replace(tmp, folder / STREAMS_FILE)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config[CONFIG_KEY] = model.stream_args.to_dict()
    write_json_atomic(config_path, config)
    return folder / STREAMS_FILE


def init_streams(model, stream_args: StreamArgs | None = None, seed: int = 0) -> None:
    """Attach freshly initialised (untrained) streams to `model`, reproducibly."""
    mx.random.seed(seed)
    model.attach_streams(stream_args or StreamArgs())
    mx.eval(model.streams.parameters())


def resolve_source(path_or_hub_id: str | Path, patterns: list[str],
                   error: type[Exception] = ConversionError) -> Path:
    """A local folder as it is; `owner/name` downloaded from the hub (only `patterns`).

    Raises `error` (the caller's user-facing error type) for anything else.
    """
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise error(f"{text}: folder not found (nor a hub id like owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # offline, unknown or gated repository
        raise error(f"{text} is neither a local folder nor a downloadable hub id ({e})") from None
