"""The BLAS preload: an OpenBLAS built for instructions this CPU lacks is never loaded."""

import os
import sys

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
    """What this process loaded agrees with the check of the installed library."""
    path = blas.find_openblas()
    info = blas.blas_info()
    if path is None or not sys.platform.startswith("linux"):
        assert not info.startswith("OpenBLAS")
        return
    config, core = blas._build_of(path)
    expected = blas.unsupported_reason(config, core, blas.cpu_flags())
    if expected is None and "SPECSTREAM_BLAS" not in os.environ:
        assert info.startswith("OpenBLAS") and core in info
    elif expected is not None:
        assert "reference BLAS" in info and expected in info
