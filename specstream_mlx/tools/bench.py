"""Benchmark: tokens per pass, accepted-draft histogram, tokens/s of speculative and plain
decoding of the same model measured in the same run (interleaved, per prompt), the
speed-up as a ratio, mlx-lm's own generate on the same folder, and the cost of a pass
by rows (with the memory-bandwidth floor of a one-token pass).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import specstream_mlx.matmul_plan as matmul_plan
from specstream_mlx.blas import blas_info
from specstream_mlx.decoding.costs import costs_for
from specstream_mlx.decoding.pass_curve import pass_cost
from specstream_mlx.decoding.prompt_cache import PromptCache
from specstream_mlx.errors import InputError
from specstream_mlx.generate import encode_messages, encode_record, stream_generate
from specstream_mlx.jsonl import prompt_id, read_prompts, user_turns
from specstream_mlx.loader import describe_model, load, resolve_path, set_precision
from specstream_mlx.settings import check_output_path, check_rows, check_settings


@dataclass
class BenchArgs:
    prompts: str
    model: str | None = None
    max_tokens: int = 128
    tree_budget: int | None = None
    draft_top_k: int | None = None
    lookup_depth: int | None = None
    min_draft_prob: float | None = None
    corpus_depth: int | None = None
    adaptive: bool = True
    precision: str = "auto"
    mlx_lm: bool = True
    mlx_lm_precision: str = "native"
    limit: int | None = None
    rows: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 16, 24, 32])
    window: int = 100
    json_path: str | None = None
    png_path: str | None = None
    conversation: int = 0  # turns of a conversation timed with and without KV reuse
    temp: float = 0.0  # > 0: sample; speculative and plain draw the same tokens
    top_p: float = 0.0
    seed: int = 0  # each prompt's runs start from seed + its index
    # Speculative/plain pairs per prompt, alternating which runs first; a prompt's
    # speed-up is the median of its pairs' ratios (one pair is at the mercy of drift).
    repeats: int = 1


def timed_run(model, tokenizer, ids: list[int], args: BenchArgs, speculative: bool,
              seed: int = 0) -> dict:
    """One generation (greedy, or sampled from `seed`): tokens, tokens/s after the first
    token, passes, histogram."""
    tokens, per_pass, stamps = [], Counter(), []
    last = None
    mx.random.seed(seed)
    for last in stream_generate(model, tokenizer, ids, max_tokens=args.max_tokens,
                                temp=args.temp, top_p=args.top_p,
                                speculative=speculative, tree_budget=args.tree_budget,
                                draft_top_k=args.draft_top_k, lookup_depth=args.lookup_depth,
                                min_draft_prob=args.min_draft_prob,
                                corpus_depth=args.corpus_depth, adaptive=args.adaptive):
        tokens.append(last.token)
        stamps.append(time.perf_counter())
        if last.passes > 1:  # pass 1 is the prefill, which drafts nothing
            per_pass[last.passes] += last.from_draft
    passes = last.passes
    hist = Counter(per_pass.get(p, 0) for p in range(2, passes + 1))
    return {"tokens": tokens, "n": len(tokens), "passes": passes, "stamps": stamps,
            "tps": last.generation_tps, "accepted_hist": dict(sorted(hist.items()))}


def window_speedups(spec: list[float], plain: list[float], window: int) -> list[float]:
    """Speed-up over each whole `window` tokens after the first token: plain's time for
    those tokens over speculation's. spec, plain: the time each token arrived."""
    n = min(len(spec), len(plain)) - 1
    return [round((plain[e] - plain[b]) / (spec[e] - spec[b]), 3)
            for b, e in ((i, i + window) for i in range(0, n - window + 1, window))
            if spec[e] > spec[b]]


