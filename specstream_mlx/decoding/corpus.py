"""Corpus drafts: continuations retrieved from a datastore of the model's own answers.

A model answers in habits (openings, phrasings, code idioms) that recur across prompts,
so its greedy answers to other prompts are a draft source for this one, like context
drafts (lookup.py) but over a shipped token list instead of the current prompt. The
n tokens before the root are looked up among the datastore's n-grams; the tokens that
followed them are voted on, position by position, and a drafted token needs at least
`min_count` occurrences and `min_share` of the votes still agreeing. Verification keeps
the output exact whatever the datastore holds.

Worked example (min_n 2, min_count 2, min_share 0.5): datastore  [a b c d] [x b c d]
[a b c e], history ... a b c. The 3-gram "a b c" occurs twice, followed by d once and e
once: no token has 2 votes, so the 2-gram "b c" is tried: d, d, e -> d (2 of 3 votes);
then, among the occurrences that continued with d, the next token (a separator, twice)
ends the draft: [d].
"""

from __future__ import annotations

import numpy as np

from specstream_mlx.checkpoint import CORPUS_SEPARATOR as SEPARATOR  # never drafted or matched

# Polynomial hash of an n-gram, wrapping at 2**64 (collisions: ~n_grams**2 / 2**64).
_MULT = np.uint64(0x9E3779B97F4A7C15)
_MASK = (1 << 64) - 1


class CorpusIndex:
    """Sorted n-gram hashes (min_n <= n <= max_n) of a token list with their end positions.

    tokens: (N,) ints, documents separated by SEPARATOR.
    """

    def __init__(self, tokens: np.ndarray, min_n: int = 2, max_n: int = 6,
                 min_count: int = 2, min_share: float = 0.5, max_votes: int = 256):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.min_n, self.max_n = min_n, max_n
        self.min_count, self.min_share, self.max_votes = min_count, min_share, max_votes
        t = self.tokens
        code = (t + 2).astype(np.uint64)  # separator -> 1, token v -> v + 2
        valid = t != SEPARATOR
        h = np.zeros(len(t), dtype=np.uint64)
        ok = np.ones(len(t), dtype=bool)
        self.hashes: dict[int, np.ndarray] = {}
        self.ends: dict[int, np.ndarray] = {}
        with np.errstate(over="ignore"):
            for n in range(1, max_n + 1):
                # h_n(i) = h_{n-1}(i-1) * MULT + code(i): the n-gram ending at i
                prev_h = np.concatenate([np.zeros(1, np.uint64), h[:-1]])
                prev_ok = np.concatenate([[n == 1], ok[:-1]])
                h = prev_h * _MULT + code if n > 1 else code.copy()
                ok = valid & prev_ok if n > 1 else valid.copy()
                if n >= min_n:
                    # an n-gram is useful only when a token follows it
                    use = ok & np.concatenate([valid[1:], [False]])
                    ends = np.flatnonzero(use)
                    order = np.argsort(h[ends], kind="stable")
                    self.hashes[n], self.ends[n] = h[ends][order], ends[order].astype(np.int32)

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def _hash(gram: list[int]) -> int:
        h = 0
        for tok in gram:
            h = (h * int(_MULT) + tok + 2) & _MASK
        return h

    def match(self, history: list[int], depth: int) -> tuple[list[int], int]:
        """Up to `depth` tokens voted from the continuations of the longest suffix of
        `history` (n >= min_n) whose first token wins its vote, and that n (0: none)."""
        if depth <= 0:
            return [], 0
        for n in range(min(self.max_n, len(history)), self.min_n - 1, -1):
            key = np.uint64(self._hash(history[-n:]))
            lo = int(np.searchsorted(self.hashes[n], key, side="left"))
            hi = int(np.searchsorted(self.hashes[n], key, side="right"))
            if hi - lo < self.min_count:
                continue
            chain = self._vote(self.ends[n][lo : min(hi, lo + self.max_votes)], depth)
            if chain:
                return chain, n
        return [], 0

    def _vote(self, ends: np.ndarray, depth: int) -> list[int]:
        chain: list[int] = []
        t = self.tokens
        while len(chain) < depth and len(ends) >= self.min_count:
            nxt = t[np.minimum(ends + 1, len(t) - 1)]
            nxt = np.where(ends + 1 < len(t), nxt, SEPARATOR)
            values, counts = np.unique(nxt, return_counts=True)
            best = int(np.argmax(counts))
            tok, count = int(values[best]), int(counts[best])
            if tok == SEPARATOR or count < self.min_count or count < self.min_share * len(ends):
                break
            chain.append(tok)
            ends = ends[nxt == tok] + 1
        return chain
