"""Stream tensors found in a checkpoint (streams.safetensors, or `speculative_streaming.*`
tensors among the weights): their names, and the plan that checks them against the
streams they imply (or starts fresh ones, `--init-streams`)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from specstream_mlx.checkpoint import CONFIG_KEY, RETIRED_TENSORS, STREAMS_FILE
from specstream_mlx.errors import ConversionError, ModelLoadError
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.models.streams import Streams

STREAM_ALIASES = {
    "speculative_streaming.stream_embeddings": "embeddings",
}
# The paper's early-exit (pruning) adapter, under its PyTorch names or ours: decoding never
# uses it, so conversion leaves it out.
DROPPED = RETIRED_TENSORS | {"speculative_streaming.pruning_adapter.down.weight",
                             "speculative_streaming.pruning_adapter.up.weight"}

def split_stream_tensors(
    weights: dict[str, mx.array], in_file: dict[str, mx.array], source: Path
) -> tuple[dict[str, mx.array], dict[str, tuple[str, mx.array]]]:
    """(base weights, stream tensors) of a checkpoint's `weights` and the tensors of its
    streams.safetensors (`in_file`). Stream tensors map their specstream name without
    `streams.` to (name in the checkpoint, array); DROPPED tensors are in neither."""
    file = source / STREAMS_FILE
    weights = {name: v for name, v in weights.items() if name not in DROPPED}
    in_file = {name: v for name, v in in_file.items() if name not in DROPPED}
    base = {name: v for name, v in weights.items() if stream_key(name) is None}
    streams: dict[str, tuple[str, mx.array]] = {}
    for name, value in [*weights.items(), *in_file.items()]:
        key = stream_key(name)
        if key is None and name in in_file:
            raise ConversionError(f"{file}: tensor {name!r} is not a stream tensor")
        if key is None:
            continue
        if key in streams:
            raise ConversionError(f"{source}: {name!r} and {streams[key][0]!r} are the same tensor")
        streams[key] = (name, value)
    return base, streams


def stream_key(name: str) -> str | None:
    """`speculative_streaming.stream_embeddings` or `streams.embeddings` -> `embeddings`;
    None for other tensors."""
    if name in STREAM_ALIASES:
        return STREAM_ALIASES[name]
    return name.removeprefix("streams.") if name.startswith("streams.") else None


def plan_streams(
    model: nn.Module,
    config: dict,
    found: dict[str, tuple[str, mx.array]],
    init_streams: tuple[int, int] | None = None,
    msa_layers: int | None = None,
) -> tuple[StreamArgs | None, dict[str, mx.array]]:
    """The streams of the output: (StreamArgs or None, tensors to load into them).

    Fresh streams (`init_streams`) have no tensors to load; streams found in the
    checkpoint are checked tensor by tensor against what their StreamArgs imply.
    """
    block = config.get(CONFIG_KEY)
    if init_streams is not None:
        if found or block is not None:
            raise ConversionError(
                "the checkpoint already has speculative streams; drop --init-streams"
            )
        gamma, n_s = init_streams
        return _validated({"num_streams": gamma, "msa_layers": n_s}, model), {}
    if not found:
        if block is not None:
            raise ConversionError(
                f"config.json has a {CONFIG_KEY!r} block, but the checkpoint has no stream "
                f"tensors ({STREAMS_FILE}, or speculative_streaming.* in the weights)"
            )
        if msa_layers is not None:
            raise ConversionError(
                "--msa-layers describes stream tensors, and the checkpoint has none; "
                "use --init-streams gamma,N_s for fresh streams"
            )
        return None, {}

    params = dict(block or {})
    if msa_layers is not None:
        if params.get("msa_layers", msa_layers) != msa_layers:
            raise ConversionError(
                f"--msa-layers {msa_layers} contradicts config.json's "
                f"{CONFIG_KEY}.msa_layers = {params['msa_layers']}"
            )
        params["msa_layers"] = msa_layers
    if "msa_layers" not in params:
        raise ConversionError(
            f"the checkpoint has stream tensors (e.g. {next(iter(found.values()))[0]!r}) but "
            f"does not say how many layers carry them: add {{\"msa_layers\": N_s}} to the "
            f"{CONFIG_KEY!r} block of config.json or pass --msa-layers N_s"
        )
    for key, tensor, axis in (
        ("num_streams", "embeddings", 0),
        ("adapter_rank", "adapters.0.q_proj_a", 0),
        ("next_token_rank", "next_token_down", 0),
    ):
        if key not in params:
            params[key] = found[tensor][1].shape[axis] if tensor in found else 0
    stream_args = _validated(params, model)
    return stream_args, _checked_stream_tensors(model, stream_args, found)


def _validated(params: dict, model: nn.Module) -> StreamArgs:
    """StreamArgs of a config block, checked against `model` (as ConversionError)."""
    try:
        stream_args = StreamArgs.from_dict(params)
        stream_args.validate(len(model.layers))
    except ModelLoadError as e:
        raise ConversionError(f"streams: {e}") from None
    return stream_args


def _checked_stream_tensors(
    model: nn.Module, stream_args: StreamArgs, found: dict[str, tuple[str, mx.array]]
) -> dict[str, mx.array]:
    """Stream tensors (float32) after checking names and shapes against `stream_args`."""
    expected = dict(tree_flatten(Streams(stream_args, model.args).parameters()))  # lazy
    for key, value in expected.items():
        if key not in found:
            aliases = [n for n, k in STREAM_ALIASES.items() if k == key] + [f"streams.{key}"]
            raise ConversionError(
                f"stream tensor {' or '.join(map(repr, aliases))} {tuple(value.shape)} is "
                f"missing (the streams are {stream_args.to_dict()})"
            )
        name, array = found[key]
        if array.shape != value.shape:
            raise ConversionError(
                f"stream tensor {name!r} has shape {tuple(array.shape)}; streams "
                f"{stream_args.to_dict()} on this model need {tuple(value.shape)}"
            )
    if extra := sorted(set(found) - set(expected)):
        raise ConversionError(
            f"stream tensor {found[extra[0]][0]!r} does not fit the streams "
            f"{stream_args.to_dict()}"
        )
    return {key: array.astype(mx.float32) for key, (_, array) in found.items()}
