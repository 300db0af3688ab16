"""Choosing the drafting settings from data: an exact replay of speculative decoding.

Under greedy decoding a pass accepts the longest tree path that matches the model's own
continuation, and the streams' candidates at a position depend only on the tokens up to
it (conditioned streams: and the next one, which greedy decoding fixes too). So one
teacher-forced pass over a prompt and its greedy answer gives every position's
candidates, and any drafter setting (tree budget, top-k, min_draft_prob, lookup depth) is
replayed from them in milliseconds, pass for pass as `generate_step` would run it: with
the whole budget drafted every step (`replay`, the tokens per pass that transfer to
hardware where rows are nearly free) and with the drafting controller choosing each step
(`replay_controlled`, what decoding runs). Both are timed by the one cost model decoding
uses (costs.PassCosts over this machine's measured passes), and the controller replay
decides with it too, so a setting's predicted speed-up is the controller's.
Sampling replays the same way: a PositionSampler draws each position's token from the
seed and the position alone, so the sampled answer is plain decoding's whatever is
drafted, and a pass accepts the longest path matching it (the trace couples the
streams' candidates with the sampler's noise, as decoding does: step.stream_candidates).

Worked example: answer tokens after the prompt [x y z w], root x. If a pass drafts the
tree  x -> y -> q  and  x -> z, the path x y matches, q does not: it emits y plus the
bonus z, uses 4 rows, and the next root is z with the candidates of row y.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from specstream_mlx.checkpoint import CONFIG_KEY, CORPUS_FILE
from specstream_mlx.decoding.controller import Controller
from specstream_mlx.decoding.costs import PassCosts, costs_for
from specstream_mlx.decoding.drafter import (
    DraftSettings,
    StreamProposal,
    TreeBuilder,
    budget_drafter,
    model_corpus,
    pick_chain,
    planned_tree,
)
from specstream_mlx.decoding.lookup import NgramIndex
from specstream_mlx.decoding.pass_curve import pass_cost
from specstream_mlx.decoding.priors import (
    CONTEXT_MATCHES,
    CORPUS_MATCHES,
    PRIORS_FILE,
    DraftingPriors,
    Priors,
    model_priors,
    priors_json,
    read_priors,
    write_priors,
)
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.decoding.step import (
    choose,
    coupled_noise,
    stream_candidates,
)
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError
from specstream_mlx.settings import check_output_path, check_rows, check_settings, check_value


@dataclass
class Trace:
    """A prompt and its greedy answer with the streams' candidates at every position.

    tokens: prompt + answer ids; start: prompt length; candidates, logprobs:
    (len(tokens) - start, gamma, k), row i from the stream rows of position start-1+i.
    """

    tokens: list[int]
    start: int
    candidates: np.ndarray
    logprobs: np.ndarray


def trace(model, prompt: list[int], answer: list[int], top_k: int,
          sampler: PositionSampler | None = None) -> Trace:
    """One teacher-forced pass over prompt + answer. The answer is cut at the first token
    that is not the model's own choice (greedy, or `sampler`'s draw at that position: a
    re-tokenized distilled answer can differ from the ids the model produced, and a
    near-tie can round the other way), so the trace is exactly that decoding."""
    if model.stream_args is None:
        raise InputError("the model has no streams to replay")
    tokens = list(prompt) + list(answer)
    L, start = len(tokens), len(prompt)
    positions = mx.arange(L, dtype=mx.int32)
    rows = mx.arange(start - 1, L, dtype=mx.int32)
    h = model.lower(mx.array([tokens], dtype=mx.int32), positions)
    # Conditioned streams get the answer's next token (the last row's, unknown, is cut).
    nxt = mx.array([tokens[1:] + [0]], dtype=mx.int32)[:, start - 1 :]
    h, hs = model.upper(h, positions, None, None, rows, next_tokens=nxt)
    chosen = choose(model.head(h[0, start - 1 : L - 1]), sampler, np.arange(start - 1, L - 1))
    if sampler is None:
        cand, lp = stream_candidates(model, hs[0], top_k)
    else:  # coupled, as decoding drafts: row i's streams meet the noise at i + 1 .. i + gamma
        gamma = model.stream_args.num_streams
        noise = coupled_noise(model, sampler.noise(np.arange(start, L + gamma),
                                                   model.args.vocab_size))
        ahead = np.arange(L - start + 1)[:, None] + np.arange(gamma)[None]
        cand, lp = stream_candidates(model, hs[0], top_k, temp=sampler.temp,
                                     noise=noise[mx.array(ahead)])
    mx.eval(chosen, cand, lp)
    agree = np.array(chosen) == np.array(answer)
    n = len(answer) if agree.all() else int(np.argmin(agree))
    return Trace(tokens[: start + n], start, np.array(cand)[: n], np.array(lp)[: n])


@dataclass
class Replay:
    """Replayed decoding of one trace: tokens emitted, passes after the prefill, rows of
    every pass (root included), accepted drafted tokens per pass."""

    tokens: int
    passes: int
    rows: list[int]
    accepted: list[int]
    # Stream nodes by depth d (index d, 0 unused): the sum of their path probabilities
    # and how many were accepted; their ratio is what the controller calibrates.
    predicted: np.ndarray
    taken: np.ndarray


def path_targets(tree: DraftTree, answer: list[int], root: int) -> list[int]:
    """The main stream's greedy choice after each node, where it is known: answer[root +
    depth + 1] for nodes whose path matches the answer, -1 (never a token) elsewhere."""
    targets, on_path = [-1] * len(tree), [True] * len(tree)
    for i in range(len(tree)):
        if i:
            par, d = tree.parents[i - 1], int(tree.depths[i])
            on_path[i] = (on_path[par] and root + d < len(answer)
                          and tree.tokens[i - 1] == answer[root + d])
        nxt = root + int(tree.depths[i]) + 1
        if on_path[i] and nxt < len(answer):
            targets[i] = answer[nxt]
    return targets


def count_stream_nodes(tree: DraftTree, path: list[int], predicted: np.ndarray,
                       taken: np.ndarray) -> None:
    """Add a pass's stream nodes (they come first in the tree) to the calibration sums by
    depth: their path probabilities to `predicted`, the accepted ones to `taken`."""
    on_path = set(path)
    for i, lp in enumerate(tree.logprobs, start=1):
        predicted[tree.depths[i]] += math.exp(lp)
        taken[tree.depths[i]] += i in on_path


def replay(tr: Trace, drafter: TreeBuilder, max_tokens: int | None = None) -> Replay:
    """Speculative decoding of `tr` (greedy or sampled, as traced) with `drafter`, without
    running the model.

    Mirrors generate_step: the prefill emits the first answer token and drafts from the
    last prompt row; each pass feeds root + tree, emits the accepted path and the bonus.
    """
    answer = tr.tokens[tr.start :]
    limit = len(answer) if max_tokens is None else min(max_tokens, len(answer))
    rows, accepted = [], []
    gamma = tr.candidates.shape[1]
    predicted, taken = np.zeros(gamma + 1), np.zeros(gamma + 1)
    r = 0  # index in `answer` of the root: answer[: r + 1] is emitted, the root not fed
    while r + 1 < limit:
        draft = StreamProposal(tr.candidates[r], tr.logprobs[r])
        # As in generate_step: no deeper than the tokens still allowed after the root.
        tree = drafter(draft, tr.tokens[: tr.start + r + 1]).truncate(limit - r - 2)
        path, _ = tree.accept(path_targets(tree, answer, r))
        count_stream_nodes(tree, path, predicted, taken)
        rows.append(len(tree))
        accepted.append(len(path) - 1)
        r += len(path)
    return Replay(min(r + 1, limit), len(rows), rows, accepted, predicted, taken)


@dataclass
class Setting:
    """One drafter configuration and its replayed and predicted results."""

    tree_budget: int
    lookup_depth: int
    min_draft_prob: float
    corpus_depth: int = 0
    tokens_per_pass: float = 0.0
    median_tokens_per_pass: float = 0.0  # of the prompts' own tokens per pass
    mean_rows: float = 0.0
    controlled_tokens_per_pass: float = 0.0  # the controller's (what decoding runs)
    predicted_speedup: float = 0.0
    # Accepted / predicted stream nodes by depth 1, 2, ... (their path probabilities
    # summed): the controller's calibration (controller.SAMPLED_START when sampling).
    calibration: list[float] = field(default_factory=list)


def replay_controlled(tr: Trace, d: DraftSettings, costs: PassCosts, priors: Priors,
                      corpus=None, max_tokens: int | None = None) -> tuple[Replay, float]:
    """Speculative decoding of `tr` as generate_step runs it with its controller (drafting
    settings `d`, the model's `priors`), every pass timed and decided by `costs` (fixed:
    the replay does not feed its own estimates back). Returns the replay and the seconds
    of its passes after the prefill."""
    answer = tr.tokens[tr.start :]
    limit = len(answer) if max_tokens is None else min(max_tokens, len(answer))
    gamma = tr.candidates.shape[1]
    controller = Controller(costs, gamma, priors)
    index = NgramIndex() if d.lookup > 0 else None
    rows, accepted, seconds = [], [], 0.0
    predicted, taken = np.zeros(gamma + 1), np.zeros(gamma + 1)
    draft = StreamProposal(tr.candidates[0], tr.logprobs[0])  # the prefill drafts
    r = 0
    while r + 1 < limit:
        tree, plan, source = planned_tree(controller, draft, tr.tokens[: tr.start + r + 1],
                                          index, d, corpus)
        tree = tree.truncate(limit - r - 2)
        path, _ = tree.accept(path_targets(tree, answer, r))
        controller.observe(tree, plan, source, path, None)
        seconds += costs.estimate(len(tree), plan.draft)
        count_stream_nodes(tree, path, predicted, taken)
        rows.append(len(tree))
        accepted.append(len(path) - 1)
        r += len(path)
        draft = (StreamProposal(tr.candidates[r], tr.logprobs[r])
                 if plan.draft and r < len(tr.candidates) else None)
    return Replay(min(r + 1, limit), len(rows), rows, accepted, predicted, taken), seconds


def evaluate(traces: list[Trace], setting: Setting, top_k: int, costs: PassCosts,
             max_tokens: int | None, corpus=None, priors: Priors | None = None) -> Setting:
    """Replay every trace with `setting` (its corpus drafts from `corpus`, a CorpusIndex):
    the whole budget drafted every step (tokens per pass, rows, calibration) and, with
    `priors`, the controller choosing each step (controlled tokens per pass and the
    predicted speed-up: plain time / speculative time of the same tokens, by `costs`);
    without `priors` the speed-up is the whole budget's."""
    tokens = passes = timed_tokens = 0
    rows_total, spec_s, per_prompt = 0, 0.0, []
    ctl_tokens = ctl_passes = 0
    predicted = taken = 0.0
    d = DraftSettings(True, setting.tree_budget, top_k, setting.lookup_depth,
                      setting.min_draft_prob, setting.corpus_depth if corpus else 0)
    for tr in traces:
        tr = Trace(tr.tokens, tr.start, tr.candidates[..., :top_k], tr.logprobs[..., :top_k])
        drafter = budget_drafter(setting.tree_budget, setting.lookup_depth,
                                 setting.min_draft_prob, corpus, setting.corpus_depth)
        rp = replay(tr, drafter, max_tokens)
        # Tokens per pass as bench counts them (the prefill is a pass that emits one);
        # time after the first token, which the prefill costs both decoders alike.
        tokens += rp.tokens
        passes += rp.passes + 1
        per_prompt.append(rp.tokens / (rp.passes + 1))
        timed_tokens += rp.tokens - 1
        rows_total += sum(rp.rows)
        predicted, taken = predicted + rp.predicted, taken + rp.taken
        if priors is None:
            spec_s += sum(costs.estimate(n, True) for n in rp.rows)
        else:
            ctl, seconds = replay_controlled(tr, d, costs, priors, corpus, max_tokens)
            ctl_tokens += ctl.tokens
            ctl_passes += ctl.passes + 1
            spec_s += seconds
    setting.tokens_per_pass = tokens / max(passes, 1)
    setting.median_tokens_per_pass = float(np.median(per_prompt)) if per_prompt else 0.0
    setting.mean_rows = rows_total / max(passes - len(traces), 1)
    setting.controlled_tokens_per_pass = ctl_tokens / max(ctl_passes, 1)
    plain_s = costs.estimate(1, False)
    setting.predicted_speedup = timed_tokens * plain_s / spec_s if spec_s else 0.0
    if traces:
        setting.calibration = [round(float(t / p), 4) if p > 0 else 0.0
                               for t, p in zip(taken[1:], predicted[1:], strict=True)]
    return setting


