"""Every bad input ends in one clear line: the CLI exits with status 2 and no traceback,
the API raises a ValueError subclass from specstream_mlx.errors naming the argument, and
nothing is written or overwritten."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from tiny_folder import make_tiny_folder

from specstream_mlx import generate, load
from specstream_mlx.cli import main
from specstream_mlx.errors import SpecstreamError
from specstream_mlx.models.config import StreamArgs


def run_cli(argv: list[str], capsys) -> str:
    """Runs the CLI; asserts exit status 2 and one error line; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


GENERATE_FLAGS = [
    (["--draft-top-k", "-1"], "--draft-top-k must be in [1, 64], got -1"),
    (["--top-k", "-1"], "--top-k must be >= 0, got -1"),
    (["--min-p", "1.5"], "--min-p must be in [0.0, 1.0]"),
    (["--draft-top-k", "0"], "--draft-top-k must be in [1, 64]"),
    (["--draft-top-k", "100000"], "--draft-top-k must be in [1, 64]"),
    (["--temp", "inf"], "--temp must be a finite number"),
    (["--temp", "nan"], "--temp must be a finite number"),
    (["--temp", "-1"], "--temp must be >= 0.0"),
    (["--top-p", "2"], "--top-p must be in [0.0, 1.0], got 2.0"),
    (["--top-p", "-0.5"], "--top-p must be in [0.0, 1.0]"),
    (["--top-p", "nan"], "--top-p must be a finite number"),
    (["--tree-budget", "-1"], "--tree-budget must be in [0, 256], got -1"),
    (["--tree-budget", "1000000"], "--tree-budget must be in [0, 256]"),
    (["--lookup-depth", "-1"], "--lookup-depth must be in [0, 256]"),
    (["--min-draft-prob", "1.5"], "--min-draft-prob must be in [0.0, 1.0]"),
    (["--min-draft-prob", "nan"], "--min-draft-prob must be a finite number"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--max-tokens", "-5"], "--max-tokens must be >= 1"),
    (["--seed", "-1"], "--seed must be in [0, "),
]


@pytest.mark.parametrize("flags, message", GENERATE_FLAGS,
                         ids=[" ".join(f) for f, _ in GENERATE_FLAGS])
def test_generate_flags(folder, capsys, flags, message):
    line = run_cli(["generate", "--model", folder, "--prompt", "hi", *flags], capsys)
    assert message in line


@pytest.mark.parametrize("prompt, message", [
    ("   ", "the prompt is empty"),
    ("caf\udce9", "prompt is not valid UTF-8 text"),  # b"caf\xe9" as argv delivers it
    ("ab" * 400, "context is 512 tokens"),
])
def test_generate_prompts(folder, capsys, prompt, message):
    assert message in run_cli(["generate", "--model", folder, "--prompt", prompt], capsys)


def broken_folder(folder: str, tmp_path, config=None, drop=None):
    target = tmp_path / "broken"
    shutil.copytree(folder, target)
    if config is not None:
        (target / "config.json").write_text(config if isinstance(config, str)
                                            else json.dumps(config))
    if drop:
        (target / drop).unlink()
    return str(target)


def edited_config(folder: str, **changes) -> dict:
    config = json.loads((Path(folder) / "config.json").read_text())
    config.update(changes)
    return config


@pytest.mark.parametrize("make, message", [
    (lambda f: "[1, 2, 3]", "must hold a JSON object, not a list"),
    (lambda f: "{not json", "is not valid JSON"),
    (lambda f: edited_config(f, hidden_size="64"),
     "hidden_size must be a positive integer, got '64'"),
    (lambda f: edited_config(f, vocab_size=-1), "vocab_size must be a positive integer"),
    (lambda f: edited_config(f, rms_norm_eps="small"), "rms_norm_eps must be a positive number"),
    (lambda f: edited_config(f, tie_word_embeddings="yes"),
     "tie_word_embeddings must be true or false"),
    (lambda f: edited_config(f, model_type=["llama"]), "model_type ['llama'] is not supported"),
    (lambda f: edited_config(f, hidden_size=32), "cannot load weights"),
])
def test_broken_config(folder, tmp_path, capsys, make, message):
    target = broken_folder(folder, tmp_path, config=make(folder))
    assert message in run_cli(["generate", "--model", target, "--prompt", "hi"], capsys)


@pytest.mark.parametrize("priors, message", [
    ("{not json", "bad drafting priors"),
    ("[0.5]", "not a JSON object"),
    ('{"greedy": {"context_next": 2}}', "greedy: 2 is not a rate in [0, 1]"),
    ('{"sampled": {"stream_weight": 0}}', "stream_weight must be a positive number"),
    ('{"greedy": {"chain_first": {}}}', "unknown fields ['chain_first']"),
])
def test_broken_drafting_priors(folder, tmp_path, capsys, priors, message):
    target = broken_folder(folder, tmp_path)
    (Path(target) / "drafting_priors.json").write_text(priors)
    line = run_cli(["generate", "--model", target, "--prompt", "hi"], capsys)
    assert message in line and "drafting_priors.json" in line


def test_missing_weights_and_folder(folder, tmp_path, capsys):
    target = broken_folder(folder, tmp_path, drop="model.safetensors")
    assert "no model*.safetensors" in run_cli(["generate", "--model", target, "-p", "hi"],
                                              capsys)
    missing = str(tmp_path / "nowhere")
    assert "error" in run_cli(["generate", "--model", missing, "-p", "hi"], capsys)


def test_streams_of_another_model(folder, tmp_path, capsys):
    other, _ = make_tiny_folder(tmp_path / "other", streams=StreamArgs(num_streams=2,
                                                                       msa_layers=2))
    target = broken_folder(folder, tmp_path)
    shutil.copyfile(other / "streams.safetensors", Path(target) / "streams.safetensors")
    assert "streams.safetensors" in run_cli(["generate", "--model", target, "-p", "hi"],
                                            capsys)


def test_nan_weights(folder, tmp_path, capsys):
    import mlx.core as mx

    target = broken_folder(folder, tmp_path)
    weights = mx.load(str(Path(target) / "model.safetensors"))
    name = sorted(k for k in weights if k.endswith("mlp.up_proj.weight"))[0]
    weights[name] = weights[name] * float("nan")
    mx.save_safetensors(str(Path(target) / "model.safetensors"), weights)
    line = run_cli(["generate", "--model", target, "-p", "hi"], capsys)
    assert "not finite" in line and name in line


# --- the Python API ------------------------------------------------------------------


API_CASES = [
    ({"prompt": [1, 2, 99999]}, "token id 99999 at position 2 is outside the vocabulary"),
    ({"prompt": [5, -1]}, "token id -1"),
    ({"prompt": [5, 1.5]}, "token ids must be integers"),
    ({"prompt": [5, True]}, "token ids must be integers"),
    ({"prompt": []}, "the prompt is empty"),
    ({"prompt": b"caf\xe9"}, "prompt is not valid UTF-8 text"),
    ({"prompt": 42}, "prompt must be a string or a list of token ids"),
    ({"prompt": None}, "prompt must be a string or a list of token ids"),
    ({"temp": float("nan")}, "temp must be a finite number"),
    ({"temp": float("inf")}, "temp must be a finite number"),
    ({"top_p": 2}, "top_p must be in [0.0, 1.0]"),
    ({"min_p": -1}, "min_p must be in [0.0, 1.0]"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"max_tokens": "5"}, "max_tokens must be a number, got str '5'"),
    ({"max_tokens": 2.5}, "max_tokens must be an integer"),
    ({"tree_budget": -1}, "tree_budget must be in [0, 256]"),
    ({"draft_top_k": 0}, "draft_top_k must be in [1, 64]"),
    ({"lookup_depth": 10**9}, "lookup_depth must be in [0, 256]"),
    ({"min_draft_prob": float("nan")}, "min_draft_prob must be a finite number"),
    ({"stop": "x"}, "stop must be a list of strings"),
    ({"stop": [1]}, "stop must be a list of strings"),
]


