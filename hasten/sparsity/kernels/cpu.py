"""CPU kernels for activation sparsity: y = x @ W^T that reads only the weights of active inputs, and row subsets.

Layouts. A dropped input k removes column k of W, so the sparse-input kernels keep W *transposed*, [K, N]: the
weights of one input are one contiguous row, read whole or skipped whole.
- `TransposedF32`: W^T in fp32 (any model; 4 bytes per weight read).
- `TransposedQ4`: a GGUF Q4_1 matrix transposed without changing a single weight value: the 4-bit codes of W^T
  packed two per byte along the outputs, plus each block's fp16 scale d and minimum m laid out [K/32, N]. A Q4_1
  block covers 32 consecutive inputs of one output row, so for the active inputs of a block
  sum_k x_k (d q_k + m) = d * sum_k x_k q_k + m * sum_k x_k: the kernel reads 0.5 byte per active weight plus
  d and m (4 bytes per output) for each block that has any active input. Dense Q4_1 reads 0.5625 bytes per
  weight (0.75 in hasten's repacked fp32-scale layout); at 50% sparsity q4t reads ~0.375.
Row subsets (CATS, Deja Vu: neurons or heads chosen per token) read rows of W in the model's own layout: the
repacked Q4_1 blocks of models/quantized.py, or fp32 rows.

Why C++ (sparsity/kernels/cpu.cpp) and not numba — measured with `python -m hasten.sparsity.measure` on this
2-core AVX-512 Xeon (BENCHMARKS.md has the table; the numba twins below exist for that comparison): numba
vectorises the fp32 loop but not the nibble decode of q4t, and its threading layer competes with torch's pool
for the two cores; the C++ kernels share torch's pool (at::parallel_for) and use AVX-512 intrinsics. The
extension is compiled once per machine with torch's extension builder and cached under hasten's cache dir;
where no compiler works, `extension()` returns None and the sparse modules compute the same function with
torch (masked input times the dense weight).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

QK = 32  # inputs per Q4_1 block


@lru_cache(maxsize=1)
def extension():
    """The compiled kernels (built once per machine and torch version), or None where they cannot be built."""
    try:
        return _build()
    except Exception as e:  # no compiler, no ninja, unsupported platform
        import warnings
        warnings.warn(f"hasten: sparse CPU kernels unavailable ({type(e).__name__}: {str(e)[:200]}); using torch ops")
        return None


def _build():
    import sys

    from torch.utils.cpp_extension import load

    from ...models.loading import cache_dir

    build = cache_dir() / "kernels" / f"torch-{torch.__version__}" / "sparse"
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob("*.so")):
        print("hasten: compiling sparse CPU kernels once (about a minute)…", file=sys.stderr)
    native = "-march=native" if os.uname().machine in ("x86_64", "AMD64") else "-mcpu=native"
    return load(name="hasten_sparse_cpu", sources=[str(Path(__file__).with_suffix(".cpp"))], build_directory=str(build),
                extra_cflags=["-O3", native, "-ffp-contract=off", "-fopenmp"], verbose=False)


# ---- weight layouts -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TransposedF32:
    wt: torch.Tensor  # [K, N] fp32

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "TransposedF32":
        return cls(weight.detach().float().t().contiguous())

    @property
    def nbytes(self) -> int:
        return self.wt.numel() * 4


@dataclass(frozen=True)
class TransposedQ4:
    q: torch.Tensor  # [K, N/2] u8: byte j of each 32-output group holds output j (low nibble) and j+16 (high)
    d: torch.Tensor  # [K/32, N] fp16: block scale, per input block and output
    m: torch.Tensor  # [K/32, N] fp16: block minimum

    @classmethod
    def from_q4_1(cls, d: torch.Tensor, m: torch.Tensor, qs: torch.Tensor) -> "TransposedQ4":
        """From hasten's repacked Q4_1 blocks: d, m [N, K/32] f32 (exact fp16 values), qs [N, K/32, 16] u8."""
        n, nb = d.shape
        if n % QK:
            raise ValueError(f"q4t needs the output count to be a multiple of {QK} (got {n})")
        raw = qs.numpy()
        codes = np.concatenate([raw & 15, raw >> 4], axis=2).reshape(n, nb * QK)  # [N, K] codes 0..15
        ct = np.ascontiguousarray(codes.T).reshape(nb * QK, n // QK, 2, 16)  # [K, groups, half, 16]
        packed = (ct[:, :, 0, :] | (ct[:, :, 1, :] << 4)).astype(np.uint8).reshape(nb * QK, n // 2)
        return cls(torch.from_numpy(packed), d.t().contiguous().half(), m.t().contiguous().half())

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32 with gguf-py's arithmetic (fp32(d*q) + m): the reference the kernel must match."""
        raw = self.q.numpy()
        k, half = raw.shape
        groups = raw.reshape(k, half // 16, 16)
        codes = np.concatenate([groups & 15, groups >> 4], axis=2).reshape(k, half * 2).astype(np.float32)  # [K, N]
        d = np.repeat(self.d.float().numpy(), QK, axis=0)  # [K, N]
        m = np.repeat(self.m.float().numpy(), QK, axis=0)
        return torch.from_numpy((d * codes + m).T.copy())

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.d.numel() * 2


def sparse_in(x: torch.Tensor, threshold: float, weight) -> torch.Tensor:
    """x [T, K] f32 contiguous → y [T, N]: each token's inputs with |x| ≤ threshold are dropped, and only the weight
    rows of inputs some token keeps are read. Needs the extension (callers check `extension()` first)."""
    ext = extension()
    if isinstance(weight, TransposedQ4):
        return ext.q4t_sparse_in(x, float(threshold), weight.q, weight.d, weight.m)
    return ext.f32t_sparse_in(x, float(threshold), weight.wt)


# ---- numba twins: the same algorithms, kept to measure numba against C++ (see the module docstring) -------------

def numba_kernels():
    """(f32t, q4t) numba functions over numpy arrays — f32t(x, thr, wt), q4t(x, thr, q, d_f32, m_f32) — or None
    where numba is missing."""
    try:
        import numba
    except ImportError:
        return None
    return _numba_kernels(numba)


@lru_cache(maxsize=1)
def _numba_kernels(numba):
    @numba.njit(cache=True)
    def select(x, thr):
        T, K = x.shape
        idx = np.empty(K, np.int64)
        xs = np.zeros((K, T), np.float32)
        a = 0
        for k in range(K):
            keep = False
            for t in range(T):
                keep |= abs(x[t, k]) > thr
            if keep:
                idx[a] = k
                for t in range(T):
                    v = x[t, k]
                    xs[a, t] = v if abs(v) > thr else 0.0
                a += 1
        return idx[:a], xs[:a]

    @numba.njit(parallel=True, cache=True)
    def f32t(x, thr, wt):
        idx, xs = select(x, thr)
        T, N = x.shape[0], wt.shape[1]
        y = np.zeros((T, N), np.float32)
        for tile in numba.prange((N + 63) // 64):
            n0, n1 = tile * 64, min(N, tile * 64 + 64)
            for t in range(T):
                for a in range(idx.shape[0]):
                    xv, row = xs[a, t], idx[a]
                    for j in range(n0, n1):
                        y[t, j] += xv * wt[row, j]
        return y

    @numba.njit(parallel=True, cache=True)
    def q4t(x, thr, q, d, m):
        idx, xs = select(x, thr)
        T, N = x.shape[0], q.shape[1] * 2
        y = np.zeros((T, N), np.float32)
        for tile in numba.prange(N // 64):
            acc = np.empty(64, np.float32)
            for t in range(T):
                a = 0
                while a < idx.shape[0]:
                    b = idx[a] // 32
                    acc[:] = 0.0
                    sx = np.float32(0.0)
                    while a < idx.shape[0] and idx[a] // 32 == b:
                        xv = xs[a, t]
                        base = tile * 32
                        for g in range(2):
                            for j in range(16):
                                c = q[idx[a], base + g * 16 + j]
                                acc[g * 32 + j] += np.float32(c & 15) * xv
                                acc[g * 32 + j + 16] += np.float32(c >> 4) * xv
                        sx += xv
                        a += 1
                    for j in range(64):
                        n = tile * 64 + j
                        y[t, n] += d[b, n] * acc[j] + m[b, n] * sx
        return y

    return f32t, q4t
