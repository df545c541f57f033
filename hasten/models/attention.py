"""Attention over the KV cache: per-segment attention for packed forwards (the C++ streamed kernel on CPU f32,
SDPA elsewhere), and SDPA with causal or tree masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import cpu as cpu_kernels

FUSED_TOKENS = 64  # a forward of up to this many packed tokens (one sequence or several) runs each block in one C++ call


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """q [B, H, T, d]; k, v [B, Hkv, S, d] with S ≥ T (the last T keys are the new tokens'); mask [T, S] bool.

    Without a mask the new tokens are causal among themselves and see everything cached before them (the model
    builds that mask once per forward when there are cached entries; SDPA's is_causal aligns top-left).
    """
    if mask is None and q.shape[2] > 1:
        assert q.shape[2] == k.shape[2], "new tokens after cached ones need an explicit (bottom-right causal) mask"
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def cpu_kernels_for(x: torch.Tensor):
    """hasten's C++ kernels when they apply (fp32 on the CPU, outside autograd), else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
        return None
    return cpu_kernels.extension()


NO_MASK = torch.empty(0, dtype=torch.bool)  # a segment without a mask (causal), as the C++ kernels take it


def kernel_segments(layer: int, segments) -> tuple[list, list, list[int], list[int], list, list[bool]]:
    """The C++ packed attention's per-segment arguments (kernels/attention_packed.h): caches k and v, starts,
    lengths, masks (empty: causal) and whether `layer` is windowed in each segment's cache."""
    caches = [seg.cache.layers[layer] for seg in segments]
    return ([c[0] for c in caches], [c[1] for c in caches], [seg.start for seg in segments],
            [seg.length for seg in segments], [NO_MASK if seg.mask is None else seg.mask for seg in segments],
            [seg.windowed(layer) for seg in segments])


def attend_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, segments, scale: float) -> torch.Tensor:
    """q [1, N, H, d], k, v [1, N, Hkv, d] (after RoPE) for the N packed tokens → attention output [1, N, H*d].

    Each segment writes its keys/values into its own cache and attends only to that cache, so a sequence never
    sees another's tokens. On CPU in float32 all segments run in one C++ call (kernels/attention_packed.h: the
    streamed kernel of attention.h, or for a windowed layer attention_window.h's, whose bits do not depend on
    where a ring put its keys), whose result for a token is the same whatever else is scored with it: a token's
    output then does not depend on how its sequence's prompt was chunked or what else shared the step. Every
    segment's keys are written before any attends, so several prompt chunks of one sequence may share a step
    (a later chunk sees the earlier ones)."""
    _, N, H, d = q.shape
    kernels = cpu_kernels.extension() if q.device.type == "cpu" and q.dtype == torch.float32 else None
    if kernels is not None:
        return kernels.attend_packed(q[0].contiguous(), k[0].contiguous(), v[0].contiguous(),
                                     *kernel_segments(layer, segments), scale)[None]
    outs, offset = [], 0
    for seg in segments:
        n, start = seg.length, seg.start
        ck, cv = seg.cache.layers[layer]  # [1, Hkv, max_len, d]
        ck[0, :, start:start + n].copy_(k[0, offset:offset + n].transpose(0, 1))
        cv[0, :, start:start + n].copy_(v[0, offset:offset + n].transpose(0, 1))
        offset += n
    offset = 0
    for seg in segments:
        n, start = seg.length, seg.start
        ck, cv = seg.cache.layers[layer]
        mask = seg.mask
        if mask is None and start > 0 and n > 1:  # causal, bottom-right aligned after the cached entries
            mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)
        keys, values = ck[:, :, :start + n].to(q.dtype), cv[:, :, :start + n].to(q.dtype)  # an fp16 cache: exact
        out = attend(q[0, offset:offset + n].transpose(0, 1)[None], keys, values, mask, scale)
        outs.append(out[0].transpose(0, 1).reshape(n, H * d))  # [n, H*d]
        offset += n
    return (outs[0] if len(outs) == 1 else torch.cat(outs))[None]
