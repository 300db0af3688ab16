"""Per-step choice of the draft: how many stream nodes, how long a context chain, whether
to compute the streams' next draft at all (a plain step computes nothing extra).

Speculation pays when (expected tokens of a pass) / (cost of the pass) beats one token
per plain pass. Both sides are measured, not assumed:

* costs: the wall time of every step, kept per model in this process (costs.PassCosts:
  running averages by rows and drafting, other sizes along the machine's pass-cost
  curve); a model's first two steps are a plain one and a one-row drafting one, which
  measure the reference costs while emitting tokens, and chains may be cut to fill a
  pass up to a size the curve measured;
* acceptance: a stream node of path probability p is accepted with probability
  min(1, r_d * p), r_d a running calibration per depth d; a chain drawn from an n-token
  match (a ChainSource) has its first token accepted with probability f_n and each next
  one, given the previous, with probability c (running averages). All of them start from
  the model's drafting priors (priors.py: written next to the streams by `specstream
  tune`, greedy and sampled apart; neutral for a model without them).

When no drafting option beats a plain step, the controller stops computing stream rows
(the draft's extra cost) and re-probes after 8, 16, 32 .. 128 plain steps, so a prompt
that turns predictable gets speculation back. Greedy output never depends on its
choices: every tree verifies to the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from specstream_mlx.decoding.costs import PassCosts
from specstream_mlx.decoding.priors import CONTEXT_MATCHES, CORPUS_MATCHES, NEUTRAL, Priors
from specstream_mlx.decoding.tree import DraftTree

CHAIN_LENGTHS = (1, 2, 4, 8, 16, 32)
# A chain prior is worth this many drafts (first token) and follow-ups (next tokens):
# enough to steer the first few choices, few enough that a model's own rates take over.
FIRST_WEIGHT = 4.0
NEXT_WEIGHT = 8.0


@dataclass(frozen=True)
class ChainSource:
    """Where a chain draft comes from: a "context" draft (lookup.py) or a "corpus" draft
    (corpus.py), copied after a match of the last `n` tokens."""

    kind: str
    n: int

    def bucket(self) -> tuple[str, int]:
        """The statistics this chain's acceptance is kept under (nearest match length)."""
        lengths = CONTEXT_MATCHES if self.kind == "context" else CORPUS_MATCHES
        return self.kind, min(max(self.n, lengths[0]), lengths[-1])


@dataclass
class Plan:
    """One step's draft: the first `stream_nodes` nodes of the streams' tree, the first
    `chain` tokens of the context draft, and whether the pass drafts the next step."""

    stream_nodes: int
    chain: int
    draft: bool


