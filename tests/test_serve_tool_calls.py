"""Tool calls on both APIs, on a live server whose tiny tokenizer has Qwen2.5's chat
template (which renders tools): the prompt each API renders, and answers parsed into
OpenAI `tool_calls` and Anthropic `tool_use` blocks, whole and streamed, by the real
`openai` and `anthropic` clients.

A tiny random model never writes a tool call, so the tests of parsed calls replace the
engine's generation with a script that emits fixed text in 3-character pieces (real
tokens are not involved there); the prompts they send are still rendered by the real
template and checked, and one test runs the real model with tools rendered."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

from test_serve import KEY, Server, server  # noqa: E402, F401 (a fixture)

from specstream_mlx.generate import GenerationResponse, encode_messages  # noqa: E402
from specstream_mlx.serve.app import ServeConfig, create_app  # noqa: E402
from specstream_mlx.serve.engine import Done  # noqa: E402

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"]}
OPENAI_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city", "parameters": WEATHER}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "The weather of a city",
                    "input_schema": WEATHER}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_loaded(tmp_path_factory):
    """A tiny model whose tokenizer has Qwen2.5's template; its context widened, as the
    template's tool instructions take ~650 one-character tokens."""
    from tiny_folder import TOOLS_CHAT_TEMPLATE, make_tiny_folder

    from specstream_mlx import load
    from specstream_mlx.models.config import StreamArgs

    folder, _ = make_tiny_folder(tmp_path_factory.mktemp("tools") / "tiny",
                                 streams=StreamArgs(num_streams=3, msa_layers=2),
                                 chat_template=TOOLS_CHAT_TEMPLATE)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config,
                                                    "max_position_embeddings": 4096}))
    return load(folder)


@pytest.fixture(scope="module")
def tools_server(tools_loaded):
    model, tok = tools_loaded
    # One job at a time: the `script` fixture replaces that worker's generation.
    app = create_app(model, tok, ServeConfig(model_name="tiny", api_key=KEY,
                                             max_tokens_limit=64, max_batch=1))
    s = Server(app)
    s.app = app
    yield s
    s.stop()


@pytest.fixture
def script(tools_server, monkeypatch):
    """Replace the engine's generation: each job emits `script.text` in pieces of 3
    characters (one fake token each) and ends with `script.finish`; `script.jobs` keeps
    the jobs, so tests see the prompts the routes rendered."""
    engine = tools_server.app.state.engine

    class Script:
        text, finish, jobs = "", "stop", []

    def fake(job):
        Script.jobs.append(job)
        chunks = [Script.text[i: i + 3] for i in range(0, len(Script.text), 3)]
        for n, chunk in enumerate(chunks, 1):
            if job.cancelled.is_set():
                break
            job.emit(GenerationResponse(
                text=chunk, token=5, from_draft=False, prompt_tokens=len(job.ids),
                prompt_tps=0.0, generation_tokens=n, generation_tps=0.0, passes=n,
                tokens_per_pass=1.0, drafted_tokens=0, peak_memory=0.0,
                finish_reason=Script.finish if n == len(chunks) else None))
        job.emit(Done())

    monkeypatch.setattr(engine, "_generate", fake)
    Script.jobs = []
    return Script


