"""Training and benchmark data: JSONL reading and writing, chat-formatted examples with the
loss on the completion, the hash split, the real prompt sources (installed packages),
batched greedy generation against plain decoding, and self-distillation."""

from __future__ import annotations

import ast
import json

import mlx.core as mx
import pytest
from conftest import tiny_model
from tiny_folder import CHARS, EOS_ID, make_tiny_folder

import specstream_mlx.training.data as data_module
from specstream_mlx import load
from specstream_mlx.cli import main as cli_main
from specstream_mlx.decoding.sampling import PositionSampler, sample_rows
from specstream_mlx.decoding.step import generate_step
from specstream_mlx.errors import InputError
from specstream_mlx.generate import encode_messages
from specstream_mlx.jsonl import read_prompts
from specstream_mlx.models.config import StreamArgs
from specstream_mlx.training.data import (
    PYDOCS_KINDS,
    Example,
    batch_generate,
    build_prompt_sets,
    chitchat_prompts,
    chitchat_turns_prompts,
    corpus_documents,
    distill,
    encode_record,
    evals_prompts,
    held_out,
    humaneval_prompts,
    library_prompts,
    load_examples,
    pydocs_prompts,
    pydocs_texts,
    read_jsonl,
    record_examples,
    record_texts,
    split_record,
    stdlib_prompts,
    write_jsonl,
)

IM_START, IM_END = 1, 2  # the tiny tokenizer's special ids (IM_END is also eos)


def char_ids(text: str) -> list[int]:
    """Ids of plain text in the tiny byte-level tokenizer, computed without it."""
    table = {" ": "Ġ", "\n": "Ċ"}
    return [3 + CHARS.index(table.get(c, c)) for c in text]


def turn(role: str, content: str) -> list[int]:
    """<|im_start|>role\\ncontent<|im_end|>\\n, as the tiny chat template writes it."""
    return [IM_START] + char_ids(f"{role}\n{content}") + [IM_END] + char_ids("\n")


GEN_PROMPT = [IM_START] + char_ids("assistant\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("data") / "tiny")[0]


@pytest.fixture(scope="module")
def tokenizer(folder):
    with pytest.warns(UserWarning, match="no speculative streams"):
        return load(folder)[1]


# --- JSONL ----------------------------------------------------------------------------


def test_read_jsonl_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match="not found") as e:
        read_jsonl(path)
    assert str(path) in str(e.value)


def test_read_jsonl_names_file_and_line_of_bad_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2\n')
    with pytest.raises(InputError, match="not valid JSON") as e:
        read_jsonl(path)
    assert f"{path}:3" in str(e.value)


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"a": 1}\n   \n\n{"b": [2, 3]}\n\n')
    assert read_jsonl(path) == [{"a": 1}, {"b": [2, 3]}]


def test_read_jsonl_reads_gzip_by_its_suffix(tmp_path):
    import gzip

    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress('{"a": "é"}\n\n{"b": 2}\n'.encode()))
    assert read_jsonl(tmp_path / "d.jsonl.gz") == [{"a": "é"}, {"b": 2}]
    (tmp_path / "bad.jsonl.gz").write_text('{"a": 1}\n')  # not compressed
    with pytest.raises(InputError, match="cannot read .*bad.jsonl.gz"):
        read_jsonl(tmp_path / "bad.jsonl.gz")


def test_write_read_round_trip(tmp_path):
    records = [{"prompt": "héllo ☃", "completion": "a\nb", "task": "chat"},
               {"messages": [{"role": "user", "content": "x"}]}, {}]
    path = tmp_path / "sub" / "dir" / "out.jsonl"
    assert write_jsonl(path, records) == 3
    assert read_jsonl(path) == records
    assert len(path.read_text().splitlines()) == 3


# --- records and examples -------------------------------------------------------------


def test_split_record_shapes():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert split_record({"messages": msgs}) == (msgs[:1], "a")
    assert split_record({"prompt": "q", "completion": "a"}) == (
        [{"role": "user", "content": "q"}], "a")


@pytest.mark.parametrize("record", [
    {"messages": []},
    {"messages": [{"role": "user", "content": "q"}]},  # no assistant turn last
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                  {"role": "user", "content": "again"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    {"prompt": "q", "completion": ""},
    {"prompt": "q"},
    {"completion": "a"},
    {"prompt": ["not", "text"], "completion": "a"},
    {"text": "something else"},
])
def test_unusable_records(tokenizer, record):
    assert split_record(record) is None
    assert encode_record(tokenizer, record, 512) is None


def test_encode_prompt_completion_record(tokenizer):
    ex = encode_record(tokenizer, {"prompt": "hi", "completion": "ab c", "task": "chat"}, 512)
    prompt = turn("user", "hi") + GEN_PROMPT
    assert ex == Example(prompt + char_ids("ab c") + [EOS_ID], len(prompt))
    assert ex.completion_tokens == 5
    assert encode_messages(tokenizer, [{"role": "user", "content": "hi"}]) == prompt


def test_encode_messages_record_trains_on_last_assistant_turn(tokenizer):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "last one"}]
    ex = encode_record(tokenizer, {"messages": msgs}, 512)
    prompt = (turn("system", "be brief") + turn("user", "q1") + turn("assistant", "a1")
              + turn("user", "q2") + GEN_PROMPT)
    assert ex.completion_start == len(prompt)
    assert ex.tokens == prompt + char_ids("last one") + [EOS_ID]
    assert tokenizer.decode(ex.tokens[ex.completion_start:]) == "last one<|im_end|>"


