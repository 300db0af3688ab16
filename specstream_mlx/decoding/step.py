"""The decode loop: prefill, one single-pass draft/verify step, and the token generator.

One speculative step: feed [root] + draft tree; one forward pass gives the main stream's
choice after every node (verification) and, at the last accepted node, the streams'
candidates for the next tree (drafting). The accepted node is found on the device, so
the step reads back once. Plain decoding is the same step with an empty tree.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from specstream_mlx.decoding.cache import KVCache
from specstream_mlx.decoding.controller import Controller
from specstream_mlx.decoding.costs import costs_for
from specstream_mlx.decoding.drafter import (
    DraftSettings,
    StreamProposal,
    TreeBuilder,
    budget_drafter,
    model_corpus,
    planned_tree,
)
from specstream_mlx.decoding.lookup import NgramIndex
from specstream_mlx.decoding.priors import model_priors
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError
from specstream_mlx.settings import check_settings, check_token_ids

# Maps log-probabilities (rows, vocab) and each row's position (rows,) (host ints) to one
# token per row (rows,): a PositionSampler (sampling.py), whose draws do not depend on
# the tree.
Sampler = Callable[[mx.array, np.ndarray], mx.array]


@dataclass
class StepResult:
    """Outcome of one pass: accepted drafted tokens, then the correction token."""

    tokens: list[int]
    num_drafted: int
    draft: StreamProposal | None
    path: list[int]


@dataclass
class TokenEvent:
    """One generated token; `passes` counts forward passes so far (prefill included);
    `final` marks the last token when max_tokens or the context ends generation."""

    token: int
    from_draft: bool
    passes: int
    final: bool = False


def choose(logits: mx.array, sampler: Sampler | None, positions: np.ndarray) -> mx.array:
    """Main-stream choice per row: logits (rows, vocab), the rows' positions (rows,) ->
    (rows,); None means greedy."""
    if sampler is None:
        return mx.argmax(logits, axis=-1)
    return sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True), positions)


def stream_candidates(model, hs: mx.array, k: int, draft_head: mx.array | None = None,
                      temp: float = 1.0, noise: mx.array | None = None
                      ) -> tuple[mx.array, mx.array]:
    """Top-k of each stream: hs (..., gamma, hidden) -> tokens, logprobs (..., gamma, k),
    best first (over the draft vocabulary when the streams have one; `draft_head`:
    model.draft_head(), gathered once per generation). `temp`: the sampling temperature,
    so the log-probabilities estimate how often the sampled target will take each token
    (a sharper distribution at temp < 1 favours deeper, narrower trees).

    `noise` (..., gamma, V_d): the Gumbel noise the sampler will add where each stream's
    token is drawn (`coupled_noise`); `temp` is then the sampler's. The target draws
    argmax(log p / temp + noise), so the streams rank by log q / temp + the same noise:
    the closer q is to p, the more often their first candidate is the very token that
    will be drawn (at 0.7 on 48 held-out prompts, chat, depth 1: the first candidate is
    the draw 0.37 of the time coupled, 0.31 ranked by probability, with the shipped
    streams trained on soft targets; 0.33 against 0.30 with the earlier ones). The output
    is unchanged: the noise is fixed by the seed and the position, whatever is drafted.
    """
    logits = model.draft_logits(hs, draft_head)
    if noise is not None:
        # A candidate's log-probability is the log-softmax of its perturbed score.
        logits = logits * (1.0 / temp) + noise
    elif temp != 1.0:
        logits = logits / temp
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logprobs, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    idx = mx.take_along_axis(idx, order, axis=-1)
    return model.draft_tokens(idx), mx.take_along_axis(vals, order, axis=-1)


def coupled_noise(model, noise: mx.array) -> mx.array:
    """Noise over the vocabulary (..., vocab) -> its draft-vocabulary columns (..., V_d)."""
    return mx.take(noise, model.streams.draft_vocab, axis=-1) if model.has_draft_vocab \
        else noise


def sampler_candidates(model, hs: mx.array, k: int, draft_head: mx.array | None,
                       sampler: Sampler | None, row: mx.array) -> tuple[mx.array, mx.array]:
    """stream_candidates of the streams drafting at position `row` (0-d int32, on the
    device): coupled with a PositionSampler's noise at row + 1 .. row + gamma (the
    positions their tokens are drawn at); greedy (or a sampler without `noise_after`),
    ranked by the streams' own probabilities."""
    noise_after = getattr(sampler, "noise_after", None)
    if noise_after is None:
        return stream_candidates(model, hs, k, draft_head)
    noise = noise_after(row, model.stream_args.num_streams, model.args.vocab_size)
    return stream_candidates(model, hs, k, draft_head, sampler.temp,
                             coupled_noise(model, noise))


