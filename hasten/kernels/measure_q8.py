"""`python -m hasten.kernels.measure_q8 [--formats Q4_K,Q6_K] [--tokens 1,8,64,512] [--threads 2]`: per-call time
of one block_matmul in the fp32 path (weights rebuilt as fp32, FMAs) against the q8 path (activations quantized
to int8 per group, integer dot products: formats/q8.h), per format, at SmolLM2-135M's linear shapes and one 8B
MLP shape, on random weights (speed depends on shapes, not values).

Minimum over repeats (at least 3, until --budget seconds per cell and path): the two cores are shared with other work, and the
minimum is the least disturbed run. The load average is printed before and after; rerun when it is high.

`--quality MODEL …` (a GGUF file, or "default" for the embedded model) measures what q8 costs instead: the
q8 model against the f32 one, teacher-forced on the held-out split of the sparsity corpus (sparsity/quality.py:
mean KL(f32 ‖ q8) in nats, top-1 agreement, perplexities).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from . import cpu
from .formats import Q8_ACTIVATIONS, Q8_FORMATS, block_format, random_blocks

SHAPES = ((576, 1536), (1536, 576), (576, 49152), (4096, 14336))  # (in K, out N): SmolLM2 up/down/lm-head, 8B up


def per_call(fn, budget: float = 0.4, least: int = 3, most: int = 500) -> float:
    fn()  # warm: first touch of the weights, the pool's threads
    times, spent = [], 0.0
    while len(times) < least or (spent < budget and len(times) < most):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(Q8_FORMATS))
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,…")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.4, help="seconds of repeats per cell and path")
    ap.add_argument("--quality", nargs="+", metavar="MODEL", default=None)
    ap.add_argument("--quality-tokens", type=int, default=4096)
    ap.add_argument("--decode", nargs="+", metavar="MODEL", default=None,
                    help="end to end: greedy decode tokens/s and a 512-token prefill, f32 and q8 in interleaved rounds")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quality:
        return quality(args.quality, args.quality_tokens)
    if args.decode:
        return decode(args.decode)
    ext = cpu.extension()
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"build {ext.isa()}, torch {torch.__version__}, {args.threads} threads; load average {os.getloadavg()}")
    print(f"{'format':6} {'K→N':>11} " + " ".join(f"{'T=' + str(t) + ' f32/q8 ms':>22}" for t in tokens))
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for name in args.formats.split(","):
            fmt = block_format(name)
            for k, n in shapes:
                if k % fmt.block_weights:  # K-quants need K a multiple of 256 (SmolLM2's 576 inputs are not)
                    continue
                w = torch.from_numpy(random_blocks(name, n, k, rng))
                cells = []
                for t in tokens:
                    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
                    f32 = per_call(lambda: ext.block_matmul(x, w, fmt.id), args.budget)
                    q8 = per_call(lambda: ext.block_matmul(x, w, fmt.id | Q8_ACTIVATIONS), args.budget)
                    cells.append(f"{1e3 * f32:8.3f}/{1e3 * q8:<8.3f}{f32 / q8:4.2f}x")
                print(f"{name:6} {f'{k}→{n}':>11} " + " ".join(f"{c:>22}" for c in cells), flush=True)
    print(f"load average {os.getloadavg()}")



def decode(models: list[str], rounds: int = 3, tokens: int = 64) -> None:
    """Per model: prefill of 512 random tokens and greedy decode of `tokens` tokens, f32 and q8 alternating in each
    round (one process, one set of weights); medians over rounds."""
    import statistics

    import hasten
    from ..models.quantized import set_activations
    print(f"load average {os.getloadavg()}, {torch.get_num_threads()} threads")
    print(f"{'model':28} {'decode tok/s f32':>16} {'q8':>8} {'ratio':>6} {'prefill tok/s f32':>18} {'q8':>8} {'ratio':>6}")
    for name in models:
        engine = hasten.load(None if name == "default" else name)
        ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(0))
        res = {m: {"decode": [], "prefill": []} for m in ("f32", "q8")}
        for _ in range(rounds + 1):  # the first round warms up
            for mode in ("f32", "q8"):
                set_activations(engine.model, mode)
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    engine.model(ids, cache=engine.model.new_cache(600))
                    res[mode]["prefill"].append(512 / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                out = engine.generate("The history of the printing press", max_new_tokens=tokens, chat=False)
                res[mode]["decode"].append(len(out.token_ids) / (time.perf_counter() - t0))
        set_activations(engine.model, None)
        med = {m: {k: statistics.median(v[1:]) for k, v in r.items()} for m, r in res.items()}
        print(f"{engine.name:28} {med['f32']['decode']:16.1f} {med['q8']['decode']:8.1f} "
              f"{med['q8']['decode'] / med['f32']['decode']:5.2f}x {med['f32']['prefill']:18.0f} {med['q8']['prefill']:8.0f} "
              f"{med['q8']['prefill'] / med['f32']['prefill']:5.2f}x", flush=True)
    print(f"load average {os.getloadavg()}")


def quality(models: list[str], tokens: int) -> None:
    import hasten
    from ..models.quantized import activation_summary, set_activations
    from ..sparsity import corpus as corpus_mod
    from ..sparsity.calibrate import SEQ_LEN
    from ..sparsity.quality import compare
    source = corpus_mod.load()
    print(f"q8 against f32, teacher-forced on {tokens} held-out tokens of {source.name} (windows of {SEQ_LEN})")
    print(f"{'model':34} {'q8 layers':28} {'mean KL nats':>12} {'top-1 agree':>11} {'ppl f32':>8} {'ppl q8':>8}")
    for name in models:
        engine = hasten.load(None if name == "default" else name, activations="f32")
        model = engine.model

        def run(mode):
            def forward(x):
                set_activations(model, mode)
                return model(x)
            return forward

        set_activations(model, "q8")
        q8_layers = activation_summary(model)
        chunks = source.token_chunks(engine.tokenizer, "heldout", tokens, SEQ_LEN)
        r = compare(run("f32"), run("q8"), chunks, source.name)
        set_activations(model, "f32")
        print(f"{engine.name:34} {q8_layers:28} {r.mean_kl:12.2e} {r.top1_agreement:11.4f} {r.dense_perplexity:8.3f} "
              f"{r.perplexity:8.3f}", flush=True)


if __name__ == "__main__":
    main()
