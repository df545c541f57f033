"""CPU kernels for activation sparsity: y = x @ W^T that reads only the weights of active inputs, and row subsets.

Layouts. A dropped input k removes column k of W, so the sparse-input kernels keep W *transposed*, [K, N]: the
weights of one input are one contiguous row, read whole or skipped whole.
- `TransposedF32`: W^T in fp32 (any model; 4 bytes per weight read).
- `TransposedQ4`: a GGUF Q4_1 matrix transposed without changing a single weight value, tiled by 128 outputs so
  one input row of a tile is one 64-byte cache line of 4-bit codes, plus each block's fp16 scale d and minimum m
  laid out the same way. A Q4_1 block covers 32 consecutive inputs of one output row, so for the active inputs
  of a block sum_k x_k (d q_k + m) = d * sum_k x_k q_k + m * sum_k x_k: the kernel reads 0.5 byte per active
  weight plus d and m (4 bytes per output) for each block that has any active input. Dense Q4_1 reads 0.625
  bytes per weight; at 50% sparsity q4t reads ~0.375. GGUF Q4_0 uses the same layout with m = -8 d (exact:
  Q4_0's w = d (q - 8)).
- `TransposedQ8`: a GGUF Q8_0 matrix transposed without changing a value: int8 codes W^T [K, N] and the blocks'
  fp16 scales d^T [K/32, N]; sum_k x_k d q_k = d * sum_k x_k q_k over a block's active inputs. 1 byte per active
  weight plus 2 bytes per output for each block with any active input (dense Q8_0: 1.0625 bytes per weight). The
  activations stay fp32 (the dense layer's `activations="f32"` function, not its int8 "q8" path).
- `TransposedH16`: BF16 or F16 weights transposed, values unchanged, [K, N]; 2 bytes per active weight.
  Both are read in segments of up to 2048 outputs per input row, not in 64-wide tiles: on the 2-core EPYC these
  were measured on, skipping random 64-byte lines saved nothing (sparse_cpu.cpp, section 1b).
Row subsets (CATS, Deja Vu: neurons or heads chosen per token) read rows of W in the model's own layout: the
repacked Q4_1 blocks of models/quantized.py, or fp32 rows.

Why C++ (sparsity/kernels/sparse_cpu.cpp) and not numba: the layout needs a vectorised 4-bit decode that numba did not
emit when measured for the dense block kernel (kernels/cpu.py: ≥ 1.4 ms for one ffn_up call vs torch's 0.15 ms),
numba's threading layer competes with torch's pool for the two cores, and the kernel depends on explicit software
prefetch (BENCHMARKS.md: gate/up 2.3 → 1.3 ms per step at 50%), which numba cannot express. The C++ kernels share
torch's pool (at::parallel_for) and use AVX-512 intrinsics; they are compiled once per machine with torch's
extension builder (kernels/cpu.py::build_extension); where no compiler works, `extension()` returns None and the
sparse modules compute the same function with torch (masked input times the dense weight).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

QK = 32  # inputs per Q4_1 block


@lru_cache(maxsize=1)
def extension():
    """The compiled kernels (built once per machine and torch version), or None where they cannot be built."""
    from ...kernels.cpu import extension as cpu_extension
    return cpu_extension()  # one extension holds the dense and the sparse kernels (kernels/cpu.py)


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


TILE = 128  # outputs per tile: one 64-byte cache line of 4-bit codes per input row


@dataclass(frozen=True)
class TransposedQ4:
    """GGUF Q4_1 weights laid out for reading by input channel, tile by tile (values unchanged).

    Outputs are cut into tiles of 128 (the last may be 64 wide). Within a tile the codes of one input row are one
    64-byte cache line (byte j: output j in the low nibble, output j+64 in the high one), rows follow each other,
    and tiles follow each other: a thread owning a tile streams one contiguous region and skips a whole line per
    dropped input. The blocks' fp16 scale d and minimum m are laid out the same way, [tile][K/32][width].
    """
    q: torch.Tensor  # u8 [K * N / 2]
    d: torch.Tensor  # f16 [K/32 * N]
    m: torch.Tensor  # f16 [K/32 * N]
    k: int
    n: int

    @classmethod
    def from_q4_1(cls, d: torch.Tensor, m: torch.Tensor, qs: torch.Tensor) -> "TransposedQ4":
        """From hasten's repacked Q4_1 blocks: d, m [N, K/32] f32 (exact fp16 values), qs [N, K/32, 16] u8."""
        n, nb = d.shape
        if n % 64:
            raise ValueError(f"q4t needs the output count to be a multiple of 64 (got {n})")
        raw = qs.numpy()
        codes = np.concatenate([raw & 15, raw >> 4], axis=2).reshape(n, nb * QK)  # [N, K] codes 0..15
        q_parts, d_parts, m_parts = [], [], []
        dh, mh = d.numpy().astype(np.float16), m.numpy().astype(np.float16)
        for n0 in range(0, n, TILE):
            w = min(TILE, n - n0)
            ct = codes[n0:n0 + w].T  # [K, w]
            q_parts.append((ct[:, : w // 2] | (ct[:, w // 2:] << 4)).astype(np.uint8).ravel())
            d_parts.append(np.ascontiguousarray(dh[n0:n0 + w].T).ravel())  # [K/32, w]
            m_parts.append(np.ascontiguousarray(mh[n0:n0 + w].T).ravel())
        return cls(torch.from_numpy(np.concatenate(q_parts)), torch.from_numpy(np.concatenate(d_parts)),
                   torch.from_numpy(np.concatenate(m_parts)), nb * QK, n)

    @classmethod
    def from_q4_0(cls, blocks: torch.Tensor) -> "TransposedQ4":
        """From GGUF Q4_0 blocks [N, K/32 * 18] u8 (fp16 d, then 16 bytes of codes): w = d (q - 8) = d q + m with
        m = -8 d, which fp16 holds exactly (a power-of-two multiple), so every weight is unchanged."""
        n = blocks.shape[0]
        b = blocks.numpy().reshape(n, -1, 18)
        dh = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16)[:, :, 0]
        with np.errstate(over="ignore"):
            mh = dh * np.float16(-8)
        if not np.array_equal(mh.astype(np.float32), dh.astype(np.float32) * -8):
            raise ValueError("a Q4_0 scale is too large for m = -8 d in fp16")
        return cls.from_q4_1(torch.from_numpy(dh.astype(np.float32)), torch.from_numpy(mh.astype(np.float32)),
                             torch.from_numpy(np.ascontiguousarray(b[:, :, 2:18])))

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32 with gguf-py's arithmetic (fp32(d*q) + m): the reference the kernel must match."""
        k, n, nb = self.k, self.n, self.k // QK
        q, d, m = self.q.numpy(), self.d.numpy(), self.m.numpy()
        out = np.empty((n, k), np.float32)
        qo = so = 0
        for n0 in range(0, n, TILE):
            w = min(TILE, n - n0)
            seg = q[qo: qo + k * w // 2].reshape(k, w // 2)
            codes = np.concatenate([seg & 15, seg >> 4], axis=1).astype(np.float32)  # [K, w]
            dd = np.repeat(d[so: so + nb * w].reshape(nb, w).astype(np.float32), QK, axis=0)
            mm = np.repeat(m[so: so + nb * w].reshape(nb, w).astype(np.float32), QK, axis=0)
            out[n0:n0 + w] = (dd * codes + mm).T
            qo += k * w // 2
            so += nb * w
        return torch.from_numpy(out)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.d.numel() * 2


@dataclass(frozen=True)
class TransposedQ8:
    """GGUF Q8_0 weights laid out for reading by input channel (values unchanged): codes q i8 W^T [K, N] and the
    blocks' fp16 scales d [K/32, N]; w[n, k] = d[k/32, n] * q[k, n], exactly as the file's blocks."""
    q: torch.Tensor  # i8 [K, N]
    d: torch.Tensor  # f16 [K/32, N]
    k: int
    n: int

    @classmethod
    def from_q8_0(cls, blocks: torch.Tensor) -> "TransposedQ8":
        """From GGUF Q8_0 blocks [N, K/32 * 34] u8 (fp16 d, then 32 int8 codes)."""
        n = blocks.shape[0]
        if n % 64:
            raise ValueError(f"q8t needs the output count to be a multiple of 64 (got {n})")
        b = blocks.numpy().reshape(n, -1, 34)
        nb = b.shape[1]
        d = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16)[:, :, 0]  # [N, K/32]
        q = np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(n, nb * QK)  # [N, K]
        return cls(torch.from_numpy(np.ascontiguousarray(q.T)), torch.from_numpy(np.ascontiguousarray(d.T)), nb * QK, n)

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32 as gguf-py computes it (fp32(d) * q): the reference the kernel must match."""
        d = np.repeat(self.d.numpy().astype(np.float32), QK, axis=0)  # [K, N]
        return torch.from_numpy(np.ascontiguousarray((d * self.q.numpy().astype(np.float32)).T))

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.d.numel()


@dataclass(frozen=True)
class TransposedH16:
    """BF16 or F16 weights laid out for reading by input channel (values unchanged): W^T [K, N] in the file's own
    dtype (torch.bfloat16 or torch.float16)."""
    wt: torch.Tensor  # bf16 or f16 [K, N]
    k: int
    n: int

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, qtype: str) -> "TransposedH16":
        """From a BF16 or F16 GGUF tensor [N, 2K] u8 (plain 16-bit values, row-major)."""
        n = blocks.shape[0]
        if n % 64:
            raise ValueError(f"h16t needs the output count to be a multiple of 64 (got {n})")
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[qtype]
        bits = blocks.numpy().view(np.int16).reshape(n, -1)  # [N, K], the values' bits unchanged
        return cls(torch.from_numpy(np.ascontiguousarray(bits.T)).view(dtype), bits.shape[1], n)

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32 (exact: both 16-bit types widen to fp32 without rounding)."""
        return self.wt.float().t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.wt.numel() * 2


def kernel_args(weight) -> tuple:
    """(the extension's sparse-input kernel for this layout, its weight arguments after x and the threshold)."""
    ext = extension()
    if isinstance(weight, TransposedQ4):
        return ext.q4t_sparse_in, (weight.q, weight.d, weight.m, weight.k, weight.n)
    if isinstance(weight, TransposedQ8):
        return ext.q8t_sparse_in, (weight.q, weight.d, weight.k, weight.n)
    if isinstance(weight, TransposedH16):
        return ext.h16t_sparse_in, (weight.wt, weight.k, weight.n)
    return ext.f32t_sparse_in, (weight.wt,)


def sparse_in(x: torch.Tensor, threshold: float, weight) -> torch.Tensor:
    """x [T, K] f32 contiguous → y [T, N]: each token's inputs with |x| ≤ threshold are dropped, and only the weight
    rows of inputs some token keeps are read. Needs the extension (callers check `extension()` first)."""
    kernel, args = kernel_args(weight)
    return kernel(x, float(threshold), *args)
