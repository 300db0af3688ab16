"""The HTTP API (FastAPI): OpenAI's chat and text completions and Anthropic's Messages,
streamed as Server-Sent Events (sse-starlette) or whole, tool calls where the chat
template supports tools, the model list, health and Prometheus metrics, with an optional
API key (`Authorization: Bearer KEY` or `x-api-key: KEY`).

    app = create_app(model, tokenizer, ServeConfig(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from jinja2 import TemplateError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specstream_mlx.decoding.disk_cache import DiskPromptStore
from specstream_mlx.decoding.prompt_cache import PromptCache
from specstream_mlx.generate import GenerationResponse, encode_messages
from specstream_mlx.serve import anthropic_api as anthropic
from specstream_mlx.serve.engine import Done, Engine, Job
from specstream_mlx.serve.memory import kv_budget
from specstream_mlx.serve.schemas import ChatRequest, CompletionRequest, Sampling, error_body
from specstream_mlx.serve.tools import ToolCall, ToolCallStream, forced_prefix, tool_format
from specstream_mlx.settings import check_text, check_token_ids


@dataclass
class ServeConfig:
    model_name: str = "specstream"
    api_key: str | None = None
    max_queue: int = 16  # waiting requests; one more gets 429
    max_tokens_limit: int = 4096  # the most tokens one request may ask for
    default_max_tokens: int = 512
    max_body_bytes: int = 1 << 20
    prompt_cache_bytes: int = 1 << 30
    prompt_cache_dir: str | None = None  # KV of conversations kept on disk across restarts
    prompt_cache_disk_bytes: int = 2 << 30
    max_kv_bytes: int | None = None  # one request's KV cache; None: from the memory (memory.py)
    max_batch: int = 4  # requests decoding together (continuous batching); 1: one at a time


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers


class Metrics:
    """Prometheus series of one app (its own registry). Per request: tokens per pass,
    drafted tokens, prompt tokens reused (by source: memory, disk or none), the batch it
    ran in; `endpoint` is the route's path."""

    def __init__(self, engine_waiting):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specstream_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("specstream_generated_tokens", "Tokens generated",
                              ["endpoint"], registry=r)
        self.drafted = Counter("specstream_drafted_tokens",
                               "Generated tokens that were accepted drafts", ["endpoint"],
                               registry=r)
        self.reused = Counter("specstream_prompt_reused_tokens",
                              "Prompt tokens whose K/V came from the prompt cache",
                              ["source"], registry=r)
        self.tokens_per_pass = Histogram("specstream_tokens_per_pass",
                                         "Tokens per forward pass of each request",
                                         ["endpoint"],
                                         buckets=(1, 1.25, 1.5, 2, 2.5, 3, 4, 6), registry=r)
        self.request_drafted = Histogram("specstream_request_drafted_tokens",
                                         "Accepted drafted tokens of each request",
                                         ["endpoint"], buckets=(0, 4, 16, 64, 256, 1024),
                                         registry=r)
        self.request_reused = Histogram("specstream_request_prompt_reused_tokens",
                                        "Prompt tokens each request reused, by where their "
                                        "K/V came from", ["source"],
                                        buckets=(0, 16, 64, 256, 1024, 4096, 16384),
                                        registry=r)
        self.batch_size = Histogram("specstream_batch_size",
                                    "Sequences decoding together with each request",
                                    ["endpoint"], buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=r)
        self.accepted = Histogram("specstream_accepted_draft_length",
                                  "Drafted tokens accepted by one pass",
                                  buckets=(0, 1, 2, 3, 4, 6, 8, 16), registry=r)
        self.ttft = Histogram("specstream_time_to_first_token_seconds",
                              "Seconds from request to first token", registry=r)
        self.queue = Gauge("specstream_queue_length", "Requests waiting for the model",
                           registry=r)
        self.queue.set_function(engine_waiting)


