"""Sampling with one random number per position, so speculation cannot change the output.

A sampled token at context position p+1 is drawn by inverse CDF from a uniform keyed by
(the generation's seed, p) with MLX's own generator: every row of a pass that sits at
position p (all tree nodes of one depth) uses the same uniform. The accepted path then
emits the tokens plain decoding draws from the same seed, whatever the tree (its size,
its shape, the controller's choice, no draft at all), and every token is an exact sample
of the model's distribution: the uniform at p is independent of the tokens before p.
"The same tokens" holds up to float rounding, as greedy identity does at near-ties: a
pass of several rows computes logits that differ from a one-row pass's in the last bits,
so a uniform that falls that close to the boundary between two tokens can pick the
neighbour (seen once in ~1,500 sampled tokens of the real model here; the run then
continues from a different, equally exact sample).
Filters and temperature are mlx-lm's (`top_p`, `min_p`, `top_k` on the log-probabilities,
then the temperature), so the distribution is the one mlx-lm's `make_sampler` samples
from.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from specstream_mlx.settings import check_settings


def _uniform(key: mx.array) -> mx.array:
    return mx.random.uniform(key=key)


# One uniform per row, each from its own key (seed, position).
_uniforms = mx.vmap(_uniform)


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

    def uniforms(self, positions: mx.array) -> mx.array:
        """U[0, 1) per position (rows,), the same for equal positions."""
        keys = mx.stack([mx.full(positions.shape, self.seed, dtype=mx.uint32),
                         positions.astype(mx.uint32)], axis=-1)
        return _uniforms(keys)

    def __call__(self, logprobs: mx.array, positions: mx.array) -> mx.array:
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        probs = mx.softmax(logprobs * (1.0 / self.temp), axis=-1, precise=True)
        cdf = mx.cumsum(probs, axis=-1)
        u = self.uniforms(positions) * cdf[:, -1]
        # The first token whose cumulative probability exceeds u; filtered tokens add
        # nothing to the sum, so they are never the first.
        token = mx.sum(cdf <= u[:, None], axis=-1)
        return mx.minimum(token, logprobs.shape[-1] - 1).astype(mx.int32)
