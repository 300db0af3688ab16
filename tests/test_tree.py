"""DraftTree: building from stream candidates under a budget, flattening, accept walk."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from specstream_mlx.decoding.tree import DraftTree


def random_candidates(seed: int, gamma: int = 3, k: int = 3):
    """(gamma, k) distinct-per-row tokens and sorted log-probabilities, no ties."""
    rng = np.random.default_rng(seed)
    cands = np.stack([rng.permutation(50)[:k] for _ in range(gamma)])
    logprobs = -np.sort(rng.exponential(size=(gamma, k)), axis=1)
    return cands, logprobs


def node_scores(tree: DraftTree, cands, logprobs) -> list[float]:
    """Summed log-probability of every draft node (1..n), read back from its token/depth."""
    scores = [0.0]
    for tok, par in zip(tree.tokens, tree.parents, strict=True):
        depth = tree.depths[par] + 1
        rank = list(cands[depth - 1]).index(tok)
        scores.append(scores[par] + float(logprobs[depth - 1, rank]))
    return scores[1:]


def test_docstring_example():
    """The worked example of tree.py's docstring, exactly."""
    a, b, c, d = 11, 12, 13, 14
    tree = DraftTree.from_candidates(
        np.array([[a, b], [c, d]]), np.array([[-0.1, -2.0], [-0.2, -3.0]]), 3
    )
    assert tree.tokens == [a, c, b]
    assert tree.parents == [0, 1, 0]
    assert tree.depths.tolist() == [0, 1, 2, 1]
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(tree.mask, expected)
    assert len(tree) == 4


@pytest.mark.parametrize("seed", range(4))
def test_budget_and_structure(seed):
    """For every budget: size min(budget, full tree), parents first, closed under parents,
    mask = ancestors and self, and the kept nodes are the best-scoring ones."""
    gamma, k = 3, 3
    cands, logprobs = random_candidates(seed, gamma, k)
    all_scores = sorted(
        (
            sum(logprobs[d, r] for d, r in enumerate(ranks))
            for depth in range(1, gamma + 1)
            for ranks in itertools.product(range(k), repeat=depth)
        ),
        reverse=True,
    )
    full = sum(k**g for g in range(1, gamma + 1))
    for budget in range(full + 3):
        tree = DraftTree.from_candidates(cands, logprobs, budget)
        n = min(budget, full)
        assert len(tree.tokens) == n and len(tree) == n + 1
        for i, par in enumerate(tree.parents, start=1):
            assert 0 <= par < i  # parents-first, so closed under parents
            assert tree.depths[i] == tree.depths[par] + 1
            ancestors = {i}
            while par:
                ancestors.add(par)
                par = tree.parents[par - 1]
            ancestors.add(0)
            assert set(np.flatnonzero(tree.mask[i])) == ancestors
        # no two children of one node carry the same token
        for parent in set(tree.parents):
            kids = [t for t, p in zip(tree.tokens, tree.parents, strict=True) if p == parent]
            assert len(kids) == len(set(kids))
        np.testing.assert_allclose(
            sorted(node_scores(tree, cands, logprobs), reverse=True), all_scores[:n]
        )


@pytest.mark.parametrize("min_prob", [0.0, 0.05, 0.2, 0.5, 0.99])
def test_min_prob_keeps_the_best_nodes_above_the_floor(min_prob):
    """A floor on the path probability keeps exactly the budget's best nodes that reach it
    (still closed under parents: a child is never likelier than its parent)."""
    cands, logprobs = random_candidates(3, 3, 3)
    full = DraftTree.from_candidates(cands, logprobs, 8)
    tree = DraftTree.from_candidates(cands, logprobs, 8, min_prob)
    scores = node_scores(full, cands, logprobs)
    keep = [s for s in scores if min_prob == 0 or s >= np.log(min_prob)]
    assert tree.tokens == full.tokens[: len(keep)]
    assert tree.parents == full.parents[: len(keep)]
    if min_prob == 0.99:
        assert tree.tokens == []


def test_budget_zero_is_empty():
    """Budget 0 keeps only the root: one row, no draft tokens."""
    cands, logprobs = random_candidates(0)
    tree = DraftTree.from_candidates(cands, logprobs, 0)
    assert len(tree) == 1 and tree.tokens == [] and tree.parents == []
    assert tree.depths.tolist() == [0] and tree.mask.tolist() == [[True]]
    assert len(DraftTree()) == 1


def test_single_stream_top1_is_a_chain():
    """gamma candidates with k=1 give a chain of the top tokens."""
    cands = np.array([[5], [6], [7]])
    tree = DraftTree.from_candidates(cands, np.full((3, 1), -0.5), 10)
    assert tree.tokens == [5, 6, 7] and tree.parents == [0, 1, 2]
    assert tree.depths.tolist() == [0, 1, 2, 3]


def branching_tree() -> DraftTree:
    """root -> 1:a(1) -> 2:c(3); root -> 3:b(2) -> 4:c(3) -> 5:d(4); 3:b -> 6:e(5)."""
    return DraftTree(tokens=[1, 3, 2, 3, 4, 5], parents=[0, 1, 0, 3, 4, 3])


@pytest.mark.parametrize(
    "targets, path, bonus",
    [
        # targets[i] is the main stream's choice after node i
        ([9, 0, 0, 0, 0, 0, 0], [0], 9),  # nothing matches: only the correction
        ([1, 8, 0, 0, 0, 0, 0], [0, 1], 8),  # first child, then a miss
        ([1, 3, 7, 0, 0, 0, 0], [0, 1, 2], 7),  # first branch to its leaf, bonus after leaf
        ([2, 0, 0, 3, 4, 6, 0], [0, 3, 4, 5], 6),  # second sibling, non-contiguous path
        ([2, 0, 0, 5, 0, 0, 1], [0, 3, 6], 1),  # last node
    ],
)
def test_accept_walks_matching_path(targets, path, bonus):
    """accept follows the child equal to each target and returns the token after the path."""
    assert branching_tree().accept(targets) == (path, bonus)


def test_accept_on_empty_tree():
    """With no draft the accepted path is the root and the bonus is the root's target."""
    assert DraftTree().accept([42]) == ([0], 42)


def test_invalid_trees_raise():
    """Duplicate sibling tokens and parents after their child are rejected."""
    with pytest.raises(ValueError, match="duplicate"):
        DraftTree(tokens=[1, 1], parents=[0, 0])
    with pytest.raises(ValueError, match="duplicate"):
        DraftTree(tokens=[1, 2, 3, 3], parents=[0, 0, 2, 2])
    with pytest.raises(ValueError):
        DraftTree(tokens=[1, 2], parents=[2, 0])
    with pytest.raises(ValueError):
        DraftTree(tokens=[1], parents=[1])
    # the same token under different parents is fine
    assert len(DraftTree(tokens=[1, 2, 3, 3], parents=[0, 0, 1, 2])) == 5
