"""The prefix cache: KV entries of earlier prompts (and answers), reused by any prompt that starts the same way.

Entries are kept in blocks of `block` tokens, each keyed by a digest of the model and every token up to the
block's end, so a block matches only where the whole prefix before it matches (vLLM's automatic prefix caching
scheme, without paging: a hit copies the blocks into the sequence's own cache). Reuse is exact: a token's KV
entries are a function of the tokens before it alone — the block kernels and the per-segment attention give a
token the same bits however its prompt was chunked and whatever shared its steps — so an answer computed from
cached blocks is the answer computed from scratch. The cache holds at most `capacity` bytes and evicts the
least recently used blocks first.
"""
from __future__ import annotations

import hashlib
import os
import threading
from array import array
from collections import OrderedDict

import torch

from ..models.kv_cache import KVCache


class PrefixCache:
    def __init__(self, capacity: int, block: int = 16):
        if capacity <= 0 or block < 1:
            raise ValueError(f"a prefix cache needs capacity > 0 bytes and block ≥ 1 tokens (got {capacity}, {block})")
        self.capacity, self.block = capacity, block
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # LRU first
        self.bytes = 0
        self.lookups = 0  # prompts looked up
        self.hits = 0  # prompts that reused at least one block
        self.hit_tokens = 0  # prompt tokens not prefilled thanks to the cache
        self.evicted = 0  # blocks dropped to stay within capacity
        self.lock = threading.Lock()  # /metrics reads the counters from another thread

    def _keys(self, model, cache: KVCache, tokens: list[int], n: int) -> list[bytes]:
        """Digests of the first n blocks: each covers the model, the cache's KV policy (a window changes every
        later layer's entries) and every token up to the block's end."""
        keys = []
        digest = hashlib.blake2b(f"{id(model)} {cache.layout}".encode(), digest_size=20).digest()
        for i in range(n):
            block = array("q", tokens[i * self.block:(i + 1) * self.block]).tobytes()
            digest = hashlib.blake2b(digest + block, digest_size=20).digest()
            keys.append(digest)
        return keys

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain used, its first block last: eviction then drops a chain from its end, never leaving a
        block whose prefix is gone (unreachable: a lookup stops at the first missing block)."""
        for key in reversed(keys):
            self.blocks.move_to_end(key)

    def load(self, model, tokens: list[int], cache: KVCache) -> int:
        """Copy the longest cached prefix of `tokens` (whole blocks, leaving at least the last token to score, and
        no more than every group of `cache` holds before a ring would compact) into `cache`, set its length, and
        return how many tokens it holds."""
        found = []
        cache.length = 0
        fits = min(g.capacity for g in cache.groups) - 1
        with self.lock:
            self.lookups += 1
            for i, key in enumerate(self._keys(model, cache, tokens, min(len(tokens) - 1, fits) // self.block)):
                entry = self.blocks.get(key)
                if entry is None:
                    break
                s = i * self.block
                for g, (k, v) in zip(cache.groups, entry):
                    g.k[:, 0, :, s:s + self.block].copy_(k)
                    g.v[:, 0, :, s:s + self.block].copy_(v)
                found.append(key)
            self._touch(found)
            n = len(found) * self.block
            if n:
                self.hits += 1
                self.hit_tokens += n
        cache.length = n
        return n

    def store(self, model, tokens: list[int], cache: KVCache) -> None:
        """Keep the whole blocks of `tokens` whose entries `cache` holds (positions 0 … cache.length-1). A cache
        whose rings (a windowed KV policy) already let positions go holds no whole prefix: nothing is stored
        from it (correctness over reuse)."""
        if cache.dropped:
            return
        n = min(len(tokens), cache.length) // self.block
        keys = self._keys(model, cache, tokens, n)
        with self.lock:
            for i, key in enumerate(keys):
                if key not in self.blocks:
                    s = i * self.block
                    entry = tuple((g.k[:, 0, :, s:s + self.block].clone(), g.v[:, 0, :, s:s + self.block].clone())
                                  for g in cache.groups)  # per group: [layers in group, Hkv, block, d] each
                    self.blocks[key] = entry
                    self.bytes += _nbytes(entry)
            self._touch(keys)
            while self.bytes > self.capacity and self.blocks:
                _, entry = self.blocks.popitem(last=False)
                self.bytes -= _nbytes(entry)
                self.evicted += 1


def _nbytes(entry) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in entry)


def default_mb() -> float:
    """An eighth of physical memory, at most 4 GiB: a few hundred MB holds only a handful of long prompts' KV
    (SmolLM2 keeps 46 KB per token: a 700-token prompt is 32 MB), and a cache smaller than the working set
    thrashes (BENCHMARKS.md); the bytes are taken only as prompts fill it."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 256.0
    return float(min(4096, total // 8 // 2 ** 20))
