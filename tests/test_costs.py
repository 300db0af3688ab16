"""The one cost model of decode passes (costs.py): the curve interpolator, running averages
of measured passes, unmeasured sizes scaled along the curve from the nearest measured
one, drafting's measured extra, fixed tables for `tune`, one table per model."""

from __future__ import annotations

import gc
import random
import weakref

import mlx.nn as nn
import pytest

from specstream_mlx.decoding import costs as costs_module
from specstream_mlx.decoding.costs import LINEAR, PassCosts, costs_for, on_curve

# The module docstring's worked example: seconds by rows, and a curve of any scale.
PLAIN = {1: 0.050, 9: 0.095}
DRAFTING = {1: 0.055}
CURVE = {1: 1.0, 8: 1.8, 9: 1.9, 16: 1.9}


# --- on_curve --------------------------------------------------------------------------


def test_on_curve_is_linear_between_points_and_exact_at_them():
    points = [(1, 1.0), (3, 2.0), (5, 2.5)]
    assert on_curve(points, 1) == 1.0 and on_curve(points, 3) == 2.0
    assert on_curve(points, 2) == pytest.approx(1.5)
    assert on_curve(points, 4) == pytest.approx(2.25)


def test_on_curve_is_flat_before_the_first_point():
    assert on_curve([(2, 0.7), (4, 1.1)], 1) == 0.7
    assert on_curve([(2, 0.7), (4, 1.1)], 0) == 0.7


def test_on_curve_goes_on_along_the_last_segment():
    points = [(1, 1.0), (3, 2.0), (5, 2.5)]  # last segment: 0.25 a row
    assert on_curve(points, 7) == pytest.approx(3.0)
    assert on_curve(points, 45) == pytest.approx(12.5)


def test_on_curve_never_falls_past_the_last_point():
    points = [(1, 1.0), (4, 2.0), (8, 1.6)]  # the last segment falls
    assert on_curve(points, 6) == pytest.approx(1.8)  # between points it may fall
    assert on_curve(points, 8) == pytest.approx(1.6)
    assert on_curve(points, 9) == pytest.approx(1.6)
    assert on_curve(points, 100) == pytest.approx(1.6)


def test_on_curve_of_one_point_is_that_point_everywhere():
    for rows in (0, 1, 4, 100):
        assert on_curve([(4, 0.7)], rows) == 0.7


# --- PassCosts -------------------------------------------------------------------------


def test_a_measured_size_is_its_running_average():
    c = PassCosts()
    c.observe(3, False, 0.10)
    assert c.estimate(3, False) == 0.10  # the first measurement as is
    c.observe(3, False, 0.20)
    assert c.estimate(3, False) == pytest.approx(0.12)  # 0.10 + 0.2 * (0.20 - 0.10)
    c.observe(3, False, 0.20)
    assert c.estimate(3, False) == pytest.approx(0.136)
    c.observe(3, True, 0.50)  # drafting passes are averaged apart
    assert c.estimate(3, False) == pytest.approx(0.136)
    assert c.estimate(3, True) == 0.50
    half = PassCosts(alpha=0.5)
    half.observe(3, False, 0.10)
    half.observe(3, False, 0.20)
    assert half.estimate(3, False) == pytest.approx(0.15)


def test_no_curve_is_the_linear_shape():
    c = PassCosts()
    assert c.curve == []
    # LINEAR: each row a quarter of a one-row pass.
    assert [c.shape(r) for r in (1, 2, 5, 9)] == pytest.approx([1.0, 1.25, 2.0, 3.0])
    assert sorted(LINEAR.items()) == [(1, 1.0), (2, 1.25)]
    c.observe(1, False, 0.04)
    assert c.estimate(5, False) == pytest.approx(0.08)
    assert c.estimate(9, False) == pytest.approx(0.12)


