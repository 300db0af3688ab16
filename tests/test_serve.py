"""`specstream serve` on a free port with a tiny model, driven by the real `openai` client
and plain HTTP: answers equal the Python API's (greedy), streaming and not, clean HTTP
errors for bad requests, a load of concurrent and disconnecting clients."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from conftest import cut_at_first_stop

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from specstream_mlx import stream_generate  # noqa: E402
from specstream_mlx.generate import encode_messages  # noqa: E402
from specstream_mlx.serve.app import ServeConfig, create_app  # noqa: E402

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread, stopped at the end of the module."""

    def __init__(self, app):
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(loaded):
    model, tok = loaded
    config = ServeConfig(model_name="tiny", api_key=KEY, max_queue=32, max_tokens_limit=64)
    s = Server(create_app(model, tok, config))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def api_pieces(loaded, messages=None, prompt=None, max_tokens=12) -> list[str]:
    model, tok = loaded
    ids = encode_messages(tok, messages) if messages is not None else list(tok.encode(prompt))
    return [r.text for r in stream_generate(model, tok, ids, max_tokens=max_tokens,
                                            chat=False)]


def api_answer(loaded, messages=None, prompt=None, max_tokens=12) -> str:
    return "".join(api_pieces(loaded, messages, prompt, max_tokens))


MESSAGES = [{"role": "user", "content": "hello there"}]


def test_chat_equals_the_python_api(loaded, client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    assert r.choices[0].message.content == api_answer(loaded, MESSAGES)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.model_extra["specstream"]["tokens_per_pass"] >= 1


def test_chat_streaming_equals_the_python_api(loaded, client):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == api_answer(loaded, MESSAGES)
    assert usage is not None and usage.completion_tokens > 0 and finish in ("stop", "length")


def test_completions_stream_and_not(loaded, client):
    want = api_answer(loaded, prompt="abc abc abc")
    r = client.completions.create(model="tiny", prompt="abc abc abc", max_tokens=12)
    assert r.choices[0].text == want
    got = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="abc abc abc", max_tokens=12, stream=True) if c.choices)
    assert got == want


def test_stop_strings_are_cut(loaded, client):
    full = api_answer(loaded, MESSAGES, max_tokens=20)
    if len(full) < 4:
        pytest.skip("answer too short to cut")
    stop = full[2:4]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20,
                                       stop=[stop])
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


STOP_CASES = ["spans tokens", "false start", "one a prefix of another", "overlapping",
              "four stops", "never hit, its start at the end"]


def stops_for(case: str, full: str) -> list[str]:
    """A stop list chosen from the greedy answer `full` (one character a token)."""
    if case == "false start":  # its first character came earlier: held, then released
        recur = next((j for j in range(1, len(full) - 3) if full[j] in full[:j]), None)
        if recur is None:
            pytest.skip("no repeated character in the answer")
        return [full[recur : recur + 3]]
    return {
        "spans tokens": [full[3:6]],
        "one a prefix of another": [full[8:11], full[8:10]],
        "overlapping": [full[6:12], full[8:10]],  # the inner one completes first
        "four stops": [full[10:13], full[4:6], "", full[4:7]],
        "never hit, its start at the end": [full[-2:] + "~"],  # no "~" in the vocabulary
    }[case]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize("case", STOP_CASES)
