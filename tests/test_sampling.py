"""PositionSampler: one Gumbel noise per position, so a speculative run draws the same tokens as
plain decoding from the same seed, whatever the tree or the controller chose; and its
draws follow mlx-lm's filtered, tempered distribution."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from specstream_mlx.decoding.drafter import DraftSettings, StreamProposal
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.decoding.step import coupled_noise, generate_step, stream_candidates
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.generate import stream_generate
from specstream_mlx.models.config import StreamArgs

STREAMS = StreamArgs(num_streams=3, msa_layers=2, tree_budget=6, top_k=3)
PROMPT = [3, 17, 42, 9, 4, 88, 23]


def tokens(model, sampler, n=40, **kwargs) -> list[int]:
    return [e.token for e in generate_step(model, PROMPT, max_tokens=n, sampler=sampler,
                                           **kwargs)]


def test_noise_depends_on_seed_and_position_only():
    s = PositionSampler(0.8, seed=7)
    g = np.array(s.noise([5, 9, 5, 6], 20))
    assert g.shape == (4, 20)
    assert np.array_equal(g[0], g[2]) and not np.array_equal(g[0], g[1])
    assert not np.array_equal(g[0], g[3])
    assert np.array_equal(np.array(s.noise([9], 20))[0], g[1])
    assert not np.array_equal(np.array(PositionSampler(0.8, seed=8).noise([5], 20))[0], g[0])


def test_noise_after_a_device_position_is_the_noise_of_the_next_positions():
    s = PositionSampler(0.8, seed=7)
    after = s.noise_after(mx.array(4, dtype=mx.int32), 3, 20)
    assert np.array_equal(np.array(after), np.array(s.noise([5, 6, 7], 20)))


def test_coupled_candidates_rank_by_the_samplers_perturbed_scores():
    """With the sampler's noise, a stream's candidates are the best of log q / T + noise
    (its first is the token the target would draw were p = q), log-probabilities those of
    the softmax of the perturbed scores; the draft vocabulary's columns of the noise are
    the ones that meet its tokens."""
    sa = StreamArgs(num_streams=3, msa_layers=2, draft_vocab_size=40)
    model = tiny_model("llama", seed=8, streams=sa)
    vocab = model.args.vocab_size
    model.streams.draft_vocab = mx.array(np.random.default_rng(0).permutation(vocab)[:40]
                                         .astype(np.int32))
    hs = mx.random.normal((3, model.args.hidden_size), key=mx.random.key(2))
    s = PositionSampler(0.7, seed=3)
    full = s.noise([10, 11, 12], vocab)
    noise = coupled_noise(model, full)
    assert np.array_equal(np.array(noise), np.array(full)[:, np.array(model.streams.draft_vocab)])
    cand, lp = stream_candidates(model, hs, 4, temp=0.7, noise=noise)
    logq = np.array(model.draft_logits(hs), dtype=np.float64)
    logq -= np.log(np.exp(logq - logq.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        + logq.max(-1, keepdims=True)
    scores = logq / 0.7 + np.array(noise, dtype=np.float64)
    best = np.argsort(-scores, axis=-1)[:, :4]
    vocab_ids = np.array(model.streams.draft_vocab)
    assert np.array(cand).tolist() == vocab_ids[best].tolist()
    want = scores - np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1,
                           keepdims=True)) - scores.max(-1, keepdims=True)
    np.testing.assert_allclose(np.array(lp), np.take_along_axis(want, best, -1), rtol=1e-4,
                               atol=1e-4)
    plain, _ = stream_candidates(model, hs, 4)  # by probability: another order
    assert np.array(plain).tolist() != np.array(cand).tolist()


def test_rows_at_one_position_draw_with_one_noise():
    """Equal rows at equal positions sample the same token; a row's token does not depend
    on the other rows of the pass."""
    s = PositionSampler(1.0, seed=3)
    logits = mx.random.normal((5, 50), key=mx.random.key(1))
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    pos = np.array([10, 11, 12, 13, 14])
    together = np.array(s(lp, pos)).tolist()
    alone = [int(np.array(s(lp[i:i + 1], pos[i:i + 1]))[0]) for i in range(5)]
    assert together == alone
    same = mx.broadcast_to(lp[:1], (3, 50))
    assert len(set(np.array(s(same, np.array([10, 10, 10]))).tolist())) == 1


@pytest.mark.parametrize("options", [
    {"temp": 1.0}, {"temp": 0.5}, {"temp": 1.3, "top_p": 0.8}, {"temp": 0.9, "min_p": 0.2},
    {"temp": 1.0, "top_k": 4},
])
def test_draws_follow_the_filtered_tempered_softmax(options):
    """20,000 positions over one row of log-probabilities: frequencies within 0.02 total
    variation of softmax(filtered / temp), and no filtered token ever drawn."""
    logits = mx.random.normal((1, 12), key=mx.random.key(4)) * 1.5
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    n = 20_000
    s = PositionSampler(seed=11, **options)
    drawn = np.array(s(mx.broadcast_to(lp, (n, 12)), np.arange(n)))
    freq = np.bincount(drawn, minlength=12) / n
    f = lp
    if options.get("top_p"):
        f = apply_top_p(f, options["top_p"])
    if options.get("min_p"):
        f = apply_min_p(f, options["min_p"])
    if options.get("top_k"):
        f = apply_top_k(f, options["top_k"])
    want = np.array(mx.softmax(f / options["temp"], axis=-1))[0]
    assert 0.5 * np.abs(freq - want).sum() < 0.02
    assert np.all(freq[want == 0] == 0)


@pytest.mark.parametrize("kwargs", [
    {}, {"adaptive": False}, {"tree_budget": 1}, {"tree_budget": 12, "draft_top_k": 4},
    {"lookup_depth": 0}, {"min_draft_prob": 0.0, "adaptive": False},
])
@pytest.mark.parametrize("temp", [0.7, 1.0])
def test_speculative_sampling_draws_what_plain_decoding_draws(kwargs, temp):
    """Same seed, same tokens: the tree (or the controller's plan) changes how many passes
    it takes, never what is drawn."""
    model = tiny_model("llama", seed=5, streams=STREAMS)
    sampler = PositionSampler(temp, seed=1234)
    expected = tokens(model, sampler, speculative=False)
    got = tokens(model, sampler, **kwargs)
    assert got == expected
    assert tokens(model, PositionSampler(temp, seed=1235), speculative=False) != expected


def test_a_perfect_drafter_is_accepted_when_sampling():
    """A drafter that proposes the tokens plain sampling will draw: every draft accepted,
    the same tokens, in fewer passes."""
    model = tiny_model("llama", seed=5, streams=STREAMS)
    sampler = PositionSampler(1.0, seed=99)
    expected = tokens(model, sampler, n=30, speculative=False)

    def oracle(draft: StreamProposal, history: list[int]) -> DraftTree:
        done = len(history) - len(PROMPT)
        chain = expected[done: done + 4]
        return DraftTree(chain, list(range(len(chain))))

    events = list(generate_step(model, PROMPT, max_tokens=30, sampler=sampler,
                                drafter=oracle))
    assert [e.token for e in events] == expected
    assert events[-1].passes <= 8


@pytest.mark.parametrize("seed", range(4))
def test_partly_right_trees_draw_what_plain_decoding_draws(seed):
    """Trees that hold the token plain sampling will draw with some probability, beside
    wrong siblings and wrong children: paths are accepted to every depth and rejected at
    every depth, and the tokens stay plain sampling's."""
    model = tiny_model("llama", seed=5, streams=STREAMS)
    sampler = PositionSampler(0.9, seed=500 + seed)
    expected = tokens(model, sampler, n=48, speculative=False)
    rng = np.random.default_rng(seed)
    V = model.args.vocab_size

    def noisy_oracle(draft: StreamProposal, history: list[int]) -> DraftTree:
        done = len(history) - len(PROMPT)
        toks, parents, node = [], [], 0
        for want in expected[done: done + 4]:
            wrong = (want + 1 + int(rng.integers(V - 1))) % V
            right = rng.random() < 0.6
            pair = [want, wrong] if rng.random() < 0.5 else [wrong, want]
            toks += pair
            parents += [node, node]
            if not right:
                break
            node = len(toks) - pair[::-1].index(want)  # the right child's node index
        return DraftTree(toks, parents)

    events = list(generate_step(model, PROMPT, max_tokens=48, sampler=sampler,
                                drafter=noisy_oracle))
    assert [e.token for e in events] == expected
    accepted = [e.from_draft for e in events]
    assert 0.2 < sum(accepted) / len(accepted) < 0.9


def test_stream_generate_seeded_runs_repeat_and_match_plain():
    """The public API: after mx.random.seed(s) a run repeats itself, and speculative
    decoding draws what plain decoding draws."""
    model = tiny_model("llama", seed=5, streams=STREAMS)

    class Tok:  # ids in, ids out: stream_generate needs only these of a tokenizer
        eos_token_ids = []

        class detokenizer:
            last_segment = ""

            @staticmethod
            def reset(): ...

            @staticmethod
            def add_token(t): ...

            @staticmethod
            def finalize(): ...

    def run(speculative):
        mx.random.seed(21)
        return [r.token for r in stream_generate(model, Tok(), PROMPT, max_tokens=24,
                                                 temp=0.8, top_p=0.9, chat=False,
                                                 speculative=speculative)]

    first = run(True)
    assert first == run(True) == run(False)


@pytest.mark.parametrize("options, message", [
    ({"temp": 0.0}, "temp"), ({"temp": -1.0}, "temp"), ({"temp": 1.0, "top_p": 1.5}, "top_p"),
    ({"temp": 1.0, "seed": -1}, "seed"), ({"temp": 1.0, "seed": 2**32}, "seed"),
])
def test_bad_sampler_settings_raise(options, message):
    with pytest.raises(ValueError, match=message):
        PositionSampler(**options)


def test_sampling_drafts_wider_from_its_own_defaults():
    """A sampled generation takes the config's sampled_tree_budget (when set),
    sampled_top_k and sampled_min_draft_prob (explicit arguments still win); greedy keeps
    tree_budget, top_k and min_draft_prob."""
    sa = StreamArgs(num_streams=3, msa_layers=2, tree_budget=6, top_k=3, min_draft_prob=0.2,
                    sampled_top_k=5, sampled_min_draft_prob=0.05, sampled_tree_budget=12)
    model = tiny_model("llama", seed=5, streams=sa)
    d = DraftSettings.resolve(model, True, None, None, None, None, sampled=True)
    assert (d.budget, d.top_k, d.min_prob) == (12, 5, 0.05)
    d = DraftSettings.resolve(model, True, 4, 2, None, 0.3, sampled=True)
    assert (d.budget, d.top_k, d.min_prob) == (4, 2, 0.3)
    d = DraftSettings.resolve(model, True, None, None, None, None)
    assert (d.budget, d.top_k, d.min_prob) == (6, 3, 0.2)
    unset = tiny_model("llama", seed=5, streams=StreamArgs(num_streams=3, msa_layers=2,
                                                           tree_budget=6))
    assert DraftSettings.resolve(unset, True, None, None, None, None, sampled=True).budget == 6
    widths = []

    def recording(draft: StreamProposal, history: list[int]) -> DraftTree:
        widths.append(draft.candidates.shape)
        return DraftTree()

    tokens(model, PositionSampler(0.7, seed=3), n=6, drafter=recording)
    tokens(model, None, n=6, drafter=recording)
    assert set(widths[:5]) == {(3, 5)} and set(widths[5:]) == {(3, 3)}


def test_sampled_top_k_stops_at_the_draft_vocabulary():
    sa = StreamArgs(num_streams=2, msa_layers=1, top_k=2, sampled_top_k=64,
                    draft_vocab_size=12)
    model = tiny_model("llama", seed=5, streams=sa)
    assert DraftSettings.resolve(model, True, None, None, None, None, sampled=True).top_k == 12
