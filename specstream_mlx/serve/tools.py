"""Tool calls in generated text: the model's tool-call format, its calls parsed out of
the text as it streams, and the prompt prefix that forces a call.

A chat template that supports tools renders the tool schemas into the prompt, and the
model answers with calls between markers, e.g. Qwen2.5's

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The markers and the body's parser come from mlx-lm, which infers them from the template
(Qwen's JSON, Qwen3-Coder's XML, Mistral's, ...); a template that mentions tools in a
form mlx-lm does not know gets the JSON form above. A body that does not parse is given
back as plain text, never an error.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specstream_mlx.generate import held_back

JSON_START, JSON_END = "<tool_call>", "</tool_call>"


def parse_json_call(body: str, tools: list[dict] | None = None) -> Any:
    """The JSON form's body: {"name": ..., "arguments": {...}}."""
    return json.loads(body.strip())


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls: `start` BODY `end`, BODY read by `parse`."""

    start: str
    end: str
    parse: Callable[[str, list[dict] | None], Any]

    @property
    def json_calls(self) -> bool:
        """Calls are the JSON form, so a prompt can begin one (tool_choice forcing)."""
        return self.start == JSON_START and (
            self.parse is parse_json_call
            or getattr(self.parse, "__module__", "").endswith(".json_tools"))


def template_text(tokenizer) -> str:
    """The chat template's source (all named templates of a dict together)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template if isinstance(template, str) else ""


def tool_format(tokenizer) -> ToolFormat | None:
    """The tokenizer's tool-call format, or None when its chat template has no tools."""
    if "tools" not in template_text(tokenizer):
        return None
    if getattr(tokenizer, "has_tool_calling", False) and tokenizer.tool_parser is not None:
        return ToolFormat(tokenizer.tool_call_start, tokenizer.tool_call_end,
                          tokenizer.tool_parser)
    return ToolFormat(JSON_START, JSON_END, parse_json_call)


JSON_FORM = ToolFormat(JSON_START, JSON_END, parse_json_call)
BARE_START = '{"name"'  # how a bare JSON call begins


@dataclass
class ToolCall:
    """One parsed call; `id` is unique, each API adds its own prefix to it."""

    name: str
    arguments: dict
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])


def parse_calls(fmt: ToolFormat, body: str, tools: list[dict] | None = None
                ) -> list[ToolCall] | None:
    """The calls in one marked body, or None when it is not a well-formed call (any
    parser error, no string name, arguments that are not an object)."""
    try:
        parsed = fmt.parse(body, tools)
    except Exception:  # parsers raise anything on model output; it becomes text
        return None
    calls = []
    for item in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(item, dict):
            return None
        name, arguments = item.get("name"), item.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(name, arguments))
    return calls or None


class ToolCallStream:
    """Splits streamed text into text pieces and tool calls.

    Text that could still begin a start marker is held back; from a start marker on,
    everything is held until the end marker, then released as the parsed calls (or as
    the raw text when they do not parse; so is a call cut short at the end). Whitespace
    next to calls is dropped: it is only the model's layout around them.

    Small models of the JSON form often answer with the bare object, no markers
    (Qwen2.5-Coder-0.5B does, greedy): an answer that begins with {"name" is held to its
    end and taken as a call when it is exactly one call of a given tool.

        stream = ToolCallStream(fmt)
        for piece in pieces:
            for item in stream.feed(piece): ...   # str or ToolCall
        for item in stream.finish(): ...
    """

    def __init__(self, fmt: ToolFormat, tools: list[dict] | None = None,
                 prefix: str = ""):
        # prefix: text the prompt already began the answer with (a forced call's start)
        self.fmt, self.tools = fmt, tools
        self.pending = prefix  # text not released yet
        self.space = ""  # trailing whitespace of released text, held in case a call follows
        self.after_call = False  # nothing but whitespace released since the last call
        self.calls = 0
        names = {(t.get("function") or {}).get("name") for t in tools or []}
        # The bare form: "maybe" while the answer may still begin with it, "yes" once it
        # does, "" when it does not apply.
        self.bare = "maybe" if fmt.json_calls and names and not prefix else ""
        self.names = names

    def feed(self, text: str) -> list[str | ToolCall]:
        self.pending += text
        if self.bare:
            head = self.pending.lstrip()
            head = "{" + head[1:].lstrip() if head.startswith("{") else head
            if head.startswith(BARE_START):
                self.bare = "yes"
            if self.bare == "yes" or BARE_START.startswith(head):
                return []  # held to the end (or until it cannot be the bare form)
            self.bare = ""
        out: list[str | ToolCall] = []
        start, end = self.fmt.start, self.fmt.end
        while True:
            i = self.pending.find(start)
            if i < 0:  # release all but a tail that may begin a marker
                cut = len(self.pending) - held_back(self.pending, [start])
                out += self._text(self.pending[:cut])
                self.pending = self.pending[cut:]
                return out
            out += self._text(self.pending[:i])
            self.pending = self.pending[i:]
            j = self.pending.find(end, len(start)) if end else -1
            if j < 0:  # inside a call: wait for its end (no end marker: the answer's end)
                return out
            raw = self.pending[: j + len(end)]
            self.pending = self.pending[j + len(end):]
            calls = parse_calls(self.fmt, raw[len(start): j], self.tools)
            if calls is None:
                out += self._text(raw)
            else:
                self.space, self.after_call = "", True
                self.calls += len(calls)
                out += calls

    def finish(self) -> list[str | ToolCall]:
        """The rest: held text, and an unfinished call as text (trailing whitespace
        only without calls)."""
        if self.bare:
            self.bare = ""
            calls = parse_calls(JSON_FORM, self.pending, self.tools)
            if calls is not None and len(calls) == 1 and calls[0].name in self.names:
                self.pending, self.calls = "", 1
                return calls
        out = self.feed("")  # the text held as a possible bare call, as any other text
        start = self.fmt.start
        calls = None
        if not self.fmt.end and self.pending.startswith(start):
            calls = parse_calls(self.fmt, self.pending[len(start):], self.tools)
        if calls is None:
            out += self._text(self.pending)
        else:
            self.space, self.calls = "", self.calls + len(calls)
            out += calls
        self.pending = ""
        if self.space and not self.calls:
            out.append(self.space)
        self.space = ""
        return out

    def _text(self, text: str) -> list[str]:
        text = self.space + text
        if self.after_call:
            text = text.lstrip()
        body = text.rstrip()
        self.space = text[len(body):]
        if not body:
            return []
        self.after_call = False
        return [body]


def forced_prefix(fmt: ToolFormat, name: str | None = None) -> str:
    """The start of an answer that makes the model call a tool: `name`, or any tool
    (only the start marker, with the newline the JSON form writes after it). Naming the
    tool needs the JSON form."""
    if name is None:
        return fmt.start + ("\n" if fmt.json_calls else "")
    if not fmt.json_calls:
        raise ValueError("this model's tool-call format cannot be forced to one tool")
    return f'{fmt.start}\n{{"name": {json.dumps(name)}, "arguments": '
