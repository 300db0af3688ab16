"""The replay of greedy speculative decoding (tune.py) is exact: pass for pass it accepts
what generate_step accepts, and the grid search predicts from measured costs."""

from __future__ import annotations

import importlib
import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_model

import specstream_mlx.decoding.step as step_module
from specstream_mlx.decoding.costs import PassCosts
from specstream_mlx.decoding.drafter import DraftSettings
from specstream_mlx.decoding.priors import NEUTRAL, Priors
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.decoding.step import budget_drafter, generate_step
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.tools.tune import (
    Setting,
    Trace,
    evaluate,
    load_traces,
    path_targets,
    replay,
    replay_controlled,
    trace,
    write_defaults,
)

PROMPT = [3, 17, 42, 8, 91, 5, 3, 17]
STREAMS = StreamArgs(num_streams=3, msa_layers=2)


def decoded(model, n: int, **options) -> tuple[list[int], list[int]]:
    """Tokens of a greedy speculative run and the accepted drafted tokens of each pass
    after the prefill."""
    events = list(generate_step(model, PROMPT, max_tokens=n, adaptive=False, **options))
    per_pass = Counter(e.passes for e in events if e.from_draft)
    return [e.token for e in events], [per_pass[p] for p in range(2, events[-1].passes + 1)]


@pytest.mark.parametrize("budget, depth, min_prob", [(3, 0, 0.0), (0, 4, 0.0), (3, 4, 0.0),
                                                     (6, 3, 0.1)])
def test_replay_matches_generate_step(arch, budget, depth, min_prob):
    model = tiny_model(arch, seed=2, streams=STREAMS)
    n = 40
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=n, speculative=False)]
    tokens, accepted = decoded(model, n, tree_budget=budget, draft_top_k=2, lookup_depth=depth,
                               min_draft_prob=min_prob)
    assert tokens == plain
    tr = trace(model, PROMPT, plain, top_k=2)
    assert tr.tokens == PROMPT + plain  # the plain answer is the model's own greedy one
    rp = replay(tr, budget_drafter(budget, depth, min_prob))
    assert rp.accepted == accepted
    assert rp.passes == len(accepted) and rp.tokens == n
    assert all(r >= 1 for r in rp.rows)


@pytest.mark.parametrize("budget", [1, 6])
def test_replay_with_conditioned_streams_matches_generate_step(arch, budget):
    """Streams conditioned on the next token: the trace gives each row the answer's next
    token, as decoding gives them the verified one, so the replay stays exact."""
    model = tiny_model(arch, seed=3, streams=StreamArgs(num_streams=3, msa_layers=2,
                                                        next_token_rank=4))
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=40, speculative=False)]
    tokens, accepted = decoded(model, 40, tree_budget=budget, draft_top_k=2, lookup_depth=0)
    assert tokens == plain
    rp = replay(trace(model, PROMPT, plain, top_k=2), budget_drafter(budget))
    assert rp.accepted == accepted and sum(accepted) > 0


@pytest.mark.parametrize("temp, budget, depth, min_prob", [(0.8, 6, 0, 0.0), (0.8, 3, 4, 0.0),
                                                          (1.3, 6, 0, 0.05)])
def test_sampled_replay_matches_generate_step(arch, temp, budget, depth, min_prob):
    """Sampling with a PositionSampler: the trace of plain decoding's sampled answer
    replays pass for pass what speculative sampling accepts (ranked at the sampler's
    draft temperature, which above 1 changes the path probabilities min_prob cuts)."""
    model = tiny_model(arch, seed=3, streams=StreamArgs(num_streams=3, msa_layers=2,
                                                        next_token_rank=4))
    sampler = PositionSampler(temp, seed=11)
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=40, sampler=sampler,
                                            speculative=False)]
    tokens, accepted = decoded(model, 40, sampler=sampler, tree_budget=budget, draft_top_k=2,
                               lookup_depth=depth, min_draft_prob=min_prob)
    assert tokens == plain
    tr = trace(model, PROMPT, plain, top_k=2, sampler=sampler)
    assert tr.tokens == PROMPT + plain  # plain sampling's own draws
    rp = replay(tr, budget_drafter(budget, depth, min_prob))
    assert rp.accepted == accepted and sum(accepted) > 0


