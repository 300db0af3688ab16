"""One model, many clients: a bounded FIFO of generation jobs served by one worker thread.

The worker owns the model (MLX work stays on one thread) and a PromptCache, so a request
that extends an earlier conversation prefills only its new tokens. Each job hands its
events to its request through `emit` (thread-safe); a client that disconnects sets
`cancelled` and its generation stops at the next token, freeing the worker at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from specstream_mlx.decoding.prompt_cache import PromptCache
from specstream_mlx.errors import SpecstreamError
from specstream_mlx.generate import GenerationResponse, stream_generate

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


class Engine:
    """The worker thread and its queue of at most `max_queue` waiting jobs."""

    def __init__(self, model, tokenizer, max_queue: int = 16,
                 prompt_cache_bytes: int = 1 << 30, prompt_cache: PromptCache | None = None):
        self.model, self.tokenizer = model, tokenizer
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
