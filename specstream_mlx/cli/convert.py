"""Convert a Hugging Face checkpoint, an MLX folder or a GGUF file into a specstream model.

    specstream convert --hf-path Qwen/Qwen2.5-0.5B-Instruct --mlx-path qwen-4bit -q \\
        --init-streams 3,4 --q-keep-high streams,embeddings,head
"""

from __future__ import annotations

import argparse
import sys
import time

from specstream_mlx.convert.hf import ADAPTER_MODES, ConvertOptions, convert
from specstream_mlx.convert.output import folder_size
from specstream_mlx.convert.quantize import BITS, DTYPES, GROUP_SIZES, KEEP_HIGH_PARTS, QuantPolicy
from specstream_mlx.errors import ConversionError


def _streams(text: str) -> tuple[int, int]:
    """'3,4' -> (3, 4): gamma streams in the top N_s layers."""
    try:
        gamma, n_s = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected gamma,N_s (e.g. 3,4), got {text!r}") from None
    return gamma, n_s


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if unknown := [p for p in parts if p not in KEEP_HIGH_PARTS]:
        raise argparse.ArgumentTypeError(
            f"unknown part {unknown[0]!r}; choose from {','.join(KEEP_HIGH_PARTS)}"
        )
    return parts


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-path", required=True,
                        help="Hugging Face folder or hub id, MLX folder, or .gguf file")
    parser.add_argument("--mlx-path", default="mlx_model",
                        help="output folder (default: mlx_model)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, default=4, choices=BITS,
                        help="bits per weight (default: 4)")
    parser.add_argument("--q-group-size", type=int, default=64, choices=GROUP_SIZES,
                        help="weights sharing one scale and bias (default: 64)")
    parser.add_argument("--q-keep-high", type=_parts, default=(), metavar="PARTS",
                        help="keep these at --q-high-bits: comma list of "
                             f"{','.join(KEEP_HIGH_PARTS)} (stream tensors are never quantized)")
    parser.add_argument("--q-high-bits", default=None, choices=[*map(str, BITS), "float"],
                        help="bits of the --q-keep-high parts (default: 8, or float for 8-bit)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="float type of the weights (default: config.json's torch_dtype)")
    parser.add_argument("--init-streams", type=_streams, default=None, metavar="GAMMA,N_S",
                        help="add fresh streams: GAMMA streams in the top N_S layers")
    parser.add_argument("--msa-layers", type=int, default=None, metavar="N_S",
                        help="layers carrying the checkpoint's stream tensors, when its "
                             "config.json does not say")
    parser.add_argument("--adapter-path", default=None, help="PEFT LoRA adapter folder or hub id")
    parser.add_argument("--adapter-mode", choices=ADAPTER_MODES, default="fused",
                        help="fused: into the weights (task mode); streams: stream-only "
                             "adapters, main stream unchanged (lossless mode)")
    parser.add_argument("--seed", type=int, default=0, help="seed of fresh streams (default: 0)")
    parser.add_argument("--no-shipped-streams", dest="shipped_streams", action="store_false",
                        help="do not attach the package's trained streams to an output "
                             "without streams (attached when its base model has some)")
    parser.add_argument("--force", action="store_true", help="replace an existing --mlx-path")


def quant_policy(args: argparse.Namespace) -> QuantPolicy | None:
    """The -q flags as a QuantPolicy; None without -q."""
    if not args.quantize:
        if args.q_keep_high or args.q_high_bits is not None:
            raise ConversionError("--q-keep-high and --q-high-bits need -q/--quantize")
        return None
    high = args.q_high_bits or ("8" if args.q_bits < 8 else "float")
    return QuantPolicy(bits=args.q_bits, group_size=args.q_group_size,
                       keep_high=args.q_keep_high, high_bits=None if high == "float" else int(high))


def main(args: argparse.Namespace) -> int:
    options = ConvertOptions(
        dtype=args.dtype,
        quantize=quant_policy(args),
        init_streams=args.init_streams,
        msa_layers=args.msa_layers,
        adapter_path=args.adapter_path,
        adapter_mode=args.adapter_mode,
        seed=args.seed,
        shipped_streams=args.shipped_streams,
    )
    start = time.perf_counter()
    out = convert(args.hf_path, args.mlx_path, options, force=args.force)
    seconds = time.perf_counter() - start
    size = folder_size(out) / 2**20
    print(f"converted {args.hf_path} -> {out} ({size:.1f} MiB) in {seconds:.1f} s",
          file=sys.stderr)
    return 0