def chain_rates(traces: list[Trace], lookup: int, corpus, corpus_depth: int,
                max_tokens: int | None) -> dict[tuple[str, int] | str, list[float]]:
    """Acceptance of context and corpus chains drafted in full at every step of the
    answers: [accepted, tried] of first tokens by ChainSource.bucket(), and of next tokens
    given the previous by kind (the controller's chain priors)."""
    stats: dict = {}
    for tr in traces:
        answer = tr.tokens[tr.start :]
        limit = len(answer) if max_tokens is None else min(max_tokens, len(answer))
        index = NgramIndex() if lookup > 0 else None
        r = 0
        while r + 1 < limit:
            chain, source = pick_chain(tr.tokens[: tr.start + r + 1], index, lookup, corpus,
                                       corpus_depth)
            chain = chain[: max(0, limit - r - 2)]
            run = 0
            while run < len(chain) and chain[run] == answer[r + 1 + run]:
                run += 1
            if chain and source is not None:
                first = stats.setdefault(source.bucket(), [0.0, 0.0])
                first[0], first[1] = first[0] + (run > 0), first[1] + 1
                if run:
                    follow = stats.setdefault(source.kind, [0.0, 0.0])
                    follow[0] += run - 1
                    follow[1] += min(len(chain) - 1, run)
            r += run + 1
    return stats


