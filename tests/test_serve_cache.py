"""`specstream serve` with a prompt cache on disk and the memory guard, on live uvicorn
servers driven by the real `openai` and `anthropic` clients. A restart is a second app
over the same cache folder: a conversation whose 300-token prefix the first one saw reuses
it from disk (prompt_cached_tokens says so) with the answer a fresh prefill gives; a file
truncated on purpose is skipped with a log line. A request that would not fit the context
or --max-kv-mb is a 400 in its route's shape before any work. /metrics has each
request's figures."""

from __future__ import annotations

import logging

import httpx
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_serve import Server, api_answer  # noqa: E402

from specstream_mlx.decoding.disk_cache import SUFFIX  # noqa: E402
from specstream_mlx.serve import memory  # noqa: E402
from specstream_mlx.serve.app import ServeConfig, create_app  # noqa: E402

# The tiny tokenizer gives a token a character: a system prompt of 300 tokens.
SYSTEM = ("You answer questions about boats, rivers and the sea, briefly and kindly. " * 5)[:300]
TURN1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello there"}]


class Running:
    """A server over `config`, its OpenAI client, stopped (writes flushed) on exit."""

    def __init__(self, loaded, **config):
        model, tok = loaded
        self.app = create_app(model, tok, ServeConfig(model_name="tiny", max_tokens_limit=64,
                                                      **config))
        self.server = Server(self.app)
        self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="none",
                                    max_retries=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stop()

    def metrics(self) -> dict:
        """Every sample on /metrics: (name, sorted labels) -> value."""
        text = httpx.get(self.server.url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def turn2(answer: str) -> list[dict]:
    return [*TURN1, {"role": "assistant", "content": answer},
            {"role": "user", "content": "and the wind?"}]


def test_a_restart_reuses_a_300_token_prefix_from_disk(loaded, tmp_path, caplog):
    folder = str(tmp_path / "cache")
    with Running(loaded, prompt_cache_dir=folder) as first:
        r = first.client.chat.completions.create(model="tiny", messages=TURN1, max_tokens=12)
        answer = r.choices[0].message.content
        assert answer == api_answer(loaded, TURN1)
        assert r.usage.prompt_tokens > 300
    assert len(list((tmp_path / "cache").glob("*" + SUFFIX))) == 1  # written by the stop

    convo = turn2(answer)
    want = api_answer(loaded, convo)  # a fresh prefill's answer
    with Running(loaded, prompt_cache_dir=folder) as second:
        r = second.client.chat.completions.create(model="tiny", messages=convo, max_tokens=12)
        extra = r.model_extra["specstream"]
        assert r.choices[0].message.content == want
        assert extra["prompt_cache_source"] == "disk"
        assert extra["prompt_cached_tokens"] >= 300
        assert r.usage.prompt_tokens_details.cached_tokens == extra["prompt_cached_tokens"]
        m = second.metrics()
        assert m[("specstream_prompt_reused_tokens_total", (("source", "disk"),))] == \
            extra["prompt_cached_tokens"]

    # The same through Anthropic's route after another restart: its usage counts the
    # tokens read from disk apart.
    with Running(loaded, prompt_cache_dir=folder) as third:
        ant = anthropic.Anthropic(base_url=third.server.url, api_key="none", max_retries=0)
        msg = ant.messages.create(model="tiny", max_tokens=12, system=SYSTEM,
                                  messages=convo[1:])
        assert "".join(b.text for b in msg.content) == want
        assert msg.usage.cache_read_input_tokens >= 300

    for path in (tmp_path / "cache").glob("*" + SUFFIX):  # a crash cut them short
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="specstream.prompt_cache"):
        with Running(loaded, prompt_cache_dir=folder) as fourth:
            r = fourth.client.chat.completions.create(model="tiny", messages=convo,
                                                      max_tokens=12)
    assert any("cut short" in rec.message for rec in caplog.records)
    assert r.choices[0].message.content == want
    assert r.model_extra["specstream"]["prompt_cached_tokens"] == 0


def error_of(r: httpx.Response, anthropic_shape: bool) -> str:
    body = r.json()
    if anthropic_shape:
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error"
    return body["error"]["message"]


