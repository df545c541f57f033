"""BlockQuantLinear: a linear layer that keeps GGUF Q4_1 / Q8_0 blocks and computes from them.

The module holds the dequantized fp32 weight too (`weight`): prefill (many tokens) runs torch's matmul on it,
and anything that wants the dense weight (transformers peers, sparsifiers) reads it. Decode and draft
verification (up to MAX_KERNEL_ROWS tokens) run the block kernel, which reads ~7x fewer bytes; its per-token
results do not depend on how many tokens are scored together (see kernels/cpu_kernels.cpp), so every
lossless method sees exactly the logits plain decoding sees.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu as cpu_kernels

# Scoring more tokens than this at once (prefill) goes to torch's matmul on the dense weight. Draft trees stay
# below it, so verification always shares plain decoding's arithmetic.
MAX_KERNEL_ROWS = 64


class BlockQuantLinear(nn.Module):
    def __init__(self, qtype: str, blocks: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        if qtype not in ("Q4_1", "Q8_0"):
            raise ValueError(f"no kernel for {qtype}")
        self.qtype = qtype
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [N, K] fp32, dequantized
        raw = blocks.numpy()
        # The packed blocks are plain attributes, not buffers: a decode step reads them ~200 times and
        # nn.Module attribute lookup costs microseconds each; they never leave the CPU.
        if qtype == "Q4_1":
            d, m, qs = cpu_kernels.repack_q4_1(raw)  # [N, K/32], [N, K/32], [N, K/32, 16]
            packed = (torch.from_numpy(d), torch.from_numpy(m), torch.from_numpy(qs))
        else:
            d, qs = cpu_kernels.repack_q8_0(raw)  # [N, K/32], [N, K/32, 32]
            packed = (torch.from_numpy(d), torch.from_numpy(qs))
        self.packed = packed
        ext = cpu_kernels.extension()
        self._kernel = None if ext is None else (ext.q4_1_matmul if qtype == "Q4_1" else ext.q8_0_matmul)
        self._max_kernel_numel = MAX_KERNEL_ROWS * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step makes ~200 of these calls, so the kernel path is kept to a few attribute reads: the kernel
        # takes any leading shape and checks device, dtype and layout itself.
        kernel = self._kernel
        if kernel is not None and x.numel() <= self._max_kernel_numel and x.dtype == torch.float32 and not x.is_cuda:
            return kernel(x if x.is_contiguous() else x.contiguous(), *self.packed)
        return F.linear(x, self.weight.to(x.dtype))

    def fused_spec(self):
        """How decode_block (kernels/cpu.cpp) runs this layer: (tensors, threshold, max tokens) — dense blocks."""
        return (list(self.packed), -1.0, 0) if self._kernel is not None else None

    def extra_repr(self) -> str:
        return f"{self.qtype}, in_features={self.in_features}, out_features={self.out_features}"