def is_anthropic(path: str) -> bool:
    """Routes whose errors take Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def _api_error(path: str, status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", headers: dict | None = None):
    if is_anthropic(path):  # its type follows from the status
        return JSONResponse(anthropic.error_body(status, message), status_code=status,
                            headers=headers)
    return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)


class ClientGone(Exception):
    """The client of a whole response hung up."""


@dataclass
class Answer:
    """What a generation ended with, filled in while its items are read."""

    prompt_tokens: int
    last: GenerationResponse | None = None
    calls: list[ToolCall] = field(default_factory=list)

    @property
    def finish(self) -> str:
        """OpenAI's finish_reason: tool_calls when the model called a tool."""
        reason = self.last.finish_reason if self.last else None
        if self.calls and reason != "length":
            return "tool_calls"
        return reason or "stop"

    @property
    def tokens(self) -> int:
        return self.last.generation_tokens if self.last else 0

    @property
    def cached(self) -> int:
        return self.last.prompt_cached_tokens if self.last else 0


@dataclass
class ToolPlan:
    """What a request asks of tools, both APIs' parameters made one."""

    tools: list[dict] | None = None  # schemas the template renders; None: tools are off
    prefix: str = ""  # the start of a forced call, which the answer continues
    parallel: bool = True  # False: the answer ends after its first call


