"""The per-step controller: its choices follow measured costs and acceptance, it falls
back to plain steps and re-probes, and no choice ever changes greedy output."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import tiny_model

from specstream_mlx.decoding import controller as ctl
from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.controller import Controller, PassCosts, Plan
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.decoding.step import generate_step, prefill, speculative_step
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.models.config import StreamArgs

PROMPT = [3, 17, 42, 8, 91, 5, 3, 17, 42]
STREAMS = StreamArgs(num_streams=3, msa_layers=2, tree_budget=6, lookup_depth=8)


def costs(table: dict[int, float], draft_extra: float) -> PassCosts:
    c = PassCosts()
    for rows, t in table.items():
        c.observe(rows, False, t)
        c.observe(rows, True, t + draft_extra)
    return c


def confident_tree(p: float = 0.9) -> DraftTree:
    lp = np.log(p)
    return DraftTree.from_candidates(np.array([[1, 2], [3, 4], [5, 6]]),
                                     np.array([[lp, -5.0], [lp, -5.0], [lp, -5.0]]), 6)


def test_first_steps_measure_plain_and_drafting_costs():
    c = Controller(PassCosts(), 3)
    assert c.plan(confident_tree(), 4, 2) == Plan(0, 0, False)
    c.costs.observe(1, False, 0.1)
    assert c.plan(None, 4, 2) == Plan(0, 0, True)
    c.costs.observe(1, True, 0.11)
    assert c.plan(confident_tree(), 0, 0).stream_nodes > 0  # sure drafts are tried
    assert c.plan(confident_tree(0.2), 0, 0) == Plan(0, 0, False)  # unsure ones are not


def test_estimates_interpolate_and_extrapolate():
    c = costs({1: 0.10, 5: 0.20}, 0.02)
    assert c.estimate(3, False) == pytest.approx(0.15)
    assert c.estimate(9, False) == pytest.approx(0.30)  # the measured slope goes on
    assert c.estimate(3, True) == pytest.approx(0.17)  # plus the measured drafting cost
    only_drafting = PassCosts()
    only_drafting.observe(2, True, 0.2)
    assert 0 < only_drafting.estimate(2, False) < 0.2 < only_drafting.estimate(5, True)
    assert PassCosts().estimate(3, False) == 1.0  # nothing measured: all sizes alike


def test_a_machine_curve_scales_the_nearest_measured_size():
    curve = {1: 0.05, 8: 0.08, 16: 0.09, 17: 0.12, 24: 0.12}
    c = PassCosts(curve=curve)
    c.observe(1, False, 0.10)  # this process runs at half the curve's speed
    c.observe(1, True, 0.11)
    assert c.estimate(1, False) == pytest.approx(0.10)  # measured: as measured
    assert c.estimate(16, False) == pytest.approx(0.18)
    assert c.estimate(17, True) == pytest.approx(0.24 + 0.01)  # plus drafting's extra
    assert c.estimate(12, False) == pytest.approx(0.17)  # linear between curve points
    assert c.estimate(40, False) == pytest.approx(0.24)  # flat last segment: no rise
    c.observe(16, False, 0.16)  # the nearest measured size is the reference
    assert c.estimate(17, False) == pytest.approx(0.16 * 0.12 / 0.09)
    assert c.estimate(8, False) == pytest.approx(0.10 * 0.08 / 0.05)  # 1 is nearer than 16
    assert ctl.on_curve(sorted(PassCosts(curve={1: 1.0, 3: 2.0}).curve), 5) == 3.0
    # Until a plain pass is measured the curve has nothing to scale.
    assert PassCosts(curve=curve).estimate(3, False) == 1.0


def test_a_context_chain_fills_a_pass_up_to_a_cheap_size():
    # 16 rows cost little more than 9, the 17th row a jump: a long chain is cut to fill
    # 16 rows exactly (15 tokens after the root), not to a fixed length of 8 or 16.
    curve = {1: 0.05, 2: 0.05, 8: 0.09, 9: 0.095, 16: 0.095, 17: 0.13, 24: 0.13, 33: 0.17}
    c = Controller(PassCosts(curve=curve), 3)
    c.costs.observe(1, False, 0.05)
    c.costs.observe(1, True, 0.055)
    c.follow["context"] = [0.95 * 8, 8.0]
    assert c.plan(None, 24, 4) == Plan(0, 15, False)
    assert c.plan(None, 10, 4) == Plan(0, 10, False)  # a short chain is taken whole


def test_flat_costs_and_confident_streams_draft_deep():
    c = Controller(costs({r: 0.1 for r in range(1, 20)}, 0.005), 3)
    assert c.plan(confident_tree(), 0, 0) == Plan(6, 0, True)  # free rows: take them all
    c = Controller(costs({r: 0.1 + 0.01 * r for r in range(1, 20)}, 0.005), 3)
    assert c.plan(confident_tree(), 0, 0) == Plan(3, 0, True)  # the confident chain only


def test_costly_rows_and_unsure_streams_fall_back_to_plain_then_probe():
    c = Controller(costs({1: 0.1, 2: 0.2, 4: 0.4, 8: 0.8}, 0.05), 3)
    plans = [c.plan(confident_tree(0.3), 0, 0) for _ in range(40)]
    assert plans[0] == Plan(0, 0, False)
    probes = [i for i, p in enumerate(plans) if p.draft]
    assert probes == [7, 23]  # after 8 plain steps, then 16, ...
    assert all(p.stream_nodes == 0 for p in plans)


def test_a_drafting_pass_is_never_estimated_cheaper_than_a_plain_one():
    c = PassCosts()
    c.observe(1, False, 0.060)
    c.observe(1, True, 0.059)  # measured in a faster spell of the machine
    c.observe(3, False, 0.070)
    c.observe(3, True, 0.081)
    assert c.estimate(1, True) == pytest.approx(0.060)
    assert c.estimate(3, True) == pytest.approx(0.081)
    # a measured drafting pass is not overruled by an extrapolated plain one (a long
    # context chain's 17 rows, plain never tried at that size)
    c.observe(17, True, 0.110)
    assert c.estimate(17, False) > 0.110
    assert c.estimate(17, True) == pytest.approx(0.110)


def test_drafting_is_not_kept_for_a_draft_that_verifies_no_node():
    # Drafting measured (by noise) as cheap as plain, unsure streams: the controller must
    # not keep computing stream rows on the strength of a zero-node draft.
    c = Controller(costs({1: 0.060, 2: 0.090, 4: 0.120}, 0.0), 3)
    c.costs.observe(1, True, 0.059)
    plans = [c.plan(confident_tree(0.05), 0, 0) for _ in range(7)]
    assert plans == [Plan(0, 0, False)] * 7


def test_acceptance_calibration_learns_from_outcomes():
    c = Controller(costs({1: 0.1, 2: 0.13, 3: 0.16, 4: 0.19}, 0.01), 3)
    tree = confident_tree(0.9).first(3)
    for _ in range(60):  # the streams claim 0.9 but their drafts are never accepted
        c.observe(tree, Plan(3, 0, True), 0, [0], None)
    assert c.node_gains(tree)[0] < 0.1
    assert c.plan(confident_tree(0.9), 0, 0).stream_nodes == 0


def test_chain_statistics_follow_accepted_context_drafts():
    c = Controller(costs({r: 0.1 for r in range(1, 20)}, 0.01), 3)
    before = c.chain_gain(1, 8)
    tree = DraftTree().with_chain([7, 8, 9, 10])
    for _ in range(40):
        c.observe(tree, Plan(0, 4, False), 1, [0, 1, 2, 3, 4], None)
    assert c.chain_gain(1, 8) > 2 * before


def random_plans(monkeypatch, seed: int):
    rng = random.Random(seed)

    def plan(self, tree, chain_len, match):
        k = rng.randint(0, len(tree.tokens)) if tree is not None else 0
        return Plan(k, rng.randint(0, chain_len), rng.random() < 0.6)

    monkeypatch.setattr(ctl.Controller, "plan", plan)


@pytest.mark.parametrize("seed", range(3))
def test_any_choice_keeps_greedy_output(arch, monkeypatch, seed):
    """Whatever the controller picks (plain steps, partial trees, chains, no draft for the
    next step), greedy output equals plain decoding's."""
    model = tiny_model(arch, seed=3, streams=STREAMS)
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=30, speculative=False)]
    random_plans(monkeypatch, seed)
    cache = KVCache(len(model.layers))
    got = [e.token for e in generate_step(model, PROMPT, max_tokens=30, cache=cache)]
    assert got == plain
    assert cache.offset == len(PROMPT) + 29


