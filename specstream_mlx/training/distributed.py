"""Data parallelism on MLX's own distributed engine: `mx.distributed`, with processes
started by `mlx.launch` (ring over TCP on one or several machines, or MPI). Without a
launcher the group is this process alone and every helper is a no-op.

Every rank runs the same program on its share of the work; collectives are lazy, so a
step waits for the others where its result is evaluated. A rank that dies makes the
others' collectives fail ("connection to a peer was lost"); one that hangs is caught by
a deadline around each collective step (`Group.deadline`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from specstream_mlx.errors import InputError


class Group:
    """The processes of one run (`mx.distributed.init()`): rank, size, collectives.

    timeout: seconds a collective step may wait for the other ranks before this process
    stops with a message naming the step (a rank that hangs or was never started).
    """

    def __init__(self, timeout: float = 600.0):
        self.timeout = timeout
        launched = any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK",
                                                 "PMI_RANK"))
        with self.deadline("connecting to the other processes", active=launched):
            self.group = mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    @property
    def main(self) -> bool:
        """Rank 0 writes files and logs."""
        return self.rank == 0

    @contextmanager
    def deadline(self, what: str, active: bool | None = None):
        """Stop this process (exit code 3) if the block takes longer than the timeout; a
        lost peer inside it becomes an error naming `what`."""
        if active is None:
            active = self.size > 1
        if not active:
            yield
            return

        def expire() -> None:
            print(f"specstream: rank {os.environ.get('MLX_RANK', '?')} waited "
                  f"{self.timeout:.0f} s for the other processes while {what}; stopping "
                  "(a process died or hangs, or a host cannot be reached)",
                  file=sys.stderr, flush=True)
            os._exit(3)

        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except RuntimeError as e:
            if "peer" in str(e) or "ring" in str(e):
                raise RuntimeError(f"rank {self.rank}: another process stopped while {what} "
                                   f"({e})") from e
            raise
        finally:
            timer.cancel()

    def all_sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.group)

    def average_gradients(self, grads):
        """The mean of every rank's gradients (mlx.nn.average_gradients)."""
        if self.size == 1:
            return grads
        import mlx.nn as nn

        return nn.average_gradients(grads, group=self.group)

    def broadcast(self, tree):
        """Rank 0's arrays on every rank (a sum where the other ranks add zeros), taken in
        the order of their sorted names: the same on every rank whatever order each
        rank's tree was built or loaded in."""
        if self.size == 1:
            return tree
        if isinstance(tree, mx.array):
            return self.all_sum(tree if self.main else mx.zeros_like(tree))
        flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])
        return tree_unflatten([(k, self.all_sum(x if self.main else mx.zeros_like(x)))
                               for k, x in flat])

    def gather_floats(self, values: list[float]) -> np.ndarray:
        """(size, len(values)): every rank's values, on every rank."""
        x = mx.array(np.asarray(values, dtype=np.float32))
        if self.size == 1:
            return np.array(x)[None]
        return np.array(mx.distributed.all_gather(x[None], group=self.group))

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order, on every rank."""
        if self.size == 1:
            return [data]
        sizes = self.gather_floats([len(data)])[:, 0].astype(np.int64)
        padded = np.zeros(int(sizes.max()), dtype=np.uint8)
        padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = np.array(mx.distributed.all_gather(mx.array(padded)[None], group=self.group))
        return [rows[r, : sizes[r]].tobytes() for r in range(self.size)]

    def check_same(self, what: str, fingerprint: str) -> None:
        """InputError on every rank unless all ranks give the same fingerprint."""
        if self.size == 1:
            return
        digest = hashlib.sha256(fingerprint.encode()).digest()
        # Four 12-bit parts: their sums and sums of squares stay exact in int32. All
        # equal exactly when size * sum(x^2) == sum(x)^2 for every part.
        parts = np.frombuffer(digest[:8], dtype=np.uint16)[:4].astype(np.int32) & 0xFFF
        x = mx.array(parts)
        with self.deadline(f"comparing {what}"):
            total, squares = self.all_sum(x), self.all_sum(x * x)
            mx.eval(total, squares)
        total, squares = np.array(total, np.int64), np.array(squares, np.int64)
        if np.any(self.size * squares != total * total):
            raise InputError(f"the {self.size} processes disagree on {what} (rank "
                             f"{self.rank}: {fingerprint[:80]!r}): every process must be "
                             "given the same model, data and settings")
