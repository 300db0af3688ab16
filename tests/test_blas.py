"""The BLAS preload: an OpenBLAS built for instructions this CPU lacks is never loaded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from specstream_mlx import blas

AVX2_CPU = {"sse4_2", "avx", "avx2", "fma"}
AVX512_CPU = AVX2_CPU | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}


def test_avx512_build_refused_on_avx2_cpu():
    reason = blas.unsupported_reason("OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4",
                                     "SKYLAKEX", AVX2_CPU)
    assert reason is not None
    assert "SKYLAKEX" in reason and "avx512f" in reason and "0.3.29" in reason


def test_builds_accepted_where_they_run():
    assert blas.unsupported_reason("OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX", "SKYLAKEX",
                                   AVX512_CPU) is None
    assert blas.unsupported_reason("OpenBLAS 0.3.29 NO_AFFINITY ZEN", "ZEN", AVX2_CPU) is None
    assert blas.unsupported_reason("OpenBLAS 0.3.29 NO_AFFINITY ZEN", "ZEN", AVX512_CPU) is None


def test_avx2_build_refused_without_avx2():
    assert blas.unsupported_reason("OpenBLAS 0.3.29 NO_AFFINITY ZEN", "ZEN",
                                   {"sse4_2", "avx"}) is not None


def test_dynamic_arch_and_unknown_cores_are_trusted():
    assert blas.unsupported_reason("OpenBLAS 0.3.30 DYNAMIC_ARCH NO_AFFINITY Haswell",
                                   "SKYLAKEX", AVX2_CPU) is None
    assert blas.unsupported_reason("OpenBLAS 0.3.30 NO_AFFINITY NEOVERSEN1", "NEOVERSEN1",
                                   set()) is None
    assert blas.unsupported_reason("OpenBLAS 0.3.31 SKYLAKEX", "SKYLAKEX", None) is None


def test_loaded_library_runs_on_this_cpu():
    """What this process loaded agrees with the check of the installed OpenBLAS."""
    path = blas.find_openblas()
    info = blas.blas_info()
    if path is None or not sys.platform.startswith("linux"):
        assert not info.startswith("OpenBLAS")
        return
    try:
        config, core = blas._build_of(path)
    except OSError:  # libgfortran.so.5 missing: never loaded
        assert not info.startswith("OpenBLAS")
        return
    if blas.unsupported_reason(config, core, blas.cpu_flags()) is not None:
        assert not info.startswith("OpenBLAS")


def test_a_tuned_blas_is_loaded_when_one_is_installed():
    usable, _ = blas.candidates()
    if not sys.platform.startswith("linux"):
        pytest.skip("BLAS libraries are chosen on Linux only")
    if "SPECSTREAM_BLAS" in os.environ:
        pytest.skip("SPECSTREAM_BLAS forces the library: there is no choice to check")
    if usable:
        assert blas.blas_name() in usable, blas.blas_info()
    else:
        assert "reference BLAS" in blas.blas_info()


def test_choice_is_the_fastest_and_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    calls = []

    def fake_probe(path, env=None):
        calls.append(str(path))
        return {"a": (10.0, 30.0), "b": (12.0, 20.0)}[str(path)]

    monkeypatch.setattr(blas, "probe", fake_probe)
    usable = {"x": (Path("a"), "X 1"), "y": (Path("b"), "Y 2")}
    assert blas.choose(usable, "2")[0] == "y"  # 32 ms against 40
    assert blas.choose(usable, "2")[0] == "y" and len(calls) == 2  # cached: no new probe
    blas.choose(usable, "1")  # another thread count is another machine setting
    assert len(calls) == 4
    assert blas.choose({}, "2") == (None, {})


def test_failed_probe_is_never_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSTREAM_HOME", str(tmp_path))
    monkeypatch.setattr(blas, "probe", lambda p, env=None: None if str(p) == "a" else (9, 9))
    assert blas.choose({"x": (Path("a"), "X"), "y": (Path("b"), "Y")}, "2")[0] == "y"


def test_probe_times_a_real_library():
    usable, _ = blas.candidates()
    if not usable:
        pytest.skip("no tuned BLAS (MKL, OpenBLAS) usable on this machine to probe")
    path, _ = next(iter(usable.values()))
    one, four = blas.probe(path)
    assert 0 < one and 0 < four


def test_importing_mlx_first_is_reported_once():
    """An app that imports mlx before specstream_mlx is told why it runs slowly."""
    code = ("import warnings; warnings.simplefilter('always'); import mlx.core; "
            "import specstream_mlx; from specstream_mlx.blas import blas_info; "
            "print(blas_info())")
    env = {k: v for k, v in os.environ.items() if k != "SPECSTREAM_BLAS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert "mlx was imported before specstream_mlx" in out.stdout
        assert out.stderr.count("import specstream_mlx before mlx") == 1
