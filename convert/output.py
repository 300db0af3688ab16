"""Writing a converted model folder atomically, shared by every converter.

    check_target(out, force)            # fail early, before any work
    with staging_folder(out) as staging:
        ...write files into staging...
        install(staging, out, force)    # one rename: `out` is complete or absent

The staging folder is a hidden sibling of the target (same file system, so the final
rename is atomic); it is removed when the block raises.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from specstream_mlx.errors import ConversionError


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing `target` unless `force` (checked again at `install`)."""
    if target.exists() and not force:
        raise ConversionError(f"{target} exists; pass force=True (--force) to replace it")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def folder_size(folder: Path) -> int:
    """Bytes in the files of `folder` (not recursive: model folders are flat)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A fresh hidden sibling of `target`, removed if the block raises."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def install(staging: Path, target: Path, force: bool) -> None:
    """Rename the finished `staging` folder to `target`.

    Without force, a `target` that appeared meanwhile (another process converting the
    same file) is left alone. With force, the old `target` is moved aside first and
    deleted only once the new one is in place.
    """
    old = None
    if target.exists():
        check_target(target, force)
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError as e:
        if target.exists():  # another process's folder (or, with force, its newer one)
            remove(old)
            raise ConversionError(
                f"{target} exists; pass force=True (--force) to replace it"
            ) from None
        if old is not None:
            os.rename(old, target)
        raise ConversionError(f"cannot move the converted model to {target}: {e}") from None
    remove(old)


def remove(path: Path | None) -> None:
    """Delete a file or folder tree; None and missing paths are ignored."""
    if path is None:
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
