"""A preallocated KV cache: static buffers plus a length.

Appending writes new entries after `length`; `rollback(n)` just moves the length back (the rejected slots are
overwritten later); `keep(start, index)` compacts an accepted tree path into place with one copy per buffer.
"""
from __future__ import annotations

import torch


class ContextOverflowError(ValueError):
    pass


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, B, Hkv, max_len, d]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views: cheaper to index
        self.max_len = max_len
        self.length = 0

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ContextOverflowError(f"KV cache holds {self.max_len} positions; {self.length + n} needed")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, Hkv, T, d] after the current length; return all entries up to and including them."""
        start, n = self.length, k.shape[2]
        self.check_room(n)
        ck, cv = self.layers[layer]
        ck.narrow(2, start, n).copy_(k)
        cv.narrow(2, start, n).copy_(v)
        return ck.narrow(2, 0, start + n), cv.narrow(2, 0, start + n)

    def advance(self, n: int) -> None:
        self.length += n

    def rollback(self, n: int) -> None:
        """Forget the last n entries."""
        self.length -= n

    def keep(self, start: int, index: torch.Tensor) -> None:
        """Keep only entries start+index (in that order) after `start`; the length becomes start+len(index)."""
        n = int(index.numel())
        if not torch.equal(index, torch.arange(n, device=index.device)):  # a chain prefix needs no copy
            src = start + index.to(self.k.device)
            self.k[:, :, :, start:start + n] = self.k[:, :, :, src]
            self.v[:, :, :, start:start + n] = self.v[:, :, :, src]
        self.length = start + n


class Segment:
    """One sequence's share of a packed forward: `length` consecutive rows of the pack, written to `cache` at
    positions start … start+length-1, attending to the cache's first `start` entries and among themselves
    causally (mask None) or as `mask` [length, start+length] bool says (True = may attend; a draft tree).
    The forward writes the entries; the caller moves the cache's length (advance, or keep what verification
    accepted)."""

    __slots__ = ("cache", "start", "length", "mask")

    def __init__(self, cache: KVCache, start: int, length: int, mask: torch.Tensor | None = None):
        if start + length > cache.max_len:
            raise ContextOverflowError(f"KV cache holds {cache.max_len} positions; {start + length} needed")
        self.cache, self.start, self.length, self.mask = cache, start, length, mask