def test_encode_truncates_to_max_length(tokenizer):
    record = {"prompt": "hi", "completion": "abcdef"}
    n = len(turn("user", "hi") + GEN_PROMPT)
    ex = encode_record(tokenizer, record, n + 3)
    assert ex.tokens == turn("user", "hi") + GEN_PROMPT + char_ids("abc")  # eos cut off
    assert ex.completion_start == n
    assert encode_record(tokenizer, record, n + 2).completion_tokens == 2
    assert encode_record(tokenizer, record, n + 1) is None  # one token: nothing to learn
    assert encode_record(tokenizer, record, n - 1) is None  # the prompt does not fit
    full = encode_record(tokenizer, record, 10_000)
    assert full.tokens[-1] == EOS_ID and full.completion_tokens == 7


def test_load_examples_keeps_usable_records(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": "a", "completion": "bb"}, {"prompt": "x"},
                       {"messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "r"}]}])
    examples = load_examples(path, tokenizer, 512)
    assert [e.tokens[e.completion_start:] for e in examples] == [
        char_ids("bb") + [EOS_ID], char_ids("r") + [EOS_ID]]


def test_load_examples_none_usable(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": "x"}, {"messages": []},
                       {"prompt": "a long prompt " * 20, "completion": "b"}])
    with pytest.raises(InputError, match="no usable examples among 3 records") as e:
        load_examples(path, tokenizer, max_length=32)
    assert str(path) in str(e.value) and "'prompt' and 'completion'" in str(e.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="among 0 records"):
        load_examples(empty, tokenizer)


# --- the hash split -------------------------------------------------------------------


def test_held_out_is_deterministic_and_near_the_fraction():
    keys = [f"key/{i}" for i in range(4000)]
    first = [held_out(k, 0.2) for k in keys]
    assert first == [held_out(k, 0.2) for k in keys]
    assert 0.17 < sum(first) / len(keys) < 0.23
    assert not any(held_out(k, 0.0) for k in keys)
    assert all(held_out(k, 1.0) for k in keys)
    # Monotone in the fraction: a key held out at 10% is held out at 30%.
    assert all(held_out(k, 0.3) for k in keys if held_out(k, 0.1))


# --- real prompt sources (installed packages) ---------------------------------------


def test_humaneval_prompts():
    prompts = humaneval_prompts()
    assert len(prompts) == 164
    assert len({p["id"] for p in prompts}) == 164
    assert prompts[0]["id"] == "HumanEval/0"
    for p in prompts:
        assert p["task"] == "code" and "def " in p["prompt"]
        assert p["prompt"].startswith("Complete the following Python function.")


def test_chitchat_prompts():
    prompts = chitchat_prompts()
    assert len(prompts) > 1000
    assert len({p["id"] for p in prompts}) == len(prompts)
    for p in prompts:
        assert p["task"] == "chat" and p["id"].startswith("chitchat/")
        assert 8 <= len(p["prompt"]) <= 400 and p["prompt"] == p["prompt"].strip()


def test_stdlib_prompts():
    prompts = stdlib_prompts(limit=300)
    assert len(prompts) == 300
    assert len({p["id"] for p in prompts}) == 300
    for p in prompts:
        assert p["task"] == "code" and p["id"].startswith("stdlib/")
        assert p["prompt"].endswith("```")
        code = p["prompt"].split("```python\n", 1)[1].removesuffix("```")
        (func,) = ast.parse(code).body  # signature + docstring: a complete function
        assert isinstance(func, ast.FunctionDef) and func.name == p["id"].rsplit(".", 1)[1]
        assert ast.get_docstring(func)


@pytest.mark.parametrize("name", ["numpy", "sympy", "networkx"])
def test_library_prompts(name):
    """Documented public functions of an installed library, its tests left out, each a
    complete function (signature + docstring) in the HumanEval instruction."""
    prompts = library_prompts(name)
    assert len(prompts) > 300
    assert len({p["id"] for p in prompts}) == len(prompts)
    for p in prompts:
        assert p["task"] == "code" and p["id"].startswith(f"{name}/{name}.")
        assert ".tests." not in p["id"] and "._" not in p["id"].rsplit(".", 1)[1][:2]
        code = p["prompt"].split("```python\n", 1)[1].removesuffix("```")
        (func,) = ast.parse(code).body
        assert isinstance(func, ast.FunctionDef) and func.name == p["id"].rsplit(".", 1)[1]
        assert ast.get_docstring(func) and not func.name.startswith("_")


def fake_evals(root, monkeypatch):
    """An `evals` package folder with a registry of three evals, one excluded."""
    data = root / "evals" / "registry" / "data"
    rows = {
        "arith": [{"input": [{"role": "system", "content": "Answer with a number."},
                             {"role": "user", "content": "What is 12 times 12, exactly?"}]},
                  {"input": "A plain string prompt that is long enough."},
                  {"input": [{"role": "user", "content": "short"}]},  # < 15 characters
                  {"input": "What is 12 times 12, exactly? Again, please."},
                  {"input": "Ceci n'est pas une pipe, \u00e9\u00e8\u00ea\u00eb\u00e0\u00e2"
                            "\u00e4\u00ee\u00ef\u00f4\u00f6\u00f9\u00fb\u00fc"},
                  {"input": "A plain string prompt that is long enough."}],  # repeated
        "ballots": [{"input": "An excluded eval's prompt, long enough."}],
        "many": [{"input": f"Question number {i} of a long eval?"} for i in range(10)],
    }
    for name, records in rows.items():
        (data / name).mkdir(parents=True)
        lines = [json.dumps(r) for r in records] + ["not json"]
        (data / name / "samples.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(data_module, "package_dir",
                        lambda name: root / name if name == "evals" else None)


def test_evals_prompts_parse_filter_and_cap(tmp_path, monkeypatch):
    fake_evals(tmp_path, monkeypatch)
    prompts = evals_prompts(per_eval=4)
    texts = [p["prompt"] for p in prompts]
    assert texts[:3] == ["Answer with a number.\n\nWhat is 12 times 12, exactly?",
                         "A plain string prompt that is long enough.",
                         "What is 12 times 12, exactly? Again, please."]
    assert texts[3:] == [f"Question number {i} of a long eval?" for i in range(4)]
    assert all(p["task"] == "chat" and p["id"].startswith("evals/") for p in prompts)
    assert len({p["id"] for p in prompts}) == len(prompts)


def test_extra_sources_hold_out_their_own_and_keep_the_default_sets():
    base = build_prompt_sets(chat=20, code=30, heldout=4, seed=0)
    sets = build_prompt_sets(chat=20, code=30, heldout=4, seed=0,
                             sources=["chitchat", "humaneval", "stdlib", "networkx"])
    assert sets["heldout"][:8] == base["heldout"]  # the default held-out split is kept
    extra = sets["heldout"][8:]
    assert len(extra) == 4 and all(p["id"].startswith("networkx/") for p in extra)
    train = sets["train"]
    assert len(train) == 50 and sum(p["task"] == "code" for p in train) == 30
    assert any(p["id"].startswith("networkx/") for p in train)
    assert not {p["id"] for p in train} & {p["id"] for p in sets["heldout"]}
    assert build_prompt_sets(chat=20, code=30, heldout=4, seed=0,
                             sources=["chitchat", "humaneval", "stdlib", "networkx"]) == sets


def test_exclude_leaves_out_an_earlier_stage_and_counts_new_prompts():
    base = build_prompt_sets(chat=20, code=30, heldout=4, seed=0)
    earlier = base["train"]
    # An earlier stage's records, matched by id (or, without one, by prompt text).
    exclude = [p["id"] for p in earlier[:25]] + [p["prompt"] for p in earlier[25:]]
    sets = build_prompt_sets(chat=20, code=30, heldout=4, seed=0, exclude=exclude)
    assert sets["heldout"] == base["heldout"]
    train = sets["train"]
    assert len(train) == 50 and sum(p["task"] == "code" for p in train) == 30
    assert not {p["id"] for p in train} & {p["id"] for p in earlier}
    assert not {p["id"] for p in train} & {p["id"] for p in sets["heldout"]}


def test_data_cli_exclude_writes_only_new_prompts(folder, tmp_path):
    common = ["data", "--model", str(folder), "--chat", "2", "--code", "2", "--valid", "2",
              "--heldout", "2", "--max-tokens", "2", "--batch-size", "4"]
    with pytest.warns(UserWarning):
        assert cli_main([*common, "--out", str(tmp_path / "a")]) == 0
        first = tmp_path / "a" / "train.jsonl", tmp_path / "a" / "valid.jsonl"
        assert cli_main([*common, "--out", str(tmp_path / "b"),
                         "--exclude", f"{first[0]},{first[1]}"]) == 0
    old = {r["id"] for f in first for r in read_jsonl(f)}
    new = [r["id"] for f in ("train", "valid") for r in read_jsonl(tmp_path / "b" / f"{f}.jsonl")]
    assert len(old) == 6 and len(new) == 6 and not old & set(new)
    assert read_jsonl(tmp_path / "a" / "heldout.jsonl") == read_jsonl(tmp_path / "b" /
                                                                      "heldout.jsonl")


def test_data_cli_samples_a_prompt_file(folder, tmp_path):
    """`data --prompts F --temp T`: F's records answered by sampling into OUT/train.jsonl,
    the records distill itself writes; --temp on built sets samples valid and train with
    seeds that do not repeat."""
    records = [{"id": "a", "task": "chat", "prompt": "hi", "completion": "old"},
               {"id": "b", "task": "code", "prompt": "def f(x):"}]
    write_jsonl(tmp_path / "p.jsonl", records)
    common = ["data", "--model", str(folder), "--max-tokens", "6", "--batch-size", "4"]
    with pytest.warns(UserWarning):
        assert cli_main([*common, "--prompts", str(tmp_path / "p.jsonl"), "--temp", "1.5",
                         "--seed", "9", "--out", str(tmp_path / "s")]) == 0
        want = distill(folder, records, max_tokens=6, temp=1.5, seed=9, progress=False)
    assert read_jsonl(tmp_path / "s" / "train.jsonl") == want
    assert not (tmp_path / "s" / "heldout.jsonl").exists()
    with pytest.warns(UserWarning):
        assert cli_main([*common, "--chat", "2", "--code", "2", "--valid", "2", "--heldout",
                         "1", "--temp", "0.8", "--seed", "3", "--out", str(tmp_path / "b")]) == 0
    seeds = [r["seed"] for f in ("valid", "train") for r in read_jsonl(tmp_path / "b" /
                                                                       f"{f}.jsonl")]
    assert seeds == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("sources, message", [
    (["chitchat", "humaneval", "stdlib", "wikipedia"], "unknown data source 'wikipedia'"),
    (["chitchat", "humaneval", "stdlib", "numpy", "numpy"], "named twice"),
    (["chitchat", "numpy"], "missing: humaneval, stdlib"),
])
def test_bad_sources(sources, message):
    with pytest.raises(InputError, match=message):
        build_prompt_sets(chat=2, code=2, heldout=1, sources=sources)


@pytest.fixture(scope="module")
def prompt_sets():
    return build_prompt_sets(chat=40, code=30, heldout=5, seed=0)


def test_build_prompt_sets_sizes_and_disjoint(prompt_sets):
    train, test = prompt_sets["train"], prompt_sets["heldout"]
    assert len(train) == 70 and len(test) == 10
    assert sum(p["task"] == "chat" for p in train) == 40
    assert sum(p["task"] == "code" for p in train) == 30
    assert sorted(p["task"] for p in test) == ["chat"] * 5 + ["code"] * 5
    assert all(p["id"].startswith("HumanEval/") for p in test if p["task"] == "code")
    train_ids = {p["id"] for p in train}
    assert len(train_ids) == len(train)
    assert not train_ids & {p["id"] for p in test}


def test_build_prompt_sets_deterministic(prompt_sets):
    assert build_prompt_sets(chat=40, code=30, heldout=5, seed=0) == prompt_sets
    other = build_prompt_sets(chat=40, code=30, heldout=5, seed=1)
    assert other["heldout"] != prompt_sets["heldout"]


def test_build_prompt_sets_heldout_texts_not_in_train():
    # `specstream data` defaults: --chat 600 --code 600 --valid 48 --heldout 16 --seed 0.
    sets = build_prompt_sets(chat=624, code=624, heldout=16, seed=0)
    held = [p["prompt"] for p in sets["heldout"]]
    assert len(set(held)) == len(held)
    assert not set(held) & {p["prompt"] for p in sets["train"]}


# --- batched greedy generation --------------------------------------------------------


def plain_greedy(model, prompt: list[int], max_tokens: int, eos: set[int],
                 sampler: PositionSampler | None = None) -> list[int]:
    """Plain decoding (greedy, or sampled by `sampler`), up to an end token."""
    out = []
    for event in generate_step(model, prompt, max_tokens=max_tokens, speculative=False,
                               sampler=sampler):
        if event.token in eos:
            break
        out.append(event.token)
    return out


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], [20, 21, 22, 23, 24], [60]]


