"""Speculative vs plain decoding of the same model: tokens/s, tokens/pass, speed-up.

Both decoders run greedily on the same prompts, alternating (speculative, plain,
speculative, plain ...) after one warm-up run of each, so that a machine getting busier
or cooler affects both alike. Greedy speculative decoding must reproduce plain decoding
token for token: the demo checks that the texts are identical and exits with status 1
when they are not.

    python demos/speed_compare.py
    python demos/speed_compare.py --max-tokens 64 --rounds 3
    python demos/speed_compare.py --model path/to/folder --prompt "Explain gravity."

tokens/s counts the tokens after the first (the first comes from the prompt's prefill).
"""

from __future__ import annotations

import argparse
import sys

from specstream_mlx import load, stream_generate

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "List the days of the week.",
]


def run(model, tokenizer, prompt: str, max_tokens: int, speculative: bool):
    """(text, tokens/s, tokens/pass) of one greedy generation."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                speculative=speculative):
        text += last.text
    return text, last.generation_tps, last.tokens_per_pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: embedded model)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each decoder per prompt")
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    if model.stream_args is None:
        print("note: this model has no streams; both runs decode plainly", file=sys.stderr)
    prompts = args.prompt or PROMPTS
    for speculative in (True, False):  # warm-up
        run(model, tokenizer, prompts[0], min(8, args.max_tokens), speculative)

    print(f"{'prompt':32} {'spec tok/s':>10} {'tok/pass':>8} {'plain tok/s':>11} "
          f"{'speed-up':>8}  same text")
    all_same, ratios = True, []
    for prompt in prompts:
        spec, plain = [], []
        for _ in range(args.rounds):
            spec.append(run(model, tokenizer, prompt, args.max_tokens, True))
            plain.append(run(model, tokenizer, prompt, args.max_tokens, False))
        same = all(s[0] == plain[0][0] for s in spec + plain)
        all_same &= same
        spec_tps = sum(s[1] for s in spec) / len(spec)
        plain_tps = sum(p[1] for p in plain) / len(plain)
        ratio = spec_tps / plain_tps if plain_tps else float("nan")
        ratios.append(ratio)
        label = prompt if len(prompt) <= 32 else prompt[:29] + "..."
        print(f"{label:32} {spec_tps:10.1f} {spec[0][2]:8.2f} {plain_tps:11.1f} "
              f"{ratio:7.2f}x  {'yes' if same else 'NO'}")
    print(f"mean speed-up {sum(ratios) / len(ratios):.2f}x; greedy texts "
          f"{'identical' if all_same else 'DIFFER'}")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