@dataclass
class Controller:
    """Chooses each step's Plan and learns from its outcome (see the module docstring).

    costs: the model's PassCosts; gamma: the streams' depth; priors: the model's starting
    beliefs for this generation's mode (priors.py; greedy and sampled differ).
    """

    costs: PassCosts
    gamma: int
    priors: Priors = NEUTRAL
    # Running statistics forget 3% a step: about the last 30 steps count.
    decay: float = 0.97
    # Calibration of stream path probabilities per depth: accepted / predicted sums.
    accepted: np.ndarray = field(default=None)
    predicted: np.ndarray = field(default=None)
    # Chain statistics as [accepted, tried] running sums: first tokens by
    # ChainSource.bucket(), next tokens by kind.
    first: dict = field(default=None)
    follow: dict = field(default=None)
    off_steps: int = 0
    probe_after: int = 8

    def __post_init__(self):
        if self.accepted is None:
            ratios, weight = self.priors.stream_calibration, self.priors.stream_weight
            # Index d is depth d (0 unused); depths past the table take its last ratio.
            ratio = np.array([ratios[min(max(d - 1, 0), len(ratios) - 1)]
                              for d in range(self.gamma + 1)])
            self.accepted = ratio * weight
            self.predicted = np.full(self.gamma + 1, weight)
        if self.first is None:
            self.first = {(kind, n): [self.priors.first(kind, n) * FIRST_WEIGHT, FIRST_WEIGHT]
                          for kind, lengths in (("context", CONTEXT_MATCHES),
                                                ("corpus", CORPUS_MATCHES)) for n in lengths}
        if self.follow is None:
            self.follow = {kind: [self.priors.follow(kind) * NEXT_WEIGHT, NEXT_WEIGHT]
                           for kind in ("context", "corpus")}

    # --- choice ------------------------------------------------------------------------

    def node_gains(self, tree: DraftTree | None) -> list[float]:
        """Expected acceptance of each stream node, best first (parents before children)."""
        if tree is None or not tree.logprobs:
            return []
        ratio = self.accepted / self.predicted
        return [min(1.0, ratio[tree.depths[i + 1]] * math.exp(lp))
                for i, lp in enumerate(tree.logprobs)]

    def chain_gain(self, source: ChainSource | None, m: int) -> float:
        """Expected accepted tokens of the first m tokens of a chain from `source`."""
        if source is None or m == 0:
            return 0.0
        key = source.bucket()
        a, n = self.first[key]
        c = self.follow[key[0]][0] / self.follow[key[0]][1]
        f = a / n
        return f * (1 - c**m) / (1 - c) if c < 1 else f * m

    def plan(self, tree: DraftTree | None, chain_len: int, source: ChainSource | None
             ) -> Plan:
        """The best Plan for a stream tree (its nodes best first, with logprobs) and a
        chain of `chain_len` tokens from `source`."""
        if (1, False) not in self.costs.table:  # measure the reference steps first
            return Plan(0, 0, False)
        if (1, True) not in self.costs.table:
            return Plan(0, 0, True)
        gains = np.cumsum([0.0] + self.node_gains(tree))
        lengths = [0] + [m for m in CHAIN_LENGTHS if m < chain_len] + (
            [chain_len] if chain_len else [])
        # Chains that fill a pass up to a size the curve measured (past some sizes a row
        # costs a jump: 16 rows 93 ms, 17 rows 126 here).
        sizes = [r for r, _ in self.costs.curve] if chain_len else []
        best, best_plan = -1.0, Plan(0, 0, False)
        for draft in (False, True):
            for k in range(len(gains)):
                fill = {r - 1 - k for r in sizes if 0 < r - 1 - k < chain_len}
                for m in lengths + sorted(fill.difference(lengths)):
                    rate = ((1 + gains[k] + self.chain_gain(source, m))
                            / self.costs.estimate(1 + k + m, draft))
                    if rate > best:
                        best, best_plan = rate, Plan(k, m, draft)
        if best_plan.draft:
            self.off_steps, self.probe_after = 0, 8
            return best_plan
        # Drafting lost this step. Keep it when the streams still pay for themselves at
        # the draft just seen (their next draft is likely as good): with at least one of
        # its nodes, since a draft verified by none gains nothing. Else probe now and then.
        with_draft = max(((1 + gains[k]) / self.costs.estimate(1 + k, True)
                          for k in range(1, len(gains))), default=0.0)
        plain = 1 / self.costs.estimate(1, False)
        if with_draft > plain:
            # The probe count runs on (restarting it here drafted more but replayed
            # slower: experiments/controller_ab.py, held12 greedy 1.430x -> 1.425x).
            return Plan(best_plan.stream_nodes, best_plan.chain, True)
        self.off_steps += 1
        if self.off_steps >= self.probe_after:
            self.off_steps, self.probe_after = 0, min(128, self.probe_after * 2)
            return Plan(best_plan.stream_nodes, best_plan.chain, True)
        return best_plan

    # --- learning ----------------------------------------------------------------------

    def observe(self, tree: DraftTree, plan: Plan, source: ChainSource | None,
                path: list[int], seconds: float | None) -> None:
        """Learn from a verified step: `tree` as fed (stream nodes first, then the chain's
        own nodes), `path` the accepted node indices (0 first), the step's wall time."""
        if seconds is not None:
            self.costs.observe(len(tree), plan.draft, seconds)
        k = len(tree.logprobs)
        if k:
            self.accepted *= self.decay
            self.predicted *= self.decay
            for i in range(k):
                self.predicted[tree.depths[i + 1]] += math.exp(tree.logprobs[i])
            for node in path[1:]:
                if node <= k:
                    self.accepted[tree.depths[node]] += 1
        if plan.chain and source is not None:
            chain_nodes = tree.chain_nodes
            run = 0
            for node in chain_nodes:
                if node in path:
                    run += 1
                else:
                    break
            key = source.bucket()
            stats, follow = self.first[key], self.follow[key[0]]
            stats[0] = stats[0] * self.decay + (run > 0)
            stats[1] = stats[1] * self.decay + 1
            if run:
                tried = min(len(chain_nodes) - 1, run)
                follow[0] = follow[0] * self.decay + (run - 1)
                follow[1] = follow[1] * self.decay + tried
