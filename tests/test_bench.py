"""The benchmark on tiny model folders: per-prompt rows (speculative output identical to
plain and to mlx-lm's), per-task aggregates, the pass-cost table and bandwidth floor, the
JSON report, the aggregate arithmetic on hand-made rows, bad input, the chart and the
`specstream bench` command."""

from __future__ import annotations

import importlib.util
import json
import sys

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from tiny_folder import make_tiny_folder, save_model

from specstream_mlx import load
from specstream_mlx.cli import main
from specstream_mlx.decoding import pass_curve
from specstream_mlx.decoding.step import generate_step
from specstream_mlx.errors import InputError
from specstream_mlx.generate import encode_messages, encode_turns
from specstream_mlx.jsonl import prompt_id, read_prompts, user_turns, write_jsonl
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.tools.bench import (
    BenchArgs,
    bench,
    compare,
    compare_row,
    draw_chart,
    format_report,
    paired_row,
    summarize,
    window_speedups,
)

STREAMS = StreamArgs(num_streams=3, msa_layers=2)
PROMPTS = [{"id": "greet", "task": "chat", "prompt": "hi"},
           {"id": "func", "task": "code", "prompt": "def f(x):"},
           {"task": "chat", "prompt": "Hello there, how are you?"}]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_jsonl(root / "prompts.jsonl", PROMPTS)
    return root


@pytest.fixture(scope="module")
def folder(root):
    return make_tiny_folder(root / "tiny", streams=STREAMS)[0]


@pytest.fixture(scope="module")
def report(root, folder):
    logs: list[str] = []
    args = BenchArgs(prompts=str(root / "prompts.jsonl"), model=str(folder), max_tokens=12,
                     rows=[1, 2, 4], window=4, json_path=str(root / "out" / "report.json"))
    return bench(args, log=logs.append), logs


def check_hist(row: dict) -> None:
    """Every pass after the prefill is in the histogram; each emits its accepted drafted
    tokens plus one."""
    hist = {int(k): v for k, v in row["accepted_hist"].items()}
    assert sum(hist.values()) == row["passes"] - 1
    assert row["tokens"] == row["passes"] + sum(k * v for k, v in hist.items())


def test_per_prompt_rows(report):
    rows = report[0]["per_prompt"]
    assert [r["id"] for r in rows] == ["greet", "func", "2"]  # missing id: the index
    assert [r["task"] for r in rows] == ["chat", "code", "chat"]
    for r in rows:
        assert r["identical"] is True and r["mlx_lm_identical"] is True
        assert 1 <= r["tokens"] <= 12
        assert r["tokens_per_pass"] >= 1
        assert r["tokens_per_pass"] == round(r["tokens"] / r["passes"], 3)
        assert r["spec_tps"] > 0 and r["plain_tps"] > 0 and r["mlx_lm_tps"] > 0
        assert r["speedup"] == pytest.approx(r["spec_tps"] / r["plain_tps"], rel=1e-2)
        check_hist(r)


def test_aggregates_and_machine_fields(report, folder):
    report = report[0]
    rows = report["per_prompt"]
    assert sorted(report["per_task"]) == ["chat", "code"]
    assert report["per_task"]["chat"] == summarize([rows[0], rows[2]])
    assert report["per_task"]["code"] == summarize([rows[1]])
    assert report["per_task"]["chat"]["prompts"] == 2
    assert report["all"] == summarize(rows)
    assert report["all"]["identical"] is True
    assert report["all"]["tokens"] == sum(r["tokens"] for r in rows)
    assert "mlx_lm_tps" in report["all"] and "speedup_vs_mlx_lm" in report["all"]
    assert report["model"] == str(folder)
    assert report["mlx_lm_precision"] == "float32"
    assert list(report["pass_cost_ms"]) == ["1", "2", "4"]
    assert all(v > 0 for v in report["pass_cost_ms"].values())
    assert list(report["pass_curve_ms"]) == [str(r) for r in pass_curve.ROWS]  # the loader's
    bw = report["bandwidth"]
    model, _ = load(folder)
    assert bw["weight_bytes"] == sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert bw["copy_GBps"] > 0 and bw["floor_ms"] >= 0
    assert report["settings"]["max_tokens"] == 12 and report["settings"]["rows"] == [1, 2, 4]


