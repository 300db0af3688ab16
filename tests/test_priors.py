"""Drafting priors (priors.py): the per-model file next to the streams, its round trip and
its checks, the shipped model's file, and the loader and generate_step handing them to
the controller (greedy and sampled apart)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from test_controller import fixed_costs, recorded_plans
from tiny_folder import make_tiny_folder

from specstream_mlx import load
from specstream_mlx.checkpoint import STREAMS_FILE
from specstream_mlx.decoding import step as step_module
from specstream_mlx.decoding.priors import (
    NEUTRAL,
    PRIORS_FILE,
    DraftingPriors,
    Priors,
    model_priors,
    read_priors,
    write_priors,
)
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.errors import ModelLoadError
from specstream_mlx.loader import SHIPPED_STREAMS
from specstream_mlx.models.config import StreamArgs

STREAMS = StreamArgs(num_streams=3, msa_layers=2, tree_budget=6, lookup_depth=8)
# Most of the vocabulary: nearly every generated token matches one of it, and a context
# chain is offered within a few steps.
PROMPT = list(range(3, 80))
SOME = DraftingPriors(
    greedy=Priors((0.9, 0.6, 0.4), 3.0, {1: 0.2, 4: 0.9}, 0.8, {2: 0.4, 6: 0.75}, 0.7),
    sampled=Priors((0.7,), 1.5, {2: 0.35}, 0.6, {}, 0.5),
    source="a test")


def write_file(folder, data) -> None:
    (folder / PRIORS_FILE).write_text(data if isinstance(data, str) else json.dumps(data))


# --- the file ---------------------------------------------------------------------------


def test_write_then_read_gives_the_same_priors(tmp_path):
    path = write_priors(tmp_path, SOME)
    assert path == tmp_path / PRIORS_FILE
    data = json.loads(path.read_text())
    # On disk match lengths are JSON object keys (strings), calibrations lists.
    assert data["greedy"]["context_first"] == {"1": 0.2, "4": 0.9}
    assert data["greedy"]["stream_calibration"] == [0.9, 0.6, 0.4]
    assert data["sampled"]["corpus_first"] == {} and data["source"] == "a test"
    back = read_priors(tmp_path)
    assert back == SOME
    assert back.greedy.context_first == {1: 0.2, 4: 0.9}  # ints in memory
    assert back.greedy.first("context", 4) == 0.9 and back.greedy.first("corpus", 6) == 0.75
    assert back.of(sampled=False) == SOME.greedy and back.of(sampled=True) == SOME.sampled


def test_a_missing_file_is_neutral_for_both_modes(tmp_path):
    priors = read_priors(tmp_path)
    assert priors == DraftingPriors()
    assert priors.of(sampled=False) == NEUTRAL and priors.of(sampled=True) == NEUTRAL
    # Neutral: stream probabilities at their word, chains even odds.
    assert NEUTRAL.stream_calibration == (1.0,)
    assert NEUTRAL.first("context", 3) == 0.5 and NEUTRAL.follow("corpus") == 0.5


def test_fields_left_out_are_neutral(tmp_path):
    write_file(tmp_path, {"greedy": {"context_next": 0.7, "context_first": {"3": 0.6}}})
    priors = read_priors(tmp_path)
    assert priors.greedy == Priors(context_first={3: 0.6}, context_next=0.7)
    assert priors.greedy.first("context", 2) == 0.5  # a match length not given
    assert priors.sampled == NEUTRAL


def greedy(**fields) -> dict:
    return {"greedy": fields}


BAD_FILES = [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "not a JSON object"),
    ('"priors"', "not a JSON object"),
    (greedy(context_nxt=0.5), "unknown fields ['context_nxt']"),
    ({"sampled": {"context_first": {"2": 1.5}}}, "sampled: 1.5 is not a rate in [0, 1]"),
    (greedy(corpus_next=-0.1), "is not a rate in [0, 1]"),
    (greedy(context_next=True), "True is not a rate"),
    (greedy(context_first={"1": True}), "True is not a rate"),
    (greedy(context_first={"1": "0.5"}), "'0.5' is not a rate"),
    (greedy(corpus_next=float("nan")), "nan is not a rate"),
    (greedy(context_first=[0.5]), "is not an object of rates by match length"),
    (greedy(context_first={"one": 0.5}), "invalid literal for int()"),
    (greedy(stream_calibration=[]), "stream_calibration must be a list of positive numbers"),
    (greedy(stream_calibration=[1.0, 0.0]), "stream_calibration must be a list of positive"),
    (greedy(stream_calibration=[-0.5]), "stream_calibration must be a list of positive"),
    (greedy(stream_calibration=1.0), "stream_calibration must be a list of positive"),
    (greedy(stream_calibration=[True]), "stream_calibration must be a list of positive"),
    (greedy(stream_weight=0), "stream_weight must be a positive number"),
    (greedy(stream_weight=-2.0), "stream_weight must be a positive number"),
    (greedy(stream_weight=True), "stream_weight must be a positive number"),
    ({"greedy": None}, "bad drafting priors"),
    ({"greedy": 3}, "bad drafting priors"),
    ({"greedy": []}, "greedy: not a JSON object"),
    ({"greedy": {}, "samples": {"context_next": 0.1}}, "samples"),
    (greedy(stream_weight=float("inf")), "stream_weight must be a positive number"),
    (greedy(stream_calibration=[float("inf")]), "stream_calibration must be a list"),
]


@pytest.mark.parametrize("data, message", BAD_FILES)
def test_a_bad_file_is_one_error_naming_it(tmp_path, data, message):
    write_file(tmp_path, data)
    with pytest.raises(ModelLoadError) as e:
        read_priors(tmp_path)
    assert str(tmp_path / PRIORS_FILE) in str(e.value)
    assert "bad drafting priors" in str(e.value) and message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_the_shipped_file_parses():
    assert (SHIPPED_STREAMS / PRIORS_FILE).is_file()
    shipped = read_priors(SHIPPED_STREAMS)
    assert shipped.source
    for priors in (shipped.greedy, shipped.sampled):
        assert priors != NEUTRAL
        rates = [*priors.context_first.values(), *priors.corpus_first.values(),
                 priors.context_next, priors.corpus_next]
        assert all(0 <= r <= 1 for r in rates)
    # Sampled drafts are accepted less often than greedy ones: their priors say so.
    assert shipped.sampled.stream_calibration[0] < shipped.greedy.stream_calibration[0]
    for n, rate in shipped.sampled.context_first.items():
        assert rate <= shipped.greedy.context_first[n]


# --- loading ----------------------------------------------------------------------------


def test_the_loader_attaches_the_folders_priors(tmp_path):
    folder, _ = make_tiny_folder(tmp_path / "m", streams=STREAMS)
    model, _ = load(folder)
    assert model.drafting_priors == DraftingPriors()  # no file: neutral
    write_priors(folder, SOME)
    model, _ = load(folder)
    assert model.drafting_priors == SOME and model_priors(model) == SOME
    write_file(folder, greedy(stream_weight=0))
    with pytest.raises(ModelLoadError, match="drafting_priors.json"):
        load(folder)
    plain, _ = make_tiny_folder(tmp_path / "plain")  # no streams: nothing to draft
    write_priors(plain, SOME)
    with pytest.warns(UserWarning, match="no speculative streams"):
        model, _ = load(plain)
    assert model_priors(model) == DraftingPriors()
    assert model_priors(tiny_model("llama")) == DraftingPriors()  # not loaded: neutral


def test_the_embedded_folder_receives_the_shipped_priors(tmp_path, monkeypatch):
    from specstream_mlx import loader

    shipped = tmp_path / "assets"
    donor, _ = make_tiny_folder(tmp_path / "donor", streams=STREAMS)
    shipped.mkdir()
    for name in (STREAMS_FILE, "config.json"):
        (shipped / name).write_bytes((donor / name).read_bytes())
    write_priors(shipped, SOME)
    monkeypatch.setattr(loader, "SHIPPED_STREAMS", shipped)
    target, _ = make_tiny_folder(tmp_path / "target")
    loader.ensure_default_streams(target)
    assert (target / PRIORS_FILE).read_bytes() == (shipped / PRIORS_FILE).read_bytes()
    model, _ = load(target)
    assert model.drafting_priors == SOME


# --- generation -------------------------------------------------------------------------


def chains(first: float) -> Priors:
    """Priors that expect every context chain's tokens accepted with this rate."""
    return Priors(context_first=dict.fromkeys((1, 2, 3, 4), first), context_next=first)


