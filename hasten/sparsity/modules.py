"""The sparse layers sparsifiers put into a model, and `sparsify`, which swaps them in by module name.

`SparseLinear` drops inputs with |x| ≤ threshold and reads only the weights of the inputs it keeps (the kernel
wants W transposed, so the weights of one input are contiguous). `GatedRowsLinear` computes only the output
rows whose gate passes (CATS's up_proj). Both fall back to the same function computed densely (masked input ×
dense weight) where no kernel applies — prefill of many tokens, non-fp32, no compiler — and where the kernel
would lose: below DENSE_BELOW sparsity the dense block kernel on the masked input is faster (measured with
`python -m hasten.sparsity.measure`).

A sparse model is a clone of the dense one sharing every weight tensor (`clone`), so several sparsity levels
and the dense target live side by side for the cost of the transposed layouts only (cached per layer).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models.quantized import QuantLinear
from .kernels import cpu as sparse_cpu

# The sparse kernels serve decode and draft trees; more tokens (prefill) take the dense kernel on the masked input.
MAX_KERNEL_ROWS = 64
DENSE_BELOW = 0.15  # a layer sparser than this runs the dense kernel on its masked input
# Several tokens at once read the union of their active inputs, which grows fast: measured on the default model
# (python -m hasten.sparsity.measure, BENCHMARKS.md) the sparse kernel loses to the dense block kernel from 4
# tokens on below ~75% sparsity, so those calls take the dense kernel on the masked input.
SPARSE_MANY_TOKENS_FROM = 0.75


def clone(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose modules are new objects but whose tensors are the same ones."""
    new = copy.copy(model)
    new._parameters = dict(model._parameters)
    new._buffers = dict(model._buffers)
    new._modules = {name: clone(child) if child is not None else None for name, child in model._modules.items()}
    return new


