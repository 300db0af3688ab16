"""Prompt caches on disk: the K/V of conversation prefixes, kept across restarts.

A `DiskPromptStore` is a folder of safetensors files, one per entry: the token ids
(`tokens`, int32) and every layer's `keys.{i}` / `values.{i}` (1, kv_heads, n, head_dim)
for those tokens. The header's metadata says what the file is for and what it holds:

    format       "specstream-prompt-cache/1"
    fingerprint  the base model's (model_fingerprint: config, a sample of every base
                 weight, the KV layout and dtype; not the streams, which never change
                 a committed token's K/V); another model's files are skipped
    tokens, layers, dtype, data_bytes, sha256 (of everything after the header)

A file is written to a temporary name, flushed to disk and renamed, so a final name
never holds half a file; one cut short all the same (a crash of the machine, a full
disk, a copy) is found by its size at the scan and by its checksum before use, logged
and removed, never loaded. The folder is bounded in bytes: the least recently used
files (by mtime, so the order survives a restart) go first, another model's included.

`PromptCache(model, disk=DiskPromptStore(folder, model))` consults it when its memory
holds no longer prefix, and hands every finished generation to it. Writing happens on
a thread of its own: the caller only copies the K/V to host memory (a memcpy; MLX work
stays on the caller's thread), so a response never waits for the disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from specstream_mlx.decoding.cache import KVCache, kv_bytes_per_token, kv_dtype, kv_layout
from specstream_mlx.errors import InputError

log = logging.getLogger("specstream.prompt_cache")

FORMAT = "specstream-prompt-cache/1"
SUFFIX = ".safetensors"
# safetensors names of the dtypes a cache may hold; numpy has no bfloat16, so its bits
# travel as uint16 and are viewed back in MLX.
DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16),
          "bfloat16": ("BF16", np.uint16)}
SAMPLES = 16  # values read from each weight for the fingerprint
STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a crash


class BadEntry(Exception):
    """A cache file that must not be used (its reason is the message)."""


def model_fingerprint(model) -> str:
    """What a cache file must match to be used with `model`: its config, the names,
    shapes, dtypes and SAMPLES evenly spaced values of every base weight (a fine-tune
    changes nearly every value, so samples tell models apart without reading
    gigabytes), and the KV layout and dtype. Not the streams: main rows never see them
    (a task-mode fine-tune is fused into the base weights), so the cache of a prompt is
    the same with any streams or none, and `specstream tune --write` or new streams keep
    the files usable."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": vars(model.args),
                         "kv_layout": kv_layout(model), "kv_dtype": str(kv_dtype(model))},
                        sort_keys=True, default=str).encode())
    params = sorted(((name, v) for name, v in tree_flatten(model.parameters())
                     if not name.startswith("streams.")), key=lambda p: p[0])
    samples = []
    for name, v in params:
        h.update(f"{name} {v.shape} {v.dtype}\n".encode())
        at = mx.array(np.linspace(0, v.size - 1, min(SAMPLES, v.size)).astype(np.uint32))
        s = mx.take(v.reshape(-1), at)
        samples.append(s.astype(mx.float32) if mx.issubdtype(s.dtype, mx.floating) else s)
    mx.eval(samples)
    for s in samples:
        h.update(np.array(s).tobytes())
    return h.hexdigest()


@dataclass
class Entry:
    """One file of the folder."""

    name: str
    tokens: np.ndarray | None  # int32; None for a file of another model
    nbytes: int
    used: float  # last use (the file's mtime)


