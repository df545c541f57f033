"""A preallocated KV cache: static buffers plus a length, in groups of layers that share a layout (kv/policy.py).

Appending writes new entries after `length`; `rollback(n)` just moves the length back (the rejected slots are
overwritten later); `keep(start, index)` compacts an accepted tree path into place with one copy per buffer.

Each group holds the layers of one LayerKV. A full group's slot j holds position j. A ring group (a window W with
S sinks) has room for S + W + slack entries: slots 0 … S-1 hold the sinks, and the slots after them the
positions S + dropped, S + dropped + 1, … in order. `make_room(n)` — called only while the cache holds nothing
uncommitted (before a forward; Transformer.forward and the decode loop do) — compacts a ring that could not take
n more entries: the last W positions move down to just after the sinks (one copy per buffer) and `dropped` grows.
A query never sees a key older than its window, so a ring holds everything that is ever visible; rollback and
keep within a step then work as in a full group, and the length cannot go back past what a ring still holds.

A forward sees a group through `Segment.view`: where the segment's new entries go in that group's buffers, and
the mask over the slots there (sinks, keys inside each query's window, the tree or causal order among the new
ones), by positions alone, so a token's result does not depend on when or where its cache compacted.
"""
from __future__ import annotations

import torch

from .kv.policy import FULL, LayerKV

RING_SLACK = 128  # default ring headroom: the most entries one forward may write into a ring (two prompt segments)


class ContextOverflowError(ValueError):
    pass