def measured_priors(old: Priors, setting: Setting, stats: dict) -> Priors:
    """`old` with what this replay measured: the stream calibration by depth of the whole
    budget and the chain rates seen (a rate nothing drafted keeps its old value)."""
    def rate(key, default):
        a, n = stats.get(key, (0.0, 0.0))
        return round(a / n, 4) if n else default

    context = {n: rate(("context", n), old.first("context", n)) for n in CONTEXT_MATCHES}
    corpus = {n: rate(("corpus", n), old.first("corpus", n)) for n in CORPUS_MATCHES}
    calibration = tuple(c for c in setting.calibration if c > 0) or old.stream_calibration
    return Priors(calibration, old.stream_weight, context, rate("context", old.context_next),
                  corpus, rate("corpus", old.corpus_next))


def grid(budgets: list[int], depths: list[int], min_probs: list[float],
         corpus_depths: list[int] = (0,)) -> list[Setting]:
    return [Setting(b, d, p, c) for b, d, p, c in
            itertools.product(budgets, depths, min_probs, corpus_depths) if b > 0 or d > 0 or c > 0]


def load_traces(model, tokenizer, records: list[dict], top_k: int, max_tokens: int,
                progress: bool = True, temp: float = 0.0, seed: int = 0
                ) -> list[Trace | None]:
    """Traces of JSONL records, aligned with them (None: no answer): greedy, the
    'completion' when present (distilled data), else the model's greedy answer generated
    here; temp > 0, the model's answer sampled here by a PositionSampler seeded seed + i
    for the i-th record (a distilled completion is greedy, so it is not used). An answer
    generated here ends before its first end token, as a distilled completion does.
    A 'turns' record is traced at its last turn, after the model's own greedy answers
    to the earlier ones (generate.encode_record, `max_tokens` each); its answer is always
    generated here (a 'completion' followed some other history)."""
    from specstream_mlx.decoding.step import generate_step
    from specstream_mlx.generate import encode_record

    eos = set(tokenizer.eos_token_ids)
    traces = []
    for n, rec in enumerate(records, start=1):
        prompt = encode_record(model, tokenizer, rec, max_tokens)
        sampler = PositionSampler(temp, seed=(seed + n - 1) % 2**32) if temp > 0 else None
        if rec.get("completion") and sampler is None and "turns" not in rec:
            answer = list(tokenizer.encode(rec["completion"], add_special_tokens=False))
        else:
            # Up to the end token, where decoding stops, as a distilled completion ends:
            # tokens the model would write past it are no answer of a real generation.
            answer = []
            for event in generate_step(model, prompt, max_tokens=max_tokens,
                                       sampler=sampler, speculative=False):
                if event.token in eos:
                    break
                answer.append(event.token)
        tr = trace(model, prompt, answer[:max_tokens], top_k, sampler) if answer else None
        traces.append(tr if tr is not None and len(tr.tokens) > tr.start else None)
        if progress:
            print(f"\rtraced {n}/{len(records)}", end="", flush=True)
    if progress:
        print()
    return traces


