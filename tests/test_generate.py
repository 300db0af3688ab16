"""stream_generate / generate on a tiny model loaded from disk: text pieces add up to the
decoded tokens, statistics are consistent, every finish reason, greedy speculative text
== plain text, bad requests raise InputError, seeded sampling is reproducible."""

from __future__ import annotations

import mlx.core as mx
import pytest
from conftest import cut_at_first_stop
from tiny_folder import EOS_ID, make_tiny_folder

from specstream_mlx import GenerationResponse, generate, load, stream_generate
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError
from specstream_mlx.generate import format_stats, held_back
from specstream_mlx.models.config import StreamArgs

STREAMS = StreamArgs(num_streams=3, msa_layers=2)
PROMPTS = ["hi", "Hello there!", "abc abc abc abc", "The quick brown fox"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("gen") / "tiny", streams=STREAMS)[0]


@pytest.fixture(scope="module")
def loaded(folder):
    return load(folder)


def run(loaded, prompt, **kwargs) -> list[GenerationResponse]:
    model, tokenizer = loaded
    return list(stream_generate(model, tokenizer, prompt, **kwargs))


def text_of(responses) -> str:
    return "".join(r.text for r in responses)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_pieces_add_up_to_generate_and_to_the_decoded_tokens(loaded, prompt):
    model, tokenizer = loaded
    responses = run(loaded, prompt, max_tokens=40)
    assert all(isinstance(r, GenerationResponse) for r in responses)
    text = text_of(responses)
    assert text == generate(model, tokenizer, prompt, max_tokens=40)
    tokens = [r.token for r in responses if r.token != EOS_ID]
    assert text == tokenizer.decode(tokens)
    assert text  # the tiny model's ids all decode to visible characters


@pytest.mark.parametrize("speculative", [True, False])
def test_statistics_are_consistent(loaded, speculative):
    responses = run(loaded, "Hello there!", max_tokens=50, speculative=speculative)
    first, last = responses[0], responses[-1]
    assert first.from_draft is False and first.passes == 1  # the prefill commits it
    assert [r.generation_tokens for r in responses] == list(range(1, len(responses) + 1))
    for r in responses:
        assert r.tokens_per_pass == pytest.approx(r.generation_tokens / r.passes)
        assert r.drafted_tokens == sum(x.from_draft for x in responses[: r.generation_tokens])
        assert r.prompt_tokens == first.prompt_tokens > len("Hello there!")  # chat template
    passes = [r.passes for r in responses]
    assert passes == sorted(passes)
    # A pass commits its drafted tokens and then one token of its own.
    assert last.passes == last.generation_tokens - last.drafted_tokens
    if not speculative:
        assert last.drafted_tokens == 0 and last.tokens_per_pass == 1.0
    stats = format_stats(last)
    assert f"{last.generation_tokens} tokens" in stats and "tokens/pass" in stats


def oracle_drafter(expected: list[int], depth: int = 3):
    """Drafts the next `depth` tokens of `expected` (prompt + plain greedy output) as a chain."""

    def drafter(draft, history: list[int]) -> DraftTree:
        chain = expected[len(history) : len(history) + depth]
        return DraftTree(chain, list(range(len(chain))))

    return drafter


def test_accepted_drafts_stream_like_plain_decoding(loaded):
    """With perfect drafts every pass commits 3 drafted tokens and its own: same text."""
    model, tokenizer = loaded
    plain = run(loaded, "hi", max_tokens=30, speculative=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True)
    expected = list(prompt) + [r.token for r in plain]
    spec = run(loaded, "hi", max_tokens=30, drafter=oracle_drafter(expected))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert text_of(spec) == text_of(plain)
    assert [r.from_draft for r in spec[:9]] == [False] + [True, True, True, False] * 2
    last = spec[-1]
    assert last.drafted_tokens == sum(r.from_draft for r in spec) > 15
    assert last.passes == 1 + -(-(30 - 1) // 4)  # prefill, then 4 tokens a pass
    assert last.tokens_per_pass == pytest.approx(30 / last.passes)
    assert last.finish_reason == "length"


def test_drafted_eos_stops_mid_pass(folder):
    """eos accepted as a drafted token ends generation; later tokens of the pass are dropped."""
    model, tokenizer = load(folder)
    free = list(stream_generate(model, tokenizer, "hi", max_tokens=10, speculative=False))
    w = model.lm_head.weight
    model.lm_head.weight = w.at[EOS_ID].add(2 * w[free[3].token] - w[EOS_ID])
    plain = list(stream_generate(model, tokenizer, "hi", max_tokens=10, speculative=False))
    assert plain[-1].token == EOS_ID
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True)
    expected = list(prompt) + [r.token for r in plain] + [70, 71, 72]
    spec = list(stream_generate(model, tokenizer, "hi", max_tokens=10,
                                drafter=oracle_drafter(expected, depth=5)))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert spec[-1].from_draft and spec[-1].finish_reason == "stop"


