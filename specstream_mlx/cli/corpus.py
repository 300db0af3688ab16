"""Build a corpus-draft datastore (corpus.npy) from distilled answers of the model."""

from __future__ import annotations

import argparse
from pathlib import Path

from specstream_mlx.checkpoint import CORPUS_FILE, save_corpus
from specstream_mlx.errors import InputError
from specstream_mlx.jsonl import read_jsonl
from specstream_mlx.loader import load_tokenizer_of, resolve_path
from specstream_mlx.settings import check_output_path
from specstream_mlx.training.data import corpus_documents


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="comma-separated JSONL files of distilled records (the model's "
                             "own 'completion's, as `specstream data` writes them)")
    parser.add_argument("--model", default=None,
                        help="model folder whose tokenizer encodes them (default: embedded)")
    parser.add_argument("--out", default=None,
                        help=f"output file (default: --model's folder's {CORPUS_FILE}, which "
                             "its decoding then uses; required for the embedded model, whose "
                             "corpus comes with the package)")


def main(args: argparse.Namespace) -> int:
    files = [f.strip() for f in args.data.split(",") if f.strip()]
    if not files:
        raise InputError("--data: give at least one JSONL file")
    if args.out is None and args.model is None:
        raise InputError("--out is required for the embedded model (its folder gets the "
                         "package's corpus at every load)")
    records = [r for f in files for r in read_jsonl(f)]
    path = resolve_path(args.model)
    out = Path(args.out) if args.out else path / CORPUS_FILE
    check_output_path(out, "--out")
    tokenizer = load_tokenizer_of(path)  # the weights are not needed
    docs = corpus_documents(tokenizer, records)
    if not docs:
        raise InputError(f"{args.data}: no completions to build a corpus from")
    save_corpus(docs, out)
    print(f"wrote {sum(map(len, docs))} tokens of {len(docs)} answers to {out}")
    return 0
