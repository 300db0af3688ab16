"""From the streams' candidates to the next draft tree: the streams' proposal at the last
accepted position (Draft), the default budget drafter, and the controller's planned tree
(stream nodes plus a context draft)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from specstream_mlx.decoding.controller import Controller, Plan
from specstream_mlx.decoding.lookup import NgramIndex
from specstream_mlx.decoding.tree import DraftTree


@dataclass
class Draft:
    """The streams' proposal at the last accepted position.

    candidates: (gamma, k) token ids, best first; logprobs: (gamma, k).
    """

    candidates: np.ndarray
    logprobs: np.ndarray


# Builds the next tree from a draft and the tokens so far (prompt + generated).
Drafter = Callable[[Draft, list[int]], DraftTree]


def budget_drafter(budget: int, lookup_depth: int = 0, min_prob: float = 0.0) -> Drafter:
    """The default drafter: the `budget` most probable nodes of the candidate tree (those
    with a path probability of at least `min_prob`), plus (lookup_depth > 0) a context
    draft of up to lookup_depth tokens copied from where the current n-gram last occurred
    in the prompt or the answer (see lookup.py)."""
    index = NgramIndex() if lookup_depth > 0 else None

    def draft_tree(draft: Draft, history: list[int]) -> DraftTree:
        tree = DraftTree.from_candidates(draft.candidates, draft.logprobs, budget, min_prob)
        if index is not None:
            chain = index.continuation(history, lookup_depth)
            if chain:
                tree = tree.with_chain(chain)
        return tree

    return draft_tree


def planned_tree(controller: Controller, draft: Draft | None, history: list[int],
                 index: NgramIndex | None, limits: tuple[int, int, float]
                 ) -> tuple[DraftTree, Plan, int]:
    """The controller's choice among the streams' best nodes and the context draft.

    limits: (tree budget, lookup depth, min_draft_prob). Returns the tree to verify, the
    plan and the length of the context draft's n-gram match."""
    budget, lookup, min_prob = limits
    full = None
    if draft is not None:
        full = DraftTree.from_candidates(draft.candidates, draft.logprobs, budget, min_prob)
    chain, match = index.match(history, lookup) if index is not None else ([], 0)
    plan = controller.plan(full, len(chain), match)
    tree = full.first(plan.stream_nodes) if full is not None else DraftTree()
    return tree.with_chain(chain[: plan.chain]), plan, match
