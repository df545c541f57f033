"""Sampling exactness: what the verifiers emit is distributed exactly as the target's p.

A two-step toy: the target's p(x1), p(x2 | x1) and the draft's q over a 5-token vocabulary are explicit, so the
exact distribution of the first two emitted tokens is known. Each trial samples a fresh draft, runs the
verifier on the target's logits at every draft node, and records the first two emitted tokens; a chi-square test
compares the counts with p. A deliberately wrong residual must fail the same test (negative control).
"""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hasten.decoding.sampling import SamplingConfig
from hasten.decoding.tree import Draft
from hasten.decoding.verify import SpecTrVerifier, SpeculativeSamplingVerifier

V = 5
g = torch.Generator().manual_seed(0)
P1 = torch.softmax(0.8 * torch.randn(V, generator=g), 0)  # target p(x1)
P2 = torch.softmax(0.8 * torch.randn(V, V, generator=g), 1)  # target p(x2 | x1)
Q1 = torch.softmax(0.8 * torch.randn(V, generator=g), 0)  # draft q(x1)
Q2 = torch.softmax(0.8 * torch.randn(V, V, generator=g), 1)  # draft q(x2 | x1)
EXACT = (P1[:, None] * P2).flatten()  # [V*V]
SAMPLING = SamplingConfig(temperature=1.0)
TRIALS = 5000


def chains(k: int, depth: int, rng: torch.Generator) -> Draft:
    """k i.i.d. chains from q (duplicates kept as separate nodes), with q per node."""
    tokens, parents, qs = [], [], []
    for _ in range(k):
        x1 = int(torch.multinomial(Q1, 1, generator=rng))
        tokens.append(x1), parents.append(-1), qs.append(Q1)
        if depth > 1:
            x2 = int(torch.multinomial(Q2[x1], 1, generator=rng))
            tokens.append(x2), parents.append(len(tokens) - 2), qs.append(Q2[x1])
    return Draft(tokens, parents, torch.stack(qs))


def target_logits(draft: Draft) -> torch.Tensor:
    """Row 0: p(x1); a depth-1 node x1: p(· | x1); deeper rows are unused by the first two tokens (uniform)."""
    rows = [P1.log()]
    depth = []
    for i, p in enumerate(draft.parents):
        depth.append(1 if p < 0 else depth[p] + 1)
        rows.append(P2[draft.tokens[i]].log() if depth[-1] == 1 else torch.zeros(V))
    return torch.stack(rows)


def first_two(verifier, k, depth, seed=1, deterministic=False) -> np.ndarray:
    rng = torch.Generator().manual_seed(seed)
    counts = np.zeros(V * V)
    for _ in range(TRIALS):
        draft = chains(k, depth, rng)
        if deterministic:
            draft.q = None
        logits = target_logits(draft)
        path, bonus = verifier.verify(logits, draft, SAMPLING, rng)
        out = [draft.tokens[i - 1] for i in path] + [bonus]
        if len(out) == 1:  # nothing accepted: the second token comes from p(· | x1) as the next step would
            out.append(int(torch.multinomial(P2[out[0]], 1, generator=rng)))
        counts[out[0] * V + out[1]] += 1
    return counts


def assert_matches_target(counts, alpha=1e-3):
    stat, pvalue = chisquare(counts, EXACT.numpy() * counts.sum())
    assert pvalue > alpha, f"chi-square p-value {pvalue:.2e}: emitted tokens are not distributed as the target"


@pytest.mark.parametrize("k,depth", [(1, 2), (3, 1), (2, 2)])
def test_speculative_sampling_tree_is_exact(k, depth):
    assert_matches_target(first_two(SpeculativeSamplingVerifier(), k, depth))


def test_deterministic_drafts_are_exact():
    assert_matches_target(first_two(SpeculativeSamplingVerifier(), 2, 2, deterministic=True))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_spectr_kseq_is_exact(k):
    assert_matches_target(first_two(SpecTrVerifier(), k, 2))


def test_a_wrong_residual_is_caught():
    """Negative control: resampling from p instead of the residual max(p - q, 0) must fail the same test."""
    class WrongResidual(SpeculativeSamplingVerifier):
        def verify(self, logits, draft, sampling, generator):
            p = torch.softmax(logits[0], 0)
            x = draft.tokens[0]
            if float(torch.rand((), generator=generator)) * float(draft.q[0][x]) < float(p[x]):
                return [1], int(torch.multinomial(torch.softmax(logits[1], 0), 1, generator=generator))
            return [], int(torch.multinomial(p, 1, generator=generator))  # wrong: should be the residual

    stat, pvalue = chisquare(first_two(WrongResidual(), 1, 2), EXACT.numpy() * TRIALS)
    assert pvalue < 1e-6