def test_finish_reason_length_at_max_tokens(loaded):
    responses = run(loaded, "hi", max_tokens=7)
    assert len(responses) == 7
    assert [r.finish_reason for r in responses] == [None] * 6 + ["length"]


def test_max_tokens_one(loaded):
    responses = run(loaded, "hi", max_tokens=1)
    assert len(responses) == 1 and responses[0].finish_reason == "length"
    assert responses[0].passes == 1


def test_stop_at_eos(folder):
    """Make eos win where the 4th greedy token would: generation stops there, eos unprinted."""
    model, tokenizer = load(folder)
    free = list(stream_generate(model, tokenizer, "hi", max_tokens=10, speculative=False))
    assert EOS_ID not in [r.token for r in free]
    w = model.lm_head.weight
    model.lm_head.weight = w.at[EOS_ID].add(2 * w[free[3].token] - w[EOS_ID])
    for speculative in (True, False):
        responses = list(stream_generate(model, tokenizer, "hi", max_tokens=10,
                                         speculative=speculative))
        last = responses[-1]
        assert last.token == EOS_ID and last.finish_reason == "stop"
        assert len(responses) <= 4
        assert all(r.finish_reason is None for r in responses[:-1])
        assert last.text == "" and "<|im_end|>" not in text_of(responses)


def test_stop_string_ends_generation(loaded):
    free = run(loaded, "hi", max_tokens=40)
    full = text_of(free)
    stop = full[12:14]
    end = full.index(stop) + len(stop)
    responses = run(loaded, "hi", max_tokens=40, stop=[stop, "never-seen"])
    assert responses[-1].finish_reason == "stop"
    assert len(responses) == end < len(free)  # one char a token: it ends where stop does
    assert text_of(responses) == full[: full.index(stop)]  # the stop itself is not shown


def stop_cases(full: str) -> dict[str, list[str]]:
    """Stop lists chosen from a greedy text `full` (one character a token here)."""
    recur = next(j for j in range(1, len(full) - 3) if full[j] in full[:j])
    return {
        "spans tokens": [full[5:9]],
        # Its first character came earlier: held back there, then released.
        "false start": [full[recur : recur + 3]],
        "one a prefix of another": [full[8:12], full[8:10]],
        "the other a prefix": [full[8:10], full[8:12]],
        # The inner one completes first, so it ends the text though the outer began sooner.
        "overlapping": [full[10:16], full[12:14]],
        "overlapping, outer first": [full[10:14], full[12:16]],
        "empty ignored": ["", full[5:9]],
        "never hit": ["~~~", full[3:5] + "~"],
    }


CASE_NAMES = list(stop_cases("abcd" * 8))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_stop_pieces_add_up_to_the_text_cut_before_the_stop(loaded, case):
    """Whatever the stops, the pieces never show text a stop later cuts: they add up to
    generate()'s text and to the plain text cut before the first stop."""
    model, tokenizer = loaded
    free = run(loaded, "hi", max_tokens=40)
    pieces = [r.text for r in free]
    stops = stop_cases("".join(pieces))[case]
    want, hit = cut_at_first_stop(pieces, stops)
    responses = run(loaded, "hi", max_tokens=40, stop=stops)
    text = text_of(responses)
    assert text == want == generate(model, tokenizer, "hi", max_tokens=40, stop=stops)
    assert not any(s and s in text for s in stops)
    # One response a token, as without stops, ending with the token that completed it.
    assert [r.token for r in responses] == [r.token for r in free[: hit or len(free)]]
    assert [r.generation_tokens for r in responses] == list(range(1, len(responses) + 1))
    assert [r.finish_reason for r in responses[:-1]] == [None] * (len(responses) - 1)
    assert responses[-1].finish_reason == ("stop" if hit else "length")
    if case != "never hit":
        assert hit


def test_text_that_may_begin_a_stop_waits_and_the_last_response_flushes_it(loaded):
    """The output ends with the start of a stop that never completes: those characters are
    held back, then come with the final ("length") response."""
    free = run(loaded, "hi", max_tokens=20)
    full = text_of(free)
    responses = run(loaded, "hi", max_tokens=20, stop=[full[-3:] + "~"])
    assert text_of(responses) == full and responses[-1].finish_reason == "length"
    assert len(text_of(responses[:-1])) <= len(full) - 3  # not shown before the end
    assert responses[-1].text.endswith(full[-3:])
    assert [r.token for r in responses] == [r.token for r in free]


def test_stops_ending_in_one_multi_character_token(loaded):
    """A token of several characters completes two stops at once: the earlier one wins,
    and a stop can end inside the token."""
    model, tokenizer = loaded
    for prompt in PROMPTS:
        free = run(loaded, prompt, max_tokens=40)
        k = next((i for i, r in enumerate(free) if i and len(r.text) >= 4), None)
        if k is not None:
            break
    else:
        pytest.skip("no multi-character token in the greedy outputs")
    pieces = [r.text for r in free]
    before, piece = pieces[k - 1][-1], pieces[k]
    for stops in ([piece[-2:], before + piece[0]], [piece[1:3]], [piece[:2], piece[:3]]):
        want, hit = cut_at_first_stop(pieces, stops)
        responses = run(loaded, prompt, max_tokens=40, stop=stops)
        assert text_of(responses) == want == generate(model, tokenizer, prompt,
                                                      max_tokens=40, stop=stops)
        assert hit and len(responses) == hit and responses[-1].finish_reason == "stop"


