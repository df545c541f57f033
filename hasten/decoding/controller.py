"""How much to draft: the target's measured step cost against the acceptance seen so far.

- DiffuSpec's adaptive draft-length (ADL) controller picks the next proposal size from recent acceptance and
  realised lengths; here recent acceptance feeds a geometric model (each drafted token is accepted with
  probability a, given its parent was) whose a is an exponentially decayed estimate.
- The cost side is this machine's: the target's forward time as a function of tokens scored and of the keys
  already cached, measured once per model and thread count and cached. On a 2-core CPU scoring 16 tokens costs
  well over one token, so the best size is where expected tokens per step / step time peaks, not the largest
  draft that might be accepted; deep in a long context every scored token also attends to every cached key, so
  drafts shrink there.
- Blockwise parallel decoding's rule (keep the longest verified prefix, then take the target's own token) is the
  greedy verifier in verify.py; this module only sizes the drafts.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from .tree import find_path

SIZES = (1, 2, 4, 8, 12, 16, 24, 32)


class StepCost:
    """Relative cost of one target forward over T tokens after L cached keys (cost(1) = 1 at the table's
    context): the table's sizes interpolated, plus an attention term for the keys past that context. Attention
    reads the cache once per step for all the step's tokens (the streamed kernel shares each key among them) and
    then computes per token and key, so the term is (per_key_step + per_key * T) * (L - context), relative to the
    one-token step: verification at depth is priced as it costs, and an extra draft token is not charged the
    cache read that the step pays anyway."""

    def __init__(self, table: dict[int, float], per_key: float = 0.0, context: int = 0, per_key_step: float = 0.0):
        self.sizes = sorted(table)
        base = table[self.sizes[0]]
        self.rel = [table[s] / base for s in self.sizes]
        self.per_key, self.per_key_step, self.context = max(per_key, 0.0), max(per_key_step, 0.0), context

    def __call__(self, tokens: int, context: int | None = None) -> float:
        s, r = self.sizes, self.rel
        if tokens <= s[0]:
            base = r[0]
        else:
            base = r[-1] * tokens / s[-1]
            for i in range(1, len(s)):
                if tokens <= s[i]:
                    w = (tokens - s[i - 1]) / (s[i] - s[i - 1])
                    base = r[i - 1] + w * (r[i] - r[i - 1])
                    break
        if context is None or not (self.per_key or self.per_key_step):
            return base
        # shorter contexts than the table's save at most half of it (the rest is weights, not attention)
        return max(base + (self.per_key_step + self.per_key * tokens) * (context - self.context), base / 2)

    @classmethod
    def default(cls) -> "StepCost":
        """A flat-then-linear guess used until a measurement exists."""
        return cls({t: 1.0 + 0.06 * (t - 1) for t in SIZES})


def measure_step_cost(model, context: int = 256, sizes=SIZES, repeats: int = 5) -> dict[int, float]:
    """Median seconds of one target forward over T new tokens after `context` cached ones, sizes interleaved."""
    return measure_contexts(model, (context,), sizes, repeats)[context]


def measure_contexts(model, contexts, sizes, repeats: int = 5) -> dict[int, dict[int, float]]:
    """Median seconds of one target forward over T new tokens after L cached ones, for each L in `contexts` and
    T in `sizes`, all interleaved: {L: {T: seconds}}."""
    caches = {L: model.new_cache(L + max(sizes) + 1) for L in contexts}
    times = {L: {s: [] for s in sizes} for L in contexts}
    with torch.inference_mode():
        for L, cache in caches.items():  # only the last row's logits: all L rows' are 2 GB at 2048 x 262k vocabulary
            model(torch.randint(0, model.config.vocab_size, (1, L)), cache=cache, last_only=True)
        for r in range(repeats + 1):
            for s in sizes:
                for L, cache in caches.items():
                    tokens = torch.randint(0, model.config.vocab_size, (1, s))
                    t0 = time.perf_counter()
                    model(tokens, cache=cache)
                    if r:  # the first pass warms up
                        times[L][s].append(time.perf_counter() - t0)
                    cache.rollback(s)
    return {L: {s: statistics.median(v) for s, v in ts.items()} for L, ts in times.items()}


def attention_cost(near: dict[int, float], far: dict[int, float], keys: int, base: float) -> tuple[float, float]:
    """StepCost's attention terms from step times at two contexts `keys` apart, relative to the one-token step
    `base`: (per_key_step, per_key) = the extra seconds per cached key that a step pays once, and that each
    scored token adds, fit through the smallest and largest sizes measured at both. Noise that says "cheaper
    deep" gives no term."""
    sizes = sorted(set(near) & set(far))
    if not sizes:
        return 0.0, 0.0
    lo, hi = sizes[0], sizes[-1]
    d_lo, d_hi = (far[lo] - near[lo]) / keys, (far[hi] - near[hi]) / keys
    per_token = max((d_hi - d_lo) / (hi - lo), 0.0) if hi > lo else max(d_lo / lo, 0.0)
    per_step = max(d_lo - per_token * lo, 0.0)
    return per_step / base, per_token / base


