"""Which BLAS MLX's CPU backend multiplies with: the fastest one installed, chosen by
measurement once per machine and loaded before `mlx.core`.

MLX's Linux CPU wheel links a reference BLAS that is ~10x slower than a tuned one and
whose matmul time grows linearly with the rows of a pass. Loading a tuned library with
RTLD_GLOBAL before `mlx.core` makes MLX's `cblas_*` symbols resolve to it. Candidates:

* MKL (the `mkl` wheel, a dependency on Linux x86-64): needs no system library;
* OpenBLAS (the `openblas` extra, `cmeel-openblas`): needs the system's libgfortran5.
  Each cmeel-openblas wheel is built for one CPU family (0.3.31: SKYLAKEX, AVX-512;
  0.3.29: ZEN, AVX2), so its target is checked against this CPU first: an AVX-512 build
  dies with SIGILL on an AVX2-only CPU.

Every candidate is timed in its own subprocess (the sgemm shapes of a decode pass: one
row, and a few rows in the orientation models/kernels.py uses for them), so a library that
loses never enters this process; the choice is cached in $SPECSTREAM_HOME/blas.json.
SPECSTREAM_BLAS=mkl|openblas|reference forces a choice.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

_STATE = {"name": "reference", "library": None, "build": "", "reason": "not on Linux"}

# A decode pass in miniature: x (rows, K) times W (N, K)^T for weights that do not fit
# in the CPU's caches; one row as C = x W^T, several rows as C^T = W x^T. Prints the
# milliseconds of both. argv: library path, kind ("mkl" or "openblas").
_PROBE = r"""
import ctypes, sys, time
lib = ctypes.CDLL(sys.argv[1])
K, N, n_mats = 1024, 3072, 12
f = ctypes.c_float
def buf(n):
    b = (f * n)()
    ctypes.memset(b, 0x3F, ctypes.sizeof(b))  # 0.747..., no zero pages, no denormals
    return b
W = [buf(N * K) for _ in range(n_mats)]
x, c = buf(8 * K), buf(8 * N)
sgemm = lib.cblas_sgemm
sgemm.argtypes = [ctypes.c_int] * 6 + [f, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                  ctypes.c_int, f, ctypes.c_void_p, ctypes.c_int]
ROW, NO, T = 101, 111, 112
def one(rows):
    for w in W:
        if rows == 1:
            sgemm(ROW, NO, T, 1, N, K, 1.0, x, K, w, K, 0.0, c, N)
        else:
            sgemm(ROW, NO, T, N, rows, K, 1.0, w, K, x, K, 0.0, c, rows)
def ms(rows):
    one(rows)
    best = []
    for _ in range(7):
        t = time.perf_counter(); one(rows); best.append(time.perf_counter() - t)
    return sorted(best)[3] * 1000
print(ms(1), ms(4))
"""


def find_openblas() -> Path | None:
    """libopenblas.so.0 of the cmeel-openblas wheel, if installed."""
    for entry in sys.path:
        candidate = Path(entry) / "cmeel.prefix" / "lib" / "libopenblas.so.0"
        if candidate.is_file():
            return candidate
    return None


def find_mkl() -> Path | None:
    """libmkl_rt.so.* of the `mkl` wheel (installed under the prefix's lib/), if any."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libmkl_rt.so"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
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


def _cpuinfo(key: str) -> str | None:
    """The first /proc/cpuinfo value of `key`, or None when it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags from /proc/cpuinfo, or None when it cannot be read."""
    flags = _cpuinfo("flags")
    return set(flags.split()) if flags is not None else None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor()


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


def candidates() -> tuple[dict[str, tuple[Path, str]], dict[str, str]]:
    """Usable tuned libraries {name: (path, build)} and why others are not usable."""
    usable, refused = {}, {}
    if (mkl := find_mkl()) is not None:
        usable["mkl"] = (mkl, f"MKL {importlib.metadata.version('mkl')}")
    else:
        refused["mkl"] = "the mkl wheel is not installed (pip install mkl)"
    if (path := find_openblas()) is None:
        refused["openblas"] = "cmeel-openblas is not installed"
    else:
        try:
            config, core = _build_of(path)
            reason = unsupported_reason(config, core, cpu_flags())
        except (OSError, AttributeError) as e:  # typically libgfortran.so.5 missing
            reason = f"OpenBLAS failed to load: {e}"
        if reason:
            refused["openblas"] = reason
        else:
            usable["openblas"] = (path, f"{config.split(' NO_')[0]} {core}")
    return usable, refused


def probe(path: Path, env: dict | None = None) -> tuple[float, float] | None:
    """(ms for one row, ms for four rows) of the probe's sgemm set, in a subprocess; None
    when the library cannot run it."""
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True,
                             text=True, timeout=120, env=env)
        one, four = (float(v) for v in out.stdout.split())
        return one, four
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


