"""The scheduler: many sequences stepped together, each step one packed target pass over all of them.

Every step packs each running sequence's work — its root plus draft tree, or a chunk of its prompt — into one
[ΣT] token tensor with a segment per sequence (Transformer.packed): linear layers run over all packed tokens at
once, attention per segment against that sequence's own KV cache; then each sequence verifies, keeps or rolls
back its own cache and emits (loop.py). `decode` / `Engine.generate` are this with one sequence.

Batch invariance: a sequence's output is the same whatever else shares its steps. The block kernels give each
token the same bits whatever is packed beside it, attention runs per segment through a kernel whose per-token
result does not depend on the segment's length, and each sequence samples from its own seeded generator. So
neither the prompt's chunking nor the neighbours change a single logit; what a step packs only changes speed.

Load: prompts are prefilled in chunks under a per-step token budget (`step_tokens`) so a long prompt never stalls
the running streams; decoding sequences come first. When several sequences share a step, drafts are trimmed by
goodput — the expected tokens emitted per unit of the measured step cost (controller.py's StepCost) at the
step's packed token count — so drafting shrinks, then stops, as the machine saturates. Drafts of seeded
sampling requests are never trimmed: their output depends on what was drafted, and must not depend on load.
"""
from __future__ import annotations

import heapq
from typing import Callable, Iterator

import torch

from ..models.kv_cache import KVCache
from .controller import StepCost
from .loop import Sequence, Step, Work
from .tree import Draft, depths


