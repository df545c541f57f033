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
        if qtype == "Q4_1":
            d, m, qs = cpu_kernels.repack_q4_1(raw)
            self.register_buffer("scales", torch.from_numpy(d), persistent=False)  # [N, K/32]
            self.register_buffer("mins", torch.from_numpy(m), persistent=False)  # [N, K/32]
        else:
            d, qs = cpu_kernels.repack_q8_0(raw)
            self.register_buffer("scales", torch.from_numpy(d), persistent=False)
            self.mins = None
        self.register_buffer("quants", torch.from_numpy(np.ascontiguousarray(qs)), persistent=False)  # [N, K/32, 16|32]
        self._kernels = cpu_kernels.extension()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self._kernels is None or x.device.type != "cpu" or x.dtype != torch.float32 or rows > MAX_KERNEL_ROWS:
            return F.linear(x, self.weight.to(x.dtype))
        flat = x.reshape(rows, self.in_features).contiguous()  # [T, K]
        if self.qtype == "Q4_1":
            y = self._kernels.q4_1_matmul(flat, self.scales, self.mins, self.quants)
        else:
            y = self._kernels.q8_0_matmul(flat, self.scales, self.quants)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.qtype}, in_features={self.in_features}, out_features={self.out_features}"
