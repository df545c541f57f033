"""`python -m hasten.kernels.measure`: the block kernel against torch's fp32 matmul on the model's real linear
layers, and the target's whole step time against tokens scored (the cost model behind draft sizes).

All layers are run in model order (so weights stream from memory as in decoding, not from cache), kernel and
torch interleaved, medians over repeats.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F


def main(sizes=(1, 2, 4, 8, 16), repeats: int = 7) -> None:
    import hasten
    from hasten.decoding.controller import measure_step_cost
    from hasten.models.quantized import QuantLinear

    engine = hasten.load()
    linears = [m for m in engine.model.modules() if isinstance(m, QuantLinear)]
    dense = [m.weight for m in linears]  # the torch reference needs dense copies: made here, for this measurement
    weight_bytes = sum(w.numel() * 4 for w in dense)
    block_bytes = sum(m.nbytes for m in linears)
    print(f"{engine.name}: {len(linears)} linear layers; fp32 {weight_bytes / 1e6:.0f} MB, blocks {block_bytes / 1e6:.0f} MB; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>6} {'kernel ms':>10} {'torch ms':>9} {'speedup':>8} {'kernel GB/s':>12}")
    with torch.inference_mode():
        for t in sizes:
            xs = [torch.randn(1, t, m.in_features) for m in linears]
            kern, dense = [], []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                for m, x in zip(linears, xs):
                    m(x)
                kern.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for w, x in zip(dense, xs):
                    F.linear(x, w)
                dense.append(time.perf_counter() - t0)
            k, d = statistics.median(kern[1:]), statistics.median(dense[1:])
            print(f"{t:>6} {1e3 * k:>10.1f} {1e3 * d:>9.1f} {d / k:>7.2f}x {block_bytes / k / 1e9:>12.1f}")
    costs = measure_step_cost(engine.model)
    print("\ntarget step (whole forward, 256 cached tokens) vs tokens scored:")
    print("  " + "  ".join(f"{t}: {1e3 * s:.1f} ms ({s / costs[1]:.2f}x)" for t, s in costs.items()))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    main()
