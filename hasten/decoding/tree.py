"""Token trees: a Draft (tokens + parent pointers) flattened behind the root for one target forward pass.

The root is the last emitted token, not yet in the KV cache; draft node i sits at index i+1. A chain is the tree
whose parents are arange(-1, n-1). Everything here works on small Python lists: trees are at most a few dozen
nodes and this runs once per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)  # [n]
    parents: list[int] = field(default_factory=list)  # [n], -1 = child of the root
    q: torch.Tensor | None = None  # [n, V] draft probabilities, or None for deterministic drafters
    sources: list[str] | None = None  # which drafter proposed each node (compositions, reports)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], q: torch.Tensor | None = None, source: str | None = None) -> "Draft":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), q, [source] * len(tokens) if source else None)

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))


def depths(draft: Draft) -> list[int]:
    """Depth of every node (root = 0, draft node i at index i+1)."""
    d = [0]
    for p in draft.parents:
        d.append(d[p + 1] + 1)
    return d


def children(draft: Draft) -> list[list[int]]:
    """children[j] = node indices (1-based, behind the root) whose parent is node j."""
    kids: list[list[int]] = [[] for _ in range(len(draft) + 1)]
    for i, p in enumerate(draft.parents):
        kids[p + 1].append(i + 1)
    return kids


def flatten(root: int, draft: Draft, cached: int, device="cpu"):
    """→ tokens [1+n], positions [1+n], mask [1+n, cached+1+n] (None for a chain, which is plain causal)."""
    tokens = torch.tensor([root] + draft.tokens, dtype=torch.long, device=device)
    if draft.is_chain():
        return tokens, torch.arange(cached, cached + len(tokens), device=device), None
    n = len(draft) + 1
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    ancestors[0, 0] = True
    for i, p in enumerate(draft.parents):
        ancestors[i + 1] = ancestors[p + 1]
        ancestors[i + 1, i + 1] = True
    mask = torch.cat([torch.ones(n, cached, dtype=torch.bool), ancestors], dim=1).to(device)
    positions = cached + torch.tensor(depths(draft), device=device)
    return tokens, positions, mask


def path_tokens(draft: Draft, path: list[int]) -> list[int]:
    return [draft.tokens[i - 1] for i in path]


def find_path(draft: Draft, tokens: list[int]) -> list[int]:
    """Draft node indices (0-based) spelling the longest prefix of `tokens` as a path down from the root: where
    a drafter's own proposal sits inside a merged or truncated tree (empty if it is not there)."""
    nodes, parent = [], -1
    for t in tokens:
        parent = next((i for i, (tok, p) in enumerate(zip(draft.tokens, draft.parents)) if p == parent and tok == t), None)
        if parent is None:
            break
        nodes.append(parent)
    return nodes


def expected_accepted(draft: Draft, accept) -> float:
    """Expected number of draft tokens the target accepts: Σ over nodes of P(the node's whole path is accepted)
    (the accepted nodes form one path, so this sum is the path's expected length). `accept` is either, per node
    [n], the probability it is accepted given its parent was (a head's probability of the token: a chain
    p1..pk gives p1 + p1·p2 + … + p1···pk), or one estimate a for every node; siblings are then alternatives
    tried in turn, the r-th child of a node (r = 0, 1, …) accepted with a·(1−a)^r, so that a chain gives
    a + a² + … + a^k and a node's children together never claim more than the node itself."""
    uniform = not isinstance(accept, (list, tuple))
    a = min(max(float(accept), 0.0), 1.0) if uniform else 0.0
    path = [1.0]  # per node (root first): P(its path is accepted)
    seen = [0] * (len(draft) + 1)  # children met so far, per node
    for i, p in enumerate(draft.parents):
        if uniform:
            c = a * (1 - a) ** seen[p + 1]
            seen[p + 1] += 1
        else:
            c = float(accept[i])
        path.append(path[p + 1] * c)
    return sum(path) - 1.0
