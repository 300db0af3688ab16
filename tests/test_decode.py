"""The decode loop's invariants: greedy speculative == greedy plain, the cache after every
step == plain decoding's cache, early breaks leave the cache consistent, sampling keeps
the distribution, and bad input is refused."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_CONFIGS, reference_model, tiny_model
from mlx.utils import tree_flatten

from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.drafter import StreamProposal, budget_drafter
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.decoding.step import (
    generate_step,
    last_accepted,
    prefill,
    root_streams,
    speculative_step,
    stream_candidates,
    verify,
)
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError
from specstream_mlx.models.config import StreamArgs

PROMPT = [3, 17, 42, 8, 91, 5]
STREAMS = StreamArgs(num_streams=3, msa_layers=2)


@contextmanager
def custom_config(base: str, **overrides):
    """Temporarily register a variant of a tiny config (for tiny_model) under a new name."""
    name = f"{base}-custom"
    TINY_CONFIGS[name] = {**TINY_CONFIGS[base], **overrides}
    try:
        yield name
    finally:
        del TINY_CONFIGS[name]


def tokens_of(events) -> list[int]:
    return [e.token for e in events]


def plain(model, prompt: list[int], n: int) -> list[int]:
    return tokens_of(generate_step(model, prompt, max_tokens=n, speculative=False))


def plain_cache(model, tokens: list[int]) -> KVCache:
    """The cache of plain causal decoding over `tokens`."""
    cache = KVCache(len(model.layers))
    model(mx.array([tokens]), cache=cache)
    cache.commit(range(len(tokens)))
    mx.eval(cache.state())
    return cache


def assert_cache_matches(cache: KVCache, model, tokens: list[int]) -> None:
    """Committed K/V of every layer equal plain decoding's over `tokens` (offset included)."""
    assert cache.offset == len(tokens)
    ref = plain_cache(model, tokens)
    n = len(tokens)
    for layer in range(len(model.layers)):
        pairs = (cache.keys[layer], ref.keys[layer]), (cache.values[layer], ref.values[layer])
        for got, want in pairs:
            np.testing.assert_allclose(
                np.array(got[..., :n, :]), np.array(want[..., :n, :]), atol=1e-4, rtol=0
            )


def perfect_drafter(
    reference: list[int], vocab: int, depth: int = 3, first: bool = True, wrong: int = 2
):
    """A drafter that knows the plain greedy continuation `reference` (prompt included).

    Each level holds the true next token and `wrong` wrong siblings; with first=False the
    true token is the last sibling, so the accepted path is not contiguous in the flat tree.
    A wrong branch also carries the true next-next token, which must not be accepted.
    """

    def drafter(draft: StreamProposal, history: list[int]) -> DraftTree:
        assert draft.candidates.shape == draft.logprobs.shape
        truth = reference[len(history) : len(history) + depth]
        tokens, parents, parent = [], [], 0
        for t in truth:
            others = [(t + d) % vocab for d in range(1, wrong + 1)]
            for tok in ([t] + others) if first else (others + [t]):
                tokens.append(tok)
                parents.append(parent)
                if tok == t:
                    true_node = len(tokens)
            parent = true_node
        if len(truth) > 1 and wrong:
            decoy_parent = 2 if first else 1  # a wrong node at depth 1
            tokens.append(truth[1])
            parents.append(decoy_parent)
        return DraftTree(tokens, parents)

    return drafter


# --- greedy speculative == greedy plain ---------------------------------------------------


def test_plain_decoding_matches_mlx_lm(arch):
    """The plain baseline itself is greedy decoding of mlx-lm's model on the same weights."""
    model = tiny_model(arch, seed=0)
    ref = reference_model(arch, model)
    seq = list(PROMPT)
    for _ in range(12):
        seq.append(int(mx.argmax(ref(mx.array([seq]))[0, -1])))
    assert plain(model, PROMPT, 12) == seq[len(PROMPT) :]


