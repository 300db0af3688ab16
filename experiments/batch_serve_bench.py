"""Concurrent clients against one-after-another on `specstream serve` (issue 39's batching
target): N streaming OpenAI clients with different prompts, M tokens each, all at once,
against the same requests sent one after another, on one server (--max-batch, default 4),
interleaved rounds; prints each round's times, the median ratio, and checks that every
concurrent answer equals its one-at-a-time answer.

Run it with nothing else running (the first load measures the machine's matrix plan and
pass-cost curve; a busy machine gets them wrong):

    python experiments/batch_serve_bench.py                    # embedded SmolLM2-135M
    python experiments/batch_serve_bench.py --clients 4 --max-tokens 64 --rounds 3 \
        [--temp 0.7] [--max-batch 4] [--model path/to/folder] [--url http://host:port] \
        [--baseline single]     # one after another on a --max-batch 1 server instead
    python experiments/batch_serve_bench.py --load 8    # 8 clients x 3 requests, hang-ups

Target (this repository's 2-core CPU): concurrent >= 1.3x faster than one after another.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import specstream_mlx  # noqa: F401  (BLAS before mlx)
from specstream_mlx.jsonl import read_prompts

DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "held12.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, tokenizer, max_batch: int):
    """uvicorn with the app in a thread; returns its URL and a stop function."""
    import uvicorn

    from specstream_mlx.serve.app import ServeConfig, create_app

    # No prompt cache: every round prefills, as a first request would.
    app = create_app(model, tokenizer, ServeConfig(max_batch=max_batch, max_queue=64,
                                                   prompt_cache_bytes=0))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=60)

    return f"http://127.0.0.1:{port}", stop


def ask(client, prompt: str, max_tokens: int, temp: float, seed: int) -> str:
    """One streaming chat request; its whole text."""
    extra = {"temperature": temp, "seed": seed} if temp > 0 else {}
    stream = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens, stream=True, **extra)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def load_test(client, url: str, prompts: list[str], clients: int, max_tokens: int) -> int:
    """`clients` threads x 3 streaming requests, every other client hanging up after 3
    chunks of its first request: prints what became of the requests and the server's
    health; 0 when none was lost or failed and the server answers after."""
    import httpx
    import openai

    answered, hung_up, refused, failed = [], [], [], []

    def worker(w: int) -> None:
        for k in range(3):
            try:
                stream = client.chat.completions.create(
                    model="bench", max_tokens=max_tokens, stream=True,
                    messages=[{"role": "user", "content": prompts[(w + k) % len(prompts)]}])
                for n, _ in enumerate(stream):
                    if w % 2 == 0 and k == 0 and n == 2:
                        stream.close()
                        hung_up.append(w)
                        break
                else:
                    answered.append(w)
            except openai.RateLimitError:
                refused.append(w)
            except Exception as e:  # noqa: BLE001 (counted and printed)
                failed.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    took = time.perf_counter() - tic
    lost = clients * 3 - len(answered) - len(hung_up) - len(refused) - len(failed)
    health = httpx.get(url + "/health", timeout=30).json().get("status")
    after = ask(client, prompts[0], 8, 0.0, 0)
    print(f"{clients} clients x 3 requests x {max_tokens} tokens in {took:.1f} s: "
          f"{len(answered)} answered, {len(hung_up)} hung up, {len(refused)} refused (429), "
          f"{len(failed)} failed, {lost} lost; /health {health!r}; "
          f"an answer after: {bool(after)}")
    for e in failed:
        print("  failed:", e)
    return 0 if not failed and not lost and health == "ok" and after else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--url", default=None, help="a running server (else one in-process)")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--baseline", choices=("same", "single"), default="same",
                   help="one after another on the same server (same), or on a second one "
                   "with --max-batch 1 (single: the single-sequence decoder)")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="instead: N clients x 3 streaming requests at once, every other "
                   "client hanging up after 3 chunks of its first; counts answered, hung "
                   "up, refused and failed, then checks /health and one more answer")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS),
                   help="JSONL prompt set; the first --clients chat prompts, else any")
    args = p.parse_args(argv)
    import openai

    records = read_prompts(args.prompts, turns=False)  # clients send one message each
    chat = [r for r in records if r.get("task") == "chat"] or records
    prompts = [r["prompt"] for r in (chat + records)[: args.clients]]
    if len(prompts) < args.clients:
        sys.exit(f"need {args.clients} prompts, {args.prompts} has {len(prompts)}")
    stops = []
    if args.url:
        url = base_url = args.url
    else:
        from specstream_mlx.loader import load

        model, tokenizer = load(args.model)
        url, stop = start_server(model, tokenizer, args.max_batch)
        stops.append(stop)
        base_url = url
        if args.baseline == "single":
            base_url, stop = start_server(model, tokenizer, 1)
            stops.append(stop)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                           timeout=600)
    base = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0,
                         timeout=600)
    try:
        if args.load:
            return load_test(client, url, prompts, args.load, args.max_tokens)
        for c in {id(client): client, id(base): base}.values():
            ask(c, "Hello!", 8, 0.0, 0)  # warm-up (the first passes compile and measure)

        # Both sides send from threads, the main thread only waits: a client in the main
        # thread of this process (beside the server's) measured ~1.2x slower for the
        # same requests.
        def timed(groups: list[list[int]], c) -> tuple[float, list[str]]:
            out: list[str | None] = [None] * len(prompts)

            def run(group: list[int]) -> None:
                for i in group:
                    out[i] = ask(c, prompts[i], args.max_tokens, args.temp, 1000 + i)

            threads = [threading.Thread(target=run, args=(g,)) for g in groups]
            tic = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - tic, out

        def one_after_another() -> tuple[float, list[str]]:
            return timed([list(range(len(prompts)))], base)

        def concurrent() -> tuple[float, list[str]]:
            return timed([[i] for i in range(len(prompts))], client)

        ratios, same = [], True
        print(f"{args.clients} clients x {args.max_tokens} tokens, temp {args.temp}, "
              f"max batch {args.max_batch}, one after another on "
              f"{'a --max-batch 1 server' if base_url != url else 'the same server'}")
        for r in range(args.rounds):
            # Interleaved, the order alternating: drift hits both sides alike.
            runs = [one_after_another, concurrent] if r % 2 == 0 else [concurrent,
                                                                         one_after_another]
            times = {}
            for f in runs:
                times[f.__name__] = f()
            (t_seq, seq_out), (t_con, con_out) = times["one_after_another"], times["concurrent"]
            same &= seq_out == con_out
            ratios.append(t_seq / t_con)
            print(f"round {r + 1}: one after another {t_seq:.2f} s, concurrent {t_con:.2f} s, "
                  f"{t_seq / t_con:.2f}x, answers {'equal' if seq_out == con_out else 'DIFFER'}",
                  flush=True)
        print(f"median speed-up of concurrent clients: {statistics.median(ratios):.2f}x; "
              f"answers {'identical' if same else 'NOT identical'}")
        return 0 if same else 1
    finally:
        for stop in stops:
            stop()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with the servers' threads gone it aborts in MLX's
    # destructors ("terminate called without an active exception"), --max-batch 1 too.
    os._exit(code)