@pytest.mark.parametrize("kwargs, message", API_CASES, ids=[repr(k) for k, _ in API_CASES])
def test_api(loaded, kwargs, message):
    model, tokenizer = loaded
    kwargs = {"prompt": "hello", "max_tokens": 4, **kwargs}
    with pytest.raises(SpecstreamError, match=None) as e:
        generate(model, tokenizer, kwargs.pop("prompt"), **kwargs)
    assert isinstance(e.value, ValueError) and message in str(e.value)


def test_top_k_beyond_the_draft_vocabulary(tmp_path):
    folder, _ = make_tiny_folder(tmp_path / "m", streams=StreamArgs(num_streams=2,
                                                                    msa_layers=2,
                                                                    draft_vocab_size=8))
    model, tokenizer = load(folder)
    with pytest.raises(SpecstreamError, match="exceeds the 8 tokens the streams draft from"):
        generate(model, tokenizer, "hello", max_tokens=4, draft_top_k=9)


# --- bench and train ----------------------------------------------------------------


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hello", "task": "chat"}) + "\n")
    return str(path)


def test_bench_checks_before_running(folder, prompts, tmp_path, capsys, monkeypatch):
    base = ["bench", "--model", folder, "--prompts", prompts, "--no-mlx-lm"]
    cases = [
        (["--rows", "a,b"], "--rows must be comma-separated integers"),
        (["--rows", "0"], "--rows: every count must be in [1, 256]"),
        (["--window", "0"], "window must be >= 1"),
        (["--limit", "0"], "limit must be >= 1"),
        (["--tree-budget", "-1"], "tree_budget must be in [0, 256]"),
        (["--json", str(tmp_path)], "is a folder"),
        (["--json", prompts + "/x.json"], "is a file, not a folder"),
    ]
    for flags, message in cases:
        assert message in run_cli(base + flags, capsys)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert "png needs matplotlib" in run_cli(base + ["--png", str(tmp_path / "c.png")], capsys)
    for bad, message in [(b"\xff\xfe\x00", "is not UTF-8 text"), (b"[1, 2]\n", "'prompt'")]:
        (tmp_path / "bad.jsonl").write_bytes(bad)
        line = run_cli(["bench", "--model", folder, "--prompts", str(tmp_path / "bad.jsonl"),
                        "--no-mlx-lm"], capsys)
        assert message in line


