"""`python -m hasten.kernels.measure_attention [--keys 512,2048,4096,8192] [--tokens 1,8,32,64,512] [--threads 2]`:
per-call time of attention for T new tokens over S keys (the last T of them the new tokens', causal), at
SmolLM2-135M's shape (9 query heads, 3 KV heads, d = 64), three ways:

- `streamed`: the kernel (attention.h): KV tiles read once per query tile for the group's heads, online softmax;
- `sdpa`: torch's scaled_dot_product_attention with the bottom-right causal mask (what prompt chunks used);
- `per-node`: the same kernel called once per token over the keys that token sees — every token (a draft tree's
  node, a prompt token) reads the whole cache itself, as the per-(token, head) kernel before it did.

The three run interleaved (A B C, A B C, …) for at least --rounds rounds and --budget seconds per cell; medians.
Prints a table, then one JSON line. The machine's load average is printed before and after: rerun when it is high.

`--end-to-end [--model F] [--length 4096] [--method prompt-lookup]`: the same comparison through the whole engine.
The long suite's prompts of that length (bench/long_suite.py) are generated with a speculative method twice per
round, interleaved, its tree verified with prefix-aggregated attention (every node in one pass over the cache) and
per-node (the kernels' A/B switch: each node its own pass). The drafter forgets what it learned before every run,
so both see the same drafts; the tokens must be identical (each query's arithmetic is its own either way), and the
decode tokens/s after the first token say what aggregation saves.
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


def end_to_end(model: str | None, length: int, method: str, rounds: int, max_new_tokens: int) -> dict:
    """Decode tokens/s (after the first token) and end-to-end tokens/s of `method` on the long suite's prompts of
    `length`, prefix-aggregated vs per-node verification, interleaved; medians of per-round ratios."""
    from ..bench import long_suite
    from ..bench.runner import decode_rate
    from ..decoding.drafters.compose import forget_all
    from ..engine import load

    engine = load(model)
    ext = cpu.extension()
    prompts = long_suite.build_prompts(engine, (length,), max_new_tokens)
    modes = ("aggregated", "per-node")
    records: dict[tuple[str, int], list[dict]] = {}
    tokens: dict[tuple[str, str], list[int]] = {}

    def once(mode: str, ids: list[int]) -> dict:
        ext.set_per_node_attention(mode == "per-node")
        forget_all([engine.drafter(method)])
        try:
            r = engine.generate(ids, max_new_tokens, method)
        finally:
            ext.set_per_node_attention(False)
        return {"tokens": len(r.token_ids), "seconds": r.seconds, "first_token_seconds": r.first_token_seconds,
                "passes": r.target_passes, "ids": r.token_ids}

    for mode in modes:  # warm-up
        once(mode, prompts[0].ids[-512:])
    for rnd in range(rounds):
        for p in prompts:
            for mode in (modes if rnd % 2 == 0 else modes[::-1]):
                rec = once(mode, p.ids)
                records.setdefault((mode, rnd), []).append(rec)
                tokens.setdefault((mode, p.prompt_id), rec["ids"])
                print(f"round {rnd + 1}/{rounds} {p.prompt_id:18} {mode:10} decode "
                      f"{(rec['tokens'] - 1) / max(rec['seconds'] - rec['first_token_seconds'], 1e-9):6.1f} tok/s, "
                      f"{rec['tokens'] / rec['passes']:.2f} tokens per pass", flush=True)
    e2e = long_suite.end_to_end_rate
    out = {"model": model or "the embedded SmolLM2-135M-Instruct", "length": length,
           "method": method, "rounds": rounds, "isa": ext.isa(), "modes": {}}
    for mode in modes:
        rs = [r for rnd in range(rounds) for r in records[(mode, rnd)]]
        out["modes"][mode] = {"decode_tokens_per_s": decode_rate(rs), "tokens_per_s": e2e(rs),
                              "tokens_per_pass": sum(r["tokens"] for r in rs) / sum(r["passes"] for r in rs)}
    ratios = sorted(decode_rate(records[("aggregated", k)]) / decode_rate(records[("per-node", k)])
                    for k in range(rounds))
    e2e_ratios = sorted(e2e(records[("aggregated", k)]) / e2e(records[("per-node", k)]) for k in range(rounds))
    out["decode_speedup"] = [statistics.median(ratios), ratios[0], ratios[-1]]
    out["end_to_end_speedup"] = [statistics.median(e2e_ratios), e2e_ratios[0], e2e_ratios[-1]]
    out["identical"] = [sum(tokens[("aggregated", p.prompt_id)] == tokens[("per-node", p.prompt_id)] for p in prompts),
                        len(prompts)]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", default="512,2048,4096,8192", help="S: keys attended (cache + new tokens)")
    ap.add_argument("--tokens", default="1,8,32,64,512", help="T: new tokens scored at once")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per cell, all methods together")
    ap.add_argument("--end-to-end", action="store_true",
                    help="measure aggregated against per-node verification through the engine (see above)")
    ap.add_argument("--model", default=None, help="--end-to-end: GGUF file [default: the embedded model]")
    ap.add_argument("--length", type=int, default=4096, help="--end-to-end: prompt tokens (the long suite's)")
    ap.add_argument("--method", default="prompt-lookup", help="--end-to-end: a speculative method")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.end_to_end:
        r = end_to_end(args.model, args.length, args.method, args.rounds, args.max_new_tokens)
        print(f"{'verification':12} {'decode tok/s':>12} {'e2e tok/s':>10} {'tokens/pass':>11}")
        for mode, m in r["modes"].items():
            print(f"{mode:12} {m['decode_tokens_per_s']:12.1f} {m['tokens_per_s']:10.2f} {m['tokens_per_pass']:11.2f}")
        d, e = r["decode_speedup"], r["end_to_end_speedup"]
        print(f"aggregated / per-node: decode {d[0]:.2f}x ({d[1]:.2f}–{d[2]:.2f}), end to end {e[0]:.2f}x "
              f"({e[1]:.2f}–{e[2]:.2f}); identical tokens {r['identical'][0]}/{r['identical'][1]}")
        print(json.dumps(r))
        return
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
