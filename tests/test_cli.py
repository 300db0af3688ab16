"""The `specstream` CLI in-process (generate, chat, errors without tracebacks), the chat
loop with scripted input, the installed console script, and one real-model run."""

from __future__ import annotations

import builtins
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specstream_mlx.cli import main
from specstream_mlx.cli.chat import GREEN, chat_loop


def scripted(*turns):
    """A `read` function returning `turns` in order; an exception in them is raised."""
    queue = list(turns)

    def read(prompt: str = "") -> str:
        item = queue.pop(0)
        if isinstance(item, BaseException) or (isinstance(item, type)
                                               and issubclass(item, BaseException)):
            raise item
        return item

    return read


# --- generate ----------------------------------------------------------------------------


def test_generate_prints_text_and_stats(folder, capsys):
    assert main(["generate", "--model", folder, "--prompt", "hi", "--max-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()  # the generated text
    assert "tokens/pass" in err and "5 tokens" in err
    assert "3 streams" in err  # the model line
    assert "Traceback" not in err


def test_generate_text_matches_the_library(folder, loaded, capsys):
    from specstream_mlx import generate

    model, tokenizer = loaded
    expected = generate(model, tokenizer, "hi", max_tokens=12)
    assert main(["generate", "--model", folder, "-p", "hi", "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "--model", folder, "-p", "hi", "--max-tokens", "12",
                 "--no-speculative"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n" and "1.00 tokens/pass" in err


def test_generate_reads_the_prompt_from_stdin(folder, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi"))
    assert main(["generate", "--model", folder, "-p", "-", "--max-tokens", "3", "--raw"]) == 0
    assert "prompt 2 tokens" in capsys.readouterr().err  # "hi" raw: two byte tokens


def test_generate_with_seeded_sampling_is_reproducible(folder, capsys):
    args = ["generate", "--model", folder, "-p", "hi", "--max-tokens", "20", "--temp", "1.0",
            "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_missing_model_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["generate", "--model", str(missing), "--prompt", "hi"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error:") and str(missing) in err
    assert "Traceback" not in err and out == ""


def test_broken_model_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not valid JSON" in err and "Traceback" not in err


def test_max_tokens_zero(folder, capsys):
    assert main(["generate", "--model", folder, "--prompt", "hi", "--max-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: --max-tokens must be >= 1, got 0" in err and "Traceback" not in err


def test_prompt_beyond_the_context(folder, capsys):
    assert main(["generate", "--model", folder, "--prompt", "a" * 600]) == 2
    err = capsys.readouterr().err
    assert "error: the prompt has" in err and "context is 512 tokens" in err
    assert "Traceback" not in err


def test_empty_prompt(folder, capsys):
    assert main(["generate", "--model", folder, "--prompt", "  "]) == 2
    assert "error: the prompt is empty" in capsys.readouterr().err


def test_bad_flag_is_an_argparse_error(folder, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", folder, "--prompt", "hi", "--precision", "fp3"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- chat --------------------------------------------------------------------------------


def test_chat_loop_answers_resets_and_ends_at_eof(loaded, capsys):
    model, tokenizer = loaded
    read = scripted("hello", "/reset", "", "hello", EOFError)
    chat_loop(model, tokenizer, {"max_tokens": 6}, system="Be brief.", read=read)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "[conversation cleared]" in lines
    answers = [line for line in lines if line and not line.startswith(("[", "Commands"))]
    # After /reset the same question gets the same (greedy) answer.
    assert len(answers) == 2 and answers[0] == answers[1]
    assert "Commands:" in out  # an empty line shows the help
    assert err.count("tokens/pass") == 2


def test_chat_loop_keeps_the_conversation(loaded, capsys):
    """The second answer depends on the first turn unless the conversation is reset."""
    model, tokenizer = loaded
    chat_loop(model, tokenizer, {"max_tokens": 8}, read=scripted("hello", "again", "/quit"))
    kept = capsys.readouterr().out.splitlines()
    chat_loop(model, tokenizer, {"max_tokens": 8}, read=scripted("again", "/quit"))
    fresh = capsys.readouterr().out.splitlines()
    assert kept[1] != fresh[0]


def test_chat_loop_show_draft_colours_only_drafted_pieces(loaded, capsys):
    model, tokenizer = loaded
    chat_loop(model, tokenizer, {"max_tokens": 8, "speculative": False}, show_draft=True,
              read=scripted("hello", EOFError))
    assert GREEN not in capsys.readouterr().out  # plain decoding drafts nothing


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, EOFError])
def test_chat_loop_exits_cleanly_at_the_prompt(loaded, capsys, interrupt):
    model, tokenizer = loaded
    chat_loop(model, tokenizer, {"max_tokens": 4}, read=scripted(interrupt))
    out, err = capsys.readouterr()
    assert out == "\n" and err == ""


def test_chat_loop_reports_bad_turns_and_goes_on(loaded, capsys):
    model, tokenizer = loaded
    chat_loop(model, tokenizer, {"max_tokens": 4}, read=scripted("a" * 600, "hello", EOFError))
    out, err = capsys.readouterr()
    assert "error: the prompt has" in err and "/reset" in err
    assert err.count("tokens/pass") == 1  # the next turn is answered


def test_chat_command_with_patched_input(folder, capsys, monkeypatch):
    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr(builtins, "input", eof)
    assert main(["chat", "--model", folder]) == 0


def test_chat_command_ends_at_end_of_input(folder, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", folder, "--max-tokens", "4", "--show-draft"]) == 0
    out, err = capsys.readouterr()
    assert "/reset" in err and "tokens/pass" in err and ">> " in out


def test_chat_command_missing_model(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "gone")]) == 2
    assert capsys.readouterr().err.startswith("error:")


# --- the installed console script --------------------------------------------------------


def test_console_script_help():
    script = Path(sys.executable).parent / "specstream"
    exe = str(script) if script.exists() else shutil.which("specstream")
    assert exe, "the specstream console script is not installed (pip install -e .)"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: specstream" in result.stdout
    assert "chat" in result.stdout and "generate" in result.stdout


# --- the embedded model ------------------------------------------------------------------


@pytest.mark.real
def test_real_model_knows_the_capital_of_france(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    code = main(["generate", "--prompt", "What is the capital of France?", "--max-tokens", "24"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Paris" in out
    assert re.search(r"\[\d+ tokens, \d+ passes, [\d.]+ tokens/pass", err)
    assert (tmp_path / "SmolLM2-135M-Instruct" / "streams.safetensors").is_file()
