"""Model definitions: parity with mlx-lm, lossless streams, stream-row and tree-mask semantics."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import reference_model, tiny_model

from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import ModelLoadError
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.models.masks import msa_mask, prefix_mask

ATOL = 1e-4
TOKENS = [[3, 17, 42, 8, 91, 5, 5, 60, 23, 1, 77, 34], [9, 2, 64, 64, 13, 88, 41, 7, 0, 56, 30, 12]]
STREAMS = StreamArgs(num_streams=3, msa_layers=2)


def close(a: mx.array, b: mx.array, atol: float = ATOL) -> None:
    np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=0)


def causal_logits(model, tokens: list[int], stream_rows=None):
    """Main and stream logits of one causal pass over `tokens` with a fresh cache."""
    return model(mx.array([tokens]), cache=KVCache(len(model.layers)), stream_rows=stream_rows)


def test_matches_mlx_lm(arch):
    """Without streams, logits equal mlx-lm's implementation on the same weights."""
    model = tiny_model(arch, seed=1)
    ref = reference_model(arch, model)
    x = mx.array(TOKENS)
    logits, stream_logits = model(x)
    assert stream_logits is None
    close(logits, ref(x))


def test_incremental_decoding_matches_mlx_lm(arch):
    """Prefill with our KVCache then one token at a time reproduces mlx-lm's full pass."""
    model = tiny_model(arch, seed=2)
    expected = reference_model(arch, model)(mx.array(TOKENS))
    cache = KVCache(len(model.layers))
    n = 5
    logits, _ = model(mx.array([row[:n] for row in TOKENS]), cache=cache)
    cache.commit(range(n))
    close(logits, expected[:, :n])
    for t in range(n, len(TOKENS[0])):
        logits, _ = model(mx.array([[row[t]] for row in TOKENS]), cache=cache)
        cache.commit([0])
        close(logits[:, 0], expected[:, t])
    assert cache.offset == len(TOKENS[0])


def test_streams_are_lossless(arch):
    """With streams on every row (main rows blind to them), main logits are the base model's;
    stream logits have shape (B, L, gamma, V) and are not copies of the main logits."""
    base = tiny_model(arch, seed=3)
    model = tiny_model(arch, seed=3, streams=STREAMS)
    x = mx.array(TOKENS)
    B, L = x.shape
    expected, _ = base(x)
    logits, none = model(x)
    assert none is None
    close(logits, expected, 1e-5)
    logits, stream_logits = model(x, stream_rows=mx.arange(L))
    close(logits, expected, 1e-5)
    assert stream_logits.shape == (B, L, 3, model.args.vocab_size)
    for j in range(3):
        assert mx.abs(stream_logits[:, :, j] - logits).max().item() > 1e-2
    # the streams differ from each other too (distinct stream embeddings)
    assert mx.abs(stream_logits[:, :, 0] - stream_logits[:, :, 1]).max().item() > 1e-2


def reference_msa(ref, split: int, embeddings: mx.array, tokens: list[int]):
    """MSA from the spec, on mlx-lm's layers: the last token's g stream rows are appended
    after the main rows (so they sit at positions t+1..t+g) once layer `split` is reached;
    stream rows are causal, and main rows never attend to them.

    Returns main logits (L, V) and stream logits (g, V).
    """
    L, g = len(tokens), embeddings.shape[0]
    R = L + g
    mask = np.tril(np.ones((R, R), dtype=bool))
    h = ref.model.embed_tokens(mx.array([tokens]))
    for layer in ref.model.layers[:split]:
        h = layer(h, "causal", None)
    h = mx.concatenate([h, h[:, -1:] + embeddings[None]], axis=1)
    for layer in ref.model.layers[split:]:
        h = layer(h, mx.array(mask), None)
    h = ref.model.norm(h)
    logits = ref.lm_head(h) if "lm_head" in ref else ref.model.embed_tokens.as_linear(h)
    return logits[0, :L], logits[0, L:]


@pytest.mark.parametrize("msa_layers", [1, 2, 4])
def test_streams_match_spec_reference(arch, msa_layers):
    """Main and stream logits with streams on the last row equal an independent MSA built
    on mlx-lm's layers: stream j at position t+j, seeing the prefix and streams 1..j."""
    sa = StreamArgs(num_streams=3, msa_layers=msa_layers)
    model = tiny_model(arch, seed=7, streams=sa)
    ref = reference_model(arch, model)
    tokens = TOKENS[1][:9]
    logits, stream_logits = model(
        mx.array([tokens]), stream_rows=mx.array([len(tokens) - 1], dtype=mx.int32)
    )
    want_main, want_streams = reference_msa(ref, model.split, model.streams.embeddings, tokens)
    close(logits[0], want_main)
    close(stream_logits[0, 0], want_streams)


