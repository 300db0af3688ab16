"""Context drafts: the n-gram index, merging a chain into a tree, and lossless decoding."""

from __future__ import annotations

import random

import pytest
from conftest import tiny_model

from specstream_mlx.decoding.lookup import NgramIndex
from specstream_mlx.decoding.step import generate_step
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.models.config import StreamArgs


def brute_force(tokens: list[int], depth: int, min_n: int, max_n: int) -> list[int]:
    """Longest suffix n-gram's most recent earlier occurrence, by scanning; an n-token
    match drafts at most 2**n tokens."""
    for n in range(min(max_n, len(tokens)), min_n - 1, -1):
        suffix = tokens[-n:]
        for end in range(len(tokens) - 2, n - 2, -1):
            if tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + min(depth, 2**n)]
    return []


def test_docstring_example():
    a, b, c, d = 1, 2, 3, 4
    assert NgramIndex(1, 3).match([a, b, c, d, a, b], 3)[0] == [c, d, a]


def test_short_matches_draft_short_chains():
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    index = NgramIndex(1, 4)
    assert index.match(history + [1], 16)[0] == [2, 3]  # 1-gram: 2 tokens
    assert index.match(history + [1, 2], 16)[0] == [3, 4, 5, 6]  # 2-gram: 4
    longest = history + [1, 2, 3, 4]
    assert index.match(longest, 16)[0] == longest[4:20]  # 4-gram: 16
    assert index.match(history + [1, 2, 3, 4], 5)[0] == [5, 6, 7, 8, 9]  # depth caps


def test_longest_match_wins_and_most_recent_occurrence():
    index = NgramIndex(1, 3)
    # "9" alone last occurred before 5; "8 9" occurred before 7.
    assert index.match([8, 9, 7, 1, 9, 5, 2, 8, 9], 2)[0] == [7, 1]
    assert NgramIndex(1, 1).match([8, 9, 7, 1, 9, 5, 2, 8, 9], 2)[0] == [5, 2]
    assert NgramIndex(2, 3).match([1, 2, 3, 4], 3)[0] == []  # nothing repeats


@pytest.mark.parametrize("seed", range(5))
def test_incremental_index_equals_a_scan(seed):
    rng = random.Random(seed)
    history: list[int] = []
    index = NgramIndex(2, 4)
    for _ in range(120):
        history += [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
        assert index.match(history, 5)[0] == brute_force(history, 5, 2, 4)


def test_a_different_history_starts_over():
    index = NgramIndex(1, 2)
    assert index.match([1, 2, 3, 1], 2)[0] == [2, 3]
    assert index.match([7, 8, 7], 2)[0] == [8, 7]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex(0, 2)


def test_with_chain_shares_existing_nodes():
    tree = DraftTree.from_candidates(
        __import__("numpy").array([[10, 11], [20, 21]]),
        __import__("numpy").array([[-0.1, -2.0], [-0.2, -3.0]]), 3)
    assert tree.tokens == [10, 20, 11] and tree.parents == [0, 1, 0]
    merged = tree.with_chain([10, 20, 30, 40])
    assert merged.tokens == [10, 20, 11, 30, 40] and merged.parents == [0, 1, 0, 2, 4]
    branch = tree.with_chain([10, 25])
    assert branch.tokens == [10, 20, 11, 25] and branch.parents == [0, 1, 0, 1]
    same = tree.with_chain([10, 20])
    assert (same.tokens, same.parents, same.chain_nodes) == (tree.tokens, tree.parents, [1, 2])
    assert merged.chain_nodes == [1, 2, 4, 5] and branch.chain_nodes == [1, 4]
    assert DraftTree().with_chain([5, 6]).parents == [0, 1]


def test_budget_drafter_adds_the_context_chain():
    import numpy as np

    from specstream_mlx.decoding.step import StreamProposal, budget_drafter

    draft = StreamProposal(np.array([[10, 11], [20, 21]]), np.array([[-0.1, -2.0], [-0.2, -3.0]]))
    history = [5, 6, 10, 20, 30, 40, 50, 7, 5, 6]  # "5 6" occurred, followed by 10 20 30
    tree = budget_drafter(2, lookup_depth=4)(draft, history)
    assert tree.tokens == [10, 20, 30, 40] and tree.parents == [0, 1, 2, 3]
    assert budget_drafter(2)(draft, history).tokens == [10, 20]
    assert budget_drafter(0, lookup_depth=2)(draft, history).tokens == [10, 20]
    assert budget_drafter(0, lookup_depth=2)(draft, [1, 2, 3]).tokens == []


@pytest.mark.parametrize("budget, depth", [(0, 6), (3, 6), (6, 2)])
def test_context_drafts_are_lossless(arch, budget, depth):
    """Greedy output with context drafts is plain greedy output, on a prompt that repeats
    itself (so chains are proposed and mostly rejected by a random model)."""
    model = tiny_model(arch, seed=5, streams=StreamArgs(num_streams=2, msa_layers=2))
    prompt = [3, 17, 42, 8, 91, 5, 3, 17, 42, 8, 91, 5, 3, 17]
    plain = [e.token for e in generate_step(model, prompt, max_tokens=48, speculative=False)]
    events = list(generate_step(model, prompt, max_tokens=48, tree_budget=budget,
                                lookup_depth=depth))
    assert [e.token for e in events] == plain
