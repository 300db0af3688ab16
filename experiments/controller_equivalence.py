"""Does the drafting controller decide as it did before a refactor? Drives the controller
of a git revision (default 4cb47fc, before one cost model and the priors file) and the
working tree's side by side through the same replayed generations, on the same fixed pass
costs, and counts the steps where their plans differ.

    python experiments/controller_equivalence.py --prompts experiments/prompts/held12.jsonl \
        [--rev 4cb47fc] [--temp 0.7] [--max-tokens 128]

Timing-free, so it answers exactly what a paired speed A/B can only estimate: with the
same measured costs, the same choices mean the same speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import specstream_mlx  # noqa: F401  (BLAS before mlx)
from specstream_mlx.decoding.controller import Controller
from specstream_mlx.decoding.costs import PassCosts, costs_for
from specstream_mlx.decoding.drafter import DraftSettings, StreamProposal, pick_chain
from specstream_mlx.decoding.lookup import NgramIndex
from specstream_mlx.decoding.pass_curve import pass_cost
from specstream_mlx.decoding.priors import model_priors
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.jsonl import read_prompts
from specstream_mlx.loader import load
from specstream_mlx.tools.tune import load_traces, path_targets


def old_module(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:specstream_mlx/decoding/controller.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_controller.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_controller", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_controller"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def as_match(source):
    """The old controller's chain key: a context match length, or ("corpus", n)."""
    if source is None:
        return 0
    return source.n if source.kind == "context" else ("corpus", source.n)


def better_by(gain):
    return lambda a, b: gain(a[1], len(a[0])) > gain(b[1], len(b[0]))


def source_key_of(old):
    """A chain's source as the revision's own ChainSource type (dataclasses compare by
    type)."""
    def key(source):
        return None if source is None else old.ChainSource(source.kind, source.n)
    return key


def old_gain(ctl, key):
    return lambda source, m: ctl.chain_gain(key(source), m)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--rev", default="4cb47fc")
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    old = old_module(args.rev)
    model, tokenizer = load()
    sampled = args.temp > 0
    d = DraftSettings.resolve(model, True, None, None, None, None, sampled=sampled)
    rows = [1, 2, 3, 4, 6, 8, 9, 12, 16, 17, 24]
    drafting, plain = pass_cost(model, rows), pass_cost(model, rows, streams=False)
    curve = dict(costs_for(model).curve)
    new_costs = PassCosts.measured({r: t / 1000 for r, t in plain.items()},
                                   {r: t / 1000 for r, t in drafting.items()}, curve)
    old_costs = (old.PassCosts(curve=curve) if hasattr(old, "PassCosts")
                 else PassCosts(curve=curve))  # the cost model left controller.py
    for (r, draft), t in new_costs.table.items():
        old_costs.observe(r, draft, t)
    records = read_prompts(args.prompts, None)
    traces = load_traces(model, tokenizer, records, d.top_k, args.max_tokens,
                         temp=args.temp, seed=args.seed)
    steps = differ = drafted = 0
    for tr in traces:
        if tr is None:
            continue
        new = Controller(new_costs, model.stream_args.num_streams,
                         model_priors(model).of(sampled))
        if hasattr(old, "ChainSource"):  # a revision with priors and chain sources
            ref = old.Controller(old_costs, model.stream_args.num_streams,
                                 model_priors(model).of(sampled))
            key = source_key_of(old)
        else:
            ref = old.Controller(old_costs, model.stream_args.num_streams, sampled=sampled)
            key = as_match
        index = NgramIndex() if d.lookup else None
        answer = tr.tokens[tr.start:]
        draft, r = StreamProposal(tr.candidates[0], tr.logprobs[0]), 0
        while r + 1 < len(answer):
            history = tr.tokens[: tr.start + r + 1]
            full = (DraftTree.from_candidates(draft.candidates, draft.logprobs, d.budget,
                                              d.min_prob) if draft is not None else None)
            chain, source = pick_chain(history, index, d.lookup, model.corpus, d.corpus,
                                       better_by(new.chain_gain))
            old_chain, old_source = pick_chain(
                history, index, d.lookup, model.corpus, d.corpus,
                better_by(old_gain(ref, key)))
            match = key(source)
            plan = new.plan(full, len(chain), source)
            before = ref.plan(full, len(chain), match)
            if (plan.stream_nodes, plan.chain, plan.draft) != (
                    before.stream_nodes, before.chain, before.draft) or (chain, source) != (
                    old_chain, old_source):
                differ += 1
            steps += 1
            drafted += plan.draft
            tree = (full.first(plan.stream_nodes) if full is not None else DraftTree()
                    ).with_chain(chain[: plan.chain]).truncate(len(answer) - r - 2)
            path, _ = tree.accept(path_targets(tree, answer, r))
            new.observe(tree, plan, source, path, None)
            ref.observe(tree, plan, match, path, None)
            r += len(path)
            draft = (StreamProposal(tr.candidates[r], tr.logprobs[r])
                     if plan.draft and r < len(tr.candidates) else None)
    print(f"{args.prompts} temp {args.temp}: {steps} steps of {len(records)} prompts, "
          f"{drafted} drafting, plans differing from {args.rev}: {differ}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
