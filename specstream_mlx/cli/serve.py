"""Serve the model over HTTP: OpenAI's chat and text completions, Anthropic's Messages."""

from __future__ import annotations

import argparse
import sys

from specstream_mlx.errors import InputError
from specstream_mlx.loader import PRECISIONS, describe_model, load


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model folder or hub id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' on "
                        "every endpoint but /health")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait for the model; one more gets 429")
    parser.add_argument("--max-batch", type=int, default=4,
                        help="requests decoding together, speculation on (continuous "
                        "batching; 1: one at a time)")
    parser.add_argument("--max-tokens-limit", type=int, default=4096,
                        help="the most tokens one request may ask for")
    parser.add_argument("--prompt-cache-mb", type=int, default=1024,
                        help="memory for the KV caches of recent conversations")
    parser.add_argument("--prompt-cache-dir", default=None,
                        help="keep the KV of conversations in this folder across restarts")
    parser.add_argument("--prompt-cache-disk-mb", type=int, default=2048,
                        help="disk for --prompt-cache-dir (least recently used out)")
    parser.add_argument("--max-kv-mb", type=int, default=None,
                        help="KV cache one request may take; a request whose prompt and "
                        "max_tokens need more gets 400 (default: the whole context's, at "
                        "most half the memory left beside the weights, divided by "
                        "--max-batch)")


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from specstream_mlx.serve.app import ServeConfig, create_app
    except ImportError:
        raise InputError("serve needs its extra: pip install 'specstream-mlx[serve]'") from None
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    for flag in ("max_queue", "max_batch", "max_tokens_limit", "prompt_cache_mb",
                 "prompt_cache_disk_mb", "max_kv_mb"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is empty")
    model, tokenizer = load(args.model, precision=args.precision)
    print(f"[{describe_model(model)}]", file=sys.stderr)
    config = ServeConfig(model_name=args.model or "smollm2-135m-instruct",
                         api_key=args.api_key, max_queue=args.max_queue,
                         max_batch=args.max_batch,
                         max_tokens_limit=args.max_tokens_limit,
                         prompt_cache_bytes=args.prompt_cache_mb << 20,
                         prompt_cache_dir=args.prompt_cache_dir,
                         prompt_cache_disk_bytes=args.prompt_cache_disk_mb << 20,
                         max_kv_bytes=None if args.max_kv_mb is None else args.max_kv_mb << 20)
    app = create_app(model, tokenizer, config)
    budget = app.state.kv_budget
    print(f"[KV cache per request: at most {budget.max_bytes / 2**20:.0f} MB, "
          f"{budget.per_token / 1024:.1f} KB a token, context {budget.context} tokens]",
          file=sys.stderr)
    print(f"serving on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
