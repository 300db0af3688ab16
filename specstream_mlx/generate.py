"""Tokens to text: stream_generate() yields one response per token, generate() a string."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx

from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.drafter import TreeBuilder
from specstream_mlx.decoding.prompt_cache import PromptCache
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.decoding.step import TokenEvent, generate_step
from specstream_mlx.errors import InputError
from specstream_mlx.settings import check_settings, check_text, check_token_ids


@dataclass
class GenerationResponse:
    """One generated token and the running statistics of the generation.

    text: the text this token releases; token: its id; from_draft: True when the token
    was a drafted token accepted by verification, False for the token a pass commits
    itself. With stop strings, text that could still begin one is held back until it
    cannot (so `text` may be empty, or include earlier tokens' text), and a stop string
    is never part of it: the pieces always add up to the whole response.
    """

    text: str
    token: int
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    passes: int
    tokens_per_pass: float
    drafted_tokens: int
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop", "length", or None while generating
    prompt_cached_tokens: int = 0  # prompt tokens whose K/V came from a PromptCache
    prompt_cache_source: str | None = None  # where they came from: "memory" or "disk"
    stop_string: str | None = None  # the stop string that ended the text, if one did


def encode_prompt(tokenizer, prompt: str | list[int], chat: bool) -> list[int]:
    """Token ids of a prompt; with `chat`, wrap it as a user turn via the chat template."""
    if isinstance(prompt, list | tuple):
        return check_token_ids(prompt, sys.maxsize)  # generate_step checks the vocabulary
    prompt = check_text(prompt)  # refuses any other type by name
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer.encode(prompt))


def encode_messages(tokenizer, messages: list[dict],
                    tools: list[dict] | None = None) -> list[int]:
    """The prompt tokens of a conversation, ready for the assistant's turn: its chat
    template, or for a base model without one the plain text of its turns. `tools`
    (function schemas in OpenAI's format) are rendered by the template, which must
    support them."""
    if getattr(tokenizer, "chat_template", None):
        extra = {"tools": tools} if tools else {}  # some templates fail on tools=None
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  **extra))
    return list(tokenizer.encode("\n\n".join(m["content"] for m in messages)))


def encode_turns(model, tokenizer, turns: list[str], max_tokens: int) -> list[int]:
    """The prompt tokens of the last of a conversation's user `turns`, the earlier ones
    answered by the model itself (greedy, plain decoding, up to `max_tokens` tokens
    each): [user 1, assistant 1, ..., user n] through encode_messages, ready for the
    assistant's turn. Deterministic, so both sides of a comparison get the same ids."""
    messages = []
    for text in turns[:-1]:
        messages.append({"role": "user", "content": text})
        # The answer goes back as text, as a chat client would send it.
        answer = generate(model, tokenizer, encode_messages(tokenizer, messages),
                          max_tokens=max_tokens, speculative=False)
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": turns[-1]})
    return encode_messages(tokenizer, messages)


def encode_record(model, tokenizer, record: dict, max_tokens: int) -> list[int]:
    """The prompt tokens a record of jsonl.read_prompts is measured at: its 'prompt' as a
    chat turn, or the last of its 'turns' after the model's answers to the others
    (encode_turns, `max_tokens` each)."""
    if "turns" in record:
        return encode_turns(model, tokenizer, record["turns"], max_tokens)
    return encode_prompt(tokenizer, record["prompt"], chat=True)


def peak_memory_gb() -> float:
    """Peak memory MLX allocated so far, in GB."""
    return mx.get_peak_memory() / 1e9


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string:
    the text that a later token could still turn into a stop, so not to be shown yet."""
    longest = max(map(len, stops), default=0)
    for start in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[start:]
        if any(s.startswith(tail) for s in stops):
            return len(text) - start
    return 0


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    top_k: int = 0,
    speculative: bool = True,
    tree_budget: int | None = None,
    draft_top_k: int | None = None,
    lookup_depth: int | None = None,
    min_draft_prob: float | None = None,
    corpus_depth: int | None = None,
    chat: bool = True,
    stop: list[str] | None = None,
    drafter: TreeBuilder | None = None,
    cache: KVCache | None = None,
    adaptive: bool = True,
    prompt_cache: PromptCache | None = None,
) -> Iterator[GenerationResponse]:
    """Generate text for `prompt` (a string, chat-formatted when `chat`, or token ids).

    Sampling takes mlx-lm's names and filters (`temp`, `top_p`, `min_p`, `top_k`): temp 0
    is greedy, and the output equals plain greedy decoding token for token; with temp > 0
    the tokens follow the model's sampling distribution exactly, and after
    mx.random.seed(s) speculative and plain decoding draw the same tokens (up to float
    rounding, see sampling.py).
    Drafting: `tree_budget` (stream nodes per pass), `draft_top_k` (candidates per
    stream), `lookup_depth` (context draft length), `min_draft_prob` (floor on a
    stream node's path probability) and `corpus_depth` (corpus draft length, when the
    model folder has a corpus) default to the model's stream config. `adaptive`
    (default) lets the controller pick each step's draft from measured costs, plain steps
    included; False drafts the whole budget.
    Generation ends at an end-of-sequence token, a `stop` string, or `max_tokens`. The
    text ends before the earliest occurrence of a stop string (which is not part of it);
    text that could still become a stop is held back, and the last response flushes it.
    Empty stop strings are ignored.
    `prompt_cache` (a PromptCache of this model) reuses the K/V of an earlier generation
    whose tokens this prompt extends (a conversation's previous turn): only the new
    tokens are prefilled, and the output is the same as with a fresh prefill.
    """
    check_settings(max_tokens=max_tokens, temp=temp, top_p=top_p, min_p=min_p,
                   top_k=top_k)
    stops = check_stops(stop)
    ids = encode_prompt(tokenizer, prompt, chat)
    sampler = PositionSampler.drawn(temp, top_p, min_p, top_k) if temp > 0 else None
    text = TextStream(tokenizer, len(ids), stops)
    reused, source = 0, None
    if prompt_cache is not None:
        if cache is not None:
            raise InputError("pass cache or prompt_cache, not both")
        cache, reused, source = prompt_cache.take_with_source(ids)
    text.reused, text.source = reused, source
    steps = generate_step(
        model,
        ids,
        max_tokens=max_tokens,
        sampler=sampler,
        speculative=speculative,
        tree_budget=tree_budget,
        draft_top_k=draft_top_k,
        lookup_depth=lookup_depth,
        min_draft_prob=min_draft_prob,
        corpus_depth=corpus_depth,
        drafter=drafter,
        cache=cache,
        adaptive=adaptive,
    )
    try:
        for event in steps:
            response = text.feed(event)
            yield response
            if response.finish_reason:
                break
    finally:
        steps.close()  # its own cleanup first: the cache then holds the yielded tokens
        if prompt_cache is not None:
            prompt_cache.put(ids + text.generated[:-1], cache)


def check_stops(stop: list[str] | None) -> list[str]:
    """The stop strings that count (empty ones would match everywhere: ignored); refuses
    anything but a list of strings."""
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
        raise InputError("stop must be a list of strings")
    return [s for s in stop or () if s]


class TextStream:
    """One generation's tokens to GenerationResponses: detokenizing, end-of-sequence,
    stop strings (text that could still begin one held back), running statistics.
    `feed` takes the TokenEvents of generate_step (or of a batched decoder) in order and
    returns one response each; the caller stops at the first with a finish_reason.
    `generated` lists the tokens fed so far. Timing starts at construction (the prompt's
    rate is measured up to the first token)."""

    def __init__(self, tokenizer, prompt_tokens: int, stops: list[str],
                 reused: int = 0, source: str | None = None):
        self.eos = set(tokenizer.eos_token_ids)
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.prompt_tokens, self.stops = prompt_tokens, stops
        self.reused, self.source = reused, source
        self.held, self.drafted = "", 0  # held: text not yet yielded, as it may begin a stop
        self.hit: str | None = None  # the stop string found
        self.generated: list[int] = []
        self.tic = time.perf_counter()
        self.prompt_tps = self.gen_tic = 0.0

    def feed(self, event: TokenEvent) -> GenerationResponse:
        """The response of the next token `event`."""
        n = len(self.generated)
        if n == 0:
            self.gen_tic = time.perf_counter()
            self.prompt_tps = (self.prompt_tokens - self.reused) / (self.gen_tic - self.tic)
        n += 1
        self.generated.append(event.token)
        self.drafted += event.from_draft
        eos, detok, stops = self.eos, self.detok, self.stops
        finish = "stop" if event.token in eos else ("length" if event.final else None)
        if event.token not in eos:
            detok.add_token(event.token)
        piece = detok.last_segment  # reading it consumes it
        if finish:
            detok.finalize()
            piece += detok.last_segment
        if stops:
            # A stop completed by this piece starts within held + piece: held is the
            # longest tail of the text so far that begins a stop, so scanning this
            # window (under max(len(stop)) + len(piece)) finds every new occurrence.
            window = self.held + piece
            hits = [(i, s) for s in stops if (i := window.find(s)) >= 0]
            if hits:
                at = min(i for i, _ in hits)
                self.hit = next(s for i, s in hits if i == at)  # the first listed there
                piece, self.held, finish = window[:at], "", "stop"
            elif finish:
                piece, self.held = window, ""
            else:
                cut = len(window) - held_back(window, stops)
                piece, self.held = window[:cut], window[cut:]
        elapsed = time.perf_counter() - self.gen_tic
        return GenerationResponse(
            text=piece,
            token=event.token,
            from_draft=event.from_draft,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tps,
            generation_tokens=n,
            # The first token comes from the prefill; rate the tokens after it.
            generation_tps=(n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0,
            passes=event.passes,
            tokens_per_pass=n / event.passes,
            drafted_tokens=self.drafted,
            peak_memory=peak_memory_gb(),
            finish_reason=finish,
            prompt_cached_tokens=self.reused,
            prompt_cache_source=self.source,
            stop_string=self.hit,
        )


def generate(model, tokenizer, prompt: str | list[int], *, verbose: bool = False,
             **kwargs) -> str:
    """The generated text as one string; `verbose` prints it as it comes and the stats.

    Keyword arguments are those of `stream_generate`.
    """
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(format_stats(last))
    return text


def format_stats(r: GenerationResponse) -> str:
    """One line of statistics, as the CLI prints it after an answer."""
    return (
        f"[{r.generation_tokens} tokens, {r.passes} passes, "
        f"{r.tokens_per_pass:.2f} tokens/pass, {r.generation_tps:.1f} tokens/s, "
        f"prompt {r.prompt_tokens} tokens"
        + (f" ({r.prompt_cached_tokens} reused)" if r.prompt_cached_tokens else "")
        + f" at {r.prompt_tps:.1f} tokens/s, peak memory {r.peak_memory:.2f} GB]"
    )