def test_sampled_trace_couples_the_streams_as_decoding_does(monkeypatch):
    """Sampling couples the streams' candidates with the sampler's noise where each depth
    is drawn: the trace takes the same noise, so it replays the run; without the noise
    (candidates ranked by probability) it replays another one."""
    import specstream_mlx.tools.tune as tune_module

    model = tiny_model("qwen2", seed=3, streams=StreamArgs(num_streams=3, msa_layers=2,
                                                           next_token_rank=4))
    sampler = PositionSampler(0.7, seed=11)
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=40, sampler=sampler,
                                            speculative=False)]
    _, accepted = decoded(model, 40, sampler=sampler, tree_budget=6, draft_top_k=3,
                          lookup_depth=0)
    drafter = budget_drafter(6)
    assert replay(trace(model, PROMPT, plain, 3, sampler), drafter).accepted == accepted
    real = tune_module.coupled_noise
    monkeypatch.setattr(tune_module, "coupled_noise", lambda m, g: real(m, g) * 0.0)
    assert replay(trace(model, PROMPT, plain, 3, sampler), drafter).accepted != accepted


def test_replay_with_max_tokens_matches_a_shorter_run():
    model = tiny_model("qwen3", seed=1, streams=STREAMS)
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=40, speculative=False)]
    _, accepted = decoded(model, 17, tree_budget=2, draft_top_k=2, lookup_depth=4)
    rp = replay(trace(model, PROMPT, plain, top_k=2), budget_drafter(2, 4), max_tokens=17)
    assert rp.accepted == accepted and rp.tokens == 17


def test_trace_cuts_the_answer_where_it_leaves_greedy_decoding():
    model = tiny_model("llama", seed=0, streams=STREAMS)
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=12, speculative=False)]
    wrong = plain[:5] + [(plain[5] + 1) % model.args.vocab_size] + plain[6:]
    tr = trace(model, PROMPT, wrong, top_k=3)
    assert tr.tokens == PROMPT + plain[:5]
    assert tr.candidates.shape == (5, 3, 3) and tr.logprobs.shape == (5, 3, 3)


@pytest.mark.parametrize("temp", [0.0, 0.9])
def test_generated_answers_end_before_the_end_token(monkeypatch, temp):
    """An answer tune generates stops where decoding stops: the tokens the model would
    write past its end token are not replayed (they once were, greedy and sampled)."""
    model = tiny_model("llama", seed=0, streams=STREAMS)
    sampler = PositionSampler(temp, seed=7) if temp else None
    free = [e.token for e in generate_step(model, PROMPT, max_tokens=16, sampler=sampler,
                                           speculative=False)]
    # The end token: the first one that turns up late enough and not before.
    i = next(i for i in range(2, 16) if free[i] not in free[:i])
    stop, cut = free[i], free[:i]
    # The package's `generate` function shadows its module's name: patch the module.
    monkeypatch.setattr(importlib.import_module("specstream_mlx.generate"), "encode_prompt",
                        lambda *a, **k: PROMPT)
    tokenizer = SimpleNamespace(eos_token_ids=[stop])
    [tr] = load_traces(model, tokenizer, [{"prompt": "x"}], 3, 16, progress=False,
                       temp=temp, seed=7)
    assert tr.tokens == PROMPT + cut
    # Without an end token in reach the whole max_tokens answer is replayed.
    tokenizer.eos_token_ids = [model.args.vocab_size]
    [tr] = load_traces(model, tokenizer, [{"prompt": "x"}], 3, 16, progress=False,
                       temp=temp, seed=7)
    assert tr.tokens == PROMPT + free


def test_trace_needs_streams():
    with pytest.raises(InputError, match="no streams"):
        trace(tiny_model("llama"), PROMPT, [1, 2], top_k=1)


def test_path_targets_worked_example():
    """Answer x y z w, root x (index 0): tree x -> y -> q, x -> z."""
    x, y, z, w, q = 10, 11, 12, 13, 14
    tree = DraftTree([y, q, z], [0, 1, 0])
    targets = path_targets(tree, [x, y, z, w], 0)
    assert targets == [y, z, -1, -1]
    path, bonus = tree.accept(targets)
    assert path == [0, 1] and bonus == z


def test_replay_of_a_perfect_tree_and_of_none():
    answer = list(range(20, 40))
    # Candidates (k = 1) at row i predict answer[i+1 .. i+3]: every draft is right.
    cand = np.array([[[answer[min(i + j, 19)]] for j in range(1, 4)] for i in range(20)])
    tr = Trace([1, 2] + answer, 2, cand, np.zeros_like(cand, dtype=np.float32))
    rp = replay(tr, budget_drafter(3))
    assert rp.accepted[:4] == [3, 3, 3, 3] and rp.tokens == 20
    none = replay(tr, budget_drafter(0))
    assert none.accepted == [0] * 19 and none.rows == [1] * 19


