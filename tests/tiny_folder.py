"""Tiny model folders on disk, as `load()` reads them: config.json, model.safetensors,
a byte-level BPE tokenizer with a chat template and, optionally, streams.

    folder = make_tiny_folder(tmp_path / "m", streams=StreamArgs(num_streams=3))
    model, tokenizer = load(folder)

The tokenizer has exactly the tiny model's 97 ids, so every generated id decodes:
0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|> (eos), then 94 single byte-level characters
(space and newline as GPT-2's "Ġ" and "Ċ", printable ASCII without "`" and "~"). No merges.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from conftest import TINY_CONFIGS, tiny_model
from mlx.utils import tree_flatten

from specstream_mlx.checkpoint import init_streams, save_streams
from specstream_mlx.models.config import StreamArgs

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = ["Ġ", "Ċ"] + [chr(c) for c in range(33, 127) if chr(c) not in "`~"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOS_ID = 2


def save_tokenizer(folder: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json of the tiny byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    assert len(vocab) == TINY_CONFIGS["llama"]["vocab_size"]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def save_model(model: nn.Module, folder: Path, config: dict, dtype=None) -> None:
    """Base weights (no streams) in model.safetensors, and config.json."""
    weights = {
        k: (v.astype(dtype) if dtype is not None and mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in tree_flatten(model.parameters())
        if not k.startswith("streams.")
    }
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def make_tiny_folder(
    folder: Path,
    name: str = "llama",
    seed: int = 0,
    streams: StreamArgs | None = None,
    dtype=None,
    quantize: dict | None = None,
) -> tuple[Path, nn.Module]:
    """A loadable tiny model folder; returns it and the in-memory model it holds.

    streams: attach fresh streams (init_streams) and save them beside the weights.
    dtype: store the weights in this dtype (default float32).
    quantize: e.g. {"group_size": 32, "bits": 4}: nn.quantize the model before saving
    and record the block in config.json, as mlx-lm does.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model(name, seed)
    config = dict(TINY_CONFIGS[name])
    if quantize is not None:
        nn.quantize(model, group_size=quantize["group_size"], bits=quantize["bits"])
        config["quantization"] = dict(quantize)
    save_model(model, folder, config, dtype)
    save_tokenizer(folder)
    if streams is not None:
        init_streams(model, streams, seed=seed)
        save_streams(model, folder)
    return folder, model
