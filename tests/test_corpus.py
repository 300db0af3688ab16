"""Corpus drafts: the datastore's lookup and vote against a brute-force reference, its file
format and loading, the controller's separate statistics, the `specstream corpus` command,
and that decoding with any corpus keeps greedy output exact."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from conftest import tiny_model
from tiny_folder import make_tiny_folder

from specstream_mlx import load
from specstream_mlx.checkpoint import CORPUS_FILE, read_corpus, save_corpus
from specstream_mlx.cli import main as cli_main
from specstream_mlx.decoding import step as step_module
from specstream_mlx.decoding.controller import ChainSource, Controller, Plan
from specstream_mlx.decoding.corpus import SEPARATOR, CorpusIndex
from specstream_mlx.decoding.costs import PassCosts
from specstream_mlx.decoding.drafter import DraftSettings, pick_chain, planned_tree
from specstream_mlx.decoding.lookup import NgramIndex
from specstream_mlx.decoding.step import generate_step
from specstream_mlx.decoding.tree import DraftTree
from specstream_mlx.errors import InputError, ModelLoadError
from specstream_mlx.loader import describe_model
from specstream_mlx.models.config import StreamArgs

A, B, C, D, E, X = 10, 11, 12, 13, 14, 15
STREAMS = StreamArgs(num_streams=3, msa_layers=2, tree_budget=6, lookup_depth=8)
PROMPT = [3, 17, 42, 8, 91, 5, 3, 17, 42]


def naive_match(tokens: list[int], history: list[int], depth: int, min_n=2, max_n=6,
                min_count=2, min_share=0.5) -> tuple[list[int], int]:
    """CorpusIndex.match spelled out: scan every position for the suffix, then vote."""
    for n in range(min(max_n, len(history)), min_n - 1, -1):
        gram = history[-n:]
        ends = [i for i in range(n - 1, len(tokens) - 1)
                if tokens[i - n + 1 : i + 1] == gram and tokens[i + 1] != SEPARATOR]
        if len(ends) < min_count:
            continue
        chain = []
        while len(chain) < depth and len(ends) >= min_count:
            nxt = [tokens[i + 1] if i + 1 < len(tokens) else SEPARATOR for i in ends]
            tok, count = Counter(nxt).most_common(1)[0]
            ties = sorted(t for t, c in Counter(nxt).items() if c == count)
            tok = ties[0]  # np.unique + argmax: the smallest of the most common
            if tok == SEPARATOR or count < min_count or count < min_share * len(ends):
                break
            chain.append(tok)
            ends = [i + 1 for i, t in zip(ends, nxt, strict=True) if t == tok]
        if chain:
            return chain, n
    return [], 0


def test_the_docstring_example():
    tokens = np.array([A, B, C, D, SEPARATOR, X, B, C, D, SEPARATOR, A, B, C, E])
    # "a b c" is followed by d once and e once: no majority of two, so "b c" decides (d).
    assert CorpusIndex(tokens, min_share=0.6).match([7, A, B, C], 8) == ([D], 2)
    # A single occurrence is not enough; nothing crosses a separator.
    assert CorpusIndex(tokens).match([X, B], 8) == ([], 0)
    assert CorpusIndex(tokens).match([D, X], 8) == ([], 0)
    assert CorpusIndex(tokens).match([A, B, C], 0) == ([], 0)


def test_longer_matches_win_and_chains_follow_the_agreeing_occurrences():
    doc1, doc2 = [A, B, C, D, E, X], [9, B, C, A, A, A]
    tokens = np.array([*doc1, SEPARATOR, *doc1, SEPARATOR, *doc2, SEPARATOR, *doc2, SEPARATOR,
                       *doc2])
    index = CorpusIndex(tokens)
    assert index.match([A, B, C], 8) == ([D, E, X], 3)  # "a b c" beats "b c"'s vote (a)
    assert index.match([5, B, C], 8) == ([A, A, A], 2)
    assert index.match([5, B, C], 2) == ([A, A], 2)


@pytest.mark.parametrize("seed", range(4))
def test_lookup_equals_a_brute_force_scan(seed):
    rng = random.Random(seed)
    docs = [[rng.randrange(6) for _ in range(rng.randrange(1, 40))] for _ in range(30)]
    tokens = [t for doc in docs for t in (*doc, SEPARATOR)]
    index = CorpusIndex(np.array(tokens))
    hits = 0
    for _ in range(300):
        history = [rng.randrange(6) for _ in range(rng.randrange(1, 9))]
        got = index.match(history, 5)
        assert got == naive_match(tokens, history, 5)
        hits += bool(got[0])
    assert hits > 50  # the comparison covered real drafts, not only misses


def test_corpus_file_round_trip_and_bad_files(tmp_path):
    path = save_corpus([[5, 6, 7], [8]], tmp_path / CORPUS_FILE)
    assert read_corpus(path, 97).tolist() == [5, 6, 7, SEPARATOR, 8, SEPARATOR]
    for bad, message in [(np.zeros((2, 2), np.int32), "1-D integer"),
                         (np.array([1.5, 2.0]), "1-D integer"),
                         (np.array([5, 97]), "token ids in 0..96"),
                         (np.array([5, -2]), "token ids in 0..96")]:
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(ModelLoadError, match=message):
            read_corpus(tmp_path / "bad.npy", 97)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_corpus(tmp_path / "junk.npy", 97)


def test_loader_attaches_the_folders_corpus(tmp_path):
    folder, _ = make_tiny_folder(tmp_path / "m", streams=STREAMS)
    model, _ = load(folder)
    assert model.corpus is None
    save_corpus([[40, 41, 42, 43]] * 3, folder / CORPUS_FILE)
    model, _ = load(folder)
    assert isinstance(model.corpus, CorpusIndex) and len(model.corpus) == 15
    assert "corpus of 0k tokens" in describe_model(model)
    assert DraftSettings.resolve(model, True, None, None, None, None).corpus == 8
    assert DraftSettings.resolve(model, True, None, None, None, None, 0).corpus == 0
    with pytest.raises(InputError, match="corpus_depth"):
        DraftSettings.resolve(model, True, None, None, None, None, -1)
    np.save(folder / CORPUS_FILE, np.array([1000]))
    with pytest.raises(ModelLoadError, match="corpus"):
        load(folder)


def test_a_bad_corpus_depth_in_the_config_block(tmp_path):
    folder, _ = make_tiny_folder(tmp_path / "m", streams=STREAMS)
    config = json.loads((folder / "config.json").read_text())
    config["speculative_streaming"]["corpus_depth"] = -1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="corpus_depth must be >= 0"):
        load(folder)


def test_controller_keeps_corpus_statistics_apart():
    # Match lengths outside the kept ones share the nearest bucket.
    assert ChainSource("context", 3).bucket() == ("context", 3)
    assert ChainSource("context", 9).bucket() == ("context", 4)
    assert ChainSource("corpus", 9).bucket() == ("corpus", 6)
    assert ChainSource("corpus", 1).bucket() == ("corpus", 2)
    c = Controller(PassCosts(), 3)
    context_2, corpus_2 = ChainSource("context", 2), ChainSource("corpus", 2)
    context, corpus = c.chain_gain(context_2, 8), c.chain_gain(corpus_2, 8)
    tree = DraftTree().with_chain([7, 8, 9, 10])
    for _ in range(40):  # corpus chains of 2-gram matches are never accepted
        c.observe(tree, Plan(0, 4, False), corpus_2, [0], None)
    assert c.chain_gain(corpus_2, 8) < corpus / 5
    assert c.chain_gain(ChainSource("corpus", 1), 8) == c.chain_gain(corpus_2, 8)  # shared
    assert c.chain_gain(context_2, 8) == context


def test_planned_tree_takes_the_chain_the_controller_expects_more_from():
    index = CorpusIndex(np.array([1, 2, 3, 4, 5, 6, SEPARATOR] * 4))
    history = [9, 1, 2, 3]  # no context match for "3"; the corpus matches 3 tokens
    d = DraftSettings(True, budget=0, top_k=1, lookup=8, corpus=4)
    c = Controller(PassCosts(), 3)
    _, plan, source = planned_tree(c, None, history, NgramIndex(), d, index)
    assert source == ChainSource("corpus", 3)
    # With a long context match the context draft is expected to give more.
    history = [1, 2, 3, 4, 1, 2, 3]
    chain, source = pick_chain(history, NgramIndex(), 8, index, 4,
                               lambda a, b: c.chain_gain(a[1], len(a[0]))
                               > c.chain_gain(b[1], len(b[0])))
    assert source == ChainSource("context", 3) and chain == [4, 1, 2, 3]
    # Without a controller the longer match wins, the context on ties.
    assert pick_chain(history, NgramIndex(), 8, index, 4) == ([4, 1, 2, 3],
                                                              ChainSource("context", 3))
    assert pick_chain([8, 2, 3, 4], None, 0, index, 4) == ([5, 6], ChainSource("corpus", 3))
    # No chain at all: no source.
    assert pick_chain([1, 2, 3], NgramIndex(), 8, None, 0) == ([], None)
    assert pick_chain([9, 8, 7], NgramIndex(), 8, index, 4) == ([], None)


@pytest.mark.parametrize("adaptive", [True, False])
def test_greedy_output_is_exact_with_any_corpus(adaptive, monkeypatch):
    model = tiny_model("llama", seed=3, streams=STREAMS)
    # Flat pass costs, not this machine's timings (noisy under load): the controller's
    # choices, and so the drafted-token count below, are then deterministic.
    flat = PassCosts()
    for rows in range(1, 64):
        flat.observe(rows, False, 0.01)
        flat.observe(rows, True, 0.011)
    monkeypatch.setattr(step_module, "costs_for", lambda model: flat)
    monkeypatch.setattr(PassCosts, "observe", lambda self, rows, draft, seconds: None)
    plain = [e.token for e in generate_step(model, PROMPT, max_tokens=40, speculative=False)]
    rng = random.Random(0)
    noise = [[rng.randrange(97) for _ in range(30)] for _ in range(20)]
    for docs in (noise, [plain] * 3 + noise):  # a useless corpus, and one holding the answer
        tokens = [t for doc in docs for t in (*doc, SEPARATOR)]
        model.corpus = CorpusIndex(np.array(tokens))
        events = list(generate_step(model, PROMPT, max_tokens=40, adaptive=adaptive))
        assert [e.token for e in events] == plain
    # The answer's own tokens in the corpus are drafted and accepted.
    assert sum(e.from_draft for e in events) >= 10
    model.corpus = None


def test_corpus_command_builds_a_file_the_folder_then_uses(tmp_path, capsys):
    folder, _ = make_tiny_folder(tmp_path / "m", streams=STREAMS)
    data = tmp_path / "d.jsonl"
    rows = [{"id": "a", "prompt": "hi", "completion": "hello there"},
            {"id": "a", "prompt": "hi", "completion": "hello there"},  # duplicate: once
            {"id": "b", "prompt": "yo", "completion": "good day"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["corpus", "--data", str(data), "--model", str(folder)]) == 0
    assert "wrote 19 tokens of 2 answers" in capsys.readouterr().out
    model, _ = load(folder)
    assert len(model.corpus) == 21


def test_corpus_command_errors(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert cli_main(["corpus", "--data", str(data)]) == 2
    assert "--out is required" in capsys.readouterr().err
    folder, _ = make_tiny_folder(tmp_path / "m", streams=STREAMS)
    assert cli_main(["corpus", "--data", str(data), "--model", str(folder)]) == 2
    assert "need a distilled 'completion'" in capsys.readouterr().err
    assert cli_main(["corpus", "--data", str(tmp_path / "none.jsonl"), "--model",
                     str(folder)]) == 2
    assert "not found" in capsys.readouterr().err