@pytest.mark.parametrize("name,streams", [
    ("llama", None), ("qwen3", StreamArgs(num_streams=2, msa_layers=2))])
def test_batch_generate_equals_plain_greedy(name, streams):
    model = tiny_model(name, seed=1, streams=streams)
    want = [plain_greedy(model, p, 12, set()) for p in PROMPTS]
    assert batch_generate(model, PROMPTS, 12, set()) == want
    assert all(len(w) == 12 for w in want)
    # Stop at an end token that one row produces early: that row stops, the others go on.
    stop = want[1][3]
    eos = {stop, 96}
    cut = [w[: min([w.index(t) for t in eos if t in w], default=len(w))] for w in want]
    assert [plain_greedy(model, p, 12, eos) for p in PROMPTS] == cut
    assert batch_generate(model, PROMPTS, 12, eos) == cut
    assert len(cut[1]) <= 3


def test_batch_generate_single_prompt_and_one_token():
    model = tiny_model("llama", seed=2)
    want = plain_greedy(model, PROMPTS[0], 6, {EOS_ID})
    assert batch_generate(model, [PROMPTS[0]], 6, {EOS_ID}) == [want]
    assert batch_generate(model, PROMPTS, 1, set()) == [
        plain_greedy(model, p, 1, set()) for p in PROMPTS]


