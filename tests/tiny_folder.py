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
# Qwen2.5's chat template, verbatim: it renders tools, assistant tool calls and tool
# results, and asks for calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
TOOLS_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim)
EOS_ID = 2


def save_tokenizer(folder: Path, chat_template: str = CHAT_TEMPLATE) -> None:
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
    fast.chat_template = chat_template
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
    chat_template: str = CHAT_TEMPLATE,
) -> tuple[Path, nn.Module]:
    """A loadable tiny model folder; returns it and the in-memory model it holds.

    streams: attach fresh streams (init_streams) and save them beside the weights.
    dtype: store the weights in this dtype (default float32).
    quantize: e.g. {"group_size": 32, "bits": 4}: nn.quantize the model before saving
    and record the block in config.json, as mlx-lm does.
    chat_template: the tokenizer's (TOOLS_CHAT_TEMPLATE: one with tools).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model(name, seed)
    config = dict(TINY_CONFIGS[name])
    if quantize is not None:
        nn.quantize(model, group_size=quantize["group_size"], bits=quantize["bits"])
        config["quantization"] = dict(quantize)
    save_model(model, folder, config, dtype)
    save_tokenizer(folder, chat_template)
    if streams is not None:
        init_streams(model, streams, seed=seed)
        save_streams(model, folder)
    return folder, model
