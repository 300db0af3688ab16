"""Continuous batching with speculation on: several generations decode together, one forward
pass per step over the rows of all of them, each with its own KV cache row, draft tree,
acceptance statistics and sampler. A generation prefills alone and joins the batch at the
next step; one that finishes leaves at once.

One batched pass over n sequences, their trees padded to R rows (the longest):

    tokens (n, R), positions (n, R), mask (n, 1, R, E) with E = max_b L_b + R

Sequence b holds its L_b committed tokens at slots 0 .. L_b-1 of its cache row
(BatchKVCache: max_batch rows preallocated) and writes its pass rows at slots
L_b .. L_b+R-1 (one scatter per layer, in place: no copy of the cache). Row i of b sees
the slots below L_b and its tree ancestors; a padding row sees only itself (a row that
sees nothing would give NaN). Slots between a short sequence's rows and E are masked.
After the main rows, the streams of each sequence's last accepted node run in one stream
pass (n rows of gamma stream rows), and each sequence commits its own accepted path.
Greedy answers are the single-sequence ones token for token, sampled ones draw with the
same position-keyed noise (both up to float rounding, as between passes of different
sizes; see sampling.py).

The drafting controller sees the whole batch: a pass costs what B sequences of R rows
cost (BatchPlanner: a PassCosts per batch size, shaped by the machine's pass-cost curve
at B * R rows), and R is chosen to maximise the batch's expected tokens per second, each
sequence filling its R rows with its best stream nodes and chain by its own Controller's
acceptance statistics.

    decoder = BatchDecoder(model, max_batch=4)
    seq, first = decoder.add(prompt_ids, max_tokens=64)      # prefill; first token
    while decoder.active:
        for seq, events in decoder.step(): ...               # TokenEvents per sequence
    cache = decoder.finish(seq)                              # its KV cache, leaving
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from specstream_mlx.decoding.cache import KVCache, kv_dtype, kv_layout
from specstream_mlx.decoding.controller import ChainSource, Controller, Plan
from specstream_mlx.decoding.costs import PassCosts, costs_for, on_curve
from specstream_mlx.decoding.drafter import (
    DraftSettings,
    StreamProposal,
    TreeBuilder,
    budget_drafter,
    model_corpus,
    pick_chain,
)
from specstream_mlx.decoding.lookup import NgramIndex
from specstream_mlx.decoding.priors import model_priors
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.decoding.step import (
    TokenEvent,
    choose,
    conditioned,
    coupled_noise,
    last_accepted,
    prefill,
    root_streams,
    sampler_candidates,
)
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError
from specstream_mlx.settings import check_settings, check_token_ids


class BatchKVCache:
    """The KV caches of the n sequences of a batch in `slots` preallocated rows: per layer
    keys and values (slots, kv_heads, capacity, head_dim), row b < n holding sequence b's
    `lengths[b]` committed tokens at slots 0 .. lengths[b]-1. Storage grows by `step`
    slots at a time; a join copies the joining cache into its row, a leave moves the last
    row into the freed one: each copies one sequence once, never per step.

    The model's layers call `write` (a pass's main rows, at each row's own slots) and
    `read` (stream rows); `offset` is 0 for them: batched masks are 4-D and complete.
    """

    step = 256
    offset = 0

    def __init__(self, model, slots: int):
        self.layout = kv_layout(model)
        self.dtype = kv_dtype(model)
        self.slots = slots
        self.keys: list[mx.array | None] = [None] * len(self.layout)
        self.values: list[mx.array | None] = [None] * len(self.layout)
        self.lengths = np.zeros(0, dtype=np.int64)
        self._index: mx.array | None = None  # (slots, 1, R, 1) slots of this pass's rows
        self._end = 0

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def reserve(self, end: int) -> None:
        """Make room for slots 0 .. end-1 in every row."""
        if end <= self.capacity:
            return
        size = -(-end // self.step) * self.step
        old = self.capacity
        for store in (self.keys, self.values):
            for i, (h, d) in enumerate(self.layout):
                grown = mx.zeros((self.slots, h, size, d), dtype=self.dtype)
                if old:
                    grown[:, :, :old, :] = store[i]
                store[i] = grown
        mx.eval(self.state())

    def join(self, cache: KVCache) -> int:
        """Add a sequence whose committed K/V are `cache`'s (B=1); returns its row."""
        n, length = len(self), cache.offset
        if n >= self.slots:
            raise InputError(f"the batch is full ({self.slots} sequences)")
        self.reserve(max(length, 1))
        if length:
            for store, src in ((self.keys, cache.keys), (self.values, cache.values)):
                for i in range(len(self.layout)):
                    store[i][n : n + 1, :, :length, :] = src[i][..., :length, :].astype(
                        self.dtype)
        self.lengths = np.append(self.lengths, length)
        mx.eval(self.state())
        return n

    def extract(self, row: int, keep: int) -> KVCache:
        """A KVCache (B=1) holding a copy of row `row`'s first `keep` committed slots."""
        keep = max(0, min(keep, int(self.lengths[row])))
        out = KVCache(len(self.layout))
        if keep:
            size = -(-keep // out.step) * out.step
            for src, dst in ((self.keys, out.keys), (self.values, out.values)):
                for i, (h, d) in enumerate(self.layout):
                    a = mx.zeros((1, h, size, d), dtype=self.dtype)
                    a[..., :keep, :] = src[i][row : row + 1, :, :keep, :]
                    dst[i] = a
            out.offset = keep
            mx.eval(out.state())
        return out

    def leave(self, row: int) -> None:
        """Drop row `row`: the last row moves into it (the only row copied)."""
        last = len(self) - 1
        if last == 0:  # empty: the storage goes (a long request's memory with it)
            self.keys = [None] * len(self.layout)
            self.values = [None] * len(self.layout)
        elif row != last:
            n = int(self.lengths[last])
            # A separate copy first: assigning a view of the same array would copy it all.
            moved = [[a[last : last + 1, :, :n, :] + 0 for a in store]
                     for store in (self.keys, self.values)]
            mx.eval(moved)
            for store, rows in zip((self.keys, self.values), moved, strict=True):
                for i, a in enumerate(rows):
                    store[i][row : row + 1, :, :n, :] = a
            del moved
            mx.eval(self.state())
        self.lengths[row] = self.lengths[last]
        self.lengths = self.lengths[:last].copy()

    def begin(self, rows: int) -> int:
        """Prepare a pass of `rows` rows per sequence; returns E, the keys it attends."""
        self._end = int(self.lengths.max()) + rows
        self.reserve(self._end)
        slots = np.tile(np.arange(rows), (self.slots, 1))  # unused rows: their first slots
        slots[: len(self)] += self.lengths[:, None]
        self._index = mx.array(slots.astype(np.int32)[:, None, :, None])
        return self._end

    def _padded(self, x: mx.array) -> mx.array:
        """x (n, ...) with zero rows up to `slots`."""
        n = x.shape[0]
        if n == self.slots:
            return x.astype(self.dtype)
        return mx.concatenate([x.astype(self.dtype),
                               mx.zeros((self.slots - n, *x.shape[1:]), dtype=self.dtype)])

    def write(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write a pass's rows k, v (n, kv_heads, R, head_dim) at each row's slots
        L_b .. L_b+R-1 (in place); returns keys and values of slots 0 .. E-1 of the n
        rows, (n, kv_heads, E, head_dim)."""
        index = mx.broadcast_to(self._index, (self.slots, *k.shape[1:]))
        self.keys[layer] = mx.put_along_axis(self.keys[layer], index, self._padded(k), axis=2)
        self.values[layer] = mx.put_along_axis(self.values[layer], index, self._padded(v),
                                               axis=2)
        return self.read(layer)

    def read(self, layer: int, pending: int = 0) -> tuple[mx.array, mx.array]:
        """Keys and values of slots 0 .. E-1 of this pass's n rows (stream rows attend to
        them under their own mask); `pending` is implied by the pass."""
        n = len(self)
        return (self.keys[layer][:n, :, : self._end, :],
                self.values[layer][:n, :, : self._end, :])

    def commit(self, paths: list[list[int]]) -> None:
        """Keep each row's pending rows paths[b] (increasing, from 0) as its next committed
        slots: one gather and one scatter per layer when some path is not contiguous."""
        moved = [b for b, p in enumerate(paths) if list(p) != list(range(len(p)))]
        if moved:
            m = max(len(paths[b]) for b in moved)
            dst = np.tile(np.arange(m), (self.slots, 1))  # identity where nothing moves
            dst[: len(self)] += self.lengths[:, None]
            src = dst.copy()
            for b in moved:
                src[b, : len(paths[b])] += np.asarray(paths[b]) - np.arange(len(paths[b]))
            src = mx.array(src.astype(np.int32)[:, None, :, None])
            dst = mx.array(dst.astype(np.int32)[:, None, :, None])
            for store in (self.keys, self.values):
                for i, a in enumerate(store):
                    shape = (a.shape[0], a.shape[1], m, a.shape[3])
                    rows = mx.take_along_axis(a, mx.broadcast_to(src, shape), axis=2)
                    store[i] = mx.put_along_axis(a, mx.broadcast_to(dst, shape), rows, axis=2)
        self.lengths = self.lengths + np.array([len(p) for p in paths], dtype=np.int64)

    def state(self) -> list[mx.array]:
        """Every stored array (for mx.eval)."""
        return [a for a in self.keys + self.values if a is not None]


@dataclass(eq=False)
class Sequence:
    """One generation in a BatchDecoder (its state between steps)."""

    prompt: list[int]
    max_tokens: int
    sampler: PositionSampler | None
    settings: DraftSettings
    controller: Controller | None
    index: NgramIndex | None
    drafter: TreeBuilder | None  # a fixed tree builder (adaptive off, or a test's)
    history: list[int]
    root: int = 0
    draft: StreamProposal | None = None
    passes: int = 1
    yielded: int = 0
    cache: KVCache | None = None  # before joining, and after leaving
    active: bool = False
    done: bool = False
    # This step's choice (BatchPlanner):
    tree: DraftTree = field(default_factory=DraftTree)
    plan: Plan | None = None
    source: ChainSource | None = None

    @property
    def finished(self) -> bool:
        return self.yielded >= self.max_tokens


# Pass costs of batches, per model and batch size (weakly keyed by the model, as costs_for).
_BATCH_COSTS: dict[int, tuple[weakref.ref, dict[int, PassCosts]]] = {}


def batch_costs(model, n: int) -> PassCosts:
    """The PassCosts of passes of `n` sequences of `model` in this process: seconds by
    rows per sequence (R), shaped by the machine's curve at n * R rows."""
    entry = _BATCH_COSTS.get(id(model))
    if entry is None or entry[0]() is not model:
        entry = (weakref.ref(model), {})
        _BATCH_COSTS[id(model)] = entry
    if n not in entry[1]:
        curve = costs_for(model).curve
        shaped = {r: on_curve(curve, n * r) for r in range(1, 65)} if curve else {}
        entry[1][n] = PassCosts(shaped)
    return entry[1][n]


class BatchPlanner:
    """Chooses one step's trees for a whole batch: the padded row count R and whether the
    pass drafts maximise (expected tokens of all sequences) / (cost of the batched pass),
    each adaptive sequence taking the best stream nodes and chain that fit in R rows by
    its own Controller's statistics. Like the Controller, it stops drafting when no tree
    pays and probes again after 8, 16 .. 128 plain steps."""

    def __init__(self, model):
        self.model = model
        self.corpus = None
        self.off_steps, self.probe_after = 0, 8

    def options(self, s: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                            DraftTree | None, list[int]]:
        """Sequence s's best expected gain with r rows (r = 1 .. len), the stream nodes
        and chain tokens giving it, its stream tree and its chain."""
        ctrl, d = s.controller, s.settings
        full = None
        if s.draft is not None:
            full = DraftTree.from_candidates(s.draft.candidates, s.draft.logprobs, d.budget,
                                             d.min_prob)

        def better(a, b):
            return ctrl.chain_gain(a[1], len(a[0])) > ctrl.chain_gain(b[1], len(b[0]))

        chain, s.source = pick_chain(s.history, s.index, d.lookup, model_corpus(self.model),
                                     d.corpus, better)
        gains = np.cumsum([0.0] + ctrl.node_gains(full))
        cg = np.array([ctrl.chain_gain(s.source, m) for m in range(len(chain) + 1)])
        k = np.arange(len(gains))[:, None]
        r = np.arange(1, len(gains) + len(chain) + 1)[None]
        m = np.minimum(r - 1 - k, len(chain))
        value = np.where(m >= 0, gains[:, None] + cg[np.maximum(m, 0)], -np.inf)
        best_k = value.argmax(0)
        best_m = np.minimum(r[0] - 1 - best_k, len(chain))
        return value.max(0), best_k, best_m, full, chain

    def plan(self, seqs: list[Sequence]) -> bool:
        """Set each sequence's tree (and plan, source) for this step; returns whether the
        pass drafts the next step."""
        costs = batch_costs(self.model, len(seqs))
        adaptive = [s for s in seqs if s.controller is not None]
        fixed_rows, streams = 1, False
        for s in seqs:
            streams |= s.settings.enabled
            if s.controller is None:
                s.tree = (s.drafter(s.draft, s.history) if s.settings.enabled
                          and s.draft is not None else DraftTree())
                s.plan, s.source = None, None
                fixed_rows = max(fixed_rows, len(s.tree))
        if not adaptive:
            return streams
        opts = {id(s): self.options(s) for s in adaptive}
        forced = any(s.controller is None and s.settings.enabled for s in seqs)
        warm = None
        if (1, False) not in costs.table and fixed_rows == 1 and not forced:
            warm = (1, False)
        elif (1, True) not in costs.table and fixed_rows == 1:
            warm = (1, True)
        top = max([fixed_rows] + [len(opts[id(s)][0]) for s in adaptive])

        def total(rows: int) -> float:
            fixed = len(seqs) - len(adaptive)
            return fixed + sum(1 + o[0][min(rows, len(o[0])) - 1] for o in opts.values())

        if warm is not None:
            best_rows, best_draft = warm
        else:
            best, best_rows, best_draft = -1.0, fixed_rows, False
            for draft in ((True,) if forced else (False, True)):
                for rows in range(fixed_rows, top + 1):
                    rate = total(rows) / costs.estimate(rows, draft)
                    if rate > best:
                        best, best_rows, best_draft = rate, rows, draft
            if best_draft or forced:
                self.off_steps, self.probe_after = 0, 8
            elif max((total(rows) / costs.estimate(rows, True)
                      for rows in range(max(2, fixed_rows), top + 1)), default=0.0) \
                    > len(seqs) / costs.estimate(1, False):
                best_draft = True  # the streams still pay at the drafts just seen
            else:
                self.off_steps += 1
                if self.off_steps >= self.probe_after:
                    self.off_steps, self.probe_after = 0, min(128, self.probe_after * 2)
                    best_draft = True
        for s in adaptive:
            values, ks, ms, full, chain = opts[id(s)]
            i = min(best_rows, len(values)) - 1
            k, m = int(ks[i]), int(ms[i])
            if warm is not None:
                k = m = 0
            tree = full.first(k) if full is not None else DraftTree()
            s.tree = tree.with_chain(chain[:m])
            s.plan = Plan(k, m, best_draft)
        return best_draft and streams


class BatchDecoder:
    """Sequences decoding together (see the module docstring); at most `max_batch`."""

    def __init__(self, model, max_batch: int = 4, prefill_chunk: int = 512,
                 keep_caches: bool = True):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model, self.max_batch = model, max_batch
        self.prefill_chunk, self.keep_caches = prefill_chunk, keep_caches
        self.cache = BatchKVCache(model, max_batch)
        self.active: list[Sequence] = []  # sequence b decodes in the cache's row b
        self.planner = BatchPlanner(model)
        self._draft_head = None
        self._head_ready = False

    def draft_head(self) -> mx.array | None:
        """The model's draft head (V_d, hidden), gathered once (None without one)."""
        if not self._head_ready:
            self._draft_head = self.model.draft_head() if self.model.stream_args else None
            self._head_ready = True
        return self._draft_head

    # --- joining and leaving -------------------------------------------------------------

    def add(self, prompt: list[int], *, max_tokens: int = 256,
            sampler: PositionSampler | None = None, speculative: bool = True,
            tree_budget: int | None = None, draft_top_k: int | None = None,
            lookup_depth: int | None = None, min_draft_prob: float | None = None,
            corpus_depth: int | None = None, drafter: TreeBuilder | None = None,
            cache: KVCache | None = None, adaptive: bool = True
            ) -> tuple[Sequence, TokenEvent]:
        """Prefill `prompt` (alone) and join the batch at the next step. Arguments as
        generate_step's; returns the sequence and its first token's event. A sequence
        whose first token is its last (max_tokens 1) does not join."""
        if len(self.active) >= self.max_batch:
            raise InputError(f"the batch is full ({self.max_batch} sequences)")
        model = self.model
        prompt = check_token_ids(prompt, model.args.vocab_size)
        check_settings(max_tokens=max_tokens)
        d = DraftSettings.resolve(model, speculative, tree_budget, draft_top_k, lookup_depth,
                                  min_draft_prob, corpus_depth, sampled=sampler is not None)
        context = model.args.max_position_embeddings
        if len(prompt) >= context:
            raise InputError(f"the prompt has {len(prompt)} tokens; the model's context is "
                             f"{context} tokens")
        controller = index = None
        if d.enabled and drafter is None and adaptive:
            controller = Controller(costs_for(model), model.stream_args.num_streams,
                                    model_priors(model).of(sampled=sampler is not None))
            index = NgramIndex() if d.lookup > 0 else None
        elif d.enabled:
            drafter = drafter or budget_drafter(d.budget, d.lookup, d.min_prob,
                                                model_corpus(model) if d.corpus else None,
                                                d.corpus)
        cache = cache if cache is not None else KVCache(len(model.layers))
        if cache.offset >= len(prompt):
            raise InputError(f"the cache holds {cache.offset} tokens, the prompt only "
                             f"{len(prompt)}: the prompt's last token must be fed")
        seq = Sequence(prompt, min(max_tokens, context - len(prompt)), sampler, d, controller,
                       index, drafter, list(prompt), cache=cache)
        logits, hs, h_last = prefill(model, cache, prompt[cache.offset:], self.prefill_chunk,
                                     d.enabled)
        root = choose(logits[None], sampler, np.array([len(prompt) - 1]))[0]
        if d.enabled:
            if hs is None:  # conditioned streams: they draft knowing the root
                hs = root_streams(model, cache, h_last, root)
            cand, lp = sampler_candidates(model, hs, d.top_k, self.draft_head(), sampler,
                                          mx.array(len(prompt) - 1, dtype=mx.int32))
            mx.eval(root, cand, lp)
            seq.draft = StreamProposal(np.array(cand), np.array(lp))
        seq.root, seq.yielded = root.item(), 1
        seq.history.append(seq.root)
        event = TokenEvent(seq.root, False, 1, seq.finished)
        if seq.finished:
            seq.done = True
        else:
            self.cache.join(cache)
            seq.cache, seq.active = None, True
            self.active.append(seq)
        return seq, event

    def finish(self, seq: Sequence, delivered: int | None = None) -> KVCache | None:
        """End `seq` (leaving the batch if it is in it) and return its KV cache holding
        the prompt and its first `delivered` tokens but the last (default: every token it
        yielded), as generate_step leaves a cache; None without keep_caches."""
        delivered = seq.yielded if delivered is None else min(delivered, seq.yielded)
        keep = len(seq.prompt) + max(delivered - 1, 0)
        if seq.active:
            self._leave(seq)
        seq.done = True
        if seq.cache is not None:
            seq.cache.trim(seq.cache.offset - keep)
        return seq.cache

    def _leave(self, seq: Sequence) -> None:
        row = self.active.index(seq)
        if self.keep_caches:
            seq.cache = self.cache.extract(row, len(seq.prompt) + seq.yielded - 1)
        self.cache.leave(row)
        self.active[row] = self.active[-1]  # as the cache's rows: the last moves up
        self.active.pop()
        seq.active = False

    # --- one step --------------------------------------------------------------------------

    def step(self) -> list[tuple[Sequence, list[TokenEvent]]]:
        """One batched pass of every active sequence: the tokens each emits (accepted
        drafts, then the pass's own token). Sequences reaching max_tokens leave."""
        seqs = list(self.active)
        if not seqs:
            return []
        tic = time.perf_counter()
        draft = self.planner.plan(seqs)
        for s in seqs:  # drafts deeper than the tokens still allowed could never be emitted
            s.tree = s.tree.truncate(s.max_tokens - s.yielded - 1)
        rows = max(len(s.tree) for s in seqs)
        paths, bonuses, proposals = self._verify(seqs, rows, draft)
        self.cache.commit(paths)
        seconds = time.perf_counter() - tic
        batch_costs(self.model, len(seqs)).observe(rows, draft, seconds)
        out = []
        for s, path, bonus, proposal in zip(seqs, paths, bonuses, proposals, strict=True):
            if s.controller is not None:
                s.controller.observe(s.tree, s.plan, s.source, path, None)
            accepted = [s.tree.tokens[i - 1] for i in path[1:]]
            s.passes += 1
            events = []
            for i, token in enumerate(accepted + [bonus]):
                s.yielded += 1
                s.history.append(token)
                events.append(TokenEvent(token, i < len(accepted), s.passes, s.finished))
                if s.finished:
                    break
            s.root, s.draft = events[-1].token, proposal
            out.append((s, events))
        for s in seqs:
            if s.finished:
                self._leave(s)
                s.done = True
        return out

    def _verify(self, seqs: list[Sequence], R: int, draft: bool
                ) -> tuple[list[list[int]], list[int], list[StreamProposal | None]]:
        """The batched pass: main rows of every sequence (verification), then with `draft`
        the streams of each one's last accepted node. One read-back."""
        model, cache = self.model, self.cache
        n = len(seqs)
        E = cache.begin(R)
        lengths = cache.lengths
        tokens = np.zeros((n, R), dtype=np.int32)
        positions = np.zeros((n, R), dtype=np.int32)
        parents = np.zeros((n, R), dtype=np.int32)
        depths = np.full((n, R), -1, dtype=np.int32)
        tree_mask = np.zeros((n, R, R), dtype=bool)
        mask = np.zeros((n, R, E), dtype=bool)
        for b, s in enumerate(seqs):
            t, r, L = s.tree, len(s.tree), int(lengths[b])
            tokens[b, 0], tokens[b, 1:r] = s.root, t.tokens
            positions[b, :r] = L + t.depths
            positions[b, r:] = L + np.arange(r, R)
            parents[b, 1:r] = t.parents
            depths[b, :r] = t.depths
            tree_mask[b, :r, :r] = t.mask
            tree_mask[b, np.arange(r, R), np.arange(r, R)] = True  # padding: itself only
            mask[b, :, :L] = True
            mask[b, :, L : L + R] = tree_mask[b]
            mask[b, r:, :L] = False
        tok, pos, m4 = mx.array(tokens), mx.array(positions), mx.array(mask[:, None])
        h_low = model.lower(tok, pos, m4, cache)
        h, _ = model.upper(h_low, pos, m4, cache)
        logits = model.head(h)  # (n, R, vocab)
        targets = self._choose(logits, seqs, positions)
        outputs = [targets]
        if draft:
            last = last_accepted(tok, targets, mx.array(parents), mx.array(tree_mask),
                                       mx.array(depths))
            at = last[:, None]
            h_last = mx.take_along_axis(h_low, at[..., None], axis=1)  # (n, 1, hidden)
            pos_last = mx.take_along_axis(pos, at, axis=1)  # (n, 1)
            seen = mx.take_along_axis(m4[:, 0], at[..., None], axis=1)  # (n, 1, E)
            nxt = mx.take_along_axis(targets, at, axis=1).astype(mx.int32) \
                if conditioned(model) else None
            hs = model.stream_pass(h_last, pos_last, seen, cache, R, next_tokens=nxt)[:, 0]
            outputs += list(self._candidates(hs, seqs, pos_last[:, 0]))
        mx.eval(*outputs)
        all_targets = np.array(outputs[0])
        cand = np.array(outputs[1]) if draft else None
        lp = np.array(outputs[2]) if draft else None
        paths, bonuses, proposals = [], [], []
        for b, s in enumerate(seqs):
            path, bonus = s.tree.accept(all_targets[b, : len(s.tree)].tolist())
            paths.append(path)
            bonuses.append(int(bonus))
            k = s.settings.top_k
            proposals.append(StreamProposal(cand[b, :, :k], lp[b, :, :k])
                             if draft and s.settings.enabled else None)
        return paths, bonuses, proposals

    def _choose(self, logits: mx.array, seqs: list[Sequence], positions: np.ndarray
                ) -> mx.array:
        """Each sequence's main-stream choice at each of its rows: (n, R) int32."""
        greedy = mx.argmax(logits, axis=-1).astype(mx.int32)
        if all(s.sampler is None for s in seqs):
            return greedy
        R, rows = logits.shape[1], []
        for b, s in enumerate(seqs):
            if s.sampler is None:
                rows.append(greedy[b])
                continue
            r = len(s.tree)
            own = choose(logits[b, :r], s.sampler, positions[b, :r]).astype(mx.int32)
            rows.append(own if r == R else mx.concatenate([own, greedy[b, r:]]))
        return mx.stack(rows)

    def _candidates(self, hs: mx.array, seqs: list[Sequence], rows: mx.array
                    ) -> tuple[mx.array, mx.array]:
        """The streams' top-k of every sequence, hs (n, gamma, hidden) -> tokens,
        logprobs (n, gamma, K) with K the largest top_k, best first; a sampling sequence's
        coupled with its sampler's noise at its positions after rows[b] (as
        step.sampler_candidates)."""
        model = self.model
        logits = model.draft_logits(hs, self.draft_head())  # (n, gamma, V_d)
        if any(s.sampler is not None for s in seqs):
            g, vocab = hs.shape[1], model.args.vocab_size
            scale, noise = [], []
            for b, s in enumerate(seqs):
                if s.sampler is None:
                    scale.append(1.0)
                    noise.append(mx.zeros(logits.shape[1:], dtype=logits.dtype))
                else:
                    scale.append(1.0 / s.sampler.temp)
                    noise.append(coupled_noise(model, s.sampler.noise_after(rows[b], g, vocab)))
            logits = logits * mx.array(scale, dtype=logits.dtype)[:, None, None] \
                + mx.stack(noise).astype(logits.dtype)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        k = max(s.settings.top_k for s in seqs)
        idx = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., :k]
        vals = mx.take_along_axis(logprobs, idx, axis=-1)
        order = mx.argsort(-vals, axis=-1)
        idx = mx.take_along_axis(idx, order, axis=-1)
        return model.draft_tokens(idx), mx.take_along_axis(vals, order, axis=-1)