def paired_row(record: dict, index: int, pairs: list[tuple[dict, dict]],
               window: int) -> dict:
    """One prompt's report from its (speculative, plain) timed runs: tokens/s and the
    speed-up are medians over the pairs (the speed-up of each pair measured on its own),
    as are the per-window speed-ups; `identical` holds when every run emitted the same
    tokens. Passes, tokens per pass and the histogram are the first pair's (the
    controller's timed choices may differ a little between runs)."""
    spec = pairs[0][0]
    ratios = [s["tps"] / p["tps"] for s, p in pairs if p["tps"]]
    windows = [window_speedups(s["stamps"], p["stamps"], window) for s, p in pairs]
    row = {"id": prompt_id(record, index), "task": record.get("task", "all"),
           "tokens": spec["n"], "passes": spec["passes"],
           "tokens_per_pass": round(spec["n"] / spec["passes"], 3),
           "spec_tps": round(float(np.median([s["tps"] for s, _ in pairs])), 2),
           "plain_tps": round(float(np.median([p["tps"] for _, p in pairs])), 2),
           "speedup": round(float(np.median(ratios)), 3) if ratios else None,
           "identical": all(r["tokens"] == spec["tokens"] for pair in pairs for r in pair),
           "accepted_hist": spec["accepted_hist"],
           # Runs that drew different tokens (a near-tie) may differ in length.
           "window_speedups": [round(float(np.median(w)), 3)
                               for w in zip(*windows, strict=False)]}
    if len(pairs) > 1:
        row["speedups"] = [round(r, 3) for r in ratios]
    return row


def mlx_lm_run(ref, tokenizer, ids: list[int], args: BenchArgs, seed: int = 0) -> dict:
    from mlx_lm import stream_generate as mlx_lm_stream
    from mlx_lm.sample_utils import make_sampler

    tokens, last = [], None
    mx.random.seed(seed)
    sampler = make_sampler(args.temp, args.top_p)
    for last in mlx_lm_stream(ref, tokenizer, ids, max_tokens=args.max_tokens,
                              sampler=sampler):
        tokens.append(last.token)
        if last.finish_reason:
            break
    return {"tokens": tokens, "tps": last.generation_tps}


def bandwidth_floor(model) -> dict:
    """Bytes of weights a pass reads, this machine's copy bandwidth, and their ratio."""
    weight_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    a = np.ones(64 * 2**20, dtype=np.float32)  # 256 MiB
    b = np.empty_like(a)
    np.copyto(b, a)
    tic = time.perf_counter()
    for _ in range(5):
        np.copyto(b, a)
    gbps = 5 * 2 * a.nbytes / (time.perf_counter() - tic) / 1e9  # read + write
    return {"weight_bytes": weight_bytes, "copy_GBps": round(gbps, 1),
            "floor_ms": round(weight_bytes / (gbps * 1e9) * 1000, 1)}


def summarize(rows: list[dict]) -> dict:
    """Aggregate over prompts: totals of tokens and passes, time-weighted tokens/s."""
    tokens = sum(r["tokens"] for r in rows)
    # tokens/s was measured after each run's first token: time = (n - 1) / tps.
    rated = [r for r in rows if r["spec_tps"] and r["plain_tps"] and r["tokens"] > 1]
    spec_time = sum((r["tokens"] - 1) / r["spec_tps"] for r in rated)
    plain_time = sum((r["tokens"] - 1) / r["plain_tps"] for r in rated)
    rated_tokens = sum(r["tokens"] - 1 for r in rated)
    hist = Counter()
    for r in rows:
        hist.update({int(k): v for k, v in r["accepted_hist"].items()})
    out = {"prompts": len(rows), "tokens": tokens,
           "tokens_per_pass": round(tokens / sum(r["passes"] for r in rows), 3),
           "spec_tps": round(rated_tokens / spec_time, 2) if spec_time else 0.0,
           "plain_tps": round(rated_tokens / plain_time, 2) if plain_time else 0.0,
           "identical": all(r["identical"] for r in rows),
           "accepted_hist": dict(sorted(hist.items()))}
    out["speedup"] = round(out["spec_tps"] / out["plain_tps"], 3) if plain_time else None
    # speed-up = tokens per pass / (speculative step time / plain step time)
    if out["speedup"]:
        out["step_cost_ratio"] = round(out["tokens_per_pass"] / out["speedup"], 3)
    rated = [r for r in rows if r.get("speedup")]
    worst = min(rated, key=lambda r: r["speedup"]) if rated else None
    out["min_speedup"] = worst["speedup"] if worst else None
    out["worst_prompt"] = worst.get("id") if worst else None
    windows = [w for r in rows for w in r.get("window_speedups", [])]
    out["min_window_speedup"] = min(windows) if windows else None
    if all(r.get("mlx_lm_tps") for r in rated) and rated:
        mlx_time = sum((r["tokens"] - 1) / r["mlx_lm_tps"] for r in rated)
        out["mlx_lm_tps"] = round(rated_tokens / mlx_time, 2)
        out["speedup_vs_mlx_lm"] = round(out["spec_tps"] / out["mlx_lm_tps"], 3)
    return out


