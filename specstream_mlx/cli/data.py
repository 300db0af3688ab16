"""Build train / held-out prompt sets from real sources, with self-distilled completions."""

from __future__ import annotations

import argparse
from pathlib import Path

from specstream_mlx.errors import InputError
from specstream_mlx.jsonl import read_jsonl, write_jsonl
from specstream_mlx.loader import resolve_path
from specstream_mlx.settings import check_output_path, check_value
from specstream_mlx.training.data import DEFAULT_SOURCES, build_prompt_sets, distill
from specstream_mlx.training.distributed import Group


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder for the JSONL files")
    parser.add_argument("--model", default=None, help="model that writes the completions")
    parser.add_argument("--chat", type=int, default=600, help="chat training prompts")
    parser.add_argument("--code", type=int, default=600, help="code training prompts")
    parser.add_argument("--heldout", type=int, default=16,
                        help="held-out prompts per source (HumanEval, chitchat and each "
                             "extra source)")
    parser.add_argument("--valid", type=int, default=48, help="validation prompts (distilled)")
    parser.add_argument("--max-tokens", type=int, default=192, help="completion length")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                        help="comma-separated prompt sources: chitchat, humaneval, stdlib "
                             "(the default), and numpy, sympy, networkx (documented "
                             "functions), evals (pip install --no-deps evals), pydocs "
                             "(requests about the standard library's docstrings), "
                             "chitchat-turns (two-turn conversations); each extra "
                             "source holds out --heldout prompts of its own")
    parser.add_argument("--exclude", default="",
                        help="comma-separated JSONL files (an earlier stage's train and "
                             "valid files) whose prompts are left out: --chat and --code "
                             "then count new prompts; the held-out split does not change")
    parser.add_argument("--temp", type=float, default=0.0,
                        help="sample the completions at this temperature instead of greedy "
                             "(the text a sampled generation drafts on); record i of a "
                             "file is seeded --seed + i (train after valid)")
    parser.add_argument("--record-seeds", action="store_true",
                        help="with --temp and --prompts: a record that carries a 'seed' is "
                             "sampled from it (reproduces an earlier sampled file)")
    parser.add_argument("--prompts", default=None,
                        help="a JSONL file of prompts (an earlier set) to complete into "
                             "OUT/train.jsonl instead of building prompt sets; the set "
                             "flags (--chat, --code, --valid, --heldout, --sources, "
                             "--exclude) do not apply")
    parser.add_argument("--resume", action="store_true",
                        help="keep the completions already written and distill the rest")
    parser.add_argument("--dist-timeout", type=float, default=600.0,
                        help="under mlx.launch: seconds a process waits for the others")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    for flag in ("chat", "code", "heldout", "valid", "seed"):
        if getattr(args, flag) < 0:
            raise InputError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    check_value("max_tokens", args.max_tokens, "--max-tokens")
    check_value("batch_size", args.batch_size, "--batch-size")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder")
    check_output_path(out / "train.jsonl", "--out")
    check_value("temp", args.temp, "--temp")
    if args.record_seeds and (args.prompts is None or not args.temp > 0):
        raise InputError("--record-seeds samples a --prompts file's records from their own "
                         "seeds: give --prompts and --temp > 0")
    group = Group(args.dist_timeout)
    model = resolve_path(args.model)
    sample = {"temp": args.temp, "seed": args.seed}
    if args.prompts is not None:
        records = read_jsonl(args.prompts)
        if not records:
            raise InputError(f"--prompts {args.prompts} holds no records")
        if any(not isinstance(r.get("prompt"), str) and "turns" not in r for r in records):
            raise InputError(f"--prompts {args.prompts}: every record needs a 'prompt' text "
                             "or 'turns'")
        path = out / "train.jsonl"
        done = distill(model, records, max_tokens=args.max_tokens, batch_size=args.batch_size,
                       out_path=path, resume=args.resume, group=group,
                       record_seeds=args.record_seeds, **sample)
        if group.main:
            print(f"wrote {len(done)} records to {path}")
        return 0
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    exclude = {key for f in args.exclude.split(",") if f.strip()
               for r in read_jsonl(f.strip()) for key in (r.get("id"), r.get("prompt")) if key}
    sets = build_prompt_sets(args.chat + args.valid // 2, args.code + args.valid // 2,
                             args.heldout, args.seed, sources, exclude)
    # Validation prompts come off the training pool, so training never sees them.
    valid_n = args.valid
    valid, train = sets["train"][:valid_n], sets["train"][valid_n:]
    if group.main:
        write_jsonl(out / "heldout.jsonl", sets["heldout"])
    for name, records in (("valid", valid), ("train", train)):
        path = out / f"{name}.jsonl"
        done = distill(model, records, max_tokens=args.max_tokens, batch_size=args.batch_size,
                       out_path=path, resume=args.resume, group=group, **sample)
        sample["seed"] = (sample["seed"] + len(records)) % 2**32  # train draws anew
        if group.main:
            print(f"wrote {len(done)} records to {path}")
    if group.main:
        print(f"wrote {len(sets['heldout'])} held-out prompts to {out / 'heldout.jsonl'}")
    return 0
