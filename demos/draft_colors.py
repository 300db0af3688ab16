"""Show which tokens came from the model's own drafts.

Each pass of Speculative Streaming verifies the tokens the streams drafted in the
previous pass and commits one token of its own. This demo prints the answer with the
accepted drafted tokens (from_draft=True) in green and the committed ones plain, then
the share of drafted tokens. Streams that were never fine-tuned (as the embedded model's
are) draft few accepted tokens; trained streams turn much of the text green.

    python demos/draft_colors.py
    python demos/draft_colors.py --prompt "List three fruits." --max-tokens 64
    python demos/draft_colors.py --model path/to/folder
"""

from __future__ import annotations

import argparse

from specstream_mlx import load, stream_generate

GREEN, RESET = "\033[32m", "\033[0m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: embedded model)")
    parser.add_argument("--prompt", default="Write a short poem about the sea.")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    last = None
    for last in stream_generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens):
        piece = f"{GREEN}{last.text}{RESET}" if last.from_draft and last.text else last.text
        print(piece, end="", flush=True)
    print("\n")
    print(f"legend: {GREEN}drafted by the streams, accepted by verification{RESET} | "
          "committed by the pass itself")
    share = last.drafted_tokens / last.generation_tokens
    print(f"drafted: {last.drafted_tokens} of {last.generation_tokens} tokens ({share:.0%}), "
          f"{last.passes} passes, {last.tokens_per_pass:.2f} tokens/pass")


if __name__ == "__main__":
    main()
