"""Anthropic's Messages API: the request body, its conversation in the chat template's
terms (OpenAI-style messages and tools, as transformers' templates take them), the
response's content blocks, stop reasons and usage, its SSE events and error shape.

The route itself lives in app.py beside the OpenAI ones and shares their generation.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specstream_mlx.serve.tools import ToolCall

# Parameter -> the values that mean "not used"; any other value is refused.
NEUTRAL = {"thinking": (None, {"type": "disabled"})}
# Without effect on one local model; prompt caching is automatic here (cache_control).
IGNORED = ("metadata", "service_tier", "cache_control")

# HTTP status -> Anthropic's error type.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> dict:
    """Anthropic's error shape."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


class AnthropicMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    # Greedy unless asked, as on the OpenAI routes (Anthropic's own default is 1).
    temperature: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = Field(default=None, max_length=64)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """The first extra parameter the server cannot honour, or None."""
        for name, value in (self.model_extra or {}).items():
            if name not in IGNORED and (name not in NEUTRAL or value not in NEUTRAL[name]):
                return name
        return None


def _text_of(blocks: list[dict], where: str, sep: str = "") -> str:
    """The text of a list of text blocks (other fields, e.g. cache_control, ignored)."""
    parts = []
    for block in blocks:
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise ValueError(f"{where}: only text blocks are supported here, got "
                             f"{block.get('type')!r}")
        parts.append(block["text"])
    return sep.join(parts)


def template_tools(tools: list[dict] | None) -> list[dict] | None:
    """Anthropic tool definitions as the function schemas chat templates render."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type", "custom") != "custom":
            raise ValueError(f"tools.{i}: tool type {tool['type']!r} is not supported "
                             "(only client tools: name, description, input_schema)")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name or not isinstance(schema, dict):
            raise ValueError(f"tools.{i}: a tool needs a name and an input_schema object")
        # OpenAI's key order, so that both APIs render the same prompt
        function = {"name": name, "description": tool.get("description"),
                    "parameters": schema}
        if not isinstance(function["description"], str):
            del function["description"]
        out.append({"type": "function", "function": function})
    return out


def conversation(req: MessagesRequest) -> tuple[list[dict], bool]:
    """The request's system prompt and messages as chat-template messages (tool_use
    blocks as assistant tool_calls, tool_result blocks as `tool` messages), and whether
    they hold any tool traffic. Raises ValueError naming the offending part."""
    out, tool_traffic = [], False
    if req.system is not None:
        system = req.system if isinstance(req.system, str) else \
            _text_of(req.system, "system", sep="\n\n")
        out.append({"role": "system", "content": system})
    for n, m in enumerate(req.messages):
        where = f"messages.{n}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, calls, results = [], [], []
        for k, block in enumerate(m.content):
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and m.role == "assistant":
                name, args = block.get("name"), block.get("input", {})
                if not isinstance(name, str) or not isinstance(args, dict):
                    raise ValueError(f"{where}.{k}: tool_use needs a name and an input object")
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": name, "arguments": args}})
            elif kind == "tool_result" and m.role == "user":
                content = block.get("content", "")
                if isinstance(content, list):
                    content = _text_of(content, f"{where}.{k}.content")
                if not isinstance(content, str):
                    raise ValueError(f"{where}.{k}.content must be text")
                if block.get("is_error"):
                    content = "Error: " + content
                results.append({"role": "tool", "content": content,
                                "tool_call_id": block.get("tool_use_id")})
            else:
                raise ValueError(f"{where}.{k}: block type {kind!r} is not supported in a "
                                 f"{m.role} message (text, tool_use, tool_result)")
        tool_traffic = tool_traffic or bool(calls or results)
        out += results  # a user turn's tool results come before its text
        if calls:
            out.append({"role": "assistant", "content": "".join(texts), "tool_calls": calls})
        elif texts or not results:
            out.append({"role": m.role, "content": "".join(texts)})
    return out, tool_traffic


def stop_reason(finish: str, stop_string: str | None) -> tuple[str, str | None]:
    """OpenAI's finish_reason (as Answer gives it) -> (stop_reason, stop_sequence)."""
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if stop_string is not None:
        return "stop_sequence", stop_string
    return "end_turn", None


def tool_use_block(call: ToolCall) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call.id, "name": call.name,
            "input": call.arguments}


def usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict:
    """Anthropic counts prompt tokens read from a cache apart from input_tokens."""
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def event(name: str, **fields) -> dict:
    """One SSE event for sse-starlette: the event name, and JSON data that repeats it."""
    return {"event": name, "data": json.dumps({"type": name, **fields})}