def test_no_draft_step_leaves_plain_decodings_cache(arch):
    """A step that drafts nothing commits exactly what a plain step commits."""
    model = tiny_model(arch, seed=6, streams=STREAMS)
    spec, plain = KVCache(len(model.layers)), KVCache(len(model.layers))
    prefill(model, spec, PROMPT, 512, True)
    prefill(model, plain, PROMPT, 512, False)
    result = speculative_step(model, spec, 5, DraftTree(), None, 3, draft=False)
    reference = speculative_step(model, plain, 5, DraftTree(), None, 0)
    assert result.draft is None and result.tokens == reference.tokens
    assert spec.offset == plain.offset
    for a, b in zip(spec.state(), plain.state(), strict=True):
        n = spec.offset
        np.testing.assert_allclose(np.array(a[..., :n, :]), np.array(b[..., :n, :]), atol=1e-5)


def test_costs_are_shared_by_a_models_generations():
    model = tiny_model("llama", seed=1, streams=STREAMS)
    events = list(generate_step(model, PROMPT, max_tokens=12))
    assert [e.passes for e in events[:3]] == [1, 2, 3]  # a plain step, then a 1-row probe
    table = ctl.costs_for(model)
    assert {(1, False), (1, True)} <= set(table.table)
    assert ctl.costs_for(model) is table
    assert ctl.costs_for(tiny_model("llama", seed=2, streams=STREAMS)) is not table


