"""Parity of our GGUF import with an independent one, on the real Qwen2.5-Coder file.

    python experiments/qwen/fetch_gguf.py                       # the file, once
    specstream convert --hf-path work/qwen/qwen2.5-coder-0.5b-instruct.gguf \\
        --mlx-path work/qwen/mlx                                 # our import
    python -m venv work/refenv && work/refenv/bin/pip install torch==2.13.0 transformers gguf numpy
    python experiments/qwen/parity.py                            # both sides, then the diff

The reference is transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`:
its tokenizer builder and its numpy dequantization, nothing of ours), run in the
separate venv `work/refenv` by a subprocess (`--reference`), which writes token ids,
chat-template text and float32 logits to `work/qwen/parity-ref.npz`. This process
then loads the converted folder with `specstream_mlx.load(precision="float32")` and
compares: token ids of tricky strings (must be identical), the chat template's text,
and the logits of a few prompts (max abs diff, its ratio to the logits' spread, and
top-1 agreement at every position).

Tolerance: the same float32 weights on two BLAS libraries differ by summation order
only, so logits must agree to about 1e-3 absolute (logits span about 30) and top-1
must agree at every position except exact near-ties (flagged with the gap).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / "work/qwen/qwen2.5-coder-0.5b-instruct.gguf"
FOLDER = ROOT / "work/qwen/mlx"
REF_PYTHON = ROOT / "work/refenv/bin/python"
REF_OUT = ROOT / "work/qwen/parity-ref.npz"
MAX_ABS_DIFF = 1e-3  # the tolerance stated in the docstring

STRINGS = [
    "items.append(value)",
    "(hello world)",
    "I'M HERE",
    "\tindented after a tab",
    "\t\tdef f(x):\n\t\t\treturn x",
    "12345 + 67890 = 80235, 3.14159, 1e-5, 0x1F",
    "for i in range(10):\n    total += i ** 2  # squares\n",
    "a    b\n\n\n  c   \n",
    "   leading and trailing spaces   ",
    "line one\r\nline two\r\n\r\n",
    "x=[1,2,3];y={'a':1,\"b\":[None]}",
    "Don't you'LL say it's we've THEY'RE",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ",
    "emoji 😀🎉👍🏽 and ❤️‍🔥",
    "naïve café résumé Ünïcödé ½ — «ok»",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
]
PROMPTS = [
    [{"role": "user", "content": "Write a Python function that checks whether a number "
                                 "is prime."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What does `items.append(value)` do in Python?"}],
]
RAW_PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "The capital of France is"]


def reference(out: Path) -> None:
    """Run in the reference venv: transformers' GGUF loader, float32, written to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                 dtype=torch.float32)
    model.eval()
    print(f"reference: loaded in {time.perf_counter() - start:.1f} s "
          f"(tie_word_embeddings={model.config.tie_word_embeddings})", flush=True)
    arrays: dict[str, np.ndarray] = {}
    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
             for p in PROMPTS] + RAW_PROMPTS
    for i, text in enumerate(STRINGS):
        arrays[f"ids_{i}"] = np.array(tok.encode(text, add_special_tokens=False), np.int64)
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
        arrays[f"prompt_ids_{i}"] = np.array(ids, np.int64)
        arrays[f"logits_{i}"] = logits
    meta = {"texts": texts, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
            "tie_word_embeddings": model.config.tie_word_embeddings}
    np.savez(out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"reference: wrote {out} in {time.perf_counter() - start:.1f} s", flush=True)


def ours(folder: Path):
    """Our converted folder, float32: (model, tokenizer)."""
    import specstream_mlx

    return specstream_mlx.load(str(folder), precision="float32")


def compare(folder: Path, ref_path: Path) -> int:
    model, tok = ours(folder)  # first: specstream_mlx picks its BLAS before mlx loads
    import mlx.core as mx

    ref = np.load(ref_path)
    meta = json.loads(str(ref["meta"]))
    failures = 0

    print("\ntoken ids (ours vs transformers' GGUF tokenizer):")
    for i, text in enumerate(STRINGS):
        mine = tok.encode(text, add_special_tokens=False)
        theirs = ref[f"ids_{i}"].tolist()
        same = mine == theirs
        failures += not same
        round_trip = tok.decode(mine) == text
        print(f"  {'match   ' if same else 'MISMATCH'} {len(mine):3d} ids "
              f"{'' if round_trip else '(decode differs) '}{text!r:.60}")
        if not same:
            print(f"      ours   {mine}\n      theirs {theirs}")
    expected = [3615, 2057, 3679, 8]  # Qwen2's own split of items.append(value) (issue 37)
    got = tok.encode(STRINGS[0], add_special_tokens=False)
    print(f"  items.append(value) -> {got} (Qwen2's own: {expected}): "
          f"{'ok' if got == expected else 'WRONG'}")
    failures += got != expected

    texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
             for p in PROMPTS] + RAW_PROMPTS
    same_template = texts == meta["texts"]
    failures += not same_template
    print(f"\nchat template text identical: {same_template}")
    print(f"eos: ours {sorted(tok.eos_token_ids)} (tokenizer eos {tok.eos_token_id}), "
          f"transformers eos {meta['eos_token_id']}")

    print(f"\nlogits, float32 (tolerance: max |diff| <= {MAX_ABS_DIFF}, top-1 equal):")
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False)
        if ids != ref[f"prompt_ids_{i}"].tolist():
            print(f"  prompt {i}: token ids differ, logits not compared")
            failures += 1
            continue
        logits, _ = model(mx.array([ids]))
        mine = np.array(logits[0].astype(mx.float32))
        theirs = ref[f"logits_{i}"]
        diff = np.abs(mine - theirs)
        top_mine, top_theirs = mine.argmax(-1), theirs.argmax(-1)
        agree = int((top_mine == top_theirs).sum())
        spread = float(theirs.max() - theirs.min())
        sorted_ref = np.sort(theirs, axis=-1)
        gaps = sorted_ref[:, -1] - sorted_ref[:, -2]
        print(f"  prompt {i} ({len(ids)} tokens): max |diff| {diff.max():.2e} "
              f"(mean {diff.mean():.1e}, logit spread {spread:.1f}), "
              f"top-1 agree {agree}/{len(ids)}, smallest top-2 gap {gaps.min():.3f}")
        for pos in np.nonzero(top_mine != top_theirs)[0]:
            print(f"      position {pos}: ours {top_mine[pos]} theirs {top_theirs[pos]} "
                  f"(reference top-2 gap {gaps[pos]:.2e})")
        failures += diff.max() > MAX_ABS_DIFF or agree < len(ids)
    print(f"\n{'PASS' if not failures else f'FAIL ({failures} check(s))'}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", action="store_true",
                        help="run the reference side only (inside work/refenv)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse work/qwen/parity-ref.npz when it exists")
    parser.add_argument("--folder", type=Path, default=FOLDER, help=f"default: {FOLDER}")
    args = parser.parse_args()
    if args.reference:
        reference(REF_OUT)
        return 0
    if not (args.reuse and REF_OUT.exists()):
        if not REF_PYTHON.exists():
            raise SystemExit(f"no reference venv at {REF_PYTHON.parent.parent} (see the docstring)")
        subprocess.run([str(REF_PYTHON), __file__, "--reference"], check=True)
    return compare(args.folder, REF_OUT)


if __name__ == "__main__":
    sys.exit(main())