def last_accepted(tokens, targets, parents, mask, depths) -> mx.array:
    """Deepest node whose whole path matches the targets, computed on the device.

    One tree: tokens, targets, parents, depths (L,), mask (L, L) ancestors-and-self ->
    a 0-d index. A batch (decoding/batch.py): the same with a leading (n,) axis, depth -1
    on padding rows -> (n,).
    """
    if tokens.ndim == 1:
        return last_accepted(tokens[None], targets[None], parents[None], mask[None],
                             depths[None])[0]
    ok = (tokens == mx.take_along_axis(targets, parents, axis=1)) | (
        mx.arange(tokens.shape[1])[None] == 0)
    bad = (~ok).astype(mx.float32)[..., None]  # (n, L, 1)
    path_ok = (mask.astype(mx.float32) @ bad)[..., 0] == 0
    return mx.argmax(mx.where(path_ok & (depths >= 0), depths, -1), axis=1)


def conditioned(model) -> bool:
    """The model's streams take the next token (their stream rows run after it is known)."""
    return model.stream_args is not None and model.stream_args.conditioned


def prefill(model, cache: KVCache, prompt: list[int], chunk: int, draft: bool):
    """Run the prompt through the model in chunks, committing its K/V.

    Returns the last row's logits (vocab,), its stream rows (gamma, hidden) or None, and
    its hidden state entering the MSA layers (hidden,) (for `root_streams`: streams
    conditioned on the next token draft once it is chosen; their rows are None here).
    """
    for start in range(0, len(prompt), chunk):
        piece = prompt[start : start + chunk]
        last = start + chunk >= len(prompt)
        positions = mx.arange(cache.offset, cache.offset + len(piece), dtype=mx.int32)
        h_low = model.lower(mx.array([piece], dtype=mx.int32), positions, None, cache)
        rows = None
        if last and draft and not conditioned(model):
            rows = mx.array([len(piece) - 1], dtype=mx.int32)  # only the last row drafts
        h, hs = model.upper(h_low, positions, None, cache, rows)
        cache.commit(range(len(piece)))
        if not last:
            mx.eval(cache.state())
    return model.head(h[0, -1]), (hs[0, -1] if hs is not None else None), h_low[0, -1]


def root_streams(model, cache: KVCache, h_last: mx.array, root: mx.array) -> mx.array:
    """Stream rows (gamma, hidden) of the cache's last committed row, conditioned on the
    token chosen after it (`root`, a 0-d int32 array); h_last (hidden,) from `prefill`."""
    offset = cache.offset
    return model.stream_pass(h_last[None, None], mx.array([offset - 1], dtype=mx.int32),
                             mx.ones((1, offset), dtype=mx.bool_), cache, 0,
                             next_tokens=root.reshape(1, 1).astype(mx.int32))[0, 0]


