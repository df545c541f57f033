"""The one thread that touches the engine, and the bounded queue in front of it.

Every request is a Job with its own output queue, so no request can receive another's tokens. The worker builds a
method new to the server on this thread, between generations: building never blocks the event loop (other streams
keep flowing) and never runs beside a generation (a method's build may run the model, e.g. to calibrate). A job
whose client has left is stopped before its next step.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine import GenerationError
from ..methods import UnknownMethodError
from ..models.kv_cache import ContextOverflowError
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("hasten.serve")

STARTED = object()  # the method is built and the arguments passed the engine's checks: tokens follow
END = object()  # nothing more will come for this job


@dataclass
class PromptLogprobs:
    items: list  # [TokenLogprob | None] per prompt token


@dataclass
class Job:
    kwargs: dict  # Engine.run arguments (prompt token ids, method, sampling, …)
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    prompt_logprobs: int | None = None  # echo: the prompt's own logprobs, with this many top entries
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    queue_seconds: float | None = None
    ttft_seconds: float | None = None

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass


class Worker:
    def __init__(self, engine, queue_size: int, metrics: Metrics | None = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.slots = threading.BoundedSemaphore(queue_size)  # requests running or waiting
        self.thread = threading.Thread(target=self._run, name="hasten-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if not self.slots.acquire(blocking=False):
            self.metrics.add(rejected=1)
            raise APIError(503, "the server is busy: its request queue is full; retry shortly", "server_busy",
                           code="queue_full", headers={"Retry-After": "1"})
        self.metrics.add(waiting=1)
        self.jobs.put(job)

    def stop(self):
        self.jobs.put(None)

    def _run(self):
        while (job := self.jobs.get()) is not None:
            self.metrics.add(waiting=-1)
            try:
                job.queue_seconds = time.perf_counter() - job.arrived
                if job.cancelled.is_set():  # left while waiting
                    self.metrics.add(cancelled=1)
                else:
                    self.metrics.add(running=1)
                    try:
                        self._generate(job)
                    finally:
                        self.metrics.add(running=-1)
            finally:
                self.slots.release()
                job.send(END)

    def _generate(self, job: Job) -> None:
        try:
            gen = self.engine.run(**job.kwargs)  # checks the arguments and builds a new method, here
        except (GenerationError, UnknownMethodError, ContextOverflowError) as e:
            job.send(APIError(400, str(e), param="method" if isinstance(e, UnknownMethodError) else None,
                              code="invalid_value"))
            return
        except Exception as e:
            log.exception("hasten: preparing a generation failed")
            self.metrics.add(failed=1)
            job.send(APIError(500, f"preparing the generation failed ({type(e).__name__})", "server_error"))
            return
        job.send(STARTED)
        t0 = time.perf_counter()
        try:
            if job.prompt_logprobs is not None:
                job.send(PromptLogprobs(self.engine.prompt_logprobs(job.kwargs["prompt"], job.prompt_logprobs)))
            while True:
                if job.cancelled.is_set():  # the client left: stop before the next step, free the engine
                    gen.close()
                    self.metrics.add(cancelled=1)
                    return
                try:
                    chunk = next(gen)
                except StopIteration:
                    break
                if chunk.tokens:  # one chunk per step carries that step's tokens
                    if job.ttft_seconds is None:
                        job.ttft_seconds = time.perf_counter() - job.arrived
                        self.metrics.first_token(job.ttft_seconds)
                    self.metrics.add(tokens=len(chunk.tokens), steps=1)
                job.send(chunk)
            self.metrics.add(finished=1)
            job.send(gen.result)
        except Exception as e:  # surfaced to this request alone, as an error; the worker goes on to the next
            log.exception("hasten: generation failed")
            self.metrics.add(failed=1)
            job.send(APIError(500, f"generation failed ({type(e).__name__}: {_one_line(e)})", "server_error"))
        finally:
            self.metrics.add(seconds=time.perf_counter() - t0)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no message"
