"""Per-step choice of the draft: how many stream nodes, how long a context chain, whether
to compute the streams' next draft at all (a plain step computes nothing extra).

Speculation pays when (expected tokens of a pass) / (cost of the pass) beats one token
per plain pass. Both sides are measured, not assumed:

* costs: the wall time of every step (host work included) by rows of the pass and by
  whether it drafted, kept as running averages per model in this process (`PassCosts`);
  a model's first two steps are a plain one and a one-row drafting one, which measure
  the reference costs while emitting tokens; other sizes are estimated until tried,
  along the pass-cost curve measured once per machine when the loader gave one
  (pass_curve.py), and chains may be cut to fill a pass up to a size the curve measured;
* acceptance: a stream node of path probability p is accepted with probability
  min(1, r_d * p), r_d a running calibration per depth d (starting at 1, or at the
  lower SAMPLED_START ratios when sampling); a context chain drawn from an
  n-token match has its first token accepted with probability f_n and each next one,
  given the previous, with probability c (running averages, seeded with the rates
  measured on validation answers, see lookup.py); a corpus chain (corpus.py) the same,
  with its own rates by match length, seeded from held-out answers. A sampled generation
  seeds both with the lower rates measured when sampling (SAMPLED_CHAIN_FIRST, ...).

When no drafting option beats a plain step, the controller stops computing stream rows
(the draft's extra cost) and re-probes after 8, 16, 32 .. 128 plain steps, so a prompt
that turns predictable gets speculation back. Greedy output never depends on its
choices: every tree verifies to the same tokens.
"""

from __future__ import annotations

import bisect
import math
import weakref
from dataclasses import dataclass, field

import numpy as np

from specstream_mlx.decoding.tree import DraftTree

# Context drafts, measured on 48 validation answers (lookup.py): first-token acceptance by
# match length, and the acceptance of each next token given the previous one.
CHAIN_FIRST = {1: 0.21, 2: 0.5, 3: 0.6, 4: 0.9}
CHAIN_NEXT = 0.8
# Corpus drafts, the same two rates by match length, measured on 96 held-out greedy
# answers against a 1000-answer datastore (the shipped corpus' first part); only priors:
# running statistics replace them within a few drafts.
CORPUS_FIRST = {2: 0.42, 3: 0.53, 4: 0.61, 5: 0.65, 6: 0.77}
CORPUS_NEXT = 0.73
# The same rates when sampling at temperature 0.7 (exact acceptance: a chain token is taken
# with the target's probability of it), measured with every chain drafted in full on 30
# held-out prompts of six sources, none in the bench's: lower than greedy's, most for long
# matches (context 4+: 0.68 against 0.86 greedy on comparable prompts). Corpus 4-6 pooled.
SAMPLED_CHAIN_FIRST = {1: 0.18, 2: 0.41, 3: 0.56, 4: 0.68}
SAMPLED_CHAIN_NEXT = 0.69
SAMPLED_CORPUS_FIRST = {2: 0.35, 3: 0.35, 4: 0.58, 5: 0.58, 6: 0.58}
SAMPLED_CORPUS_NEXT = 0.54
CHAIN_LENGTHS = (1, 2, 4, 8, 16, 32)
# When sampling, a stream node is taken less often than its path probability says, the
# more so the deeper it is (the streams' probabilities at depth 2 and 3 are marginals
# over tokens the draft fixes): replayed at 0.7 on 48 held-out prompts, whole trees of
# 16 coupled nodes (step.stream_candidates; `specstream tune --temp 0.7 --budgets 16`
# prints it as its calibration line), accepted / predicted per depth was
# 0.78 / 0.44 / 0.27 on code and 0.70 / 0.39 / 0.25 on chat with the shipped streams
# (run 14's, README; the streams before them: 0.71 / 0.37 / 0.21 and 0.57 / 0.28 / 0.15).
# So a sampled generation starts its calibration at these ratios (both tasks, weighted
# by predicted nodes) for depths 1, 2, 3+ (worth this many predicted nodes a depth)
# instead of 1:1; accepted nodes move them within a few steps.
SAMPLED_START = ((0.75, 0.43, 0.26), 2.0)


