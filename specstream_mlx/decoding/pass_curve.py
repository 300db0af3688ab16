"""The cost of a decode pass by its rows on this machine, measured once per machine and
model shape and kept in $SPECSTREAM_HOME/passes.json: the controller's guess for a row
count it has not run yet in this process.

The cost is far from linear in rows, and steps where the matrix products change form
(matmul_plan) are where a linear guess errs most: SmolLM2 on this repository's 2-core
EPYC (plain passes after 128 tokens, ms) 1: 45-50, 2: 46-48, 8: 90, 9: 94-95, 16: 93,
17: 125-127, 24: 118-120, 33: 166, 41: 188. Before, the controller extrapolated
unmeasured sizes from the ones it had run, so whether it ever tried a long context copy
depended on which sizes earlier prompts had left measured. Only the curve's shape is
used (costs.PassCosts scales it to the running measurements), so a measurement in
a slow spell still serves. SPECSTREAM_PASS_CURVE=off leaves the controller without a
curve; =measure measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, is_dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from specstream_mlx.blas import cache_file, machine_key
from specstream_mlx.checkpoint import read_cache_json, write_cache_json
from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.costs import costs_for
from specstream_mlx.decoding.tree import DraftTree

# Rows measured: the sizes a step takes most (a root, stream nodes, chains of 1..32) and
# both sides of the jumps seen here (8 | 9, 16 | 17); others are interpolated.
ROWS = (1, 2, 4, 8, 9, 16, 17, 24, 33, 41)
PREFIX = 128  # tokens of context under the measured passes
REPEATS = 2


def time_pass(model, cache: KVCache, tree: DraftTree, repeats: int,
              streams: bool = True) -> float:
    """Milliseconds of one verify-and-draft pass of `tree` on top of `cache`, as decoding
    runs it (`step.verify`: in lossless mode the stream rows of the accepted node only,
    and the next candidates); with streams False a plain decoding pass. The pass's K/V
    stay pending, so every repeat sees the same cache."""
    from specstream_mlx.decoding.step import verify  # step imports the controller

    top_k = model.stream_args.top_k if streams and model.stream_args is not None else 0
    head = model.draft_head() if top_k else None
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        tic = time.perf_counter()
        verify(model, cache, 4, tree, None, top_k, streams, head)
        times.append(time.perf_counter() - tic)
    return float(np.median(times[1:]) * 1000)


def pass_cost(model, rows: list[int] | tuple[int, ...], prefix: int = 256, repeats: int = 5,
              streams: bool = True) -> dict[int, float]:
    """Milliseconds of one decode pass over `rows` tree rows (the root and a chain), after
    a `prefix`-token prompt: a drafting pass as decoding runs it when the model has
    streams and `streams`, else a plain one."""
    cache = KVCache(len(model.layers))
    model(mx.zeros((1, prefix), dtype=mx.int32), cache=cache)
    cache.commit(range(prefix))
    mx.eval(cache.state())
    return {n: time_pass(model, cache, DraftTree(list(range(5, 4 + n)), list(range(n - 1))),
                         repeats, streams) for n in rows}


def _signature(model) -> str:
    """The model's shape and precision, as a short hash (the streams' shape, not their
    decoding defaults: a tuned tree budget does not change what a pass costs)."""
    def fields(args):
        return asdict(args) if is_dataclass(args) else repr(args)

    dtypes = sorted({str(v.dtype) for _, v in tree_flatten(model.parameters())})
    sa = getattr(model, "stream_args", None)
    text = json.dumps([fields(getattr(model, "args", None)),
                       sa.shape() if sa is not None else None, dtypes],
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _key(model) -> str:
    return f"{machine_key()} | {mx.default_device()} | model {_signature(model)}"


def apply(model, verbose: bool = True) -> dict[int, float]:
    """Give the controller of `model` its pass-cost curve (seconds by rows, plain passes):
    from the cache, else measured (~3.5 s for SmolLM2 here, once per machine and model
    shape). Returns the curve ({} with SPECSTREAM_PASS_CURVE=off or without streams)."""
    mode = os.environ.get("SPECSTREAM_PASS_CURVE", "").lower()
    prefix = min(PREFIX, model.args.max_position_embeddings - max(ROWS) - 1)
    # Nothing to guess for a model without streams (no controller), nor in a context too
    # short for the largest pass.
    if mode == "off" or prefix < 1 or getattr(model, "stream_args", None) is None:
        return {}
    path = cache_file("passes.json")
    saved = read_cache_json(path)
    key = _key(model)
    entry = None if mode == "measure" else saved.get(key)
    valid = isinstance(entry, dict) and sorted(entry) == sorted(str(r) for r in ROWS) \
        and all(isinstance(v, (int, float)) and v > 0 for v in entry.values())
    if not valid:
        if verbose:
            print("[specstream] measuring decode passes on this machine (once)",
                  file=sys.stderr, flush=True)
        ms = pass_cost(model, ROWS, prefix, REPEATS, streams=False)
        entry = {str(r): round(t, 3) for r, t in ms.items()}
        saved[key] = entry
        write_cache_json(path, saved)
    curve = {int(r): t / 1000 for r, t in entry.items()}
    costs_for(model).set_curve(curve)
    return curve
