"""`specstream serve` with a prompt cache on disk, on live uvicorn servers driven by the
real `openai` and `anthropic` clients. A
restart is a second app over the same cache folder: a conversation whose 300-token
prefix the first one saw reuses it from disk (prompt_cached_tokens says so) with the
answer a fresh prefill gives; a file truncated on purpose is skipped with a log line."""

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
