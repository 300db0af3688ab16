"""Flags shared by the subcommands that load a model and decode, and their mapping."""

from __future__ import annotations

import argparse

import mlx.core as mx

from specstream_mlx.loader import PRECISIONS
from specstream_mlx.settings import check_settings


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every subcommand that loads a model and decodes."""
    parser.add_argument("--model", default=None,
                        help="model folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="weights at load time; auto = float32 on CPU, as stored elsewhere")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    parser.add_argument("--min-p", type=float, default=0.0,
                        help="min-p sampling: drop tokens below min_p x the top one (0: off)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample among the k most likely tokens (0: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--tree-budget", type=int, default=None,
                        help="draft nodes per pass (default: the model's stream config)")
    parser.add_argument("--draft-top-k", type=int, default=None,
                        help="draft candidates per stream (default: the model's stream config)")
    parser.add_argument("--lookup-depth", type=int, default=None,
                        help="context draft: tokens copied from where the current n-gram "
                             "occurred before (0: off; default: the model's stream config)")
    parser.add_argument("--corpus-depth", type=int, default=None,
                        help="corpus draft: tokens voted from the model's own earlier answers "
                             "(corpus.npy; 0: off; default: the model's stream config)")
    parser.add_argument("--min-draft-prob", type=float, default=None,
                        help="leave out stream drafts less likely than this (0 keeps the "
                             "whole budget; default: the model's stream config)")
    parser.add_argument("--no-speculative", action="store_true",
                        help="plain decoding, one token per pass (the baseline)")


def generate_kwargs(args: argparse.Namespace) -> dict:
    """stream_generate keyword arguments from the shared flags."""
    return {
        "max_tokens": args.max_tokens,
        "temp": args.temp,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "top_k": args.top_k,
        "speculative": not args.no_speculative,
        "tree_budget": args.tree_budget,
        "draft_top_k": args.draft_top_k,
        "lookup_depth": args.lookup_depth,
        "min_draft_prob": args.min_draft_prob,
        "corpus_depth": args.corpus_depth,
    }


def check_args(args: argparse.Namespace) -> None:
    """Reject bad values before a model is loaded, and seed the sampler."""
    check_settings(lambda name: "--" + name.replace("_", "-"), max_tokens=args.max_tokens,
                   temp=args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k,
                   seed=args.seed, tree_budget=args.tree_budget, draft_top_k=args.draft_top_k,
                   lookup_depth=args.lookup_depth, min_draft_prob=args.min_draft_prob,
                   corpus_depth=args.corpus_depth)
    if args.seed is not None:
        mx.random.seed(args.seed)
