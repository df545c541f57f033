"""The one decode loop: propose → score → accept → commit, for every method — here, what one sequence does.

A Sequence is one generation. Each step it hands the scheduler (scheduler.py) its work — a chunk of its prompt,
or the root (the last emitted token, not yet cached) plus its flattened draft tree — the scheduler scores the
work of every running sequence in one packed target pass, and the sequence accepts: the verifier picks the
accepted path and a bonus token, the accepted entries of its own KV cache are compacted into place and the rest
rolled back. Plain decoding is this loop with a drafter that proposes nothing. `decode` is the scheduler with
one sequence.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..models.kv_cache import ContextOverflowError, KVCache, Segment
from ..models.transformer import Transformer
from .controller import DraftSizeController, StepCost
from .drafters.base import DecodeState, Drafter
from .grammar import Grammar, constrain
from .sampling import SamplingConfig, probabilities, sample
from .tree import Draft, depths, flatten, path_tokens
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


@dataclass
class Work:
    """What a sequence puts into one packed step: its tokens and positions [n], their segments (one per sequence:
    a prompt chunk of any length is one segment), the rows whose logits it needs, and its draft."""
    tokens: list[int]
    positions: torch.Tensor
    segments: list[Segment]
    rows: list[int]
    draft: Draft | None = None


class Sequence:
    """One generation: its tokens, its own KV cache, drafter, sampling (with its own seeded generator), limits,
    stats, and the Steps emitted and not yet read (`out`). `finished` once it stopped (EOS, length) or failed
    (`error`); the scheduler then drops it."""

    def __init__(self, model: Transformer, prompt: list[int], drafter: Drafter, sampling: SamplingConfig,
                 max_new_tokens: int, eos_ids: set[int], cache: KVCache | None = None,
                 verifier: Verifier | None = None, stats: DecodeStats | None = None, grammar: Grammar | None = None):
        context = model.config.max_position_embeddings
        if len(prompt) >= context:
            raise ContextOverflowError(f"the prompt has {len(prompt)} tokens but the model's context is {context}; "
                                       "shorten the prompt")
        self.model, self.prompt, self.drafter, self.sampling = model, list(prompt), drafter, sampling
        self.max_new_tokens = min(max_new_tokens, context - len(prompt))
        self.eos_ids = eos_ids
        if verifier is None:  # a drafter may bring its own sampling verifier (SpecTr for i.i.d. draft chains)
            verifier = getattr(drafter, "sampling_verifier", None) if not sampling.greedy else None
            verifier = verifier or verifier_for(sampling)
        self.verifier = verifier
        self.generator = None if sampling.greedy else sampling.generator(model.device)
        needed = min(context + 64, len(prompt) + self.max_new_tokens + 64)
        if cache is None or cache.max_len < needed:  # a cache passed in keeps its own KV policy
            cache = model.new_cache(needed)
        cache.length = 0
        self.cache = cache
        self.stats = stats if stats is not None else DecodeStats()
        self.wants_hidden = getattr(drafter, "wants_hidden", False)
        # How often this sequence's drafts are accepted, depth by depth: what the scheduler weighs its nodes by.
        self.acceptance = DraftSizeController(StepCost.default(), 0, prior=0.5)
        self.grammar = grammar  # structured output: every emitted token keeps it valid (grammar.py)
        self.masks: torch.Tensor | None = None  # [1+n, V]: the grammar's allowed tokens per row of this step
        self.state: DecodeState | None = None  # set once the prompt is scored
        self.out: deque[Step] = deque()
        self.finished = False
        self.error: BaseException | None = None

    # ---- the scheduler's side ----------------------------------------------------------------------------
    @property
    def prefilling(self) -> bool:
        return self.state is None

    @property
    def prompt_left(self) -> int:
        return len(self.prompt) - self.cache.length

    def prefill(self, n: int) -> Work:
        """The next n prompt tokens (fewer if fewer are left); the last chunk asks for its last row's logits."""
        start = self.cache.length
        n = min(n, self.prompt_left)
        n = min(n, self.cache.make_room(n))  # a ring (a windowed KV policy) takes at most its slack per step
        segments = [Segment(self.cache, start, n)]
        rows = [n - 1] if start + n == len(self.prompt) else []
        return Work(self.prompt[start:start + n], torch.arange(start, start + n, device=self.model.device),
                    segments, rows)

    def propose(self) -> Draft:
        """This step's draft tree, cut to what is worth scoring (tokens left, cache left)."""
        state = self.state
        # Leave room so that accepted tokens never run past max_new_tokens or the cache.
        # make_room: nothing uncommitted is in the cache yet, so a ring may compact here; root + draft must fit.
        room = self.cache.make_room(self.cache.slack)
        state.budget = min(self.max_new_tokens - self.stats.generated - 1, self.cache.max_len - self.cache.length - 2,
                           room - 1)
        t0 = time.perf_counter()
        draft = self.drafter.propose(state) if state.budget > 0 else None
        self.stats.draft_seconds += time.perf_counter() - t0
        draft = draft if draft is not None else Draft()
        draft = truncate(draft, state.budget) if len(draft) > state.budget else draft
        if self.grammar is not None:  # nodes the grammar forbids could never be accepted
            draft = self.grammar.prune(draft)
        return draft

    def decode(self, draft: Draft) -> Work:
        start = self.cache.length
        tokens, positions, mask = flatten(self.state.tokens[-1], draft, start, self.model.device)
        if self.grammar is not None:  # the draft as the scheduler trimmed it
            self.masks = self.grammar.masks(draft)
        return Work(tokens.tolist(), positions, [Segment(self.cache, start, len(tokens), mask)],
                    list(range(len(tokens))), draft)

    def accept(self, work: Work, logits: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """The target's logits [len(work.rows), V] (and features) for this step's work → emit, keep, commit."""
        if work.draft is None:
            self.cache.length += len(work.tokens)
            if work.rows:
                self._first(logits, hidden)
            return
        draft, start, stats = work.draft, self.cache.length, self.stats
        scored = constrain(logits, self.masks) if self.grammar is not None else logits  # p under the grammar
        path, bonus = self.verifier.verify(scored, draft, self.sampling, self.generator)
        if len(draft):
            keep = torch.tensor([0] + path, device=self.model.device)
            self.cache.keep(start, keep)
            kept = logits[keep]
            self.state.hidden = hidden[keep] if self.wants_hidden else None
        else:
            self.cache.length = start + 1
            kept, self.state.hidden = logits, hidden
        stats.target_passes += 1
        emitted = path_tokens(draft, path) + [bonus]
        if self.grammar is not None:
            self.grammar.commit(emitted)
        sources = [(draft.sources[i - 1] if draft.sources else self.drafter.name) for i in path] + ["target"]
        t0 = time.perf_counter()
        if len(draft) and hasattr(self.drafter, "observe"):  # drafters that learn from every scored node (Jacobi)
            self.drafter.observe(draft, logits)
        self.drafter.commit(emitted, kept)
        stats.draft_seconds += time.perf_counter() - t0
        self.state.tokens.extend(emitted)
        self.state.history.append(len(path))
        stats.generated += len(emitted)
        stats.proposed += len(draft)
        if len(draft):
            self.acceptance.update(max(depths(draft)), len(path))
        stats.accepted_per_step.append(len(path))
        self._emit(Step(emitted, sources, len(draft), kept))

    def fail(self, error: BaseException) -> None:
        self.error, self.finished = error, True

    # ---- inside ------------------------------------------------------------------------------------------
    def _first(self, logits, hidden) -> None:
        """The prompt is scored: the first token comes from its last row; the drafter starts."""
        sampling = self.sampling
        last = logits[-1] if self.grammar is None else constrain(logits[-1:], self.grammar.allowed()[None])[0]
        first = int(last.argmax()) if sampling.greedy else sample(probabilities(last, sampling), self.generator)
        if self.grammar is not None:
            self.grammar.commit([first])
        self.state = DecodeState(list(self.prompt), len(self.prompt), sampling, self.generator, budget=0,
                                 hidden=hidden if self.wants_hidden else None)
        self.stats.target_passes += 1
        self.drafter.begin(self.state)
        self.drafter.commit([first], logits)
        self.state.tokens.append(first)
        self.stats.generated += 1
        self.stats.accepted_per_step.append(0)
        self._emit(Step([first], ["target"], 0, logits[-1:]))

    def _emit(self, step: Step) -> None:
        stop_at = next((i for i, t in enumerate(step.tokens) if t in self.eos_ids), None)
        if stop_at is not None:
            self.stats.generated -= len(step.tokens) - stop_at - 1
            self.stats.finish_reason = "stop"
            step = Step(step.tokens[:stop_at + 1], step.sources[:stop_at + 1], step.proposed, step.logits[:stop_at + 1])
            self.finished = True
        elif self.stats.generated >= self.max_new_tokens:
            self.finished = True
        self.out.append(step)


def decode(model: Transformer, prompt: list[int], drafter: Drafter, sampling: SamplingConfig,
           max_new_tokens: int, eos_ids: set[int], stats: DecodeStats, cache=None,
           verifier: Verifier | None = None, grammar: Grammar | None = None) -> Iterator[Step]:
    """Yield the emitted tokens step by step; `stats` is filled in as it goes. Closing the generator stops it.
    This is the scheduler with one sequence."""
    from .scheduler import Scheduler
    seq = Sequence(model, prompt, drafter, sampling, max_new_tokens, eos_ids, cache, verifier, stats, grammar)
    yield from Scheduler().steps(seq)


def truncate(draft: Draft, budget: int) -> Draft:
    """Drop nodes past the budget (nodes are in topological order, so parents always survive)."""
    q = draft.q[:budget] if draft.q is not None else None
    return Draft(draft.tokens[:budget], draft.parents[:budget], q, draft.sources[:budget] if draft.sources else None)