# Fixed pass costs (seconds by rows) under which the tiny models' controller both drafts
# and steps plainly; with row-cheap costs it drafts whole trees.
COSTS = {"mixed": ({1: 1.0, 2: 1.3, 4: 1.6, 8: 2.2, 16: 3.0},
                   {1: 1.1, 2: 1.4, 4: 1.7, 8: 2.3, 16: 3.1}),
         "cheap rows": ({1: 1.0, 16: 1.05}, {1: 1.05, 16: 1.1})}


@pytest.mark.parametrize("costs", sorted(COSTS))
@pytest.mark.parametrize("temp, depth", [(0.0, 0), (0.0, 4), (0.9, 4)])
def test_controlled_replay_matches_generate_step(monkeypatch, costs, temp, depth):
    """With the same fixed pass costs, the controller replayed from a trace makes the
    choices generate_step's controller makes: pass for pass the same accepted drafts."""
    model = tiny_model("llama", seed=2, streams=STREAMS)
    plain_s, drafting_s = COSTS[costs]
    fixed = PassCosts.measured(plain_s, drafting_s, {1: 1.0, 8: 1.5, 9: 2.0, 16: 2.1})
    monkeypatch.setattr(step_module, "costs_for", lambda model: fixed)
    monkeypatch.setattr(PassCosts, "observe", lambda self, rows, draft, seconds: None)
    sampler = PositionSampler(temp, seed=11) if temp else None
    n = 40
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=n, sampler=sampler,
                                            speculative=False)]
    events = list(generate_step(model, PROMPT, max_tokens=n, sampler=sampler, tree_budget=4,
                                draft_top_k=2, lookup_depth=depth))
    assert [e.token for e in events] == plain
    per_pass = Counter(e.passes for e in events if e.from_draft)
    accepted = [per_pass[p] for p in range(2, events[-1].passes + 1)]
    tr = trace(model, PROMPT, plain, top_k=2, sampler=sampler)
    d = DraftSettings(True, 4, 2, depth, 0.0, 0)
    rp, _ = replay_controlled(tr, d, fixed, NEUTRAL)
    assert rp.accepted == accepted and rp.tokens == n
    if costs == "cheap rows" and not temp:  # drafting pays: drafts are accepted
        assert sum(accepted) > 0


def test_controlled_replay_follows_the_priors():
    """A prior that chains are never accepted keeps the replayed controller from drafting
    chains (the answer repeats, so they would pay); a prior that they always are drafts
    them."""
    answer = [5, 6, 7, 8] * 6
    gamma = 3
    cand = np.full((len(answer), gamma, 1), 1, dtype=np.int64)  # streams always wrong
    tr = Trace([9] + answer, 1, cand, np.full(cand.shape, -5.0, dtype=np.float32))
    costs = PassCosts.measured({1: 1.0, 2: 1.02, 4: 1.05, 8: 1.1}, {1: 1.1, 8: 1.2})
    d = DraftSettings(True, 0, 1, 8, 0.0, 0)

    never = Priors(context_first={n: 0.0 for n in (1, 2, 3, 4)}, context_next=0.0)
    always = Priors(context_first={n: 1.0 for n in (1, 2, 3, 4)}, context_next=1.0)
    rp_never, _ = replay_controlled(tr, d, costs, never)
    rp_always, _ = replay_controlled(tr, d, costs, always)
    assert set(rp_never.rows) == {1}  # never tried, so never learnt otherwise
    assert max(rp_always.rows) > 1 and rp_always.passes < rp_never.passes


def test_chain_rates_count_first_and_next_tokens():
    """A context chain drafted in full: its first token and each next one counted by the
    match it came from, as the controller keeps them; measured_priors takes them."""
    from specstream_mlx.tools.tune import chain_rates, measured_priors

    answer = [5, 6, 7, 8, 5, 6, 7, 9]
    cand = np.zeros((len(answer), 3, 1), dtype=np.int64)
    tr = Trace([1] + answer, 1, cand, np.zeros(cand.shape, dtype=np.float32))
    stats = chain_rates([tr], 8, None, 0, None)
    # Nothing repeats until the second 5 (answer[4]): its 1-gram match drafts the 2 tokens
    # that followed the first 5, [6, 7], both right; the pass ends the answer.
    assert stats == {("context", 1): [1.0, 1.0], "context": [1.0, 1.0]}
    p = measured_priors(NEUTRAL, Setting(3, 8, 0.0, calibration=[0.5, 0.0, 0.0]), stats)
    assert p.context_first[1] == 1.0 and p.context_next == 1.0
    assert p.context_first[2] == NEUTRAL.first("context", 2)  # never drafted: kept
    assert p.stream_calibration == (0.5,) and p.corpus_first[2] == NEUTRAL.first("corpus", 2)


