"""From the streams' candidates to the next draft tree: the drafting settings of a
generation (Drafting), the streams' proposal at the last accepted position (Draft), the
default budget drafter, and the controller's planned tree (stream nodes plus a context
draft)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from specstream_mlx.decoding.controller import Controller, Plan
from specstream_mlx.decoding.lookup import NgramIndex
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError
from specstream_mlx.settings import check_settings


@dataclass
class Draft:
    """The streams' proposal at the last accepted position.

    candidates: (gamma, k) token ids, best first; logprobs: (gamma, k).
    """

    candidates: np.ndarray
    logprobs: np.ndarray


# Builds the next tree from a draft and the tokens so far (prompt + generated).
Drafter = Callable[[Draft, list[int]], DraftTree]


@dataclass(frozen=True)
class Drafting:
    """How one generation drafts, resolved once from the caller's values and the model's
    stream config: `enabled` False is plain decoding (no streams, or speculative off)."""

    enabled: bool
    budget: int = 0  # stream nodes per tree at most
    top_k: int = 0  # candidates per stream
    lookup: int = 0  # context-draft length
    min_prob: float = 0.0  # floor on a stream node's path probability

    @classmethod
    def resolve(cls, model, speculative: bool, tree_budget: int | None,
                draft_top_k: int | None, lookup_depth: int | None,
                min_draft_prob: float | None) -> Drafting:
        check_settings(tree_budget=tree_budget, draft_top_k=draft_top_k,
                       lookup_depth=lookup_depth, min_draft_prob=min_draft_prob)
        sa = model.stream_args
        if not speculative or sa is None:
            return cls(False)
        top_k = draft_top_k or sa.top_k
        drafts_from = len(model.streams.draft_vocab) if model.has_draft_vocab \
            else model.args.vocab_size
        if top_k > drafts_from:
            raise InputError(f"draft_top_k ({top_k}) exceeds the {drafts_from} tokens the "
                             "streams draft from")

        def pick(value, default):
            return default if value is None else value

        return cls(True, pick(tree_budget, sa.tree_budget), top_k,
                   pick(lookup_depth, sa.lookup_depth), pick(min_draft_prob, sa.min_draft_prob))


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
                 index: NgramIndex | None, d: Drafting) -> tuple[DraftTree, Plan, int]:
    """The controller's choice among the streams' best nodes (at most d.budget, above
    d.min_prob) and the context draft (at most d.lookup tokens). Returns the tree to
    verify, the plan and the length of the context draft's n-gram match."""
    full = None
    if draft is not None:
        full = DraftTree.from_candidates(draft.candidates, draft.logprobs, d.budget,
                                         d.min_prob)
    chain, match = index.match(history, d.lookup) if index is not None else ([], 0)
    plan = controller.plan(full, len(chain), match)
    tree = full.first(plan.stream_nodes) if full is not None else DraftTree()
    return tree.with_chain(chain[: plan.chain]), plan, match