@dataclass
class Plan:
    """One step's draft: the first `stream_nodes` nodes of the streams' tree, the first
    `chain` tokens of the context draft, and whether the pass drafts the next step."""

    stream_nodes: int
    chain: int
    draft: bool


class PassCosts:
    """Seconds of a decode step by (rows, drafts), as running averages of measured steps.

    Rows never measured are estimated from the nearest measured size scaled along the
    machine's pass-cost curve (pass_curve.py) when there is one, else from the nearest
    measured sizes and a per-row slope; a drafting pass adds the measured extra cost of
    drafting. A guess is replaced by a measurement as soon as the controller tries it.
    """

    def __init__(self, alpha: float = 0.2, curve: dict[int, float] | None = None):
        self.alpha = alpha
        self.table: dict[tuple[int, bool], float] = {}
        self.curve: list[tuple[int, float]] = []
        self.set_curve(curve or {})
        # (measured one-pass sizes, drafting's extra cost), derived from `table`; a plan
        # asks for a few hundred estimates, so they are derived once per measurement.
        self._fit: tuple[list[tuple[int, float]], float] | None = None

    def set_curve(self, curve: dict[int, float]) -> None:
        """Seconds of a plain pass by rows measured once on this machine (any scale: only
        ratios between sizes are used)."""
        self.curve = sorted((int(r), float(t)) for r, t in curve.items() if t > 0)
        # A plan asks for ~300 estimates: the curve is tabulated once.
        self._curve_at = [on_curve(self.curve, r) for r in range(65)] if self.curve else []

    def along_curve(self, rows: int) -> float:
        """The machine's curve at `rows` (set_curve; 0.0 without one)."""
        if not self.curve:
            return 0.0
        return self._curve_at[rows] if rows < len(self._curve_at) else on_curve(self.curve,
                                                                                 rows)

    def observe(self, rows: int, draft: bool, seconds: float) -> None:
        key = (rows, draft)
        old = self.table.get(key)
        self.table[key] = seconds if old is None else old + self.alpha * (seconds - old)
        self._fit = None

    def fitted(self) -> tuple[list[tuple[int, float]], float]:
        if self._fit is None:
            known = sorted((r, t) for (r, d), t in self.table.items() if not d)
            if not known:  # only drafting passes measured so far
                known = sorted((r, t * 0.87) for (r, _), t in self.table.items())
            pairs = [self.table[(r, True)] - self.table[(r, False)]
                     for r, d in self.table if d and (r, False) in self.table]
            extra = (max(0.0, float(np.median(pairs))) if pairs
                     else 0.15 * interpolate(known, 1))
            self._fit = known, extra
        return self._fit

    def draft_extra(self) -> float:
        """Measured cost of drafting (the streams' rows and candidates) on top of a pass."""
        return self.fitted()[1]

    def estimate(self, rows: int, draft: bool) -> float:
        if draft:
            # A drafting pass does strictly more than a plain one; running averages taken
            # at different times can say otherwise when the machine's speed drifts. (Only
            # against a measured plain pass: an extrapolated one is a pessimistic guess.)
            if (rows, True) in self.table:
                return max(self.table[(rows, True)], self.table.get((rows, False), 0.0))
            return self.estimate(rows, False) + self.fitted()[1]
        if (rows, False) in self.table:
            return self.table[(rows, False)]
        known = self.fitted()[0]
        if self.curve and known and (known[0][0], False) in self.table:
            # The nearest size run in this process, scaled along the machine's curve.
            i = bisect.bisect_left(known, (rows, 0.0))
            near, t = min(known[max(0, i - 1): i + 1], key=lambda p: (abs(p[0] - rows), p[0]))
            return t * self.along_curve(rows) / self.along_curve(near)
        return interpolate(known, rows)


