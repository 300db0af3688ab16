"""Which BLAS MLX's CPU backend multiplies with, and the faster one when it is there.

MLX's Linux CPU wheel links a reference BLAS whose matmul time grows linearly with the
rows of a pass, which erases the point of verifying a draft tree in one pass. OpenBLAS
(the `cmeel-openblas` wheel) keeps a pass of a few rows close to the cost of one row.
Loading it with RTLD_GLOBAL before `mlx.core` makes MLX's BLAS symbols resolve to it.
A cmeel-openblas wheel is built for one CPU family (0.3.31: SKYLAKEX, AVX-512; 0.3.29:
ZEN, AVX2), so the library's target is checked against this CPU first: an AVX-512 build
dies with SIGILL on an AVX2-only CPU.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_STATE = {"library": None, "build": "", "reason": "not on Linux"}


def find_openblas() -> Path | None:
    """libopenblas.so.0 of the cmeel-openblas wheel, if installed."""
    for entry in sys.path:
        candidate = Path(entry) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if candidate.is_file():
            return candidate
    return None


# Instruction sets each single-target OpenBLAS core needs (`openblas_get_corename()`).
_CORE_NEEDS = {
    "SANDYBRIDGE": {"avx"},
    "HASWELL": {"avx2", "fma"},
    "ZEN": {"avx2", "fma"},
    "SKYLAKEX": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"},
    "COOPERLAKE": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_bf16"},
    "SAPPHIRERAPIDS": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd",
                       "avx512_bf16"},
}


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags from /proc/cpuinfo, or None when it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def unsupported_reason(config: str, core: str, flags: set[str] | None) -> str | None:
    """Why an OpenBLAS build cannot run on this CPU, or None when it can.

    config: `openblas_get_config()`, e.g. "OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX"; core:
    `openblas_get_corename()`. A DYNAMIC_ARCH build picks its kernels at run time.
    """
    needs = _CORE_NEEDS.get(core.upper())
    if "DYNAMIC_ARCH" in config or needs is None or flags is None:
        return None
    missing = sorted(needs - flags)
    if not missing:
        return None
    return (f"{config.split(' NO_')[0]} is built for {core} only and this CPU lacks "
            f"{', '.join(missing)} (pip install 'cmeel-openblas==0.3.29', an AVX2 build)")


def _build_of(path: Path) -> tuple[str, str]:
    """(config, core name) of an OpenBLAS library, loaded locally (no symbols exported)."""
    lib = ctypes.CDLL(str(path))
    lib.openblas_get_config.restype = ctypes.c_char_p
    lib.openblas_get_corename.restype = ctypes.c_char_p
    return lib.openblas_get_config().decode(), lib.openblas_get_corename().decode()


def preload_openblas() -> None:
    """Load OpenBLAS globally before MLX, unless SPECSTREAM_BLAS=reference or too late."""
    if not sys.platform.startswith("linux"):
        return
    if os.environ.get("SPECSTREAM_BLAS", "").lower() == "reference":
        _STATE["reason"] = "SPECSTREAM_BLAS=reference"
        return
    if "mlx.core" in sys.modules:
        _STATE["reason"] = "mlx was imported before specstream_mlx"
        return
    path = find_openblas()
    if path is None:
        _STATE["reason"] = "cmeel-openblas is not installed (pip install cmeel-openblas)"
        return
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
    try:
        config, core = _build_of(path)
        reason = unsupported_reason(config, core, cpu_flags())
        if reason:
            _STATE["reason"] = reason
            return
        # A second dlopen with RTLD_GLOBAL promotes the library to the global scope.
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except (OSError, AttributeError) as e:  # OSError: typically libgfortran.so.5 missing
        _STATE["reason"] = f"OpenBLAS failed to load: {e}"
        return
    _STATE["library"] = str(path)
    _STATE["build"] = f"{config.split(' NO_')[0]} {core}"


def blas_info() -> str:
    """A line saying which BLAS the CPU backend uses, and why."""
    if _STATE["library"]:
        threads = os.environ.get("OPENBLAS_NUM_THREADS")
        return f"{_STATE['build']} ({threads} threads)"
    if not sys.platform.startswith("linux"):
        return "the platform's BLAS"
    return f"MLX's reference BLAS ({_STATE['reason']})"