def test_sampled_generations_start_with_a_cautious_calibration(monkeypatch):
    tree = confident_tree(0.8)
    greedy = Controller(PassCosts(), 3)
    sampled = Controller(PassCosts(), 3, sampled=True)
    assert greedy.node_gains(tree)[0] == pytest.approx(0.8)
    ratios, _ = ctl.SAMPLED_START
    ratio = ratios[0]  # the tree's first node is at depth 1
    assert sampled.node_gains(tree)[0] == pytest.approx(ratio * 0.8)
    deep = Controller(PassCosts(), 5, sampled=True)
    assert np.allclose(deep.accepted[1:] / deep.predicted[1:],
                       [ratios[0], ratios[1], ratios[2], ratios[2], ratios[2]])
    sampled.observe(tree, Plan(len(tree), 0, True), 0, [0, 1], None)  # one hit
    assert sampled.node_gains(tree)[0] > ratio * 0.8 * 1.15
    seen = []
    monkeypatch.setattr(ctl.Controller, "plan", lambda self, tree, chain_len, match: (
        seen.append(self.sampled) or Plan(0, 0, False)))
    model = tiny_model("llama", seed=1, streams=STREAMS)
    list(generate_step(model, PROMPT, max_tokens=4))
    list(generate_step(model, PROMPT, max_tokens=4, sampler=PositionSampler(0.7, seed=1)))
    assert seen == [False] * 3 + [True] * 3


def test_sampled_generations_start_chains_at_the_sampled_rates():
    greedy = Controller(PassCosts(), 3)
    sampled = Controller(PassCosts(), 3, sampled=True)
    for match, rates in ((4, (ctl.CHAIN_FIRST[4], ctl.SAMPLED_CHAIN_FIRST[4])),
                         (("corpus", 6), (ctl.CORPUS_FIRST[6], ctl.SAMPLED_CORPUS_FIRST[6]))):
        assert greedy.chain_gain(match, 1) == pytest.approx(rates[0])
        assert sampled.chain_gain(match, 1) == pytest.approx(rates[1])
        assert sampled.chain_gain(match, 8) < greedy.chain_gain(match, 8)
    # the priors are per controller: learning in one leaves a new one's alone
    sampled.first[("context", 4)][0] = 0.0
    assert Controller(PassCosts(), 3, sampled=True).chain_gain(4, 1) == pytest.approx(
        ctl.SAMPLED_CHAIN_FIRST[4])
