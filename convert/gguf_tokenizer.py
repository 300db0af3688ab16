"""The tokenizer stored in a GGUF file's metadata, rebuilt as a transformers fast
tokenizer (byte-level BPE: vocabulary, merges, special and added tokens, llama.cpp's
pre-tokenizer split, BOS/EOS handling, chat template), and the metadata accessor the
GGUF converter shares."""

from __future__ import annotations

import collections
import json
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from specstream_mlx.convert.output import write_json
from specstream_mlx.errors import ConversionError

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) whose split regex we reproduce.
# llama.cpp splits these with "\p{N}" then the GPT-2 regex: one digit per piece first.
DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}
GPT2_PRE = {"gpt2", "mpt", "olmo", "jais"}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

_REQUIRED = object()


def meta(metadata: dict[str, Any], key: str, path: Path, default: Any = _REQUIRED) -> Any:
    """One metadata value as a Python object (MLX returns numbers as mx.array)."""
    if key not in metadata:
        if default is _REQUIRED:
            raise ConversionError(f"{path}: metadata key {key!r} is missing")
        return default
    value = metadata[key]
    return value.tolist() if isinstance(value, mx.array) else value


def build_tokenizer(metadata: dict[str, Any], path: Path):
    """Rebuild the GGUF tokenizer as a transformers fast tokenizer.

    Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported: vocabulary
    from `tokenizer.ggml.tokens` (id = index), merges from `tokenizer.ggml.merges`
    ("a b"), CONTROL and USER_DEFINED tokens as added tokens (CONTROL ones special).
    """
    from transformers import PreTrainedTokenizerFast  # slow import; only needed here

    def get(key: str, default: Any = _REQUIRED) -> Any:
        return meta(metadata, key, path, default)

    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(
            f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2', byte-level BPE)"
        )
    tokens: list[str] = get("tokenizer.ggml.tokens")
    types: list[int] = get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        duplicate = next(t for t, n in collections.Counter(tokens).items() if n > 1)
        raise ConversionError(f"{path}: token {duplicate!r} appears twice in the vocabulary")
    merges = []
    for merge in get("tokenizer.ggml.merges"):
        pair = tuple(merge.split(" "))
        if len(pair) != 2:
            raise ConversionError(f"{path}: merge {merge!r} is not two tokens")
        merges.append(pair)

    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(get("tokenizer.ggml.pre", "default"), path)
    tokenizer.decoder = decoders.ByteLevel()
    # Ids are kept: these tokens are already in the vocabulary.
    tokenizer.add_special_tokens(_added_tokens(tokens, types, CONTROL))
    tokenizer.add_tokens(_added_tokens(tokens, types, USER_DEFINED))

    def token(name: str) -> str | None:
        token_id = get(f"tokenizer.ggml.{name}_token_id", None)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ConversionError(f"{path}: {name} token id {token_id} is not in the vocabulary")
        return None if token_id is None else tokens[token_id]

    bos, eos = token("bos"), token("eos")
    tokenizer.post_processor = _post_processor(
        bos if get("tokenizer.ggml.add_bos_token", False) else None,
        eos if get("tokenizer.ggml.add_eos_token", False) else None,
        vocab,
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding"),
        model_max_length=get("llama.context_length", 2048),
        clean_up_tokenization_spaces=False,
    )
    if (template := get("tokenizer.chat_template", None)) is not None:
        fast.chat_template = template
    return fast


def _added_tokens(tokens: list[str], types: list[int], kind: int) -> list[AddedToken]:
    return [AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == kind]


def _pre_tokenizer(pre: str, path: Path) -> pre_tokenizers.PreTokenizer:
    """The Hugging Face pre-tokenizer matching llama.cpp's split for `tokenizer.ggml.pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in GPT2_PRE:
        warnings.warn(
            f"{path.name}: pre-tokenizer {pre!r} is not known; splitting text with the GPT-2 "
            f"regex, which may tokenize some text differently from llama.cpp",
            stacklevel=4,
        )
    return byte_level


def _post_processor(
    bos: str | None, eos: str | None, vocab: dict[str, int]
) -> processors.PostProcessor:
    """Adds BOS/EOS around encoded text when the GGUF file asks for it."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None and eos is None:
        return byte_level
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = single + " " + single.replace(":0", ":1").replace("$A", "$B")
    specials = [(t, vocab[t]) for t in (bos, eos) if t]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return processors.Sequence([byte_level, template])


# --- writing ---------------------------------------------------------------------------


def save_tokenizer(tokenizer, folder: Path) -> None:
    """`save_pretrained`, with the chat template and class name every version reads.

    transformers 5 writes the template to `chat_template.jinja` and the class as
    `TokenizersBackend`, which transformers 4 cannot load; `PreTrainedTokenizerFast`
    and a `chat_template` key load in both.
    """
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    template_file = folder / "chat_template.jinja"
    if template_file.exists():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
        template_file.unlink()
    write_json(config_path, config)