def sparsify(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A clone of `model` with the named submodules replaced (the dense model is untouched)."""
    sparse = clone(model)
    for name, module in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(sparse.get_submodule(parent) if parent else sparse, child, module)
    return sparse


def transposed_layout(linear: nn.Module):
    """The kernel layout of a dense linear (cached on it), exactly the same weight values as its GGUF tensor:
    transposed Q4_1 codes for Q4_1 and Q4_0 blocks (q4t), transposed Q8_0 codes and scales (q8t), transposed
    bf16/f16 values (h16t), where the output count is a multiple of 64; else the fp32 weight transposed.

    The layout is a copy: the layer's own blocks stay too (they are views of the memory-mapped file), because
    prefill and the many-token calls of `SparseLinear` run the dense block kernel on the masked input. Decode
    reads only the layout; the file pages of the blocks are clean and shared, so the OS can drop them."""
    layout = getattr(linear, "_sparse_layout", None)
    if layout is None:
        qtype = linear.qtype if isinstance(linear, QuantLinear) and linear.out_features % 64 == 0 else None
        if qtype == "Q4_1":
            layout = sparse_cpu.TransposedQ4.from_q4_1(*linear.packed)
        elif qtype == "Q4_0":
            layout = sparse_cpu.TransposedQ4.from_q4_0(linear.blocks)
        elif qtype == "Q8_0":
            layout = sparse_cpu.TransposedQ8.from_q8_0(linear.blocks)
        elif qtype in ("BF16", "F16"):
            layout = sparse_cpu.TransposedH16.from_blocks(linear.blocks, qtype)
        else:
            layout = sparse_cpu.TransposedF32.from_weight(linear.weight)
        linear._sparse_layout = layout
    return layout


def cpu_kernel_applies(x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    return (x.device.type == "cpu" and x.dtype == torch.float32 and rows <= MAX_KERNEL_ROWS
            and not (x.requires_grad and torch.is_grad_enabled()) and sparse_cpu.extension() is not None)


class SparseLinear(nn.Module):
    """y = W · x̃ + b with x̃ = x where |x| > threshold, else 0 (per token). `sparsity` is the calibrated share of
    inputs dropped; below DENSE_BELOW the dense kernel runs on x̃ instead (same function).

    The sparse-input kernels compute with fp32 activations over the exact weights: for a block format whose layer
    runs the int8 "q8" activation path (Q8_0 and Q4_0/Q4_1 by default), calls the kernel serves (decode, up to
    2 tokens; up to 64 from SPARSE_MANY_TOKENS_FROM) compute the `activations="f32"` function, and larger ones
    (prefill) the layer's own q8 path on x̃."""

    def __init__(self, linear: nn.Module, threshold: float, sparsity: float):
        super().__init__()
        self.dense = linear
        self.threshold, self.sparsity = float(threshold), float(sparsity)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = getattr(linear, "bias", None)
        self.use_kernel = sparsity >= DENSE_BELOW
        self.layout = transposed_layout(linear) if self.use_kernel else None
        # The CPU kernel and its weight arguments, resolved once: a decode step makes ~200 of these calls and
        # each lookup costs microseconds.
        ext = sparse_cpu.extension() if self.use_kernel else None
        self._kernel, self._args = None, ()
        if ext is not None:
            self._kernel, self._args = sparse_cpu.kernel_args(self.layout)
        self._max_numel = (MAX_KERNEL_ROWS if sparsity >= SPARSE_MANY_TOKENS_FROM else 2) * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.dtype == torch.float32 and not x.is_cuda and x.numel() <= self._max_numel \
                and not x.requires_grad:
            shape = x.shape
            y = self._kernel(x.reshape(-1, shape[-1]).contiguous(), self.threshold, *self._args)
            if self.bias is not None:
                y += self.bias
            return y.view(*shape[:-1], self.out_features)
        if self.use_kernel and x.is_cuda:
            from .kernels import triton as sparse_triton
            if sparse_triton.available():
                wt = getattr(self, "_wt_cuda", None)
                if wt is None or wt.device != x.device or wt.dtype != x.dtype:
                    wt = self._wt_cuda = self.dense.weight.t().contiguous().to(x.dtype)
                y = sparse_triton.sparse_in_matmul(x.reshape(-1, x.shape[-1]), self.threshold, wt)
                if self.bias is not None:
                    y = y + self.bias
                return y.view(*x.shape[:-1], self.out_features)
        return self.dense(x * (x.abs() > self.threshold))

    def fused_spec(self):
        """How decode_block (kernels/cpu.cpp) runs this layer, branch for branch as `forward` does on the CPU:
        the dense blocks (+ the transposed layout and the token limit of the sparse kernel) and the threshold."""
        dense = getattr(self.dense, "fused_spec", lambda: None)()
        if dense is None or self.bias is not None:
            return None
        if self._kernel is None:  # below DENSE_BELOW: the dense kernel on the masked input
            return dense[0], self.threshold, 0, dense[3]
        l = self.layout  # decode_block's linear() tells the layouts apart by their tensor count and dtype
        extra = ([l.q, l.d, l.m] if isinstance(l, sparse_cpu.TransposedQ4) else [l.q, l.d]
                 if isinstance(l, sparse_cpu.TransposedQ8) else [l.wt])
        return dense[0] + extra, self.threshold, self._max_numel // self.in_features, dense[3]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold:.4g}, sparsity={self.sparsity:.2f}"


class GatedRowsLinear(nn.Module):
    """y = gate ⊙ (W x) on the rows where |gate| > threshold, 0 elsewhere: only those rows of W are read
    (CATS computes up_proj only for the neurons whose SiLU(gate) survives)."""

    def __init__(self, linear: nn.Module, threshold: float):
        super().__init__()
        self.dense, self.threshold = linear, float(threshold)
        self.bias = getattr(linear, "bias", None)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        ext = sparse_cpu.extension()
        if cpu_kernel_applies(x) and ext is not None and self.bias is None:
            x2, g2 = x.reshape(-1, x.shape[-1]).contiguous(), gate.reshape(-1, gate.shape[-1]).contiguous()
            if isinstance(self.dense, QuantLinear) and self.dense.qtype == "Q4_1":
                y = ext.q4_1_rows_gated(x2, g2, self.threshold, *self.dense.packed)
            else:
                y = ext.f32_rows_gated(x2, g2, self.threshold, self.dense.weight)
            return y.view(*gate.shape)
        keep = gate.abs() > self.threshold
        return torch.where(keep, gate * self.dense(x), torch.zeros((), dtype=x.dtype, device=x.device))

    def fused_spec(self):
        """For decode_block's gated MLP (GatedMLP.gated_up_threshold): the dense Q4_1 blocks its kernel reads."""
        d = self.dense
        dense = d.fused_spec() if self.bias is None and isinstance(d, QuantLinear) and d.qtype == "Q4_1" else None
        if dense is not None:
            return dense[0] + list(d.packed), -1.0, 0, dense[3]
        return None


class GatedMLP(nn.Module):
    """SwiGLU MLP with neurons dropped where |SiLU(gate)| ≤ threshold: up_proj computes the surviving rows only,
    down_proj reads only their columns (CATS)."""

    def __init__(self, mlp: nn.Module, threshold: float, sparsity: float):
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = GatedRowsLinear(mlp.up_proj, threshold)
        self.down_proj = SparseLinear(mlp.down_proj, 0.0, sparsity)  # exact zeros are the dropped neurons
        self.threshold, self.sparsity = float(threshold), float(sparsity)

    @property
    def gated_up_threshold(self) -> float:
        """decode_block computes up_proj's rows where |silu(gate)| > this, as forward does (kernels/cpu.cpp)."""
        return self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(x, F.silu(self.gate_proj(x))))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}, sparsity={self.sparsity:.2f}"