def test_streamed_text_equals_the_whole_response_for_every_stop(loaded, client, chat, case):
    """A stream never shows text that a stop string later cuts: its pieces add up to the
    whole response, which ends before the first stop (the Python API's answer cut)."""
    source = {"messages": MESSAGES} if chat else {"prompt": "abc abc abc"}
    pieces = api_pieces(loaded, **source, max_tokens=20)
    stops = stops_for(case, "".join(pieces))
    want, hit = cut_at_first_stop(pieces, stops)
    create = client.chat.completions.create if chat else client.completions.create
    kwargs = {"model": "tiny", "max_tokens": 20, "stop": stops,
              **({"messages": MESSAGES} if chat else {"prompt": "abc abc abc"})}
    whole = create(**kwargs).choices[0]
    streamed, finish, usage = "", None, None
    for chunk in create(**kwargs, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            streamed += (c.delta.content or "") if chat else c.text
            finish = c.finish_reason or finish
    assert streamed == (whole.message.content if chat else whole.text) == want
    assert finish == whole.finish_reason == ("stop" if hit else "length")
    assert usage.completion_tokens == (hit or 20)
    if case != "never hit, its start at the end":
        assert hit


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for series in ("specstream_requests_total", "specstream_generated_tokens_total",
                   "specstream_tokens_per_pass", "specstream_accepted_draft_length",
                   "specstream_time_to_first_token_seconds", "specstream_queue_length"):
        assert series in text


def post(server, path, body, key=KEY, raw=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(server.url + path, content=raw if raw is not None else json.dumps(body),
                      headers=headers, timeout=60)


BAD = [
    ({"messages": MESSAGES, "n": 2}, 400, "'n'"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "does not support tools"),  # the tiny template has no tools
    ({"messages": MESSAGES, "tools": [{"type": "function"}]}, 422, "tools.0.function"),
    ({"messages": MESSAGES, "logprobs": True}, 400, "'logprobs'"),
    ({"messages": MESSAGES, "max_tokens": 10**6}, 400, "max_tokens must be <= 64"),
    ({"messages": MESSAGES, "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": MESSAGES, "temperature": "hot"}, 422, "temperature"),
    ({"messages": MESSAGES, "top_p": 1.5}, 422, "top_p"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "empty"),
    ({}, 422, "messages"),
    ({"messages": [{"role": "user", "content": "ab " * 400}]}, 400, "context"),
]


@pytest.mark.parametrize("body, status, text", BAD, ids=[t for _, _, t in BAD])
def test_bad_chat_requests(server, body, status, text):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert text in err["message"] or text == err["param"]
    assert "Traceback" not in r.text


def test_bad_completion_requests(server):
    r = post(server, "/v1/completions", {"prompt": [1, 2, 99999]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", None, raw=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", None, raw=b"x" * (2 << 20))
    assert r.status_code == 413


def test_api_key(server):
    for key in (None, "wrong", KEY + "x"):
        r = post(server, "/v1/chat/completions", {"messages": MESSAGES}, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401


@pytest.mark.parametrize("max_batch", [4, 1])
def test_load_of_concurrent_and_disconnecting_clients(loaded, server, client, max_batch):
    """8 clients, 3 requests each, mixed streaming, some hanging up early: every request
    answered or refused cleanly, greedy answers equal single-client runs, the server
    healthy afterwards; batched (the default, 4) and one at a time."""
    if max_batch != server.app.state.engine.max_batch:
        model, tok = loaded
        one = Server(create_app(model, tok, ServeConfig(
            model_name="tiny", api_key=KEY, max_queue=32, max_tokens_limit=64,
            max_batch=max_batch)))
        try:
            client = openai.OpenAI(base_url=one.url + "/v1", api_key=KEY, max_retries=0)
            check_load(loaded, one, client)
        finally:
            one.stop()
    else:
        check_load(loaded, server, client)


def check_load(loaded, server, client):
    prompts = [f"question {i} about letters" for i in range(4)]
    want = {p: api_answer(loaded, [{"role": "user", "content": p}], max_tokens=16)
            for p in prompts}
    results, errors, hung_up, refused = [], [], [], []

    def worker(w: int):
        for k in range(3):
            try:
                p = prompts[(w + k) % len(prompts)]
                msgs = [{"role": "user", "content": p}]
                if (w + k) % 3 == 0:  # streams, and every other such client hangs up
                    stream = client.chat.completions.create(
                        model="tiny", messages=msgs, max_tokens=16, stream=True)
                    text = ""
                    for i, chunk in enumerate(stream):
                        for c in chunk.choices:
                            text += c.delta.content or ""
                        if w % 2 == 0 and i == 2:
                            stream.close()
                            text = None
                            break
                    if text is None:
                        hung_up.append(p)
                    else:
                        results.append((p, text))
                else:
                    r = client.chat.completions.create(model="tiny", messages=msgs,
                                                       max_tokens=16)
                    results.append((p, r.choices[0].message.content))
            except openai.RateLimitError:  # a refused request must be a clean 429
                refused.append(w)
            except Exception as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert len(results) + len(hung_up) + len(refused) == 24  # none lost
    assert hung_up and len(results) >= 12
    for p, text in results:
        assert text == want[p]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12)
    assert r.choices[0].message.content == api_answer(loaded, MESSAGES)


def test_full_queue_answers_429(loaded):
    model, tok = loaded
    app = create_app(model, tok, ServeConfig(max_queue=1, max_tokens_limit=64))
    s = Server(app)
    try:
        engine = app.state.engine
        gate = threading.Event()
        # Hold the worker: a job whose emit blocks until released.
        from specstream_mlx.serve.engine import Job

        engine.submit(Job([5, 6, 7], {"max_tokens": 2}, lambda e: gate.wait(10)))
        time.sleep(0.3)
        engine.submit(Job([5, 6, 7], {"max_tokens": 2}, lambda e: None))  # fills the queue
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["type"] == "rate_limit_error"
        gate.set()
    finally:
        s.stop()
