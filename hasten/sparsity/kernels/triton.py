"""Triton kernel for activation-sparse matmul (TEAL): y = x_masked @ W^T reading only the weights of active inputs.

What it computes. x [T, K] (T tokens, a handful when decoding), a threshold thr >= 0, and Wt = W^T [K, N]
(fp32, fp16 or bf16; one contiguous row per input channel). Input channel k is *active* if |x[t, k]| > thr for
any token t (the union over tokens). Then

    y[t, n] = sum over active k of xm[t, k] * Wt[k, n],   xm[t, k] = x[t, k] if |x[t, k]| > thr else 0,

accumulated in fp32 and returned in x's dtype. This is exactly `(x * (x.abs() > thr)) @ Wt` (the inactive
channels contribute nothing there either), and the same function as the CPU kernel in cpu.py.

Why. Decoding is bound by reading the weights: every weight is read once per step. TEAL (Liu et al. 2024)
observes that most hidden-state entries are near zero; thresholding them to zero means the matching rows of Wt
are never needed. The kernel gathers only the rows Wt[idx] of the active channels (idx from torch on the device:
`(x.abs() > thr).any(0).nonzero()`), so at 50% activation sparsity it reads about half the weight bytes. One
program owns a BLOCK_N-wide output tile and loops over the active list in chunks of BLOCK_K: it loads the chunk's
indices, gathers BLOCK_K rows of Wt (BLOCK_N contiguous elements each) and the matching columns of x, zeroes the
entries at or below the threshold, and accumulates a [BLOCK_T, BLOCK_N] tile with tl.dot in fp32. With few
output tiles (small N) the active list is also split across programs (split-K); their fp32 partial sums are
reduced by a second, deterministic torch sum (no atomics).

Dispatch (`sparse_in_matmul`): CUDA tensors run the Triton kernel; CPU tensors run it only under the Triton
interpreter (environment TRITON_INTERPRET=1, how the tests exercise it), and otherwise use torch. Torch's dense
`(x * mask) @ wt` is also used where triton is missing, and where the fraction of active channels exceeds
`dense_above` (default 0.7): a gather of most rows is no cheaper than the dense matmul, which streams them.
`calls` counts which path ran and `last_path` names the latest one.

Numerics. The threshold is compared as torch compares `x.abs() > thr`: thr rounded to x's dtype. When x and Wt
are both fp16 (or both bf16) the products are formed from those values and summed in fp32 (tensor cores);
otherwise both operands are upcast to fp32 and the dot is full IEEE fp32 (no TF32). Results equal a dense
fp32-accumulated matmul over the kept channels up to summation order.

The block sizes and the split-K heuristic are untuned defaults (no GPU was at hand when this was written).
Compiled for CUDA, any Triton 3.x should do; the interpreter needs Triton >= 3.7 with NumPy >= 2.4 (older
interpreters call int() on 1-element arrays for the kernel's `range(<scalar argument>)`, which NumPy 2.4 rejects).
"""

import os
from collections import Counter
from functools import lru_cache

import torch

try:  # guarded: importing this module never needs triton
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None
    tl = None

calls: Counter = Counter()  # path name ("triton" / "dense") -> number of sparse_in_matmul calls that took it
last_path: str | None = None

BLOCK_T = 16  # tokens per tile (tl.dot needs M >= 16; decoding has 1..16 tokens)
BLOCK_K = 32  # active channels per loop step
BLOCK_N = 128  # outputs per program


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def available() -> bool:
    """Whether the Triton kernel can run in this process: triton imports, and there is a CUDA device or the
    Triton interpreter is on (TRITON_INTERPRET=1)."""
    return triton is not None and (_interpret() or torch.cuda.is_available())


def _runs_triton(x: torch.Tensor) -> bool:
    """The device rule: CUDA tensors → Triton; CPU tensors → Triton only under the interpreter."""
    if triton is None:
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and _interpret()