def test_batch_generate_padding_does_not_leak():
    """A row's result does not depend on the other rows in its batch."""
    model = tiny_model("qwen2", seed=3)
    alone = [batch_generate(model, [p], 10, set())[0] for p in PROMPTS]
    assert batch_generate(model, PROMPTS, 10, set()) == alone
    assert batch_generate(model, PROMPTS[::-1], 10, set()) == alone[::-1]


def test_sample_rows_draws_each_row_with_its_own_sampler():
    logits = 3 * mx.random.normal((5, 300), key=mx.random.key(4))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    samplers = [PositionSampler(0.8, top_k=40, seed=s) for s in (7, 8, 7, 9, 10)]
    positions = [3, 3, 3, 12, 0]
    want = [samplers[i](logprobs[i : i + 1], positions[i : i + 1]).item() for i in range(5)]
    assert sample_rows(logprobs, samplers, positions).tolist() == want
    # Rows 0 and 2: same seed, same position, different log-probabilities; rows 0 and 1
    # differ by seed alone: the draws are not one row's noise for all.
    same = sample_rows(mx.broadcast_to(logprobs[:1], (5, 300)), samplers, [3] * 5).tolist()
    assert same[0] == same[2] and len(set(same)) > 1
    with pytest.raises(ValueError, match="alike but for the seed"):
        sample_rows(logprobs[:2], [PositionSampler(0.8, seed=1), PositionSampler(0.9)],
                    [0, 1])
    with pytest.raises(ValueError, match="one sampler per row"):
        sample_rows(logprobs, samplers[:4], positions[:4])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_batch_generate_samples_as_plain_decoding(name):
    """Each row of a sampled batch is the answer plain decoding draws with that row's
    sampler, whatever the padding and the batch; other seeds, other answers."""
    model = tiny_model(name, seed=5)
    samplers = [PositionSampler(1.3, seed=100 + i) for i in range(len(PROMPTS))]
    want = [plain_greedy(model, p, 12, set(), s) for p, s in zip(PROMPTS, samplers,
                                                                  strict=True)]
    assert batch_generate(model, PROMPTS, 12, set(), samplers) == want
    assert batch_generate(model, PROMPTS[::-1], 12, set(), samplers[::-1]) == want[::-1]
    assert want != [plain_greedy(model, p, 12, set()) for p in PROMPTS]
    other = [PositionSampler(1.3, seed=200 + i) for i in range(len(PROMPTS))]
    assert batch_generate(model, PROMPTS, 12, set(), other) != want
    # An end token sampled early ends that row only.
    eos = {want[0][2]}
    cut = [plain_greedy(model, p, 12, eos, s) for p, s in zip(PROMPTS, samplers, strict=True)]
    assert batch_generate(model, PROMPTS, 12, eos, samplers) == cut
    assert len(cut[0]) <= 2