def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (one worker thread, a request queue)."""
    config = config or ServeConfig()
    context = model.args.max_position_embeddings
    tools_format = tool_format(tokenizer)  # None: the chat template has no tools
    disk = None
    if config.prompt_cache_dir is not None:
        disk = DiskPromptStore(config.prompt_cache_dir, model, config.prompt_cache_disk_bytes)
    engine = Engine(model, tokenizer, config.max_queue,
                    prompt_cache=PromptCache(model, config.prompt_cache_bytes, disk),
                    max_batch=config.max_batch)
    budget = kv_budget(model, config.max_kv_bytes, config.prompt_cache_bytes,
                       config.max_batch)
    metrics = Metrics(lambda: engine.waiting)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="specstream", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.state.kv_budget = budget

    @app.middleware("http")
    async def guard(request: Request, call_next):
        endpoint = request.url.path
        if config.api_key is not None and endpoint != "/health":
            bearer = request.headers.get("authorization", "").encode()
            key = request.headers.get("x-api-key", "").encode()
            # Both compared in constant time, whichever the client sent.
            good = hmac.compare_digest(bearer, f"Bearer {config.api_key}".encode())
            good |= hmac.compare_digest(key, config.api_key.encode())
            if not good:
                metrics.requests.labels(endpoint, "401").inc()
                return _api_error(endpoint, 401, "invalid or missing API key "
                                  "(Authorization: Bearer KEY or x-api-key: KEY)",
                                  kind="authentication_error")
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > config.max_body_bytes):
            metrics.requests.labels(endpoint, "413").inc()
            return _api_error(endpoint, 413, f"request body over {config.max_body_bytes} bytes")
        response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _api_error(request.url.path, e.status, e.message, e.param, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        path = request.url.path
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return _api_error(path, 400, "the request body is not valid JSON")
        status = 400 if is_anthropic(path) else 422  # Anthropic's API has no 422
        return _api_error(path, status, f"{param or 'body'}: "
                          f"{first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _api_error(request.url.path, e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return _api_error(request.url.path, 500, "internal server error", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue": engine.waiting, "busy": engine.busy}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": 0, "owned_by": "specstream"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    def generation_settings(prompt: int, max_tokens: int, param: str, temperature: float,
                            top_p: float | None, stops: list[str], top_k: int = 0) -> dict:
        """stream_generate's keywords for a request (both APIs) of `prompt` tokens; the
        memory guard refuses it here, before any work, when it would not fit."""
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"{param} must be <= {config.max_tokens_limit}", param)
        if (why := budget.refusal(prompt, max_tokens)) is not None:
            raise ApiError(400, why, param)
        top_p = 0.0 if top_p is None or top_p >= 1.0 else top_p  # mlx-lm: 0 means off
        return {"max_tokens": max_tokens, "temp": temperature, "top_p": top_p,
                "top_k": top_k, "stop": stops or None}

    def settings_of(req: Sampling, prompt: int) -> tuple[dict, int | None]:
        if (name := req.unsupported()) is not None:
            raise ApiError(400, f"parameter {name!r} is not supported by this server", name)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # unasked: the default, as far as the limits leave room
            max_tokens = min(config.default_max_tokens, config.max_tokens_limit,
                             max(budget.room(prompt), 1))
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        return (generation_settings(prompt, max_tokens, param, req.temperature, req.top_p,
                                    req.stops()), req.seed)

    def checked_ids(ids: list[int], param: str) -> list[int]:
        try:
            ids = check_token_ids(ids, model.args.vocab_size, param)
        except ValueError as e:
            raise ApiError(400, str(e), param) from None
        if len(ids) >= context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context is "
                                f"{context} tokens", param)
        return ids

    def tool_plan(tools: list[dict] | None, choice: str, name: str | None, parallel: bool,
                  traffic: bool, param: str) -> ToolPlan:
        """Checks a request's tools against the template. choice: "none", "auto",
        "required" (any tool) or "named" (the tool `name`); traffic: the history holds
        tool calls or results, which only a template with tools can render."""
        used = bool(tools) and choice != "none"
        if (used or traffic) and tools_format is None:
            raise ApiError(400, "this model's chat template does not support tools",
                           param if used else "messages")
        if choice in ("required", "named") and not tools:
            raise ApiError(400, "tool_choice asks for a tool call but no tools are given",
                           "tool_choice")
        if not used:
            return ToolPlan()
        prefix = ""
        if choice == "named":
            if name not in {t["function"]["name"] for t in tools}:
                raise ApiError(400, f"tool_choice names {name!r}, which is not in tools",
                               "tool_choice")
            try:
                prefix = forced_prefix(tools_format, name)
            except ValueError as e:
                raise ApiError(400, str(e), "tool_choice") from None
        elif choice == "required":
            prefix = forced_prefix(tools_format)
        return ToolPlan(tools, prefix, parallel)

    def prompt_ids(messages: list[dict], plan: ToolPlan, prefill: str = "") -> list[int]:
        """The prompt: the conversation through the chat template (with the plan's tools),
        then the text the answer continues: a prefill, a forced call's start."""
        try:
            for m in messages:  # tool calls and results may come without text
                if m["content"] or not (m.get("tool_calls") or m["role"] == "tool"):
                    check_text(m["content"], "messages content")
            ids = encode_messages(tokenizer, messages, plan.tools)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        except (TemplateError, TypeError, KeyError) as e:  # the template refused them
            raise ApiError(400, f"the chat template cannot render these messages: {e}",
                           "messages") from None
        if prefill + plan.prefix:
            ids += tokenizer.encode(prefill + plan.prefix, add_special_tokens=False)
        return checked_ids(ids, "messages")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        try:
            messages = [m.template() for m in req.messages]
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        choice, name = req.tool_choice or ("auto" if tools else "none"), None
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or not isinstance(name, str):
                raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or "
                               "{'type': 'function', 'function': {'name': ...}}",
                               "tool_choice")
            choice = "named"
        traffic = any("tool_calls" in m or m["role"] == "tool" for m in messages)
        plan = tool_plan(tools, choice, name, req.parallel_tool_calls, traffic, "tools")
        return await respond(request, req, prompt_ids(messages, plan), chat=True, plan=plan)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if isinstance(req.prompt, str):
            try:
                text = check_text(req.prompt)
            except ValueError as e:
                raise ApiError(400, str(e), "prompt") from None
            ids = list(tokenizer.encode(text))
        else:
            ids = req.prompt
        return await respond(request, req, checked_ids(ids, "prompt"), chat=False)

    @app.post("/v1/messages")
    async def messages_route(req: anthropic.MessagesRequest, request: Request):
        if (name := req.unsupported()) is not None:
            raise ApiError(400, f"parameter {name!r} is not supported by this server", name)
        try:
            messages, traffic = anthropic.conversation(req)
            tools = anthropic.template_tools(req.tools)
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        tc = req.tool_choice or {"type": "auto" if tools else "none"}
        choice = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}.get(
            tc.get("type"))
        if choice is None or choice == "named" and not isinstance(tc.get("name"), str):
            raise ApiError(400, "tool_choice must be {'type': 'auto' | 'any' | 'none'} or "
                           "{'type': 'tool', 'name': ...}", "tool_choice")
        plan = tool_plan(tools, choice, tc.get("name"),
                         not tc.get("disable_parallel_tool_use", False), traffic, "tools")
        prefill = ""
        if messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]:
            prefill = messages.pop()["content"]  # the answer continues the given start
        if not any(m["role"] != "system" for m in messages):
            raise ApiError(400, "messages: the conversation has no user turn", "messages")
        ids = prompt_ids(messages, plan, prefill)
        settings = generation_settings(len(ids), req.max_tokens, "max_tokens", req.temperature,
                                       req.top_p, req.stop_sequences or [], req.top_k or 0)
        job, events, tic = start(ids, settings, None, full_status=529)
        answer = Answer(len(ids))
        mid = "msg_" + uuid.uuid4().hex[:24]
        parser = ToolCallStream(tools_format, plan.tools, plan.prefix) if plan.tools else None
        pieces = items(job, events, answer, tic, parser, plan.parallel,
                       None if req.stream else request, request.url.path)
        if req.stream:
            return EventSourceResponse(anthropic_stream(pieces, answer, mid), ping=15)
        content: list[dict] = []
        try:
            async with aclosing(pieces):
                async for item in pieces:
                    if isinstance(item, str):
                        if content and content[-1]["type"] == "text":
                            content[-1]["text"] += item
                        else:
                            content.append({"type": "text", "text": item})
                    elif isinstance(item, ToolCall):
                        content.append(anthropic.tool_use_block(item))
        except ClientGone:
            return PlainTextResponse("", status_code=499)
        reason, sequence = stop_reason(answer)
        return {"id": mid, "type": "message", "role": "assistant",
                "model": config.model_name, "content": content, "stop_reason": reason,
                "stop_sequence": sequence,
                "usage": anthropic.usage(answer.prompt_tokens, answer.cached, answer.tokens),
                "specstream": extra(answer.last)}

    def stop_reason(answer: Answer) -> tuple[str, str | None]:
        return anthropic.stop_reason(answer.finish,
                                     answer.last.stop_string if answer.last else None)

    async def anthropic_stream(pieces: AsyncIterator, answer: Answer, mid: str):
        """Anthropic's events: message_start (once the first token came, so its usage
        counts the reused prompt tokens), a ping, content blocks (text deltas, tool_use
        blocks with their input as one JSON delta), message_delta, message_stop."""
        event, index, text_open, started = anthropic.event, -1, False, False

        def message_start() -> dict:
            return event("message_start", message={
                "id": mid, "type": "message", "role": "assistant", "model": config.model_name,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": anthropic.usage(answer.prompt_tokens, answer.cached, 0)})

        try:
            async with aclosing(pieces):
                async for item in pieces:
                    if not started:
                        started = True
                        yield message_start()
                        yield event("ping")
                    if isinstance(item, str):
                        if not text_open:
                            index, text_open = index + 1, True
                            yield event("content_block_start", index=index,
                                        content_block={"type": "text", "text": ""})
                        yield event("content_block_delta", index=index,
                                    delta={"type": "text_delta", "text": item})
                    elif isinstance(item, ToolCall):
                        if text_open:
                            text_open = False
                            yield event("content_block_stop", index=index)
                        index += 1
                        block = anthropic.tool_use_block(item)
                        yield event("content_block_start", index=index,
                                    content_block={**block, "input": {}})
                        yield event("content_block_delta", index=index, delta={
                            "type": "input_json_delta",
                            "partial_json": json.dumps(block["input"])})
                        yield event("content_block_stop", index=index)
        except ApiError as e:
            yield {"event": "error", "data": json.dumps(anthropic.error_body(e.status,
                                                                              e.message))}
            return
        if not started:  # no token came
            yield message_start()
        if text_open:
            yield event("content_block_stop", index=index)
        reason, sequence = stop_reason(answer)
        yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                    usage=anthropic.usage(answer.prompt_tokens, answer.cached, answer.tokens))
        yield event("message_stop")

    def start(ids: list[int], settings: dict, seed: int | None,
              full_status: int = 429) -> tuple[Job, asyncio.Queue, float]:
        """Queue a generation; its events arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(ids, settings, lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                  seed)
        tic = time.perf_counter()
        if not engine.submit(job):
            kind = "rate_limit_error" if full_status == 429 else "overloaded_error"
            raise ApiError(full_status, "the server is busy: too many queued requests; "
                           "retry later", kind=kind, headers={"Retry-After": "2"})
        return job, events, tic

    async def items(job: Job, events: asyncio.Queue, answer: Answer, tic: float,
                    parser: ToolCallStream | None = None, parallel: bool = True,
                    request: Request | None = None, endpoint: str = ""
                    ) -> AsyncIterator[str | ToolCall | None]:
        """A generation's answer as it comes, for every route: None once when the first
        token arrives (a stream may start then), then text pieces and, with a parser,
        tool calls; `answer` follows along. stream_generate holds back text that may
        begin a stop string and never yields a stop, so the pieces are the whole answer,
        streamed or not. With `request` (a whole response) a hang-up raises ClientGone;
        a failed generation raises ApiError. Closing it stops the generation."""
        first_at, passes = None, {}
        try:
            while True:
                if request is None:
                    event = await events.get()
                else:
                    try:
                        event = await asyncio.wait_for(events.get(), timeout=0.5)
                    except asyncio.TimeoutError:  # noqa: UP041 (3.10: not the builtin)
                        if await request.is_disconnected():
                            raise ClientGone() from None
                        continue
                if isinstance(event, Done):
                    if event.error:
                        raise ApiError(event.status, event.error,
                                       kind="invalid_request_error" if event.status == 400
                                       else "server_error")
                    break
                if first_at is None:
                    first_at = time.perf_counter()
                    yield None
                passes[event.passes] = passes.get(event.passes, 0) + event.from_draft
                answer.last = event
                for item in parser.feed(event.text) if parser else [event.text]:
                    if isinstance(item, ToolCall):
                        answer.calls.append(item)
                    if item:
                        yield item
                if answer.calls and not parallel:
                    return  # the first call ends the answer; finally stops the generation
            for item in parser.finish() if parser else []:
                if isinstance(item, ToolCall):
                    answer.calls.append(item)
                yield item
        finally:  # also when the client goes away: its generation stops at once
            job.cancelled.set()
            record(job, endpoint, answer.last, first_at, tic, passes)

    async def respond(request: Request, req: Sampling, ids: list[int], chat: bool,
                      plan: ToolPlan | None = None):
        settings, seed = settings_of(req, len(ids))
        job, events, tic = start(ids, settings, seed)
        plan = plan or ToolPlan()
        parser = ToolCallStream(tools_format, plan.tools, plan.prefix) if plan.tools else None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        answer, created = Answer(len(ids)), int(time.time())
        pieces = items(job, events, answer, tic, parser, plan.parallel,
                       None if req.stream else request, request.url.path)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(
                openai_stream(pieces, answer, rid, created, chat, include_usage), ping=15)
        text = ""
        try:
            async with aclosing(pieces):
                async for item in pieces:
                    if isinstance(item, str):
                        text += item
        except ClientGone:
            return PlainTextResponse("", status_code=499)
        if chat:
            message = {"role": "assistant", "content": text}
            if answer.calls:
                message["content"] = text or None  # as OpenAI: no text beside calls
                message["tool_calls"] = [openai_call(c) for c in answer.calls]
            choice = {"index": 0, "message": message, "logprobs": None,
                      "finish_reason": answer.finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": answer.finish}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": config.model_name, "choices": [choice],
                "usage": usage(answer), "specstream": extra(answer.last)}

    def openai_call(call: ToolCall) -> dict:
        return {"id": "call_" + call.id, "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}

    def record(job: Job, endpoint: str, last: GenerationResponse | None,
               first_at: float | None, tic: float, passes: dict) -> None:
        if last is None:
            return
        metrics.tokens.labels(endpoint).inc(last.generation_tokens)
        metrics.drafted.labels(endpoint).inc(last.drafted_tokens)
        source = last.prompt_cache_source or "none"
        metrics.reused.labels(source).inc(last.prompt_cached_tokens)
        metrics.request_reused.labels(source).observe(last.prompt_cached_tokens)
        metrics.tokens_per_pass.labels(endpoint).observe(last.tokens_per_pass)
        metrics.request_drafted.labels(endpoint).observe(last.drafted_tokens)
        metrics.batch_size.labels(endpoint).observe(job.batch_size)
        for accepted in passes.values():
            metrics.accepted.observe(accepted)
        if first_at is not None:
            metrics.ttft.observe(first_at - tic)

    def usage(answer: Answer) -> dict:
        return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.tokens,
                "total_tokens": answer.prompt_tokens + answer.tokens,
                "prompt_tokens_details": {"cached_tokens": answer.cached}}

    def extra(last: GenerationResponse | None) -> dict:
        if last is None:
            return {}
        return {"passes": last.passes, "tokens_per_pass": round(last.tokens_per_pass, 3),
                "drafted_tokens": last.drafted_tokens,
                "prompt_cached_tokens": last.prompt_cached_tokens,
                "prompt_cache_source": last.prompt_cache_source,
                "tokens_per_second": round(last.generation_tps, 2)}

    async def openai_stream(pieces: AsyncIterator, answer: Answer, rid: str, created: int,
                            chat: bool, include_usage: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None = None, finish: str | None = None, role: bool = False,
                  call: tuple[int, ToolCall] | None = None) -> dict:
            if chat:
                delta = {"role": "assistant"} if role else {}
                if piece:
                    delta["content"] = piece
                if call is not None:  # a whole call in one delta
                    delta["tool_calls"] = [{"index": call[0], **openai_call(call[1])}]
                choice = {"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None,
                          "finish_reason": finish}
            return {"data": json.dumps({"id": rid, "object": kind, "created": created,
                                        "model": config.model_name, "choices": [choice]})}

        if chat:
            yield chunk(role=True)
        try:
            async with aclosing(pieces):
                async for item in pieces:
                    if isinstance(item, str):
                        yield chunk(item)
                    elif isinstance(item, ToolCall):
                        yield chunk(call=(len(answer.calls) - 1, item))
        except ApiError as e:
            yield {"data": json.dumps(error_body(e.message, e.kind))}
            yield {"data": "[DONE]"}
            return
        yield chunk(finish=answer.finish)
        if include_usage:
            yield {"data": json.dumps({"id": rid, "object": kind, "created": created,
                                       "model": config.model_name, "choices": [],
                                       "usage": usage(answer),
                                       "specstream": extra(answer.last)})}
        yield {"data": "[DONE]"}

    return app
