"""Layers that compute from a GGUF tensor's own bytes: `QuantLinear` and `QuantEmbedding`.

The bytes are a view into the memory-mapped model file (or, for the few tensors the loader must reorder, a
reordered copy that replaces the original): nothing holds a dequantized fp32 copy. Every call — decode, draft
verification, prefill, batches — runs the block kernel of the tensor's format (kernels/cpu.cpp), whose per-token
results do not depend on how many tokens are scored together, so every lossless method sees exactly the logits
plain decoding sees. Whoever needs the dense weight (the transformers peer, a sparsifier's fp32 layout) reads
`.weight`, which dequantizes this one layer on demand and keeps nothing.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu as cpu_kernels
from ..kernels.formats import Q8_ACTIVATIONS, Q8_FORMATS, BlockFormat, block_format

_NO_BIAS = torch.empty(0)

ACTIVATIONS = ("q8", "f32")
# Formats whose layers run the q8 path unless told otherwise (activations=None): where it measured faster at
# every token count (1, 8, 64, 512) and shape, and its quality cost is measured (BENCHMARKS.md, "Quantized
# activations": ~3e-3 nats mean KL against f32, 96% top-1 agreement on the SmolLM2 files; llama.cpp computes
# these formats this way always). All eight: `--activations f32` gives the exact fp32 path back.
DEFAULT_Q8: frozenset[str] = frozenset(Q8_FORMATS)


def _dequantize(blocks: torch.Tensor, fmt: BlockFormat, k: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `ids` (default: all) of a tensor in `fmt`, exactly as gguf-py dequantizes them: [n, k] fp32."""
    ext = cpu_kernels.extension()
    if ids is None:
        ids = torch.arange(blocks.shape[0])
    if ext is not None:
        return ext.dequantize_rows(blocks, ids, k, fmt.id)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    rows = blocks[ids.reshape(-1)].numpy()
    return torch.from_numpy(np.asarray(dequantize(rows, GGMLQuantizationType[fmt.name]), dtype=np.float32).reshape(-1, k))


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W a GGUF tensor [N, row bytes] u8 in block format `qtype` (any of kernels/formats.py)."""

    def __init__(self, qtype: str, blocks: torch.Tensor, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.fmt = block_format(qtype)
        self.qtype = qtype
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != self.fmt.row_bytes(in_features):
            raise ValueError(f"{qtype} weights for {in_features} inputs must be u8 [N, {self.fmt.row_bytes(in_features)}]")
        self.in_features, self.out_features = in_features, blocks.shape[0]
        # A plain attribute, not a buffer: it never moves or changes dtype with the module, and a decode step
        # reads it ~200 times (nn.Module attribute lookup costs microseconds each).
        self.blocks = blocks
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._ext = cpu_kernels.extension()
        self._id = self.fmt.id
        self.activations = "f32"

    @property
    def activations(self) -> str:
        """"q8": activations quantized to int8 per 32 values and integer dot products (kernels/formats/q8.h), for
        the formats of Q8_FORMATS; "f32": fp32 activations and FMAs over the exact weights. Both forward and
        fused_spec (decode_block) follow it; without the C++ kernels the torch path computes f32."""
        return "q8" if self._id & Q8_ACTIVATIONS else "f32"

    @activations.setter
    def activations(self, mode: str) -> None:
        if mode not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, not {mode!r}")
        self._id = self.fmt.id | (Q8_ACTIVATIONS if mode == "q8" and self.qtype in Q8_FORMATS else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = self._ext
        if ext is not None and x.dtype == torch.float32 and not x.is_cuda and not (x.requires_grad and torch.is_grad_enabled()):
            y = ext.block_matmul(x if x.is_contiguous() else x.contiguous(), self.blocks, self._id)
            return y if self.bias is None else y.add_(self.bias)
        # No compiler, another dtype or device, or autograd: the same function from a dense copy made per call.
        w = self.weight.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @property
    def weight(self) -> torch.Tensor:
        """The dense fp32 weight [N, K], dequantized now (exactly) and not kept."""
        return _dequantize(self.blocks, self.fmt, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    @property
    def packed(self):
        """Q4_1 only: (d [N, K/32] f32, m [N, K/32] f32, qs [N, K/32, 16] u8), the layout of the sparsity kernels'
        row-subset paths (CATS, Deja Vu, FFSplit); made on first use and kept (~1.2x the blocks)."""
        if self.qtype != "Q4_1":
            raise AttributeError(f"packed Q4_1 rows asked of a {self.qtype} layer")
        packed = self.__dict__.get("_packed")
        if packed is None:
            b = self.blocks.numpy().reshape(self.out_features, -1, 20)
            d = torch.from_numpy(b[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32))
            m = torch.from_numpy(b[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32))
            packed = self.__dict__["_packed"] = (d, m, torch.from_numpy(np.ascontiguousarray(b[:, :, 4:20])))
        return packed

    def rows(self, ids: torch.Tensor) -> "QuantLinear":
        """A layer of the output rows `ids` only (a copy of their blocks): drafting heads over a vocabulary subset."""
        out = QuantLinear(self.qtype, self.blocks[ids].contiguous(), self.in_features)
        out._id = self._id  # the same activation path as the full layer
        return out

    def fused_spec(self):
        """How decode_block (kernels/cpu.cpp) runs this layer: (tensors, threshold, max tokens, format id)."""
        if self._ext is None:
            return None
        return [self.blocks, _NO_BIAS if self.bias is None else self.bias], -1.0, 0, self._id

    def extra_repr(self) -> str:
        return f"{self.qtype}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def set_activations(model: nn.Module, mode: str | None = None) -> str:
    """Every QuantLinear of `model` on the "q8" or "f32" path; None: each format's default (DEFAULT_Q8).
    Returns what runs, as activation_summary says it."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.activations = mode or ("q8" if m.qtype in DEFAULT_Q8 else "f32")
        m.__dict__.pop("_fused_cache", None)  # Block._fused() keeps its layers' format ids: make it ask again
    return activation_summary(model)


def activation_summary(model: nn.Module) -> str:
    """Which activation path the model's block-quantized layers run, e.g. "q8 (Q4_K, Q6_K)", "f32",
    "q8 (Q4_K) + f32 (Q5_0)"."""
    kinds: dict[str, set[str]] = {"q8": set(), "f32": set()}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            kinds[m.activations].add(m.qtype)
    return " + ".join(f"{k} ({', '.join(sorted(v))})" for k, v in kinds.items() if v) or "f32"


class QuantEmbedding(nn.Module):
    """Token embeddings looked up from a GGUF tensor's rows: only the rows asked for are dequantized."""

    def __init__(self, qtype: str, blocks: torch.Tensor, embedding_dim: int):
        super().__init__()
        self.fmt = block_format(qtype)
        self.qtype = qtype
        self.blocks = blocks  # [V, row bytes] u8
        self.num_embeddings, self.embedding_dim = blocks.shape[0], embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _dequantize(self.blocks, self.fmt, self.embedding_dim, ids.reshape(-1).cpu()).view(
            *ids.shape, self.embedding_dim).to(ids.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dense fp32 table [V, D], dequantized now and not kept."""
        return _dequantize(self.blocks, self.fmt, self.embedding_dim)

    def as_linear(self) -> QuantLinear:
        """The tied LM head: the same bytes read as a [V, D] linear layer."""
        return QuantLinear(self.qtype, self.blocks, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.qtype}, {self.num_embeddings}, {self.embedding_dim}"
