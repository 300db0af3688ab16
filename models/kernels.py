"""The numeric kernels of a pass where the CPU needs its own forms: products of a few rows
with a weight matrix, and attention of a few rows under a mask. Elsewhere (a GPU) they
are MLX's own operations."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

# How x @ w.T runs on the CPU, per (w's rows, w's columns, rows of x): (transposed,
# padded rows). BLAS libraries switch kernels and threads by shape (MKL runs one row on
# one thread and two rows on two, so two rows cost less than one), so the form is measured
# per machine (specstream_mlx/matmul_plan.py fills this); shapes it lacks take the default.
MATMUL_PLAN: dict[tuple[int, int, int], tuple[bool, int]] = {}
MAX_PLANNED_ROWS = 32


def matmul_t(x: mx.array, w: mx.array) -> mx.array:
    """x @ w.T for x (..., in) and a float w (out, in). On the CPU, as MATMUL_PLAN says for
    this shape: (w @ x^T)^T or x @ w^T, on x's rows padded with zero rows or not. Default
    (no plan): a few rows through (w @ x^T)^T, since BLAS libraries handle a skinny
    right-hand side better than a few-row left one (MKL, SmolLM2's matmuls with 4 rows:
    61 ms a pass instead of 117; its tied head with 4 rows: 18 ms instead of 46)."""
    rows = x.size // x.shape[-1]
    if rows > MAX_PLANNED_ROWS or mx.default_device() != mx.cpu:
        return x @ w.T
    transposed, padded = MATMUL_PLAN.get((*w.shape, rows), (rows > 1, rows))
    if not transposed and padded == rows:
        return x @ w.T
    x2 = x.reshape(rows, -1)
    if padded > rows:
        x2 = mx.concatenate([x2, mx.zeros((padded - rows, x2.shape[1]), x2.dtype)])
    y = (w @ x2.T).T if transposed else x2 @ w.T
    if padded > rows:
        y = y[:rows]
    return y.reshape(*x.shape[:-1], -1)


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x) for x (..., in), through matmul_t for a plain float Linear (quantized and
    LoRA-wrapped layers are other classes and run their own call)."""
    if not isinstance(layer, nn.Linear):
        return layer(x)
    y = matmul_t(x, layer.weight)
    return y + layer.bias if "bias" in layer else y


# One row attends through the folded path from this many keys on (measured crossover).
LONG_PREFIX = 512
_LN2 = math.log(2.0)
_LN2_HI = 0.693145751953125  # 10 significant bits: n * _LN2_HI is exact
_LN2_LO = _LN2 - _LN2_HI


