"""Sampling with one set of random numbers per position, so speculation cannot change the
output.

A token at context position p+1 is drawn by the Gumbel-max trick: the argmax of the
tempered log-probabilities plus Gumbel noise (vocab,) drawn with MLX's own generator
from the key (the generation's seed, p). Every row of a pass that sits at position p (all
tree nodes of one depth) adds the same noise. The accepted path then emits the tokens
plain decoding draws from the same seed, whatever the tree (its size, its shape, the
controller's choice, no draft at all), and every token is an exact sample of the model's
distribution: the noise at p is independent of the tokens before p.
"The same tokens" holds up to float rounding, as greedy identity does: a pass of several
rows computes logits that differ from a one-row pass's in the last bits, so where the
best two perturbed scores are that close the other one can win (as rare as a greedy
near-tie; the run then continues from a different, equally exact sample).
Filters and temperature are mlx-lm's (`top_p`, `min_p`, `top_k` on the log-probabilities,
then the temperature), so the distribution is the one mlx-lm's `make_sampler` samples
from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from specstream_mlx.settings import check_settings


@lru_cache(maxsize=8)
def _gumbels(vocab: int):
    """keys (P, 2) uint32 -> Gumbel noise (P, vocab), each row from its own key."""
    return mx.vmap(lambda key: mx.random.gumbel(shape=(vocab,), key=key))


@dataclass(frozen=True)
class PositionSampler:
    """Maps log-probabilities (rows, vocab) and each row's position (rows,) to one
    sampled token per row (rows,). `seed` (0 .. 2**32 - 1) keys the generation."""

    temp: float
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        check_settings(temp=self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)
        if not self.temp > 0:
            raise ValueError("a PositionSampler samples: temp must be > 0 (None is greedy)")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in 0 .. 2**32 - 1, got {self.seed}")

    @classmethod
    def drawn(cls, temp: float, top_p: float = 0.0, min_p: float = 0.0,
              top_k: int = 0) -> PositionSampler:
        """A sampler whose seed is drawn from MLX's global generator, so a run after
        mx.random.seed(s) repeats itself and consecutive runs differ."""
        seed = mx.random.randint(0, 2**31 - 1, ()).item()  # once per generation
        return cls(temp, top_p, min_p, top_k, int(seed))

    def noise(self, positions, vocab: int) -> mx.array:
        """Gumbel noise (rows, vocab) for positions (rows,) (host ints), drawn once per
        distinct position: equal positions get equal rows."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        uniq, row_of = np.unique(positions, return_inverse=True)
        keys = np.stack([np.full(len(uniq), self.seed), uniq], axis=-1).astype(np.uint32)
        g = _gumbels(vocab)(mx.array(keys))
        return g if len(uniq) == len(positions) else g[mx.array(row_of.astype(np.int32))]

    def noise_after(self, row: mx.array, depth: int, vocab: int) -> mx.array:
        """The noise `noise` gives positions row + 1 .. row + depth, for a position `row`
        (0-d int32) still on the device: (depth, vocab). What the streams drafting at
        `row` are coupled with (step.stream_candidates)."""
        pos = (row + mx.arange(1, depth + 1, dtype=mx.int32)).astype(mx.uint32)
        keys = mx.stack([mx.full((depth,), self.seed, dtype=mx.uint32), pos], axis=-1)
        return _gumbels(vocab)(keys)

    def filtered(self, logprobs: mx.array) -> mx.array:
        """logprobs (rows, vocab) with the filtered-out tokens at -inf."""
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs

    def __call__(self, logprobs: mx.array, positions) -> mx.array:
        # Filtered tokens are -inf: noise cannot lift them.
        scores = self.filtered(logprobs) * (1.0 / self.temp) + self.noise(
            positions, logprobs.shape[-1])
        return mx.argmax(scores, axis=-1).astype(mx.int32)


def sample_rows(logprobs: mx.array, samplers: list[PositionSampler], positions) -> mx.array:
    """Row i of logprobs (rows, vocab) drawn by samplers[i] at positions[i] (rows,), in one
    call: the token samplers[i](logprobs[i : i + 1], positions[i : i + 1]) gives (rows,).
    For batches of independent generations (self-distillation), each with its own seed;
    the samplers must agree on everything but the seed."""
    first = samplers[0]
    if len(samplers) != logprobs.shape[0] or any(
            replace(s, seed=first.seed) != first for s in samplers):
        raise ValueError("sample_rows needs one sampler per row, alike but for the seed")
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    keys = np.stack([[s.seed for s in samplers], positions], axis=-1).astype(np.uint32)
    scores = first.filtered(logprobs) * (1.0 / first.temp) + _gumbels(logprobs.shape[-1])(
        mx.array(keys))
    return mx.argmax(scores, axis=-1).astype(mx.int32)