ROUTES = {
    "chat": ("/v1/chat/completions", lambda text, n: {
        "messages": [{"role": "user", "content": text}], "max_tokens": n}),
    "completions": ("/v1/completions", lambda text, n: {"prompt": text, "max_tokens": n}),
    "messages": ("/v1/messages", lambda text, n: {
        "messages": [{"role": "user", "content": text}], "max_tokens": n}),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_the_memory_guard_refuses_before_any_work(loaded, route, stream):
    """Over the context (512 tokens) or over --max-kv-mb (256 slots here): a 400 in the
    route's error shape, nothing queued or generated, the server healthy."""
    per_token = 4 * 2 * 2 * 16 * 4  # the tiny model: 4 layers, 2 KV heads of 16, float32
    with Running(loaded, max_kv_bytes=256 * per_token) as s:
        path, body = ROUTES[route]
        cases = [("x" * 470, 60, "context of 512 tokens"),  # fits memory? no: context first
                 ("x" * 200, 60, "MB of KV cache")]
        for text, n, says in cases:
            r = httpx.post(s.server.url + path, json={**body(text, n), "stream": stream},
                           timeout=60)
            assert r.status_code == 400, r.text
            assert says in error_of(r, route == "messages")
        assert s.app.state.engine.waiting == 0
        m = s.metrics()
        assert sum(v for k, v in m.items() if k[0] == "specstream_generated_tokens_total") == 0
        r = httpx.post(s.server.url + path, json=body("x" * 20, 8), timeout=60)
        assert r.status_code == 200, r.text


def test_kv_budget_arithmetic(loaded, monkeypatch):
    model = loaded[0]
    b = memory.kv_budget(model, max_bytes=256 * 1024)
    # 4 layers x K and V x 2 heads x 16 dims x 4 bytes; the root, 6 tree nodes, 8 corpus.
    assert (b.per_token, b.rows, b.context) == (1024, 15, 512)
    assert b.need(241) == 256 * 1024 and b.need(242) == 512 * 1024  # slots by 256
    assert b.room(41) == 200 and b.refusal(41, 200) is None
    assert "KV cache" in b.refusal(41, 201) and "room for 200 tokens" in b.refusal(41, 201)
    assert "context of 512" in memory.kv_budget(model).refusal(500, 13)
    monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1)  # nothing left: one step
    assert memory.kv_budget(model).max_bytes == 256 * 1024
    monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 40)  # the context's
    assert memory.kv_budget(model).max_bytes == memory.kv_budget(model).need(512)


def test_an_unasked_max_tokens_fits_what_is_left(loaded):
    """Without max_tokens a long prompt gets what the context leaves, not a refusal."""
    with Running(loaded) as s:
        budget = s.app.state.kv_budget
        assert budget.max_bytes >= budget.need(budget.context)  # the default admits all
        r = s.client.completions.create(model="tiny", prompt="ab" * 252)  # 504 of 512
        assert r.usage.prompt_tokens + r.usage.completion_tokens <= 512
        with pytest.raises(openai.BadRequestError, match="context of 512"):
            s.client.completions.create(model="tiny", prompt="ab" * 252, max_tokens=9)


def test_metrics_per_request(loaded):
    with Running(loaded) as s:
        convo = [{"role": "user", "content": "tell me a story about a cat"}]
        first = s.client.chat.completions.create(model="tiny", messages=convo, max_tokens=16)
        more = [*convo, {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "more"}]
        second = s.client.chat.completions.create(model="tiny", messages=more, max_tokens=16)
        third = s.client.completions.create(model="tiny", prompt="abc abc", max_tokens=8)
        r = httpx.post(s.server.url + "/v1/messages", timeout=60, json={
            "max_tokens": 8, "messages": [{"role": "user", "content": "a new question"}]})
        assert r.status_code == 200
        m = s.metrics()
    chat = (("endpoint", "/v1/chat/completions"),)
    done = {"/v1/chat/completions": 2, "/v1/completions": 1, "/v1/messages": 1}
    for endpoint, n in done.items():
        e = (("endpoint", endpoint),)
        assert m[("specstream_tokens_per_pass_count", e)] == n
        assert m[("specstream_request_drafted_tokens_count", e)] == n
        assert m[("specstream_batch_size_count", e)] == n
        assert m[("specstream_batch_size_bucket", (*e, ("le", "1.0")))] == n  # one at a time
    drafted = sum(r.model_extra["specstream"]["drafted_tokens"] for r in (first, second))
    assert m[("specstream_drafted_tokens_total", chat)] == drafted
    assert m[("specstream_generated_tokens_total", chat)] == (
        first.usage.completion_tokens + second.usage.completion_tokens)
    figures = [x.model_extra["specstream"] for x in (first, second, third)]
    figures.append(r.json()["specstream"])
    assert figures[1]["prompt_cache_source"] == "memory" and figures[1]["prompt_cached_tokens"]
    for source in ("memory", "none"):
        mine = [f["prompt_cached_tokens"] for f in figures
                if (f["prompt_cache_source"] or "none") == source]
        key = (("source", source),)
        assert m[("specstream_prompt_reused_tokens_total", key)] == sum(mine)
        assert m[("specstream_request_prompt_reused_tokens_count", key)] == len(mine)