ARMS = ("plain", "A", "B")


def compare_row(record: dict, index: int, runs: dict[str, list[dict]]) -> dict:
    """One prompt's A/B report from its rounds of timed runs per arm (ARMS): each arm's
    speed-up over plain is the median of its rounds' ratios to the plain run of the same
    round; seconds are medians of (n - 1) / tokens/s; tokens per pass the first run's;
    `identical` holds when every run of every arm emitted the same tokens."""
    first = runs["plain"][0]
    row = {"id": prompt_id(record, index), "task": record.get("task", "all"),
           "tokens": first["n"],
           "identical": all(r["tokens"] == first["tokens"] for a in ARMS for r in runs[a])}
    for arm in ARMS:
        rated = [r for r in runs[arm] if r["tps"]]
        row[f"{arm}_seconds"] = (float(np.median([(r["n"] - 1) / r["tps"] for r in rated]))
                                 if rated else 0.0)
    for arm in ARMS[1:]:
        ratios = [r["tps"] / p["tps"] for r, p in zip(runs[arm], runs["plain"], strict=True)
                  if p["tps"] and r["tps"]]
        row[f"{arm}_speedup"] = round(float(np.median(ratios)), 3) if ratios else None
        row[f"{arm}_tokens_per_pass"] = round(runs[arm][0]["n"] / runs[arm][0]["passes"], 3)
    return row


def summarize_compare(rows: list[dict]) -> dict:
    """Each arm's aggregate speed-up (total plain time over the arm's, over prompts timed
    in all arms), worst prompt, and on how many prompts B beat A."""
    rated = [r for r in rows if r["plain_seconds"] and r["A_seconds"] and r["B_seconds"]]
    out = {"prompts": len(rows), "identical": all(r["identical"] for r in rows),
           "B_better": sum((r["B_speedup"] or 0) > (r["A_speedup"] or 0) for r in rated)}
    plain = sum(r["plain_seconds"] for r in rated)
    for arm in ARMS[1:]:
        spent = sum(r[f"{arm}_seconds"] for r in rated)
        out[f"{arm}_speedup"] = round(plain / spent, 3) if spent else None
        worst = min(rated, key=lambda r: r[f"{arm}_speedup"] or 0) if rated else None
        out[f"{arm}_min_speedup"] = worst[f"{arm}_speedup"] if worst else None
        out[f"{arm}_worst_prompt"] = worst["id"] if worst else None
    return out


