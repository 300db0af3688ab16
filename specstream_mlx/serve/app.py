"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, streamed as
Server-Sent Events (sse-starlette) or whole, the model list, health and Prometheus
metrics, with an optional API key.

    app = create_app(model, tokenizer, ServeConfig(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specstream_mlx.generate import GenerationResponse, encode_messages
from specstream_mlx.serve.engine import Done, Engine, Job
from specstream_mlx.serve.schemas import ChatRequest, CompletionRequest, Sampling, error_body
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


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers


class Metrics:
    """Prometheus series of one app (its own registry)."""

    def __init__(self, engine_waiting):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("specstream_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("specstream_generated_tokens", "Tokens generated", registry=r)
        self.reused = Counter("specstream_prompt_reused_tokens",
                              "Prompt tokens whose K/V came from the prompt cache", registry=r)
        self.tokens_per_pass = Histogram("specstream_tokens_per_pass",
                                         "Tokens per forward pass of each request",
                                         buckets=(1, 1.25, 1.5, 2, 2.5, 3, 4, 6), registry=r)
        self.accepted = Histogram("specstream_accepted_draft_length",
                                  "Drafted tokens accepted by one pass",
                                  buckets=(0, 1, 2, 3, 4, 6, 8, 16), registry=r)
        self.ttft = Histogram("specstream_time_to_first_token_seconds",
                              "Seconds from request to first token", registry=r)
        self.queue = Gauge("specstream_queue_length", "Requests waiting for the model",
                           registry=r)
        self.queue.set_function(engine_waiting)


def _api_error(status: int, message: str, param: str | None = None,
               kind: str = "invalid_request_error", headers: dict | None = None):
    return JSONResponse(error_body(message, kind, param), status_code=status, headers=headers)


def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving `model` (one worker thread, a request queue)."""
    config = config or ServeConfig()
    context = model.args.max_position_embeddings
    engine = Engine(model, tokenizer, config.max_queue, config.prompt_cache_bytes)
    metrics = Metrics(lambda: engine.waiting)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="specstream", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config

    @app.middleware("http")
    async def guard(request: Request, call_next):
        endpoint = request.url.path
        if config.api_key is not None and endpoint != "/health":
            given = request.headers.get("authorization", "")
            expected = f"Bearer {config.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                metrics.requests.labels(endpoint, "401").inc()
                return _api_error(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                  kind="authentication_error")
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > config.max_body_bytes):
            metrics.requests.labels(endpoint, "413").inc()
            return _api_error(413, f"request body over {config.max_body_bytes} bytes")
        response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return _api_error(e.status, e.message, e.param, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", []) if p != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return _api_error(400, "the request body is not valid JSON")
        return _api_error(422, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return _api_error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception):
        return _api_error(500, "internal server error", kind="server_error")

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

    def settings_of(req: Sampling) -> tuple[dict, int | None]:
        if (name := req.unsupported()) is not None:
            raise ApiError(400, f"parameter {name!r} is not supported by this server", name)
        max_tokens = req.max_completion_tokens or req.max_tokens or config.default_max_tokens
        if max_tokens > config.max_tokens_limit:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"{param} must be <= {config.max_tokens_limit}", param)
        top_p = 0.0 if req.top_p >= 1.0 else req.top_p  # mlx-lm: 0 means off
        return ({"max_tokens": max_tokens, "temp": req.temperature, "top_p": top_p,
                 "stop": req.stops() or None}, req.seed)

    def checked_ids(ids: list[int], param: str) -> list[int]:
        try:
            ids = check_token_ids(ids, model.args.vocab_size, param)
        except ValueError as e:
            raise ApiError(400, str(e), param) from None
        if len(ids) >= context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context is "
                                f"{context} tokens", param)
        return ids

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role,
                         "content": check_text(m.text(), "messages content")}
                        for m in req.messages]
        except ValueError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = checked_ids(encode_messages(tokenizer, messages), "messages")
        return await respond(request, req, ids, chat=True)

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

    async def respond(request: Request, req: Sampling, ids: list[int], chat: bool):
        settings, seed = settings_of(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(ids, settings, lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                  seed)
        tic = time.perf_counter()
        if not engine.submit(job):
            raise ApiError(429, "the server is busy: too many queued requests; retry later",
                           kind="rate_limit_error", headers={"Retry-After": "2"})
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        # stream_generate holds back text that may begin a stop string and never yields
        # a stop, so both answers are just its pieces: streamed == whole, stop or not.
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(
                stream_events(job, events, rid, created, chat, include_usage, tic), ping=15)
        return await whole_response(request, job, events, rid, created, chat, tic)

    def record(last: GenerationResponse | None, first_at: float | None, tic: float,
               passes: dict) -> None:
        if last is None:
            return
        metrics.tokens.inc(last.generation_tokens)
        metrics.reused.inc(last.prompt_cached_tokens)
        metrics.tokens_per_pass.observe(last.tokens_per_pass)
        for accepted in passes.values():
            metrics.accepted.observe(accepted)
        if first_at is not None:
            metrics.ttft.observe(first_at - tic)

    def usage(last: GenerationResponse | None, n_prompt: int) -> dict:
        n = last.generation_tokens if last else 0
        return {"prompt_tokens": n_prompt, "completion_tokens": n,
                "total_tokens": n_prompt + n}

    def extra(last: GenerationResponse | None) -> dict:
        if last is None:
            return {}
        return {"passes": last.passes, "tokens_per_pass": round(last.tokens_per_pass, 3),
                "drafted_tokens": last.drafted_tokens,
                "prompt_cached_tokens": last.prompt_cached_tokens,
                "tokens_per_second": round(last.generation_tps, 2)}

    async def whole_response(request, job, events, rid, created, chat, tic):
        text, last, first_at, passes = "", None, None, {}
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:  # noqa: UP041 (3.10: not the builtin)
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return PlainTextResponse("", status_code=499)
                    continue
                if isinstance(event, Done):
                    if event.error:
                        raise ApiError(event.status, event.error,
                                       kind="invalid_request_error" if event.status == 400
                                       else "server_error")
                    break
                first_at = first_at or time.perf_counter()
                passes[event.passes] = passes.get(event.passes, 0) + event.from_draft
                text += event.text
                last = event
        finally:
            job.cancelled.set()
        record(last, first_at, tic, passes)
        finish = (last.finish_reason if last else None) or "stop"
        n_prompt = len(job.ids)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": config.model_name, "choices": [choice],
                "usage": usage(last, n_prompt), "specstream": extra(last)}

    async def stream_events(job, events, rid, created, chat, include_usage, tic):
        kind = "chat.completion.chunk" if chat else "text_completion"
        last, first_at, passes = None, None, {}

        def chunk(piece: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant"} if role else {}
                if piece:
                    delta["content"] = piece
                choice = {"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None,
                          "finish_reason": finish}
            return json.dumps({"id": rid, "object": kind, "created": created,
                               "model": config.model_name, "choices": [choice]})

        try:
            if chat:
                yield {"data": chunk(None, None, role=True)}
            while True:
                event = await events.get()
                if isinstance(event, Done):
                    if event.error:
                        yield {"data": json.dumps(error_body(
                            event.error, "invalid_request_error" if event.status == 400
                            else "server_error"))}
                    break
                first_at = first_at or time.perf_counter()
                passes[event.passes] = passes.get(event.passes, 0) + event.from_draft
                last = event
                piece = event.text
                if piece or event.finish_reason:
                    yield {"data": chunk(piece, event.finish_reason)}
            if include_usage:
                yield {"data": json.dumps({"id": rid, "object": kind, "created": created,
                                           "model": config.model_name, "choices": [],
                                           "usage": usage(last, len(job.ids)),
                                           "specstream": extra(last)})}
            yield {"data": "[DONE]"}
        finally:  # also when the client goes away: its generation stops at once
            job.cancelled.set()
            record(last, first_at, tic, passes)

    return app