# (tree_budget, top_k, num_streams, msa_layers): every budget with every top_k, and each
# stream count and MSA depth twice.
GRID = [
    (0, 1, 1, 1),
    (0, 3, 2, 4),
    (1, 1, 3, 2),
    (1, 3, 4, 3),
    (4, 1, 2, 3),
    (4, 3, 3, 4),
    (12, 1, 4, 1),
    (12, 3, 1, 2),
]


@pytest.mark.parametrize("budget, top_k, num_streams, msa_layers", GRID)
def test_greedy_speculative_equals_plain(arch, budget, top_k, num_streams, msa_layers):
    """With random untrained streams, speculative greedy output is plain greedy output."""
    sa = StreamArgs(num_streams=num_streams, msa_layers=msa_layers)
    model = tiny_model(arch, seed=budget + 7 * num_streams, streams=sa)
    expected = plain(model, PROMPT, 32)
    events = list(generate_step(model, PROMPT, max_tokens=32, tree_budget=budget,
                                  draft_top_k=top_k))
    assert tokens_of(events) == expected
    passes = [e.passes for e in events]
    assert passes[0] == 1 and passes == sorted(passes) and passes[-1] <= len(events)
    if budget == 0:
        assert not any(e.from_draft for e in events) and passes[-1] == len(events)


@pytest.mark.parametrize("first", [True, False], ids=["rank0", "last-sibling"])
def test_perfect_drafter(arch, first):
    """A drafter holding the true next 3 tokens (among wrong siblings) is fully accepted:
    same output as plain decoding, mostly drafted tokens, about 4 tokens per pass."""
    model = tiny_model(arch, seed=1, streams=STREAMS)
    n = 33
    reference = PROMPT + plain(model, PROMPT, n + 4)
    drafter = perfect_drafter(reference, model.args.vocab_size, first=first)
    events = list(generate_step(model, PROMPT, max_tokens=n, drafter=drafter))
    assert tokens_of(events) == reference[len(PROMPT) : len(PROMPT) + n]
    assert sum(e.from_draft for e in events) == 24  # 8 passes of 3 drafted + 1 bonus
    assert len(events) / events[-1].passes > 3.5
    # every pass ends with its correction (bonus) token, never a drafted one
    for a, b in zip(events, events[1:], strict=False):
        assert b.passes == a.passes or not a.from_draft


def test_model_without_streams_decodes_plainly():
    """speculative=True on a model without streams is plain decoding: one pass per token."""
    model = tiny_model("qwen2", seed=2)
    events = list(generate_step(model, PROMPT, max_tokens=16, speculative=True))
    assert tokens_of(events) == plain(model, PROMPT, 16)
    assert [e.passes for e in events] == list(range(1, 17))
    assert not any(e.from_draft for e in events)


def test_speculative_false_ignores_streams():
    """speculative=False on a model with streams never drafts."""
    model = tiny_model("qwen3", seed=2, streams=STREAMS)
    events = list(generate_step(model, PROMPT, max_tokens=16, speculative=False))
    assert [e.passes for e in events] == list(range(1, 17))
    assert not any(e.from_draft for e in events)


def test_chunked_prefill_is_equivalent():
    """Prefill in small chunks gives the same tokens and the same cache."""
    model = tiny_model("llama3", seed=3, streams=STREAMS)
    prompt = PROMPT * 3
    expected = tokens_of(generate_step(model, prompt, max_tokens=12))
    cache = KVCache(len(model.layers))
    got = list(generate_step(model, prompt, max_tokens=12, prefill_chunk=4, cache=cache))
    assert tokens_of(got) == expected
    assert_cache_matches(cache, model, (prompt + expected)[: cache.offset])


# --- the cache after each step --------------------------------------------------------------


