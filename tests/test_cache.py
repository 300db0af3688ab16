"""KVCache: pending writes after the offset, commit of an accepted path, growth, trim."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from specstream_mlx.decoding.cache import KVCache

B, H, D = 1, 2, 4


def rows(n: int, start: float = 0.0) -> mx.array:
    """n distinguishable rows (B, H, n, D): row i holds start + i in every entry."""
    vals = mx.arange(n, dtype=mx.float32) + start
    return mx.broadcast_to(vals[None, None, :, None], (B, H, n, D))


def fill(cache: KVCache, n: int, start: float) -> tuple[mx.array, mx.array]:
    """Write n pending rows to every layer (values are keys + 1000); returns the last pair."""
    out = None
    for layer in range(len(cache.keys)):
        out = cache.write(layer, rows(n, start), rows(n, start + 1000))
    return out


def column(a: mx.array) -> list[float]:
    """The per-slot value of a (B, H, n, D) array built by `rows` (all entries agree)."""
    arr = np.array(a)
    assert (arr == arr[:, :, :, :1]).all() and (arr == arr[:, :1]).all()
    return arr[0, 0, :, 0].tolist()


def test_write_returns_committed_plus_pending():
    """write() returns slots 0 .. offset+n-1: the committed rows followed by the new ones."""
    cache = KVCache(2)
    keys, values = fill(cache, 3, 0)
    assert keys.shape == (B, H, 3, D) and values.shape == (B, H, 3, D)
    assert column(keys) == [0, 1, 2] and column(values) == [1000, 1001, 1002]
    assert cache.offset == 0  # writing alone commits nothing
    cache.commit(range(3))
    keys, values = fill(cache, 2, 10)
    assert column(keys) == [0, 1, 2, 10, 11]
    assert column(values) == [1000, 1001, 1002, 1010, 1011]


def test_uncommitted_rows_are_overwritten():
    """Rejected pending rows need no cleanup: the next write at the same offset replaces them."""
    cache = KVCache(1)
    fill(cache, 2, 0)
    cache.commit([0])
    fill(cache, 3, 50)  # pending slots 1..3, none committed
    keys, _ = fill(cache, 1, 90)
    assert column(keys) == [0, 90]


def test_contiguous_commit_only_advances_offset():
    """Committing a prefix path [0..n-1] moves nothing: same arrays, offset += n."""
    cache = KVCache(2)
    fill(cache, 4, 0)
    before = list(cache.keys), list(cache.values)
    cache.commit([0, 1, 2])
    assert cache.offset == 3
    assert all(a is b for a, b in zip(before[0], cache.keys, strict=True))
    assert all(a is b for a, b in zip(before[1], cache.values, strict=True))
    assert column(cache.keys[1][..., :3, :]) == [0, 1, 2]


def test_noncontiguous_commit_moves_rows():
    """commit([0, 2, 4]) copies pending rows 0, 2, 4 to the next committed slots, every layer."""
    cache = KVCache(3)
    fill(cache, 2, 100)
    cache.commit(range(2))
    fill(cache, 5, 0)  # pending rows 0..4 at slots 2..6
    cache.commit([0, 2, 4])
    assert cache.offset == 5
    for layer in range(3):
        assert column(cache.keys[layer][..., :5, :]) == [100, 101, 0, 2, 4]
        assert column(cache.values[layer][..., :5, :]) == [1100, 1101, 1000, 1002, 1004]
    # the next pass sees exactly the committed path before its own rows
    keys, values = fill(cache, 1, 7)
    assert column(keys) == [100, 101, 0, 2, 4, 7]
    assert column(values) == [1100, 1101, 1000, 1002, 1004, 1007]


def test_commit_of_root_only_and_empty_path():
    """A path of just the root keeps one row; an empty path keeps none."""
    cache = KVCache(1)
    fill(cache, 3, 0)
    cache.commit([0])
    assert cache.offset == 1
    fill(cache, 2, 20)
    cache.commit([])
    assert cache.offset == 1
    assert column(cache.keys[0][..., :1, :]) == [0]


def test_growth_keeps_earlier_contents():
    """Writing past the capacity grows storage by whole `step`s and keeps committed rows."""
    cache = KVCache(2)
    cache.step = 4
    fill(cache, 3, 0)
    cache.commit(range(3))
    assert cache.capacity == 4
    keys, values = fill(cache, 6, 10)  # needs 9 slots
    assert cache.capacity == 12
    assert column(keys) == [0, 1, 2, *range(10, 16)]
    assert column(values) == [1000, 1001, 1002, *range(1010, 1016)]
    cache.commit([0, 5])  # copy path after growth
    assert column(cache.keys[1][..., :5, :]) == [0, 1, 2, 10, 15]


def test_growth_with_default_step():
    """With the default step, crossing 256 slots keeps every earlier row."""
    cache = KVCache(1)
    fill(cache, 250, 0)
    cache.commit(range(250))
    keys, _ = fill(cache, 10, 1000.5)
    assert cache.capacity == 2 * KVCache.step
    assert column(keys) == [*range(250), *(1000.5 + i for i in range(10))]


def test_trim():
    """trim(n) forgets the last n committed slots (clamped at 0); later writes reuse them."""
    cache = KVCache(1)
    fill(cache, 5, 0)
    cache.commit(range(5))
    assert cache.trim(2) == 2 and cache.offset == 3
    keys, _ = fill(cache, 1, 40)
    assert column(keys) == [0, 1, 2, 40]
    assert cache.trim(0) == 0 and cache.offset == 3
    assert cache.trim(10) == 3 and cache.offset == 0


def test_state_and_nbytes():
    """state() lists every allocated array; nbytes is their total size."""
    cache = KVCache(3)
    assert cache.state() == [] and cache.nbytes == 0 and cache.capacity == 0
    fill(cache, 2, 0)
    assert len(cache.state()) == 6
    assert cache.nbytes == 6 * B * H * KVCache.step * D * 4