class Group:
    """The buffers of the layers sharing one LayerKV: k, v [layers in group, B, Hkv, capacity, d]."""

    __slots__ = ("spec", "layers", "k", "v", "capacity", "dropped")

    def __init__(self, spec: LayerKV, layers: list[int], batch, num_kv_heads, capacity, head_dim, dtype, device):
        shape = (len(layers), batch, num_kv_heads, capacity, head_dim)
        self.spec, self.layers, self.capacity, self.dropped = spec, layers, capacity, 0
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [Lg, B, Hkv, capacity, d]
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def slot(self, position: int) -> int:
        """Where `position` (≥ the sinks, still held) is in this group's buffers."""
        return position - self.dropped if position >= self.spec.sinks else position

    def held(self, length: int, device) -> torch.Tensor:
        """The positions of the entries held for a cache of `length`, in slot order [length - dropped]."""
        if not self.dropped:
            return torch.arange(length, device=device)
        s = self.spec.sinks
        return torch.cat([torch.arange(s, device=device), torch.arange(s + self.dropped, length, device=device)])


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", layout: tuple[LayerKV, ...] | None = None,
                 slack: int = RING_SLACK, name: str = "full"):
        """max_len: the most positions this cache serves; layout: a LayerKV per layer (None: all full);
        slack: a ring's room beyond its sinks and window (the most entries one forward may write there)."""
        layout = tuple(layout) if layout is not None else (FULL,) * num_layers
        assert len(layout) == num_layers
        self.layout, self.max_len, self.slack, self.policy_name = layout, max_len, slack, name
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        specs = list(dict.fromkeys(layout))
        self.groups: list[Group] = []
        for spec in specs:
            cap = max_len if not spec.ring else min(max_len, spec.sinks + spec.window + slack)
            members = [i for i, s in enumerate(layout) if s == spec]
            self.groups.append(Group(spec, members, batch, num_kv_heads, cap, head_dim, dtype, device))
        self.group_of = [specs.index(s) for s in layout]  # layer → its group's index
        self.layers = [None] * num_layers  # per-layer views (ck, cv) [B, Hkv, capacity, d]: cheaper to index
        for g in self.groups:
            for j, i in enumerate(g.layers):
                self.layers[i] = (g.k[j], g.v[j])
        self.rings = [g for g in self.groups if g.spec.ring and g.capacity < max_len]  # groups that may compact
        self._length = 0

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def k(self) -> torch.Tensor:
        """All layers' keys [layers, B, Hkv, max_len, d]: a cache of one full group only."""
        if len(self.groups) != 1 or self.groups[0].capacity != self.max_len:
            raise AttributeError("a cache with windowed layers keeps its buffers per group (cache.groups)")
        return self.groups[0].k

    @property
    def v(self) -> torch.Tensor:
        self.k  # the same check
        return self.groups[0].v

    @property
    def nbytes(self) -> int:
        """Bytes of all key and value buffers."""
        return sum(2 * g.k.numel() * g.k.element_size() for g in self.groups)

    @property
    def dropped(self) -> bool:
        """True once some ring let positions go (the cache no longer holds a whole prefix)."""
        return any(g.dropped for g in self.rings)

    def fits(self, layout: tuple[LayerKV, ...], num_kv_heads: int, head_dim: int, dtype, length: int) -> bool:
        """Whether this cache can serve a sequence of `length` positions for a model of these shapes and layout."""
        return (self.layout, self.num_kv_heads, self.head_dim, self.dtype) == (layout, num_kv_heads, head_dim, dtype) \
            and self.max_len >= length

    # ---- the length --------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self._length

    @length.setter
    def length(self, n: int) -> None:
        for g in self.rings:
            if g.dropped and n <= g.spec.sinks:
                g.dropped = 0  # only sinks remain: the ring starts over
            elif g.dropped and n - g.spec.window + 1 < g.spec.sinks + g.dropped:
                raise ContextOverflowError(f"cannot go back to {n} positions: a ring of window {g.spec.window} "
                                           f"no longer holds positions before {g.spec.sinks + g.dropped}")
        self._length = n

    def check_room(self, n: int) -> None:
        if self._length + n > self.max_len:
            raise ContextOverflowError(f"KV cache holds {self.max_len} positions; {self._length + n} needed")

    def make_room(self, n: int) -> int:
        """Make sure n entries can be written after the length, compacting rings that need it; → how many entries
        can be written now (≥ min(n, slack) while positions are left). Call it only while every entry in the
        cache is committed: compaction keeps the last `window` positions of each ring and drops the rest."""
        room = self.max_len - self._length
        for g in self.rings:
            s, w = g.spec.sinks, g.spec.window
            used = self._length - g.dropped if self._length > s else self._length
            if used + n > g.capacity and self._length - w > s + g.dropped:
                src = self._length - w - g.dropped  # slot of position length - W
                g.k[:, :, :, s:s + w] = g.k[:, :, :, src:src + w].clone()
                g.v[:, :, :, s:s + w] = g.v[:, :, :, src:src + w].clone()
                g.dropped = self._length - w - s
                used = s + w
            room = min(room, g.capacity - used)
        return room

    # ---- writing -----------------------------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, Hkv, T, d] after the current length; return all entries held up to and including them."""
        n = k.shape[2]
        self.check_room(n)
        g = self.groups[self.group_of[layer]]
        start = g.slot(self._length) if self._length else 0
        if start + n > g.capacity:
            raise ContextOverflowError(f"a ring holds {g.capacity} entries; call make_room({n}) first")
        ck, cv = self.layers[layer]
        ck.narrow(2, start, n).copy_(k)
        cv.narrow(2, start, n).copy_(v)
        return ck.narrow(2, 0, start + n), cv.narrow(2, 0, start + n)

    def advance(self, n: int) -> None:
        self.length = self._length + n

    def rollback(self, n: int) -> None:
        """Forget the last n entries."""
        self.length = self._length - n

    def keep(self, start: int, index: torch.Tensor) -> None:
        """Keep only entries start+index (in that order) after `start`; the length becomes start+len(index)."""
        n = int(index.numel())
        if not torch.equal(index, torch.arange(n, device=index.device)):  # a chain prefix needs no copy
            for g in self.groups:
                s = g.slot(start) if start else 0
                src = s + index.to(g.k.device)
                g.k[:, :, :, s:s + n] = g.k[:, :, :, src]
                g.v[:, :, :, s:s + n] = g.v[:, :, :, src]
        self.length = start + n


