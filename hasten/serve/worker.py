"""The one thread that touches the engine, and the bounded queue in front of it.

The worker runs up to `max_batch` requests at once in one scheduler (decoding/scheduler.py): every step scores
all of them in one packed pass, then hands each request's new chunk to that request's own output queue, so no
request can receive another's tokens, and each answer is exactly the answer it would get alone. Requests start
first come, first served as slots free up. A method new to the server is built on this thread, when no
generation is running (a method's build may run the model, e.g. to calibrate): the event loop never blocks,
and the running streams finish first while later requests wait behind the build. A request whose client has
left is dropped before the next step; one that fails, fails alone.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..engine import IDLE, GenerationError
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
    gen: object = None  # the running Generation

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening
            pass


class Worker:
    def __init__(self, engine, queue_size: int, metrics: Metrics | None = None, max_batch: int = 8,
                 step_tokens: int = 256, prefix_cache_mb: float = 0, warm_up: str | None = None):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.max_batch = max_batch
        self.scheduler = engine.scheduler(max_batch, step_tokens, prefix_cache_mb)
        self.metrics.prefix_cache = self.scheduler.prefix_cache
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.slots = threading.BoundedSemaphore(queue_size)  # requests running or waiting
        # The warm-up runs on the worker's own thread, before its loop: OpenMP keeps a team of threads per thread
        # that starts parallel regions, and a warm-up on the constructing thread left a second team beside the
        # worker's on the same cores (measured: 1 stream 44 tokens/s against 95 warmed up on the worker thread).
        warmed, failure = threading.Event(), []

        def run():
            try:
                if warm_up is not None:
                    self._warm_up(warm_up)
            except BaseException as e:  # noqa: BLE001 - re-raised by the constructor
                failure.append(e)
                return
            finally:
                warmed.set()
            self._run()

        self.thread = threading.Thread(target=run, name="hasten-worker", daemon=True)
        self.thread.start()
        warmed.wait()
        if failure:
            raise failure[0]

    def submit(self, job: Job) -> None:
        if not self.slots.acquire(blocking=False):
            self.metrics.add(rejected=1)
            raise APIError(503, "the server is busy: its request queue is full; retry shortly", "server_busy",
                           code="queue_full", headers={"Retry-After": "1"})
        self.metrics.add(waiting=1)
        self.jobs.put(job)

    def _warm_up(self, method: str) -> None:
        """One short generation with `method` through this worker's scheduler before the first request, so that
        the first forward's allocations and table builds are paid here and not by the first client (llama-server
        warms up likewise). The prefix cache and the metrics do not see it."""
        cache, self.scheduler.prefix_cache = self.scheduler.prefix_cache, None
        try:
            gen = self.engine.run(self.engine.tokenizer("Hello").input_ids or [0], max_new_tokens=4, method=method,
                                  batch=self.scheduler)
            for chunk in gen:
                if chunk is IDLE:
                    self.scheduler.step()
        finally:
            self.scheduler.prefix_cache = cache

    def stop(self):
        self.jobs.put(None)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _run(self):
        waiting: deque[Job] = deque()
        running: list[Job] = []
        stopping = False
        while True:
            try:  # block only when there is nothing to step
                while not stopping:
                    job = self.jobs.get(block=not running and not waiting)
                    if job is None:  # shutdown: what was accepted still finishes
                        stopping = True
                    else:
                        waiting.append(job)
            except queue.Empty:
                pass
            if stopping and not running and not waiting:
                return
            while waiting and len(running) < self.max_batch:
                job = waiting[0]
                if job.cancelled.is_set():  # left while waiting
                    waiting.popleft()
                    self.metrics.add(waiting=-1, cancelled=1)
                    self._end(job)
                    continue
                if running and not self._built(job.kwargs["method"]):
                    break  # build it once the running generations are done; later requests wait behind it
                waiting.popleft()
                self.metrics.add(waiting=-1)
                job.queue_seconds = time.perf_counter() - job.arrived
                if self._start(job) and self._drain(job):  # the first pull puts it in the scheduler
                    self.metrics.add(running=1)
                    running.append(job)
                else:
                    self._end(job)
            for job in [j for j in running if j.cancelled.is_set()]:  # the client left: stop before the next step
                job.gen.close()
                self.metrics.add(cancelled=1)
                self._finish(job, running)
            if not running:
                continue
            t0 = time.perf_counter()
            self.scheduler.step()
            for job in list(running):
                if not self._drain(job):
                    self._finish(job, running)
            self.metrics.add(seconds=time.perf_counter() - t0, packed=self.scheduler.last_packed, batches=1)

    def _built(self, method: str) -> bool:
        return method in getattr(self.engine, "_drafters", {})

    def _start(self, job: Job) -> bool:
        """Check the arguments and build the method (here, on this thread), then join the scheduler."""
        try:
            job.gen = self.engine.run(**job.kwargs, batch=self.scheduler)
        except (GenerationError, UnknownMethodError, ContextOverflowError) as e:
            job.send(APIError(400, str(e), param="method" if isinstance(e, UnknownMethodError) else None,
                              code="invalid_value"))
            return False
        except Exception as e:
            log.exception("hasten: preparing a generation failed")
            self.metrics.add(failed=1)
            job.send(APIError(500, f"preparing the generation failed ({type(e).__name__})", "server_error"))
            return False
        job.send(STARTED)
        if job.prompt_logprobs is not None:
            job.send(PromptLogprobs(self.engine.prompt_logprobs(job.kwargs["prompt"], job.prompt_logprobs)))
        return True

    def _drain(self, job: Job) -> bool:
        """Send what this job's generation has after the step; False once it has ended (or failed)."""
        try:
            while (chunk := next(job.gen)) is not IDLE:
                if chunk.tokens:  # one chunk per step carries that step's tokens
                    if job.ttft_seconds is None:
                        job.ttft_seconds = time.perf_counter() - job.arrived
                        self.metrics.first_token(job.ttft_seconds)
                    self.metrics.add(tokens=len(chunk.tokens), steps=1)
                job.send(chunk)
            return True
        except StopIteration:
            self.metrics.add(finished=1)
            job.send(job.gen.result)
        except Exception as e:  # surfaced to this request alone, as an error; the others go on
            log.exception("hasten: generation failed")
            self.metrics.add(failed=1)
            job.send(APIError(500, f"generation failed ({type(e).__name__}: {_one_line(e)})", "server_error"))
            job.gen.close()
        return False

    def _finish(self, job: Job, running: list[Job]) -> None:
        running.remove(job)
        self.metrics.add(running=-1)
        self._end(job)

    def _end(self, job: Job) -> None:
        self.slots.release()
        job.send(END)


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no message"