def drive(model, prompt: list[int], drafter, steps: int, top_k: int = 3):
    """prefill + speculative_step by hand, checking the cache and the draft after each step."""
    cache = KVCache(len(model.layers))
    logits, hs, h_last = prefill(model, cache, prompt, 512, True)
    root = int(mx.argmax(logits))
    assert root == plain(model, prompt, 1)[0]
    if hs is None:  # conditioned streams draft once the root is known
        assert model.stream_args.conditioned
        hs = root_streams(model, cache, h_last, mx.array(root))
    cand, lp = stream_candidates(model, hs, top_k)
    draft = StreamProposal(np.array(cand), np.array(lp))
    history = prompt + [root]
    accepted = 0
    for _ in range(steps):
        assert_cache_matches(cache, model, history[:-1])
        tree = drafter(draft, history)
        result = speculative_step(model, cache, root, tree, None, top_k)
        assert result.tokens == plain(model, history, len(result.tokens))
        accepted += result.num_drafted
        history += result.tokens
        root, draft = result.tokens[-1], result.draft
        assert_cache_matches(cache, model, history[:-1])
        # the next draft is the streams' top-k at the last committed position (given the
        # root after it, when conditioned)
        _, streams = model(mx.array([history[:-1]]), stream_rows=mx.array([len(history) - 2]),
                           next_tokens=mx.array([[root]]))
        logprobs = np.array(streams[0, 0] - mx.logsumexp(streams[0, 0], axis=-1, keepdims=True))
        want = np.argsort(-logprobs, axis=-1)[:, :top_k]
        np.testing.assert_array_equal(draft.candidates, want)
        np.testing.assert_allclose(
            draft.logprobs, np.take_along_axis(logprobs, want, -1), atol=1e-4
        )
    return accepted


@pytest.mark.parametrize("first", [True, False], ids=["rank0", "last-sibling"])
def test_cache_after_each_step_perfect(arch, first):
    """After every fully accepted step (contiguous or copied path) the committed cache equals
    plain decoding's, and the next draft comes from the last accepted node's streams."""
    model = tiny_model(arch, seed=4, streams=STREAMS)
    reference = PROMPT + plain(model, PROMPT, 40)
    drafter = perfect_drafter(reference, model.args.vocab_size, first=first)
    assert drive(model, PROMPT, drafter, steps=6) == 18


def test_cache_after_each_step_random_streams(arch):
    """Same invariant with the default budget drafter on random streams (partial accepts)."""
    model = tiny_model(arch, seed=5, streams=StreamArgs(num_streams=2, msa_layers=3))
    drive(model, PROMPT, budget_drafter(6), steps=6)


@pytest.mark.parametrize("budget", [0, 6])
def test_conditioned_streams_draft_as_teacher_forcing(arch, budget):
    """Streams conditioned on the next token (next_token_rank): after the prefill and
    every step, plain ones (budget 0) included, the draft is the teacher-forced streams'
    at the last committed position given the root, and the cache is plain decoding's."""
    sa = StreamArgs(num_streams=2, msa_layers=3, next_token_rank=4)
    model = tiny_model(arch, seed=5, streams=sa)
    drive(model, PROMPT, budget_drafter(budget), steps=6)


@pytest.mark.parametrize("budget", [2, 8])
def test_greedy_with_conditioned_streams_equals_plain(arch, budget):
    sa = StreamArgs(num_streams=3, msa_layers=2, next_token_rank=4)
    model = tiny_model(arch, seed=budget, streams=sa)
    events = list(generate_step(model, PROMPT, max_tokens=32, tree_budget=budget))
    assert tokens_of(events) == plain(model, PROMPT, 32)


