"""Attention over the KV cache: per-segment attention for packed forwards (the C++ streamed kernel on CPU f32,
SDPA elsewhere), and SDPA with causal or tree masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import cpu as cpu_kernels

FUSED_TOKENS = 64  # one sequence's forward of up to this many tokens runs each decoder block in one C++ call


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """q [B, H, T, d]; k, v [B, Hkv, S, d] with S ≥ T (the last T keys are the new tokens'); mask [T, S] bool.

    Without a mask the new tokens are causal among themselves and see everything cached before them (the model
    builds that mask once per forward when there are cached entries; SDPA's is_causal aligns top-left).
    """
    if mask is None and q.shape[2] > 1:
        assert q.shape[2] == k.shape[2], "new tokens after cached ones need an explicit (bottom-right causal) mask"
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, segments, scale: float) -> torch.Tensor:
    """q [1, N, H, d], k, v [1, N, Hkv, d] (after RoPE) for the N packed tokens → attention output [1, N, H*d].

    Each segment writes its keys/values into its own cache and attends only to that cache, so a sequence never
    sees another's tokens. On CPU in float32 every segment runs the C++ streamed kernel (kernels/attention.h) —
    a windowed layer's, kernels/attention_window.h, whose bits do not depend on where a ring put its keys —
    whose result for a token is the same whatever else is scored with it: a token's output then does not depend on how
    its sequence's prompt was chunked or what else shared the step. Segments are written in order, so several
    prompt chunks of one sequence may share a step (a later chunk sees the earlier ones)."""
    _, N, H, d = q.shape
    kernels = cpu_kernels.extension() if q.device.type == "cpu" and q.dtype == torch.float32 else None
    outs, offset = [], 0
    for seg in segments:
        n, start = seg.length, seg.start
        ck, cv = seg.cache.layers[layer]  # [1, Hkv, max_len, d]
        ck[0, :, start:start + n].copy_(k[0, offset:offset + n].transpose(0, 1))
        cv[0, :, start:start + n].copy_(v[0, offset:offset + n].transpose(0, 1))
        qs = q[0, offset:offset + n]  # [n, H, d]
        if kernels is not None:  # a windowed layer: the kernel that does not depend on buffer slots (a ring's move)
            kernel = kernels.attend_window if seg.windowed(layer) else kernels.attend
            outs.append(kernel(qs.contiguous(), ck[0], cv[0], start + n, seg.mask, scale))  # [n, H*d]
        else:
            mask = seg.mask
            if mask is None and start > 0 and n > 1:  # causal, bottom-right aligned after the cached entries
                mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)
            out = attend(qs.transpose(0, 1)[None], ck[:, :, :start + n], cv[:, :, :start + n], mask, scale)
            outs.append(out[0].transpose(0, 1).reshape(n, H * d))  # [n, H*d]
        offset += n
    return (outs[0] if len(outs) == 1 else torch.cat(outs))[None]