def cache_file(name: str = "blas.json") -> Path:
    """A per-machine measurement file: in $SPECSTREAM_HOME, else the user's cache folder."""
    if home := os.environ.get("SPECSTREAM_HOME"):
        return Path(home) / name
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specstream_mlx" / name


def machine_key() -> str:
    """What a measurement of matrix products depends on: CPU, cores, BLAS, MLX version
    (the prefix of matmul_plan's and pass_curve's cache keys). Call after mlx.core loads."""
    import mlx.core as mx  # loaded by then; importing it at the top would fix the BLAS

    return f"{cpu_model()} | {os.cpu_count()} cores | {blas_info()} | mlx {mx.__version__}"


def choose(usable: dict[str, tuple[Path, str]], threads: str) -> tuple[str | None, dict]:
    """The fastest usable library by the probe (sum of the one-row and four-row times),
    cached per machine and set of libraries. Returns (name or None, probe times)."""
    if not usable:
        return None, {}
    key = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
           "libraries": {n: f"{p} {b}" for n, (p, b) in sorted(usable.items())}}
    cache = cache_file()
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["choice"], saved["times"]
    except (OSError, ValueError, KeyError):
        pass
    env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    times = {n: t for n, (p, _) in usable.items() if (t := probe(p, env)) is not None}
    choice = min(times, key=lambda n: sum(times[n])) if times else None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "choice": choice, "times": times}, indent=1))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs a probe per process
    return choice, times


def preload() -> None:
    """Load the fastest BLAS globally before MLX (see the module docstring)."""
    if not sys.platform.startswith("linux"):
        return
    forced = os.environ.get("SPECSTREAM_BLAS", "").lower()
    if forced == "reference":
        _STATE["reason"] = "SPECSTREAM_BLAS=reference"
        return
    if "mlx.core" in sys.modules:
        _STATE["reason"] = "mlx was imported before specstream_mlx"
        warnings.warn(
            "mlx was imported before specstream_mlx, so MLX keeps its slow reference BLAS "
            "(plain decoding ~3x slower, speculative passes much more): import "
            "specstream_mlx before mlx", stacklevel=3)
        return
    threads = str(os.cpu_count() or 1)
    usable, refused = candidates()
    if forced in usable:
        name = forced
    elif forced:
        _STATE["reason"] = f"SPECSTREAM_BLAS={forced}: {refused.get(forced, 'unknown')}"
        return
    else:
        name, _ = choose(usable, threads)
    if name is None:
        _STATE["reason"] = "; ".join(refused.values()) or "no tuned BLAS passed the probe"
        return
    os.environ.setdefault("OPENBLAS_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    path, build = usable[name]
    try:  # a second dlopen with RTLD_GLOBAL promotes a loaded library to the global scope
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        _STATE["reason"] = f"{build} failed to load: {e}"
        return
    _STATE.update(name=name, library=str(path), build=build)


def blas_info() -> str:
    """A line saying which BLAS the CPU backend uses, and why."""
    if _STATE["library"]:
        var = "MKL_NUM_THREADS" if _STATE["name"] == "mkl" else "OPENBLAS_NUM_THREADS"
        return f"{_STATE['build']} ({os.environ.get(var)} threads)"
    if not sys.platform.startswith("linux"):
        return "the platform's BLAS"
    return f"MLX's reference BLAS ({_STATE['reason']})"


def blas_name() -> str:
    """"mkl", "openblas", "reference" or "platform"."""
    if not sys.platform.startswith("linux"):
        return "platform"
    return _STATE["name"] if _STATE["library"] else "reference"