def test_an_unmeasured_size_scales_the_nearest_measured_plain_size():
    c = PassCosts()  # LINEAR: shape(r) = (r + 3) / 4
    c.observe(1, False, 0.05)
    c.observe(9, False, 0.20)  # not on the linear shape through 1: which one counts shows
    c.observe(5, True, 0.50)  # a drafting pass is no reference for plain ones
    assert c.estimate(4, False) == pytest.approx(0.05 * 1.75)  # nearest: 1
    assert c.estimate(6, False) == pytest.approx(0.20 * 2.25 / 3.0)  # nearest: 9
    assert c.estimate(5, False) == pytest.approx(0.10)  # a tie: the smaller, 1 (not 0.133)
    assert c.estimate(20, False) == pytest.approx(0.20 * 5.75 / 3.0)  # past the last: 9


def test_the_docstring_example():
    c = PassCosts(curve=CURVE)
    for rows, t in PLAIN.items():
        c.observe(rows, False, t)
    for rows, t in DRAFTING.items():
        c.observe(rows, True, t)
    assert c.draft_extra() == pytest.approx(0.005)
    assert c.estimate(16, False) == pytest.approx(0.095)  # 95 * 1.9 / 1.9 (nearest: 9)
    assert c.estimate(8, True) == pytest.approx(0.095)  # 95 * 1.8 / 1.9 + 5
    assert c.estimate(1, True) == pytest.approx(0.055)  # measured
    assert c.estimate(4, False) == pytest.approx(0.05 * (1.0 + 0.8 * 3 / 7))  # nearest: 1


def test_a_curve_scales_the_measurements_of_a_slower_process():
    curve = {1: 0.05, 8: 0.08, 16: 0.09, 17: 0.12, 24: 0.12}
    c = PassCosts(curve=curve)
    c.observe(1, False, 0.10)  # this process runs at half the curve's speed
    c.observe(1, True, 0.11)
    assert c.estimate(16, False) == pytest.approx(0.18)
    assert c.estimate(12, False) == pytest.approx(0.17)  # linear between curve points
    assert c.estimate(40, False) == pytest.approx(0.24)  # the flat last segment
    assert c.estimate(17, True) == pytest.approx(0.24 + 0.01)  # plus drafting's extra
    c.observe(16, False, 0.16)  # a nearer measured size becomes the reference
    assert c.estimate(17, False) == pytest.approx(0.16 * 0.12 / 0.09)
    assert c.estimate(8, False) == pytest.approx(0.10 * 0.08 / 0.05)  # 1 is nearer than 16


def test_drafting_adds_the_median_measured_extra():
    c = PassCosts()
    for rows, plain, drafting in ((1, 0.05, 0.06), (3, 0.07, 0.10), (5, 0.08, 0.085)):
        c.observe(rows, False, plain)
        c.observe(rows, True, drafting)
    c.observe(9, True, 0.9)  # drafting measured alone: no extra to take from it
    assert c.draft_extra() == pytest.approx(0.01)  # median of 0.01, 0.03, 0.005
    # 7 rows: nearest plain 5, 0.08 * 2.5 / 2.0 = 0.10, plus 0.01.
    assert c.estimate(7, False) == pytest.approx(0.10)
    assert c.estimate(7, True) == pytest.approx(0.11)
    c.observe(7, False, 0.10)
    c.observe(7, True, 0.14)  # a fourth pair: the median of two middle ones
    assert c.draft_extra() == pytest.approx((0.01 + 0.03) / 2)
    assert c.estimate(2, True) == pytest.approx(c.estimate(2, False) + 0.02)


def test_no_extra_before_any_pair_and_never_a_negative_one():
    c = PassCosts()
    c.observe(1, False, 0.06)
    assert c.draft_extra() == 0.0
    assert c.estimate(3, True) == c.estimate(3, False)
    c.observe(1, True, 0.059)  # measured in a faster spell of the machine
    assert c.draft_extra() == 0.0
    assert c.estimate(3, True) == c.estimate(3, False)


def test_a_drafting_pass_is_never_estimated_cheaper_than_a_measured_plain_one():
    c = PassCosts()
    c.observe(1, False, 0.060)
    c.observe(1, True, 0.059)  # a faster spell
    c.observe(3, False, 0.070)
    c.observe(3, True, 0.081)
    assert c.estimate(1, True) == pytest.approx(0.060)
    assert c.estimate(3, True) == pytest.approx(0.081)
    # A measured drafting pass is not overruled by an extrapolated plain one (a long
    # context chain's 17 rows, plain never tried at that size).
    c.observe(17, True, 0.110)
    assert c.estimate(17, False) > 0.110
    assert c.estimate(17, True) == pytest.approx(0.110)