def compare(args: BenchArgs, other: str, log=print) -> dict:
    """A/B of two stream folders on the same base model (`args.model` is A, `other` B):
    for every prompt and each of `args.repeats` rounds, plain decoding, A and B run in an
    order that rotates with the prompt and the round, so drift favours no arm. Reports
    each arm's speed-up over plain per prompt and task, and whether every arm emitted
    the same tokens (greedy and sampled alike: the position-keyed sampler)."""
    check_bench_args(args)
    records = read_prompts(args.prompts, args.limit)
    paths = [resolve_path(args.model), resolve_path(other)]
    models = [load(p, precision=args.precision) for p in paths]
    for p, (m, _) in zip(paths, models, strict=True):
        if m.stream_args is None:
            raise InputError(f"{p} has no streams: nothing to compare")
    if models[0][0].args != models[1][0].args:
        raise InputError(f"{paths[0]} and {paths[1]} are not the same base model")
    for name, (m, _) in zip("AB", models, strict=True):
        log(f"[{name}: {describe_model(m)}]")
    tokenizer = models[0][1]
    # Plain decoding answers earlier turns: the same base model in both folders.
    prompts = [encode_record(models[0][0], tokenizer, r, args.max_tokens) for r in records]
    for arm in ARMS:  # warm-up, not reported
        timed_run(*models[arm == "B"], prompts[0], args, arm != "plain")
    rows = []
    for i, (record, ids) in enumerate(zip(records, prompts, strict=True)):
        runs = {arm: [] for arm in ARMS}
        for rep in range(args.repeats):
            k = (i + rep) % len(ARMS)
            for arm in ARMS[k:] + ARMS[:k]:
                runs[arm].append(timed_run(*models[arm == "B"], ids, args, arm != "plain",
                                           args.seed + i))
        row = compare_row(record, i, runs)
        rows.append(row)
        log(f"{row['id'][:28]:28s} {row['tokens']:4d} tok  "
            + "  ".join(f"{arm} x{row[f'{arm}_speedup'] or 0:.2f} "
                        f"({row[f'{arm}_tokens_per_pass']:.2f} tok/pass)" for arm in ARMS[1:])
            + ("  same" if row["identical"] else "  DIFFERENT"))
    tasks = sorted({r["task"] for r in rows})
    report = {"A": str(paths[0]), "B": str(paths[1]), "settings": asdict(args),
              "device": str(mx.default_device()), "blas": blas_info(), "per_prompt": rows,
              "per_task": {t: summarize_compare([r for r in rows if r["task"] == t])
                           for t in tasks},
              "all": summarize_compare(rows)}
    for task, summary in [*report["per_task"].items(), ("all", report["all"])]:
        log(f"{task:8s} {summary['prompts']:3d} prompts  A x{summary['A_speedup'] or 0:.3f}  "
            f"B x{summary['B_speedup'] or 0:.3f}  | worst A x{summary['A_min_speedup'] or 0:.2f} "
            f"B x{summary['B_min_speedup'] or 0:.2f}  | B faster on {summary['B_better']}  "
            f"| identical {summary['identical']}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json_path}")
    return report


def conversation_ttft(model, tokenizer, questions: list[str], max_tokens: int,
                      log=print) -> list[dict]:
    """A conversation of len(questions) user turns, each answered twice, interleaved: with
    a PromptCache (only the turn's new tokens are prefilled) and with a fresh prefill of
    the whole conversation. Per turn: prompt tokens, tokens reused, time to first token
    of both, and whether the two answers are identical (greedy)."""
    cache = PromptCache(model)
    messages, turns = [], []
    for k, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        ids = encode_messages(tokenizer, messages)
        runs = {}
        for reuse in ([True, False] if k % 2 == 0 else [False, True]):
            tic = time.perf_counter()
            ttft, tokens, text, last = None, [], "", None
            for last in stream_generate(model, tokenizer, ids, max_tokens=max_tokens,
                                        prompt_cache=cache if reuse else None):
                ttft = ttft if ttft is not None else time.perf_counter() - tic
                tokens.append(last.token)
                text += last.text
            runs[reuse] = (ttft, tokens, text, last.prompt_cached_tokens)
        turn = {"turn": k + 1, "prompt_tokens": len(ids), "reused_tokens": runs[True][3],
                "ttft_reused_ms": round(runs[True][0] * 1000, 1),
                "ttft_fresh_ms": round(runs[False][0] * 1000, 1),
                "identical": runs[True][1] == runs[False][1]}
        turns.append(turn)
        log(f"turn {turn['turn']}: prompt {turn['prompt_tokens']} tokens, "
            f"{turn['reused_tokens']} reused; first token after {turn['ttft_reused_ms']} ms "
            f"(fresh prefill {turn['ttft_fresh_ms']} ms), "
            f"{'same answer' if turn['identical'] else 'DIFFERENT ANSWER'}")
        messages.append({"role": "assistant", "content": runs[True][2]})
    return turns


