"""The one decode loop: propose → score → accept → commit, for every method.

Each step feeds the target the root (the last emitted token, not yet cached) plus the flattened draft tree in one
forward pass, lets the verifier pick the accepted path and a bonus token, compacts the accepted entries in the KV
cache and rolls back the rest. Plain decoding is this loop with a drafter that proposes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..models.kv_cache import ContextOverflowError
from ..models.transformer import Transformer
from .drafters.base import DecodeState, Drafter
from .sampling import SamplingConfig, probabilities, sample
from .tree import Draft, flatten, path_tokens
from .verify import Verifier, verifier_for


@dataclass
class Step:
    tokens: list[int]  # emitted this step: accepted draft tokens, then the bonus token
    sources: list[str]  # per token: the drafter that proposed it, or "target" for the bonus token
    proposed: int  # draft nodes scored this step
    logits: torch.Tensor | None = None  # [len(tokens), V]: the target's logits each token was chosen from


@dataclass
class DecodeStats:
    target_passes: int = 0
    generated: int = 0
    draft_seconds: float = 0.0
    proposed: int = 0
    accepted_per_step: list[int] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def mean_accepted(self) -> float:
        """τ: generated tokens per target forward pass (1.00 for plain decoding)."""
        return self.generated / self.target_passes if self.target_passes else 0.0


def decode(model: Transformer, prompt: list[int], drafter: Drafter, sampling: SamplingConfig,
           max_new_tokens: int, eos_ids: set[int], stats: DecodeStats, cache=None,
           verifier: Verifier | None = None) -> Iterator[Step]:
    """Yield the emitted tokens step by step; `stats` is filled in as it goes. Closing the generator stops it."""
    context = model.config.max_position_embeddings
    if len(prompt) >= context:
        raise ContextOverflowError(f"the prompt has {len(prompt)} tokens but the model's context is {context}; "
                                   "shorten the prompt")
    max_new_tokens = min(max_new_tokens, context - len(prompt))
    if verifier is None:  # a drafter may bring its own sampling verifier (SpecTr for i.i.d. draft chains)
        verifier = getattr(drafter, "sampling_verifier", None) if not sampling.greedy else None
        verifier = verifier or verifier_for(sampling)
    generator = None if sampling.greedy else sampling.generator(model.device)
    if cache is None or cache.max_len < len(prompt) + max_new_tokens + 64:
        cache = model.new_cache(min(context + 64, len(prompt) + max_new_tokens + 64))
    cache.length = 0

    with torch.inference_mode():
        wants_hidden = getattr(drafter, "wants_hidden", False)

        def score(tokens, positions=None, mask=None, last_only=False):
            """One target pass over [1, T] tokens → (logits [T, V], final-norm features [T, D] or None)."""
            out = model(tokens, positions, cache, mask, last_only=last_only, return_hidden=wants_hidden)
            return (out[0][0], out[1][0]) if wants_hidden else (out[0], None)

        logits, hidden = score(torch.tensor([prompt], device=model.device), last_only=True)  # [1, V], [1, D]
        stats.target_passes += 1
        first = int(logits[-1].argmax()) if sampling.greedy else sample(probabilities(logits[-1], sampling), generator)
        state = DecodeState(list(prompt), len(prompt), sampling, generator, budget=0, hidden=hidden)
        drafter.begin(state)
        drafter.commit([first], logits)
        state.tokens.append(first)
        stats.generated += 1
        stats.accepted_per_step.append(0)
        yield Step([first], ["target"], 0, logits[-1:])
        if first in eos_ids:
            stats.finish_reason = "stop"
            return
        while stats.generated < max_new_tokens:
            # Leave room so that accepted tokens never run past max_new_tokens or the cache.
            state.budget = min(max_new_tokens - stats.generated - 1, cache.max_len - cache.length - 2)
            t0 = time.perf_counter()
            draft = drafter.propose(state) if state.budget > 0 else None
            stats.draft_seconds += time.perf_counter() - t0
            if draft is not None and len(draft) > state.budget:
                draft = _truncate(draft, state.budget)
            start = cache.length
            if draft is None or not len(draft):
                logits, state.hidden = score(torch.tensor([[state.tokens[-1]]], device=model.device))  # [1, V]
                path, bonus = verifier.verify(logits, Draft(), sampling, generator)
                kept, proposed = logits, 0
            else:
                tokens, positions, mask = flatten(state.tokens[-1], draft, start, model.device)
                logits, hidden = score(tokens[None], positions, mask)  # [1+n, V], [1+n, D]
                path, bonus = verifier.verify(logits, draft, sampling, generator)
                keep = torch.tensor([0] + path, device=model.device)
                cache.keep(start, keep)
                kept, proposed = logits[keep], len(draft)
                state.hidden = hidden[keep] if wants_hidden else None
            stats.target_passes += 1
            emitted = (path_tokens(draft, path) if path else []) + [bonus]
            sources = [(draft.sources[i - 1] if draft.sources else drafter.name) for i in path] + ["target"]
            t0 = time.perf_counter()
            if proposed and hasattr(drafter, "observe"):  # drafters that learn from every scored node (Jacobi)
                drafter.observe(draft, logits)
            drafter.commit(emitted, kept)
            stats.draft_seconds += time.perf_counter() - t0
            state.tokens.extend(emitted)
            state.history.append(len(path))
            stats.generated += len(emitted)
            stats.proposed += proposed
            stats.accepted_per_step.append(len(path))
            stop_at = next((i for i, t in enumerate(emitted) if t in eos_ids), None)
            if stop_at is not None:
                stats.generated -= len(emitted) - stop_at - 1
                stats.finish_reason = "stop"
                yield Step(emitted[:stop_at + 1], sources[:stop_at + 1], proposed, kept[:stop_at + 1])
                return
            yield Step(emitted, sources, proposed, kept)


def _truncate(draft: Draft, budget: int) -> Draft:
    """Drop nodes past the budget (nodes are in topological order, so parents always survive)."""
    q = draft.q[:budget] if draft.q is not None else None
    return Draft(draft.tokens[:budget], draft.parents[:budget], q, draft.sources[:budget] if draft.sources else None)
