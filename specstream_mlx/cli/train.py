"""Train speculative streams (future n-gram prediction) on a JSONL dataset."""

from __future__ import annotations

import argparse
from dataclasses import fields

from specstream_mlx.training.train import TrainArgs, train

HELP = {
    "data": "training JSONL ('messages' or 'prompt'/'completion' records)",
    "valid": "held-out JSONL for validation loss and per-stream accuracy",
    "model": "base model folder or hub id (default: the embedded SmolLM2)",
    "run_dir": "folder for checkpoints and the output model (run_dir/model)",
    "mode": "lossless: base frozen, stream-only adapters; task: shared LoRA, fused",
    "resume": "continue from run_dir/checkpoint",
    "dist_timeout": "seconds a process of a data-parallel run (mlx.launch) waits for the "
                    "others before it stops with a message (default 600)",
    "soft_targets": "share (0 .. 1) of each stream's loss on the base model's own next-token "
                    "distribution instead of its greedy token (lossless mode; default 0)",
    "next_token_rank": "rank of the streams' projection of the next token (0: streams do not "
                       "see it; > 0 adds it, also to warm-started streams without one)",
    "warm_start": "start from the streams --model comes with (the shipped ones by default) "
                  "instead of fresh ones; the stream settings must match them",
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    for f in fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=HELP.get(f.name))
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
        required = f.name == "data"
        parser.add_argument(flag, type=kind, default=None if required else f.default,
                            required=required, help=HELP.get(f.name, f"default {f.default}"))
    parser.set_defaults(mode="lossless")


def main(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(TrainArgs)}
    result = train(TrainArgs(**values))
    if result["output"] is not None:  # rank 0 of a data-parallel run, or the only process
        print(f"streams written to {result['output']}")
    return 0