@pytest.mark.parametrize("t", [0, 4, 11])
def test_stream_rows_do_not_leak(arch, t):
    """Stream logits of row t are the same whether only row t or every row carries streams."""
    model = tiny_model(arch, seed=4, streams=STREAMS)
    x = mx.array(TOKENS)
    L = x.shape[1]
    _, one = model(x, stream_rows=mx.array([t], dtype=mx.int32))
    _, every = model(x, stream_rows=mx.arange(L, dtype=mx.int32))
    assert one.shape[1] == 1
    close(one[:, 0], every[:, t])
    _, some = model(x, stream_rows=mx.array([t, (t + 5) % L], dtype=mx.int32))
    close(some[:, 0], every[:, t])


def test_stream_rows_are_causal(arch):
    """Main and stream logits at row t ignore the tokens after t."""
    model = tiny_model(arch, seed=5, streams=STREAMS)
    a = TOKENS[0]
    t = 6
    b = a[: t + 1] + [(tok + 1) % 97 for tok in a[t + 1 :]]
    la, sa = causal_logits(model, a, mx.arange(len(a)))
    lb, sb = causal_logits(model, b, mx.arange(len(b)))
    close(la[:, : t + 1], lb[:, : t + 1])
    close(sa[:, : t + 1], sb[:, : t + 1])
    assert mx.abs(sa[:, t + 1 :] - sb[:, t + 1 :]).max().item() > 1e-2


@pytest.mark.parametrize("with_streams", [False, True])
def test_tree_mask_equals_paths(arch, with_streams):
    """A prefix, then a branching tree at positions offset + depth: every node's main (and
    stream) logits equal those of its root-to-node path fed as a plain sequence."""
    model = tiny_model(arch, seed=6, streams=STREAMS if with_streams else None)
    prefix = [5, 81, 23, 40, 2]
    root = 11
    # root -> 1:30 -> 2:31 -> 3:32; root -> 4:40 -> 5:41; 4 -> 6:31; 1 -> 7:50
    tree = DraftTree(tokens=[30, 31, 32, 40, 41, 31, 50], parents=[0, 1, 2, 0, 4, 4, 1])
    cache = KVCache(len(model.layers))
    model(mx.array([prefix]), cache=cache)
    cache.commit(range(len(prefix)))
    n = len(tree)
    rows = mx.arange(n, dtype=mx.int32) if with_streams else None
    logits, stream_logits = model(
        mx.array([[root] + tree.tokens]),
        mx.array(len(prefix) + tree.depths),
        mx.array(tree.mask),
        cache,
        rows,
    )
    assert (stream_logits is not None) == with_streams
    all_tokens = [root] + tree.tokens
    for node in range(n):
        path, i = [], node
        while True:
            path.insert(0, all_tokens[i])
            if i == 0:
                break
            i = tree.parents[i - 1]
        seq = prefix + path
        last = mx.array([len(seq) - 1], dtype=mx.int32) if with_streams else None
        ref_logits, ref_streams = causal_logits(model, seq, last)
        close(logits[0, node], ref_logits[0, -1])
        if with_streams:
            close(stream_logits[0, node], ref_streams[0, 0])


def test_msa_mask_docstring_example():
    """msa_mask reproduces the worked example in models/masks.py exactly."""
    chain = mx.array([[True, False], [True, True]])
    mask = msa_mask(prefix_mask(chain, 1, 2), mx.array([1], dtype=mx.int32), 2)
    expected = [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert mask.dtype == mx.bool_
    assert np.array(mask).astype(int).tolist() == expected


def test_msa_mask_keeps_main_rows_blind_to_streams():
    """Main rows see no stream row; stream rows see their own main row's view and the
    earlier stream rows of that row only."""
    causal = prefix_mask(None, 0, 3)
    mask = np.array(msa_mask(causal, mx.array([0, 2], dtype=mx.int32), 2)).astype(int)
    # columns: m0 m1 m2 | s0.1 s0.2 s2.1 s2.2
    assert mask[:3].tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
    ]
    assert mask[3:, 3:].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert mask[3:, :3].tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("msa_layers", [0, 5])
def test_attach_streams_rejects_bad_layer_count(msa_layers):
    """msa_layers outside 1..num_hidden_layers raises ModelLoadError naming the range."""
    model = tiny_model("llama")
    with pytest.raises(ModelLoadError, match="msa_layers"):
        model.attach_streams(StreamArgs(num_streams=2, msa_layers=msa_layers))
    assert model.stream_args is None
