"""Server counters and their Prometheus text exposition (format 0.0.4). Only what is measured is listed."""
from __future__ import annotations

import threading

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Written by the worker thread and the event loop, read by /metrics; one lock guards them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.finished = 0  # requests that ran to their end (stop or length)
        self.cancelled = 0  # the client left before the end: stopped at the next step, or never started
        self.failed = 0  # an error was raised while generating
        self.rejected = 0  # refused with 503: the queue was full
        self.tokens = 0  # generated token ids, cancelled requests included
        self.steps = 0  # target forward passes (the prefill pass included)
        self.seconds = 0.0  # time spent generating
        self.batches = 0  # scheduler steps (one packed pass per target model over every running request)
        self.packed = 0  # tokens scored by those steps (prompt chunks, roots, draft nodes)
        self.prefix_cache = None  # the scheduler's PrefixCache, when the server has one
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0

    def first_token(self, seconds: float) -> None:
        with self.lock:
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft[i] += 1
            self.ttft_sum += seconds

    def add(self, **deltas) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def render(self) -> str:
        with self.lock:
            rows = [
                ("hasten_requests_running", "gauge", "Requests being decoded now.", self.running),
                ("hasten_requests_waiting", "gauge", "Requests accepted and waiting for the engine.", self.waiting),
                ("hasten_requests_finished_total", "counter", "Requests that ran to their end.", self.finished),
                ("hasten_requests_cancelled_total", "counter",
                 "Requests whose client disconnected before the end; decoding stopped at the next step.", self.cancelled),
                ("hasten_requests_failed_total", "counter", "Requests that failed with an error while generating.",
                 self.failed),
                ("hasten_requests_rejected_total", "counter", "Requests refused with 503 because the queue was full.",
                 self.rejected),
                ("hasten_generated_tokens_total", "counter", "Generated tokens, cancelled requests included.", self.tokens),
                ("hasten_target_passes_total", "counter", "Target-model forward passes (decode steps and prefills).",
                 self.steps),
                ("hasten_generation_seconds_total", "counter", "Seconds the engine spent generating (stepping the batch).",
                 round(self.seconds, 6)),
                ("hasten_tokens_per_second", "gauge",
                 "Generated tokens per second of generation, all requests together, since start.",
                 round(self.tokens / self.seconds, 3) if self.seconds else 0.0),
                ("hasten_batch_steps_total", "counter", "Scheduler steps: one packed pass over every running request.",
                 self.batches),
                ("hasten_batch_tokens_total", "counter",
                 "Tokens scored by those steps (prompt chunks, roots and draft nodes of every running request).",
                 self.packed),
                ("hasten_mean_accepted_tokens", "gauge", "Generated tokens per target pass (tau), since start.",
                 round(self.tokens / self.steps, 4) if self.steps else 0.0),
            ]
            cache = self.prefix_cache
            if cache is not None:
                with cache.lock:
                    rows += [
                        ("hasten_prefix_cache_lookups_total", "counter", "Prompts looked up in the prefix cache.",
                         cache.lookups),
                        ("hasten_prefix_cache_hits_total", "counter",
                         "Prompts that reused cached KV for a prefix (whole blocks).", cache.hits),
                        ("hasten_prefix_cache_hit_tokens_total", "counter",
                         "Prompt tokens not prefilled because their KV was cached.", cache.hit_tokens),
                        ("hasten_prefix_cache_bytes", "gauge", "Bytes of KV held by the prefix cache.", cache.bytes),
                        ("hasten_prefix_cache_evicted_blocks_total", "counter",
                         "Blocks evicted (least recently used first) to stay within the cache's bound.", cache.evicted),
                    ]
            lines = []
            for name, kind, help_, value in rows:
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
            name = "hasten_time_to_first_token_seconds"
            lines += [f"# HELP {name} From accepting a request to its first generated token (queue wait included).",
                      f"# TYPE {name} histogram"]
            total = 0
            for bound, count in zip([*map(str, TTFT_BUCKETS), "+Inf"], self.ttft):
                total += count
                lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
            lines += [f"{name}_sum {round(self.ttft_sum, 6)}", f"{name}_count {total}"]
        return "\n".join(lines) + "\n"
