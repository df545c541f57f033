"""`hasten speed`: the model's raw speed on this machine, as llama.cpp's `llama-bench` measures it, side by side.

- prefill: one forward over P random prompt tokens (tokens/s), like `llama-bench -p P -n 0` (after D tokens
  with a depth, as `llama-bench -d D` does);
- decode: N tokens one at a time after a one-token prompt, each the argmax of the last (tokens/s), like
  `llama-bench -p 0 -n N` (no sampling, no detokenizing: the model's step time alone); with a depth D, after D
  cached tokens of random context (not timed), like `llama-bench -d D -n N`: what decoding costs deep in a
  long prompt;
- step cost: one forward over T new tokens (`step_sizes`, default 1, 2, 4, 8) after 256 cached ones, relative to
  T = 1 (what draft trees and batches pay; hasten's own measurement, decoding/controller.py);
- peak RSS of this process (one model per run, so it is this model's).
With `--llama-bench PATH`, each round runs hasten, then llama-bench on the same file with the same thread
count, so a slow minute of the machine hurts both (MEASURING.md); medians over rounds, min–max beside them.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import time

import torch


def _context(model, cache, depth: int) -> None:
    """`depth` random tokens into the cache, in chunks as a long prompt is prefilled (not timed)."""
    for at in range(0, depth, 512):
        model(torch.randint(0, model.config.vocab_size, (1, min(512, depth - at))), cache=cache, last_only=True)


def hasten_prefill(model, tokens: int, depth: int = 0) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    cache = model.new_cache(depth + tokens + 1)
    with torch.inference_mode():
        _context(model, cache, depth)
        t0 = time.perf_counter()
        model(ids, cache=cache, last_only=True)
        return tokens / (time.perf_counter() - t0)


def hasten_decode(model, tokens: int, depth: int = 0) -> float:
    cache = model.new_cache(depth + tokens + 2)
    token = torch.tensor([[1]])
    with torch.inference_mode():
        _context(model, cache, depth)
        model(token, cache=cache)
        t0 = time.perf_counter()
        for _ in range(tokens):
            token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        return tokens / (time.perf_counter() - t0)


def llama_bench(binary: str, path: str, threads: int, prefill: int, decode: int, depth: int = 0) -> tuple[float, float]:
    """llama-bench's (prefill, decode) tokens/s for one repetition of each test (both after `depth` tokens)."""
    out = subprocess.run([binary, "-m", path, "-t", str(threads), "-p", str(prefill), "-n", str(decode), "-r", "1",
                          "-o", "json"] + (["-d", str(depth)] if depth else []),
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {out.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(out.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    return pp, tg


def run(engine, path: str | None, threads: int, prefill: int, decode: int, rounds: int,
        llama_bench_path: str | None, progress=print, step_sizes: tuple[int, ...] = (1, 2, 4, 8),
        depth: int = 0) -> dict:
    from ..decoding.controller import measure_step_cost
    model = engine.model
    hasten_prefill(model, min(prefill, 32))  # warm-up: first calls pay for allocation
    hasten_decode(model, 4)
    rows = {"hasten prefill": [], "hasten decode": [], "llama.cpp prefill": [], "llama.cpp decode": []}
    for r in range(rounds):
        rows["hasten prefill"].append(hasten_prefill(model, prefill, depth))
        rows["hasten decode"].append(hasten_decode(model, decode, depth))
        if llama_bench_path:
            pp, tg = llama_bench(llama_bench_path, path, threads, prefill, decode, depth)
            rows["llama.cpp prefill"].append(pp)
            rows["llama.cpp decode"].append(tg)
        progress(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items() if v))
    costs = measure_step_cost(model, sizes=step_sizes)
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in rows.items() if v}
    return {"tokens_per_s": summary, "step_cost": {t: c / costs[1] for t, c in costs.items()},
            "step_ms": {t: 1e3 * c for t, c in costs.items()},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "prefill_tokens": prefill, "decode_tokens": decode, "depth": depth, "rounds": rounds}


def format_table(result: dict, file_mb: float | None) -> str:
    s = result["tokens_per_s"]
    lines = [f"{'':18s} {'median tok/s':>12s} {'min–max':>15s}"]
    for k, v in s.items():
        lines.append(f"{k:18s} {v['median']:12.1f} {v['min']:7.1f}–{v['max']:<7.1f}")
    for what in ("prefill", "decode"):
        if f"llama.cpp {what}" in s:
            lines.append(f"hasten / llama.cpp {what}: {s[f'hasten {what}']['median'] / s[f'llama.cpp {what}']['median']:.2f}x")
    lines.append("step cost vs tokens scored (256 cached): " +
                 ", ".join(f"{t}: {result['step_ms'][t]:.1f} ms ({c:.2f}x)" for t, c in result["step_cost"].items()))
    rss = f"peak RSS {result['peak_rss_mb']:.0f} MB"
    if file_mb:
        rss += f" for a {file_mb:.0f} MB file (bound 1.3 x file + 512 MB = {1.3 * file_mb + 512:.0f} MB)"
    lines.append(rss)
    return "\n".join(lines)
