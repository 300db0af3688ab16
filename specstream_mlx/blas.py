"""Which BLAS MLX's CPU backend multiplies with, and the faster one when it is there.

MLX's Linux CPU wheel links a reference BLAS whose matmul time grows linearly with the
rows of a pass, which erases the point of verifying a draft tree in one pass. OpenBLAS
(the `cmeel-openblas` wheel) keeps a pass of a few rows close to the cost of one row.
Loading it with RTLD_GLOBAL before `mlx.core` makes MLX's BLAS symbols resolve to it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_STATE = {"library": None, "reason": "not on Linux"}


def find_openblas() -> Path | None:
    """libopenblas.so.0 of the cmeel-openblas wheel, if installed."""
    for entry in sys.path:
        candidate = Path(entry) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if candidate.is_file():
            return candidate
    return None


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
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:  # typically libgfortran.so.5 missing (apt install libgfortran5)
        _STATE["reason"] = f"OpenBLAS failed to load: {e}"
        return
    _STATE["library"] = str(path)


def blas_info() -> str:
    """A line saying which BLAS the CPU backend uses, and why."""
    if _STATE["library"]:
        threads = os.environ.get("OPENBLAS_NUM_THREADS")
        return f"OpenBLAS ({threads} threads)"
    if not sys.platform.startswith("linux"):
        return "the platform's BLAS"
    return f"MLX's reference BLAS ({_STATE['reason']})"
