"""The `specstream` command: each subcommand module parses its flags and calls the library."""

from __future__ import annotations

import argparse
import sys
import warnings

from specstream_mlx.cli import bench as bench_cli
from specstream_mlx.cli import chat
from specstream_mlx.cli import convert as convert_cli
from specstream_mlx.cli import corpus as corpus_cli
from specstream_mlx.cli import data as data_cli
from specstream_mlx.cli import generate as generate_cli
from specstream_mlx.cli import serve as serve_cli
from specstream_mlx.cli import train as train_cli
from specstream_mlx.cli import tune as tune_cli
from specstream_mlx.cli.args import add_model_args
from specstream_mlx.errors import SpecstreamError

SUBCOMMANDS = {"chat": chat, "generate": generate_cli}
# Subcommands that do not decode: no model and sampling flags.
TOOL_SUBCOMMANDS = {
    "convert": convert_cli, "data": data_cli, "corpus": corpus_cli, "train": train_cli,
    "bench": bench_cli, "tune": tune_cli, "serve": serve_cli,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specstream", description="Speculative Streaming on MLX: fast self-drafting decoding."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in {**SUBCOMMANDS, **TOOL_SUBCOMMANDS}.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0])
        if name in SUBCOMMANDS:
            add_model_args(p)
        module.configure_parser(p)
        p.set_defaults(run=module.main)
    return parser


def _note(message, category, filename, lineno, file=None, line=None) -> str:
    return f"note: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _note
    try:
        return args.run(args) or 0
    except SpecstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
