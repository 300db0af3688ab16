"""serve/tools.py: tool calls parsed out of chosen text, fed in every kind of split
(one character at a time, whole, random pieces); the format a tokenizer gets; the
prefix that forces a call. The server's tool calls: test_serve_tool_calls.py."""

from __future__ import annotations

import json
import random

import pytest

from specstream_mlx.serve.tools import (
    JSON_END,
    JSON_START,
    ToolCall,
    ToolCallStream,
    ToolFormat,
    forced_prefix,
    parse_calls,
    parse_json_call,
    tool_format,
)

JSON = ToolFormat(JSON_START, JSON_END, parse_json_call)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'


def run(text: str, sizes: list[int] | None = None, fmt: ToolFormat = JSON,
        prefix: str = "", tools: list[dict] | None = None) -> list:
    """The stream's items for `text` fed in pieces of the given sizes (default: one
    character at a time), adjacent text items joined."""
    stream, out, i = ToolCallStream(fmt, tools, prefix=prefix), [], 0
    for size in sizes or [1] * len(text):
        out += stream.feed(text[i: i + size])
        i += size
    out += stream.feed(text[i:]) + stream.finish()
    joined = []
    for item in out:
        if isinstance(item, str) and joined and isinstance(joined[-1], str):
            joined[-1] += item
        else:
            joined.append(item)
    return [(c.name, c.arguments) if isinstance(c, ToolCall) else c for c in joined]


def splits(text: str, n: int = 20) -> list[list[int]]:
    """Random ways to cut `text` into pieces, and the two extremes."""
    rng = random.Random(0)
    out = [[1] * len(text), [len(text)]]
    for _ in range(n):
        sizes, left = [], len(text)
        while left > 0:
            sizes.append(min(left, rng.randint(1, 12)))
            left -= sizes[-1]
        out.append(sizes)
    return out


