"""The tokenizer stored in a GGUF file's metadata, rebuilt as a transformers fast
tokenizer: byte-level BPE (vocabulary, merges, special and added tokens), llama.cpp's
pre-tokenizer split for the file's `tokenizer.ggml.pre`, BOS/EOS handling, the chat
template and the end-of-generation tokens. Also the metadata accessor the GGUF
converter shares.

    pre = check_tokenizer(metadata, path)    # metadata only: refuses what we cannot rebuild
    tokenizer = build_tokenizer(metadata, path)
    save_tokenizer(tokenizer, folder)

llama.cpp splits text into pieces with a list of regexes, one after the other (each
splits every piece the previous one left, keeping matches and the text between them),
then runs BPE inside each piece. `PRE_TOKENIZERS` maps each `tokenizer.ggml.pre` name
that llama.cpp's llama-vocab.cpp gives one of the regex lists below to that list, as
`tokenizers` Split pre-tokenizers (behavior "isolated") followed by the byte-level
mapping (no regex of its own). Names that llama.cpp maps elsewhere, an empty or
"default" name (llama.cpp's degraded fallback) and non-BPE vocabularies are refused.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from specstream_mlx.convert.output import write_json
from specstream_mlx.errors import ConversionError

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

# GPT-2's split (what ByteLevel(use_regex=True) does; llama.cpp's own GPT-2 splitter
# implements the same, the trailing `\s+` included).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Qwen2's tokenizer.json: letters keep one leading non-letter (".append", "(value"),
# digits one by one, newlines apart from other whitespace.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's tokenizer.json: as Qwen2's, with digits in runs of up to three.
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


@dataclass(frozen=True)
class PreTokenizer:
    """llama.cpp's handling of one family of `tokenizer.ggml.pre` names.

    splits: the regexes applied in turn; ignore_merges: a piece that is a whole token
    of the vocabulary becomes that token without BPE (Llama 3); add_bos:
    llama.cpp's default for adding BOS when `tokenizer.ggml.add_bos_token` is absent.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_FAMILIES = [
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), PreTokenizer((QWEN2_SPLIT,))),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
      "lfm2"), PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)),
    (("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3_SPLIT,))),
    # One digit per piece first, then GPT-2's split (SmolLM, StarCoder, ...).
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     PreTokenizer((r"\p{N}", GPT2_SPLIT))),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "gigachat", "mellum", "trillion",
      "granite-docling"), PreTokenizer((GPT2_SPLIT,))),
]
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    name: spec for names, spec in _FAMILIES for name in names
}

# Tokens llama.cpp ends a generation on, besides the eos/eot/eom ids the file names.
END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                     "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")

_REQUIRED = object()


def meta(metadata: dict[str, Any], key: str, path: Path, default: Any = _REQUIRED) -> Any:
    """One metadata value as a Python object (MLX's reader returns numbers as mx.array)."""
    if key not in metadata:
        if default is _REQUIRED:
            raise ConversionError(f"{path}: metadata key {key!r} is missing")
        return default
    value = metadata[key]
    return value.tolist() if hasattr(value, "tolist") else value


def check_tokenizer(metadata: dict[str, Any], path: Path, complete: bool = True
                    ) -> PreTokenizer | None:
    """The pre-tokenizer of a file whose tokenizer can be rebuilt exactly; raises
    ConversionError (one line) otherwise. Reads metadata only; complete=False checks
    only the keys present (the start of the header) and returns None."""
    if not complete and "tokenizer.ggml.model" not in metadata:
        return None
    kind = meta(metadata, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise ConversionError(
            f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2', byte-level BPE)"
        )
    if not complete and "tokenizer.ggml.pre" not in metadata:
        return None
    pre = meta(metadata, "tokenizer.ggml.pre", path, "default")
    if pre in ("", "default"):
        raise ConversionError(
            f"{path}: the file names no pre-tokenizer (tokenizer.ggml.pre is "
            f"{pre or 'empty'!r}), so llama.cpp itself splits text with a generic fallback "
            f"that degrades generation; re-convert the model with a current llama.cpp"
        )
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(
            f"{path}: pre-tokenizer {pre!r} is not supported (supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))})"
        )
    return PRE_TOKENIZERS[pre]


def build_tokenizer(metadata: dict[str, Any], path: Path):
    """Rebuild the GGUF tokenizer as a transformers fast tokenizer.

    Vocabulary from `tokenizer.ggml.tokens` (id = index), merges from
    `tokenizer.ggml.merges` ("a b"), CONTROL tokens as special added tokens and
    USER_DEFINED ones as plain added tokens (llama.cpp matches both whole in text).
    """
    from transformers import PreTrainedTokenizerFast  # slow import; only needed here

    def get(key: str, default: Any = _REQUIRED) -> Any:
        return meta(metadata, key, path, default)

    pre = check_tokenizer(metadata, path)
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

    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False,
                                     ignore_merges=pre.ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer(pre)
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
        bos if get("tokenizer.ggml.add_bos_token", pre.add_bos) else None,
        eos if get("tokenizer.ggml.add_eos_token", False) else None,
        vocab,
    )
    arch = get("general.architecture", "llama")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding"),
        model_max_length=get(f"{arch}.context_length", 2048),
        clean_up_tokenization_spaces=False,
    )
    if (template := get("tokenizer.chat_template", None)) is not None:
        fast.chat_template = template
    return fast


def pre_tokenizer(pre: PreTokenizer) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's regex splits, then bytes mapped to GPT-2's printable characters."""
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                          use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])


def end_of_generation_ids(metadata: dict[str, Any], path: Path) -> list[int]:
    """Token ids that end a generation as llama.cpp ends it: the eos, eot and eom ids of
    the metadata, then the vocabulary's control tokens named as end tokens (Qwen's
    `<|im_end|>` and `<|endoftext|>`, Llama 3's `<|eot_id|>`, ...). Eos first."""
    tokens: list[str] = meta(metadata, "tokenizer.ggml.tokens", path)
    types: list[int] = meta(metadata, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    ids = [meta(metadata, f"tokenizer.ggml.{name}_token_id", path, None)
           for name in ("eos", "eot", "eom")]
    ids += [i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
            if kind == CONTROL and t in END_OF_GENERATION]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _added_tokens(tokens: list[str], types: list[int], kind: int) -> list[AddedToken]:
    return [AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == kind]


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