def on_curve(curve: list[tuple[int, float]], rows: int) -> float:
    """The curve (rows, seconds), sorted by rows, at `rows`: linear between its points,
    beyond the last along its last segment (never falling)."""
    below = [p for p in curve if p[0] <= rows]
    above = [p for p in curve if p[0] > rows]
    if not below:
        return curve[0][1]
    r0, t0 = below[-1]
    if above:
        r1, t1 = above[0]
        return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
    if len(curve) < 2:
        return t0
    ra, ta = curve[-2]
    return t0 + max(0.0, (t0 - ta) / (r0 - ra)) * (rows - r0)


def interpolate(known: list[tuple[int, float]], rows: int) -> float:
    """Seconds of a pass of `rows` rows from measured (rows, seconds), sorted by rows."""
    if not known:
        return 1.0
    below = [(r, t) for r, t in known if r <= rows]
    above = [(r, t) for r, t in known if r > rows]
    if below and above:  # linear between the nearest measured sizes
        (r0, t0), (r1, t1) = below[-1], above[0]
        return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
    r0, t0 = (below or above)[-1 if below else 0]
    # Until two sizes are measured, a row is assumed to cost a quarter of a one-row
    # pass (MKL here: 15-40%), so the controller explores only for sure drafts.
    slope = 0.25 * known[0][1]
    if len(known) >= 2:
        slope = max(0.02 * known[0][1],
                    (known[-1][1] - known[0][1]) / (known[-1][0] - known[0][0]))
    return max(known[0][1], t0 + slope * (rows - r0))


# One cost table per model, shared by its generations in this process (modules are
# dicts, so unhashable: keyed by id, with a weak reference to tell a reused id apart).
_COSTS: dict[int, tuple[weakref.ref, PassCosts]] = {}


def costs_for(model) -> PassCosts:
    """The PassCosts of `model` in this process."""
    entry = _COSTS.get(id(model))
    if entry is None or entry[0]() is not model:
        for key in [k for k, (ref, _) in _COSTS.items() if ref() is None]:
            del _COSTS[key]
        entry = (weakref.ref(model), PassCosts())
        _COSTS[id(model)] = entry
    return entry[1]