def verify(model, cache: KVCache, root: int, tree: DraftTree, sampler: Sampler | None,
           top_k: int, draft: bool = True, draft_head: mx.array | None = None
           ) -> tuple[list[int], int, StreamProposal | None]:
    """One forward pass of `root` + `tree` with the cache's committed tokens as prefix:
    returns the accepted path (node indices, 0 first), the token after it, and (with
    `draft`, top_k > 0 and streams) the streams' candidates at its last node
    (`sampler_candidates`: coupled when sampling). The pass's K/V stay pending in the
    cache: `commit` keeps the path's.

    Main rows never see stream rows, so the stream rows can run for the last accepted
    node only, found on the device after the main rows: gamma rows in the top
    N_s layers instead of gamma per tree node. A one-row pass (nothing drafted) knows
    that node beforehand, so its stream rows ride along in the main pass (SmolLM2 on the
    CPU, interleaved medians of 37: a drafting step 63.8 -> 61.2 ms, plain 52.7: the top
    layers' weights are read once, and one row costs as much as two there, see
    matmul_plan), unless the streams are conditioned on the token chosen after that
    node (StreamArgs.next_token_rank): then they always run after it.
    """
    n = len(tree)
    streams = draft and model.stream_args is not None and top_k > 0
    deferred = streams and (n > 1 or conditioned(model))
    tokens = mx.array([root] + tree.tokens, dtype=mx.int32)
    where = cache.offset + tree.depths  # (n,) host positions
    positions = mx.array(where)
    mask = mx.array(tree.mask) if n > 1 else None
    h_low = model.lower(tokens[None], positions, mask, cache)
    rows = mx.zeros((1,), dtype=mx.int32) if streams and not deferred else None  # n == 1
    h, hs = model.upper(h_low, positions, mask, cache, rows)
    targets = choose(model.head(h[0]), sampler, where)
    outputs = [targets]
    if streams:
        parents = mx.array([0] + tree.parents, dtype=mx.int32)
        last = (last_accepted(tokens, targets, parents, mask, positions) if n > 1
                else mx.array(0))
        if deferred:
            seen = mx.ones((1, cache.offset + n), dtype=mx.bool_)
            if mask is not None:
                seen[:, cache.offset:] = mask[last]
            nxt = targets[last].reshape(1, 1).astype(mx.int32) if conditioned(model) else None
            hs = model.stream_pass(mx.take(h_low, last[None], axis=1), positions[last][None],
                                   seen, cache, n, next_tokens=nxt)[0, 0]
        else:
            hs = hs[0, last]
        outputs += list(sampler_candidates(model, hs, top_k, draft_head, sampler,
                                           positions[last]))
    mx.eval(*outputs)  # the step's one read-back
    path, bonus = tree.accept(targets.tolist())
    new_draft = StreamProposal(np.array(outputs[1]), np.array(outputs[2])) if streams else None
    return path, bonus, new_draft


def speculative_step(
    model, cache: KVCache, root: int, tree: DraftTree, sampler: Sampler | None, top_k: int,
    draft: bool = True, draft_head: mx.array | None = None,
) -> StepResult:
    """Verify `tree` after `root` and, with `draft` and top_k > 0, draft the next
    candidates, in one forward pass; commits the accepted path's K/V."""
    path, bonus, new_draft = verify(model, cache, root, tree, sampler, top_k, draft,
                                    draft_head)
    cache.commit(path)
    accepted = [tree.tokens[i - 1] for i in path[1:]]
    return StepResult(accepted + [bonus], len(accepted), new_draft, path)