def test_train_flags(folder, prompts, tmp_path, capsys):
    base = ["train", "--model", folder, "--data", prompts, "--run-dir", str(tmp_path / "r")]
    for flags, message in [(["--lr", "nan"], "--lr must be a number > 0"),
                           (["--lr", "0"], "--lr must be a number > 0"),
                           (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
                           (["--epochs", "-1"], "--epochs must be a number > 0"),
                           (["--num-streams", "0"], "--num-streams must be an integer >= 1")]:
        assert message in run_cli(base + flags, capsys)


def test_train_never_overwrites_a_checkpoint(folder, prompts, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "state.json").write_text('{"step": 7}')
    line = run_cli(["train", "--model", folder, "--data", prompts, "--run-dir", str(run_dir)],
                   capsys)
    assert "--resume" in line and "nothing was overwritten" in line
    assert (run_dir / "checkpoint" / "state.json").read_text() == '{"step": 7}'


def test_records_of_the_wrong_shape_are_no_examples(folder, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("[1, 2]\n" + json.dumps({"messages": "hi"}) + "\n"
                    + json.dumps({"messages": [{"role": "assistant", "content": 5}]}) + "\n"
                    + json.dumps({"prompt": "a", "completion": ["b"]}) + "\n")
    line = run_cli(["train", "--model", folder, "--data", str(data), "--run-dir",
                    str(tmp_path / "r")], capsys)
    assert "no usable examples among 4 records" in line


def test_chat_skips_a_line_that_is_not_utf8(loaded, capsys):
    from specstream_mlx.cli.chat import chat_loop

    model, tokenizer = loaded
    lines = iter(["caf\udce9", "/quit"])
    chat_loop(model, tokenizer, {"max_tokens": 3}, read=lambda prompt="": next(lines))
    assert "error: prompt is not valid UTF-8 text" in capsys.readouterr().err


def test_a_base_model_without_chat_template_gets_plain_text():
    """Training data and chat on a base model: the turns' plain text, as generate does."""
    from specstream_mlx.generate import encode_messages

    class Plain:
        chat_template = None

        def encode(self, text):
            return [ord(c) for c in text]

    ids = encode_messages(Plain(), [{"role": "user", "content": "ab"},
                                    {"role": "assistant", "content": "c"}])
    assert ids == [ord(c) for c in "ab\n\nc"]


TOOL_CASES = [
    (["tune", "--budgets", "-1"], "tree_budget grid value must be in [0, 256], got -1"),
    (["tune", "--min-draft-probs", "2"], "min_draft_prob grid value must be in [0.0, 1.0]"),
    (["tune", "--max-tokens", "0"], "max_tokens must be >= 1"),
    (["tune", "--draft-top-k", "0"], "draft_top_k must be in [1, 64]"),
    (["tune", "--rows", "0"], "rows must be row counts in [1, 256]"),
    (["tune", "--limit", "-1"], "limit must be >= 1"),
    (["tune", "--json", "/"], "is a folder"),
]


@pytest.mark.parametrize("argv, message", TOOL_CASES, ids=[" ".join(a) for a, _ in TOOL_CASES])
def test_tune_flags(folder, prompts, capsys, argv, message):
    line = run_cli([argv[0], "--model", folder, "--prompts", prompts, *argv[1:]], capsys)
    assert message in line


@pytest.mark.parametrize("flags, message", [
    (["--chat", "-1"], "--chat must be >= 0"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--exclude", "nowhere/train.jsonl"], "data file not found: nowhere/train.jsonl"),
    (["--temp", "-1"], "--temp must be >= 0"),
    (["--temp", "nan"], "--temp must be a finite number"),
    (["--prompts", "NO_PROMPT"], "every record needs a 'prompt' text"),
    (["--prompts", "EMPTY"], "holds no records"),
    (["--record-seeds", "--temp", "0.7"], "--record-seeds samples a --prompts file's"),
    (["--record-seeds", "--prompts", "NO_PROMPT"], "give --prompts and --temp > 0"),
])
def test_data_flags(folder, tmp_path, capsys, flags, message):
    (tmp_path / "no_prompt.jsonl").write_text('{"id": "a", "completion": "no prompt"}\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    files = {"NO_PROMPT": str(tmp_path / "no_prompt.jsonl"),
             "EMPTY": str(tmp_path / "empty.jsonl")}
    flags = [files.get(f, f) for f in flags]
    line = run_cli(["data", "--model", folder, "--out", str(tmp_path / "d"), *flags], capsys)
    assert message in line
    assert not (tmp_path / "d").exists()  # checked before anything is written


def test_data_out_is_a_file(folder, prompts, capsys):
    assert "is a file; give a folder" in run_cli(["data", "--model", folder, "--out",
                                                  prompts], capsys)


def test_peft_config_that_is_not_an_object(folder, tmp_path, capsys):
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[1, 2]")
    line = run_cli(["convert", "--hf-path", folder, "--mlx-path", str(tmp_path / "out"),
                    "--adapter-path", str(adapter)], capsys)
    assert "must hold a JSON object, not a list" in line
    assert not (tmp_path / "out").exists()
