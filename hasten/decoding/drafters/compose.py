"""Combining drafters: `a+b` merges their proposals into one token tree (a trie: shared prefixes are scored once);
`a|b` (Fallback) scores a's proposal when it has one and b's otherwise."""
from __future__ import annotations

from ..tree import Draft


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
        for d in self.drafters:
            draft = d.propose(state)
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


class Fallback(_Combined):
    """`a|b`: a's proposal when it has one, else b's. Unlike `a+b`, the tree is never the union, so a step
    costs what one drafter's proposal costs; later drafters are not even asked once one has proposed."""

    joiner = "|"

    def propose(self, state):
        draft = Draft()
        for d in self.drafters:
            draft = d.propose(state)
            if len(draft):
                if draft.sources is None:
                    draft.sources = [d.name] * len(draft)
                return draft
        return draft


def forget_all(drafters) -> None:
    for d in drafters:
        if hasattr(d, "forget"):
            d.forget()
