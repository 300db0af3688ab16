"""Draft trees: built from the streams' top-k under a node budget, flattened into the
token, position and mask arrays of one pass, and walked to accept a path.

All streams predict from one position, so stream j's top-k are the candidates at depth
j whatever the parent: a node is a tuple of ranks (r1, .., rd) and its token is
candidates[d-1][rd]. The budget keeps the tuples with the highest summed log-probability;
log-probabilities are <= 0, so the kept set is closed under parents.

Worked example: candidates [[a, b], [c, d]] with log-probs [[-0.1, -2], [-0.2, -3]] and
budget 3 keep (0,) = a, (0, 0) = a c, (1,) = b. Flattened with the root r first:

    node    token  parent  depth   mask (ancestors and self)
    0       r      -1      0       1 0 0 0
    1       a      0       1       1 1 0 0
    2       c      1       2       1 1 1 0
    3       b      0       1       1 0 0 1
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np


@dataclass
class DraftTree:
    """A flattened draft tree; node 0 is the root (the committed, not yet fed token).

    tokens:   (n,) draft tokens of nodes 1..n (the root's token is supplied per pass).
    parents:  (n,) parent node index of nodes 1..n (0 is the root).
    logprobs: (s,) path log-probabilities of the stream nodes 1..s (s <= n), best first.
    chain_nodes: node indices of the context draft's path, after `with_chain`.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    chain_nodes: list[int] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.tokens) + 1
        self.depths = np.zeros(n, dtype=np.int32)
        self.mask = np.eye(n, dtype=bool)
        self.children: list[dict[int, int]] = [{} for _ in range(n)]
        for i, (tok, par) in enumerate(zip(self.tokens, self.parents, strict=True), start=1):
            if not 0 <= par < i:
                raise ValueError(f"node {i}: parent {par} must come before it")
            if tok in self.children[par]:
                raise ValueError(f"node {i}: duplicate token {tok} under node {par}")
            self.children[par][tok] = i
            self.depths[i] = self.depths[par] + 1
            self.mask[i] = self.mask[par]
            self.mask[i, i] = True

    def __len__(self) -> int:
        """Rows of the pass: root plus draft nodes."""
        return len(self.tokens) + 1

    @classmethod
    def from_candidates(
        cls, candidates: np.ndarray, logprobs: np.ndarray, budget: int,
        min_prob: float = 0.0,
    ) -> DraftTree:
        """Best `budget` nodes from per-stream candidates, leaving out nodes whose path
        probability (the product along it) is below `min_prob`: confident streams get
        the whole budget, unsure ones a smaller tree (or none).

        candidates: (gamma, k) token ids, each row sorted by decreasing probability.
        logprobs:   (gamma, k) their log-probabilities.
        """
        floor = np.log(min_prob) if min_prob > 0 else -np.inf
        gamma, k = candidates.shape
        tokens, parents, scores = [], [], []
        # Heap of (-score, depth, order, ranks, parent index); depth breaks ties toward
        # shallow nodes so a parent always pops before its children.
        heap = [(-float(logprobs[0, r]), 1, r, (r,), 0) for r in range(k)]
        heapq.heapify(heap)
        order = k
        while heap and len(tokens) < budget and -heap[0][0] >= floor:
            neg, depth, _, ranks, parent = heapq.heappop(heap)
            tokens.append(int(candidates[depth - 1, ranks[-1]]))
            parents.append(parent)
            scores.append(-neg)
            node = len(tokens)
            if depth < gamma:
                for r in range(k):
                    score = neg - float(logprobs[depth, r])
                    heapq.heappush(heap, (score, depth + 1, order, ranks + (r,), node))
                    order += 1
        return cls(tokens, parents, scores)

    def first(self, k: int) -> DraftTree:
        """The first k nodes (best first for a tree from the streams: a parent-closed set)."""
        return DraftTree(self.tokens[:k], self.parents[:k], self.logprobs[:k])

    def with_chain(self, chain: list[int]) -> DraftTree:
        """This tree plus the path `chain` below the root, sharing the nodes it already
        has (a context draft merged into the streams' tree)."""
        tokens, parents = list(self.tokens), list(self.parents)
        node, path = 0, []
        for tok in chain:
            child = self.children[node].get(tok) if node < len(self) else None
            if child is None:
                tokens.append(tok)
                parents.append(node)
                child = len(tokens)
            node = child
            path.append(node)
        return DraftTree(tokens, parents, self.logprobs, path)

    def truncate(self, max_depth: int) -> DraftTree:
        """The nodes at depth <= max_depth (parents come first, so the result is a tree)."""
        if not self.tokens or self.depths.max() <= max_depth:
            return self
        keep = [i for i in range(1, len(self)) if self.depths[i] <= max_depth]
        index = {old: new for new, old in enumerate(keep, start=1)} | {0: 0}
        return DraftTree([self.tokens[i - 1] for i in keep],
                         [index[self.parents[i - 1]] for i in keep],
                         [self.logprobs[i - 1] for i in keep if i <= len(self.logprobs)],
                         [index[i] for i in self.chain_nodes if i in index])

    def accept(self, targets: list[int]) -> tuple[list[int], int]:
        """Walk from the root following children whose token equals the target.

        targets: (n+1,) the main stream's choice after each node (argmax or a sample).
        Returns the accepted path (node indices, starting with 0) and the token that
        follows its last node (the correction, or bonus, token).
        """
        path = [0]
        while (child := self.children[path[-1]].get(targets[path[-1]])) is not None:
            path.append(child)
        return path, targets[path[-1]]