def write_defaults(model_path: str | Path, setting: Setting, corpus: bool = False,
                   sampled_top_k: int | None = None) -> None:
    """Store the chosen drafting defaults in the folder's speculative_streaming block (the
    corpus depth only for a folder with a corpus, the only one that replays it). With
    `sampled_top_k` (a replay of sampling) only the sampling fields are stored: that
    top-k, the setting's budget and floor (the draft depths are shared with greedy
    decoding)."""
    path = Path(model_path) / "config.json"
    config = json.loads(path.read_text())
    block = config.get("speculative_streaming")
    if block is None:
        raise InputError(f"{path} has no speculative_streaming block")
    if sampled_top_k is not None:
        block.update(sampled_top_k=sampled_top_k, sampled_tree_budget=setting.tree_budget,
                     sampled_min_draft_prob=setting.min_draft_prob)
    else:
        block.update(tree_budget=setting.tree_budget, lookup_depth=setting.lookup_depth,
                     min_draft_prob=setting.min_draft_prob)
        if corpus:
            block.update(corpus_depth=setting.corpus_depth)
    path.write_text(json.dumps(config, indent=2))


def report_rows(settings: list[Setting]) -> list[dict]:
    return [asdict(s) for s in settings]


@dataclass
class TuneArgs:
    prompts: str
    model: str | None = None
    max_tokens: int = 128
    limit: int | None = None
    budgets: list[int] | None = None
    lookup_depths: list[int] | None = None
    min_draft_probs: list[float] | None = None
    corpus_depths: list[int] | None = None
    draft_top_k: int | None = None
    rows: list[int] | None = None
    write: bool = False
    json_path: str | None = None
    temp: float = 0.0  # > 0: replay sampling at this temperature
    seed: int = 0  # the i-th prompt samples with seed (seed + i) mod 2**32


