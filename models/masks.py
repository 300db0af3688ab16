"""Attention masks of a pass: main rows over a cached prefix and a draft tree, and the
stream rows of multi-stream attention (MSA) in the top layers.

Row layout of one pass (B = batch, L = main rows, S = rows carrying streams, g = gamma):

    lower layers:  L main rows                     keys: P cached + L main
    MSA layers:    L main rows, then S*g stream rows  keys: P cached + L main + S*g stream

Stream row (s, j) belongs to main row a = stream_rows[s] and stream j (1..g). It sits at
position positions[a] + j, attends to what main row a sees (prefix, a's ancestors, a)
and to stream rows (s, 1..j). Main rows never attend to stream rows, so they compute
exactly the base model. Only main-row keys/values enter the cache.

Worked example: L = 2 main rows (a chain 0 -> 1), P = 1 cached token, stream_rows = [1],
g = 2. Columns: p0 | m0 m1 | s1.1 s1.2

    m0    1 | 1 0 | 0 0
    m1    1 | 1 1 | 0 0
    s1.1  1 | 1 1 | 1 0
    s1.2  1 | 1 1 | 1 1
"""

from __future__ import annotations

import mlx.core as mx


def prefix_mask(tree_mask: mx.array | None, prefix: int, rows: int) -> mx.array:
    """Boolean mask (rows, prefix + rows) of main rows over cached prefix + main rows.

    tree_mask: (rows, rows) bool, True where row i may see row j; None means causal.
    """
    if tree_mask is None:
        tree_mask = mx.tril(mx.ones((rows, rows), dtype=mx.bool_))
    if prefix == 0:
        return tree_mask
    return mx.concatenate([mx.ones((rows, prefix), dtype=mx.bool_), tree_mask], axis=1)


def stream_mask(main_mask: mx.array, stream_rows: mx.array, num_streams: int) -> mx.array:
    """The stream rows' part of an MSA mask: (S*g, P + L + S*g) bool. Stream row (s, j)
    sees what its main row sees and stream rows (s, 1..j).

    main_mask: (L, P + L) bool; stream_rows: (S,) int32, main rows that carry streams.
    """
    S, g = stream_rows.shape[0], num_streams
    owner = mx.repeat(stream_rows, g)  # (S*g,) main row of each stream row
    step = mx.tile(mx.arange(g), S)  # (S*g,) stream index j-1
    node = mx.repeat(mx.arange(S), g)
    stream_stream = (node[:, None] == node[None, :]) & (step[:, None] >= step[None, :])
    return mx.concatenate([main_mask[owner], stream_stream], axis=1)


def msa_mask(main_mask: mx.array, stream_rows: mx.array, num_streams: int) -> mx.array:
    """Mask of an MSA layer (see the module docstring for a worked example).

    main_mask:   (L, P + L) bool, the lower layers' mask.
    stream_rows: (S,) int32, main rows that carry streams.
    Returns (L + S*g, P + L + S*g) bool.
    """
    L = main_mask.shape[0]
    S, g = stream_rows.shape[0], num_streams
    top = mx.concatenate([main_mask, mx.zeros((L, S * g), dtype=mx.bool_)], axis=1)
    return mx.concatenate([top, stream_mask(main_mask, stream_rows, g)], axis=0)


def sdpa_mask(tree_mask: mx.array | None, prefix: int, rows: int) -> mx.array | str | None:
    """The cheapest mask argument for mx.fast.scaled_dot_product_attention.

    A 4-D tree_mask (B, 1, rows, prefix + rows) is already complete (batched decoding
    with padding) and is used as given.
    """
    if tree_mask is None:
        return "causal" if rows > 1 else None
    if tree_mask.ndim == 4:
        return tree_mask
    return prefix_mask(tree_mask, prefix, rows)