CONTEXTS = (256, 2048)  # the table's context, and the far one that prices the attention term


def forward_code_hash() -> str:
    """A hash of the code a target forward runs (model modules and kernels): a step-cost table measured before
    a kernel changed would misprice drafts, so the cache is keyed by it."""
    import hashlib
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("models/*.py"), *root.glob("kernels/*.cpp"), *root.glob("kernels/*.h"),
                        *root.glob("kernels/*.py"), *root.glob("kernels/formats/*.h")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def step_cost(engine) -> StepCost:
    """The engine's measured step cost, from the cache or measured now (a few seconds, once per machine): the
    table over SIZES at CONTEXTS[0] keys, and the attention term from sizes 1 and 8 at both CONTEXTS."""
    cached = getattr(engine, "_step_cost", None)
    if cached is not None:
        return cached
    from ..models.loading import cache_dir
    name = f"{engine.model_hash}-{forward_code_hash()}-{torch.get_num_threads()}threads.json"
    path = cache_dir() / "step_cost" / name
    try:
        saved = json.loads(path.read_text())
        table, per_key = {int(k): v for k, v in saved["tokens"].items()}, float(saved["per_key"])
        per_key_step = float(saved["per_key_step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        near, far = CONTEXTS[0], min(CONTEXTS[1], engine.model.config.max_position_embeddings - 64)
        table = measure_step_cost(engine.model)  # at CONTEXTS[0] keys
        per_key_step, per_key = 0.0, 0.0
        if far > near:
            both = measure_contexts(engine.model, (near, far), (1, 8))
            per_key_step, per_key = attention_cost(both[near], both[far], far - near, both[near][1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"tokens": table, "context": near, "per_key": per_key,
                                    "per_key_step": per_key_step}))
    engine._step_cost = StepCost(table, per_key, CONTEXTS[0], per_key_step)
    return engine._step_cost


class DraftSizeController:
    """Chooses the next draft size k maximising (E[accepted | k] + 1) / (cost(k + 1, context) + k · draft cost)."""

    def __init__(self, cost: StepCost, k_max: int, decay: float = 0.9, prior: float = 0.5, draft_cost: float = 0.0):
        self.cost, self.k_max, self.decay = cost, k_max, decay
        self.draft_cost = draft_cost  # cost of drafting one token, relative to a one-token target step
        self.prior = prior
        self.accepted, self.stops = prior * 2, (1 - prior) * 2  # decayed counts: accepted tokens, rejections

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.stops)

    def update(self, proposed: int, accepted: int) -> None:
        """One step's outcome: `accepted` of the first `proposed` drafted tokens along the path."""
        if proposed == 0:  # not drafting teaches nothing: drift back to the prior so that drafting is retried
            self.accepted = self.decay * self.accepted + (1 - self.decay) * 2 * self.prior
            self.stops = self.decay * self.stops + (1 - self.decay) * 2 * (1 - self.prior)
            return
        self.accepted = self.decay * self.accepted + accepted
        self.stops = self.decay * self.stops + (1.0 if accepted < proposed else 0.0)

    def learn(self, proposed: int, emitted: list[int], discarded=None) -> None:
        """One step's outcome from the tokens it emitted (accepted draft tokens + the bonus): a scored proposal of
        `proposed` tokens had len(emitted) - 1 of them accepted. A `discarded` one (a Draft: `a|b` scored another
        drafter's proposal instead) would have been accepted as far as it spells the emitted tokens, when it is
        deterministic (q is None): under greedy decoding they are the target's own choices, and under sampling a
        deterministic draft token is accepted with probability p(token), just as often as the target emits it.
        Where it spells all of them, it counts as that many proposed and accepted (it went at least that far).
        A sampled draft (with q) teaches nothing here: its acceptance is not how often it equals the output."""
        if discarded is None:
            self.update(proposed, len(emitted) - 1)
        elif discarded.q is None and len(discarded):
            m = len(find_path(discarded, emitted))
            if m < len(emitted):
                self.update(proposed, m)
            else:
                self.update(m, m)

    def expected(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return a * (1 - a ** k) / (1 - a)

    def next(self, available: int | None = None, context: int | None = None) -> int:
        """Best k in 0..k_max (0 = don't draft this step); `available` caps it (e.g. the match length); `context`
        (tokens already cached) prices verification at that depth."""
        top = self.k_max if available is None else min(self.k_max, available)
        cost = lambda k: self.cost(k + 1, context) + k * self.draft_cost
        return max(range(top + 1), key=lambda k: (self.expected(k) + 1) / cost(k))
