"""How much to draft: the target's measured step cost against the acceptance seen so far.

- DiffuSpec's adaptive draft-length (ADL) controller picks the next proposal size from recent acceptance and
  realised lengths; here recent acceptance feeds a geometric model (each drafted token is accepted with
  probability a, given its parent was) whose a is an exponentially decayed estimate.
- The cost side is this machine's: the target's forward time as a function of tokens scored, measured once per
  model and thread count and cached. On a 2-core CPU scoring 16 tokens costs well over one token, so the best
  size is where expected tokens per step / step time peaks, not the largest draft that might be accepted.
- Blockwise parallel decoding's rule (keep the longest verified prefix, then take the target's own token) is the
  greedy verifier in verify.py; this module only sizes the drafts.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

SIZES = (1, 2, 4, 8, 12, 16, 24, 32)


class StepCost:
    """Relative cost of one target forward over T tokens (cost(1) = 1), interpolated between measured sizes."""

    def __init__(self, table: dict[int, float]):
        self.sizes = sorted(table)
        base = table[self.sizes[0]]
        self.rel = [table[s] / base for s in self.sizes]

    def __call__(self, tokens: int) -> float:
        s, r = self.sizes, self.rel
        if tokens <= s[0]:
            return r[0]
        for i in range(1, len(s)):
            if tokens <= s[i]:
                w = (tokens - s[i - 1]) / (s[i] - s[i - 1])
                return r[i - 1] + w * (r[i] - r[i - 1])
        return r[-1] * tokens / s[-1]

    @classmethod
    def default(cls) -> "StepCost":
        """A flat-then-linear guess used until a measurement exists."""
        return cls({t: 1.0 + 0.06 * (t - 1) for t in SIZES})


def measure_step_cost(model, context: int = 256, sizes=SIZES, repeats: int = 5) -> dict[int, float]:
    """Median seconds of one target forward over T new tokens after `context` cached ones, sizes interleaved."""
    cache = model.new_cache(context + max(sizes) + 1)
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    times = {s: [] for s in sizes}
    with torch.inference_mode():
        model(prompt, cache=cache, last_only=True)  # all 256 rows' logits would be 268 MB at a 262k vocabulary
        for r in range(repeats + 1):
            for s in sizes:
                tokens = torch.randint(0, model.config.vocab_size, (1, s))
                t0 = time.perf_counter()
                model(tokens, cache=cache)
                if r:  # the first pass warms up
                    times[s].append(time.perf_counter() - t0)
                cache.rollback(s)
    return {s: statistics.median(v) for s, v in times.items()}


def forward_code_hash() -> str:
    """A hash of the code a target forward runs (model modules and kernels): a step-cost table measured before
    a kernel changed would misprice drafts, so the cache is keyed by it."""
    import hashlib
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("models/*.py"), *root.glob("kernels/*.cpp"), *root.glob("kernels/*.py"),
                        *root.glob("kernels/formats/*.h")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def step_cost(engine) -> StepCost:
    """The engine's measured step cost, from the cache or measured now (a few seconds, once per machine)."""
    cached = getattr(engine, "_step_cost", None)
    if cached is not None:
        return cached
    from ..models.loading import cache_dir
    name = f"{engine.model_hash}-{forward_code_hash()}-{torch.get_num_threads()}threads.json"
    path = cache_dir() / "step_cost" / name
    try:
        table = {int(k): v for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError):
        table = measure_step_cost(engine.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table))
    engine._step_cost = StepCost(table)
    return engine._step_cost


class DraftSizeController:
    """Chooses the next draft size k maximising (E[accepted | k] + 1) / (cost(k + 1) + k · draft cost)."""

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

    def expected(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return a * (1 - a ** k) / (1 - a)

    def next(self, available: int | None = None) -> int:
        """Best k in 0..k_max (0 = don't draft this step); `available` caps it (e.g. the match length)."""
        top = self.k_max if available is None else min(self.k_max, available)
        return max(range(top + 1), key=lambda k: (self.expected(k) + 1) / (self.cost(k + 1) + k * self.draft_cost))