def test_held_back_is_the_longest_tail_that_begins_a_stop():
    assert held_back("xxab", ["abc"]) == 2
    assert held_back("xxab", ["bz", "abc"]) == 2  # the longest, whichever stop
    assert held_back("xxab", ["b!", "q"]) == 1
    assert held_back("xxab", ["zz"]) == 0
    assert held_back("aaa", ["aab"]) == 2
    assert held_back("", ["abc"]) == 0 and held_back("abc", []) == 0


@pytest.mark.parametrize("stop", [["~~~"], [""]], ids=["never occurs", "empty"])
def test_stop_string_that_never_matches(loaded, stop):
    """A stop that never occurs, or an empty one (ignored), leaves the text whole."""
    responses = run(loaded, "hi", max_tokens=12, stop=stop)
    assert len(responses) == 12 and responses[-1].finish_reason == "length"
    assert text_of(responses) == text_of(run(loaded, "hi", max_tokens=12))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_speculative_and_plain_greedy_text_are_identical(loaded, prompt):
    spec = run(loaded, prompt, max_tokens=60, speculative=True)
    plain = run(loaded, prompt, max_tokens=60, speculative=False)
    assert [r.token for r in spec] == [r.token for r in plain]
    assert text_of(spec) == text_of(plain)
    assert plain[-1].passes == len(plain)


@pytest.mark.parametrize("tree_budget, top_k", [(0, 1), (1, 1), (12, 4)])
def test_tree_settings_keep_the_greedy_text(loaded, tree_budget, top_k):
    base = run(loaded, "The quick brown fox", max_tokens=40, speculative=False)
    spec = run(loaded, "The quick brown fox", max_tokens=40, tree_budget=tree_budget,
               draft_top_k=top_k)
    assert text_of(spec) == text_of(base)


def test_raw_prompt_and_token_ids(loaded):
    model, tokenizer = loaded
    ids = tokenizer.encode("hi there")
    raw = run(loaded, "hi there", max_tokens=10, chat=False)
    assert raw[0].prompt_tokens == len(ids)
    assert text_of(raw) == text_of(run(loaded, ids, max_tokens=10))
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}],
                                              add_generation_prompt=True)
    assert text_of(run(loaded, "hi there", max_tokens=10)) == text_of(
        run(loaded, list(templated), max_tokens=10))


@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        ("", {}, "empty"),
        ("   \n\t ", {}, "empty"),
        ([], {}, "empty"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"max_tokens": -3}, "max_tokens"),
        ("a" * 600, {}, "context is 512 tokens"),
        ([5] * 512, {}, "context is 512 tokens"),
    ],
)
def test_invalid_requests_raise_input_error(loaded, prompt, kwargs, match):
    model, tokenizer = loaded
    with pytest.raises(InputError, match=match):
        generate(model, tokenizer, prompt, **kwargs)


def test_prompt_just_inside_the_context(loaded):
    responses = run(loaded, [5] * 508, max_tokens=20)
    assert 1 <= len(responses) <= 512 - 508


def test_generation_ending_at_the_context_limit_reports_length(loaded):
    responses = run(loaded, [5] * 508, max_tokens=20)
    assert responses[-1].finish_reason == "length"


@pytest.mark.parametrize("speculative", [True, False])
def test_seeded_sampling_is_reproducible(loaded, speculative):
    model, tokenizer = loaded

    def sample(seed):
        mx.random.seed(seed)
        return generate(model, tokenizer, "hi", max_tokens=30, temp=1.0,
                        speculative=speculative)

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first  # it really samples
    greedy = generate(model, tokenizer, "hi", max_tokens=30)
    assert first != greedy


def test_top_p_sampling_is_reproducible(loaded):
    model, tokenizer = loaded
    texts = []
    for _ in range(2):
        mx.random.seed(3)
        texts.append(generate(model, tokenizer, "hi", max_tokens=20, temp=0.8, top_p=0.9))
    assert texts[0] == texts[1]


def test_generate_verbose_prints_text_and_stats(loaded, capsys):
    model, tokenizer = loaded
    text = generate(model, tokenizer, "hi", max_tokens=8, verbose=True)
    out = capsys.readouterr().out
    assert out.startswith(text)
    assert "8 tokens" in out and "tokens/pass" in out


def test_early_break_then_generate_again(loaded):
    """A caller that stops early leaves nothing behind: the next call starts afresh."""
    model, tokenizer = loaded
    expected = generate(model, tokenizer, "hi", max_tokens=15)
    for r in stream_generate(model, tokenizer, "hi", max_tokens=15):
        if r.generation_tokens == 3:
            break
    assert generate(model, tokenizer, "hi", max_tokens=15) == expected
