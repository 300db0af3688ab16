"""The per-step controller: its choices follow measured costs and acceptance, start from
the model's drafting priors until its own statistics take over, fall back to plain steps
and re-probe, and no choice (nor any priors) ever changes greedy output."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import tiny_model

from specstream_mlx.decoding import controller as ctl
from specstream_mlx.decoding import step as step_module
from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.controller import ChainSource, Controller, Plan
from specstream_mlx.decoding.costs import PassCosts, costs_for
from specstream_mlx.decoding.priors import NEUTRAL, DraftingPriors, Priors
from specstream_mlx.decoding.step import generate_step, prefill, speculative_step
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.models.config import StreamArgs

PROMPT = [3, 17, 42, 8, 91, 5, 3, 17, 42]
STREAMS = StreamArgs(num_streams=3, msa_layers=2, tree_budget=6, lookup_depth=8)
CONTEXT_2 = ChainSource("context", 2)


def costs(table: dict[int, float], draft_extra: float) -> PassCosts:
    c = PassCosts()
    for rows, t in table.items():
        c.observe(rows, False, t)
        c.observe(rows, True, t + draft_extra)
    return c


def confident_tree(p: float = 0.9) -> DraftTree:
    """One sure path of depth 3 (path probabilities p, p^2, p^3) and unlikely siblings."""
    lp = np.log(p)
    return DraftTree.from_candidates(np.array([[1, 2], [3, 4], [5, 6]]),
                                     np.array([[lp, -5.0], [lp, -5.0], [lp, -5.0]]), 6)


def accepted_chain(c: Controller, source: ChainSource, steps: int, accepted: bool) -> None:
    """`steps` verified steps of a 4-token chain from `source`, all of it accepted or none."""
    tree = DraftTree().with_chain([7, 8, 9, 10])
    for _ in range(steps):
        c.observe(tree, Plan(0, 4, False), source, [0, 1, 2, 3, 4] if accepted else [0], None)


def test_first_steps_measure_plain_and_drafting_costs():
    c = Controller(PassCosts(), 3)
    assert c.plan(confident_tree(), 4, CONTEXT_2) == Plan(0, 0, False)
    c.costs.observe(1, False, 0.1)
    assert c.plan(None, 4, CONTEXT_2) == Plan(0, 0, True)
    c.costs.observe(1, True, 0.11)
    assert c.plan(confident_tree(), 0, None).stream_nodes > 0  # sure drafts are tried
    assert c.plan(confident_tree(0.2), 0, None) == Plan(0, 0, False)  # unsure ones are not


def test_a_context_chain_fills_a_pass_up_to_a_cheap_size():
    # 16 rows cost little more than 9, the 17th row a jump: a long chain is cut to fill
    # 16 rows exactly (15 tokens after the root), not to a fixed length of 8 or 16.
    curve = {1: 0.05, 2: 0.05, 8: 0.09, 9: 0.095, 16: 0.095, 17: 0.13, 24: 0.13, 33: 0.17}
    c = Controller(PassCosts(curve=curve), 3, Priors(context_first={4: 0.9}, context_next=0.95))
    c.costs.observe(1, False, 0.05)
    c.costs.observe(1, True, 0.055)
    source = ChainSource("context", 4)
    assert c.plan(None, 24, source) == Plan(0, 15, False)
    assert c.plan(None, 10, source) == Plan(0, 10, False)  # a short chain is taken whole


def test_flat_costs_and_confident_streams_draft_deep():
    c = Controller(costs({r: 0.1 for r in range(1, 20)}, 0.005), 3)
    assert c.plan(confident_tree(), 0, None) == Plan(6, 0, True)  # free rows: take them all
    c = Controller(costs({r: 0.1 + 0.01 * r for r in range(1, 20)}, 0.005), 3)
    assert c.plan(confident_tree(), 0, None) == Plan(3, 0, True)  # the confident chain only


def test_costly_rows_and_unsure_streams_fall_back_to_plain_then_probe():
    costly = costs({1: 0.1, 2: 0.2, 4: 0.4, 8: 0.8}, 0.05)
    c = Controller(costly, 3)
    plans = [c.plan(confident_tree(0.3), 0, None) for _ in range(400)]
    assert plans[0] == Plan(0, 0, False)
    assert all(p.stream_nodes == 0 and p.chain == 0 for p in plans)
    probes = [i + 1 for i, p in enumerate(plans) if p.draft]  # counted in plain steps
    assert np.diff([0] + probes).tolist() == [8, 16, 32, 64, 128, 128]
    # A step whose best option drafts starts the count over: the next probe after 8.
    # (Here drafting 3 nodes was measured cheap, plain passes of 4 rows never.)
    c.costs = costs({1: 0.1}, 0.005)
    c.costs.observe(4, True, 0.12)
    assert c.plan(confident_tree(), 0, None) == Plan(3, 0, True)
    c.costs = costly
    plans = [c.plan(confident_tree(0.3), 0, None) for _ in range(24)]
    assert [i + 1 for i, p in enumerate(plans) if p.draft] == [8, 24]


def test_the_plan_never_drafts_when_every_option_is_slower_than_a_plain_step():
    """Each row costs more than a plain pass's share: even sure stream nodes and a sure
    chain are estimated slower than a plain step, and none is drafted, whatever the
    priors say."""
    table = {r: 0.1 * r + 0.02 * (r - 1) for r in range(1, 41)}
    sure = Priors(stream_calibration=(5.0,), context_first={2: 1.0}, context_next=1.0)
    for priors in (NEUTRAL, sure):
        c = Controller(costs(table, 0.01), 3, priors)
        tree = confident_tree(0.999)
        plain = 1 / c.costs.estimate(1, False)
        gains = np.cumsum([0.0] + c.node_gains(tree))
        for k in range(len(gains)):  # the premise, by the controller's own estimates
            for m in range(9):
                if k or m:
                    for draft in (False, True):
                        rate = (1 + gains[k] + c.chain_gain(CONTEXT_2, m)) / c.costs.estimate(
                            1 + k + m, draft)
                        assert rate < plain
        plans = [c.plan(tree, 8, CONTEXT_2) for _ in range(30)]
        assert all(p.stream_nodes == 0 and p.chain == 0 for p in plans)


def test_neutral_priors_take_stream_probabilities_at_their_word():
    c = Controller(PassCosts(), 3, NEUTRAL)
    tree = confident_tree(0.9)
    assert c.node_gains(tree) == pytest.approx(np.exp(tree.logprobs))
    assert c.node_gains(tree)[:3] == pytest.approx([0.9, 0.81, 0.729])
    assert Controller(PassCosts(), 3).node_gains(tree) == c.node_gains(tree)  # the default
    assert Controller(PassCosts(), 3, Priors(stream_calibration=(3.0,))).node_gains(
        tree)[:3] == [1.0, 1.0, 1.0]  # never above certainty


def test_a_lower_stream_calibration_drafts_fewer_nodes():
    cost = costs({r: 0.1 + 0.01 * r for r in range(1, 20)}, 0.005)
    nodes = [Controller(cost, 3, Priors(stream_calibration=(r,))).plan(
        confident_tree(), 0, None).stream_nodes for r in (0.05, 0.2, 1.0, 1.5)]
    assert nodes == sorted(nodes) and nodes[0] < nodes[-1]
    assert nodes[0] == 0  # a very low calibration drafts no stream node at all
    # Calibration by depth: a low ratio at depth 2 and deeper keeps only depth 1.
    shallow = Controller(cost, 3, Priors(stream_calibration=(1.0, 0.05)))
    plan = shallow.plan(confident_tree(), 0, None)
    assert 0 < plan.stream_nodes < nodes[2]
    assert all(d == 1 for d in confident_tree().depths[1: plan.stream_nodes + 1])
    # The weight of the priors: the same calibration moves less under a heavier one.
    light = Controller(cost, 3, Priors(stream_calibration=(0.5,), stream_weight=1.0))
    heavy = Controller(cost, 3, Priors(stream_calibration=(0.5,), stream_weight=20.0))
    tree = confident_tree().first(3)
    for c in (light, heavy):
        c.observe(tree, Plan(3, 0, True), None, [0, 1, 2, 3], None)  # all accepted
    assert light.node_gains(tree)[0] > heavy.node_gains(tree)[0] > 0.45


def test_chain_priors_steer_the_first_choices_then_outcomes_take_over():
    cost = costs({r: 0.1 + 0.02 * (r - 1) for r in range(1, 41)}, 0.005)
    never = Controller(cost, 3, Priors(context_first={2: 0.0}))
    always = Controller(cost, 3, Priors(context_first={2: 1.0}))
    assert never.plan(None, 8, CONTEXT_2).chain == 0
    assert always.plan(None, 8, CONTEXT_2).chain > 0
    # The priors are per bucket: another match length starts neutral in both.
    other = ChainSource("context", 3)
    assert never.chain_gain(other, 4) == always.chain_gain(other, 4)
    # A few steps whose chains were all accepted outweigh a prior of 0.0; a run of
    # rejected ones one of 1.0.
    accepted_chain(never, CONTEXT_2, 10, accepted=True)
    accepted_chain(always, CONTEXT_2, 30, accepted=False)
    assert never.plan(None, 8, CONTEXT_2).chain > 0
    assert always.plan(None, 8, CONTEXT_2).chain == 0
    # Learning stays in its controller: a new one starts from the priors again.
    assert Controller(cost, 3, Priors(context_first={2: 0.0})).plan(None, 8, CONTEXT_2
                                                                   ).chain == 0


def test_corpus_and_context_priors_are_apart():
    priors = Priors(context_first={3: 1.0}, context_next=1.0, corpus_first={3: 0.0})
    c = Controller(PassCosts(), 3, priors)
    assert c.chain_gain(ChainSource("context", 3), 4) == pytest.approx(4.0)
    assert c.chain_gain(ChainSource("corpus", 3), 4) == 0.0
    assert c.chain_gain(None, 4) == 0.0 and c.chain_gain(ChainSource("context", 3), 0) == 0.0
    # Neutral: even odds for a first token and for each next one.
    assert Controller(PassCosts(), 3).chain_gain(CONTEXT_2, 2) == pytest.approx(0.5 + 0.25)


def test_drafting_is_not_kept_for_a_draft_that_verifies_no_node():
    # Drafting measured (by noise) as cheap as plain, unsure streams: the controller must
    # not keep computing stream rows on the strength of a zero-node draft.
    c = Controller(costs({1: 0.060, 2: 0.090, 4: 0.120}, 0.0), 3)
    c.costs.observe(1, True, 0.059)
    plans = [c.plan(confident_tree(0.05), 0, None) for _ in range(7)]
    assert plans == [Plan(0, 0, False)] * 7


def test_acceptance_calibration_learns_from_outcomes():
    c = Controller(costs({1: 0.1, 2: 0.13, 3: 0.16, 4: 0.19}, 0.01), 3)
    tree = confident_tree(0.9).first(3)
    for _ in range(60):  # the streams claim 0.9 but their drafts are never accepted
        c.observe(tree, Plan(3, 0, True), None, [0], None)
    assert c.node_gains(tree)[0] < 0.1
    assert c.plan(confident_tree(0.9), 0, None).stream_nodes == 0


def test_chain_statistics_follow_accepted_context_drafts():
    c = Controller(costs({r: 0.1 for r in range(1, 20)}, 0.01), 3)
    source = ChainSource("context", 1)
    before = c.chain_gain(source, 8)
    accepted_chain(c, source, 40, accepted=True)
    assert c.chain_gain(source, 8) > 2 * before
    # First tokens are kept by match length (next tokens by kind, shared).
    assert c.chain_gain(CONTEXT_2, 1) == Controller(c.costs, 3).chain_gain(CONTEXT_2, 1)


def random_plans(monkeypatch, seed: int):
    rng = random.Random(seed)

    def plan(self, tree, chain_len, source):
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
    table = costs_for(model)
    assert {(1, False), (1, True)} <= set(table.table)
    assert costs_for(model) is table
    assert costs_for(tiny_model("llama", seed=2, streams=STREAMS)) is not table


def recorded_plans(monkeypatch) -> list[tuple[int, Plan]]:
    """Every plan the controller of generate_step makes, with the chain length it had."""
    plans = []

    class Recording(Controller):
        def plan(self, tree, chain_len, source):
            result = super().plan(tree, chain_len, source)
            plans.append((chain_len, result))
            return result

    monkeypatch.setattr(step_module, "Controller", Recording)
    return plans


def fixed_costs(monkeypatch) -> None:
    """Fixed pass costs (each row a tenth of a one-row pass), not this machine's timings
    (noisy under load): the controller's choices are then the priors' and the outcomes'
    alone."""
    fixed = costs({rows: 0.01 + 0.001 * (rows - 1) for rows in range(1, 64)}, 0.0005)
    monkeypatch.setattr(step_module, "costs_for", lambda model: fixed)
    monkeypatch.setattr(PassCosts, "observe", lambda self, rows, draft, seconds: None)


SURE = Priors(stream_calibration=(100.0,), stream_weight=50.0, context_first={
    n: 1.0 for n in (1, 2, 3, 4)}, context_next=1.0)
HOPELESS = Priors(stream_calibration=(1e-6,), stream_weight=50.0, context_first={
    n: 0.0 for n in (1, 2, 3, 4)}, context_next=0.0)


def test_greedy_output_is_the_same_whatever_the_priors(arch, monkeypatch):
    """Priors sure of every draft and priors expecting none: the tokens are plain
    decoding's either way; only what is drafted differs."""
    model = tiny_model(arch, seed=3, streams=STREAMS)
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=30, speculative=False)]
    fixed_costs(monkeypatch)
    plans = recorded_plans(monkeypatch)
    drafted = {}
    for name, priors in (("sure", SURE), ("hopeless", HOPELESS)):
        model.drafting_priors = DraftingPriors(greedy=priors)
        plans.clear()
        events = list(generate_step(model, PROMPT, max_tokens=30))
        assert [e.token for e in events] == plain, name
        drafted[name] = sum(p.stream_nodes + p.chain for _, p in plans)
        if name == "hopeless":
            assert not any(e.from_draft for e in events)
    assert drafted["sure"] > 0 and drafted["hopeless"] == 0
