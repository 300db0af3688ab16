"""Anthropic's Messages API (`POST /v1/messages`) on the live server of test_serve.py,
driven by the real `anthropic` client (which sends `x-api-key`) and plain HTTP: greedy
answers equal the OpenAI route's and the Python API's, the streamed text adds up to the
whole answer, stop sequences, the event sequence, keys and errors in Anthropic's shape."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from conftest import cut_at_first_stop

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

from test_serve import (  # noqa: E402
    KEY,
    MESSAGES,
    Server,
    api_answer,
    api_pieces,
    client,  # noqa: F401 (a fixture)
    server,  # noqa: F401 (a fixture)
)

from specstream_mlx import stream_generate  # noqa: E402
from specstream_mlx.generate import encode_messages  # noqa: E402
from specstream_mlx.serve.app import ServeConfig, create_app  # noqa: E402
from specstream_mlx.serve.engine import Job  # noqa: E402


@pytest.fixture(scope="module")
def ant(server):  # noqa: F811
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def text_of(message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def test_messages_equal_the_openai_route_and_the_python_api(loaded, ant, client):  # noqa: F811
    m = ant.messages.create(model="tiny", max_tokens=12, messages=MESSAGES)
    o = client.chat.completions.create(model="tiny", max_tokens=12, messages=MESSAGES)
    assert text_of(m) == o.choices[0].message.content == api_answer(loaded, MESSAGES)
    assert (m.type, m.role, m.model) == ("message", "assistant", "tiny")
    assert m.id.startswith("msg_")
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[
        o.choices[0].finish_reason]
    assert m.stop_sequence is None
    u = m.usage  # prompt tokens reused from the cache are counted apart
    assert u.input_tokens + u.cache_read_input_tokens == o.usage.prompt_tokens
    assert u.output_tokens == o.usage.completion_tokens


def test_system_as_text_or_blocks_equals_the_openai_system_message(loaded, ant, client):  # noqa: F811
    convo = [{"role": "system", "content": "Answer in one word."}, *MESSAGES]
    want = client.chat.completions.create(model="tiny", max_tokens=12,
                                          messages=convo).choices[0].message.content
    assert want == api_answer(loaded, convo)
    for system in ("Answer in one word.", [{"type": "text", "text": "Answer in one word."}]):
        m = ant.messages.create(model="tiny", max_tokens=12, system=system, messages=MESSAGES)
        assert text_of(m) == want
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hello "},
                                           {"type": "text", "text": "there"}]}]
    m = ant.messages.create(model="tiny", max_tokens=12, messages=blocks)
    assert text_of(m) == api_answer(loaded, MESSAGES)


def test_a_multi_turn_conversation(loaded, ant):
    convo = [*MESSAGES, {"role": "assistant", "content": "hi"},
             {"role": "user", "content": "and now?"}]
    m = ant.messages.create(model="tiny", max_tokens=12, messages=convo)
    assert text_of(m) == api_answer(loaded, convo)


def test_streamed_text_equals_the_whole_message(ant):
    whole = ant.messages.create(model="tiny", max_tokens=16, messages=MESSAGES)
    with ant.messages.stream(model="tiny", max_tokens=16, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == text_of(whole) == text_of(final)
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def sse(srv, body: dict, key: str = KEY) -> list[tuple[str, dict]]:
    """The raw events of a streamed request: (event name, data)."""
    events, name = [], None
    with httpx.stream("POST", srv.url + "/v1/messages", json={**body, "stream": True},
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def test_event_sequence(server):  # noqa: F811
    events = sse(server, {"max_tokens": 12, "messages": MESSAGES})
    names = [n for n, _ in events]
    assert all(n == data["type"] for n, data in events)
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert events[2][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    assert all(d["delta"]["type"] == "text_delta" and d["index"] == 0
               for n, d in events if n == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert delta["usage"]["output_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_sequences(loaded, ant, stream):
    pieces = api_pieces(loaded, MESSAGES, max_tokens=20)
    full = "".join(pieces)
    if len(full) < 8:
        pytest.skip("answer too short to cut")
    stops = [full[5:8], full[3:5]]  # the second comes first
    want, hit = cut_at_first_stop(pieces, stops)
    kwargs = {"model": "tiny", "max_tokens": 20, "messages": MESSAGES, "stop_sequences": stops}
    if stream:
        with ant.messages.stream(**kwargs) as s:
            text = "".join(s.text_stream)
            m = s.get_final_message()
        assert text == want
    else:
        m = ant.messages.create(**kwargs)
    assert hit and text_of(m) == want
    assert (m.stop_reason, m.stop_sequence) == ("stop_sequence", full[3:5])
    assert m.usage.output_tokens == hit


def test_sampling_parameters(ant):
    """This client no longer types temperature, top_p and top_k; older ones and plain
    HTTP send them, and the server honours them."""
    sampled = {"temperature": 1.0, "top_p": 0.9, "top_k": 5}
    m = ant.messages.create(model="tiny", max_tokens=12, messages=MESSAGES,
                            extra_body=sampled)
    assert m.usage.output_tokens > 0
    m = ant.messages.create(model="tiny", max_tokens=12, messages=MESSAGES,
                            metadata={"user_id": "u1"},
                            extra_body={"cache_control": {"type": "ephemeral"}})
    assert m.usage.output_tokens > 0


def test_assistant_prefill_is_continued(loaded, ant):
    """A last assistant turn is the start of the answer, which continues it."""
    model, tok = loaded
    ids = encode_messages(tok, MESSAGES) + tok.encode("ab", add_special_tokens=False)
    want = "".join(r.text for r in stream_generate(model, tok, ids, max_tokens=8,
                                                   chat=False))
    m = ant.messages.create(model="tiny", max_tokens=8, messages=[
        *MESSAGES, {"role": "assistant", "content": "ab"}])
    assert text_of(m) == want


def test_x_api_key_on_every_route(server):  # noqa: F811
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}),
                       ("/v1/completions", {"prompt": "abc", "max_tokens": 2}),
                       ("/v1/messages", {"messages": MESSAGES, "max_tokens": 2})):
        assert httpx.post(server.url + path, json=body, headers={"x-api-key": KEY},
                          timeout=60).status_code == 200
        r = httpx.post(server.url + path, json=body, headers={"x-api-key": "wrong"},
                       timeout=60)
        assert r.status_code == 401
        err = r.json()
        if path == "/v1/messages":
            assert err == {"type": "error", "error": {"type": "authentication_error",
                                                      "message": err["error"]["message"]}}
        else:
            assert err["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="tiny", max_tokens=4, messages=MESSAGES)


BAD = [
    ({"messages": MESSAGES}, 400, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": 10**6}, 400, "max_tokens must be <= 64"),
    ({"messages": MESSAGES, "max_tokens": 4, "temperature": 1.5}, 400, "temperature"),
    ({"messages": [], "max_tokens": 4}, 400, "messages"),
    ({"messages": [{"role": "system", "content": "x"}], "max_tokens": 4}, 400, "role"),
    ({"messages": [{"role": "user", "content": "  "}], "max_tokens": 4}, 400, "empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
      "max_tokens": 4}, 400, "'image'"),
    ({"messages": MESSAGES, "max_tokens": 4, "mcp_servers": []}, 400, "'mcp_servers'"),
    ({"messages": MESSAGES, "max_tokens": 4, "thinking": {"type": "enabled",
                                                          "budget_tokens": 1024}},
     400, "'thinking'"),
    ({"messages": MESSAGES, "max_tokens": 4, "tool_choice": {"type": "maybe"}}, 400,
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "ab " * 400}], "max_tokens": 4}, 400,
     "context"),
]


@pytest.mark.parametrize("body, status, text", BAD, ids=[t for _, _, t in BAD])
def test_errors_in_anthropics_shape(server, body, status, text):  # noqa: F811
    r = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": KEY},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and set(err["error"]) == {"type", "message"}
    assert err["error"]["type"] == "invalid_request_error"
    assert text in err["error"]["message"]


def test_other_errors_in_anthropics_shape(server, ant):  # noqa: F811
    headers = {"x-api-key": KEY}
    r = httpx.post(server.url + "/v1/messages", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/messages/batches", json={}, headers=headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(server.url + "/v1/messages", content=b"x" * (2 << 20), headers=headers)
    assert r.status_code == 413 and r.json()["type"] == "error"
    with pytest.raises(anthropic.BadRequestError) as e:
        ant.messages.create(model="tiny", max_tokens=4, messages=MESSAGES,
                            extra_body={"temperature": 2.0})
    assert e.value.body["error"]["type"] == "invalid_request_error"
    # The OpenAI routes keep OpenAI's shape.
    r = httpx.post(server.url + "/v1/chat/completions", json={}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"


def test_full_queue_is_overloaded(loaded):
    """Anthropic's answer to a full queue: 529 overloaded_error (OpenAI routes: 429)."""
    model, tok = loaded
    app = create_app(model, tok, ServeConfig(max_queue=1, max_tokens_limit=64))
    s = Server(app)
    try:
        engine, gate = app.state.engine, threading.Event()
        engine.submit(Job([5, 6, 7], {"max_tokens": 2}, lambda e: gate.wait(10)))
        time.sleep(0.3)
        engine.submit(Job([5, 6, 7], {"max_tokens": 2}, lambda e: None))  # fills the queue
        a = anthropic.Anthropic(base_url=s.url, api_key="none", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as e:
            a.messages.create(model="tiny", max_tokens=2, messages=MESSAGES)
        assert e.value.status_code == 529
        assert e.value.body["error"]["type"] == "overloaded_error"
        assert e.value.response.headers["retry-after"] == "2"
        gate.set()
    finally:
        s.stop()
