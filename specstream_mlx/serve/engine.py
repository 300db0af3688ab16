"""One model, many clients: a bounded FIFO of generation jobs served by one worker thread.

The worker owns the model (MLX work stays on one thread) and a PromptCache, so a request
that extends an earlier conversation prefills only its new tokens. Each job hands its
events to its request through `emit` (thread-safe); a client that disconnects sets
`cancelled` and its generation stops at the next token, freeing its place at once.

With max_batch > 1 (the default, 4) jobs decode together (decoding/batch.py): a job that
arrives while others decode is prefilled and joins the batch at the next step, and a
finished or cancelled one leaves it at once; answers are those of a run alone. With
max_batch 1 the worker runs one stream_generate at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from specstream_mlx.decoding.batch import BatchDecoder, Sequence
from specstream_mlx.decoding.prompt_cache import PromptCache
from specstream_mlx.decoding.sampling import PositionSampler
from specstream_mlx.errors import SpecstreamError
from specstream_mlx.generate import (
    GenerationResponse,
    TextStream,
    check_stops,
    stream_generate,
)
from specstream_mlx.settings import check_settings

log = logging.getLogger("specstream.serve")


@dataclass
class Done:
    """The job ended: finish_reason from the last token, or an error message."""

    error: str | None = None
    status: int = 200


@dataclass
class Job:
    ids: list[int]
    settings: dict  # stream_generate keywords: max_tokens, temp, top_p, stop
    emit: Callable[[GenerationResponse | Done], None]
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    batch_size: int = 1  # the most sequences it decoded beside (itself included)


@dataclass
class Live:
    """A job decoding in the batch: its sequence, its text and its prompt."""

    job: Job
    seq: Sequence
    text: TextStream


class Engine:
    """The worker thread and its queue of at most `max_queue` waiting jobs; at most
    `max_batch` jobs decode together."""

    def __init__(self, model, tokenizer, max_queue: int = 16,
                 prompt_cache_bytes: int = 1 << 30, prompt_cache: PromptCache | None = None,
                 max_batch: int = 4):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch
        if prompt_cache is None:  # (an empty PromptCache is falsy: no `or` here)
            prompt_cache = PromptCache(model, prompt_cache_bytes)
        self.prompt_cache = prompt_cache
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="specstream-worker",
                                        daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue `job`; False when the queue is full."""
        try:
            self.jobs.put_nowait(job)
            return True
        except queue.Full:
            return False

    @property
    def waiting(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(timeout=30)
        self.prompt_cache.close()  # the disk's pending writes, if any

    def _run(self) -> None:
        if self.max_batch > 1:
            self._run_batched()
            return
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                self._generate(job)
            finally:
                self.busy = False

    def _generate(self, job: Job) -> None:
        try:
            if job.seed is not None:
                mx.random.seed(job.seed)
            for r in stream_generate(self.model, self.tokenizer, job.ids, chat=False,
                                     prompt_cache=self.prompt_cache, **job.settings):
                if job.cancelled.is_set():
                    break
                job.emit(r)
            job.emit(Done())
        except SpecstreamError as e:
            job.emit(Done(str(e), 400))
        except Exception:  # never a traceback to the client; the log keeps it
            log.exception("generation failed")
            job.emit(Done("internal error during generation", 500))

    # --- batched decoding ----------------------------------------------------------------

    def _run_batched(self) -> None:
        decoder = BatchDecoder(self.model, self.max_batch)
        live: list[Live] = []
        stopping = False
        while True:
            while not stopping and len(live) < self.max_batch:
                try:  # wait for work only when nothing decodes
                    job = self.jobs.get(block=not live)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                elif not job.cancelled.is_set():
                    self.busy = True
                    self._admit(decoder, job, live)
            if not live:
                self.busy = False
                if stopping:
                    return
                continue
            self.busy = True
            for entry in live:
                entry.job.batch_size = max(entry.job.batch_size, len(live))
            try:
                steps = decoder.step()
            except Exception:
                log.exception("batched generation failed")
                for entry in live:
                    entry.job.emit(Done("internal error during generation", 500))
                live.clear()
                decoder = BatchDecoder(self.model, self.max_batch)
                continue
            by_seq = {id(entry.seq): entry for entry in live}
            for seq, events in steps:
                entry = by_seq[id(seq)]
                if not self._deliver(decoder, entry, events):
                    live.remove(entry)

    def _admit(self, decoder: BatchDecoder, job: Job, live: list[Live]) -> None:
        """Prefill `job` and, unless its first token ends it, add it to `live`."""
        settings = dict(job.settings)
        temp = settings.pop("temp", 0.0)
        top_p, min_p = settings.pop("top_p", 0.0), settings.pop("min_p", 0.0)
        top_k = settings.pop("top_k", 0)
        cache = None
        try:
            check_settings(max_tokens=settings.get("max_tokens", 256), temp=temp,
                           top_p=top_p, min_p=min_p, top_k=top_k)
            stops = check_stops(settings.pop("stop", None))
            if job.seed is not None:
                mx.random.seed(job.seed)
            # As stream_generate draws it: the same seed gives the same answer.
            sampler = PositionSampler.drawn(temp, top_p, min_p, top_k) if temp > 0 else None
            text = TextStream(self.tokenizer, len(job.ids), stops)
            cache, text.reused, text.source = self.prompt_cache.take_with_source(job.ids)
            seq, first = decoder.add(job.ids, sampler=sampler, cache=cache, **settings)
        except Exception as e:
            if cache is not None:  # back to the prompt cache (its committed tokens)
                self.prompt_cache.put(job.ids, cache)
            if isinstance(e, SpecstreamError):
                job.emit(Done(str(e), 400))
            else:
                log.exception("generation failed")
                job.emit(Done("internal error during generation", 500))
            return
        entry = Live(job, seq, text)
        if self._deliver(decoder, entry, [first]):
            live.append(entry)

    def _deliver(self, decoder: BatchDecoder, entry: Live, events: list) -> bool:
        """Hand `events` to the job; False once it has ended (end of sequence, stop
        string, max_tokens or a hang-up), its cache given to the prompt cache."""
        job, text = entry.job, entry.text
        ended = failed = False
        try:
            for event in events:
                if job.cancelled.is_set():
                    ended = True
                    break
                response = text.feed(event)
                job.emit(response)
                if response.finish_reason:
                    ended = True
                    break
            ended = ended or entry.seq.done
        except Exception:
            log.exception("generation failed")
            job.emit(Done("internal error during generation", 500))
            ended = failed = True
        if ended:
            cache = decoder.finish(entry.seq, len(text.generated))
            if cache is not None:
                self.prompt_cache.put(job.ids + text.generated[:-1], cache)
            if not failed:
                job.emit(Done())
        return not ended
