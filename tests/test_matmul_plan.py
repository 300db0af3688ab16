"""The measured matmul plan: every form it can pick computes x @ w.T; the choice takes the
fastest measured option (padding up where a larger row count is cheaper) and keeps the
default within the noise margin; measurements are cached per machine and shape."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model

import specstream_mlx.matmul_plan as mp
from specstream_mlx.models import kernels
from specstream_mlx.models.config import StreamArgs


@pytest.fixture(autouse=True)
def clean_plan():
    saved = dict(kernels.MATMUL_PLAN)
    kernels.MATMUL_PLAN.clear()
    yield
    kernels.MATMUL_PLAN.clear()
    kernels.MATMUL_PLAN.update(saved)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("pad", [0, 1, 7])
def test_every_form_is_the_same_product(rows, transposed, pad):
    mx.random.seed(rows)
    w = mx.random.normal((48, 40))
    x = mx.random.normal((1, rows, 40))
    kernels.MATMUL_PLAN[(48, 40, rows)] = (transposed, rows + pad)
    y = kernels.matmul_t(x, w)
    assert y.shape == (1, rows, 48)
    np.testing.assert_allclose(np.array(y), np.array(x @ w.T), rtol=1e-5, atol=1e-4)


def test_rows_beyond_the_plan_take_the_plain_product():
    w, x = mx.ones((8, 4)), mx.ones((kernels.MAX_PLANNED_ROWS + 1, 4))
    kernels.MATMUL_PLAN[(8, 4, kernels.MAX_PLANNED_ROWS + 1)] = (True, 99)  # never read
    assert kernels.matmul_t(x, w).shape == (kernels.MAX_PLANNED_ROWS + 1, 8)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $SPECSTREAM_HOME, the plan on, one timed repeat per measurement."""
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    monkeypatch.delenv("SPECSTREAM_MATMUL_PLAN", raising=False)
    monkeypatch.setattr(mp, "REPEATS", 1)
    return tmp_path


def _times(x_wt, w_xt):
    return {"x_wt": [x_wt(r) for r in mp.MEASURED_ROWS],
            "w_xt": [w_xt(r) for r in mp.MEASURED_ROWS]}


def test_choose_pads_up_to_a_cheaper_count_and_keeps_the_default_in_the_noise():
    # x @ W^T: 1 row 10, more rows 20 + r; W @ x^T: 2 rows 6 (cheaper than 1), 16 rows
    # 27.5 (cheaper than 8..15 rows any way), else 30 + r.
    plan = mp.choose(_times(lambda r: 10.0 if r == 1 else 20.0 + r,
                            lambda r: {2: 6.0, 16: 27.5}.get(r, 30.0 + r)))
    assert plan[1] == (True, 2)  # one row padded to two, transposed
    assert plan[2] == (True, 2)  # the default
    assert plan[5] == (False, 5)  # x @ W^T beats the transposed default
    assert plan[7] == (False, 7)
    for rows in range(8, 17):
        assert plan[rows] == (True, 16)
    assert plan[17] == (False, 20)  # unmeasured count: the next measured one
    assert set(plan) == set(range(1, kernels.MAX_PLANNED_ROWS + 1))
    assert all(padded >= rows for rows, (_, padded) in plan.items())
    # within MIN_GAIN of the default: the default stays
    flat = mp.choose(_times(lambda r: 10.0 * r, lambda r: 10.0 * r * (1 - mp.MIN_GAIN / 2)))
    assert all(flat[r] == (r > 1, r) for r in mp.MEASURED_ROWS)


def test_apply_measures_once_caches_and_fills_the_kernel_plan(home, monkeypatch):
    model = tiny_model("llama", streams=StreamArgs(num_streams=2, msa_layers=2,
                                                   draft_vocab_size=40))
    shapes = set(mp.weight_samples(model))
    # q/o, k/v, gate/up, down, the untied head, the draft head
    assert shapes == {(64, 64), (32, 64), (96, 64), (64, 96), (97, 64), (40, 64)}
    applied = mp.apply(model, verbose=False)
    assert set(applied) == shapes
    for shape in shapes:
        for rows in range(1, kernels.MAX_PLANNED_ROWS + 1):
            transposed, padded = kernels.MATMUL_PLAN[(*shape, rows)]
            assert padded >= rows
    saved = json.loads((home / "matmul.json").read_text())
    assert len(saved) == len(shapes)
    summary = mp.summary()
    assert set(summary) == {f"{o}x{i}" for o, i in shapes}
    forms = summary["97x64"].split()
    assert len(forms) == kernels.MAX_PLANNED_ROWS and forms[0][:2] == "1:"
    assert forms[0][2] in "xW" and int(forms[0][3:]) >= 1
    # a second model of the same shapes reads the cache: nothing is measured again
    kernels.MATMUL_PLAN.clear()
    monkeypatch.setattr(mp, "measure", lambda ws: pytest.fail("measured again"))
    assert mp.apply(model, verbose=False) == applied
    # and the plan changes no result
    x = mx.random.normal((1, 5, 64))
    w = model.layers[0].self_attn.q_proj.weight
    np.testing.assert_allclose(np.array(kernels.matmul_t(x, w)), np.array(x @ w.T),
                               rtol=1e-5, atol=1e-4)


def test_apply_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv("SPECSTREAM_MATMUL_PLAN", "off")
    assert mp.apply(tiny_model("qwen2"), verbose=False) == {}
    assert kernels.MATMUL_PLAN == {}
    assert not (tmp_path / "matmul.json").exists()


def test_a_stale_cache_entry_is_measured_again(home, monkeypatch):
    model = tiny_model("qwen2")
    mp.apply(model, verbose=False)
    path = home / "matmul.json"
    saved = json.loads(path.read_text())
    key = next(iter(saved))
    saved[key]["rows"] = [1, 2]  # another version's row set
    path.write_text(json.dumps(saved))
    calls = []
    real = mp.measure
    monkeypatch.setattr(mp, "measure", lambda ws: calls.append(ws[0].shape) or real(ws))
    mp.apply(model, verbose=False)
    assert len(calls) == 1
    assert json.loads(path.read_text())[key]["rows"] == list(mp.MEASURED_ROWS)


def test_measure_mode_replaces_the_cached_plan(home, monkeypatch):
    model = tiny_model("qwen2")
    mp.apply(model, verbose=False)
    n_shapes = len(mp.weight_samples(model))
    calls = []
    slow = {"x_wt": [1.0] * len(mp.MEASURED_ROWS), "w_xt": [2.0] * len(mp.MEASURED_ROWS)}
    monkeypatch.setattr(mp, "measure", lambda ws: calls.append(1) or slow)
    mp.apply(model, verbose=False)
    assert calls == []  # cached
    monkeypatch.setenv("SPECSTREAM_MATMUL_PLAN", "measure")
    plans = mp.apply(model, verbose=False)
    assert len(calls) == n_shapes
    # the new times (x @ W^T always faster) decide: untransposed, the next measured count
    assert all(p[r] == (False, min(m for m in mp.MEASURED_ROWS if m >= r))
               for p in plans.values() for r in p)
    saved = json.loads((home / "matmul.json").read_text())
    assert all(v["times"] == slow for v in saved.values())