def check_tune_args(args: TuneArgs) -> None:
    """Every setting of the grid checked before any replay."""
    check_settings(max_tokens=args.max_tokens, draft_top_k=args.draft_top_k, limit=args.limit,
                   temp=args.temp, seed=args.seed)
    for name, values in (("tree_budget", args.budgets), ("lookup_depth", args.lookup_depths),
                         ("min_draft_prob", args.min_draft_probs),
                         ("corpus_depth", args.corpus_depths)):
        if values is not None and not values:
            raise InputError(f"{name}: the grid is empty")
        for v in values or ():
            check_value(name, v, f"{name} grid value")
    if args.rows is not None:
        check_rows(args.rows)
    check_output_path(args.json_path, "json")


def tune(args: TuneArgs, log=print) -> dict:
    """Replay every setting of the grid on the prompts, predict speed-ups from this
    machine's measured pass costs, print the best settings (and store the best)."""
    from specstream_mlx.jsonl import prompt_id, read_prompts, user_turns
    from specstream_mlx.loader import describe_model, load, resolve_path

    check_tune_args(args)
    records = read_prompts(args.prompts, args.limit)
    path = resolve_path(args.model)
    model, tokenizer = load(path)
    if model.stream_args is None:
        raise InputError(f"{path} has no streams: nothing to tune")
    if args.write and CONFIG_KEY not in json.loads((path / "config.json").read_text()):
        raise InputError(f"{path} has no streams of its own (they come from the package): "
                         "--write needs a folder that holds them (specstream convert it)")
    log(f"[{describe_model(model)}]")
    sampled = args.temp > 0
    # The top-k decoding would take (the config's sampled_top_k when sampling).
    top_k = DraftSettings.resolve(model, True, None, args.draft_top_k, None, None,
                             sampled=sampled).top_k
    if sampled:
        log(f"replaying sampling at temperature {args.temp} (seed {args.seed}), "
            f"top-k {top_k}")
    budgets = args.budgets or [0, 1, 2, 3, 4, 6, 8]
    depths = args.lookup_depths or [0, 4, 6, 8, 12]
    min_probs = args.min_draft_probs or [0.0, 0.05, 0.1, 0.2]
    corpus = model_corpus(model)
    if args.corpus_depths and any(args.corpus_depths) and corpus is None:
        raise InputError(f"{path} has no {CORPUS_FILE}: no corpus depths to try")
    corpus_depths = args.corpus_depths or (
        [0, model.stream_args.corpus_depth] if corpus is not None else [0])
    rows = args.rows or sorted({1, 2, 3, 4, 6, 8, 12, 16, 24})
    # The one cost model decoding uses, over fixed measurements of this machine's passes.
    drafting_ms = pass_cost(model, rows)
    plain_ms = pass_cost(model, rows, streams=False)
    costs = PassCosts.measured({r: t / 1000 for r, t in plain_ms.items()},
                               {r: t / 1000 for r, t in drafting_ms.items()},
                               dict(costs_for(model).curve))
    log("pass cost (ms) by rows, drafting: "
        + ", ".join(f"{k}: {v:.1f}" for k, v in drafting_ms.items())
        + "; plain: " + ", ".join(f"{k}: {v:.1f}" for k, v in plain_ms.items()))
    priors = model_priors(model).of(sampled)
    multi_turn = [prompt_id(r, i) for i, r in enumerate(records) if len(user_turns(r)) > 1]
    if multi_turn:
        log(f"{len(multi_turn)} of {len(records)} records multi-turn, replayed at their last "
            "turn after the model's greedy answers to the others: " + ", ".join(multi_turn))
    traces = load_traces(model, tokenizer, records, top_k, args.max_tokens,
                         temp=args.temp, seed=args.seed)
    by_task: dict[str, list[Trace]] = {}
    for rec, tr in zip(records, traces, strict=True):
        if tr is not None:
            by_task.setdefault(rec.get("task", "all"), []).append(tr)
    traces = [tr for trs in by_task.values() for tr in trs]
    settings = grid(budgets, depths, min_probs, sorted(set(corpus_depths)))
    results = {}
    for task, trs in {**by_task, "all": traces}.items():
        scored = [evaluate(trs, Setting(s.tree_budget, s.lookup_depth, s.min_draft_prob,
                                        s.corpus_depth),
                           top_k, costs, args.max_tokens, corpus, priors) for s in settings]
        scored.sort(key=lambda s: -s.predicted_speedup)
        results[task] = scored
        log(f"\n{task}: {len(trs)} prompts; best predicted settings (whole budget: tokens "
            "per pass drafting it every step; controller: as decoding runs)")
        log(f"{'budget':>6s} {'lookup':>6s} {'min p':>6s} {'corpus':>6s} {'tok/pass':>8s} "
            f"{'median':>6s} {'rows':>5s} {'ctl t/p':>7s} {'speed-up':>8s}")
        for s in scored[:8]:
            log(f"{s.tree_budget:6d} {s.lookup_depth:6d} {s.min_draft_prob:6.2f} "
                f"{s.corpus_depth:6d} {s.tokens_per_pass:8.2f} "
                f"{s.median_tokens_per_pass:6.2f} {s.mean_rows:5.1f} "
                f"{s.controlled_tokens_per_pass:7.2f} {s.predicted_speedup:7.2f}x")
        if scored and scored[0].calibration:
            log("stream nodes of the first row, accepted / predicted by depth: "
                + " / ".join(f"{c:.2f}" for c in scored[0].calibration))
    best = results["all"][0]
    stats = chain_rates(traces, max(depths), corpus, max(corpus_depths), args.max_tokens)
    measured = measured_priors(priors, best, stats)
    report = {"model": str(path), "temp": args.temp, "seed": args.seed, "top_k": top_k,
              "pass_cost_ms": drafting_ms, "plain_pass_cost_ms": plain_ms,
              "best": asdict(best), "priors": priors_json(measured),
              "multi_turn": multi_turn,
              "results": {t: report_rows(v) for t, v in results.items()}}
    if args.write:
        old = read_priors(path)
        new = (DraftingPriors(old.greedy, measured, old.source) if sampled
               else DraftingPriors(measured, old.sampled, old.source))
        write_priors(path, DraftingPriors(new.greedy, new.sampled,
                                          f"specstream tune --prompts {args.prompts}"))
        log(f"wrote the {'sampled' if sampled else 'greedy'} drafting priors to "
            f"{path / PRIORS_FILE}")
    if args.write and sampled:
        write_defaults(path, best, sampled_top_k=top_k)
        log(f"\nwrote sampled_tree_budget {best.tree_budget}, sampled_top_k {top_k}, "
            f"sampled_min_draft_prob {best.min_draft_prob} to {path / 'config.json'}")
    elif args.write:
        write_defaults(path, best, corpus is not None)
        depth = f", corpus_depth {best.corpus_depth}" if corpus is not None else ""
        log(f"\nwrote tree_budget {best.tree_budget}, lookup_depth {best.lookup_depth}, "
            f"min_draft_prob {best.min_draft_prob}{depth} to {path / 'config.json'}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report
