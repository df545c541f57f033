"""hasten's CPU kernels (a small C++ extension): Y = X @ W^T straight from GGUF Q4_1 / Q8_0 blocks, RMSNorm, RoPE.

Why: decoding reads every weight once per token, and this machine streams only ~16-18 GB/s. The dequantized
fp32 weights of the default model are 540 MB (≤ 30 tokens/s); its Q4_1 blocks are 0.5625 bytes per weight.
Each weight is rebuilt in registers exactly as gguf-py's `dequantize` does, so results equal a dense fp32
matmul over the dequantized weights up to summation order, and that order does not depend on how many tokens
are scored at once (see cpu.cpp).

Why C++ and not numba (measured 2026-11-22 on this 2-core Xeon, ffn_up 1536x576, one token): numba would not
vectorise the nibble decode (≥ 1.4 ms per call in four loop shapes, vs torch fp32's ~0.15 ms), and its OpenMP
pool fought torch's for the two cores. AVX-512 intrinsics compiled once with torch's own extension builder
share torch's thread pool (at::parallel_for). The build is cached under hasten's cache dir (~1 min, once).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

QK = 32  # weights per block, both formats


@lru_cache(maxsize=1)
def extension():
    """Compile (once per machine, cached) and import the C++ kernels; None where no compiler works (torch paths
    are used then, slower but equal up to summation order)."""
    # The sparsity kernels are built into the same module: decode_block runs TEAL's sparse linears too.
    sparse = Path(__file__).resolve().parents[1] / "sparsity" / "kernels" / "sparse_cpu.cpp"
    return build_extension("hasten_cpu", [Path(__file__).with_suffix(".cpp"), sparse], "CPU kernels")


def build_extension(name: str, sources: list[Path], what: str):
    """A C++ extension built once per machine and torch version with torch's own builder (cached under
    hasten's cache dir), or None with a warning where it cannot be built (no compiler, no ninja)."""
    import sys

    try:
        from torch.utils.cpp_extension import load

        from ..models.loading import cache_dir
        build = cache_dir() / "kernels" / f"torch-{torch.__version__}" / name
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            print(f"hasten: compiling {what} once (about a minute)…", file=sys.stderr)
        native = "-march=native" if os.uname().machine in ("x86_64", "AMD64") else "-mcpu=native"
        return load(name=name, sources=[str(s) for s in sources], build_directory=str(build),
                    extra_cflags=["-O3", native, "-ffp-contract=off", "-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported platform
        import warnings
        warnings.warn(f"hasten: {what} unavailable ({type(e).__name__}: {str(e)[:200]}); using torch ops")
        return None


def repack_q4_1(raw: np.ndarray):
    """raw GGUF rows [N, nb*20] u8 → d [N, nb] f32, m [N, nb] f32, qs [N, nb, 16] u8 (values unchanged)."""
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
    return d, m, np.ascontiguousarray(blocks[:, :, 4:20])


def repack_q8_0(raw: np.ndarray):
    """raw GGUF rows [N, nb*34] u8 → d [N, nb] f32, qs [N, nb, 32] i8."""
    blocks = raw.reshape(raw.shape[0], -1, 34)
    d = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    return d, np.ascontiguousarray(blocks[:, :, 2:34]).view(np.int8)