class Scheduler:
    """Runs up to `max_batch` sequences at once (the rest wait, first come first served); each `step()` scores at
    most about `step_tokens` tokens (None: no limit, a prompt is prefilled in one step). `prefix_cache`
    (prefix_cache.py) lends sequences the cached KV of a shared prompt prefix; `cost` prices steps (or makes the
    price on first use: measuring takes seconds, and a batch of one never needs it)."""

    def __init__(self, max_batch: int = 1, step_tokens: int | None = None, prefix_cache=None,
                 cost: StepCost | Callable[[], StepCost] | None = None):
        if max_batch < 1 or (step_tokens is not None and step_tokens < 1):
            raise ValueError(f"max_batch and step_tokens must be ≥ 1 (got {max_batch}, {step_tokens})")
        self.max_batch, self.step_tokens, self.prefix_cache = max_batch, step_tokens, prefix_cache
        self._cost = cost or StepCost.default()
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.free: list[KVCache] = []  # caches of sequences that left, for the next ones (at most max_batch)
        self.steps_run = 0
        self.last_packed = 0  # tokens scored by the last step (all targets)

    @property
    def cost(self) -> StepCost:
        if not isinstance(self._cost, StepCost):
            self._cost = self._cost()
        return self._cost

    # ---- membership --------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence now (a client left, or it ended and was read): it is in no later step, and its
        cache goes to the next sequence."""
        for group in (self.waiting, self.running):
            if seq in group:
                group.remove(seq)
        if seq.cache is not None:
            if len(self.free) < self.max_batch:
                self.free.append(seq.cache)
            seq.cache = None

    def cache(self, model, length: int) -> KVCache | None:
        """A cache of at least `length` positions shaped and laid out (KV policy) for `model` that a sequence
        left behind, or None (allocating one per request would write hundreds of MB at long contexts)."""
        c, layout = model.config, model.kv_layout()
        for cache in self.free:
            if cache.fits(layout, c.num_kv_heads, c.head_dim, model.cache_dtype, length):
                self.free.remove(cache)
                return cache
        return None

    def steps(self, seq: Sequence, pump: bool = True) -> Iterator[Step | None]:
        """seq's Steps as they come. pump=True runs this scheduler's steps whenever seq has nothing to read (one
        caller drives everything: `decode`); pump=False yields None instead, for a caller that runs step() itself
        (the server's worker). Raises seq's error, if it failed; closing the iterator removes seq."""
        self.add(seq)
        try:
            while True:
                while seq.out:
                    yield seq.out.popleft()
                if seq.error is not None:
                    raise seq.error
                if seq.finished:
                    return
                if pump:
                    self.step()
                else:
                    yield None
        finally:
            self.remove(seq)

    # ---- one step ----------------------------------------------------------------------------------------
    def step(self) -> None:
        """Admit waiting sequences, score every running sequence's work in one packed pass per target model,
        and let each accept it. A sequence whose drafter or verifier raises fails alone."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.pop(0)
            if self.prefix_cache is not None:
                self.prefix_cache.load(seq.model, seq.prompt, seq.cache)
            self.running.append(seq)
        self.last_packed = 0
        groups: dict[int, list[Sequence]] = {}
        for seq in self.running:  # lossy methods decode a model of their own: one pass per target
            groups.setdefault(id(seq.model), []).append(seq)
        for group in groups.values():
            self._step(group)
        for seq in [s for s in self.running if s.finished]:
            self.running.remove(seq)
            if seq.error is None and self.prefix_cache is not None:
                self.prefix_cache.store(seq.model, (seq.state.tokens if seq.state else seq.prompt)[:seq.cache.length],
                                        seq.cache)
        self.steps_run += 1

    def _step(self, group: list[Sequence]) -> None:
        budget = self.step_tokens or 1 << 30
        decoding = [s for s in group if not s.prefilling and not s.finished]
        prefilling = [s for s in group if s.prefilling and not s.finished]
        drafts: dict[Sequence, Draft] = {}
        for seq in decoding:
            try:
                drafts[seq] = seq.propose()
            except Exception as e:  # this request's drafter failed: it fails alone
                seq.fail(e)
        # Prompts always progress: up to half the budget is kept for prefill.
        reserve = min(prefilling[0].prompt_left, max(1, budget // 2)) if prefilling else 0
        if len(drafts) + len(prefilling) > 1 and any(len(d) for d in drafts.values()):
            drafts = self._trim(drafts, cap=budget - reserve)
        works: list[tuple[Sequence, Work]] = [(seq, seq.decode(d)) for seq, d in drafts.items()]
        room = max(budget - sum(len(w.tokens) for _, w in works), reserve)
        for seq in prefilling:
            if room <= 0:
                break
            work = seq.prefill(room)
            room -= len(work.tokens)
            works.append((seq, work))
        if not works:
            return
        model = group[0].model
        tokens = torch.tensor([t for _, w in works for t in w.tokens], device=model.device)  # [N]
        positions = torch.cat([w.positions for _, w in works])  # [N]
        segments = [seg for _, w in works for seg in w.segments]
        rows, offset = [], 0
        for _, w in works:
            rows += [offset + r for r in w.rows]
            offset += len(w.tokens)
        hidden_wanted = any(seq.wants_hidden for seq, _ in works)
        try:
            with torch.inference_mode():
                out = model.packed(tokens, positions, segments, rows=rows if len(rows) < len(tokens) else None,
                                   return_hidden=hidden_wanted)
        except Exception as e:  # the shared pass failed: every sequence in it fails
            for seq, _ in works:
                seq.fail(e)
            return
        logits, hidden = out if hidden_wanted else (out, None)  # [R, V], [R, D]
        self.last_packed += len(tokens)
        at = 0
        with torch.inference_mode():
            for seq, work in works:
                n = len(work.rows)
                try:
                    seq.accept(work, logits[at:at + n], hidden[at:at + n] if seq.wants_hidden else None)
                    if work.draft is None and work.rows and self.prefix_cache is not None:  # prompt scored
                        self.prefix_cache.store(seq.model, seq.prompt, seq.cache)
                except Exception as e:
                    seq.fail(e)
                at += n

    def _trim(self, drafts: dict[Sequence, Draft], cap: int) -> dict[Sequence, Draft]:
        """Keep the draft nodes that raise the step's goodput: expected emitted tokens / cost(packed tokens).
        A node at depth d of a sequence whose drafts are accepted at rate a is worth a**d expected tokens; nodes
        are taken best first (a parent is always worth more than its child) while goodput rises and the packed
        tokens stay within `cap`. Seeded sampling keeps its drafts whole."""
        gain, packed, candidates = float(len(drafts)), len(drafts), []
        for seq, draft in drafts.items():
            a = min(seq.acceptance.acceptance, 0.95)
            fixed = not seq.sampling.greedy and seq.sampling.seed is not None
            for i, d in enumerate(depths(draft)[1:]):
                if fixed:
                    gain, packed = gain + a ** d, packed + 1
                else:
                    candidates.append((-a ** d, d, id(seq), i, seq))
        heapq.heapify(candidates)
        cost = self.cost
        best, best_goodput, chosen = [], gain / cost(packed), []
        while candidates and packed < cap:
            value, _, _, i, seq = heapq.heappop(candidates)
            gain, packed = gain - value, packed + 1
            chosen.append((seq, i))
            goodput = gain / cost(packed)
            if goodput > best_goodput:
                best, best_goodput = list(chosen), goodput
        keep: dict[Sequence, list[int]] = {}
        for seq, i in best:
            keep.setdefault(seq, []).append(i)
        out = {}
        for seq, draft in drafts.items():
            fixed = not seq.sampling.greedy and seq.sampling.seed is not None
            out[seq] = draft if fixed else select(draft, sorted(keep.get(seq, [])))
        return out


def select(draft: Draft, nodes: list[int]) -> Draft:
    """The sub-tree of `draft` made of `nodes` (indices in order, each node's parent among them)."""
    if len(nodes) == len(draft):
        return draft
    where = {old: new for new, old in enumerate(nodes)}
    parents = [-1 if draft.parents[i] < 0 else where[draft.parents[i]] for i in nodes]
    q = draft.q[nodes] if draft.q is not None and nodes else None
    return Draft([draft.tokens[i] for i in nodes], parents, q,
                 [draft.sources[i] for i in nodes] if draft.sources else None)
