"""A/B of a controller change by exact replay: the working tree's controller against a
revision's (--rev). Both replay the same traced answers under the same fixed pass costs
measured on this machine (tune's cost model), each following its own plans; prints tokens
per pass and the predicted speed-up. Measure with nothing else running during the first
seconds (the pass costs); the replay itself is timing-free.

Used for the probe count (issue 36): restarting it when drafting is kept because the
streams pay, against fac0fe3 (it runs on), held12: greedy 1.994 vs 1.972 tokens per pass,
predicted 1.425x vs 1.430x; temperature 0.7 (seed 1000) 1.680 vs 1.625, 1.302x vs
1.307x. More drafting, no faster here: not kept.

    python experiments/controller_ab.py --prompts experiments/prompts/held12.jsonl \
        [--temp 0.7 --seed 1000] [--max-tokens 128]
"""

from __future__ import annotations

import argparse

from controller_equivalence import old_module  # this folder: a script's sys.path[0]

import specstream_mlx  # noqa: F401  (BLAS before mlx)
import specstream_mlx.tools.tune as tune
from specstream_mlx.decoding.controller import Controller
from specstream_mlx.decoding.costs import PassCosts, costs_for
from specstream_mlx.decoding.drafter import DraftSettings, model_corpus
from specstream_mlx.decoding.pass_curve import pass_cost
from specstream_mlx.decoding.priors import model_priors
from specstream_mlx.jsonl import read_prompts
from specstream_mlx.loader import load


def controller_at(rev: str):
    """The Controller class of `rev`'s decoding/controller.py (same API as today's)."""
    return old_module(rev).Controller


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rev", default="fac0fe3", help="the revision to compare with")
    args = ap.parse_args()
    model, tokenizer = load()
    sampled = args.temp > 0
    d = DraftSettings.resolve(model, True, None, None, None, None, sampled=sampled)
    rows = [1, 2, 3, 4, 6, 8, 9, 12, 16, 17, 24]
    drafting, plain = pass_cost(model, rows), pass_cost(model, rows, streams=False)
    costs = PassCosts.measured({r: t / 1000 for r, t in plain.items()},
                               {r: t / 1000 for r, t in drafting.items()},
                               dict(costs_for(model).curve))
    records = read_prompts(args.prompts, None)
    traces = [t for t in tune.load_traces(model, tokenizer, records, d.top_k, args.max_tokens,
                                          temp=args.temp, seed=args.seed) if t is not None]
    priors = model_priors(model).of(sampled)
    corpus = model_corpus(model) if d.corpus else None
    plain_s = costs.estimate(1, False)
    for name, cls in (("working tree", Controller), (args.rev, controller_at(args.rev))):
        tune.Controller = cls
        tokens = passes = 0
        spec_s = timed = 0.0
        for tr in traces:
            rp, seconds = tune.replay_controlled(tr, d, costs, priors, corpus, args.max_tokens)
            tokens, passes = tokens + rp.tokens, passes + rp.passes + 1
            spec_s, timed = spec_s + seconds, timed + rp.tokens - 1
        print(f"{args.prompts} temp {args.temp} {name}: {tokens / passes:.3f} tokens/pass, "
              f"predicted {timed * plain_s / spec_s:.3f}x")
    tune.Controller = Controller


if __name__ == "__main__":
    main()