def _read_header(f: BinaryIO, size: int) -> tuple[dict, dict, int]:
    """(metadata, tensor table, where the data starts) of an open safetensors file of
    `size` bytes; BadEntry when it is not one of ours or is cut short."""
    head = f.read(8)
    if len(head) < 8:
        raise BadEntry(f"cut short ({size} bytes, no header)")
    n = struct.unpack("<Q", head)[0]
    if n > min(size - 8, 1 << 24):
        raise BadEntry(f"cut short ({size} bytes, a header of {n})")
    try:
        table = json.loads(f.read(n))
        meta = table.pop("__metadata__")
        data_bytes = int(meta["data_bytes"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadEntry(f"not a prompt cache file ({e})") from None
    if meta.get("format") != FORMAT:
        raise BadEntry(f"format {meta.get('format')!r}, not {FORMAT!r}")
    if size != 8 + n + data_bytes:
        raise BadEntry(f"cut short ({size} of {8 + n + data_bytes} bytes)")
    return meta, table, 8 + n


class DiskPromptStore:
    """Entries in `folder` for `model`, at most `max_bytes` of files (least recently used
    out); generations shorter than `min_tokens` are not written (a prefill of a few
    tokens costs less than reading a file)."""

    def __init__(self, folder: str | Path, model, max_bytes: int = 2 << 30,
                 min_tokens: int = 32, max_pending: int = 4):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InputError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create the prompt cache folder {folder}: {e}") from None
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self.layout, self.dtype = kv_layout(model), kv_dtype(model)
        self.token_bytes = kv_bytes_per_token(model)
        self.fingerprint = model_fingerprint(model)
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._pending: queue.Queue = queue.Queue(maxsize=max_pending)
        self._writer: threading.Thread | None = None
        self.loads = self.writes = self.skipped = 0
        self._scan()

    # --- the folder ----------------------------------------------------------------

    def _scan(self) -> None:
        """Index the folder's files: ours by their tokens, another model's only by size
        (they still count against max_bytes); broken ones are logged and removed."""
        now = time.time()
        for path in self.folder.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name:
                try:
                    if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                        path.unlink()
                except OSError:
                    pass
                continue
            if path.suffix != SUFFIX or not path.is_file():
                continue
            try:
                stat = path.stat()
                with open(path, "rb") as f:
                    meta, table, start = _read_header(f, stat.st_size)
                    tokens = None
                    if meta.get("fingerprint") == self.fingerprint:
                        lo, hi = table["tokens"]["data_offsets"]
                        f.seek(start + lo)
                        tokens = np.frombuffer(f.read(hi - lo), dtype=np.int32)
                        if len(tokens) != int(meta["tokens"]):
                            raise BadEntry(f"{len(tokens)} token ids, not {meta['tokens']}")
                    else:
                        self.skipped += 1
                        log.warning("prompt cache: %s skipped: written for another model",
                                    path.name)
            except (BadEntry, OSError, KeyError, TypeError, ValueError) as e:
                self._discard(path, e)
                continue
            self._entries[path.name] = Entry(path.name, tokens, stat.st_size, stat.st_mtime)
        with self._lock:
            self._evict()

    def _discard(self, path: Path, reason) -> None:
        self.skipped += 1
        log.warning("prompt cache: %s skipped and removed: %s", path.name, reason)
        try:
            path.unlink()
        except OSError:
            pass

    def _evict(self, keep: str | None = None) -> None:
        """Remove the least recently used files beyond max_bytes (under the lock)."""
        total = sum(e.nbytes for e in self._entries.values())
        for e in sorted(self._entries.values(), key=lambda e: e.used):
            if total <= self.max_bytes:
                break
            if e.name == keep:
                continue
            self._remove(e)
            total -= e.nbytes

    def _remove(self, e: Entry) -> None:
        self._entries.pop(e.name, None)
        try:
            (self.folder / e.name).unlink()
        except OSError:
            pass

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    # --- reading -------------------------------------------------------------------

    def best(self, tokens: Sequence[int]) -> tuple[Entry | None, int]:
        """The entry of this model sharing the longest prefix with `tokens`, and its
        length."""
        query = np.asarray(tokens, dtype=np.int64)
        best, best_len = None, 0
        with self._lock:
            for e in self._entries.values():
                if e.tokens is None:
                    continue
                n = min(len(e.tokens), len(query))
                diff = np.flatnonzero(e.tokens[:n] != query[:n])
                common = int(diff[0]) if diff.size else n
                if common > best_len:
                    best, best_len = e, common
        return best, best_len

    def worth(self, entry: Entry, keep: int) -> bool:
        """Whether reusing `keep` of the entry's tokens pays for reading its file: at
        least min_tokens and a quarter of the file (two conversations that share only a
        system prompt are not worth a read of the other's whole K/V)."""
        return keep >= self.min_tokens and 4 * keep >= len(entry.tokens)

    def load(self, entry: Entry) -> KVCache | None:
        """The K/V of `entry` as a cache holding all its tokens, read whole and checked
        (size, checksum, fingerprint, layout) before any array is made; None, with a log
        line and the file removed, when it does not pass."""
        path = self.folder / entry.name
        try:
            data = path.read_bytes()  # the header again: the file may have changed
            meta, table, start = _read_header(io.BytesIO(data), len(data))
            body = memoryview(data)[start:]
            if hashlib.sha256(body).hexdigest() != meta.get("sha256"):
                raise BadEntry("checksum mismatch")
            if meta.get("fingerprint") != self.fingerprint:
                raise BadEntry("written for another model")
            cache = self._arrays(meta, table, body)
        except FileNotFoundError:
            with self._lock:
                self._entries.pop(entry.name, None)
            return None
        except (BadEntry, OSError, KeyError, TypeError, ValueError) as e:
            with self._lock:
                self._entries.pop(entry.name, None)
            self._discard(path, e)
            return None
        now = time.time()
        entry.used = now
        try:
            os.utime(path, (now, now))  # least recently used order across restarts
        except OSError:
            pass
        self.loads += 1
        return cache

    def _arrays(self, meta: dict, table: dict, body: memoryview) -> KVCache:
        n, layers = int(meta["tokens"]), len(self.layout)
        name = meta["dtype"]
        if name != str(self.dtype).rpartition(".")[2] or int(meta["layers"]) != layers:
            raise BadEntry(f"a cache of {meta['layers']} layers in {name}, not {layers} in "
                           f"{self.dtype}")
        code, np_dtype = DTYPES[name]
        cache = KVCache(layers)
        for i, (heads, dim) in enumerate(self.layout):
            for kind, store in (("keys", cache.keys), ("values", cache.values)):
                t = table[f"{kind}.{i}"]
                if t["dtype"] != code or t["shape"] != [1, heads, n, dim]:
                    raise BadEntry(f"{kind}.{i} is {t['dtype']} {t['shape']}, not "
                                   f"{code} {[1, heads, n, dim]}")
                lo, hi = t["data_offsets"]
                a = np.frombuffer(body[lo:hi], dtype=np_dtype).reshape(1, heads, n, dim)
                arr = mx.array(a)
                store[i] = arr.view(mx.bfloat16) if name == "bfloat16" else arr
        mx.eval(cache.state())
        cache.offset = n
        return cache

    # --- writing -------------------------------------------------------------------

    def save(self, tokens: Sequence[int], cache: KVCache) -> bool:
        """Queue the K/V of `tokens` (the first cache.offset of them) for writing; False
        when it is not written: too short, too large, already held by a longer entry,
        or too many writes pending. Copies the arrays to host memory here, on the
        caller's thread; a writer thread does the rest."""
        n = min(len(tokens), cache.offset)
        if n < self.min_tokens or n * self.token_bytes > self.max_bytes:
            return False
        ids = np.asarray(tokens[:n], dtype=np.int32)
        with self._lock:
            for e in self._entries.values():
                if (e.tokens is not None and len(e.tokens) >= n
                        and np.array_equal(e.tokens[:n], ids)):
                    e.used = time.time()  # a longer entry holds these: freshen it
                    return False
        name = str(self.dtype).rpartition(".")[2]
        if name not in DTYPES:
            return False
        arrays = []
        for a in cache.keys + cache.values:
            a = a[..., :n, :]
            arrays.append(a.view(mx.uint16) if name == "bfloat16" else a)
        mx.eval(arrays)
        arrays = [np.array(a) for a in arrays]
        try:
            self._pending.put_nowait((ids, arrays, name))
        except queue.Full:
            log.info("prompt cache: a write skipped, %d pending", self._pending.maxsize)
            return False
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name="specstream-cache-writer")
            self._writer.start()
        return True

    def _write_loop(self) -> None:
        while (job := self._pending.get()) is not None:
            try:
                self._write(*job)
            except Exception:  # a full disk must not end the writer
                log.exception("prompt cache: writing an entry failed")
            finally:
                self._pending.task_done()
        self._pending.task_done()

    def _write(self, ids: np.ndarray, arrays: list[np.ndarray], dtype: str) -> None:
        code = DTYPES[dtype][0]
        layers = len(arrays) // 2
        names = ["tokens"] + [f"keys.{i}" for i in range(layers)] + [
            f"values.{i}" for i in range(layers)]
        parts = [ids] + arrays
        table, offset, digest = {}, 0, hashlib.sha256()
        for name, a in zip(names, parts, strict=True):
            a = np.ascontiguousarray(a)
            table[name] = {"dtype": "I32" if name == "tokens" else code,
                           "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
            offset += a.nbytes
            digest.update(a.data)
        table["__metadata__"] = {"format": FORMAT, "fingerprint": self.fingerprint,
                                 "tokens": str(len(ids)), "layers": str(layers),
                                 "dtype": dtype, "data_bytes": str(offset),
                                 "sha256": digest.hexdigest()}
        header = json.dumps(table).encode()
        header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
        key = hashlib.sha256(self.fingerprint.encode() + ids.tobytes()).hexdigest()[:32]
        final = self.folder / (key + SUFFIX)
        tmp = self.folder / f".{key}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(header)) + header)
                for a in parts:
                    f.write(np.ascontiguousarray(a).data)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the name says so
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        entry = Entry(final.name, ids, 8 + len(header) + offset, time.time())
        with self._lock:
            # Entries whose tokens this one extends serve no lookup better: drop them.
            for e in list(self._entries.values()):
                if (e.tokens is not None and e.name != entry.name and len(e.tokens) <= len(ids)
                        and np.array_equal(e.tokens, ids[: len(e.tokens)])):
                    self._remove(e)
            self._entries[entry.name] = entry
            self._evict(keep=entry.name)
        self.writes += 1

    def flush(self) -> None:
        """Wait until every queued write is on disk."""
        self._pending.join()

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread."""
        if self._writer is not None:
            self._pending.put(None)
            self._writer.join(timeout=60)
            self._writer = None