def first_chain_choice(model, plans, **kwargs) -> int:
    """The chain drafted at the first planned step that was offered one."""
    plans.clear()
    list(step_module.generate_step(model, PROMPT, max_tokens=24, **kwargs))
    return next(plan.chain for chain_len, plan in plans if chain_len)


def test_generation_starts_from_the_loaded_priors(tmp_path, monkeypatch):
    folder, _ = make_tiny_folder(tmp_path / "m", streams=STREAMS)
    fixed_costs(monkeypatch)
    plans = recorded_plans(monkeypatch)
    drafted = {}
    for rate in (0.0, 1.0):
        write_priors(folder, DraftingPriors(greedy=chains(rate)))
        model, _ = load(folder)
        drafted[rate] = first_chain_choice(model, plans)
    assert drafted[0.0] == 0 and drafted[1.0] > 0


def test_greedy_and_sampled_generations_start_from_their_own_priors(monkeypatch):
    model = tiny_model("llama", seed=1, streams=STREAMS)
    fixed_costs(monkeypatch)
    plans = recorded_plans(monkeypatch)
    sampler = PositionSampler(0.7, seed=1)
    model.drafting_priors = DraftingPriors(greedy=chains(1.0), sampled=chains(0.0))
    assert first_chain_choice(model, plans) > 0
    assert first_chain_choice(model, plans, sampler=sampler) == 0
    model.drafting_priors = DraftingPriors(greedy=chains(0.0), sampled=chains(1.0))
    assert first_chain_choice(model, plans) == 0
    assert first_chain_choice(model, plans, sampler=sampler) > 0
