"""Generate a completion for one prompt and print it with its statistics."""

from __future__ import annotations

import argparse
import sys

from specstream_mlx.cli.args import check_args, generate_kwargs
from specstream_mlx.generate import format_stats, stream_generate
from specstream_mlx.loader import describe_model, load


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads stdin)")
    parser.add_argument("--raw", action="store_true",
                        help="feed the prompt as is, without the chat template")


def main(args: argparse.Namespace) -> int:
    check_args(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load(args.model, precision=args.precision)
    print(f"[{describe_model(model)}]", file=sys.stderr)
    last = None
    for last in stream_generate(model, tokenizer, prompt, chat=not args.raw,
                                **generate_kwargs(args)):
        print(last.text, end="", flush=True)
    print()
    if last is not None:
        print(format_stats(last), file=sys.stderr)
    return 0