DISTILL_RECORDS = [{"id": "a", "task": "chat", "prompt": "hi"},
                   {"id": "b", "task": "code", "prompt": "def f(x):"},
                   {"id": "c", "prompt": "Hello there, how are you?"}]


def assert_plain_answers(model, tokenizer, out: list[dict], max_tokens: int,
                         samplers: list | None = None) -> None:
    """Each distilled record's completion is plain decoding's answer to its prompt
    (greedy, or with that record's sampler)."""
    eos = set(tokenizer.eos_token_ids)
    for i, result in enumerate(out):
        ids = encode_messages(tokenizer, [{"role": "user", "content": result["prompt"]}])
        want = plain_greedy(model, ids, max_tokens, eos, samplers and samplers[i])
        assert result["completion"] == tokenizer.decode(want)


def test_distill_writes_the_models_own_greedy_answers(folder):
    records = DISTILL_RECORDS
    with pytest.warns(UserWarning):
        out = distill(folder, records, max_tokens=8, batch_size=2, progress=False)
        model, tokenizer = load(folder, precision="float32")
    assert [{k: v for k, v in r.items() if k != "completion"} for r in out] == records
    assert_plain_answers(model, tokenizer, out, 8)
    json.dumps(out)  # ready for write_jsonl


def test_distill_resume_keeps_finished_records(folder, tmp_path):
    records = DISTILL_RECORDS
    out_path = tmp_path / "train.jsonl"
    with pytest.warns(UserWarning):
        full = distill(folder, records, max_tokens=6, batch_size=2, progress=False,
                       out_path=out_path)
    lines = out_path.read_text().splitlines()
    kept = next(line for line in lines if json.loads(line)["id"] == "b")
    # An interrupted run: one finished record, then a torn line.
    out_path.write_text(kept + "\n" + lines[0][:20])
    with pytest.warns(UserWarning):
        again = distill(folder, records, max_tokens=6, batch_size=2, progress=False,
                        out_path=out_path, resume=True)
    by_id = {r["id"]: r for r in full}
    assert sorted(r["id"] for r in again) == ["a", "b", "c"]
    assert all(r == by_id[r["id"]] for r in again)
    # The finished file holds the records in their given order.
    assert [json.loads(line)["id"] for line in out_path.read_text().splitlines()] == [
        "a", "b", "c"]
    assert [r["id"] for r in again] == ["a", "b", "c"]
    # Everything finished: nothing to load or run.
    assert distill(folder, records, max_tokens=6, out_path=out_path, resume=True,
                   progress=False) == again


