"""Chat with a model in the terminal: multi-turn, streamed, a statistics line per answer."""

from __future__ import annotations

import argparse
import sys

from specstream_mlx.cli.args import check_args, generate_kwargs
from specstream_mlx.decoding.prompt_cache import PromptCache
from specstream_mlx.errors import InputError
from specstream_mlx.generate import encode_messages, format_stats, stream_generate
from specstream_mlx.loader import describe_model, load
from specstream_mlx.settings import check_text

GREEN, RESET = "\033[32m", "\033[0m"
HELP = "Commands: /reset clears the conversation, /quit (or Ctrl-D) leaves."


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--show-draft", action="store_true",
                        help="colour the tokens that came from accepted drafts")


def answer(model, tokenizer, messages: list[dict], kwargs: dict, show_draft: bool,
           prompt_cache: PromptCache | None = None) -> str:
    """Stream one assistant answer to stdout; Ctrl-C stops it early. Returns its text.
    With `prompt_cache`, the conversation so far is not prefilled again."""
    ids = encode_messages(tokenizer, messages)
    text, last = "", None
    try:
        for last in stream_generate(model, tokenizer, ids, prompt_cache=prompt_cache,
                                    **kwargs):
            piece = last.text
            text += piece
            if show_draft and last.from_draft and piece:
                piece = f"{GREEN}{piece}{RESET}"
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print()
    if last is not None:
        print(format_stats(last), file=sys.stderr)
    return text


def chat_loop(model, tokenizer, kwargs: dict, system: str | None = None,
              show_draft: bool = False, read=None) -> None:
    """Read turns (from `read`, default input()) until /quit, Ctrl-D or Ctrl-C."""
    read = read or input
    messages = [{"role": "system", "content": system}] if system else []
    prompt_cache = PromptCache(model)  # each turn prefills only its new tokens
    while True:
        try:
            query = read(">> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if query.strip() in ("/quit", "/exit"):
            return
        if query.strip() == "/reset":
            messages = messages[:1] if system else []
            print("[conversation cleared]")
            continue
        if not query.strip():
            print(HELP)
            continue
        try:
            check_text(query)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": query})
        try:
            reply = answer(model, tokenizer, messages, kwargs, show_draft, prompt_cache)
        except InputError as e:
            messages.pop()
            print(f"error: {e}. Use /reset to start a new conversation.", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})


def main(args: argparse.Namespace) -> int:
    check_args(args)
    if args.system is not None:
        check_text(args.system, "--system")
    model, tokenizer = load(args.model, precision=args.precision)
    print(f"[{describe_model(model)}]\n{HELP}", file=sys.stderr)
    chat_loop(model, tokenizer, generate_kwargs(args), args.system, args.show_draft)
    return 0