def test_evaluate_predicts_from_costs():
    answer = list(range(20, 40))
    cand = np.array([[[answer[min(i + j, 19)]] for j in range(1, 4)] for i in range(20)])
    tr = Trace([1, 2] + answer, 2, cand, np.zeros_like(cand, dtype=np.float32))
    flat = PassCosts.measured({1: 10.0, 4: 10.0}, {1: 10.0, 4: 10.0}, {1: 1.0, 4: 1.0})
    s = evaluate([tr], Setting(3, 0, 0.0), 1, flat, None)
    # 19 tokens after the first in 5 passes of 4 rows (the last one shorter), equal cost;
    # tokens per pass as bench counts it: 20 tokens in 6 passes (the prefill included)
    assert s.tokens_per_pass == pytest.approx(20 / 6)
    assert s.mean_rows == pytest.approx(19 / 5)
    assert s.predicted_speedup == pytest.approx(19 / 5)
    # per-prompt median: a 3-token prompt takes the prefill and one pass (3 / 2)
    short = Trace([1, 2] + answer[:3], 2, cand[:3], np.zeros_like(cand[:3], dtype=np.float32))
    both = evaluate([tr, short, short], Setting(3, 0, 0.0), 1, flat, None)
    assert both.median_tokens_per_pass == pytest.approx(3 / 2)
    assert both.tokens_per_pass == pytest.approx((20 + 3 + 3) / (6 + 2 + 2))


def test_write_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "speculative_streaming": {"num_streams": 3, "tree_budget": 6}}))
    write_defaults(tmp_path, Setting(2, 8, 0.05))
    block = json.loads((tmp_path / "config.json").read_text())["speculative_streaming"]
    assert block == {"num_streams": 3, "tree_budget": 2, "lookup_depth": 8,
                     "min_draft_prob": 0.05}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="no speculative_streaming"):
        write_defaults(tmp_path, Setting(2, 8, 0.05))