def test_next_token_conditioning_changes_drafts_and_starts_neutral():
    """The next token moves the stream rows; a fresh projection (up = 0) does not, so
    warm-started streams keep their output."""
    base = tiny_model("llama", seed=3, streams=STREAMS)
    model = tiny_model("llama", seed=3, streams=replace(STREAMS, next_token_rank=4))
    tokens, rows = mx.array([PROMPT]), mx.array([2, 4])
    with pytest.raises(ValueError, match="pass next_tokens"):
        model(tokens, stream_rows=rows)
    _, a = model(tokens, stream_rows=rows, next_tokens=mx.array([[5, 9]]))
    _, b = model(tokens, stream_rows=rows, next_tokens=mx.array([[6, 9]]))
    assert not np.allclose(np.array(a[0, 0]), np.array(b[0, 0]))
    np.testing.assert_allclose(np.array(a[0, 1]), np.array(b[0, 1]), rtol=1e-5, atol=1e-5)
    model.load_weights(list(tree_flatten(base.parameters())), strict=False)
    model.streams.next_token_up = mx.zeros_like(model.streams.next_token_up)
    _, c = model(tokens, stream_rows=rows, next_tokens=mx.array([[5, 9]]))
    _, d = base(tokens, stream_rows=rows)
    np.testing.assert_allclose(np.array(c), np.array(d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_last_accepted_agrees_with_tree_walk(seed):
    """The on-device last-accepted node is the end of the host-side accept walk."""
    rng = np.random.default_rng(seed)
    cands = np.stack([rng.permutation(5)[:3] for _ in range(3)])
    logprobs = -np.sort(rng.exponential(size=(3, 3)), axis=1)
    tree = DraftTree.from_candidates(cands, logprobs, 10)
    for _ in range(20):
        targets = rng.integers(0, 5, size=len(tree)).tolist()
        path, _ = tree.accept(targets)
        node = last_accepted(
            mx.array([7] + tree.tokens),
            mx.array(targets),
            mx.array([0] + tree.parents),
            mx.array(tree.mask),
            mx.array(tree.depths + 11),
        )
        assert node.item() == path[-1]


# --- early exit -----------------------------------------------------------------------------


def break_after(model, k: int, **kwargs) -> tuple[KVCache, list[int]]:
    """Consume k tokens of generate_step with a given cache, then close the generator."""
    cache = KVCache(len(model.layers))
    gen = generate_step(model, PROMPT, max_tokens=40, cache=cache, **kwargs)
    got = [next(gen).token for _ in range(k)]
    gen.close()
    return cache, got


@pytest.mark.parametrize("mode", ["plain", "random", "perfect"])
def test_early_break_leaves_consistent_cache(mode):
    """After the caller stops, the cache holds plain decoding's K/V of the prompt and the
    yielded tokens (the last one may be pending, not yet fed), nothing more."""
    model = tiny_model("qwen3", seed=6, streams=STREAMS)
    reference = PROMPT + plain(model, PROMPT, 50)
    kwargs = {
        "plain": {"speculative": False},
        "random": {"tree_budget": 6},
        "perfect": {"drafter": perfect_drafter(reference, 97, first=False)},
    }[mode]
    for k in range(1, 10):
        cache, got = break_after(model, k, **kwargs)
        assert got == reference[len(PROMPT) : len(PROMPT) + k]
        assert len(PROMPT) + k - 1 <= cache.offset <= len(PROMPT) + k
        assert_cache_matches(cache, model, reference[: cache.offset])


def test_early_break_offset_rule_is_consistent():
    """The cache offset after an early break is the same function of the tokens yielded,
    wherever inside a pass the break falls (here: after the prefill's token, and after the
    first drafted token of a pass)."""
    model = tiny_model("qwen3", seed=6, streams=STREAMS)
    reference = PROMPT + plain(model, PROMPT, 50)
    drafter = perfect_drafter(reference, 97)
    extra = {break_after(model, k, drafter=drafter)[0].offset - len(PROMPT) - k for k in (1, 2)}
    assert len(extra) == 1, f"offset - len(prompt) - yielded was {sorted(extra)}"


def test_max_tokens_leaves_consistent_cache():
    """Running to max_tokens leaves the same kind of cache as an early break."""
    model = tiny_model("llama", seed=7, streams=STREAMS)
    reference = PROMPT + plain(model, PROMPT, 30)
    drafter = perfect_drafter(reference, 97)
    for n in (1, 4, 5, 6, 9):
        cache = KVCache(len(model.layers))
        got = tokens_of(generate_step(model, PROMPT, max_tokens=n, drafter=drafter, cache=cache))
        assert got == reference[len(PROMPT) : len(PROMPT) + n]
        assert len(PROMPT) + n - 1 <= cache.offset <= len(PROMPT) + n
        assert_cache_matches(cache, model, reference[: cache.offset])


# --- sampling -------------------------------------------------------------------------------


def exact_distribution(model, prompt: list[int], temp: float = 1.0) -> np.ndarray:
    """Joint probability (V, V, V) of the first three tokens sampled at `temp`, from the
    softmax."""
    V = model.args.vocab_size
    grid = np.array([[a, b] for a in range(V) for b in range(V)])
    p1 = mx.softmax(model(mx.array([prompt]))[0][0, -1] / temp)
    p2 = mx.softmax(model(mx.array([prompt + [a] for a in range(V)]))[0][:, -1] / temp,
                    axis=-1)
    seqs = mx.concatenate(
        [mx.broadcast_to(mx.array(prompt), (V * V, len(prompt))), mx.array(grid)], axis=1
    )
    p3 = mx.softmax(model(seqs)[0][:, -1] / temp, axis=-1)
    p1, p2, p3 = (np.array(p, dtype=np.float64) for p in (p1, p2, p3))
    return p1[:, None, None] * p2[:, :, None] * p3.reshape(V, V, V)


def empirical(model, prompt, runs: int, seed: int, temp: float = 1.0,
              **kwargs) -> tuple[np.ndarray, float]:
    """Counts (V, V, V) of the first three tokens sampled at `temp` over seeded runs, and
    the fraction of tokens 2 and 3 that came from a draft."""
    V = model.args.vocab_size
    mx.random.seed(seed)
    counts = np.zeros((V, V, V))
    drafted = 0
    for _ in range(runs):
        sampler = PositionSampler.drawn(temp)
        events = list(generate_step(model, prompt, max_tokens=3, sampler=sampler, **kwargs))
        counts[tuple(e.token for e in events)] += 1
        drafted += sum(e.from_draft for e in events)
    return counts, drafted / (2 * runs)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; cells expecting < 5 are pooled."""
    expected = probs.ravel() * counts.sum()
    observed = counts.ravel()
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(((obs - exp)[keep] ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def assert_same_distribution(counts: np.ndarray, joint: np.ndarray, tv_max: float) -> None:
    """Marginals of tokens 1..3 within `tv_max` total variation of the exact ones, and the
    joint of tokens 2 and 3 passing a chi-square test at about 6 sigma."""
    freq = counts / counts.sum()
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        tv = 0.5 * np.abs(freq.sum(others) - joint.sum(others)).sum()
        assert tv < tv_max, f"token {axis + 1}: total variation {tv:.3f}"
    stat, df = chi_square(counts.sum(0), joint.sum(0))
    assert stat < df + 6 * np.sqrt(2 * df), f"tokens 2-3: chi-square {stat:.1f}, df {df}"


def every_token_drafter(vocab: int):
    """All tokens as siblings at depth 1: token 2 is always drafted, so tokens 2 and 3
    always come from the same pass (sensitive to samples shared across tree rows)."""
    return lambda draft, history: DraftTree(list(range(vocab)), [0] * vocab)


@pytest.fixture(scope="module")
def sampling_model():
    """A llama with 8 tokens and 2 layers, its prompt, and the exact joint distribution."""
    sa = StreamArgs(num_streams=2, msa_layers=1, top_k=3, tree_budget=6)
    with custom_config("llama", vocab_size=8, num_hidden_layers=2) as name:
        model = tiny_model(name, seed=0, streams=sa)
    prompt = [4, 5, 6, 7]
    joint = exact_distribution(model, prompt)
    assert joint.sum((1, 2)).max() < 0.7 and joint.sum((0, 1)).max() < 0.7  # not near-greedy
    return model, prompt, joint


@pytest.mark.parametrize("drafter", ["streams", "every-token", "controller"])
def test_sampling_keeps_the_distribution(sampling_model, drafter):
    """Speculative sampling (random streams with a branching tree, every token drafted, or
    the controller's timed choices) gives the model's exact distribution of the first
    three tokens."""
    model, prompt, joint = sampling_model
    kwargs = {"streams": {"adaptive": False}, "controller": {},
              "every-token": {"drafter": every_token_drafter(8)}}[drafter]
    counts, drafted = empirical(model, prompt, 1000, seed=11, **kwargs)
    if drafter == "every-token":
        assert drafted >= 0.5
    elif drafter == "streams":
        assert 0.2 < drafted < 0.8  # acceptance and rejection both exercised
    assert_same_distribution(counts, joint, 0.08)


def test_conditioned_streams_keep_the_distribution():
    """Streams conditioned on the sampled next token (their rows run after the sample)
    still give the model's exact distribution of the first three tokens."""
    sa = StreamArgs(num_streams=2, msa_layers=1, top_k=3, tree_budget=6, next_token_rank=2)
    with custom_config("llama", vocab_size=8, num_hidden_layers=2) as name:
        model = tiny_model(name, seed=0, streams=sa)
    prompt = [4, 5, 6, 7]
    counts, drafted = empirical(model, prompt, 1000, seed=17, adaptive=False)
    assert 0.05 < drafted < 0.9  # acceptance and rejection both exercised
    assert_same_distribution(counts, exact_distribution(model, prompt), 0.08)


def test_tempered_drafts_keep_the_distribution(sampling_model):
    """At temperature 0.6, with the drafts ranked at that temperature, the tokens still
    follow the tempered distribution exactly: tempering changes which nodes are drafted,
    never how they are accepted."""
    model, prompt, _ = sampling_model
    joint = exact_distribution(model, prompt, temp=0.6)
    counts, drafted = empirical(model, prompt, 1000, seed=13, temp=0.6, adaptive=False)
    assert drafted > 0.2
    assert_same_distribution(counts, joint, 0.08)


def test_stream_candidates_at_a_temperature():
    """Tempered candidates: the same tokens in the same order, log-probabilities of the
    softmax of logits / temp (sharper below 1)."""
    model = tiny_model("llama", seed=8, streams=STREAMS)
    hs = mx.random.normal((3, model.args.hidden_size), key=mx.random.key(2))
    cand, lp = stream_candidates(model, hs, 4)
    cand_t, lp_t = stream_candidates(model, hs, 4, temp=0.5)
    assert np.array(cand).tolist() == np.array(cand_t).tolist()
    logits = np.array(model.draft_logits(hs), dtype=np.float64) / 0.5
    want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                            keepdims=True)) - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(np.array(lp_t), np.take_along_axis(want, np.array(cand), -1),
                               rtol=1e-4, atol=1e-4)
    assert np.all(np.array(lp_t)[:, 0] > np.array(lp)[:, 0])  # the best gets more mass


def test_plain_sampling_matches_exact(sampling_model):
    """Plain sampling agrees with the same exact distribution (checks the yardstick)."""
    model, prompt, joint = sampling_model
    counts, drafted = empirical(model, prompt, 400, seed=12, speculative=False)
    assert drafted == 0
    assert_same_distribution(counts, joint, 0.12)


# --- input checks and the context limit -----------------------------------------------------


@pytest.mark.parametrize(
    "prompt, max_tokens, message",
    [
        ([], 8, "empty"),
        (PROMPT, 0, "max_tokens"),
        (PROMPT, -3, "max_tokens"),
        (list(range(10)) * 52, 8, "context"),  # 520 tokens > 512
        (list(range(8)) * 64, 8, "context"),  # exactly 512: no room for a token
    ],
)
def test_bad_input_raises(prompt, max_tokens, message):
    """Invalid requests raise InputError with a message naming the problem."""
    model = tiny_model("llama", seed=0, streams=STREAMS)
    with pytest.raises(InputError, match=message):
        next(generate_step(model, prompt, max_tokens=max_tokens))


@pytest.mark.parametrize("options, message", [
    ({"lookup_depth": -1}, "lookup_depth"), ({"min_draft_prob": 1.5}, "min_draft_prob"),
    ({"min_draft_prob": -0.1}, "min_draft_prob"),
])
def test_bad_draft_options_raise(options, message):
    model = tiny_model("llama", seed=0, streams=STREAMS)
    with pytest.raises(InputError, match=message):
        next(generate_step(model, PROMPT, max_tokens=4, **options))


@pytest.mark.parametrize("min_prob", [0.01, 0.3, 1.0])
def test_greedy_speculative_with_a_probability_floor_equals_plain(arch, min_prob):
    model = tiny_model(arch, seed=12, streams=STREAMS)
    expected = plain(model, PROMPT, 24)
    events = list(generate_step(model, PROMPT, max_tokens=24, tree_budget=8,
                                min_draft_prob=min_prob))
    assert tokens_of(events) == expected
    if min_prob == 1.0:  # nothing is that sure: every pass is a plain one
        assert events[-1].passes == len(events)


def recorded_positions(model, monkeypatch) -> list[int]:
    """Record the largest main-row position of every pass."""
    seen: list[int] = []
    lower = model.lower

    def spy(tokens, positions, *args, **kwargs):
        seen.append(int(mx.max(positions)))
        return lower(tokens, positions, *args, **kwargs)

    monkeypatch.setattr(model, "lower", spy)
    return seen


@pytest.mark.parametrize("depth", [1, 3])
def test_context_limit_stops_cleanly(monkeypatch, depth):
    """Near max_position_embeddings generation ends without error, never feeds a position
    past the context, and agrees with plain decoding on every token plain decoding makes."""
    context = 40
    with custom_config("llama", max_position_embeddings=context) as name:
        model = tiny_model(name, seed=8, streams=STREAMS)
    seen = recorded_positions(model, monkeypatch)
    for length in range(context - 12, context):
        prompt = [(7 * i + 3) % 97 for i in range(length)]
        expected = plain(model, prompt, 100)
        assert len(prompt) + len(expected) == context
        drafter = perfect_drafter(prompt + expected + [0] * 4, 97, depth=depth, wrong=0)
        for kwargs in ({"drafter": drafter}, {"tree_budget": 12}):
            seen.clear()
            cache = KVCache(len(model.layers))
            got = tokens_of(generate_step(model, prompt, max_tokens=100, cache=cache, **kwargs))
            assert got[: len(expected)] == expected
            assert max(seen) < context and cache.offset <= context


def test_context_limit_same_length_as_plain():
    """Speculative and plain decoding stop at the same token count near the context limit."""
    context = 40
    with custom_config("llama", max_position_embeddings=context) as name:
        model = tiny_model(name, seed=8, streams=STREAMS)
    prompt = [(7 * i + 3) % 97 for i in range(30)]
    expected = plain(model, prompt, 100)
    drafter = perfect_drafter(prompt + expected + [0] * 4, 97, depth=1, wrong=0)
    assert tokens_of(generate_step(model, prompt, max_tokens=100, drafter=drafter)) == expected


# --- draft vocabulary -----------------------------------------------------------------------


def with_draft_vocab(model, ids: list[int]) -> None:
    """Give the model's streams a draft vocabulary (as training and loading do)."""
    # A copy: STREAMS is shared by the other tests.
    model.stream_args = replace(model.stream_args, draft_vocab_size=len(ids))
    model.streams.draft_vocab = mx.array(ids, dtype=mx.int32)


def test_draft_logits_are_the_head_rows_of_the_draft_vocab(arch):
    model = tiny_model(arch, seed=3, streams=STREAMS)
    ids = [5, 9, 2, 40, 77, 96]
    h = mx.random.normal((4, model.args.hidden_size))
    full = np.array(model.draft_logits(h))  # no draft vocab: the full head
    np.testing.assert_allclose(full, np.array(model.head(h)), rtol=1e-6)
    with_draft_vocab(model, ids)
    np.testing.assert_allclose(np.array(model.draft_logits(h)), full[:, ids], rtol=1e-5,
                               atol=1e-5)
    assert model.draft_tokens(mx.array([[0, 3], [5, 1]])).tolist() == [[5, 40], [96, 9]]
    # The gathered rows follow a precision change of the head.
    model.set_dtype(mx.float16)
    assert model.draft_logits(h.astype(mx.float16)).dtype == mx.float16


@pytest.mark.parametrize("arch", ["llama", "qwen2"], ids=["untied", "tied"])
def test_draft_logits_of_a_quantized_head(arch):
    """Quantized heads (QuantizedLinear, tied QuantizedEmbedding) give their rows too."""
    model = tiny_model(arch, seed=4, streams=STREAMS)
    nn.quantize(model, group_size=32, bits=8,
                class_predicate=lambda _, m: hasattr(m, "to_quantized"))
    ids = [1, 7, 33, 64, 90]
    with_draft_vocab(model, ids)
    h = mx.random.normal((2, model.args.hidden_size))
    np.testing.assert_allclose(np.array(model.draft_logits(h)),
                               np.array(model.head(h))[:, ids], rtol=1e-4, atol=1e-4)


def test_stream_candidates_come_from_the_draft_vocab():
    model = tiny_model("llama", seed=8, streams=STREAMS)
    ids = list(range(3, 97, 4))
    with_draft_vocab(model, ids)
    hs = mx.random.normal((3, model.args.hidden_size))
    cand, lp = stream_candidates(model, hs, 3)
    logits = np.array(model.head(hs))[:, ids]
    want = np.array(ids)[np.argsort(-logits, axis=-1)[:, :3]]
    assert np.array(cand).tolist() == want.tolist()
    assert np.all(np.diff(np.array(lp), axis=-1) <= 0)


@pytest.mark.parametrize("budget", [2, 6])
def test_greedy_speculative_with_a_draft_vocab_equals_plain(arch, budget):
    """Verification keeps the full vocabulary: a draft vocab can only change speed."""
    model = tiny_model(arch, seed=11, streams=STREAMS)
    expected = plain(model, PROMPT, 32)
    # Half the vocabulary, so some true next tokens cannot be drafted at all.
    with_draft_vocab(model, list(range(0, 97, 2)))
    events = list(generate_step(model, PROMPT, max_tokens=32, tree_budget=budget))
    assert tokens_of(events) == expected
    assert all(t % 2 == 0 for e in events if e.from_draft for t in [e.token])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_one_row_drafting_pass_drafts_as_the_deferred_stream_pass(arch, monkeypatch):
    """A one-row drafting pass runs its stream rows inside the main pass; its candidates
    are the ones a separate stream pass over the same row gives."""
    model = tiny_model(arch, seed=2, streams=STREAMS)
    prompt = [3, 17, 42, 8, 91, 5]
    cache = KVCache(len(model.layers))
    model(mx.array([prompt], dtype=mx.int32), cache=cache)
    cache.commit(range(len(prompt)))
    separate = model.stream_pass
    with monkeypatch.context() as m:
        m.setattr(model, "stream_pass", lambda *a, **k: pytest.fail("a separate stream pass"))
        _, bonus, draft = verify(model, cache, 11, DraftTree(), None, 3, True)
    assert model.stream_pass == separate
    pos = mx.array([len(prompt)], dtype=mx.int32)
    h_low = model.lower(mx.array([[11]], dtype=mx.int32), pos, None, cache)
    model.upper(h_low, pos, None, cache, None)  # writes the row's K/V, as the pass does
    seen = mx.ones((1, len(prompt) + 1), dtype=mx.bool_)
    hs = model.stream_pass(h_low, pos, seen, cache, 1)[0, 0]
    cand, lp = stream_candidates(model, hs, 3)
    assert (np.array(cand) == draft.candidates).all()
    np.testing.assert_allclose(np.array(lp), draft.logprobs, rtol=1e-4, atol=1e-5)
    plain = verify(model, cache, 11, DraftTree(), None, 3, False)
    assert plain[1] == bonus and plain[2] is None
