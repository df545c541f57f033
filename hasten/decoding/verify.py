"""Verifiers: from the target's logits over a flattened draft tree, choose the accepted path and the bonus token.

Notation follows the papers: p = target probabilities, q = draft probabilities. A verifier alone decides which
tokens are emitted, so every method's output distribution is the target's.

Blockwise parallel decoding's rule (Stern et al. 2018: keep the longest prefix the target agrees with, then
take the target's own next token) is exactly `greedy` below applied to a chain.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .sampling import SamplingConfig, probabilities, sample
from .tree import Draft, children


class Verifier(Protocol):
    def verify(self, logits: torch.Tensor, draft: Draft, sampling: SamplingConfig,
               generator: torch.Generator | None) -> tuple[list[int], int]:
        """logits [1+n, V] (root first) → (accepted node indices behind the root, bonus token)."""


class GreedyVerifier:
    """Longest path whose every token equals the target's argmax at its parent; bonus = argmax at its end."""

    def verify(self, logits, draft, sampling=None, generator=None):
        if not len(draft):
            return [], int(logits[-1].argmax())
        choice = logits.argmax(-1).tolist()  # [1+n]
        kids = children(draft)
        path, node = [], 0
        while True:
            nxt = next((c for c in kids[node] if draft.tokens[c - 1] == choice[node]), None)
            if nxt is None:
                return path, choice[node]
            path.append(nxt)
            node = nxt


class SpeculativeSamplingVerifier:
    """Exact speculative sampling over a tree (SpecInfer-style multi-draft verification).

    At each node the children are tried in order: child x drawn from q is accepted with probability
    min(1, p(x)/q(x)); on rejection p becomes the normalised residual max(p - q, 0). When no child is accepted the
    bonus token is drawn from what is left of p. Deterministic drafters have q = one-hot(x), so rejection simply
    zeroes p(x) and renormalises (EAGLE's evaluate_posterior). For a chain this is Leviathan et al.'s algorithm.
    """

    def verify(self, logits, draft, sampling, generator):
        p_all = probabilities(logits, sampling)  # [1+n, V]
        kids = children(draft)
        path, node = [], 0
        while True:
            p = p_all[node]
            accepted = None
            for c in kids[node]:
                x = draft.tokens[c - 1]
                q = draft.q[c - 1] if draft.q is not None else None
                qx = float(q[x]) if q is not None else 1.0
                px = float(p[x])
                if qx > 0 and float(torch.rand((), generator=generator)) * qx < px:
                    accepted = c
                    break
                if q is None:
                    p = p.clone()
                    p[x] = 0.0
                else:
                    p = (p - q).clamp_min(0.0)
                total = float(p.sum())
                if total <= 0.0:  # p ≤ q everywhere only when p == q up to rounding: nothing left to reject into
                    p = p_all[node]
                    break
                p = p / total
            if accepted is None:
                return path, sample(p, generator)
            path.append(accepted)
            node = accepted


def verifier_for(sampling: SamplingConfig) -> Verifier:
    return GreedyVerifier() if sampling.greedy else SpeculativeSamplingVerifier()