def _exp_poly(x: mx.array) -> mx.array:
    """exp(x) for x in [-127 ln 2, 127 ln 2] as multiply-adds (traced into the compiled
    kernels below): MLX's CPU exp is a scalar loop (~12 ns an element). exp(x) = 2^n * e^y
    with n = round(x / ln 2) and y = x - n ln 2 (ln 2 split in two so y is exact), e^y by
    its Taylor series to degree 7 (|y| <= ln(2) / 2: error < 1e-8); n's bits go straight
    into the exponent field, and n = -127 gives exactly 0. The gradient flows through y
    only (n is piecewise constant), so it is the series' derivative times 2^n."""
    n = mx.stop_gradient(mx.round(x * (1 / _LN2)))
    y = (x - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 5040.0
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * y + c
    scale = ((n.astype(mx.int32) + 127) << 23).view(mx.float32)
    return p * scale


@mx.compile
def _exp_shifted(s: mx.array, m: mx.array) -> mx.array:
    """exp(s - m) for s <= m (or s = -inf), as one fused kernel (SmolLM2, 16 rows over a
    256-token prefix: 19 ms of MLX's exp a pass)."""
    return _exp_poly(mx.maximum(s - m, -127 * _LN2))


@mx.compile
def _silu_mul_f32(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up = gate / (1 + exp(-gate)) * up, one fused kernel. exp(-gate) is
    clipped to [2^-126, 2^127]: the sigmoid then differs from exact by < 1e-37."""
    e = _exp_poly(mx.clip(-gate, -126 * _LN2, 127 * _LN2))
    return gate / (1.0 + e) * up


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """The MLP's silu(gate) * up: fused with the multiply-add exp on the CPU in float32
    (SmolLM2, 8 rows: ~6 ms of a pass in MLX's silu), MLX's own ops elsewhere."""
    if mx.default_device() == mx.cpu and gate.dtype == mx.float32:
        return _silu_mul_f32(gate, up)
    return nn.silu(gate) * up


def attention(q: mx.array, keys: mx.array, values: mx.array, scale: float,
              mask: mx.array | str | None) -> mx.array:
    """Scaled dot-product attention: q (B, H, R, D), keys and values (B, H_kv, S, D),
    mask (R, S) bool, "causal", a 4-D mask or None -> (B, H, R, D).

    On the CPU, float32, two cases attend through one product per key/value head (a
    group's query heads folded into rows: MLX's fallback makes one BLAS call per query
    head, each paying the library's threading overhead) and a softmax whose exp is
    `_exp_shifted`: a few rows under a 2-D mask (SmolLM2, 16 rows: 25 ms a pass instead
    of 30+) or a 4-D one (B, 1, R, S) (batched decoding, one row or more), and one row
    over a long prefix (30 layers, 1,000 keys: 10.9 ms instead of
    14.8; below ~512 keys MLX's own kernel is as fast). Many rows under "causal"
    (prefill, the frozen hidden states of training) attend in chunks of rows
    (`causal_chunks`)."""
    B, H, R, D = q.shape
    Hk, S = keys.shape[1], keys.shape[2]
    if (isinstance(mask, str) and R >= 2 * CAUSAL_CHUNK and mx.default_device() == mx.cpu
            and q.dtype == mx.float32):
        return causal_chunks(q, keys, values, scale)
    few_rows = R <= 64 and isinstance(mask, mx.array) and (
        (mask.ndim == 2 and R > 1) or (mask.ndim == 4 and mask.shape[1] == 1))
    long_row = R == 1 and mask is None and S >= LONG_PREFIX
    if (not (few_rows or long_row) or mx.default_device() != mx.cpu
            or q.dtype != mx.float32):
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    g = H // Hk
    s = (q * scale).reshape(B, Hk, g * R, D) @ keys.swapaxes(-1, -2)
    if few_rows and mask.ndim == 2:
        s = mx.where(mask, s.reshape(B, Hk, g, R, -1), mx.array(-float("inf"), s.dtype))
    elif few_rows:  # (B, 1, R, S): one mask per batch entry, shared by its heads
        # The lowest finite score, not -inf: a row that sees nothing (left padding) then
        # averages every value as MLX's kernel does, instead of giving NaN.
        s = mx.where(mask[:, :, None], s.reshape(B, Hk, g, R, -1),
                     mx.array(mx.finfo(s.dtype).min, s.dtype))
    e = _exp_shifted(s, mx.max(s, axis=-1, keepdims=True))
    p = (e / mx.sum(e, axis=-1, keepdims=True)).reshape(B, Hk, g * R, -1)
    return (p @ values).reshape(B, H, R, D)


def grouped_attention(q: mx.array, keys: mx.array, values: mx.array, own_keys: mx.array,
                      own_values: mx.array, scale: float, mask: mx.array, group: int
                      ) -> mx.array:
    """Attention of rows that come in groups of `group` siblings (the stream rows of a
    stream-only pass: row (n, j) is stream j+1 of node n): each row sees the shared keys
    its `mask` allows and its own group's rows up to itself. The same result as one
    attention over shared + own keys under the full mask, without the (R, R) block of
    which only the diagonal groups are visible (training: 576 stream rows over 224 keys
    score 227 keys a row instead of 800).

    q: (B, H, R, D) with R = N * group; keys, values: (B, H_kv, P, D) shared;
    own_keys, own_values: (B, H_kv, R, D) the rows' own; mask: (R, P) bool, or (B, R, P)
    one per batch entry. Returns (B, H, R, D).
    """
    B, H, R, D = q.shape
    Hk, P = keys.shape[1], keys.shape[2]
    rep, N = H // Hk, R // group
    q = q * scale
    # Query heads of a key/value head folded into rows: one product per key/value head.
    shared = (q.reshape(B, Hk, rep * R, D) @ keys.swapaxes(-1, -2)).reshape(
        B, Hk, rep, N, group, P)
    blocked = mx.array(-float("inf"), q.dtype)
    bias = mx.where(mask, mx.array(0.0, q.dtype), blocked).reshape(*mask.shape[:-2], N, group, P)
    shared = shared + (bias[:, None, None] if mask.ndim == 3 else bias)
    k_own = own_keys.reshape(B, Hk, 1, N, group, D)
    own = q.reshape(B, Hk, rep, N, group, D) @ k_own.swapaxes(-1, -2)
    causal = mx.tril(mx.ones((group, group), dtype=mx.bool_))
    own = own + mx.where(causal, mx.array(0.0, q.dtype), blocked)
    p = mx.softmax(mx.concatenate([shared, own], axis=-1), axis=-1)
    out = (p[..., :P].reshape(B, Hk, rep * R, P) @ values).reshape(B, Hk, rep, N, group, D)
    out = out + p[..., P:] @ own_values.reshape(B, Hk, 1, N, group, D)
    return out.reshape(B, H, R, D)


# Rows a chunk of `causal_chunks` (measured: 8 x 512 rows, 333 ms -> 198 ms a layer).
CAUSAL_CHUNK = 64


def causal_chunks(q: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
    """Causal attention of the R last positions of S keys (the rows follow a prefix of
    S - R cached keys), chunk by chunk of rows, each chunk scoring only the keys up to its
    last row. MLX's CPU kernel scores every key of every row and masks the upper half
    away, and its exp costs ~12 ns an element here: a chunk of rows skips most of that.

    q: (B, H, R, D); keys, values: (B, H_kv, S, D). Returns (B, H, R, D).
    """
    B, H, R, D = q.shape
    Hk, S = keys.shape[1], keys.shape[2]
    rep, prefix = H // Hk, S - R
    q = (q * scale).reshape(B, Hk, rep, R, D)
    blocked = mx.array(-float("inf"), q.dtype)
    out = []
    for start in range(0, R, CAUSAL_CHUNK):
        end = min(start + CAUSAL_CHUNK, R)
        n, seen = end - start, prefix + end
        s = q[:, :, :, start:end].reshape(B, Hk, rep * n, D) @ keys[:, :, :seen].swapaxes(-1, -2)
        row = mx.arange(prefix + start, prefix + end)[:, None]
        bias = mx.where(row >= mx.arange(seen)[None], mx.array(0.0, q.dtype), blocked)
        p = mx.softmax(s.reshape(B, Hk, rep, n, seen) + bias, axis=-1)
        out.append((p.reshape(B, Hk, rep * n, seen) @ values[:, :, :seen])
                   .reshape(B, H, n, D))
    return mx.concatenate(out, axis=2)
