"""Sparse kernels vs dense matmul on the default model's real layer shapes: `python -m hasten.sparsity.measure`.

For each shape (q/k/v/o, gate/up, down) and sparsity, times y = W·x for T tokens three ways:
- torch: F.linear on the dense fp32 weight (what a plain PyTorch model runs),
- block: hasten's dense Q4_1 block kernel (what hasten's baseline runs),
- sparse: the sparse-input kernel on the transposed Q4_1 layout (reads only the kept inputs' weights).
Inputs are each layer's real activations on held-out text (the default), so the union of active channels over T
tokens is what decoding would see; `--random` uses Gaussian inputs. Every timing sweeps the same layer of all
blocks, as a decode step does, so weights stream from memory instead of sitting warm in cache (a single-layer
loop would flatter every method equally but hide what memory costs). Each time is the median of the repeats. Prints a Markdown table (and --json FILE for the raw numbers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

SPARSITIES = (0.0, 0.25, 0.40, 0.50, 0.65, 0.80)
LAYERS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "o_proj": "self_attn.o_proj",
          "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}


def _time(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _real_inputs(engine, tokens: int = 256) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, name) → that linear's inputs on held-out text [tokens, K] (the dense model's activations)."""
    from .calibrate import SEQ_LEN, forward_over
    from .corpus import load
    chunks = load().token_chunks(engine.tokenizer, "heldout", tokens, SEQ_LEN)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = [block.get_submodule(path).register_forward_pre_hook(
        lambda m, a, key=(i, name): seen.setdefault(key, []).append(a[0][0].clone()))
        for i, block in enumerate(engine.model.layers) for name, path in LAYERS.items()]
    forward_over(engine.model, chunks, hooks)
    return {k: torch.cat(v) for k, v in seen.items()}


def measure(engine, tokens=(1, 4, 8), sparsities=SPARSITIES, repeats: int = 30, real: bool = True) -> list[dict]:
    """Each timing calls the layer of that name in every block in turn, as decoding does, so the weights come
    from memory rather than from a cache still warm from the previous call; reported per call."""
    from .kernels import cpu as sparse_cpu
    from .modules import transposed_layout
    blocks = engine.model.layers
    inputs = _real_inputs(engine) if real else {}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, path in LAYERS.items():
        linears = [block.get_submodule(path) for block in blocks]
        layouts = [transposed_layout(lin) for lin in linears]
        K, N = linears[0].in_features, linears[0].out_features
        for T in tokens:
            xs = [inputs[(i, name)][100: 100 + T].contiguous() if real else torch.randn(T, K, generator=gen)
                  for i in range(len(blocks))]
            for s in sparsities:
                thrs = [float(x.abs().flatten().quantile(s)) if s > 0 else -1.0 for x in xs]
                union = sum(float((x.abs() > t).any(0).float().mean()) for x, t in zip(xs, thrs)) / len(xs)
                calls = list(zip(linears, layouts, xs, thrs))
                t_torch = _time(lambda: [F.linear(x, lin.weight) for lin, _, x, _ in calls], repeats)
                t_block = _time(lambda: [lin(x) for lin, _, x, _ in calls], repeats)
                t_sparse = _time(lambda: [sparse_cpu.sparse_in(x, t, lay) for _, lay, x, t in calls], repeats)
                n = len(calls)
                rows.append({"layer": name, "shape": f"{K}x{N}", "tokens": T, "sparsity": s, "union_active": union,
                             "torch_us": t_torch / n * 1e6, "block_us": t_block / n * 1e6, "sparse_us": t_sparse / n * 1e6})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | K×N | T | sparsity | active (union) | torch fp32 µs | block Q4_1 µs | sparse µs | vs torch | vs block |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['tokens']} | {r['sparsity']:.0%} | {r['union_active']:.0%} | "
                     f"{r['torch_us']:.1f} | {r['block_us']:.1f} | {r['sparse_us']:.1f} | "
                     f"{r['torch_us'] / r['sparse_us']:.2f}x | {r['block_us'] / r['sparse_us']:.2f}x |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per (T, sparsity): q, k, o, up, down plus v (= k's shape) and gate (= up's) — one block's seven linears."""
    out = ["| T | sparsity | torch fp32 µs | block Q4_1 µs | sparse µs | vs torch | vs block |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["tokens"], r["sparsity"]) for r in rows})
    for T, s in keys:
        sel = [r for r in rows if r["tokens"] == T and r["sparsity"] == s]
        twice = {"k_proj", "up_proj"}  # v_proj and gate_proj have the same shapes
        a, b, c = (sum(r[k] * (2 if r["layer"] in twice else 1) for r in sel) for k in ("torch_us", "block_us", "sparse_us"))
        out.append(f"| {T} | {s:.0%} | {a:.0f} | {b:.0f} | {c:.0f} | {a / c:.2f}x | {b / c:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--random", action="store_true", help="Gaussian inputs instead of real activations")
    ap.add_argument("--tokens", default="1,4,8")
    ap.add_argument("--json", help="write the raw rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..engine import load
    engine = load()
    rows = measure(engine, tuple(int(t) for t in args.tokens.split(",")), repeats=args.repeats, real=not args.random)
    print(f"threads={args.threads} inputs={'random' if args.random else 'real (held-out text, every layer)'}\n")
    print(markdown(rows))
    print()
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