def test_json_report_and_log(root, report):
    report, logs = report
    path = root / "out" / "report.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(report))
    # Rows read back from JSON (string histogram keys) aggregate the same.
    assert summarize(on_disk["per_prompt"]) == report["all"]
    assert logs[-1] == f"wrote {path}"
    assert format_report(report) in logs
    assert sum(line.startswith(("greet", "func", "2 ")) for line in logs) == 3


def test_format_report_lines(report):
    text = format_report(report[0])
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["task", "prompts", "tok/pass"]
    assert [line.split()[0] for line in lines[2:5]] == ["chat", "code", "all"]
    assert "pass cost by rows (ms, ratio to 1 row): 1:" in text and "4:" in text
    assert "accepted drafted tokens per pass" in text
    assert "controller's pass-cost curve (first load, plain, ms): 1:" in text
    assert "pass-cost curve (first load, plain, ms): none" in format_report(
        {**report[0], "pass_curve_ms": {}})


def test_drafts_accepted_are_counted(tmp_path):
    """A model whose every logit is zero always says token 0, and its streams draft it:
    passes then emit several tokens, and the histogram adds up."""
    folder, model = make_tiny_folder(tmp_path / "flat", seed=3, streams=STREAMS)
    model.model.norm.weight = mx.zeros_like(model.model.norm.weight)
    save_model(model, folder, json.loads((folder / "config.json").read_text()))
    write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    report = bench(BenchArgs(prompts=str(tmp_path / "p.jsonl"), model=str(folder),
                             max_tokens=16, rows=[1], mlx_lm=False,
                             adaptive=False), log=lambda _: None)
    for r in report["per_prompt"]:
        assert r["identical"] and r["tokens"] == 16
        assert r["tokens_per_pass"] > 1
        check_hist(r)
    assert report["all"]["tokens_per_pass"] > 1
    assert "mlx_lm_tps" not in report["all"]


# --- aggregate arithmetic -------------------------------------------------------------


def test_summarize_hand_made_rows():
    rows = [
        {"tokens": 10, "passes": 5, "spec_tps": 20.0, "plain_tps": 10.0, "identical": True,
         "accepted_hist": {0: 1, 1: 2, 2: 1}},
        {"tokens": 30, "passes": 20, "spec_tps": 30.0, "plain_tps": 15.0, "identical": False,
         "accepted_hist": {"1": 4, "3": 1}},
    ]
    s = summarize(rows)
    assert s["prompts"] == 2 and s["tokens"] == 40
    assert s["tokens_per_pass"] == 1.6  # 40 tokens / 25 passes, not the mean of 2.0 and 1.5
    # Time-weighted over the tokens after each run's first (the rate was measured on
    # those): 9 + 29 tokens in 9/20 + 29/30 s, not the mean of 20 and 30.
    assert s["spec_tps"] == round(38 / (9 / 20 + 29 / 30), 2) == 26.82
    assert s["plain_tps"] == round(38 / (9 / 10 + 29 / 15), 2) == 13.41
    assert s["speedup"] == round(26.82 / 13.41, 3)
    assert s["step_cost_ratio"] == round(1.6 / s["speedup"], 3)
    assert s["min_speedup"] is None  # no per-prompt speed-ups in these rows
    rows[0].update(id="a", speedup=2.0)
    rows[1].update(id="b", speedup=1.5)
    assert (summarize(rows)["min_speedup"], summarize(rows)["worst_prompt"]) == (1.5, "b")
    assert s["identical"] is False
    assert s["accepted_hist"] == {0: 1, 1: 6, 2: 1, 3: 1}
    assert list(s["accepted_hist"]) == [0, 1, 2, 3]
    assert "mlx_lm_tps" not in s  # only when every row has it
    rows[0]["mlx_lm_tps"] = 25.0
    assert "mlx_lm_tps" not in summarize(rows)
    rows[1]["mlx_lm_tps"] = 50.0
    s = summarize(rows)
    assert s["mlx_lm_tps"] == round(38 / (9 / 25 + 29 / 50), 2)  # 38 tokens in 0.94 s
    assert s["speedup_vs_mlx_lm"] == round(26.82 / s["mlx_lm_tps"], 3)


# --- bad input ------------------------------------------------------------------------