def generate_step(
    model,
    prompt: list[int],
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    speculative: bool = True,
    tree_budget: int | None = None,
    draft_top_k: int | None = None,
    lookup_depth: int | None = None,
    min_draft_prob: float | None = None,
    prefill_chunk: int = 512,
    drafter: TreeBuilder | None = None,
    cache: KVCache | None = None,
    adaptive: bool = True,
    corpus_depth: int | None = None,
) -> Iterator[TokenEvent]:
    """Generate token ids after `prompt`, speculatively when the model has streams.

    sampler None is greedy; a PositionSampler samples, and the tokens then equal plain
    decoding's with the same sampler, whatever is drafted. tree_budget, draft_top_k,
    lookup_depth and min_draft_prob default to the model's stream config (see DraftSettings,
    budget_drafter); so does corpus_depth, the length of drafts retrieved from the
    model's corpus (corpus.py) when the loader attached one (0 turns them off).
    `drafter` replaces the default budget tree (tests use it to force perfect drafts).
    `adaptive` lets a Controller choose each step's draft from measured costs
    (controller.py), plain steps included; False always drafts the whole budget.
    When sampling, the streams' candidates are coupled with the sampler's noise
    (`stream_candidates`) and drafting takes the config's sampled_tree_budget,
    sampled_top_k and sampled_min_draft_prob unless given.
    Prompt plus generated tokens never exceed the context. The cache, when given, is
    empty or holds the K/V of prompt[:cache.offset] (reused from an earlier generation:
    only the rest of the prompt is prefilled; see PromptCache); on exit (also when the
    caller stops early) it holds the prompt and every yielded token but the last, which
    would be fed next.
    """
    prompt = check_token_ids(prompt, model.args.vocab_size)
    check_settings(max_tokens=max_tokens)
    d = DraftSettings.resolve(model, speculative, tree_budget, draft_top_k, lookup_depth,
                         min_draft_prob, corpus_depth, sampled=sampler is not None)
    corpus = model_corpus(model) if d.corpus else None
    context = model.args.max_position_embeddings
    if len(prompt) >= context:
        raise InputError(
            f"the prompt has {len(prompt)} tokens; the model's context is {context} tokens"
        )
    max_tokens = min(max_tokens, context - len(prompt))
    streams, top_k = d.enabled, d.top_k
    controller = index = None
    # Timed choices are safe when sampling too: a PositionSampler draws by position.
    if streams and drafter is None and adaptive:
        controller = Controller(costs_for(model), model.stream_args.num_streams,
                                model_priors(model).of(sampled=sampler is not None))
        index = NgramIndex() if d.lookup > 0 else None
    drafter = drafter or budget_drafter(d.budget, d.lookup, d.min_prob, corpus, d.corpus)
    cache = cache if cache is not None else KVCache(len(model.layers))
    if cache.offset >= len(prompt):
        raise InputError(f"the cache holds {cache.offset} tokens, the prompt only "
                         f"{len(prompt)}: the prompt's last token must be fed")
    reused = cache.offset
    draft_head = model.draft_head() if streams else None  # gathered once, not per step
    history = list(prompt)
    yielded = 0
    try:
        logits, hs, h_last = prefill(model, cache, prompt[reused:], prefill_chunk, streams)
        root = choose(logits[None], sampler, np.array([len(prompt) - 1]))[0]
        draft = None
        if streams:
            if hs is None:  # conditioned streams: they draft knowing the root
                hs = root_streams(model, cache, h_last, root)
            cand, lp = sampler_candidates(model, hs, top_k, draft_head, sampler,
                                          mx.array(len(prompt) - 1, dtype=mx.int32))
            mx.eval(root, cand, lp)
            draft = StreamProposal(np.array(cand), np.array(lp))
        root, passes = root.item(), 1
        yielded += 1
        history.append(root)
        yield TokenEvent(root, False, passes, yielded >= max_tokens)
        while yielded < max_tokens:
            tic = time.perf_counter()
            plan = source = None
            if controller is not None:
                tree, plan, source = planned_tree(controller, draft, history, index, d, corpus)
            else:
                tree = drafter(draft, history) if streams else DraftTree()
            # Drafts deeper than the tokens still allowed could never be emitted.
            tree = tree.truncate(max_tokens - yielded - 1)
            result = speculative_step(model, cache, root, tree, sampler, top_k,
                                      plan.draft if plan is not None else True, draft_head)
            if controller is not None:
                controller.observe(tree, plan, source, result.path, time.perf_counter() - tic)
            passes += 1
            for i, token in enumerate(result.tokens):
                yielded += 1
                history.append(token)
                yield TokenEvent(token, i < result.num_drafted, passes, yielded >= max_tokens)
                if yielded >= max_tokens:
                    return
            root, draft = result.tokens[-1], result.draft
    finally:
        # Drop committed tokens the caller never received (early break, max_tokens).
        cache.trim(cache.offset - (len(prompt) + max(yielded - 1, 0)))