CASES = [
    ("text, then two calls", "Let me check.\n" + CALL + "\n" + CALL2 + "\n",
     ["Let me check.", ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    ("a call only", CALL, [("get_weather", {"city": "Paris"})]),
    ("text after a call", CALL + "\n\nDone. ", [("get_weather", {"city": "Paris"}), "Done."]),
    ("plain text keeps its spaces", "  a < b <tool but not a call\n\n",
     ["  a < b <tool but not a call\n\n"]),
    ("malformed JSON is text", '<tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call>',
     ['<tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call>']),
    ("no name is text", '<tool_call>{"arguments": {}}</tool_call>',
     ['<tool_call>{"arguments": {}}</tool_call>']),
    ("arguments not an object is text", '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
     ['<tool_call>{"name": "f", "arguments": 3}</tool_call>']),
    ("a call cut short is text", "Hi " + CALL[:30], ["Hi " + CALL[:30]]),
    ("arguments as a JSON string", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}'
     '</tool_call>', [("f", {"a": 1})]),
    ("a bad call between good ones", CALL + "<tool_call>[1, 2]</tool_call>" + CALL2,
     [("get_weather", {"city": "Paris"}), "<tool_call>[1, 2]</tool_call>",
      ("get_time", {"zone": "CET"})]),
]


@pytest.mark.parametrize("text, want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_stream_parses_the_same_for_every_split(text, want):
    for sizes in splits(text):
        assert run(text, sizes) == want, sizes


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
BARE = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
BARE_CASES = [
    ("a bare call", BARE, [("get_weather", {"city": "Paris"})]),
    ("with spaces around", '\n{ "name" : "get_weather", "arguments": {"city": "Paris"}}\n',
     [("get_weather", {"city": "Paris"})]),
    ("a tool not given is text", BARE.replace("get_weather", "rm_rf"),
     [BARE.replace("get_weather", "rm_rf")]),
    ("text after it is text", BARE + " and more", [BARE + " and more"]),
    ("cut short is text", BARE[:20], [BARE[:20]]),
    ("other JSON is text", '{"x": 1}', ['{"x": 1}']),
    ("marked calls still parse", CALL, [("get_weather", {"city": "Paris"})]),
]


@pytest.mark.parametrize("text, want", [c[1:] for c in BARE_CASES],
                         ids=[c[0] for c in BARE_CASES])
def test_bare_json_calls_of_given_tools(text, want):
    """Qwen2.5-Coder-0.5B answers a tool request with the bare JSON object."""
    for sizes in splits(text):
        assert run(text, sizes, tools=TOOLS) == want, sizes
    if text != CALL:
        assert run(text) == [text]  # without tools: plain text, as it came


def test_answers_unlike_a_bare_call_are_not_held():
    stream = ToolCallStream(JSON, TOOLS)
    assert stream.feed(' {"na') == []
    assert stream.feed("p") == [' {"nap']
    stream = ToolCallStream(JSON, TOOLS)
    assert stream.feed("Hello") == ["Hello"]


def test_text_that_may_begin_a_call_is_held_back():
    stream = ToolCallStream(JSON)
    assert stream.feed("abc <tool_") == ["abc"]  # the space too: a call may follow
    assert stream.feed("x") == [" <tool_x"]
    assert stream.feed("<tool_call>{") == []
    assert stream.finish() == ["<tool_call>{"]


def test_parse_calls():
    assert parse_calls(JSON, ' {"name": "f", "arguments": {"x": [1]}} ')[0].arguments == \
        {"x": [1]}
    assert parse_calls(JSON, '{"name": "f"}')[0].arguments == {}
    for bad in ("", "{", "[]", '{"name": 3}', '{"name": "", "arguments": {}}',
                '{"name": "f", "arguments": "[1]"}'):
        assert parse_calls(JSON, bad) is None, bad
    # Parsers may give several calls, or raise anything: never an exception here.
    many = ToolFormat("<c>", "</c>", lambda body, tools: [{"name": "a"}, {"name": "b"}])
    assert [c.name for c in parse_calls(many, "")] == ["a", "b"]
    broken = ToolFormat("<c>", "</c>", lambda body, tools: 1 / 0)
    assert parse_calls(broken, "x") is None
    a, b = parse_calls(JSON, '{"name": "f"}')[0], parse_calls(JSON, '{"name": "f"}')[0]
    assert a.id != b.id


def test_forced_prefix_continues_into_a_call():
    prefix = forced_prefix(JSON, "get_weather")
    assert prefix == '<tool_call>\n{"name": "get_weather", "arguments": '
    assert run('{"city": "Paris"}}\n</tool_call>', prefix=prefix) == \
        [("get_weather", {"city": "Paris"})]
    assert forced_prefix(JSON) == "<tool_call>\n"
    xml = ToolFormat("<tool_call>", "</tool_call>", lambda body, tools: {})
    assert forced_prefix(xml) == "<tool_call>"
    with pytest.raises(ValueError):
        forced_prefix(xml, "f")


def test_a_format_without_end_marker_parses_at_the_end():
    fmt = ToolFormat("[TOOL_CALLS]", "", lambda body, tools: json.loads(body))
    text = 'ok [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]'
    assert run(text, fmt=fmt) == ["ok", ("f", {"a": 1})]
    assert run("ok [TOOL_CALLS]{bad", fmt=fmt) == ["ok [TOOL_CALLS]{bad"]


class FakeTokenizer:
    def __init__(self, template, parser=None):
        self.chat_template = template
        self.has_tool_calling = parser is not None
        self.tool_parser, self.tool_call_start, self.tool_call_end = parser, "<c>", "</c>"


def test_tool_format_of_a_tokenizer(loaded):
    assert tool_format(loaded[1]) is None  # the tiny template has no tools
    assert tool_format(FakeTokenizer(None)) is None
    fmt = tool_format(FakeTokenizer("{{ tools }}"))  # no parser known: the JSON form
    assert fmt == JSON and fmt.json_calls
    parser = lambda body, tools: {}  # noqa: E731
    fmt = tool_format(FakeTokenizer({"default": "x", "tool_use": "{{ tools }}"}, parser))
    assert (fmt.start, fmt.end, fmt.parse, fmt.json_calls) == ("<c>", "</c>", parser, False)