def test_model_without_streams(root, tmp_path):
    folder, _ = make_tiny_folder(tmp_path / "plain")
    with pytest.warns(UserWarning), pytest.raises(InputError, match="has no streams"):
        bench(BenchArgs(prompts=str(root / "prompts.jsonl"), model=str(folder),
                        mlx_lm=False), log=lambda _: None)


@pytest.mark.parametrize("records", [[{"text": "no prompt"}], [PROMPTS[0], {"task": "chat"}],
                                     []])
def test_prompts_without_prompt_field(folder, tmp_path, records):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, records)
    with pytest.raises(InputError, match="need records with a 'prompt' field"):
        bench(BenchArgs(prompts=str(path), model=str(folder), mlx_lm=False),
              log=lambda _: None)


def test_read_prompts_takes_turns(tmp_path):
    """A record has a 'prompt' or 'turns' (the user's messages); reports name a
    conversation by its id and the turn measured."""
    records = [PROMPTS[0], {"id": "conv", "task": "chat", "turns": ["hi", "and then?"]},
               {"turns": ["just one"]}]
    write_jsonl(tmp_path / "p.jsonl", records)
    assert read_prompts(tmp_path / "p.jsonl") == records
    assert [user_turns(r) for r in records] == [["hi"], ["hi", "and then?"], ["just one"]]
    assert [prompt_id(r, i) for i, r in enumerate(records)] == ["greet", "conv#turn2", "2"]
    with pytest.raises(InputError, match=r"record 2 is multi-turn \('turns'\)"):
        read_prompts(tmp_path / "p.jsonl", turns=False)  # a caller of single prompts


@pytest.mark.parametrize("record, message", [
    ({"turns": "hi"}, "'turns' must be a non-empty list of non-empty texts"),
    ({"turns": []}, "'turns' must be a non-empty list"),
    ({"turns": ["hi", ""]}, "'turns' must be a non-empty list of non-empty texts"),
    ({"turns": ["hi", 3]}, "'turns' must be a non-empty list of non-empty texts"),
    ({"turns": None}, "'turns' must be a non-empty list"),
    ({"prompt": "hi", "turns": ["hi"]}, "record 2 has both 'prompt' and 'turns'"),
    ({"prompt": ["hi"]}, r"need records with a 'prompt' field or 'turns' \(record 2 is"),
    ("hi", r"need records with a 'prompt' field or 'turns' \(record 2 is not one\)"),
])
def test_read_prompts_refuses_bad_turns(tmp_path, record, message):
    write_jsonl(tmp_path / "p.jsonl", [PROMPTS[0], record])
    with pytest.raises(InputError, match=message):
        read_prompts(tmp_path / "p.jsonl")


def test_bench_measures_the_last_turn(folder, tmp_path, monkeypatch):
    """A 2-turn record is measured at its second turn, after the model's own plain greedy
    answer to the first: every run (speculative and plain) gets the same ids, and the
    outputs are identical."""
    import specstream_mlx.tools.bench as bench_module

    seen: list[tuple[list[int], bool]] = []
    real = bench_module.timed_run

    def spy(model, tokenizer, ids, args, speculative, seed=0):
        seen.append((list(ids), speculative))
        return real(model, tokenizer, ids, args, speculative, seed)

    monkeypatch.setattr(bench_module, "timed_run", spy)
    t1, t2 = "Tell me a story.", "Shorter, please."
    write_jsonl(tmp_path / "p.jsonl", [{"id": "conv", "task": "chat", "turns": [t1, t2]},
                                       PROMPTS[0]])
    logs: list[str] = []
    report = bench(BenchArgs(prompts=str(tmp_path / "p.jsonl"), model=str(folder),
                             max_tokens=8, rows=[1], mlx_lm=False, repeats=2), log=logs.append)
    rows = report["per_prompt"]
    assert [r["id"] for r in rows] == ["conv#turn2", "greet"]
    assert all(r["identical"] for r in rows)
    assert any(line.startswith("conv#turn2 ") for line in logs)
    # The ids of turn 2: the first turn's prompt, the model's greedy answer to it (cut
    # at the end token), the end of that turn, then the second turn's prompt.
    model, tokenizer = load(folder)
    first = encode_messages(tokenizer, [{"role": "user", "content": t1}])
    answer = []
    for e in generate_step(model, first, max_tokens=8, speculative=False):
        if e.token in tokenizer.eos_token_ids:
            break
        answer.append(e.token)
    assert answer  # the test needs an answer in the history to see it
    second = encode_messages(tokenizer, [{"role": "user", "content": t2}])
    expected = first + answer + list(tokenizer.encode("<|im_end|>\n")) + second
    assert encode_turns(model, tokenizer, [t1, t2], 8) == expected
    # Warm-up on record 0, then 2 pairs of it: speculative and plain alike.
    runs = [(ids, s) for ids, s in seen if ids[: len(first)] == first]
    assert len(runs) == 6 and {s for _, s in runs} == {True, False}
    assert all(ids == expected for ids, _ in runs)


