"""Sparse self-speculation: the target made activation-sparse (TEAL, CATS, …) drafts for the dense target.

The drafts come from the same weights, so they agree with the target far more often than a small model would,
and each draft pass reads only the kept weights. Verification is the usual exact one, so the output is
the dense model's: lossless whatever the sparsity. The draft's cost relative to a target pass is measured
once when the drafter is built (a few single-token passes of each), so the draft-length controller trades
acceptance against the real price of a draft token on this machine.
"""
from __future__ import annotations

import time

import torch

from ..controller import step_cost
from .draft_model import ModelDrafter


def relative_cost(dense, sparse, passes: int = 8) -> float:
    """Seconds of one single-token pass of `sparse` over one of `dense`, measured on a short context."""
    def timed(model) -> float:
        cache = model.new_cache(64)
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.inference_mode():
            model(ids, cache=cache)
            best = float("inf")
            for i in range(passes):
                t0 = time.perf_counter()
                model(torch.tensor([[5 + i]]), cache=cache, last_only=True)
                best = min(best, time.perf_counter() - t0)
        return best
    timed(sparse), timed(dense)  # warm both (kernel layouts, thread pool)
    return min(1.0, timed(sparse) / timed(dense))


class SparseDraft(ModelDrafter):
    def __init__(self, engine, sparse_model, sparsifier_name: str, k: int = 4, adaptive: bool = True):
        cost = relative_cost(engine.model, sparse_model)
        super().__init__(sparse_model, len(engine.tokenizer), k, 1, cost=step_cost(engine), draft_cost=cost,
                         adaptive=adaptive, name="sparse-draft", prior=0.8)
        self.sparsifier_name = sparsifier_name
        self.draft_cost = cost
