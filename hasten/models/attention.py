"""Scaled dot-product attention over the cache, with a causal or an arbitrary (token-tree) mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, T, d]; k, v [B, Hkv, S, d] with S ≥ T (the last T keys are the new tokens'); mask [T, S] bool.

    Without a mask the new tokens are causal among themselves and see everything cached before them (the model
    builds that mask once per forward when there are cached entries; SDPA's is_causal aligns top-left).
    """
    if mask is None and q.shape[2] > 1:
        assert q.shape[2] == k.shape[2], "new tokens after cached ones need an explicit (bottom-right causal) mask"
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
