"""Jacobi decoding with an n-gram pool (lookahead decoding, Fu et al. 2024) and rejection recycling (Jacobi
Forcing, Hu et al. 2025) — the training-free inference side, on the unmodified model.

Each step proposes (a) the current Jacobi iterate: a guess for the next `window` tokens, scored as a chain, and
(b) pool n-grams that start with the root, as extra branches. Scoring the chain is one Jacobi iteration: the
target's argmax after each guessed token is the next iterate, and its fixed-point prefix is exactly what the
greedy verifier accepts. The next iterate's n-grams (the trajectory) and the rejected tail of the draft
(rejection recycling) go into the pool, keyed by their first token, so later steps can draft whole phrases the
iteration has already discovered. The window runs as `blocks` consecutive blocks (multi-block decoding: later
blocks are refined while earlier ones converge); its length follows the cost-aware controller.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict

from ..controller import DraftSizeController, StepCost
from ..tree import Draft, expected_accepted, find_path


class Jacobi:
    name = "jacobi"

    def __init__(self, block: int = 3, blocks: int = 2, ngram: int = 4, pool_branches: int = 2,
                 cost: StepCost | None = None, adaptive: bool = True):
        self.block, self.blocks, self.ngram, self.branches = block, blocks, ngram, pool_branches
        self.window = block * blocks
        self.controller = DraftSizeController(cost or StepCost.default(), self.window, prior=0.3)
        self.adaptive = adaptive
        self.pool: dict[int, OrderedDict] = defaultdict(OrderedDict)  # first token → n-gram tails, newest last

    def forget(self):
        self.pool.clear()
        self.controller = DraftSizeController(self.controller.cost, self.window, prior=0.3)

    def begin(self, state):
        self.guess: list[int] = []  # the Jacobi iterate for the positions after the root
        self.lineage: list[tuple] = []  # per guessed token: the trajectory tokens that led to it
        self.chain: list[int] = []
        self.next_iterate: list[int] = []
        self.last_proposed = 0
        self.discarded = None  # the pending proposal, when `a|b` scored another drafter's instead

    def _remember(self, seq) -> None:
        if len(seq) < 2:
            return
        bucket = self.pool[seq[0]]
        tail = tuple(seq[1:])
        bucket.pop(tail, None)
        bucket[tail] = None
        if len(bucket) > 16:
            bucket.popitem(last=False)

    def _walk(self, token: int, width: int) -> list[int]:
        """Follow the pool's newest n-grams from `token`, falling back to the Jacobi iterate, then repetition."""
        out: list[int] = []
        while len(out) < width:
            bucket = self.pool.get(token)
            if bucket:
                step = list(next(reversed(bucket)))
            elif len(out) < len(self.guess):
                step = [self.guess[len(out)]]
            else:
                step = [token]
            out += step[: width - len(out)]
            token = out[-1]
        return out

    def propose(self, state):
        root = state.tokens[-1]
        width = self.controller.next(context=len(state.tokens)) if self.adaptive else self.window
        width = max(1, min(width, state.budget))
        self.chain = self._walk(root, width)
        tokens, parents = list(self.chain), list(range(-1, width - 1))
        for tail in list(reversed(self.pool.get(root, {})))[1: 1 + self.branches]:  # other pool n-grams
            if len(tokens) + len(tail) > state.budget:
                break
            start = len(tokens)
            tokens += list(tail)
            parents += [-1] + list(range(start, start + len(tail) - 1))
        self.last_proposed = width
        return Draft(tokens, parents, None, [self.name] * len(tokens))

    def observe(self, draft, tree_logits):
        # The chain's own nodes: inside a merged tree (`a+b`) they need not come first, and when another drafter's
        # proposal was scored instead (`a|b`) or the tree was cut, only a prefix or none of them was scored.
        path = find_path(draft, self.chain)
        self.chain = self.chain[:len(path)]
        choice = tree_logits[[0] + [i + 1 for i in path]].argmax(-1).tolist()  # row 0 is the root
        lineage = self.lineage + [()] * (len(self.chain) + 1 - len(self.lineage))
        # One Jacobi iteration: the target's token after the root and after each chain token.
        self.next_iterate = [choice[0]] + [choice[i + 1] for i in range(len(self.chain))]
        # Trajectory n-grams: a chain token, what it led to now, prefixed by what led to the token before.
        new_lineage = [()]
        for i, token in enumerate(self.chain):
            seq = (lineage[i] + (token,))[-(self.ngram - 1):]
            self._remember(seq + (self.next_iterate[i + 1],))
            new_lineage.append(seq)
        self.lineage = new_lineage

    def expected_accepted(self, draft) -> float:
        return expected_accepted(draft, self.controller.acceptance)

    def discard(self, draft):
        self.discarded = draft

    def commit(self, accepted, target_logits):
        emitted = len(accepted)
        self.controller.learn(self.last_proposed, accepted, self.discarded)
        self.last_proposed, self.discarded = 0, None
        for i in range(len(accepted) - 1):  # what the target actually produced is the surest n-gram
            self._remember(tuple(accepted[i:i + self.ngram]))
        if self.next_iterate:
            self.guess = self.next_iterate[emitted:]
            self.lineage = self.lineage[emitted:]
            rejected = self.chain[emitted - 1:]
            if len(rejected) > 1:
                self._remember(tuple(rejected[: self.ngram]))  # rejection recycling
        else:
            self.guess, self.lineage = [], []
        self.next_iterate, self.chain = [], []  # a chain belongs to one step: never observed twice