if tl is not None:
    def _sparse_in_kernel(x_ptr, wt_ptr, idx_ptr, out_ptr, thr, T, N, n_active, chunks_per_split,
                          stride_xt, stride_xk, stride_wk, stride_wn, stride_os, stride_ot, stride_on,
                          BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                          NATIVE_DOT: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_t = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        n_mask = offs_n < N
        t_mask = offs_t < T
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        first = pid_s * chunks_per_split * BLOCK_K
        for c in range(0, chunks_per_split):
            offs_a = first + c * BLOCK_K + tl.arange(0, BLOCK_K)
            a_mask = offs_a < n_active
            k = tl.load(idx_ptr + offs_a, mask=a_mask, other=0).to(tl.int64)
            xv = tl.load(x_ptr + offs_t[:, None] * stride_xt + k[None, :] * stride_xk,
                         mask=t_mask[:, None] & a_mask[None, :], other=0.0)
            keep = tl.abs(xv.to(tl.float32)) > thr
            w = tl.load(wt_ptr + k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=a_mask[:, None] & n_mask[None, :], other=0.0)
            if NATIVE_DOT:  # x and Wt share a 16-bit dtype: exact products, fp32 sums
                xm = tl.where(keep, xv, tl.zeros_like(xv))
                acc += tl.dot(xm, w, out_dtype=tl.float32)
            else:
                xm = tl.where(keep, xv.to(tl.float32), 0.0)
                acc += tl.dot(xm, w.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
        out = out_ptr + pid_s * stride_os + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


@lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel. triton decides at decoration time whether a kernel is compiled or interpreted, so the
    decoration happens on first use, once per mode."""
    del interpret  # only the cache key: triton.jit reads TRITON_INTERPRET itself
    return triton.jit(_sparse_in_kernel)


def _threshold(x: torch.Tensor, thr: float) -> float:
    """thr as torch's `x.abs() > thr` uses it: rounded to x's dtype (exact in fp32 for fp32/fp16/bf16 x)."""
    thr = float(thr)
    if thr < 0:
        raise ValueError(f"threshold must be >= 0 (got {thr})")
    return torch.tensor(thr, dtype=x.dtype).item()


def _check(x: torch.Tensor, wt: torch.Tensor) -> None:
    if x.dim() != 2 or wt.dim() != 2:
        raise ValueError(f"expected x [T, K] and wt [K, N], got {tuple(x.shape)} and {tuple(wt.shape)}")
    if x.shape[1] != wt.shape[0]:
        raise ValueError(f"x has {x.shape[1]} channels but wt has {wt.shape[0]} rows")
    if x.device != wt.device:
        raise ValueError(f"x is on {x.device} but wt is on {wt.device}")
    if not (x.is_floating_point() and wt.is_floating_point()):
        raise TypeError(f"expected floating-point tensors, got {x.dtype} and {wt.dtype}")


def _active(x: torch.Tensor, thr: float) -> torch.Tensor:
    """int32 indices of the channels some token keeps (ascending)."""
    return (x.abs() > thr).any(0).nonzero().squeeze(1).to(torch.int32)


def _auto_split(x: torch.Tensor, programs: int, n_chunks: int) -> int:
    if not x.is_cuda or n_chunks <= 1:
        return 1  # the interpreter gains nothing from more programs
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    want = -(-2 * sms // max(programs, 1))  # about two programs per SM
    return max(1, min(want, n_chunks // 2, 64))  # at least two chunks per split


def _launch(x: torch.Tensor, thr: float, wt: torch.Tensor, idx: torch.Tensor, *, split_k: int | None,
            block_n: int, block_k: int) -> torch.Tensor:
    T, N = x.shape[0], wt.shape[1]
    n_active = idx.numel()
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0 or N == 0:
        return out
    if n_active == 0:
        idx = torch.zeros(1, dtype=torch.int32, device=x.device)  # a valid pointer; every load is masked off
    n_tiles, t_tiles = triton.cdiv(N, block_n), triton.cdiv(T, BLOCK_T)
    n_chunks = triton.cdiv(n_active, block_k)
    split = _auto_split(x, n_tiles * t_tiles, n_chunks) if split_k is None else max(1, int(split_k))
    split = max(1, min(split, n_chunks))
    chunks_per_split = triton.cdiv(n_chunks, split) if n_chunks else 0
    split = triton.cdiv(n_chunks, chunks_per_split) if n_chunks else 1  # no empty splits
    native = x.dtype == wt.dtype and x.dtype in (torch.float16, torch.bfloat16)
    # Triton 3.9's interpreter mishandles bf16: tl.dot multiplies the bit patterns as integers, and the store
    # truncates fp32 to bf16 instead of rounding. Under it, bf16 takes the fp32 dot (bf16 products are exact in
    # fp32, so the sums are the same) and torch rounds the fp32 result.
    bf16_interp = _interpret() and torch.bfloat16 in (x.dtype, wt.dtype)
    native = native and not bf16_interp
    staged = split > 1 or (bf16_interp and x.dtype == torch.bfloat16)
    dest = torch.empty(split, T, N, dtype=torch.float32, device=x.device) if staged else out.unsqueeze(0)
    _kernel(_interpret())[(n_tiles, t_tiles, split)](
        x, wt, idx, dest, thr, T, N, n_active, chunks_per_split,
        x.stride(0), x.stride(1), wt.stride(0), wt.stride(1), dest.stride(0), dest.stride(1), dest.stride(2),
        BLOCK_T=BLOCK_T, BLOCK_K=block_k, BLOCK_N=block_n, NATIVE_DOT=native, num_warps=4)
    if staged:
        out.copy_(dest.sum(0))
    return out


def triton_sparse_in_matmul(x: torch.Tensor, thr: float, wt: torch.Tensor, *, split_k: int | None = None,
                            block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> torch.Tensor:
    """The Triton kernel, unconditionally: x [T, K], wt [K, N] → y [T, N] in x's dtype (see the module docstring).
    `split_k`: how many programs share one output tile's active list (None: about two programs per SM on CUDA,
    1 under the interpreter). `block_n`, `block_k`: powers of two >= 16."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(x, wt)
    thr = _threshold(x, thr)
    return _launch(x, thr, wt, _active(x, thr), split_k=split_k, block_n=block_n, block_k=block_k)


def dense_sparse_in_matmul(x: torch.Tensor, thr: float, wt: torch.Tensor) -> torch.Tensor:
    """The same function with torch: (x * mask) @ wt, computed in the promoted dtype, returned in x's dtype.
    Dropped entries become 0 through torch.where, as in the kernels: a NaN input is dropped (|NaN| > thr is
    false) instead of turning the sum into NaN. Unlike the kernel, this reads every row of wt."""
    _check(x, wt)
    mask = x.abs() > _threshold(x, thr)
    dt = torch.promote_types(x.dtype, wt.dtype)
    return (torch.where(mask, x, 0).to(dt) @ wt.to(dt)).to(x.dtype)


def sparse_in_matmul(x: torch.Tensor, thr: float, wt: torch.Tensor, dense_above: float = 0.7) -> torch.Tensor:
    """y = (x * (|x| > thr)) @ wt, reading only the rows of wt for active channels when that pays: the Triton
    kernel for CUDA tensors (CPU tensors: only under TRITON_INTERPRET=1), unless more than `dense_above` of the
    channels are active; torch's dense matmul otherwise. Records the path in `calls` / `last_path`."""
    global last_path
    _check(x, wt)
    if _runs_triton(x):
        t = _threshold(x, thr)
        idx = _active(x, t)
        if idx.numel() <= dense_above * x.shape[1]:
            calls["triton"] += 1
            last_path = "triton"
            return _launch(x, t, wt, idx, split_k=None, block_n=BLOCK_N, block_k=BLOCK_K)
    calls["dense"] += 1
    last_path = "dense"
    return dense_sparse_in_matmul(x, thr, wt)
