"""How a model's weight matrices multiply a few rows on the CPU, chosen by measurement once
per machine (like the BLAS itself, blas.py) and kept in $SPECSTREAM_HOME/matmul.json.

A decode pass multiplies 1 to ~32 rows by every weight matrix. BLAS libraries pick their
kernel and threading by shape, so the cost is far from linear in rows: on this
repository's 2-core EPYC with MKL, one row goes through a one-thread gemv while two rows
use both cores (SmolLM2's 1536x576 matrices: 1 row 280 us, 2 rows 190 us), and between 5
and 15 rows x @ W^T beats (W @ x^T)^T by up to 1.6x while 16 rows favours the latter. For
every distinct weight shape and every row count up to MAX_PLANNED_ROWS this measures both
orientations on the model's own matrices (enough of them to miss the caches, as a pass
does) at a set of row counts, and picks for each row count the fastest orientation and
padded row count (zero rows added, results dropped: exact). models/kernels.py applies it.
SPECSTREAM_MATMUL_PLAN=off keeps the default forms; SPECSTREAM_MATMUL_PLAN=measure measures
again and replaces the cached plan (after one was measured on a busy machine, say).
"""

from __future__ import annotations

import os
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from specstream_mlx.blas import cache_file, machine_key
from specstream_mlx.checkpoint import read_cache_json, write_cache_json
from specstream_mlx.models import kernels

# Row counts that are measured; any other count pads up to the next of these.
MEASURED_ROWS = (*range(1, 17), 20, 24, 28, 32)
# Bytes of matrices timed together per measurement: more than a CPU's last-level cache.
SAMPLE_BYTES = 32 * 2**20
REPEATS = 3
# An alternative replaces the default form only when at least this much faster (noise).
MIN_GAIN = 0.05

Shape = tuple[int, int]


def weight_samples(model: nn.Module) -> dict[Shape, list[mx.array]]:
    """The float matrices a pass multiplies through kernels.matmul_t, by shape (out, in):
    enough distinct ones of each shape to fill SAMPLE_BYTES (at least one)."""
    mats: list[mx.array] = [m.weight for _, m in model.named_modules()
                            if isinstance(m, nn.Linear)]
    args = getattr(model, "args", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(args, "tie_word_embeddings", False) and isinstance(embed, nn.Embedding):
        mats.append(embed.weight)
    if getattr(model, "stream_args", None) is not None and model.has_draft_vocab:
        mats.append(model.draft_head())
    groups: dict[Shape, list[mx.array]] = {}
    for w in mats:
        if w.ndim != 2 or not mx.issubdtype(w.dtype, mx.floating):
            continue
        group = groups.setdefault(tuple(w.shape), [])
        if sum(v.nbytes for v in group) < SAMPLE_BYTES:
            group.append(w)
    return groups


def _seconds(ws: list[mx.array], x: mx.array, transposed: bool) -> float:
    """Median wall time of multiplying x by every matrix of ws, in one evaluation."""
    times = []
    for _ in range(REPEATS + 1):  # the first run warms up
        tic = time.perf_counter()
        mx.eval([(w @ x.T) if transposed else (x @ w.T) for w in ws])
        times.append(time.perf_counter() - tic)
    return sorted(times[1:])[len(times[1:]) // 2]


def measure(ws: list[mx.array]) -> dict[str, list[float]]:
    """Seconds per MEASURED_ROWS count: {"x_wt": [...], "w_xt": [...]} (x @ W^T, W @ x^T)."""
    out: dict[str, list[float]] = {"x_wt": [], "w_xt": []}
    for rows in MEASURED_ROWS:
        x = mx.random.normal((rows, ws[0].shape[1])).astype(ws[0].dtype)
        mx.eval(x)
        out["x_wt"].append(_seconds(ws, x, False))
        out["w_xt"].append(_seconds(ws, x, True))
    return out


def choose(times: dict[str, list[float]]) -> dict[int, tuple[bool, int]]:
    """For every row count 1..MAX_PLANNED_ROWS: (transposed, padded rows), the fastest
    measured option whose padded count covers it, unless the default form (kernels:
    transposed from 2 rows on, unpadded) is within MIN_GAIN of it or is unmeasured."""
    cost = {(t, r): times["w_xt" if t else "x_wt"][i]
            for i, r in enumerate(MEASURED_ROWS) for t in (False, True)}
    plan = {}
    for rows in range(1, kernels.MAX_PLANNED_ROWS + 1):
        options = [(c, t, r) for (t, r), c in cost.items() if r >= rows]
        best, t, r = min(options)
        default = cost.get((rows > 1, rows))
        if default is None or best < default * (1 - MIN_GAIN):
            plan[rows] = (t, r)
        else:
            plan[rows] = (rows > 1, rows)
    return plan


def _key(shape: Shape, dtype: mx.Dtype) -> str:
    return f"{machine_key()} | {shape[0]}x{shape[1]} {dtype}"


def apply(model: nn.Module, verbose: bool = True) -> dict[Shape, dict[int, tuple[bool, int]]]:
    """Fill kernels.MATMUL_PLAN for the model's weight shapes: from the cache, else by
    measuring (~7 s for SmolLM2-135M here, once per machine, BLAS and shape). Does
    nothing off the CPU or with SPECSTREAM_MATMUL_PLAN=off; measures again with =measure.
    Returns the plans applied."""
    mode = os.environ.get("SPECSTREAM_MATMUL_PLAN", "").lower()
    if mx.default_device() != mx.cpu or mode == "off":
        return {}
    path = cache_file("matmul.json")
    saved = read_cache_json(path)
    applied, changed = {}, False
    for shape, ws in weight_samples(model).items():
        key = _key(shape, ws[0].dtype)
        entry = None if mode == "measure" else saved.get(key)
        if not (isinstance(entry, dict) and entry.get("rows") == list(MEASURED_ROWS)
                and set(entry.get("times", {})) == {"x_wt", "w_xt"}):
            if verbose and not changed:
                print("[specstream] measuring matrix products on this machine (once)",
                      file=sys.stderr, flush=True)
            entry = {"rows": list(MEASURED_ROWS), "times": measure(ws)}
            saved[key], changed = entry, True
        plan = choose(entry["times"])
        kernels.MATMUL_PLAN.update({(*shape, rows): choice for rows, choice in plan.items()})
        applied[shape] = plan
    if changed:
        write_cache_json(path, saved)
    return applied


def summary() -> dict[str, str]:
    """The plan in use, per weight shape: "rows:form" for every row count, form "x" for
    x @ W^T or "W" for (W @ x^T)^T, then the padded row count (e.g. "1:W2 ... 8:x8")."""
    shapes: dict[str, list[str]] = {}
    for (out, inp, rows), (transposed, padded) in sorted(kernels.MATMUL_PLAN.items()):
        shapes.setdefault(f"{out}x{inp}", []).append(
            f"{rows}:{'W' if transposed else 'x'}{padded}")
    return {shape: " ".join(forms) for shape, forms in shapes.items()}
