"""Gemma 3's decoder blocks, beside transformer.py's Llama-family ones (the Transformer there picks these for
model type "gemma3", scales the embeddings by sqrt(hidden) and softcaps the logits when the config says so).

What differs from Llama, in the order a block runs:
- RMSNorm is x / rms(x) * (1 + w) with fp32 statistics; checkpoints store w (zero-centred).
- four norms per block: the attention and the MLP outputs are normed (post_attention_layernorm,
  post_feedforward_layernorm) before they join the residual; pre_feedforward_layernorm feeds the MLP.
- q and k are RMS-normed per head before RoPE; scores are scaled by query_pre_attn_scalar ** -0.5.
- the MLP is GeGLU: gelu_tanh(gate) * up.
- "sliding_attention" layers (5 of every 6) see only the last `sliding_window` positions and use their own RoPE
  base; "full_attention" layers see everything. Over a KV cache the window is the cache's business
  (models/kv: the native policy keeps a ring of the window for these layers, the full policy every position,
  both cut by position in Segment.view); without a cache, window_mask cuts it on top of the caller's mask.
Module names match transformers' (Gemma3DecoderLayer, Gemma3Attention, Gemma3MLP) so state dicts load by name.
The linears are whatever the loader put there (nn.Linear or a block-quantized module): only forward(x) is used.
Decode steps, draft trees and small batches run each block in one C++ decode_block call (`_fused()`, as
transformer.py's Block); other forwards run the modules, whose attention and norms use the small kernels.

GGUF files (llama.cpp's "gemma3" architecture) name four block tensors differently from the Llama family
(GGUF_NAMES; note ffn_norm is the *pre*-feedforward norm here) and store every norm weight as 1 + w (llama.cpp's
RMSNorm multiplies by the weight); gguf_dense takes the 1 back off, as transformers' GGUF loader does. Gemma's
q/k rows are not permuted for llama.cpp's RoPE, so nothing is reordered.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend, attend_packed, cpu_kernels_for
from .fused import block_weights, fused_forward
from .transformer import ModelConfig, apply_rope


GGUF_NAMES = {  # llama.cpp's gemma3 block tensors whose native names differ from the Llama family's
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}


def gguf_dense(native: str, value):
    """A dense (norm or bias) tensor read from a gemma3 GGUF, as the native modules want it: norms as w, not 1 + w."""
    return value - 1 if native.endswith("norm.weight") else value


def window_mask(mask: torch.Tensor | None, positions: torch.Tensor, start: int, window: int) -> torch.Tensor | None:
    """A sliding layer's mask: `mask` (the caller's [T, L+T] over the L cached entries and the T new tokens, True =
    may attend; None = causal) with every key at position ≤ p - window cut for the query at position p.

    Used for forwards without a cache: key j is at position j below `start`, new token i at positions[..., i]
    (with a cache, Segment.view cuts the window over the cache's slots). Returns `mask` itself when no key is that far back (short contexts keep the
    causal fast paths), else [T, L+T] for positions [T], or [B, 1, T, L+T] for positions [B, T].
    """
    T = positions.shape[-1]
    nearest_start = 0 if start > 0 else int(positions.min())
    if int(positions.max()) - nearest_start < window:
        return mask
    cached = torch.arange(start, device=positions.device).expand(*positions.shape[:-1], start)
    keys = torch.cat([cached, positions], dim=-1)  # [(B,) L+T] key positions
    keep = keys[..., None, :] > positions[..., :, None] - window  # [(B,) T, L+T]
    if mask is None:  # causal, bottom-right aligned (the new tokens are a chain after the cache)
        mask = torch.ones(T, start + T, dtype=torch.bool, device=positions.device).tril(start)
    keep = keep & mask
    return keep if positions.dim() == 1 else keep[:, None]


class GemmaRMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * (1 + weight), statistics in fp32, cast back to x's dtype at the end (as
    transformers' Gemma3RMSNorm). The effective scale 1 + weight is computed once per weight tensor."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _scale(self) -> torch.Tensor:
        w = self.weight
        cached = self.__dict__.get("_scale_cache")
        version = w._version if not w.is_inference() else 0
        if cached is None or cached[0] is not w or cached[1] != version:
            cached = (w, version, 1.0 + w.detach().float())  # [D] fp32
            self.__dict__["_scale_cache"] = cached
        return cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scale()
        kernels = cpu_kernels_for(x)
        if kernels is not None:  # one call; the same arithmetic (scale * (x * r)) as below
            return kernels.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), scale, self.eps).view(x.shape)
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.query_scale if config.query_scale is not None else config.head_dim ** -0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, layer: int, segments, mask: torch.Tensor | None):
        """As transformer.py's Attention: `segments` for a packed forward over caches, else `mask` among x."""
        B, T, _ = x.shape  # [B, T, D]
        q = self.q_norm(self.q_proj(x).view(B, T, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if segments is not None:
            return self.o_proj(attend_packed(q, k, v, layer, segments, self.scale))  # [1, T, H*d] in
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
        out = attend(q, k, v, mask, self.scale)  # [B, H, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Gemma3MLP(nn.Module):
    gated_up_threshold = -1.0  # decode_block computes gelu_tanh(gate) * up

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma3Block(nn.Module):
    """Called as Block is: (x, cos, sin, layer, cache, mask); the model hands a sliding layer its own RoPE
    tables and the window-cut mask."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(d, eps)
        self.self_attn = Gemma3Attention(config)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps)
        self.mlp = Gemma3MLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps)

    def forward(self, x, cos, sin, layer, segments, mask):
        fused = fused_forward(self, x, cos, sin, layer, segments)  # decode steps, draft trees, small batches
        if fused is not None:
            return fused
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, layer, segments, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def _fused(self):
        """decode_block's kernels.BlockWeights (four norms as their scales 1 + w, q/k norms, GeGLU) when every part
        is the plain module, else None. Cached, checked by identity of the modules and the scales on every call."""
        attn, mlp = self._modules["self_attn"], self._modules["mlp"]
        norms = (self._modules["input_layernorm"], self._modules["pre_feedforward_layernorm"],
                 self._modules["post_attention_layernorm"], self._modules["post_feedforward_layernorm"],
                 attn._modules.get("q_norm"), attn._modules.get("k_norm"))
        if not all(type(n) is GemmaRMSNorm for n in norms):
            return None
        scales = [n._scale() for n in norms]
        mods = (*norms, *scales, attn, mlp, *(attn._modules.get(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                *(mlp._modules.get(n) for n in ("gate_proj", "up_proj", "down_proj")))
        cached = self.__dict__.get("_fused_cache")
        if cached is not None and all(a is b for a, b in zip(cached[0], mods)):
            return cached[1]
        args = None
        if type(attn) is Gemma3Attention and type(mlp) is Gemma3MLP:
            pairs = list(zip(norms, scales))
            args = block_weights(pairs[:2], attn, mlp, post_attn=pairs[2], post_ffw=pairs[3], q_norm=pairs[4],
                                 k_norm=pairs[5], gelu=True)
        self.__dict__["_fused_cache"] = (mods, args)
        return args
