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
                q = _over(p, draft.q[c - 1]) if draft.q is not None else None
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


class SpecTrVerifier:
    """SpecTr's K-SEQ draft selection (Sun et al. 2023) over k i.i.d. draft sequences, exact for p.

    The draft is k chains from the root (sampled i.i.d. from q; duplicates are separate nodes). At each depth the
    candidates are the next tokens of the chains that still agree with everything accepted so far; all share one
    context, so one p and one q. Candidate i is accepted with probability min(1, p(x)/(γ q(x))); the first
    accepted one is emitted. With ρ(x) = min(q(x), p(x)/γ) and β = Σρ, that emits x with probability
    ρ(x)(1-(1-β)^k)/β; when all k are rejected the bonus token comes from the residual
    r(x) ∝ p(x) - ρ(x)(1-(1-β)^k)/β, which makes the total exactly p. γ ∈ [1, k] is the smallest value keeping r
    non-negative, i.e. with 1-(1-β)^k ≤ γβ (found by bisection); k = 1 gives γ = 1, plain speculative sampling.
    """

    def verify(self, logits, draft, sampling, generator):
        if len(draft) and draft.q is None:
            raise ValueError("SpecTr needs the draft probabilities q of every node")
        p_all = probabilities(logits, sampling)  # [1+n, V]
        kids = children(draft)
        alive, chosen = [0], 0
        while True:
            p = p_all[alive[0]]  # every alive node has the same context: same p
            cands = [c for a in alive for c in kids[a]]
            if not cands:
                return _ancestors(draft, chosen), sample(p, generator)
            q = _over(p, draft.q[cands[0] - 1])
            k = len(cands)
            gamma, rho, beta = _gamma(p, q, k)
            accepted = None
            for c in cands:
                x = draft.tokens[c - 1]
                if float(torch.rand((), generator=generator)) * gamma * float(q[x]) < float(p[x]):
                    accepted = c
                    break
            if accepted is None:
                emitted = rho * ((1 - (1 - beta) ** k) / beta) if beta > 0 else torch.zeros_like(p)
                residual = (p - emitted).clamp_min(0.0)
                total = float(residual.sum())
                return _ancestors(draft, chosen), sample(residual / total if total > 0 else p, generator)
            chosen = accepted
            x = draft.tokens[accepted - 1]
            alive = [c for c in cands if draft.tokens[c - 1] == x]


def _over(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q over p's vocabulary: a target whose embedding has rows past its tokenizer's ids (Qwen2.5) gives p more
    entries than a draft that drafts only real tokens; q is 0 on those rows."""
    return q if q.shape[-1] == p.shape[-1] else torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))


def _gamma(p: torch.Tensor, q: torch.Tensor, k: int):
    """Smallest γ in [1, k] with 1-(1-β(γ))^k ≤ γ β(γ); returns (γ, ρ, β)."""
    def rho_beta(g):
        rho = torch.minimum(q, p / g)
        return rho, float(rho.sum())

    lo, hi = 1.0, float(k)
    rho, beta = rho_beta(lo)
    if k == 1 or 1 - (1 - beta) ** k <= lo * beta:
        return lo, rho, beta
    for _ in range(30):
        mid = (lo + hi) / 2
        _, b = rho_beta(mid)
        lo, hi = (lo, mid) if 1 - (1 - b) ** k <= mid * b else (mid, hi)
    rho, beta = rho_beta(hi)
    return hi, rho, beta


def _ancestors(draft: Draft, node: int) -> list[int]:
    path = []
    while node > 0:
        path.append(node)
        node = draft.parents[node - 1] + 1
    return path[::-1]


def verifier_for(sampling: SamplingConfig) -> Verifier:
    return GreedyVerifier() if sampling.greedy else SpeculativeSamplingVerifier()
