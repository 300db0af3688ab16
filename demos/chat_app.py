"""A minimal multi-turn chat on the specstream_mlx Python API.

The app keeps the conversation as a list of messages, formats it with the tokenizer's chat
template every turn, streams the answer as it is decoded and prints how many tokens each
forward pass produced (tokens/pass > 1 means the model's drafts were accepted). A
PromptCache keeps the previous turn's KV cache, so each turn prefills only its new tokens.

    python demos/chat_app.py                          # the embedded SmolLM2-135M-Instruct
    python demos/chat_app.py --model path/to/folder   # any specstream / MLX model folder
    printf 'Hi!\\nWhat is 2+2?\\n' | python demos/chat_app.py --max-tokens 32

Type a message and press Enter; an empty line, Ctrl-D or Ctrl-C ends the chat.
"""

from __future__ import annotations

import argparse

from specstream_mlx import load, stream_generate
from specstream_mlx.decoding.prompt_cache import PromptCache
from specstream_mlx.errors import InputError
from specstream_mlx.generate import encode_messages


def answer(model, tokenizer, messages: list[dict], max_tokens: int,
           cache: PromptCache) -> str:
    """Stream the assistant's reply to `messages`, then print its statistics."""
    prompt = encode_messages(tokenizer, messages)
    reply, last = "", None
    print("assistant> ", end="", flush=True)
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                prompt_cache=cache):
        print(last.text, end="", flush=True)
        reply += last.text
    print()
    print(f"  [{last.generation_tokens} tokens in {last.passes} passes: "
          f"{last.tokens_per_pass:.2f} tokens/pass, {last.generation_tps:.1f} tokens/s, "
          f"{last.prompt_cached_tokens} of {last.prompt_tokens} prompt tokens reused]")
    return reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: embedded model)")
    parser.add_argument("--system", default="You are a helpful, concise assistant.")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    model, tokenizer = load(args.model)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    cache = PromptCache(model)
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        try:
            reply = answer(model, tokenizer, messages, args.max_tokens, cache)
        except InputError as e:  # e.g. the conversation outgrew the context: start over
            print(f"\n  [{e}; starting a new conversation]")
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