def check_bench_args(args: BenchArgs) -> None:
    """Every setting checked before minutes of benchmarking, outputs included."""
    check_settings(max_tokens=args.max_tokens, tree_budget=args.tree_budget,
                   draft_top_k=args.draft_top_k,
                   lookup_depth=args.lookup_depth, min_draft_prob=args.min_draft_prob,
                   corpus_depth=args.corpus_depth)
    check_settings(limit=args.limit, window=args.window, conversation=args.conversation,
                   temp=args.temp, top_p=args.top_p, seed=args.seed, repeats=args.repeats)
    check_rows(args.rows)
    check_output_path(args.json_path, "json")
    check_output_path(args.png_path, "png")
    if args.png_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("png needs matplotlib (pip install matplotlib)") from None


def bench(args: BenchArgs, log=print) -> dict:
    """Run the benchmark; returns the report (also written as JSON when asked). A 'turns'
    record is measured at its last turn (generate.encode_record), its id suffixed
    '#turnN'."""
    check_bench_args(args)
    records = read_prompts(args.prompts, args.limit)
    path = resolve_path(args.model)
    model, tokenizer = load(path, precision=args.precision)
    if model.stream_args is None:
        raise InputError(f"{path} has no streams: nothing to compare with plain decoding")
    log(f"[{describe_model(model)}]")
    ref = None
    if args.mlx_lm:
        from mlx_lm.utils import load as mlx_lm_load

        ref, _ = mlx_lm_load(str(path))
        ref_precision = set_precision(ref, args.mlx_lm_precision)
    # Once per record: a conversation's earlier turns answered here, the same ids for
    # every run of it.
    prompts = [encode_record(model, tokenizer, r, args.max_tokens) for r in records]
    timed_run(model, tokenizer, prompts[0], args, True)  # warm-up, not reported
    timed_run(model, tokenizer, prompts[0], args, False)
    sampled = args.temp > 0
    rows = []
    for i, (record, ids) in enumerate(zip(records, prompts, strict=True)):
        pairs = []
        for rep in range(args.repeats):
            # Alternate which runs first, so drift in machine speed favours neither.
            order = [True, False] if (i + rep) % 2 == 0 else [False, True]
            runs = {s: timed_run(model, tokenizer, ids, args, s, args.seed + i)
                    for s in order}
            pairs.append((runs[True], runs[False]))
        row = paired_row(record, i, pairs, args.window)
        if ref is not None:
            theirs = mlx_lm_run(ref, tokenizer, ids, args, args.seed + i)
            row["mlx_lm_tps"] = round(theirs["tps"], 2)
            # mlx-lm samples with its own random numbers: comparable when greedy only.
            row["mlx_lm_identical"] = None if sampled else theirs["tokens"] == pairs[0][1]["tokens"]
        rows.append(row)
        log(format_row(row))
    tasks = sorted({r["task"] for r in rows})
    report = {
        "model": str(path), "description": describe_model(model), "blas": blas_info(),
        "device": str(mx.default_device()), "settings": asdict(args),
        "mlx_lm_precision": ref_precision if ref is not None else None,
        "per_prompt": rows,
        "per_task": {t: summarize([r for r in rows if r["task"] == t]) for t in tasks},
        "all": summarize(rows),
        "pass_cost_ms": {str(k): round(v, 1) for k, v in pass_cost(model, args.rows).items()},
        "bandwidth": bandwidth_floor(model),
        "matmul_plan": matmul_plan.summary(),
        # The controller's guess for pass sizes it has not run (pass_curve.py).
        "pass_curve_ms": {str(r): round(t * 1000, 1) for r, t in costs_for(model).curve},
    }
    log(format_report(report))
    if args.conversation:
        texts = [t for r in records for t in user_turns(r)]
        questions = [texts[i % len(texts)] for i in range(args.conversation)]
        log(f"conversation of {args.conversation} turns, KV reuse vs fresh prefill:")
        report["conversation"] = conversation_ttft(model, tokenizer, questions,
                                                   min(args.max_tokens, 64), log)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json_path}")
    if args.png_path:
        Path(args.png_path).parent.mkdir(parents=True, exist_ok=True)
        draw_chart(report, args.png_path)
        log(f"wrote {args.png_path}")
    return report