def test_missing_prompts_file(folder, tmp_path):
    with pytest.raises(InputError, match="not found"):
        bench(BenchArgs(prompts=str(tmp_path / "none.jsonl"), model=str(folder)))


def test_one_token_generations(root, folder):
    report = bench(BenchArgs(prompts=str(root / "prompts.jsonl"), model=str(folder),
                             max_tokens=1, rows=[1], mlx_lm=False), log=lambda _: None)
    assert all(r["tokens"] == 1 for r in report["per_prompt"])


# --- chart and command line -----------------------------------------------------------


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_draw_chart(report, tmp_path):
    path = tmp_path / "chart.png"
    draw_chart(report[0], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_chart_without_matplotlib(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if absent
    with pytest.raises(InputError, match="pip install matplotlib"):
        draw_chart(report[0], str(tmp_path / "chart.png"))


def test_cli_bench(root, folder, capsys):
    code = main(["bench", "--prompts", str(root / "prompts.jsonl"), "--model", str(folder),
                 "--no-mlx-lm", "--max-tokens", "8", "--rows", "1,2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "tok/pass" in out and "spec tok/s" in out and "identical" in out
    table = [line.split() for line in out.splitlines()]
    assert [t[0] for t in table if t and t[0] in ("chat", "code", "all")] == [
        "chat", "code", "all"]
    assert "pass cost by rows (ms, ratio to 1 row): 1:" in out and ", 2:" in out
    assert "DIFFERENT" not in out


def test_cli_bench_bad_prompts(folder, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"question": "?"}])
    code = main(["bench", "--prompts", str(path), "--model", str(folder), "--no-mlx-lm"])
    assert code == 2
    assert "error:" in capsys.readouterr().err


def test_window_speedups_compare_the_same_tokens():
    spec = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # one token a second after the first
    plain = [0.0, 2.0, 4.0, 6.0, 7.0, 8.0]  # two seconds, then one
    assert window_speedups(spec, plain, 2) == [2.0, 1.5]  # tokens 1-2 and 3-4 after the first
    assert window_speedups(spec, plain, 10) == []  # no whole window


def test_report_has_window_speedups(report):
    rows = report[0]["per_prompt"]
    for r in rows:
        assert len(r["window_speedups"]) == (r["tokens"] - 1) // 4
        assert all(w > 0 for w in r["window_speedups"])
    windows = [w for r in rows for w in r["window_speedups"]]
    assert report[0]["all"]["min_window_speedup"] == (min(windows) if windows else None)


def test_conversation_ttft_reuses_the_previous_turns(root, folder):
    logs: list[str] = []
    args = BenchArgs(prompts=str(root / "prompts.jsonl"), model=str(folder), max_tokens=6,
                     rows=[1], mlx_lm=False, conversation=4)
    turns = bench(args, log=logs.append)["conversation"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    assert turns[0]["reused_tokens"] == 0
    for prev, t in zip(turns, turns[1:], strict=False):
        # everything before this turn's new message is reused (up to the last answer token)
        assert prev["prompt_tokens"] <= t["reused_tokens"] < t["prompt_tokens"]
    assert all(t["identical"] for t in turns)
    assert all(t["ttft_reused_ms"] > 0 and t["ttft_fresh_ms"] > 0 for t in turns)
    assert any("first token after" in line for line in logs)


def run(tokens, tps, stamps):
    return {"tokens": tokens, "n": len(tokens), "passes": 2, "stamps": stamps, "tps": tps,
            "accepted_hist": {0: 1}}


def test_paired_row_takes_medians_of_paired_ratios():
    toks = [1, 2, 3]
    pairs = [(run(toks, 10.0, [0, 1, 2]), run(toks, 5.0, [0, 2, 4])),   # x2.0, windows x2
             (run(toks, 12.0, [0, 1, 3]), run(toks, 12.0, [0, 1, 3])),  # x1.0, windows x1
             (run(toks, 9.0, [0, 1, 2]), run(toks, 6.0, [0, 3, 6]))]    # x1.5, windows x3
    row = paired_row({"id": "p", "task": "chat"}, 0, pairs, window=1)
    assert row["speedups"] == [2.0, 1.0, 1.5]
    assert row["speedup"] == 1.5  # the median pair, not the ratio of median tokens/s
    assert row["spec_tps"] == 10.0 and row["plain_tps"] == 6.0
    assert row["window_speedups"] == [2.0, 2.0]
    assert row["identical"]
    pairs[1] = (pairs[1][0], run([1, 2, 4], 12.0, [0, 1, 3]))
    assert not paired_row({"id": "p"}, 0, pairs, window=1)["identical"]
    one = paired_row({}, 7, pairs[:1], window=1)
    assert one["id"] == "7" and one["speedup"] == 2.0 and "speedups" not in one


def test_cli_bench_repeats(root, folder, capsys):
    code = main(["bench", "--prompts", str(root / "prompts.jsonl"), "--model", str(folder),
                 "--no-mlx-lm", "--max-tokens", "6", "--rows", "1", "--limit", "2",
                 "--repeats", "2", "--json", str(root / "rep.json")])
    assert code == 0
    assert capsys.readouterr().out.count(" pairs x") == 2
    rows = json.loads((root / "rep.json").read_text())["per_prompt"]
    assert all(len(r["speedups"]) == 2 and r["identical"] for r in rows)
    assert main(["bench", "--prompts", str(root / "prompts.jsonl"), "--model", str(folder),
                 "--no-mlx-lm", "--repeats", "0"]) == 2
    assert "repeats" in capsys.readouterr().err


def test_compare_two_stream_folders(root, folder, tmp_path, capsys):
    """`bench --compare`: plain, A and B per prompt and round, the same tokens in every
    arm; per-task and overall summaries; a folder without streams or of another base
    model is refused."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    code = main(["bench", "--prompts", str(root / "prompts.jsonl"), "--model", str(folder),
                 "--compare", str(other), "--max-tokens", "6", "--repeats", "2",
                 "--json", str(tmp_path / "ab.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count(" tok  A x") == 3 and "DIFFERENT" not in out
    report = json.loads((tmp_path / "ab.json").read_text())
    assert set(report["per_task"]) == {"chat", "code"} and report["all"]["prompts"] == 3
    assert report["all"]["identical"] and report["all"]["A_speedup"] > 0
    for r in report["per_prompt"]:
        assert r["A_tokens_per_pass"] >= 1.0 and r["B_tokens_per_pass"] >= 1.0
    plain = make_tiny_folder(tmp_path / "plain")[0]
    with pytest.raises(InputError, match="no streams"):
        compare(BenchArgs(prompts=str(root / "prompts.jsonl"), model=str(folder)), str(plain))
    qwen = make_tiny_folder(tmp_path / "qwen", name="qwen2", streams=STREAMS)[0]
    with pytest.raises(InputError, match="same base model"):
        compare(BenchArgs(prompts=str(root / "prompts.jsonl"), model=str(folder)), str(qwen))


def test_compare_row_takes_medians_of_same_round_ratios():
    toks = [1, 2, 3]
    runs = {"plain": [run(toks, 10.0, [0, 1, 2]), run(toks, 5.0, [0, 2, 4])],
            "A": [run(toks, 20.0, [0, 1, 2]), run(toks, 5.0, [0, 1, 2])],    # x2.0, x1.0
            "B": [run(toks, 30.0, [0, 1, 2]), run(toks, 10.0, [0, 1, 2])]}   # x3.0, x2.0
    row = compare_row({"id": "p", "task": "code"}, 0, runs)
    assert row["A_speedup"] == 1.5 and row["B_speedup"] == 2.5
    assert row["plain_seconds"] == pytest.approx((2 / 10 + 2 / 5) / 2)
    assert row["A_tokens_per_pass"] == 1.5 and row["identical"]
    runs["B"][1] = run([1, 2, 4], 10.0, [0, 1, 2])
    assert not compare_row({}, 3, runs)["identical"]
