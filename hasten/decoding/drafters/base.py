"""The Drafter protocol (modelled on transformers' CandidateGenerator: propose, then learn from the outcome).

A drafter never writes the target's KV cache. Drafters that run a model (draft-model, layer-skip, sparse-draft)
own a cache of their own and keep it in step with the accepted tokens in `commit`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..sampling import SamplingConfig
from ..tree import Draft


@dataclass
class DecodeState:
    tokens: list[int]  # prompt + everything emitted so far; the last one is the tree's root (not yet cached)
    prompt_len: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    budget: int  # at most this many draft nodes are worth proposing (tokens left, context left)
    history: list[int] = field(default_factory=list)  # accepted draft tokens per step so far
    # The target's final-norm features of the emitted tokens' positions [n, D] (the last row chose the root), kept
    # only for drafters that declare `wants_hidden = True` (EAGLE-style feature drafting).
    hidden: torch.Tensor | None = None


class Drafter(Protocol):
    name: str

    def begin(self, state: DecodeState) -> None:
        """A new generation starts: state.tokens is the prompt; the first token then arrives through commit."""

    def propose(self, state: DecodeState) -> Draft:
        """A token tree continuing state.tokens (possibly empty)."""

    def commit(self, accepted: list[int], target_logits: torch.Tensor) -> None:
        """accepted = emitted tokens this step (accepted draft path + bonus);
        target_logits [len(accepted), V] = the target's logits that chose them."""

    # Optional: `target`, a model the loop decodes with instead of the engine's (lossy sparse methods, whose
    # "drafter" proposes nothing: sparsity/methods/base.py::SparseDecoding).
    # Optional: `observe(draft, tree_logits)` is called before commit with the logits of every scored node
    # [1+n, V] (root first), for drafters that learn from rejected nodes too (Jacobi iteration).
    # Optional: `wants_hidden = True` asks the loop to fill state.hidden after every target pass.
    # Optional: `forget()` drops what was learned from earlier generations (Token Recycling's table, Jacobi's
    # pool); benchmarks call it at the start of each round so that no run drafts from its own prompt's last run.
    # Optional: `fork()` → the drafter for one more sequence (see `fork` below, which does it for most drafters).


def fork(drafter):
    """A drafter for one sequence of its own, beside others running at once. It shares what the drafter keeps
    across generations (models, heads, recycling tables, n-gram pools) and owns what one generation changes: its
    draft-size controllers, start from the original's, and its KV cache. A generation's own state (tokens,
    indices) is made anew in `begin`."""
    from ...models.kv_cache import KVCache
    from ..controller import DraftSizeController
    if hasattr(drafter, "fork"):
        return drafter.fork()
    twin = copy.copy(drafter)
    for name, value in vars(drafter).items():
        if isinstance(value, DraftSizeController):
            setattr(twin, name, copy.copy(value))
        elif isinstance(value, KVCache):
            setattr(twin, name, None)
        elif isinstance(value, list) and value and all(hasattr(d, "propose") for d in value):
            setattr(twin, name, [fork(d) for d in value])  # a composition's drafters
    return twin


class NoDraft:
    """Plain decoding: the same loop with nothing proposed."""

    name = "baseline"

    def begin(self, state):
        pass

    def propose(self, state):
        return Draft()

    def commit(self, accepted, target_logits):
        pass
