"""JSON files: JSONL (one record per line: prompt sets, training data, distilled answers)
and single-object config files, each bad file a clear error."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from pathlib import Path

from specstream_mlx.errors import InputError


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSONL file, gzip-compressed when its name ends in .gz (blank lines
    skipped); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" \
            else path.read_bytes()
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e})") from e
    return records


def read_prompts(path: str | Path, limit: int | None = None,
                 turns: bool = True) -> list[dict]:
    """The first `limit` records (all: None) of a prompt file; there must be at least one,
    and each must be an object with either a 'prompt' text or (with `turns`) 'turns', the
    user's messages of a conversation in order (a non-empty list of non-empty texts).
    `turns=False` is for callers that take single prompts: they refuse a 'turns' record
    by name rather than measure its first message unnoticed."""
    records = read_jsonl(path)[:limit]
    wanted = "a 'prompt' field" + (" or 'turns'" if turns else "")
    if not records:
        raise InputError(f"{path}: need records with {wanted}")
    for i, r in enumerate(records, start=1):
        if not isinstance(r, dict) or not ("turns" in r or isinstance(r.get("prompt"), str)):
            raise InputError(f"{path}: need records with {wanted} (record {i} is not one)")
        if "turns" not in r:
            continue
        if "prompt" in r:
            raise InputError(f"{path}: record {i} has both 'prompt' and 'turns': give one")
        if not turns:
            raise InputError(f"{path}: record {i} is multi-turn ('turns'): this tool takes "
                             "records with a 'prompt' field only")
        t = r["turns"]
        if not (isinstance(t, list) and t and all(isinstance(m, str) and m for m in t)):
            raise InputError(f"{path}: record {i}: 'turns' must be a non-empty list of "
                             "non-empty texts (the user's messages in order)")
    return records


def user_turns(record: dict) -> list[str]:
    """The user's messages of a read_prompts record: its 'turns', or its one 'prompt'."""
    return record["turns"] if "turns" in record else [record["prompt"]]


def prompt_id(record: dict, index: int) -> str:
    """A record's name in reports: its 'id' (else its index), with '#turnN' for a
    conversation of N > 1 turns, measured at its last."""
    name = str(record.get("id", index))
    n = len(record.get("turns") or ())
    return f"{name}#turn{n}" if n > 1 else name


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write `records` as UTF-8 JSONL (folders created); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return len(lines)


def read_json_object(path: Path, error: type[Exception]) -> dict:
    """The JSON object in `path`; `error` (the caller's user-facing type) names the file
    when it is not valid JSON or holds another JSON value (a list, a number, ...)."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value
