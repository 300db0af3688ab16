"""The distribution: one wheel holding the runtime, the converters and the models, and a
ruff-clean tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_convert_and_models_into_the_package(tmp_path):
    # Built from a copy: an in-tree build leaves build/ behind, whose stale modules a
    # later build would package again.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", "work", ".git", "*.egg-info", "__pycache__", ".venv", "venv"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
         "-q", "-w", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("specstream_mlx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ["__init__.py", "decoding/step.py", "cli/__init__.py", "tools/bench.py",
                   "training/train.py", "convert/gguf.py", "checkpoint.py",
                   "models/decoder.py", "models/llama.py", "models/qwen2.py"]:
        assert f"specstream_mlx/{module}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "specstream = specstream_mlx.cli:main" in zipfile.ZipFile(wheel).read(
        entry_points
    ).decode()


def test_public_api_is_small():
    import specstream_mlx

    assert sorted(specstream_mlx.__all__) == [
        "GenerationResponse", "generate", "load", "stream_generate"
    ]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean():
    result = subprocess.run(["ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
