"""Benchmark speculative against plain decoding (and mlx-lm) over a JSONL prompt set."""

from __future__ import annotations

import argparse

from specstream_mlx.loader import PRECISIONS
from specstream_mlx.settings import parse_counts
from specstream_mlx.tools.bench import BenchArgs, bench, compare


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True,
                        help="JSONL with 'prompt', or 'turns' (a conversation's user "
                        "messages: its last turn is measured), and 'task'")
    parser.add_argument("--model", default=None, help="model folder (default: embedded)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tree-budget", type=int, default=None)
    parser.add_argument("--draft-top-k", type=int, default=None,
                        help="draft candidates per stream (default: the model's stream config)")
    parser.add_argument("--lookup-depth", type=int, default=None,
                        help="context draft length (0: streams only; default: model config)")
    parser.add_argument("--min-draft-prob", type=float, default=None,
                        help="floor on a stream draft's path probability (default: model config)")
    parser.add_argument("--corpus-depth", type=int, default=None,
                        help="corpus draft length (0: off; default: model config, when the "
                             "model folder has a corpus)")
    parser.add_argument("--fixed-draft", action="store_true",
                        help="always draft the whole budget (no per-step controller)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--no-mlx-lm", action="store_true", help="skip mlx-lm's generate")
    parser.add_argument("--mlx-lm-precision", default="native", choices=PRECISIONS,
                        help="precision of mlx-lm's model (native: as a user runs it)")
    parser.add_argument("--rows", default="1,2,4,8,12,16,24,32",
                        help="row counts for the pass-cost table")
    parser.add_argument("--window", type=int, default=100,
                        help="also report the speed-up over every WINDOW tokens")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--png", default=None, help="draw a chart here (needs matplotlib)")
    parser.add_argument("--temp", type=float, default=0.0,
                        help="sample at this temperature (0: greedy, outputs compared)")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    parser.add_argument("--seed", type=int, default=0,
                        help="prompt i's runs (speculative, plain, mlx-lm) start from seed + i")
    parser.add_argument("--repeats", type=int, default=1,
                        help="speculative/plain pairs per prompt (alternating order); a "
                             "prompt's speed-up is the median of its pairs'")
    parser.add_argument("--conversation", type=int, default=0, metavar="TURNS",
                        help="also time the first token of each turn of a TURNS-turn "
                             "conversation, with KV reuse and with a fresh prefill")
    parser.add_argument("--compare", default=None, metavar="FOLDER",
                        help="A/B instead: plain, --model's streams (A) and FOLDER's (B, the "
                             "same base model) in rotating order, --repeats rounds a prompt")


def main(args: argparse.Namespace) -> int:
    bench_args = BenchArgs(
        prompts=args.prompts, model=args.model, max_tokens=args.max_tokens,
        tree_budget=args.tree_budget, draft_top_k=args.draft_top_k, lookup_depth=args.lookup_depth,
        min_draft_prob=args.min_draft_prob, corpus_depth=args.corpus_depth,
        adaptive=not args.fixed_draft,
        precision=args.precision,
        mlx_lm=not args.no_mlx_lm, mlx_lm_precision=args.mlx_lm_precision, limit=args.limit,
        rows=parse_counts(args.rows, "--rows"), window=args.window, json_path=args.json,
        png_path=args.png, conversation=args.conversation,
        temp=args.temp, top_p=args.top_p, seed=args.seed, repeats=args.repeats,
    )
    if args.compare:
        compare(bench_args, args.compare)
    else:
        bench(bench_args)
    return 0