def test_distill_samples_with_a_seed_per_record(folder, tmp_path):
    records = DISTILL_RECORDS
    out_path = tmp_path / "sampled.jsonl"
    with pytest.warns(UserWarning):
        out = distill(folder, records, max_tokens=10, batch_size=2, progress=False,
                      temp=1.5, seed=40, out_path=out_path)
        model, tokenizer = load(folder, precision="float32")
    assert [r["seed"] for r in out] == [40, 41, 42] and all(r["temp"] == 1.5 for r in out)
    assert_plain_answers(model, tokenizer, out, 10,
                         [PositionSampler(1.5, seed=40 + i) for i in range(3)])
    with pytest.warns(UserWarning):
        greedy = distill(folder, out, max_tokens=10, batch_size=2, progress=False)
    assert greedy != out and all("temp" not in r and "seed" not in r for r in greedy)
    assert [r["completion"] for r in greedy] != [r["completion"] for r in out]
    # Resuming a sampled file keeps its records; a greedy or other-seed run redoes them.
    assert distill(folder, records, max_tokens=10, out_path=out_path, resume=True,
                   progress=False, temp=1.5, seed=40) == out
    with pytest.warns(UserWarning):
        again = distill(folder, records, max_tokens=10, batch_size=3, out_path=out_path,
                        resume=True, progress=False, temp=1.5, seed=41)
    assert [r["seed"] for r in again] == [41, 42, 43]
    assert_plain_answers(model, tokenizer, again, 10,
                         [PositionSampler(1.5, seed=41 + i) for i in range(3)])
    assert [r["completion"] for r in again] != [r["completion"] for r in out]
    # record_seeds: the records' own seeds (shuffled, stripped of their answers) give the
    # same answers back; a record without one takes seed + its index.
    shuffled = [{k: v for k, v in r.items() if k != "completion"} for r in out[::-1]]
    shuffled[0].pop("seed")
    with pytest.warns(UserWarning):
        redone = distill(folder, shuffled, max_tokens=10, batch_size=2, progress=False,
                         temp=1.5, seed=7, record_seeds=True)
    assert redone[1:] == out[::-1][1:]
    assert redone[0]["seed"] == 7 and redone[0]["completion"] != out[-1]["completion"]
    for bad in (-1, 2**32, "5", 1.5):
        with pytest.raises(InputError, match="record 1 .*seed must be an integer"):
            distill(folder, [shuffled[0], {**shuffled[1], "seed": bad}], temp=1.5,
                    record_seeds=True, progress=False)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(InputError, match="temp"):
            distill(folder, records, temp=bad, progress=False)
    with pytest.raises(InputError, match="seed"):
        distill(folder, records, temp=0.7, seed=2**32, progress=False)


# --- requests about a given text and two-turn conversations (issue 38) ---------------


def flat(text: str) -> str:
    return " ".join(text.split())


def test_pydocs_prompts_many_kinds_within_limits_and_apart_from_stdlib():
    prompts, texts = pydocs_prompts(), pydocs_texts()
    assert len(prompts) == len(texts) > 300
    assert pydocs_prompts() == prompts  # deterministic
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert len({t.lower() for _, t in texts}) == len(texts)  # each text once
    kinds = {}
    for p, (name, text) in zip(prompts, texts, strict=True):
        assert p["id"] == f"pydocs/{name}#{p['kind']}" and p["task"] == "chat"
        assert 400 <= len(text) <= 1500 and text in p["prompt"]
        # Mostly prose: doctest lines are a small part where there are any.
        doctest = [line for line in text.splitlines()
                   if line.lstrip().startswith((">>>", "..."))]
        assert sum(map(len, doctest)) < 0.25 * len(text)
        assert len(p["prompt"]) <= len(text) + 250  # the instruction is short
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    # Every kind, none dominating; the text sits before and after the instruction.
    assert set(kinds) == set(PYDOCS_KINDS) and max(kinds.values()) < 0.15 * len(prompts)
    assert sum(p["prompt"].startswith(t) or p["prompt"].startswith(f'"{t}')
               for p, (_, t) in zip(prompts, texts, strict=True)) > 0.1 * len(prompts)
    assert sum(p["prompt"].rstrip('`"\n').endswith(t)
               for p, (_, t) in zip(prompts, texts, strict=True)) > 0.3 * len(prompts)
    # Another seed pairs the texts with other requests.
    other = pydocs_prompts(seed=1)
    assert sum(a["prompt"] != b["prompt"] for a, b in zip(prompts, other, strict=True)) \
        > 0.8 * len(prompts)
    # No docstring of stdlib's code prompts is a pydocs text (mimetypes has one twice).
    code = " | ".join(flat(p["prompt"]) for p in stdlib_prompts())
    assert not [name for name, text in texts if flat(text) in code]


def test_chitchat_turns_prompts():
    prompts = chitchat_turns_prompts()
    assert len(prompts) > 1000
    assert len({p["id"] for p in prompts}) == len(prompts)
    first = {p["id"].split("/", 1)[1]: p["prompt"] for p in chitchat_prompts()}
    conversations = json.loads((data_module.package_dir("chitchat_dataset")
                                / "dataset.json").read_text())
    for p in prompts:
        msgs = conversations[p["id"].split("/", 1)[1]]["messages"]
        assert p["turns"] == [" ".join(m["text"].strip() for m in msgs[k]).strip()
                              for k in (0, 2)]  # messages 1 and 3, one speaker's
        assert {m["sender"] for m in msgs[0]} == {m["sender"] for m in msgs[2]}
        assert p["task"] == "chat" and p["id"].startswith("chitchat-turns/")
        assert "prompt" not in p and len(p["turns"]) == 2
        assert all(8 <= len(t) <= 400 and t == t.strip() for t in p["turns"])
        # Message 1 of the conversation is its chitchat opening turn.
        assert first.get(p["id"].split("/", 1)[1], p["turns"][0]) == p["turns"][0]
    assert chitchat_turns_prompts() == prompts


