"""Combining drafters: `a+b` merges their proposals into one token tree (a trie: shared prefixes are scored once);
`a|b` (Fallback) scores one drafter's proposal each step: of those that propose anything, the one the target is
expected to accept furthest.

What a step's proposal is worth is a drafter's own estimate (optional methods, all asked about the proposal the
drafter has just made):
- `expected_accepted(draft) -> float`: the expected number of its tokens the target accepts (tree.py's
  expected_accepted does the arithmetic from per-node or overall acceptance). A drafter whose draft carries q
  must estimate from the draft's shape, never its sampled tokens: a choice that looked at them would change the
  distribution they were drawn from, and with it exactness.
- `promise(state) -> float`: before drafting, at most what expected_accepted of its proposal would be, for
  drafters whose drafting costs model passes; a proposal in hand worth as much spares the drafting.
- `discard(draft)`: its proposal was not scored; the next commit then tells it what was emitted instead.
"""
from __future__ import annotations

from ..tree import Draft, expected_accepted

PRIOR_ACCEPTANCE = 0.5  # per node, for a drafter that keeps no estimate of its own


class _Combined:
    """Several drafters behind one: each of them learns from every step (begin/observe/commit/forget);
    subclasses decide what is proposed."""

    joiner = ""

    def __init__(self, drafters):
        self.drafters = list(drafters)
        self.name = self.joiner.join(d.name for d in self.drafters)
        self.wants_hidden = any(getattr(d, "wants_hidden", False) for d in self.drafters)

    def begin(self, state):
        for d in self.drafters:
            d.begin(state)

    def forget(self):
        forget_all(self.drafters)

    def observe(self, draft, tree_logits):
        for d in self.drafters:
            if hasattr(d, "observe"):
                d.observe(draft, tree_logits)

    def commit(self, accepted, target_logits):
        for d in self.drafters:
            d.commit(accepted, target_logits)


class Composition(_Combined):
    """`a+b`: every drafter's proposal, merged into one tree."""

    joiner = "+"

    def propose(self, state):
        tokens, parents, sources = [], [], []
        children: dict[tuple[int, int], int] = {}  # (parent node, token) → node
        self.parts = []  # (drafter, its own proposal)
        for d in self.drafters:
            draft = d.propose(state)
            self.parts.append((d, draft))
            srcs = draft.sources or [d.name] * len(draft)
            where = []  # this draft's node i → merged node
            for i, (t, p) in enumerate(zip(draft.tokens, draft.parents)):
                parent = -1 if p < 0 else where[p]
                node = children.get((parent, t))
                if node is None:
                    if len(tokens) >= state.budget:
                        where.append(None)
                        break
                    node = children[(parent, t)] = len(tokens)
                    tokens.append(t)
                    parents.append(parent)
                    sources.append(srcs[i])
                where.append(node)
        return Draft(tokens, parents, None, sources)

    def expected_accepted(self, draft) -> float:
        """At least what the best of the merged proposals brings on its own."""
        return max((worth(d, part) for d, part in self.parts if len(part)), default=0.0)

    def discard(self, draft):
        for d, part in self.parts:
            if len(part) and hasattr(d, "discard"):
                d.discard(part)


class Fallback(_Combined):
    """`a|b`: of the drafters' proposals, the one with the largest expected accepted length (the earlier drafter on
    a tie, and whichever proposes anything when only one does). Unlike `a+b`, the tree is never the union, so
    the target scores one drafter's proposal; the drafters are asked in order, and one whose `promise` cannot
    beat the proposal in hand is not asked at all. The others are told their proposals were discarded, and
    like every drafter they see each step's outcome through commit."""

    joiner = "|"

    def propose(self, state):
        best, best_worth, chosen = Draft(), 0.0, None
        for d in self.drafters:
            if chosen is not None and hasattr(d, "promise") and d.promise(state) <= best_worth:
                continue
            draft = d.propose(state)
            if not len(draft):
                continue
            value = worth(d, draft)
            if chosen is None or value > best_worth:
                if chosen is not None:
                    discard(chosen, best)
                best, best_worth, chosen = draft, value, d
            else:
                discard(d, draft)
        if chosen is not None and best.sources is None:
            best.sources = [chosen.name] * len(best)
        return best


def worth(drafter, draft: Draft) -> float:
    """Expected accepted draft tokens of a drafter's proposal, by its own estimate or a prior per node."""
    if hasattr(drafter, "expected_accepted"):
        return drafter.expected_accepted(draft)
    return expected_accepted(draft, PRIOR_ACCEPTANCE)


def discard(drafter, draft: Draft) -> None:
    if hasattr(drafter, "discard"):
        drafter.discard(draft)


def forget_all(drafters) -> None:
    for d in drafters:
        if hasattr(d, "forget"):
            d.forget()