def test_cli_tune_end_to_end(tmp_path, capsys):
    """`specstream tune` on a tiny folder: traces prompts with and without completions,
    prints the best settings per task, writes the JSON and the chosen defaults."""
    from tiny_folder import make_tiny_folder

    from specstream_mlx.cli import main
    from specstream_mlx.jsonl import write_jsonl

    folder = make_tiny_folder(tmp_path / "tiny", streams=STREAMS)[0]
    write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "task": "chat", "prompt": "hi"},
        {"id": "b", "task": "code", "prompt": "def f(x):", "completion": "return x"},
        {"id": "c", "task": "chat", "prompt": "Hello there, how are you?"}])
    rc = main(["tune", "--prompts", str(tmp_path / "p.jsonl"), "--model", str(folder),
               "--max-tokens", "10", "--budgets", "0,2", "--lookup-depths", "0,4",
               "--min-draft-probs", "0", "--rows", "1,2,4", "--write",
               "--json", str(tmp_path / "tune.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "chat: 2 prompts" in out and "all: " in out and "wrote tree_budget" in out
    report = json.loads((tmp_path / "tune.json").read_text())
    assert set(report["results"]) >= {"chat", "all"}
    # budget 0 with lookup 0 is no drafting at all: left out of the grid
    assert len(report["results"]["all"]) == 3
    best = report["best"]
    block = json.loads((folder / "config.json").read_text())["speculative_streaming"]
    assert (block["tree_budget"], block["lookup_depth"]) == (best["tree_budget"],
                                                            best["lookup_depth"])
    assert all(s["tokens_per_pass"] >= 1.0 for s in report["results"]["all"])
    # the calibration of each setting's stream nodes, one ratio per stream depth
    assert all(len(s["calibration"]) == STREAMS.num_streams for s in report["results"]["all"])
    assert "accepted / predicted by depth" in out
    # --write also stores the greedy drafting priors it measured next to the streams
    from specstream_mlx.decoding.priors import read_priors

    priors = read_priors(folder)
    assert priors.greedy.stream_calibration == tuple(c for c in best["calibration"] if c > 0) \
        or not any(best["calibration"])
    assert priors.sampled == NEUTRAL and report["priors"]["context_next"] == \
        priors.greedy.context_next


def test_cli_tune_sampled_writes_only_the_sampling_fields(tmp_path, capsys):
    """`tune --temp`: answers sampled here (a distilled greedy completion is not used),
    the replay at the config's sampled_top_k, and --write stores only the sampling
    fields (budget, top-k, floor), leaving greedy decoding's and the shared depths."""
    from tiny_folder import make_tiny_folder

    from specstream_mlx.cli import main
    from specstream_mlx.jsonl import write_jsonl

    folder = make_tiny_folder(tmp_path / "tiny", streams=StreamArgs(
        num_streams=3, msa_layers=2, sampled_top_k=4))[0]
    write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "task": "chat", "prompt": "hi"},
        {"id": "b", "task": "code", "prompt": "def f(x):", "completion": "return x"}])
    before = json.loads((folder / "config.json").read_text())["speculative_streaming"]
    rc = main(["tune", "--prompts", str(tmp_path / "p.jsonl"), "--model", str(folder),
               "--max-tokens", "10", "--budgets", "2,4", "--lookup-depths", "0",
               "--min-draft-probs", "0,0.3", "--rows", "1,2,4", "--write", "--temp", "0.9",
               "--seed", "5", "--json", str(tmp_path / "tune.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "replaying sampling at temperature 0.9 (seed 5), top-k 4" in out
    assert "wrote sampled_tree_budget " in out and ", sampled_top_k 4, " in out
    report = json.loads((tmp_path / "tune.json").read_text())
    assert (report["temp"], report["seed"], report["top_k"]) == (0.9, 5, 4)
    block = json.loads((folder / "config.json").read_text())["speculative_streaming"]
    assert block["sampled_min_draft_prob"] == report["best"]["min_draft_prob"]
    assert block["sampled_tree_budget"] == report["best"]["tree_budget"]
    assert {k: v for k, v in block.items() if not k.startswith("sampled_")} == {
        k: v for k, v in before.items() if not k.startswith("sampled_")}
    assert main(["tune", "--prompts", str(tmp_path / "p.jsonl"), "--model", str(folder),
                 "--temp", "-1"]) == 2
    assert "temp must be >= 0" in capsys.readouterr().err


def test_cli_tune_on_a_two_turn_file(tmp_path, capsys):
    """`specstream tune` on 'turns' records: each is traced at its last turn, after the
    model's own greedy answer to the first (the prompt bench measures), with the answer
    generated here even when a 'completion' is given; the report names them."""
    from tiny_folder import make_tiny_folder

    from specstream_mlx import load
    from specstream_mlx.cli import main
    from specstream_mlx.generate import encode_messages, encode_turns
    from specstream_mlx.jsonl import write_jsonl

    folder = make_tiny_folder(tmp_path / "tiny", streams=STREAMS)[0]
    records = [{"id": "a", "task": "chat", "turns": ["hi", "Tell me more."]},
               {"id": "b", "task": "chat", "turns": ["Hello!", "Why?"], "completion": "zz"},
               {"id": "c", "task": "code", "prompt": "def f(x):"}]
    write_jsonl(tmp_path / "p.jsonl", records)
    rc = main(["tune", "--prompts", str(tmp_path / "p.jsonl"), "--model", str(folder),
               "--max-tokens", "8", "--budgets", "0,2", "--lookup-depths", "0",
               "--min-draft-probs", "0", "--rows", "1,2", "--json", str(tmp_path / "t.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "2 of 3 records multi-turn, replayed at their last turn" in out
    assert "a#turn2, b#turn2" in out and "chat: 2 prompts" in out
    assert json.loads((tmp_path / "t.json").read_text())["multi_turn"] == ["a#turn2", "b#turn2"]
    model, tokenizer = load(folder)
    traces = load_traces(model, tokenizer, records, 3, 8, progress=False)
    for rec, tr in zip(records[:2], traces, strict=False):
        prompt = encode_turns(model, tokenizer, rec["turns"], 8)
        first = encode_messages(tokenizer, [{"role": "user", "content": rec["turns"][0]}])
        assert tr.tokens[: tr.start] == prompt and len(prompt) > len(first) + 2
        assert prompt[: len(first)] == first
        # the model's own first answer follows the first turn's prompt
        assert prompt[len(first)] == next(generate_step(model, first, max_tokens=1,
                                                        speculative=False)).token
        own = [e.token for e in generate_step(model, prompt, max_tokens=8, speculative=False)]
        assert tr.tokens[tr.start :] == own[: len(tr.tokens) - tr.start]  # not "zz"


def test_cli_tune_bad_prompts(tmp_path, capsys):
    from specstream_mlx.cli import main

    (tmp_path / "p.jsonl").write_text('{"text": "no prompt"}\n')
    assert main(["tune", "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert "need records with a 'prompt'" in capsys.readouterr().err


def test_replay_with_a_corpus_matches_generate_step():
    """Corpus drafts replay pass for pass as generate_step runs them (fixed drafter)."""
    from specstream_mlx.decoding.corpus import SEPARATOR, CorpusIndex

    model = tiny_model("llama", seed=2, streams=STREAMS)
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=40, speculative=False)]
    half = plain[:20]
    corpus = CorpusIndex(np.array([*half, SEPARATOR, *half, SEPARATOR, 5, 6, 7]))
    model.corpus = corpus
    tokens, accepted = decoded(model, 40, tree_budget=2, draft_top_k=2, lookup_depth=4,
                               corpus_depth=6)
    model.corpus = None
    assert tokens == plain and sum(accepted) >= 8  # the corpus holds half the answer
    rp = replay(trace(model, PROMPT, plain, top_k=2), budget_drafter(2, 4, 0.0, corpus, 6))
    assert rp.accepted == accepted


def test_cli_tune_tries_corpus_depths_of_a_folder_with_a_corpus(tmp_path, capsys):
    from tiny_folder import make_tiny_folder

    from specstream_mlx.checkpoint import CORPUS_FILE, save_corpus
    from specstream_mlx.cli import main
    from specstream_mlx.jsonl import write_jsonl

    folder = make_tiny_folder(tmp_path / "tiny", streams=STREAMS)[0]
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "task": "chat", "prompt": "hi"}])
    args = ["tune", "--prompts", str(tmp_path / "p.jsonl"), "--model", str(folder),
            "--max-tokens", "8", "--budgets", "0,2", "--lookup-depths", "0",
            "--min-draft-probs", "0", "--rows", "1,2", "--json", str(tmp_path / "t.json")]
    assert main([*args, "--corpus-depths", "0,4"]) == 2
    assert f"no {CORPUS_FILE}" in capsys.readouterr().err
    save_corpus([[40, 41, 42, 43]] * 3, folder / CORPUS_FILE)
    assert main([*args, "--write"]) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    tried = {(s["tree_budget"], s["corpus_depth"]) for s in report["results"]["all"]}
    assert tried == {(0, 8), (2, 0), (2, 8)}  # the model's default depth and none
    block = json.loads((folder / "config.json").read_text())["speculative_streaming"]
    assert block["corpus_depth"] == report["best"]["corpus_depth"]


def test_replay_counts_the_calibration_by_depth():
    """Accepted / predicted stream nodes per depth: a chain of top-1 candidates (k = 1),
    right at depth 1 only, each predicted with probability 0.5."""
    answer = list(range(20, 40))
    # Row i's streams: answer[i+1] (right), then two tokens never in the answer.
    cand = np.array([[[answer[min(i + 1, 19)]], [99], [98]] for i in range(20)])
    lp = np.full(cand.shape, np.log(0.5), dtype=np.float32)
    tr = Trace([1, 2] + answer, 2, cand, lp)
    rp = replay(tr, budget_drafter(3))
    # 2 tokens a pass from root 0: passes at roots 0, 2, .. 18; the tree is cut to the
    # tokens left (root 16: depth 2, root 18: nothing drafted)
    assert rp.rows == [4] * 8 + [3, 1] and rp.accepted == [1] * 9 + [0]
    assert list(rp.taken) == [0, 9, 0, 0]
    assert list(rp.predicted) == pytest.approx([0, 9 * 0.5, 9 * 0.25, 8 * 0.125])
    flat = PassCosts.measured({1: 10.0, 4: 10.0}, {1: 10.0, 4: 10.0}, {1: 1.0, 4: 1.0})
    s = evaluate([tr], Setting(3, 0, 0.0), 1, flat, None)
    assert s.calibration == [pytest.approx(2.0), 0.0, 0.0]
    perfect = np.array([[[answer[min(i + j, 19)]] for j in range(1, 4)] for i in range(20)])
    s = evaluate([Trace([1, 2] + answer, 2, perfect, np.zeros_like(lp))], Setting(3, 0, 0.0),
                 1, PassCosts.measured({1: 10.0}, {1: 10.0}), None)
    assert s.calibration == [1.0, 1.0, 1.0]
