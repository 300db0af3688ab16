"""Stream sets shipped in the package, and the rule that gives a model folder without
streams of its own the set trained on its base model.

    found = find_shipped(folder)            # the set trained on this model, or None
    install(found, folder, ConversionError) # checked, then written into the folder
    attach_fitting(staging, shown=out)      # `specstream convert`: both, and one line
    path, config = streams_source(folder, config)  # `load`: the set read in place

Each set is a folder `specstream_mlx/assets/<name>/`:

    streams.safetensors   the trained streams (checkpoint.py's format)
    config.json           {"speculative_streaming": {...}}: their block, tuned settings included
    corpus.npy            optional: the datastore of corpus drafts
    drafting_priors.json  optional: the controller's starting beliefs (decoding/priors.py)
    fits.json             the base model the streams were trained on (write_fits)

fits.json holds the config.json fields stream tensors depend on (FIT_FIELDS, head_dim
resolved) and a fingerprint of the tokenizer: a sha256 of its vocabulary (token -> id
pairs, sorted, as the fast tokenizer gives them, added tokens included) and of its added
tokens. Never of the weights: the same model as a Hugging Face folder, an MLX folder or
a GGUF file of any quantization has the same fingerprint, while another family, size or
vocabulary does not. A match by fingerprint is then checked against the streams file
itself (shapes, draft-vocabulary ids, corpus ids) before anything is attached, so a
broken set is refused with one line instead of failing deep in a matmul.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from specstream_mlx.checkpoint import (
    CONFIG_KEY,
    CORPUS_FILE,
    PRIORS_FILE,
    RETIRED_TENSORS,
    STREAMS_FILE,
    read_corpus,
    write_json_atomic,
)
from specstream_mlx.errors import ConversionError, ModelLoadError, SpecstreamError
from specstream_mlx.models import get_classes, read_config
from specstream_mlx.models.config import StreamArgs

ASSETS = Path(__file__).parent / "assets"
FITS_FILE = "fits.json"
SET_FILES = (STREAMS_FILE, CORPUS_FILE, PRIORS_FILE)  # copied into a folder, when present
# The config.json fields the stream tensors' shapes depend on (head_dim resolved), plus the
# family. Not tie_word_embeddings: streams use whichever head the model has, and a GGUF
# may carry an untied copy of a tied head (Qwen2.5-Coder's does).
FIT_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")
MAX_SET_BYTES = 16 * 2**20  # what one set may weigh in the package (issue 37)


@dataclass(frozen=True)
class ShippedSet:
    """One packaged stream set: its folder, the model it fits (fits.json, {} when the
    folder has none) and the name shown to users."""

    path: Path
    fits: dict

    @classmethod
    def at(cls, path: Path) -> ShippedSet:
        """The set in `path` (fits.json optional: the embedded model's set is chosen by
        folder, not found by fingerprint)."""
        file = path / FITS_FILE
        fits = json.loads(file.read_text()) if file.is_file() else {}
        return cls(path, fits)

    @property
    def name(self) -> str:
        return self.fits.get("name") or self.path.name

    @property
    def block(self) -> dict:
        """The streams' `speculative_streaming` block (their shape and tuned settings)."""
        try:
            block = json.loads((self.path / "config.json").read_text())[CONFIG_KEY]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{self.path / 'config.json'}: no {CONFIG_KEY!r} block "
                                 f"({e!r})") from None
        return block


def shipped_sets(root: Path | None = None) -> list[ShippedSet]:
    """Every set under `root` (default ASSETS) that has streams and a readable fits.json."""
    root = ASSETS if root is None else root
    sets = []
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        if (path / FITS_FILE).is_file() and (path / STREAMS_FILE).is_file():
            try:
                sets.append(ShippedSet.at(path))
            except (OSError, ValueError) as e:  # our packaging bug: say so, run plainly
                print(f"specstream: ignoring {path / FITS_FILE}: {e}", file=sys.stderr)
    return sets


# --- fingerprints ------------------------------------------------------------------------