@pytest.mark.parametrize("seed", range(4))
def test_drafting_estimates_are_never_below_plain_ones(seed):
    """Whatever was measured, a drafting pass of r rows is estimated at least as slow as a
    plain one, except where only drafting was measured at r (see the test above)."""
    rng = random.Random(seed)
    curve = {r: 0.04 + 0.003 * r + rng.random() * 0.01 for r in (1, 2, 4, 8, 16, 24, 33)}
    c = PassCosts(curve=curve if seed % 2 else None)
    for _ in range(60):
        c.observe(rng.randint(1, 30), rng.random() < 0.5, 0.03 + rng.random() * 0.1)
    checked = 0
    for rows in range(1, 41):
        if (rows, True) in c.table and (rows, False) not in c.table:
            continue
        assert c.estimate(rows, True) >= c.estimate(rows, False)
        checked += 1
    assert checked > 20


def test_nothing_measured_is_the_curves_own_seconds():
    c = PassCosts(curve={1: 0.05, 9: 0.09})
    assert c.estimate(5, False) == pytest.approx(0.07)
    assert c.estimate(5, True) == pytest.approx(0.07)  # no extra measured yet
    assert c.estimate(20, False) == pytest.approx(0.09 + 0.005 * 11)
    assert PassCosts().estimate(5, False) == pytest.approx(2.0)  # LINEAR: relative


def test_set_curve_replaces_the_shape():
    c = PassCosts()
    c.observe(1, False, 0.05)
    assert c.estimate(5, False) == pytest.approx(0.10)  # LINEAR
    c.set_curve({1: 1.0, 5: 5.0, 6: 0.0, 7: -1.0})  # non-positive points are dropped
    assert c.curve == [(1, 1.0), (5, 5.0)]
    assert c.estimate(5, False) == pytest.approx(0.25)
    c.set_curve({})
    assert c.curve == [] and c.estimate(5, False) == pytest.approx(0.10)


def test_measured_builds_the_table_observe_calls_build():
    fixed = PassCosts.measured(PLAIN, DRAFTING, CURVE)
    observed = PassCosts(curve=CURVE)
    for rows, t in PLAIN.items():
        observed.observe(rows, False, t)
    for rows, t in DRAFTING.items():
        observed.observe(rows, True, t)
    assert fixed.table == observed.table == {(1, False): 0.05, (9, False): 0.095,
                                             (1, True): 0.055}
    assert fixed.curve == observed.curve
    for rows in range(1, 41):
        for draft in (False, True):
            assert fixed.estimate(rows, draft) == observed.estimate(rows, draft)
    # Tables read from JSON have string keys.
    assert PassCosts.measured({"1": 0.05}, {"1": "0.055"}).table == {(1, False): 0.05,
                                                                    (1, True): 0.055}
    assert PassCosts.measured(PLAIN, {}).curve == []


# --- one table per model ---------------------------------------------------------------


def test_costs_for_gives_one_table_per_model():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)  # modules are dicts: unhashable
    table = costs_for(a)
    assert isinstance(table, PassCosts) and costs_for(a) is table
    assert costs_for(b) is not table
    table.observe(1, False, 0.05)
    assert costs_for(a).estimate(1, False) == 0.05


def test_costs_for_holds_no_model_alive_and_tells_a_reused_id_apart():
    a = nn.Linear(2, 2)
    stale = costs_for(a)
    stale.observe(1, False, 0.05)
    alive = weakref.ref(a)
    dead_entry = costs_module._COSTS[id(a)]
    del a
    gc.collect()
    assert alive() is None  # the registry did not keep the model
    b = nn.Linear(2, 2)
    # As if b took the dead model's id: it gets a fresh table, not the dead one's.
    costs_module._COSTS[id(b)] = dead_entry
    fresh = costs_for(b)
    assert fresh is not stale and fresh.table == {}
    assert costs_for(b) is fresh
    assert all(ref() is not None for ref, _ in costs_module._COSTS.values())  # swept