class Segment:
    """One sequence's share of a packed forward: `length` consecutive rows of the pack, written to `cache` at
    positions start … start+length-1, attending to the cache's first `start` entries and among themselves
    causally (mask None) or as `mask` [length, start+length] bool says (True = may attend; a draft tree).
    The forward writes the entries; the caller moves the cache's length (advance, or keep what verification
    accepted). Attention reads a Segment in slot space: for a full group, slots are positions; `view` gives the
    segment as one group of a cache with windowed layers sees it."""

    __slots__ = ("cache", "start", "length", "mask")

    def __init__(self, cache: KVCache, start: int, length: int, mask: torch.Tensor | None = None):
        if start + length > cache.max_len:
            raise ContextOverflowError(f"KV cache holds {cache.max_len} positions; {start + length} needed")
        self.cache, self.start, self.length, self.mask = cache, start, length, mask

    def windowed(self, layer: int) -> bool:
        """Whether `layer` has a window in this segment's cache: its attention then runs the kernel whose result
        does not depend on where keys sit in the buffer (kernels/attention_window.h), since a ring moves them."""
        cache = self.cache
        return cache.groups[cache.group_of[layer]].spec.window is not None

    def view(self, group: Group, positions: torch.Tensor) -> "Segment":
        """This segment in `group`'s buffers, its new tokens at `positions` [length]: start is where they are
        written (the number of held slots before them) and mask [length, start+length] who sees whom there
        (None = causal over everything held). Itself for a full group without a window."""
        spec = group.spec
        if spec.window is None:
            return self
        start, n, mask = self.start, self.length, self.mask
        keys = group.held(start, positions.device)  # [L'] positions of the held entries
        slot_start = int(keys.numel())
        if slot_start + n > group.capacity:
            raise ContextOverflowError(f"a ring holds {group.capacity} entries; {slot_start + n} needed "
                                       f"(call cache.make_room({n}) before the forward)")
        if mask is not None and group.dropped:  # the caller's mask is over positions 0 … start+n-1
            mask = torch.cat([mask[:, :spec.sinks], mask[:, spec.sinks + group.dropped:]], dim=1)
        keys = torch.cat([keys, positions])  # [L'+n]
        nearest = int(keys[spec.sinks]) if keys.numel() > spec.sinks else int(positions.max())
        if int(positions.max()) - nearest < spec.window:  # every key inside every window: nothing to cut
            cut = mask
        else:
            keep = (keys[None, :] < spec.sinks) | (keys[None, :] > positions[:, None] - spec.window)  # [n, L'+n]
            if mask is None:  # causal, bottom-right aligned after the held entries
                mask = torch.ones(n, slot_start + n, dtype=torch.bool, device=positions.device).tril(slot_start)
            cut = keep & mask
        out = Segment.__new__(Segment)
        out.cache, out.start, out.length, out.mask = self.cache, slot_start, n, cut
        return out


def layer_segments(segments: list[Segment], positions: torch.Tensor, num_layers: int) -> list[list[Segment]]:
    """Per layer, the segments as that layer's group sees them (positions [N]: the packed tokens', in segment
    order). Layers of the same groups share one list; a cache of full layers passes its segments through."""
    if all(len(seg.cache.groups) == 1 and seg.cache.groups[0].spec.window is None for seg in segments):
        return [segments] * num_layers
    views: list[dict[int, Segment]] = []
    offset = 0
    for seg in segments:
        pos = positions[offset:offset + seg.length]
        views.append({gi: seg.view(g, pos) for gi, g in enumerate(seg.cache.groups)})
        offset += seg.length
    out, shared = [], {}
    for i in range(num_layers):
        key = tuple(seg.cache.group_of[i] for seg in segments)
        if key not in shared:
            shared[key] = [v[gi] for v, gi in zip(views, key)]
        out.append(shared[key])
    return out
