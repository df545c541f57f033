"""Token Recycling (Luo et al. 2024): recycle the target's own past top-k predictions as drafts.

An adjacency table maps each token to the top-k tokens the target predicted after it, most recently; every
verification step refreshes the rows of the tokens it scored. A draft tree grows from the root through the
table, best-first by a static rank prior (the paper's wide, shallow tree, sized here by the measured step
cost). The table is kept for the engine's lifetime, so later prompts start with what earlier ones taught.
"""
from __future__ import annotations

import heapq

import torch

from ..controller import DraftSizeController, StepCost
from ..tree import Draft, expected_accepted

# Prior probability that the rank-r candidate is the target's next token (decays fast: top-1 dominates).
_RANK_PRIOR = (0.55, 0.15, 0.07, 0.04, 0.03, 0.02, 0.015, 0.01)


class TokenRecycling:
    name = "recycling"

    def __init__(self, vocab_size: int, top_k: int = 8, max_nodes: int = 24, depth: int = 8,
                 cost: StepCost | None = None, adaptive: bool = True):
        self.top_k, self.max_nodes, self.depth = min(top_k, len(_RANK_PRIOR)), max_nodes, depth
        self.table = torch.full((vocab_size, self.top_k), -1, dtype=torch.long)  # [V, k], -1 = unknown
        self.cost = cost or StepCost.default()
        self.adaptive = adaptive
        self.controller = DraftSizeController(self.cost, max_nodes)

    def forget(self):
        self.table.fill_(-1)
        self.controller = DraftSizeController(self.cost, self.max_nodes)

    def begin(self, state):
        self.last = state.tokens[-1] if state.tokens else None
        self.last_proposed = 0
        self.discarded = None  # the pending proposal, when `a|b` scored another drafter's instead
        self._rows: dict[int, list[int]] = {}

    def _children(self, token: int) -> list[int]:
        row = self._rows.get(token)
        if row is None:
            row = self._rows[token] = [t for t in self.table[token].tolist() if t >= 0]
        return row

    def propose(self, state):
        size = self.controller.next(context=len(state.tokens)) if self.adaptive else self.max_nodes
        size = min(size, state.budget)
        self.last_proposed = 0
        if size <= 0:
            return Draft()
        tokens, parents = [], []
        # Best-first over (−path prior, node): the most probable paths under the rank prior are expanded first.
        heap = [(-p, 0, -1, t, 1) for p, t in zip(_RANK_PRIOR, self._children(state.tokens[-1]))]
        heapq.heapify(heap)
        order = len(heap)
        while heap and len(tokens) < size:
            neg, _, parent, token, depth = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            if depth < self.depth:
                me = len(tokens) - 1
                for p, t in zip(_RANK_PRIOR, self._children(token)):
                    order += 1
                    heapq.heappush(heap, (neg * p, order, me, t, depth + 1))
        self.last_proposed = self._depth(parents) if tokens else 0
        return Draft(tokens, parents, None, [self.name] * len(tokens))

    @staticmethod
    def _depth(parents: list[int]) -> int:
        depth = []
        for p in parents:
            depth.append(1 if p < 0 else depth[p] + 1)
        return max(depth)

    def commit(self, accepted, target_logits):
        # Row i of target_logits is the target's prediction after the token before accepted[i].
        prev = [self.last] + list(accepted[:-1])
        top = torch.topk(target_logits, self.top_k, dim=-1).indices  # [len(accepted), k]
        for i, token in enumerate(prev):
            if token is not None:
                self.table[token] = top[i]
                self._rows.pop(token, None)
        self.last = accepted[-1]
        # The tree's depth plays the chain length; len(accepted) - 1 draft tokens were accepted.
        self.controller.learn(self.last_proposed, accepted, self.discarded)
        self.last_proposed, self.discarded = 0, None

    def expected_accepted(self, draft) -> float:
        return expected_accepted(draft, self.controller.acceptance)

    def discard(self, draft):
        self.discarded = draft

    def observe(self, draft, tree_logits):
        """Every scored node's prediction refreshes its token's row (the paper updates from the whole tree)."""
        top = torch.topk(tree_logits[1:], self.top_k, dim=-1).indices  # [n, k]
        for i, token in enumerate(draft.tokens):
            self.table[token] = top[i]
            self._rows.pop(token, None)
