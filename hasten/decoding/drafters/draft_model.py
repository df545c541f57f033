"""Drafting with a model: a smaller checkpoint sharing the target's vocabulary (`draft-model`), or the target
itself with layers skipped (`layer-skip`, see layer_skip.py). The drafter owns its KV cache.

Each step the tokens the draft has not seen yet (last step's accepted tokens and the root) are fed in one pass,
then k tokens are drafted one at a time; everything drafted is rolled back afterwards, so the draft cache always
holds exactly the committed text. Under greedy decoding the draft is the draft model's argmax chain; under
sampling it samples n i.i.d. chains from its own (warped) distribution q and hands over q, so exact
speculative sampling — SpecTr's K-SEQ when n > 1 — keeps the target's distribution.
"""
from __future__ import annotations

import torch

from ..controller import DraftSizeController, StepCost
from ..sampling import probabilities
from ..tree import Draft, expected_accepted
from ..verify import SpecTrVerifier, SpeculativeSamplingVerifier


class VocabularyMismatchError(ValueError):
    pass


class ModelDrafter:
    def __init__(self, model, vocab_size: int, k: int = 4, n: int = 1, layers: tuple[int, ...] | None = None,
                 cost: StepCost | None = None, draft_cost: float = 0.1, adaptive: bool = True, name: str = "draft-model",
                 prior: float = 0.8):
        self.model, self.vocab_size, self.k, self.n, self.layers = model, vocab_size, k, n, layers
        self.name = name
        # prior: the acceptance expected before any is seen (a calibrated agreement where one exists)
        self.controller = DraftSizeController(cost or StepCost.default(), k, prior=prior, draft_cost=draft_cost)
        self.adaptive = adaptive
        self.cache = None
        self.sampling_verifier = SpecTrVerifier() if n > 1 else SpeculativeSamplingVerifier()

    def begin(self, state):
        need = len(state.tokens) + 4096
        if self.cache is None or self.cache.max_len < need:
            self.cache = self.model.new_cache(min(need, self.model.config.max_position_embeddings + 64))
        self.cache.length = 0
        self.tokens = list(state.tokens)
        self.last_proposed = 0
        # The pending proposal, when `a|b` scored another drafter's instead (see controller.learn). The cache needs
        # nothing then: propose rolls every drafted entry back, so it holds only the committed text either way.
        self.discarded = None

    def _size(self, state) -> int:
        k = self.controller.next(context=len(state.tokens)) if self.adaptive else self.k
        return min(k, state.budget // max(self.n, 1))

    def expected_accepted(self, draft) -> float:
        """From the measured acceptance and the draft's shape alone, never its sampled tokens: choosing between
        proposals by their tokens would bias the q this draft was sampled from."""
        return expected_accepted(draft, self.controller.acceptance)

    def promise(self, state) -> float:
        """expected_accepted of the proposal it would make now, before paying for it (an upper bound: the cache
        may leave room for fewer tokens); a better proposal already in hand spares drafting."""
        if self.n > 1 and not state.sampling.greedy:
            return float("inf")  # n chains: their tree's estimate depends on more than k
        return expected_accepted(Draft.chain([0] * max(self._size(state), 0)), self.controller.acceptance)

    def discard(self, draft):
        self.discarded = draft

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens to the draft; → its next-token logits over the target's vocabulary [V]."""
        ids = torch.tensor([tokens], device=self.model.device)
        row = self.model(ids, cache=self.cache, layers=self.layers, last_only=True)[0, -1]
        v = self.vocab_size
        if row.shape[0] >= v:
            return row[:v]  # padded draft vocabulary: ids past the tokenizer's never exist
        return torch.cat([row, row.new_full((v - row.shape[0],), float("-inf"))])

    def propose(self, state):
        k = self.last_proposed = self._size(state)
        if k <= 0:
            return Draft()
        with torch.inference_mode():
            base = self.cache.length
            pending = self.tokens[base:]  # committed tokens the draft has not seen (always ≥ the root)
            first = self._logits(pending)
            synced = self.cache.length
            # A ring (a windowed KV policy) compacts only now, while it holds committed entries alone: the k
            # drafted entries then fit without compaction, and rolling back to `synced` stays inside the ring.
            k = self.last_proposed = min(k, self.cache.make_room(k))  # each chain writes k - 1 entries
            if state.sampling.greedy:
                chain = []
                logits = first
                for i in range(k):
                    chain.append(int(logits.argmax()))
                    if i + 1 < k:
                        logits = self._logits(chain[-1:])
                self.cache.length = synced
                return Draft.chain(chain, source=self.name)
            tokens, parents, qs = [], [], []
            for _ in range(self.n):  # n i.i.d. chains, each from the synced cache
                logits = first
                for i in range(k):
                    q = probabilities(logits, state.sampling)
                    x = int(torch.multinomial(q, 1, generator=state.generator))
                    parents.append(-1 if i == 0 else len(tokens) - 1)
                    tokens.append(x)
                    qs.append(q)
                    if i + 1 < k:
                        logits = self._logits([x])
                self.cache.length = synced
            return Draft(tokens, parents, torch.stack(qs), [self.name] * len(tokens))

    def commit(self, accepted, target_logits):
        self.controller.learn(self.last_proposed, accepted, self.discarded)
        self.last_proposed, self.discarded = 0, None
        self.tokens.extend(accepted)


def check_vocabulary(target_tokenizer, draft_tokenizer, draft_path: str) -> None:
    """Refuse a draft whose tokenizer maps tokens to different ids than the target's."""
    target, draft = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    shared = set(target) & set(draft)
    if len(shared) < 0.98 * min(len(target), len(draft)) or any(target[t] != draft[t] for t in shared):
        raise VocabularyMismatchError(
            f"draft model {draft_path} uses a different tokenizer than the target; pick a draft from the same "
            "model family (same tokenizer), or use prompt-lookup / layer-skip")


def draft_model(engine, model: str, k: int = 4, n: int = 1) -> ModelDrafter:
    from ...models.loading import load
    from ..controller import step_cost
    draft = load(model)
    check_vocabulary(engine.tokenizer, draft.tokenizer, model)
    cost = step_cost(engine)
    ratio = sum(p.numel() for p in draft.model.parameters()) / max(1, sum(p.numel() for p in engine.model.parameters()))
    return ModelDrafter(draft.model, len(engine.tokenizer), k, n, cost=cost, draft_cost=ratio)
