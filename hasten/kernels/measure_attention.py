"""`python -m hasten.kernels.measure_attention [--keys 512,2048,4096,8192] [--tokens 1,8,32,64,512] [--threads 2]`:
per-call time of attention for T new tokens over S keys (the last T of them the new tokens', causal), at
SmolLM2-135M's shape (9 query heads, 3 KV heads, d = 64), three ways:

- `streamed`: the kernel (attention.h): KV tiles read once per query tile for the group's heads, online softmax;
- `sdpa`: torch's scaled_dot_product_attention with the bottom-right causal mask (what prompt chunks used);
- `per-node`: the same kernel called once per token over the keys that token sees — every token (a draft tree's
  node, a prompt token) reads the whole cache itself, as the per-(token, head) kernel before it did.

The three run interleaved (A B C, A B C, …) for at least --rounds rounds and --budget seconds per cell; medians.
Prints a table, then one JSON line. The machine's load average is printed before and after: rerun when it is high.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from . import cpu

H, HKV, D = 9, 3, 64
METHODS = ("streamed", "sdpa", "per-node")


def cell(ext, S: int, T: int, rounds: int, budget: float) -> dict[str, float]:
    """Median seconds per call of each method for T tokens over S keys."""
    g = torch.Generator().manual_seed(S * 1000 + T)
    k, v = torch.randn(HKV, S, D, generator=g), torch.randn(HKV, S, D, generator=g)  # [Hkv, S, d]: a cache
    q = torch.randn(T, H, D, generator=g)  # [T, H, d]
    scale = D ** -0.5
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T) if T > 1 else None  # [T, S]
    qh, kh, vh = q.transpose(0, 1)[None], k[None], v[None]  # [1, H, T, d], [1, Hkv, S, d]
    rows = [q[t:t + 1].contiguous() for t in range(T)]
    fns = {
        "streamed": lambda: ext.attend(q, k, v, S, None, scale),
        "sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True),
        "per-node": lambda: [ext.attend(rows[t], k, v, S - T + t + 1, None, scale) for t in range(T)],
    }
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for fn in fns.values():
        fn()  # warm up
    spent, r = 0.0, 0
    while r < rounds or spent < budget:
        for m in METHODS:
            t0 = time.perf_counter()
            fns[m]()
            dt = time.perf_counter() - t0
            times[m].append(dt)
            spent += dt
        r += 1
    return {m: statistics.median(v) for m, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", default="512,2048,4096,8192", help="S: keys attended (cache + new tokens)")
    ap.add_argument("--tokens", default="1,8,32,64,512", help="T: new tokens scored at once")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per cell, all methods together")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ext = cpu.extension()
    if ext is None:
        raise SystemExit("the CPU kernels could not be built here (see the warning above); nothing to measure")
    keys = [int(s) for s in args.keys.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"build {ext.isa()}, torch {torch.__version__}, {args.threads} threads, H={H} Hkv={HKV} d={D}; "
          f"load average {os.getloadavg()}")
    print(f"{'S':>6} {'T':>5} " + " ".join(f"{m + ' ms':>12}" for m in METHODS) + f" {'vs sdpa':>8} {'vs per-node':>11}")
    results = []
    with torch.inference_mode():
        for S in keys:
            for T in tokens:
                if T > S:
                    continue
                t = cell(ext, S, T, args.rounds, args.budget)
                results.append({"S": S, "T": T, **{m: t[m] for m in METHODS}})
                print(f"{S:6} {T:5} " + " ".join(f"{1e3 * t[m]:12.3f}" for m in METHODS)
                      + f" {t['sdpa'] / t['streamed']:7.2f}x {t['per-node'] / t['streamed']:10.2f}x", flush=True)
    print(f"load average {os.getloadavg()}")
    print(json.dumps({"isa": ext.isa(), "threads": args.threads, "shape": {"H": H, "Hkv": HKV, "d": D},
                      "seconds_per_call": results}))


if __name__ == "__main__":
    main()
