"""`specstream chat --session NAME` through the CLI function: the conversation (messages
and the KV cache of its latest turn) is saved under --session-dir and resumed by the next
run, which prefills only the new turn and answers as a fresh prefill would; a broken
cache file is skipped with a log line, a broken history or name is one error line."""

from __future__ import annotations

import builtins
import json
import logging
import re

import pytest

from specstream_mlx import stream_generate
from specstream_mlx.cli import main
from specstream_mlx.decoding.disk_cache import SUFFIX
from specstream_mlx.generate import encode_messages

FIRST = "tell me a long story about the sea, the wind and a small boat"


def chat(folder, session_dir, monkeypatch, *lines, name="s1", extra=()) -> int:
    """One `specstream chat --session` run reading `lines`, then end of input."""
    feed = iter(lines)

    def read(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", read)
    return main(["chat", "--model", folder, "--max-tokens", "8", "--session", name,
                 "--session-dir", str(session_dir), *extra])


def history(session_dir, name="s1") -> list[dict]:
    return json.loads((session_dir / name / "messages.json").read_text())["messages"]


def reused(err: str) -> list[int]:
    """The reused prompt tokens of each answer's statistics line (0 when none)."""
    return [int(m.group(1)) if m.group(1) else 0
            for m in re.finditer(r"prompt \d+ tokens(?: \((\d+) reused\))?", err)]


def fresh_answer(loaded, messages) -> str:
    model, tok = loaded
    return "".join(r.text for r in stream_generate(model, tok, encode_messages(tok, messages),
                                                   max_tokens=8, chat=False))


def test_a_session_resumes_from_disk(loaded, folder, tmp_path, monkeypatch, capsys):
    assert chat(folder, tmp_path, monkeypatch, FIRST) == 0
    saved = history(tmp_path)
    assert [m["role"] for m in saved] == ["user", "assistant"]
    assert len(list((tmp_path / "s1").glob("*" + SUFFIX))) == 1
    first_prompt = len(encode_messages(loaded[1], saved[:1]))
    capsys.readouterr()

    assert chat(folder, tmp_path, monkeypatch, "and then?") == 0
    out, err = capsys.readouterr()
    assert "session 's1' resumed: 1 earlier turns" in err
    assert reused(err)[0] >= first_prompt  # the first turn was not prefilled again
    convo = history(tmp_path)
    assert [m["role"] for m in convo] == ["user", "assistant"] * 2
    assert convo[3]["content"] == fresh_answer(loaded, convo[:3])
    assert convo[3]["content"] in out


def test_a_truncated_session_cache_is_skipped_with_a_log_line(loaded, folder, tmp_path,
                                                              monkeypatch, capsys, caplog):
    assert chat(folder, tmp_path, monkeypatch, FIRST) == 0
    (path,) = (tmp_path / "s1").glob("*" + SUFFIX)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="specstream.prompt_cache"):
        assert chat(folder, tmp_path, monkeypatch, "and then?") == 0
    assert any("cut short" in r.message for r in caplog.records)
    assert reused(capsys.readouterr().err) == [0]
    convo = history(tmp_path)
    assert convo[3]["content"] == fresh_answer(loaded, convo[:3])


def test_reset_clears_the_saved_history_but_keeps_the_system_prompt(folder, tmp_path,
                                                                    monkeypatch, capsys):
    assert chat(folder, tmp_path, monkeypatch, "hello", "/reset",
                extra=("--system", "Be brief.")) == 0
    assert history(tmp_path) == [{"role": "system", "content": "Be brief."}]
    assert chat(folder, tmp_path, monkeypatch, "hi", extra=("--system", "Other.")) == 0
    assert "--system is ignored" in capsys.readouterr().err
    assert [m["content"] for m in history(tmp_path)][:2] == ["Be brief.", "hi"]


@pytest.mark.parametrize("name", ["../up", ".hidden", "a/b", "", "x" * 65])
def test_bad_session_names(folder, tmp_path, monkeypatch, capsys, name):
    assert chat(folder, tmp_path, monkeypatch, "hi", name=name) == 2
    assert capsys.readouterr().err.startswith("error: --session")
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_history_is_one_error_line(folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "messages.json").write_text("{not json")
    assert chat(folder, tmp_path, monkeypatch, "hi") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: session 's1'") and "unreadable" in err
    assert (tmp_path / "s1" / "messages.json").read_text() == "{not json"  # left as it was


def test_session_dir_needs_a_session(folder, tmp_path, capsys):
    assert main(["chat", "--model", folder, "--session-dir", str(tmp_path)]) == 2
    assert "--session-dir needs --session" in capsys.readouterr().err
