"""Validation of generation settings and prompts, in one place for the Python API and the
CLI: every bad value ends in an InputError (a ValueError) that names the argument."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from specstream_mlx.errors import InputError

# Upper bounds that keep a typo from allocating a tree or a context draft of millions.
MAX_TREE_BUDGET = 256
MAX_LOOKUP_DEPTH = 256
MAX_DRAFT_TOP_K = 64

# name: (kind, low, high, optional); kind "int" or "real"; bounds inclusive.
RULES = {
    "max_tokens": ("int", 1, None, False),
    "temp": ("real", 0.0, None, False),
    "top_p": ("real", 0.0, 1.0, False),
    "min_p": ("real", 0.0, 1.0, False),
    "top_k": ("int", 0, None, False),  # sampling, as mlx-lm names it
    "tree_budget": ("int", 0, MAX_TREE_BUDGET, True),
    "draft_top_k": ("int", 1, MAX_DRAFT_TOP_K, True),
    "lookup_depth": ("int", 0, MAX_LOOKUP_DEPTH, True),
    "corpus_depth": ("int", 0, MAX_LOOKUP_DEPTH, True),
    "min_draft_prob": ("real", 0.0, 1.0, True),
    "seed": ("int", 0, 2**63 - 1, True),
    "limit": ("int", 1, None, True),
    "batch_size": ("int", 1, None, False),
    "window": ("int", 1, None, False),
    "conversation": ("int", 0, None, False),
    "repeats": ("int", 1, None, False),
}


def _range(low, high) -> str:
    if high is None:
        return f">= {low}"
    return f"in [{low}, {high}]"


def check_value(name: str, value, label: str | None = None) -> None:
    """Raise InputError unless `value` obeys RULES[name]; `label` names it in the message
    (default: the argument's name; the CLI passes its flag)."""
    kind, low, high, optional = RULES[name]
    label = label or name
    if value is None:
        if optional:
            return
        raise InputError(f"{label} is required")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{label} must be a number, got {type(value).__name__} {value!r}")
    if kind == "int" and not isinstance(value, numbers.Integral):
        raise InputError(f"{label} must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{label} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise InputError(f"{label} must be {_range(low, high)}, got {value!r}")


def check_settings(label=None, **values) -> None:
    """check_value for every keyword; `label` maps a name to how the user spelled it."""
    for name, value in values.items():
        check_value(name, value, label(name) if label else None)


def check_text(prompt, name: str = "prompt") -> str:
    """A prompt given as text: str (UTF-8 bytes are decoded), not empty or blank."""
    if isinstance(prompt, bytes | bytearray):
        try:
            prompt = bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{name} is not valid UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
    if not isinstance(prompt, str):
        raise InputError(f"{name} must be a string or a list of token ids, got "
                         f"{type(prompt).__name__}")
    try:  # command-line bytes that are not UTF-8 arrive as lone surrogates
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{name} is not valid UTF-8 text (byte {e.start})") from None
    if not prompt.strip():
        raise InputError(f"the {name} is empty")
    return prompt


def check_token_ids(ids: Sequence, vocab_size: int, name: str = "prompt") -> list[int]:
    """Token ids as a list of ints, each in 0 .. vocab_size - 1 (an id outside the
    embedding table would read outside its memory)."""
    if isinstance(ids, str | bytes | bytearray) or not isinstance(ids, Sequence | np.ndarray):
        raise InputError(f"{name} must be a list of token ids, got {type(ids).__name__}")
    if len(ids) == 0:
        raise InputError(f"the {name} is empty")
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in ids):
        bad = next(t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral))
        raise InputError(f"{name}: token ids must be integers, got {bad!r}")
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise InputError(f"{name} must be a flat list of token ids")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise InputError(f"{name}: token id {int(arr[bad[0]])} at position {int(bad[0])} "
                         f"is outside the vocabulary (0..{vocab_size - 1})")
    return [int(t) for t in arr]


def check_output_path(path: str | Path | None, label: str) -> None:
    """Fail before the work starts, not after it, when a result cannot be written."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{label} {path} is a folder; give a file name")
    ancestor = path.parent.absolute()  # folders still missing are created when writing
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{label} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{label} {path} is not writable")


def parse_counts(text: str, label: str, low: int = 1, high: int = 256) -> list[int]:
    """"1,2,4" -> [1, 2, 4], each in low..high."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"{label} must be comma-separated integers, got {text!r}") from None
    if not all(low <= c <= high for c in counts):
        raise InputError(f"{label}: every count must be in [{low}, {high}], got {text!r}")
    return counts


def check_rows(rows, label: str = "rows") -> None:
    """A non-empty list of pass row counts, each in 1..256."""
    if not rows or not all(isinstance(r, int) and 1 <= r <= 256 for r in rows):
        raise InputError(f"{label} must be row counts in [1, 256], got {rows!r}")
