"""What a drafting pass costs beside a plain one: `step.verify` timed directly after a
256-token prefill, 1 / 4 / 8 rows, without and with the streams' next draft, 12 rounds
interleaved (medians of the last 10, and minima). Run it with nothing else running:

    python experiments/qwen/passcost.py work/qwen/mlx      # a model folder
    python experiments/qwen/passcost.py                    # the embedded SmolLM2
"""

from __future__ import annotations

import statistics
import sys
import time

from specstream_mlx.decoding import step  # (the package picks the BLAS before mlx loads)
from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.loader import load


def main() -> None:
    import mlx.core as mx

    model, _ = load(sys.argv[1] if len(sys.argv) > 1 else None)
    cache = KVCache(len(model.layers))
    step.prefill(model, cache, list(range(1000, 1256)), 128, True)
    head = model.draft_head()
    if head is not None:
        mx.eval(head)

    def once(draft: bool, nodes: int) -> float:
        tree = DraftTree(list(range(2000, 2000 + nodes)), list(range(nodes)))
        tic = time.perf_counter()
        step.verify(model, cache, 1234, tree, None, 3, draft, head)
        seconds = time.perf_counter() - tic
        cache.commit([0])  # one token a pass: the context grows by 1
        return seconds

    times: dict[tuple[bool, int], list[float]] = {}
    for _ in range(12):
        for cfg in [(False, 0), (True, 0), (False, 3), (True, 3), (False, 7), (True, 7)]:
            times.setdefault(cfg, []).append(once(*cfg))
    for (draft, nodes), ts in times.items():
        print(f"{'drafting' if draft else 'plain':8} {nodes + 1:2} rows: median "
              f"{statistics.median(ts[2:]) * 1000:6.1f} ms, min {min(ts) * 1000:6.1f} ms")


if __name__ == "__main__":
    main()