@dataclass
class Controller:
    """Chooses each step's Plan and learns from its outcome (see the module docstring).

    costs: the model's PassCosts; gamma: the streams' depth; sampled: the generation
    samples (its calibration starts at SAMPLED_START).
    """

    costs: PassCosts
    gamma: int
    sampled: bool = False
    # A drafting option must promise this factor more than a plain step. 1.0 (pure
    # expected rate) beat 1.1 in 4 of 4 paired bench runs on 6 code and 6 chat prompts
    # (code 1.25x/1.22x vs 1.08x/1.13x, chat 1.49x vs 1.38x); 0.9 was not distinguishable
    # from 1.0 in the noise here.
    margin: float = 1.0
    decay: float = 0.97
    # Calibration of stream path probabilities per depth: accepted / predicted sums.
    accepted: np.ndarray = field(default=None)
    predicted: np.ndarray = field(default=None)
    # Chain statistics as [accepted, tried] running sums, keyed by chain_key(match);
    # seeded with the greedy or the sampled priors above.
    first: dict = field(default=None)
    follow: dict = field(default=None)
    off_steps: int = 0
    probe_after: int = 8

    def __post_init__(self):
        if self.accepted is None:
            ratios, weight = SAMPLED_START if self.sampled else ((1.0,), 1.0)
            # Index d is depth d (0 unused); depths past the table take its last ratio.
            ratio = np.array([ratios[min(max(d - 1, 0), len(ratios) - 1)]
                              for d in range(self.gamma + 1)])
            self.accepted = ratio * weight
            self.predicted = np.full(self.gamma + 1, weight)
        if self.first is None:
            context, corpus = ((SAMPLED_CHAIN_FIRST, SAMPLED_CORPUS_FIRST) if self.sampled
                               else (CHAIN_FIRST, CORPUS_FIRST))
            self.first = {**{("context", n): [p * 4, 4.0] for n, p in context.items()},
                          **{("corpus", n): [p * 4, 4.0] for n, p in corpus.items()}}
        if self.follow is None:
            nxt = ((SAMPLED_CHAIN_NEXT, SAMPLED_CORPUS_NEXT) if self.sampled
                   else (CHAIN_NEXT, CORPUS_NEXT))
            self.follow = {"context": [nxt[0] * 8, 8.0], "corpus": [nxt[1] * 8, 8.0]}

    # --- choice ------------------------------------------------------------------------

    def node_gains(self, tree: DraftTree | None) -> list[float]:
        """Expected acceptance of each stream node, best first (parents before children)."""
        if tree is None or not tree.logprobs:
            return []
        ratio = self.accepted / self.predicted
        return [min(1.0, ratio[tree.depths[i + 1]] * math.exp(lp))
                for i, lp in enumerate(tree.logprobs)]

    def chain_gain(self, match: int | tuple[str, int], m: int) -> float:
        """Expected accepted tokens of the first m tokens of a chain from `match`."""
        if not match or m == 0:
            return 0.0
        key = chain_key(match)
        a, n = self.first[key]
        c = self.follow[key[0]][0] / self.follow[key[0]][1]
        f = a / n
        return f * (1 - c**m) / (1 - c) if c < 1 else f * m

    def plan(self, tree: DraftTree | None, chain_len: int, match: int | tuple[str, int]
             ) -> Plan:
        """The best Plan for a stream tree (its nodes best first, with logprobs) and a
        chain of `chain_len` tokens from `match` (see chain_key)."""
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
                    rows = 1 + k + m
                    cost = self.costs.estimate(rows, draft)
                    if rows > 1 or draft:  # a guess must beat a plain step clearly
                        cost *= self.margin
                    rate = (1 + gains[k] + self.chain_gain(match, m)) / cost
                    if rate > best:
                        best, best_plan = rate, Plan(k, m, draft)
        if best_plan.draft:
            self.off_steps, self.probe_after = 0, 8
            return best_plan
        # Drafting lost this step. Keep it when the streams still pay for themselves at
        # the draft just seen (their next draft is likely as good): with at least one of
        # its nodes, since a draft verified by none gains nothing. Else probe now and then.
        with_draft = max(((1 + gains[k]) / (self.costs.estimate(1 + k, True) * self.margin)
                          for k in range(1, len(gains))), default=0.0)
        plain = 1 / self.costs.estimate(1, False)
        if with_draft > plain:
            return Plan(best_plan.stream_nodes, best_plan.chain, True)
        self.off_steps += 1
        if self.off_steps >= self.probe_after:
            self.off_steps, self.probe_after = 0, min(128, self.probe_after * 2)
            return Plan(best_plan.stream_nodes, best_plan.chain, True)
        return best_plan

    # --- learning ----------------------------------------------------------------------

    def observe(self, tree: DraftTree, plan: Plan, match: int | tuple[str, int],
                path: list[int],
                seconds: float | None) -> None:
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
        if plan.chain and match:
            chain_nodes = tree.chain_nodes
            run = 0
            for node in chain_nodes:
                if node in path:
                    run += 1
                else:
                    break
            key = chain_key(match)
            stats, follow = self.first[key], self.follow[key[0]]
            stats[0] = stats[0] * self.decay + (run > 0)
            stats[1] = stats[1] * self.decay + 1
            if run:
                tried = min(len(chain_nodes) - 1, run)
                follow[0] = follow[0] * self.decay + (run - 1)
                follow[1] = follow[1] * self.decay + tried


def chain_key(match: int | tuple[str, int]) -> tuple[str, int]:
    """The statistics a chain's acceptance is kept under: a context draft's match length
    n (an int, 4 and longer alike) or a corpus draft's ("corpus", n)."""
    if isinstance(match, tuple):
        source, n = match
        return source, min(max(n, min(CORPUS_FIRST)), max(CORPUS_FIRST))
    return "context", min(match, 4)