NEW_SOURCES = ["chitchat", "humaneval", "stdlib", "pydocs", "chitchat-turns"]


def test_new_sources_hold_out_their_own_and_never_train_on_a_held_out_text():
    base = build_prompt_sets(chat=20, code=30, heldout=6, seed=0)
    # Every prompt of every pool in training: nothing held out may be there.
    sets = build_prompt_sets(chat=100_000, code=100_000, heldout=6, seed=0,
                             sources=NEW_SOURCES)
    assert sets["heldout"][:12] == base["heldout"]  # the default split is kept
    extra = sets["heldout"][12:]
    assert [p["id"].split("/")[0] for p in extra] == ["pydocs"] * 6 + ["chitchat-turns"] * 6
    train, held = sets["train"], sets["heldout"]
    assert not {p["id"] for p in train} & {p["id"] for p in held}
    held_texts = {t.lower() for p in held for t in record_texts(p)}
    assert not [p["id"] for p in train if any(t.lower() in held_texts for t in
                                              record_texts(p))]
    # Nor a held-out pydocs text inside a training request (another kind of request).
    docs = dict(pydocs_texts())
    held_docs = [docs[p["id"][len("pydocs/"):].split("#")[0]] for p in extra[:6]]
    assert not [p["id"] for p in train for d in held_docs if d in p.get("prompt", "")]
    counts = {}
    for p in train:
        counts[p["id"].split("/")[0]] = counts.get(p["id"].split("/")[0], 0) + 1
    assert counts["pydocs"] == len(docs) - 6 and counts["chitchat-turns"] > 1000
    small = build_prompt_sets(chat=20, code=30, heldout=6, seed=0, sources=NEW_SOURCES)
    assert small == build_prompt_sets(chat=20, code=30, heldout=6, seed=0,
                                      sources=NEW_SOURCES)
    assert small["heldout"] == held and len(small["train"]) == 50


TWO_TURNS = [{"id": "t", "task": "chat", "turns": ["hi", "and then what?"]},
             {"id": "a", "task": "chat", "prompt": "hi"},
             {"id": "u", "turns": ["Hello there, how are you?", "ok", "tell me more"]},
             {"id": "b", "task": "code", "prompt": "def f(x):"}]


def test_distill_answers_each_turn_after_the_models_own_answers(folder):
    with pytest.warns(UserWarning):
        out = distill(folder, TWO_TURNS, max_tokens=8, batch_size=2, progress=False)
        model, tokenizer = load(folder, precision="float32")
    assert [r["id"] for r in out] == ["t", "a", "u", "b"]
    eos = set(tokenizer.eos_token_ids)
    for record, result in zip(TWO_TURNS, out, strict=True):
        if "prompt" in record:
            assert result == {**record, "completion": result["completion"]}
            continue
        msgs = result["messages"]
        assert result == {**record, "messages": msgs}
        assert [m["role"] for m in msgs] == ["user", "assistant"] * len(record["turns"])
        assert [m["content"] for m in msgs[::2]] == record["turns"]
        for k in range(1, len(msgs), 2):  # each answer is plain greedy decoding's
            want = plain_greedy(model, encode_messages(tokenizer, msgs[:k]), 8, eos)
            assert msgs[k]["content"] == tokenizer.decode(want)
    # a1 is the model's own answer to turn 1 alone (record "a" asks the same).
    assert out[0]["messages"][1]["content"] == out[1]["completion"] != ""
    # Sampled: each turn drawn with the record's seed.
    with pytest.warns(UserWarning):
        sampled = distill(folder, TWO_TURNS[:1], max_tokens=8, temp=1.5, seed=5,
                          progress=False)
    msgs = sampled[0]["messages"]
    assert sampled[0]["seed"] == 5 and msgs != out[0]["messages"]
    for k in (1, 3):
        want = plain_greedy(model, encode_messages(tokenizer, msgs[:k]), 8, eos,
                            PositionSampler(1.5, seed=5))
        assert msgs[k]["content"] == tokenizer.decode(want)


@pytest.mark.parametrize("record, message", [
    ({"id": "x", "prompt": "hi", "turns": ["hi"]}, "one of the two"),
    ({"id": "x"}, "one of the two"),
    ({"id": "x", "turns": []}, "non-empty list"),
    ({"id": "x", "turns": ["hi", 3]}, "non-empty list"),
    ({"id": "x", "prompt": 3}, "must be text"),
])
def test_distill_refuses_bad_records(folder, record, message):
    with pytest.raises(InputError, match=f"record 1 \\(x\\).*{message}"):
        distill(folder, [TWO_TURNS[1], record], progress=False)


