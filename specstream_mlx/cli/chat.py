"""Chat with a model in the terminal: multi-turn, streamed, a statistics line per answer."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from specstream_mlx.blas import cache_file
from specstream_mlx.checkpoint import write_json_atomic
from specstream_mlx.cli.args import check_args, generate_kwargs
from specstream_mlx.decoding.disk_cache import DiskPromptStore
from specstream_mlx.decoding.prompt_cache import PromptCache
from specstream_mlx.errors import InputError
from specstream_mlx.generate import encode_messages, format_stats, stream_generate
from specstream_mlx.loader import describe_model, load
from specstream_mlx.settings import check_text

GREEN, RESET = "\033[32m", "\033[0m"
HELP = "Commands: /reset clears the conversation, /quit (or Ctrl-D) leaves."
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HISTORY_FILE = "messages.json"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--show-draft", action="store_true",
                        help="colour the tokens that came from accepted drafts")
    parser.add_argument("--session", default=None, metavar="NAME",
                        help="keep this conversation (its messages and KV cache) on disk and "
                        "resume it on the next `chat --session NAME`")
    parser.add_argument("--session-dir", default=None,
                        help="folder of the sessions (default: $SPECSTREAM_HOME/sessions)")


class Session:
    """A named conversation on disk, in `root`/NAME: its messages (messages.json,
    rewritten atomically after each turn) and the KV cache of its latest turn (a
    DiskPromptStore in the same folder), so that a resumed session prefills nothing it
    computed before."""

    def __init__(self, name: str, root: str | Path | None = None):
        if not SESSION_NAME.fullmatch(name):
            raise InputError(f"--session must be 1-64 letters, digits, '.', '_' or '-' "
                             f"(not starting with '.', '_' or '-'), got {name!r}")
        self.name = name
        self.folder = Path(root) if root is not None else cache_file("sessions")
        self.folder = self.folder / name

    def messages(self) -> list[dict]:
        """The saved messages ([] for a new session)."""
        path = self.folder / HISTORY_FILE
        if not path.exists():
            return []
        try:
            messages = json.loads(path.read_text())["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in messages):
                raise ValueError("each message needs a role and a content string")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"session {self.name!r}: {path} is unreadable ({e}); move it "
                             "away or pick another name") from None
        return messages

    def save(self, messages: list[dict]) -> None:
        write_json_atomic(self.folder / HISTORY_FILE, {"messages": messages})

    def prompt_cache(self, model) -> PromptCache:
        return PromptCache(model, disk=DiskPromptStore(self.folder, model))


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
              show_draft: bool = False, read=None, session: Session | None = None) -> None:
    """Read turns (from `read`, default input()) until /quit, Ctrl-D or Ctrl-C. With
    `session`, the conversation resumes where it was and is saved after each turn."""
    messages = [{"role": "system", "content": system}] if system else []
    if session is not None and (saved := session.messages()):
        if system and saved[0] != messages[0]:
            print("note: --system is ignored: the session keeps its own", file=sys.stderr)
        messages = saved
        turns = sum(m["role"] == "user" for m in saved)
        print(f"[session {session.name!r} resumed: {turns} earlier turns]", file=sys.stderr)
    # Each turn prefills only its new tokens; a session's cache also outlives the process.
    prompt_cache = session.prompt_cache(model) if session else PromptCache(model)
    try:
        _turns(model, tokenizer, kwargs, messages, show_draft, read or input, prompt_cache,
               session)
    finally:
        prompt_cache.close()  # the session's last KV reaches the disk


def _turns(model, tokenizer, kwargs: dict, messages: list[dict], show_draft: bool, read,
           prompt_cache: PromptCache, session: Session | None) -> None:
    while True:
        try:
            query = read(">> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if query.strip() in ("/quit", "/exit"):
            return
        if query.strip() == "/reset":
            keep = 1 if messages and messages[0]["role"] == "system" else 0
            del messages[keep:]  # in place: the caller's list is the session's
            if session is not None:
                session.save(messages)
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
        if session is not None:
            session.save(messages)


def main(args: argparse.Namespace) -> int:
    check_args(args)
    if args.system is not None:
        check_text(args.system, "--system")
    session = None if args.session is None else Session(args.session, args.session_dir)
    if session is None and args.session_dir is not None:
        raise InputError("--session-dir needs --session NAME")
    if session is not None:
        session.messages()  # an unreadable history is refused before the model loads
    model, tokenizer = load(args.model, precision=args.precision)
    print(f"[{describe_model(model)}]\n{HELP}", file=sys.stderr)
    chat_loop(model, tokenizer, generate_kwargs(args), args.system, args.show_draft,
              session=session)
    return 0