def format_row(r: dict) -> str:
    theirs = f" mlx-lm {r['mlx_lm_tps']:6.1f}" if "mlx_lm_tps" in r else ""
    if r.get("window_speedups"):
        theirs += " windows " + " ".join(f"x{w:.2f}" for w in r["window_speedups"])
    if r.get("speedups"):
        theirs += " pairs " + " ".join(f"x{w:.2f}" for w in r["speedups"])
    return (f"{r['id'][:28]:28s} {r['task']:5s} {r['tokens']:4d} tok "
            f"{r['tokens_per_pass']:5.2f} tok/pass  spec {r['spec_tps']:6.1f}  "
            f"plain {r['plain_tps']:6.1f}  x{r['speedup'] or float('nan'):.2f}{theirs}  "
            f"{'same' if r['identical'] else 'DIFFERENT'}")


def format_report(report: dict) -> str:
    lines = ["", f"{'task':6s} {'prompts':>7s} {'tok/pass':>8s} {'spec tok/s':>10s} "
             f"{'plain tok/s':>11s} {'speed-up':>8s} {'worst':>6s} {'step cost':>9s} "
             f"{'mlx-lm tok/s':>12s} {'vs mlx-lm':>9s} identical"]
    for name, s in [*report["per_task"].items(), ("all", report["all"])]:
        lines.append(f"{name:6s} {s['prompts']:7d} {s['tokens_per_pass']:8.2f} "
                     f"{s['spec_tps']:10.1f} {s['plain_tps']:11.1f} "
                     f"{s['speedup'] or float('nan'):7.2f}x "
                     f"{s['min_speedup'] or float('nan'):5.2f}x "
                     f"{s.get('step_cost_ratio') or float('nan'):8.2f}x "
                     f"{s.get('mlx_lm_tps', float('nan')):12.1f} "
                     f"{s.get('speedup_vs_mlx_lm', float('nan')):8.2f}x {s['identical']}")
    cost = report["pass_cost_ms"]
    one = cost.get("1") or next(iter(cost.values()))
    lines.append("pass cost by rows (ms, ratio to 1 row): " + ", ".join(
        f"{k}: {v:.0f} ({v / one:.2f})" for k, v in cost.items()))
    bw = report["bandwidth"]
    lines.append(f"one-token floor: {bw['weight_bytes'] / 1e6:.0f} MB of weights at "
                 f"{bw['copy_GBps']} GB/s = {bw['floor_ms']} ms; BLAS: {report['blas']}")
    plan = report.get("matmul_plan")
    lines.append(f"matmul plan: measured for {len(plan)} weight shapes (in the JSON)" if plan
                 else "matmul plan: none (default forms)")
    curve = report.get("pass_curve_ms")
    lines.append("controller's pass-cost curve (first load, plain, ms): " + (", ".join(
        f"{k}: {v:.0f}" for k, v in curve.items()) if curve else "none"))
    lines.append(f"accepted drafted tokens per pass: {report['all']['accepted_hist']}")
    if report["settings"]["temp"] > 0:
        lines.append(f"sampled at temperature {report['settings']['temp']} (top_p "
                     f"{report['settings']['top_p']}, seed {report['settings']['seed']} + "
                     "prompt index): speculative and plain decoding draw by position, "
                     "so the same seed gives the same tokens")
    if report["all"].get("min_window_speedup") is not None:
        lines.append(f"slowest {report['settings']['window']}-token window: "
                     f"x{report['all']['min_window_speedup']:.2f} of plain decoding")
    return "\n".join(lines)


def draw_chart(report: dict, path: str) -> None:
    """Bar charts of tokens per pass and speed-up per task (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("the chart needs matplotlib: pip install matplotlib") from e
    tasks = list(report["per_task"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in [(axes[0], "tokens_per_pass", "tokens per pass"),
                           (axes[1], "speedup", "speed-up over plain decoding")]:
        values = [report["per_task"][t][key] for t in tasks]
        ax.bar(tasks, values, color=["#4C72B0", "#DD8452", "#55A868"][: len(tasks)])
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(title)
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom")
    fig.suptitle(report["description"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
