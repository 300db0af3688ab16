"""From the streams' candidates to the next draft tree: the drafting settings of a
generation (DraftSettings), the streams' proposal at the last accepted position
(StreamProposal), the default budget tree builder, and the controller's planned tree (stream
nodes plus a context draft)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from specstream_mlx.decoding.controller import ChainSource, Controller, Plan
from specstream_mlx.decoding.corpus import CorpusIndex
from specstream_mlx.decoding.lookup import NgramIndex
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError
from specstream_mlx.settings import check_settings


@dataclass
class StreamProposal:
    """The streams' proposal at the last accepted position.

    candidates: (gamma, k) token ids, best first; logprobs: (gamma, k).
    """

    candidates: np.ndarray
    logprobs: np.ndarray


# Builds the next tree from a draft and the tokens so far (prompt + generated).
TreeBuilder = Callable[[StreamProposal, list[int]], DraftTree]


@dataclass(frozen=True)
class DraftSettings:
    """How one generation drafts, resolved once from the caller's values and the model's
    stream config: `enabled` False is plain decoding (no streams, or speculative off)."""

    enabled: bool
    budget: int = 0  # stream nodes per tree at most
    top_k: int = 0  # candidates per stream
    lookup: int = 0  # context-draft length
    min_prob: float = 0.0  # floor on a stream node's path probability
    corpus: int = 0  # corpus-draft length (0: none, or the model has no corpus)

    @classmethod
    def resolve(cls, model, speculative: bool, tree_budget: int | None,
                draft_top_k: int | None, lookup_depth: int | None,
                min_draft_prob: float | None, corpus_depth: int | None = None,
                sampled: bool = False) -> DraftSettings:
        """corpus_depth None: the stream config's, when the model carries a corpus
        (model.corpus, set by the loader from the folder's corpus file). `sampled`: the
        generation samples, so tree_budget, draft_top_k and min_draft_prob default to
        the config's sampled_tree_budget (when set), sampled_top_k and
        sampled_min_draft_prob."""
        check_settings(tree_budget=tree_budget, draft_top_k=draft_top_k,
                       lookup_depth=lookup_depth, min_draft_prob=min_draft_prob,
                       corpus_depth=corpus_depth)
        sa = model.stream_args
        if not speculative or sa is None:
            return cls(False)
        drafts_from = len(model.streams.draft_vocab) if model.has_draft_vocab \
            else model.args.vocab_size
        top_k = draft_top_k or (min(sa.sampled_top_k, drafts_from) if sampled else sa.top_k)
        if top_k > drafts_from:
            raise InputError(f"draft_top_k ({top_k}) exceeds the {drafts_from} tokens the "
                             "streams draft from")

        def pick(value, default):
            return default if value is None else value

        corpus = pick(corpus_depth, sa.corpus_depth) if model_corpus(model) is not None else 0
        budget = sa.sampled_tree_budget if sampled and sa.sampled_tree_budget is not None \
            else sa.tree_budget
        return cls(True, pick(tree_budget, budget), top_k,
                   pick(lookup_depth, sa.lookup_depth),
                   pick(min_draft_prob,
                        sa.sampled_min_draft_prob if sampled else sa.min_draft_prob),
                   corpus)


def model_corpus(model) -> CorpusIndex | None:
    """The datastore the loader attached to `model` (None: the folder has none)."""
    return getattr(model, "corpus", None)


def pick_chain(history: list[int], index: NgramIndex | None, lookup: int,
               corpus: CorpusIndex | None, corpus_depth: int,
               better: Callable[[tuple, tuple], bool] | None = None
               ) -> tuple[list[int], ChainSource | None]:
    """The context draft or, when it is better, the corpus draft: (chain, its source;
    None without a chain). `better(corpus_option, context_option)` decides (the
    controller's expected gains); without it, the longer match wins, the context on ties
    (measured on 96 held-out answers: ahead of "corpus only where the context has no
    match" and close to drafting both chains, with fewer rows)."""
    chain, n = index.match(history, lookup) if index is not None and lookup else ([], 0)
    context = (chain, ChainSource("context", n) if chain else None)
    if corpus is None or corpus_depth <= 0:
        return context
    other, m = corpus.match(history, corpus_depth)
    if not other:
        return context
    option = (other, ChainSource("corpus", m))
    if (better(option, context) if better is not None else m > n):
        return option
    return context


def budget_drafter(budget: int, lookup_depth: int = 0, min_prob: float = 0.0,
                   corpus: CorpusIndex | None = None, corpus_depth: int = 0) -> TreeBuilder:
    """The default drafter: the `budget` most probable nodes of the candidate tree (those
    with a path probability of at least `min_prob`), plus (lookup_depth > 0) a context
    draft of up to lookup_depth tokens copied from where the current n-gram last occurred
    in the prompt or the answer (see lookup.py), or a corpus draft of up to corpus_depth
    tokens where the corpus matches a longer n-gram (pick_chain)."""
    index = NgramIndex() if lookup_depth > 0 else None

    def draft_tree(draft: StreamProposal, history: list[int]) -> DraftTree:
        tree = DraftTree.from_candidates(draft.candidates, draft.logprobs, budget, min_prob)
        chain, _ = pick_chain(history, index, lookup_depth, corpus, corpus_depth)
        return tree.with_chain(chain) if chain else tree

    return draft_tree


def planned_tree(controller: Controller, draft: StreamProposal | None, history: list[int],
                 index: NgramIndex | None, d: DraftSettings, corpus: CorpusIndex | None = None
                 ) -> tuple[DraftTree, Plan, ChainSource | None]:
    """The controller's choice among the streams' best nodes (at most d.budget, above
    d.min_prob) and the context or corpus draft (at most d.lookup or d.corpus tokens,
    whichever the controller expects more from). Returns the tree to verify, the plan
    and the chain's source."""
    full = None
    if draft is not None:
        full = DraftTree.from_candidates(draft.candidates, draft.logprobs, d.budget,
                                         d.min_prob)

    def better(a, b):
        return controller.chain_gain(a[1], len(a[0])) > controller.chain_gain(b[1], len(b[0]))

    chain, source = pick_chain(history, index, d.lookup, corpus, d.corpus, better)
    plan = controller.plan(full, len(chain), source)
    tree = full.first(plan.stream_nodes) if full is not None else DraftTree()
    return tree.with_chain(chain[: plan.chain]), plan, source