def config_fields(config: dict) -> dict:
    """The FIT_FIELDS of a config.json (head_dim as hidden_size // heads when unstated:
    Hugging Face leaves it out, our GGUF import writes it)."""
    fields = {key: config.get(key) for key in FIT_FIELDS}
    if fields["head_dim"] is None and config.get("hidden_size") and config.get(
            "num_attention_heads"):
        fields["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    if fields["num_key_value_heads"] is None:  # as BaseArgs: one KV head per query head
        fields["num_key_value_heads"] = config.get("num_attention_heads")
    return fields


def _vocabulary(folder: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(token -> id over the whole vocabulary, added token -> id) of the folder's fast
    tokenizer: tokenizer.json through `tokenizers` (well under a second for 150k tokens),
    else whatever transformers builds a fast tokenizer from (vocab.json, tokenizer.model)."""
    file = folder / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(file))
        added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        return tok.get_vocab(with_added_tokens=True), added
    from transformers import AutoTokenizer  # slow import; only for folders without the file

    fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    return fast.get_vocab(), {t.content: i for i, t in fast.added_tokens_decoder.items()}


def tokenizer_fingerprint(folder: Path) -> str | None:
    """"sha256:..." of the folder's vocabulary and added tokens; None without a tokenizer
    that loads.

    Left out, so that one model gives one fingerprint whichever file it came from:
    llama.cpp's `[PAD<id>]` fillers (a GGUF pads its vocabulary to the embedding's rows
    with tokens named after their own id; Hugging Face has no token there) and the added
    tokens' `special` flags (llama.cpp marks `<|fim_prefix|>` and the like as control
    tokens, Qwen's tokenizer_config.json does not). Ids and strings are what the streams
    depend on.
    """
    try:
        vocab, added = _vocabulary(folder)
    except Exception:  # no tokenizer, or one that does not load: nothing can match it
        return None

    def real(pairs: dict[str, int]) -> list[tuple[str, int]]:
        return sorted((t, i) for t, i in pairs.items() if t != f"[PAD{i}]")

    text = json.dumps({"vocab": real(vocab), "added": real(added)}, ensure_ascii=False,
                      separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(folder: Path) -> dict:
    """What fits.json records of a model folder: its FIT_FIELDS and its tokenizer's
    fingerprint (config.json and tokenizer files only; no weights are read)."""
    return {"config": config_fields(read_config(folder)),
            "tokenizer": tokenizer_fingerprint(folder)}


def find_shipped(folder: Path, config: dict | None = None,
                 root: Path | None = None) -> ShippedSet | None:
    """The shipped set trained on the model in `folder`, or None. The config fields are
    compared first, so a folder of another shape never pays for reading its tokenizer."""
    config = read_config(folder) if config is None else config
    fields = config_fields(config)
    candidates = [s for s in shipped_sets(root) if s.fits.get("config") == fields]
    if not candidates:
        return None
    tokenizer = tokenizer_fingerprint(folder)
    return next((s for s in candidates if tokenizer and s.fits.get("tokenizer") == tokenizer),
                None)


def has_own_streams(folder: Path, config: dict) -> bool:
    """A folder with a streams file or a streams block keeps it (the loader checks that
    the two agree)."""
    return CONFIG_KEY in config or (folder / STREAMS_FILE).exists()


# --- checking and attaching ----------------------------------------------------------------


def check_fit(shipped: ShippedSet, config: dict,
              error: type[SpecstreamError] = ConversionError) -> None:
    """Raise `error` (one line) unless the set's streams fit the model of `config`: its
    block valid for the model, every tensor of the streams file there with the shape the
    model needs (hidden size, layers, heads), draft-vocabulary and corpus ids inside the
    vocabulary. Builds the model lazily: nothing is computed."""
    file = shipped.path / STREAMS_FILE
    prefix = f"the shipped streams of {shipped.name} ({shipped.path.name}) do not fit"
    try:
        with _same_random_state():  # lazy initialisers still draw keys
            model_cls, args_cls = get_classes(config["model_type"])
            model = model_cls(args_cls.from_dict(config))
            model.attach_streams(StreamArgs.from_dict(shipped.block))
    except (SpecstreamError, KeyError, TypeError) as e:
        raise error(f"{prefix}: {e}") from None
    expected = {f"streams.{k}": v.shape for k, v in tree_flatten(model.streams.parameters())}
    try:
        tensors = {k: v for k, v in mx.load(str(file)).items() if k not in RETIRED_TENSORS}
    except Exception as e:
        raise error(f"{prefix}: cannot read {file} ({e})") from None
    for key, shape in expected.items():
        if key not in tensors:
            raise error(f"{prefix}: {file.name} has no tensor {key!r}")
        if tuple(tensors[key].shape) != tuple(shape):
            raise error(f"{prefix}: {file.name}'s {key!r} is {tuple(tensors[key].shape)}, the "
                        f"model needs {tuple(shape)}")
    if extra := sorted(set(tensors) - set(expected)):
        raise error(f"{prefix}: {file.name}'s {extra[0]!r} is not part of the streams its "
                    f"block describes")
    vocab = config["vocab_size"]
    ids = tensors.get("streams.draft_vocab")
    if ids is not None and (mx.issubdtype(ids.dtype, mx.floating) or ids.size == 0
                            or ids.min().item() < 0 or ids.max().item() >= vocab):
        raise error(f"{prefix}: its draft vocabulary holds ids outside 0..{vocab - 1}")
    if (shipped.path / CORPUS_FILE).is_file():
        try:
            read_corpus(shipped.path / CORPUS_FILE, vocab)
        except ModelLoadError as e:
            raise error(f"{prefix}: {e}") from None


@contextmanager
def _same_random_state() -> Iterator[None]:
    """Leave MLX's global random key as it was: checking a set inside `load` must not
    change what a seeded caller (training) draws next. The key is two uint32 words, the
    ones `mx.random.seed` sets from a 64-bit seed."""
    hi, lo = (int(v) for v in mx.random.state[0].tolist())
    try:
        yield
    finally:
        mx.random.seed((hi << 32) | lo)


def copy_if_changed(source: Path, folder: Path) -> None:
    """Copy `source` into `folder` through a temporary file renamed into place (a reader
    never sees half a file); an identical copy is left alone."""
    target = folder / source.name
    if not target.is_file() or target.read_bytes() != source.read_bytes():
        tmp = folder / f".tmp-{os.getpid()}-{source.name}"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def install(shipped: ShippedSet, folder: Path,
            error: type[SpecstreamError] = ConversionError) -> Path:
    """Check the set against the model in `folder`, then write it there: its files
    (each atomically, unchanged ones untouched), then the block into config.json (last,
    atomically: the folder has streams once the block says so). Returns `folder`."""
    config = read_config(folder)
    check_fit(shipped, config, error)
    for name in SET_FILES:
        if (shipped.path / name).is_file():
            copy_if_changed(shipped.path / name, folder)
    block = shipped.block
    if config.get(CONFIG_KEY) != block:  # new streams or new decoding defaults
        write_json_atomic(folder / "config.json", {**config, CONFIG_KEY: block})
    return folder


def _fitting(folder: Path, config: dict, error: type[SpecstreamError]) -> ShippedSet | None:
    """The checked set for a folder without streams of its own; None (one line on stderr
    when a set matched but its streams do not fit) otherwise."""
    if has_own_streams(folder, config):
        return None
    shipped = find_shipped(folder, config)
    if shipped is None:
        return None
    try:
        check_fit(shipped, config, error)
    except SpecstreamError as e:
        print(f"specstream: {e}; not attached", file=sys.stderr)
        return None
    return shipped


def attach_fitting(folder: Path, shown: Path | None = None) -> ShippedSet | None:
    """`specstream convert`'s last step: a converted folder (ours to write) without
    streams receives the shipped set that fits it, and one line says so (naming `shown`,
    the folder's final path, when `folder` is its staging copy)."""
    config = read_config(folder)
    shipped = _fitting(folder, config, ConversionError)
    if shipped is not None:
        install(shipped, folder, ConversionError)
        print(f"attached the shipped streams of {shipped.name} to {shown or folder}",
              file=sys.stderr)
    return shipped


def streams_source(folder: Path, config: dict) -> tuple[Path, dict]:
    """Where `load` reads streams, corpus and priors from, and the config to read them
    with: the folder and its config; for a folder without streams that a shipped set
    fits, that set's folder and the config with its block, with one line on stderr. The
    user's folder is never written: convert it to keep the streams with it."""
    shipped = _fitting(folder, config, ModelLoadError)
    if shipped is None:
        return folder, config
    print(f"{folder} has no streams of its own: using the shipped streams of {shipped.name} "
          f"(in memory; `specstream convert` writes them into a folder)", file=sys.stderr)
    return shipped.path, {**config, CONFIG_KEY: shipped.block}


def write_fits(folder: Path, set_dir: Path, name: str | None = None) -> dict:
    """Write `set_dir`/fits.json describing the model in `folder` (the model its streams
    were trained on), check the set's streams against it when there are any, and return
    what was written."""
    fits = {"name": name or set_dir.name, **fingerprint(folder)}
    if fits["tokenizer"] is None:
        raise ConversionError(f"{folder}: no tokenizer to fingerprint")
    set_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(set_dir / FITS_FILE, fits)
    if (set_dir / STREAMS_FILE).is_file():
        check_fit(ShippedSet.at(set_dir), read_config(folder))
    return fits


def set_size(shipped: ShippedSet) -> int:
    """Bytes a set attaches to a folder (streams, corpus, priors): at most MAX_SET_BYTES."""
    return sum((shipped.path / n).stat().st_size for n in SET_FILES
               if (shipped.path / n).is_file())
