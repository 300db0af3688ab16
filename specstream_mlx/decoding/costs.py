"""The cost of a decode pass by its rows: the one cost model the drafting controller
(controller.py) decides with and `specstream tune` (tools/tune.py) replays with.

A pass's cost is kept per (rows, drafts) as a running average of measured passes. A size
not measured yet is the nearest measured plain size scaled along the machine's pass-cost
curve (pass_curve.py: plain passes of 1..41 rows timed once per machine and model shape;
only its shape is used, so a measurement in a slow spell still serves); a drafting pass
adds drafting's measured extra cost (its stream rows and candidates). Without a curve
(SPECSTREAM_PASS_CURVE=off) the shape is LINEAR: each row a quarter of a one-row pass
(MKL on this repository's CPUs: 15-40%).

Worked example: measured plain passes 1 row 50 ms and 9 rows 95 ms, drafting 1 row 55
ms; curve 1: 1.0, 8: 1.8, 9: 1.9, 16: 1.9 (seconds, any scale). Then 16 plain rows =
95 * 1.9 / 1.9 = 95 ms (nearest measured: 9), 8 drafting rows = 95 * 1.8 / 1.9 + 5 =
95 ms, and 1 drafting row = its measurement, 55 ms.
"""

from __future__ import annotations

import bisect
import statistics
import weakref

# The curve's shape when the machine's is not measured: (rows, relative cost).
LINEAR = {1: 1.0, 2: 1.25}


def on_curve(points: list[tuple[int, float]], rows: int) -> float:
    """The piecewise-linear curve through `points` ((rows, cost), sorted by rows) at
    `rows`: linear between points, before the first flat, past the last along the last
    segment (never falling). The one interpolator of pass costs."""
    i = bisect.bisect_right(points, (rows, float("inf")))
    if i == 0:
        return points[0][1]
    r0, t0 = points[i - 1]
    if i < len(points):
        r1, t1 = points[i]
        return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
    if len(points) < 2:
        return t0
    ra, ta = points[-2]
    return t0 + max(0.0, (t0 - ta) / (r0 - ra)) * (rows - r0)


class PassCosts:
    """Seconds of a decode step by (rows, drafts): running averages of measured steps and,
    for sizes not measured, the curve scaled to the nearest measured size (see above)."""

    def __init__(self, curve: dict[int, float] | None = None, alpha: float = 0.2):
        # alpha: weight of the newest step in a running average (about the last 5 steps
        # of a size count, so a machine's drift is followed within a generation).
        self.alpha = alpha
        self.table: dict[tuple[int, bool], float] = {}
        self.curve: list[tuple[int, float]] = []
        self._shape: list[tuple[int, float]] = sorted(LINEAR.items())
        self._at: dict[int, float] = {}  # the shape by rows, memoised: a plan asks ~300
        self._extra: float | None = None
        self.set_curve(curve or {})

    @classmethod
    def measured(cls, plain: dict[int, float], drafting: dict[int, float],
                 curve: dict[int, float] | None = None) -> PassCosts:
        """A table of fixed measurements (seconds by rows): what `tune` replays with."""
        costs = cls(curve)
        for draft, table in ((False, plain), (True, drafting)):
            for rows, seconds in table.items():
                costs.observe(int(rows), draft, float(seconds))
        return costs

    def set_curve(self, curve: dict[int, float]) -> None:
        """The machine's plain pass cost by rows (pass_curve.apply; any scale)."""
        self.curve = sorted((int(r), float(t)) for r, t in curve.items() if t > 0)
        self._shape = self.curve or sorted(LINEAR.items())
        self._at = {}

    def shape(self, rows: int) -> float:
        if rows not in self._at:
            self._at[rows] = on_curve(self._shape, rows)
        return self._at[rows]

    def observe(self, rows: int, draft: bool, seconds: float) -> None:
        key = (rows, draft)
        old = self.table.get(key)
        self.table[key] = seconds if old is None else old + self.alpha * (seconds - old)
        self._extra = None

    def draft_extra(self) -> float:
        """Drafting's cost on top of a plain pass: the median over sizes measured both ways
        (0.0 before any; a generation's first two steps measure it at one row)."""
        if self._extra is None:
            pairs = [t - self.table[(r, False)] for (r, d), t in self.table.items()
                     if d and (r, False) in self.table]
            self._extra = max(0.0, statistics.median(pairs)) if pairs else 0.0
        return self._extra

    def estimate(self, rows: int, draft: bool) -> float:
        """Seconds of a pass of `rows` rows (the root included) that drafts or not."""
        if draft:
            if (rows, True) in self.table:
                # A drafting pass does strictly more than a plain one of the same rows;
                # running averages taken at different times can say otherwise.
                return max(self.table[(rows, True)], self.table.get((rows, False), 0.0))
            return self.estimate(rows, False) + self.draft_extra()
        if (rows, False) in self.table:
            return self.table[(rows, False)]
        plain = sorted(r for r, d in self.table if not d)
        if not plain:  # nothing measured: the curve's own seconds (LINEAR: relative)
            return self.shape(rows)
        i = bisect.bisect_left(plain, rows)
        near = min(plain[max(0, i - 1): i + 1], key=lambda r: (abs(r - rows), r))
        return self.table[(near, False)] * self.shape(rows) / self.shape(near)


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
