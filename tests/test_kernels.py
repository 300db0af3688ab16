"""The CPU forms of a pass's products and attention."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_model

from specstream_mlx.decoding.step import generate_step
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.models.kernels import (
    CAUSAL_CHUNK,
    _exp_shifted,
    attention,
    matmul_t,
    silu_mul,
)


def test_matmul_t_equals_the_plain_product():
    w = mx.random.normal((40, 24))
    for rows in list(range(1, 35)) + [50]:
        x = mx.random.normal((1, rows, 24))
        np.testing.assert_allclose(np.array(matmul_t(x, w)), np.array(x @ w.T),
                                   rtol=1e-5, atol=1e-5)


def test_exp_shifted_matches_exp():
    s = mx.concatenate([mx.random.normal((4000,)) * 20, mx.array([-float("inf"), 0.0])])
    m = mx.max(s)
    got = np.array(_exp_shifted(s, m), np.float64)
    want = np.exp(np.array(s - m, np.float64))
    normal = want > 1e-37
    np.testing.assert_allclose(got[normal], want[normal], rtol=2e-7)
    assert got[-2] == 0.0 and np.all(got[~normal] < 1e-37)


def test_silu_mul_matches_mlx_in_value_and_gradient():
    mx.random.seed(3)
    g = mx.concatenate([mx.random.normal((5000,)) * 8,
                        mx.array([0.0, -1e4, 1e4, -88.0, 88.0, -90.0, 90.0, 1e-30])])
    u = mx.random.normal(g.shape)
    want = np.array(nn.silu(g) * u, np.float64)
    got = np.array(silu_mul(g, u), np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
    grad = mx.grad(lambda g: silu_mul(g, u).sum())(g)
    grad_ref = mx.grad(lambda g: (nn.silu(g) * u).sum())(g)
    np.testing.assert_allclose(np.array(grad), np.array(grad_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [2, 5, 16, 33])
def test_folded_attention_matches_sdpa(rows):
    prefix = 40
    q = mx.random.normal((1, 8, rows, 16))
    k = mx.random.normal((1, 2, prefix + rows, 16))
    v = mx.random.normal((1, 2, prefix + rows, 16))
    rng = np.random.default_rng(rows)
    tree = np.tril(rng.random((rows, rows)) < 0.5) | np.eye(rows, dtype=bool)
    mask = mx.array(np.concatenate([np.ones((rows, prefix), bool), tree], axis=1))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    np.testing.assert_allclose(np.array(attention(q, k, v, 0.25, mask)), np.array(want),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys", [100, 600])
def test_one_row_attention_matches_sdpa(keys):
    """One row without a mask: MLX's kernel below LONG_PREFIX keys, the folded one above."""
    q = mx.random.normal((1, 8, 1, 16))
    k = mx.random.normal((1, 2, keys, 16))
    v = mx.random.normal((1, 2, keys, 16))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=None)
    np.testing.assert_allclose(np.array(attention(q, k, v, 0.25, None)), np.array(want),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("batch", "rows", "prefix"), [(2, 2 * CAUSAL_CHUNK, 0),
                                                      (1, 3 * CAUSAL_CHUNK + 17, 0),
                                                      (3, 2 * CAUSAL_CHUNK + 5, 37)])
def test_causal_chunks_match_sdpa(batch, rows, prefix):
    """Many causal rows (prefill, frozen hidden states) attend chunk by chunk; a prefix of
    cached keys comes before them, and a last chunk may be short."""
    q = mx.random.normal((batch, 6, rows, 16))
    k = mx.random.normal((batch, 2, prefix + rows, 16))
    v = mx.random.normal((batch, 2, prefix + rows, 16))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    np.testing.assert_allclose(np.array(attention(q, k, v, 0.25, "causal")), np.array(want),
                               rtol=1e-5, atol=1e-5)


def test_greedy_verification_with_folded_attention_equals_plain():
    """Many-row verify passes (folded attention, fused exp) keep greedy output exact."""
    model = tiny_model("llama", seed=3, streams=StreamArgs(num_streams=3, msa_layers=2))
    prompt = [5, 9, 2, 7, 7, 1]

    def run(**kw):
        return [e.token for e in generate_step(model, prompt, max_tokens=24, **kw)]

    assert run(tree_budget=30, adaptive=False) == run(speculative=False)
