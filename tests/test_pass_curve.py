"""The machine's pass-cost curve: measured once per machine and model shape, cached,
re-measured on request or when the cache is unusable, handed to the model's controller
costs; the pass timers behind it run the passes decoding runs."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model

from specstream_mlx.decoding import pass_curve
from specstream_mlx.decoding.costs import costs_for
from specstream_mlx.models.config import StreamArgs


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $SPECSTREAM_HOME, the curve on, counted measurements."""
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    monkeypatch.delenv("SPECSTREAM_PASS_CURVE", raising=False)
    calls = []

    def fake_cost(model, rows, prefix, repeats, streams):
        calls.append((tuple(rows), streams))
        return {r: 40.0 + 5 * r for r in rows}

    monkeypatch.setattr(pass_curve, "pass_cost", fake_cost)
    return tmp_path, calls


def test_measured_once_then_read_from_the_cache(home, capsys):
    path, calls = home
    model = tiny_model("llama", 1, StreamArgs(num_streams=2, msa_layers=2))
    curve = pass_curve.apply(model)
    assert calls == [(pass_curve.ROWS, False)]  # plain passes, every listed size
    assert curve == {r: (40.0 + 5 * r) / 1000 for r in pass_curve.ROWS}
    assert costs_for(model).curve == sorted(curve.items())
    assert "measuring decode passes" in capsys.readouterr().err
    saved = json.loads((path / "passes.json").read_text())
    assert len(saved) == 1 and "model " in next(iter(saved))
    other = tiny_model("llama", 2, StreamArgs(num_streams=2, msa_layers=2))
    assert pass_curve.apply(other) == curve  # same shape and machine: cached
    assert len(calls) == 1
    tuned = tiny_model("llama", 1, StreamArgs(num_streams=2, msa_layers=2, tree_budget=3,
                                              min_draft_prob=0.2, sampled_top_k=5))
    assert pass_curve.apply(tuned) == curve  # other decoding defaults: the same passes
    assert len(calls) == 1
    bigger = tiny_model("llama", 1, StreamArgs(num_streams=3, msa_layers=2))
    pass_curve.apply(bigger)  # another shape: measured and kept beside the first
    assert len(calls) == 2 and len(json.loads((path / "passes.json").read_text())) == 2


def test_measure_again_off_and_a_broken_cache(home, monkeypatch):
    path, calls = home
    model = tiny_model("llama", 1, StreamArgs(num_streams=2, msa_layers=2))
    pass_curve.apply(model)
    monkeypatch.setenv("SPECSTREAM_PASS_CURVE", "measure")
    pass_curve.apply(model)
    assert len(calls) == 2
    monkeypatch.setenv("SPECSTREAM_PASS_CURVE", "off")
    fresh = tiny_model("llama", 3, StreamArgs(num_streams=2, msa_layers=2))
    assert pass_curve.apply(fresh) == {} and costs_for(fresh).curve == []
    monkeypatch.delenv("SPECSTREAM_PASS_CURVE")
    assert pass_curve.apply(tiny_model("llama", 4)) == {}  # no streams, no controller
    assert len(calls) == 2
    saved = json.loads((path / "passes.json").read_text())
    key = next(iter(saved))
    for broken in ({"1": -3.0}, {**saved[key], "1": "fast"}, []):
        (path / "passes.json").write_text(json.dumps({key: broken}))
        pass_curve.apply(model)
    assert len(calls) == 5  # each unusable entry measured again
    (path / "passes.json").write_text("not json")
    pass_curve.apply(model)
    assert len(calls) == 6
    (path / "passes.json").write_text("[1, 2]")  # JSON, but not an object
    pass_curve.apply(model)
    assert len(calls) == 7


def test_real_timers_measure_positive_times(monkeypatch):
    model = tiny_model("llama", 1, StreamArgs(num_streams=2, msa_layers=2))
    plain = pass_curve.pass_cost(model, [1, 3], prefix=8, repeats=1, streams=False)
    drafting = pass_curve.pass_cost(model, [1, 3], prefix=8, repeats=1)
    assert list(plain) == [1, 3] and all(v > 0 for v in [*plain.values(),
                                                          *drafting.values()])
