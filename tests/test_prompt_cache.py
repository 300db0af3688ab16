"""Conversation KV reuse: a prompt that extends an earlier generation prefills only its new
tokens, and the answer is token for token the one a fresh prefill gives."""

from __future__ import annotations

import pytest

from specstream_mlx import stream_generate
from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.prompt_cache import PromptCache, common_prefix
from specstream_mlx.errors import InputError


def run(loaded, ids, **kw):
    model, tok = loaded
    out = list(stream_generate(model, tok, ids, max_tokens=kw.pop("max_tokens", 12), **kw))
    return [r.token for r in out], out


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0 and common_prefix([5], [6]) == 0


@pytest.mark.parametrize("temp", [0.0])
def test_second_turn_reuses_and_matches_a_fresh_prefill(loaded, temp):
    model, tok = loaded
    cache = PromptCache(model)
    turn1 = tok.encode("hello there, how are you?")
    answer1, out1 = run(loaded, turn1, prompt_cache=cache)
    assert out1[-1].prompt_cached_tokens == 0 and len(cache) == 1
    turn2 = turn1 + answer1 + tok.encode(" and then?")
    answer2, out2 = run(loaded, turn2, prompt_cache=cache)
    assert out2[-1].prompt_cached_tokens == len(turn1) + len(answer1) - 1
    fresh, _ = run(loaded, turn2)
    assert answer2 == fresh
    # plain decoding after reuse as well
    turn3 = turn2 + answer2 + tok.encode("ok")
    reused, out3 = run(loaded, turn3, prompt_cache=cache, speculative=False)
    assert out3[-1].prompt_cached_tokens > len(turn2)
    assert reused == run(loaded, turn3, speculative=False)[0]


def test_an_early_stop_leaves_a_reusable_cache(loaded):
    model, tok = loaded
    cache = PromptCache(model)
    prompt = tok.encode("count with me: a b c")
    got = []
    for r in stream_generate(model, tok, prompt, max_tokens=20, prompt_cache=cache):
        got.append(r.token)
        if len(got) == 3:
            break
    nxt = prompt + got + tok.encode("d")
    answer, out = run(loaded, nxt, prompt_cache=cache)
    assert out[-1].prompt_cached_tokens == len(prompt) + 2
    assert answer == run(loaded, nxt)[0]


def test_the_same_prompt_twice_feeds_its_last_token(loaded):
    model, tok = loaded
    cache = PromptCache(model)
    prompt = tok.encode("same again")
    first, _ = run(loaded, prompt, prompt_cache=cache)
    second, out = run(loaded, prompt, prompt_cache=cache)
    assert second == first and out[-1].prompt_cached_tokens == len(prompt) - 1


def test_a_taken_cache_is_not_shared(loaded):
    """While one generation holds a cache, a second request on the same prefix gets a
    fresh one."""
    model, tok = loaded
    pc = PromptCache(model)
    prompt = tok.encode("shared prefix")
    run(loaded, prompt, prompt_cache=pc)
    a, n = pc.take(prompt + [5])
    b, m = pc.take(prompt + [5])
    assert n == len(prompt) and a.offset == n
    assert m == 0 and b.offset == 0 and b is not a and len(pc) == 0


def test_a_small_shared_prefix_is_copied_and_the_other_conversation_kept(loaded):
    """Two conversations that share only their opening tokens: the second gets a copy of
    that opening, and the first keeps its whole cache (and answer) for its next turn."""
    model, tok = loaded
    pc = PromptCache(model)
    opening = tok.encode("system: be brief.")
    first = opening + tok.encode(" tell me a long story about a red fox, a river and a hill" * 2)
    answer, _ = run(loaded, first, prompt_cache=pc)
    held = pc.nbytes
    other = opening + tok.encode(" hi")
    b, m = pc.take(other)
    assert m == common_prefix(first, other) >= len(opening) and 4 * m < len(first) + len(answer)
    assert b.offset == m and len(pc) == 1 and pc.nbytes == held
    pc.put(other[:m], b)
    nxt = first + answer + tok.encode(" and then?")
    again, out = run(loaded, nxt, prompt_cache=pc)
    assert out[-1].prompt_cached_tokens == len(first) + len(answer) - 1
    assert again == run(loaded, nxt)[0]


def test_lru_is_bounded_in_bytes(loaded):
    model, tok = loaded
    one = PromptCache(model)
    run(loaded, tok.encode("first prompt"), prompt_cache=one)
    size = one.nbytes
    assert size > 0
    pc = PromptCache(model, max_bytes=size)  # room for one cache
    for text in ("first prompt", "second prompt", "third prompt"):
        run(loaded, tok.encode(text), prompt_cache=pc)
        assert len(pc) == 1 and pc.nbytes <= size
    tiny = PromptCache(model, max_bytes=size - 1)  # a cache larger than the bound
    run(loaded, tok.encode("first prompt"), prompt_cache=tiny)
    assert len(tiny) == 0


def test_bad_arguments(loaded):
    model, tok = loaded
    with pytest.raises(InputError, match="max_bytes"):
        PromptCache(model, max_bytes=-1)
    with pytest.raises(InputError, match="cache or prompt_cache"):
        run(loaded, [5, 6], prompt_cache=PromptCache(model), cache=KVCache(4))