def test_distill_resume_skips_finished_multi_turn_records(folder, tmp_path):
    out_path = tmp_path / "turns.jsonl"
    with pytest.warns(UserWarning):
        full = distill(folder, TWO_TURNS, max_tokens=6, batch_size=2, progress=False,
                       out_path=out_path)
    by_id = {r["id"]: r for r in full}
    # An interrupted run: "t" finished (marked, to see that it is kept, not redone), "u"
    # cut short, then a torn line.
    kept = {**by_id["t"], "messages": [*by_id["t"]["messages"][:3],
                                       {"role": "assistant", "content": "KEPT"}]}
    short = {**by_id["u"], "messages": by_id["u"]["messages"][:2]}
    out_path.write_text(json.dumps(kept) + "\n" + json.dumps(short) + "\n"
                        + json.dumps(by_id["a"])[:15])
    with pytest.warns(UserWarning):
        again = distill(folder, TWO_TURNS, max_tokens=6, batch_size=2, progress=False,
                        out_path=out_path, resume=True)
    assert again == [kept, by_id["a"], by_id["u"], by_id["b"]]
    assert read_jsonl(out_path) == again
    # Everything finished: nothing to load (the model path is never read) or run.
    assert distill(tmp_path / "no-model", TWO_TURNS, max_tokens=6, out_path=out_path,
                   resume=True, progress=False) == again
    # Other turns are another record: redone.
    other = [{**TWO_TURNS[0], "turns": ["hi", "and now?"]}]
    with pytest.warns(UserWarning):
        redone = distill(folder, other, max_tokens=6, out_path=out_path, resume=True,
                         progress=False)
    assert redone[0]["messages"][3]["content"] != "KEPT"


def test_multi_turn_record_trains_on_every_own_answer(tokenizer, tmp_path):
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "last"}]
    record = {"id": "t", "turns": ["q1", "q2"], "messages": msgs}
    first = turn("user", "q1") + GEN_PROMPT
    second = turn("user", "q1") + turn("assistant", "a1") + turn("user", "q2") + GEN_PROMPT
    want = [Example(first + char_ids("a1") + [EOS_ID], len(first)),
            Example(second + char_ids("last") + [EOS_ID], len(second))]
    assert record_examples(tokenizer, record, 512) == want
    # Messages of unknown origin (no "turns"): the last assistant turn only, as before.
    assert record_examples(tokenizer, {"messages": msgs}, 512) == want[1:]
    # A length limit drops the example that no longer fits.
    assert record_examples(tokenizer, record, len(first) + 3) == [
        Example(first + char_ids("a1") + [EOS_ID], len(first))]
    write_jsonl(tmp_path / "d.jsonl", [record, {"prompt": "x", "completion": "yy"}])
    assert load_examples(tmp_path / "d.jsonl", tokenizer) == want + [
        encode_record(tokenizer, {"prompt": "x", "completion": "yy"}, 512)]


def test_corpus_documents_take_every_assistant_turn(tokenizer):
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "bb"}]
    records = [{"id": "t", "turns": ["q1", "q2"], "messages": msgs},
               {"id": "t", "turns": ["q1", "q2"], "messages": msgs},  # once per record
               {"id": "p", "prompt": "q", "completion": "cc"}]
    assert corpus_documents(tokenizer, records) == [char_ids("a1"), char_ids("bb"),
                                                    char_ids("cc")]
    with pytest.raises(InputError, match="record 1: need a distilled 'completion'"):
        corpus_documents(tokenizer, [{"id": "t", "turns": ["q1"], "messages": msgs[:1]}])


def test_data_cli_with_the_new_sources(folder, tokenizer, tmp_path):
    """`data --sources ...,pydocs,chitchat-turns`: multi-turn records distilled into
    train/valid as messages, held out as turns (what bench and tune read), and a file
    `train` loads."""
    with pytest.warns(UserWarning):
        assert cli_main(["data", "--model", str(folder), "--chat", "12", "--code", "2",
                         "--valid", "2", "--heldout", "2", "--max-tokens", "3",
                         "--batch-size", "4", "--sources", ",".join(NEW_SOURCES),
                         "--out", str(tmp_path)]) == 0
    held = read_jsonl(tmp_path / "heldout.jsonl")
    assert [r["id"].split("/")[0] for r in held[4:]] == ["pydocs"] * 2 + ["chitchat-turns"] * 2
    assert all(len(r["turns"]) == 2 for r in held[6:])
    # bench and tune read the held-out and validation files (multi-turn at the last turn).
    assert read_prompts(tmp_path / "heldout.jsonl") == held
    assert read_prompts(tmp_path / "valid.jsonl") == read_jsonl(tmp_path / "valid.jsonl")
    records = read_jsonl(tmp_path / "train.jsonl") + read_jsonl(tmp_path / "valid.jsonl")
    turns = [r for r in records if "turns" in r]
    assert turns and all(len(r["messages"]) == 4 for r in turns)
    assert any(r["id"].startswith("pydocs/") and "kind" in r for r in records)
    train = read_jsonl(tmp_path / "train.jsonl")
    assert any("turns" in r for r in train)
    # Two examples a two-turn record: more examples than records.
    assert len(load_examples(tmp_path / "train.jsonl", tokenizer, 4096)) > len(train)
