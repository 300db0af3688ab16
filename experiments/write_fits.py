"""Write the fits.json of a shipped stream set: the base model its streams were trained on.

    python experiments/write_fits.py FOLDER ASSET_DIR [--name NAME]

FOLDER is any copy of that model (a Hugging Face folder, an MLX folder, a GGUF file
converted with `specstream convert`): fits.json records its config.json fields that
stream shapes depend on and its tokenizer's fingerprint, never its weights
(specstream_mlx/shipped.py), so every copy of the model matches. ASSET_DIR is the set's
folder, e.g. specstream_mlx/assets/qwen2.5-coder-0.5b-instruct/; when it already holds
streams.safetensors and config.json, they are checked against FOLDER's model, and the
set's size against the package limit.

    python experiments/write_fits.py ~/.cache/specstream_mlx/SmolLM2-135M-Instruct \\
        specstream_mlx/assets/smollm2-135m-instruct --name SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from specstream_mlx.errors import SpecstreamError
from specstream_mlx.shipped import MAX_SET_BYTES, ShippedSet, find_shipped, set_size, write_fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a model folder of the base model")
    parser.add_argument("asset_dir", type=Path, help="the stream set's folder")
    parser.add_argument("--name", default=None,
                        help="the model's name shown to users (default: ASSET_DIR's name)")
    args = parser.parse_args(argv)
    try:
        fits = write_fits(args.folder, args.asset_dir, args.name)
    except SpecstreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(fits, indent=2))
    size = set_size(ShippedSet.at(args.asset_dir))
    print(f"{args.asset_dir}: {size / 2**20:.1f} MiB attached to a folder "
          f"(limit {MAX_SET_BYTES / 2**20:.0f} MiB)", file=sys.stderr)
    if size > MAX_SET_BYTES:
        print("error: the set is over the package limit", file=sys.stderr)
        return 1
    if (args.asset_dir / "streams.safetensors").is_file():  # the set must find its model
        found = find_shipped(args.folder, root=args.asset_dir.parent)
        if found is None or found.path.resolve() != args.asset_dir.resolve():
            print(f"error: {args.folder} does not find the set it describes", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
