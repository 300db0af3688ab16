"""specstream-mlx: Speculative Streaming on MLX, one model drafting and verifying itself.

    from specstream_mlx import load, stream_generate
    model, tokenizer = load()          # the embedded SmolLM2-135M-Instruct
    for r in stream_generate(model, tokenizer, "Hello!", max_tokens=64):
        print(r.text, end="")
"""

from specstream_mlx.blas import preload

preload()  # must precede the first import of mlx.core

from specstream_mlx.generate import GenerationResponse, generate, stream_generate  # noqa: E402
from specstream_mlx.loader import load  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "GenerationResponse"]
__version__ = "0.1.0"