@pytest.fixture(scope="module")
def oai(tools_server):
    return openai.OpenAI(base_url=tools_server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def ant(tools_server):
    return anthropic.Anthropic(base_url=tools_server.url, api_key=KEY, max_retries=0)


def test_both_apis_render_the_same_prompt_with_tools_and_history(tools_loaded, script, oai,
                                                                  ant):
    """A conversation with a tool call and its result, in each API's terms, renders to
    the same tokens: the template's, with the tools, the call and the result."""
    script.text = "Sunny."
    oai.chat.completions.create(model="tiny", max_tokens=8, tools=OPENAI_TOOLS, messages=[
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    ant.messages.create(model="tiny", max_tokens=8, tools=ANTHROPIC_TOOLS,
                        system=[{"type": "text", "text": "Be brief."}], messages=[
        *ASK,
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"}]}])
    first, second = (job.ids for job in script.jobs)
    assert first == second
    prompt = tools_loaded[1].decode(first)
    assert json.dumps(OPENAI_TOOLS[0]) in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>') in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tools_loaded[1].tool_parser is not None  # mlx-lm's, inferred from the template


def test_openai_tool_calls_whole_and_streamed(script, oai):
    script.text = "I will look.\n" + CALL + "\n" + CALL2
    whole = oai.chat.completions.create(model="tiny", max_tokens=64, messages=ASK,
                                        tools=OPENAI_TOOLS)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look."
    got = [(c.function.name, json.loads(c.function.arguments), c.type)
           for c in choice.message.tool_calls]
    assert got == [("get_weather", {"city": "Paris"}, "function"),
                   ("get_time", {"zone": "CET"}, "function")]
    assert all(c.id.startswith("call_") for c in choice.message.tool_calls)

    text, calls, finish = "", {}, None
    for chunk in oai.chat.completions.create(model="tiny", max_tokens=64, messages=ASK,
                                             tools=OPENAI_TOOLS, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                calls.setdefault(tc.index, [tc.function.name, ""])[1] += tc.function.arguments
            finish = c.finish_reason or finish
    assert text == choice.message.content and finish == "tool_calls"
    assert [(n, json.loads(a)) for n, a in calls.values()] == [g[:2] for g in got]


def test_anthropic_tool_use_whole_and_streamed(script, ant):
    script.text = CALL
    whole = ant.messages.create(model="tiny", max_tokens=64, messages=ASK,
                                tools=ANTHROPIC_TOOLS)
    assert whole.stop_reason == "tool_use" and whole.stop_sequence is None
    [block] = whole.content
    assert (block.type, block.name, block.input) == ("tool_use", "get_weather",
                                                     {"city": "Paris"})
    assert block.id.startswith("toolu_")
    with ant.messages.stream(model="tiny", max_tokens=64, messages=ASK,
                             tools=ANTHROPIC_TOOLS) as stream:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in stream]
        final = stream.get_final_message()
    assert ("content_block_delta", "input_json_delta") in kinds
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in final.content] == \
        [("tool_use", "get_weather", {"city": "Paris"})]


def test_bare_json_call_is_a_call(script, oai, ant):
    """The answer Qwen2.5-Coder-0.5B gives greedily: the call's JSON without markers."""
    script.text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    r = oai.chat.completions.create(model="tiny", max_tokens=64, messages=ASK,
                                    tools=OPENAI_TOOLS)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    m = ant.messages.create(model="tiny", max_tokens=64, messages=ASK, tools=ANTHROPIC_TOOLS)
    assert [(b.type, b.input) for b in m.content] == [("tool_use", {"city": "Paris"})]


def test_malformed_tool_call_is_plain_text(script, oai, ant):
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>'
    script.text = bad
    r = oai.chat.completions.create(model="tiny", max_tokens=64, messages=ASK,
                                    tools=OPENAI_TOOLS)
    assert r.choices[0].message.content == bad and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    m = ant.messages.create(model="tiny", max_tokens=64, messages=ASK, tools=ANTHROPIC_TOOLS)
    assert [(b.type, b.text) for b in m.content] == [("text", bad)]
    assert m.stop_reason == "end_turn"


def test_tool_choice_forces_a_call_and_parallel_off_keeps_one(tools_loaded, script, oai, ant):
    """A named tool_choice begins the answer with that call in the prompt; the script
    continues it. Without parallel calls the answer ends after the first."""
    tok = tools_loaded[1]
    script.text = '{"city": "Paris"}}\n</tool_call>\n' + CALL2
    r = oai.chat.completions.create(
        model="tiny", max_tokens=64, messages=ASK, tools=OPENAI_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    assert tok.decode(script.jobs[-1].ids).endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ')
    m = ant.messages.create(model="tiny", max_tokens=64, messages=ASK, tools=ANTHROPIC_TOOLS,
                            tool_choice={"type": "tool", "name": "get_weather"})
    assert [b.name for b in m.content] == ["get_weather", "get_time"]
    script.text = CALL
    m = ant.messages.create(model="tiny", max_tokens=64, messages=ASK, tools=ANTHROPIC_TOOLS,
                            tool_choice={"type": "any"})
    assert tok.decode(script.jobs[-1].ids).endswith("<|im_start|>assistant\n<tool_call>\n")


def test_tool_choice_none_renders_no_tools(tools_loaded, script, oai):
    script.text = CALL
    r = oai.chat.completions.create(model="tiny", max_tokens=64, messages=ASK,
                                    tools=OPENAI_TOOLS, tool_choice="none")
    assert r.choices[0].message.content == CALL  # not parsed: tools are off
    assert "get_weather" not in tools_loaded[1].decode(script.jobs[-1].ids)


def test_real_generation_with_tools_equals_the_python_api(tools_loaded, oai):
    """No script: the tiny model answers the rendered prompt, as the Python API does."""
    from specstream_mlx import stream_generate

    model, tok = tools_loaded
    ids = encode_messages(tok, ASK, OPENAI_TOOLS)
    want = "".join(r.text for r in stream_generate(model, tok, ids, max_tokens=12,
                                                   chat=False))
    r = oai.chat.completions.create(model="tiny", max_tokens=12, messages=ASK,
                                    tools=OPENAI_TOOLS)
    assert r.choices[0].message.content == want


BAD_TOOLS = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
    ({"tool_choice": "required", "tools": None}, "no tools"),
    ({"tool_choice": {"type": "bogus"}}, "tool_choice"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "not a JSON object"),
]


@pytest.mark.parametrize("change, text", BAD_TOOLS, ids=[t for _, t in BAD_TOOLS])
def test_bad_tool_requests(tools_server, change, text):
    import httpx

    body = {"messages": ASK, "tools": OPENAI_TOOLS, "max_tokens": 4, **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(tools_server.url + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    assert text in r.json()["error"]["message"]


def test_no_tools_in_the_template_is_a_400_on_both_apis(server):  # noqa: F811
    """The module `server` of test_serve.py: the tiny template has no tools."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", max_tokens=4, messages=ASK,
                                  tools=OPENAI_TOOLS)
    assert "does not support tools" in e.value.body["message"]
    a = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    for kwargs in ({"tools": ANTHROPIC_TOOLS, "messages": ASK},
                   {"messages": [*ASK, {"role": "assistant", "content": [
                       {"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                       {"role": "user", "content": [
                           {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]}):
        with pytest.raises(anthropic.BadRequestError) as e:
            a.messages.create(model="tiny", max_tokens=4, **kwargs)
        assert e.value.body["type"] == "error"
        assert e.value.body["error"]["type"] == "invalid_request_error"
        assert "does not support tools" in e.value.body["error"]["message"]
