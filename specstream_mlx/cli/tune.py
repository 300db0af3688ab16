"""Choose tree budget, lookup depth and draft floor by replaying decoding (greedy, or sampled
with --temp) on prompts."""

from __future__ import annotations

import argparse

from specstream_mlx.tools.tune import TuneArgs, tune


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True,
                        help="JSONL with 'prompt' (and 'completion': a distilled answer), or "
                        "'turns' (a conversation's user messages: its last turn is replayed)")
    parser.add_argument("--model", default=None, help="model folder (default: embedded)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--budgets", type=_ints, default=None, help="e.g. 0,1,2,4")
    parser.add_argument("--lookup-depths", type=_ints, default=None, help="e.g. 0,6,12")
    parser.add_argument("--min-draft-probs", type=lambda t: [float(x) for x in t.split(",")],
                        default=None, help="e.g. 0,0.1")
    parser.add_argument("--corpus-depths", type=_ints, default=None,
                        help="e.g. 0,8 (default: 0 and the model's, when it has a corpus)")
    parser.add_argument("--draft-top-k", type=int, default=None,
                        help="draft candidates per stream (default: the model's stream config)")
    parser.add_argument("--rows", type=_ints, default=None, help="rows for the pass costs")
    parser.add_argument("--write", action="store_true",
                        help="store the best setting in the model folder's config.json")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--temp", type=float, default=0.0,
                        help="replay sampling at this temperature (the model's own sampled "
                        "answers; --write then stores only sampled_tree_budget, sampled_top_k and "
                        "sampled_min_draft_prob)")
    parser.add_argument("--seed", type=int, default=0,
                        help="with --temp: prompt i samples with seed + i")


def main(args: argparse.Namespace) -> int:
    tune(TuneArgs(prompts=args.prompts, model=args.model, max_tokens=args.max_tokens,
                  limit=args.limit, budgets=args.budgets, lookup_depths=args.lookup_depths,
                  min_draft_probs=args.min_draft_probs, corpus_depths=args.corpus_depths,
                  draft_top_k=args.draft_top_k,
                  rows=args.rows, write=args.write, json_path=args.json, temp=args.temp,
                  seed=args.seed))
    return 0
