"""Sampling exactness through the whole decode loop: with any drafter, the tokens emitted are distributed as the
target's p (temperature, top-k, top-p included).

A tiny-vocabulary target makes p(x1) p(x2 | x1) computable; each trial decodes 5 tokens with its own seed, so
the second token always comes out of a verified draft step (drafts of up to 3 nodes after the first token), and a
chi-square test compares the counts of (x1, x2) with p. The drafter instances are reused across trials, as an
engine reuses them, so the learning drafters (recycling, jacobi) propose from what earlier trials taught them.
A verifier that accepts one draft token too many must fail the same test (negative control).
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hasten.decoding.drafters.compose import Composition, Fallback
from hasten.decoding.drafters.draft_model import ModelDrafter
from hasten.decoding.drafters.jacobi import Jacobi
from hasten.decoding.drafters.prompt_lookup import PromptLookup
from hasten.decoding.drafters.recycling import TokenRecycling
from hasten.decoding.loop import DecodeStats, decode
from hasten.decoding.sampling import SamplingConfig, probabilities
from hasten.decoding.verify import SpeculativeSamplingVerifier, SpecTrVerifier
from tests.conftest import tiny_model

V = 5
TARGET = tiny_model(53, vocab_size=V, scale=0.3)
DRAFT = tiny_model(53, vocab_size=V, scale=0.25)  # the same weights, less peaked: close to p but not equal
PROMPT = [3, 1, 2, 3, 1, 2, 3, 1]  # repetitive: prompt lookup finds matches to draft from, often accepted
TRIALS = 600
PLAIN = SamplingConfig(temperature=1.0)
TOP_K = SamplingConfig(temperature=1.3, top_k=4)
TOP_P = SamplingConfig(temperature=1.3, top_p=0.9)


def exact_pairs(model, sampling, vocab):
    """p(x1) p(x2 | x1) under `sampling`, flattened [vocab²]."""
    with torch.inference_mode():
        p1 = probabilities(model(torch.tensor([PROMPT]))[0, -1], sampling)  # [V]
        p2 = probabilities(model(torch.tensor([PROMPT + [x] for x in range(vocab)]))[:, -1], sampling)  # [V, V]
    exact = (p1[:, None] * p2).flatten().double().numpy()
    return exact / exact.sum()


def sampled_pairs(model, drafter, sampling, vocab, verifier=None, trials=TRIALS):
    counts, proposed, accepted = np.zeros(vocab * vocab), 0, 0
    for seed in range(trials):
        stats = DecodeStats()
        out = [t for step in decode(model, PROMPT, drafter, replace(sampling, seed=seed), 5, set(), stats,
                                    verifier=verifier) for t in step.tokens]
        counts[out[0] * vocab + out[1]] += 1
        proposed += stats.proposed
        accepted += sum(stats.accepted_per_step)
    return counts, proposed, accepted


def pvalue(counts, exact):
    assert counts[exact == 0].sum() == 0  # nothing top-k / top-p cut off is ever emitted
    counts, exact = counts[exact > 0], exact[exact > 0]
    keep = exact * counts.sum() >= 5  # chi-square needs expected counts ≥ 5: pool the rare cells into one
    observed, expected = counts[keep], exact[keep] * counts.sum()
    if not keep.all():  # an empty pooled cell would be 0/0: a nan p-value
        observed, expected = np.append(observed, counts[~keep].sum()), np.append(expected, exact[~keep].sum() * counts.sum())
    assert keep.sum() >= 6  # a distribution with several likely outcomes, not a near-certain one
    return chisquare(observed, expected).pvalue


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread (no hand-off to a pool), and these tests run thousands."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DRAFTERS = {
    "prompt-lookup": lambda: PromptLookup(n=2, k=2, adaptive=False),
    "recycling": lambda: TokenRecycling(V, top_k=3, max_nodes=3, depth=2, adaptive=False),
    "jacobi": lambda: Jacobi(block=2, blocks=1, ngram=3, adaptive=False),
    "prompt-lookup+recycling": lambda: Composition([PromptLookup(2, 2, adaptive=False),
                                                    TokenRecycling(V, 2, 2, 2, adaptive=False)]),
    "prompt-lookup|jacobi": lambda: Fallback([PromptLookup(2, 2, adaptive=False),
                                              Jacobi(block=2, blocks=1, adaptive=False)]),
    "draft-model": lambda: ModelDrafter(DRAFT, V, 2, adaptive=False),
    # each step the proposal expected to go furthest: the draft model's (with its q) or prompt lookup's (none)
    "prompt-lookup|draft-model": lambda: Fallback([PromptLookup(2, 2, adaptive=False),
                                                   ModelDrafter(DRAFT, V, 2, adaptive=False)]),
    "draft-model:n=3 (SpecTr)": lambda: ModelDrafter(DRAFT, V, 2, n=3, adaptive=False),
}
CASES = [(name, PLAIN) for name in DRAFTERS if name != "draft-model"] + [
    ("recycling", TOP_P), ("prompt-lookup", TOP_K), ("draft-model", TOP_K)]  # warped p (and q) under speculation


@pytest.mark.parametrize("name,sampling", CASES, ids=[f"{n}-{s.top_k}-{s.top_p}" for n, s in CASES])
def test_emitted_tokens_follow_the_target(name, sampling):
    drafter = DRAFTERS[name]()
    counts, proposed, accepted = sampled_pairs(TARGET, drafter, sampling, V)
    assert proposed > TRIALS // 2 and accepted > TRIALS // 10  # drafts were scored, and many accepted
    p = pvalue(counts, exact_pairs(TARGET, sampling, V))
    assert p > 1e-3, f"chi-square p-value {p:.2e}: {name} does not emit the target's distribution"


def test_a_draft_model_runs_spectr_under_sampling_and_plain_verification_when_greedy():
    assert isinstance(DRAFTERS["draft-model:n=3 (SpecTr)"]().sampling_verifier, SpecTrVerifier)
    assert type(DRAFTERS["draft-model"]().sampling_verifier) is SpeculativeSamplingVerifier


class OneTooMany(SpeculativeSamplingVerifier):
    """Negative control: accepts the first draft token after the accepted path without checking it."""

    def verify(self, logits, draft, sampling, generator):
        path, bonus = super().verify(logits, draft, sampling, generator)
        nxt = next((i + 1 for i, p in enumerate(draft.parents) if p + 1 == (path[-1] if path else 0)), None)
        if nxt is None:
            return path, bonus
        return path + [nxt], sample_after(logits[nxt], sampling, generator)


def sample_after(logits, sampling, generator):
    return int(torch.multinomial(probabilities(logits, sampling), 1, generator=generator))


def test_a_verifier_accepting_one_token_too_many_is_caught():
    counts, proposed, _ = sampled_pairs(TARGET, PromptLookup(2, 2, adaptive=False), PLAIN, V, verifier=OneTooMany())
    assert proposed > TRIALS // 2
    assert pvalue(counts, exact_pairs(TARGET, PLAIN, V)) < 1e-6


# Qwen2.5's embedding has more rows (151936) than its tokenizer has tokens (151665): the model drafters are given
# the tokenizer's size, and the target's p still covers every row.
PADDED = tiny_model(53, vocab_size=V + 3, scale=0.3)
PADDED_DRAFT = tiny_model(53, vocab_size=V + 3, scale=0.25)  # close to p but not equal
PADDED_DRAFTERS = {
    "draft-model": lambda: ModelDrafter(PADDED_DRAFT, V, 2, adaptive=False),
    "draft-model:n=3 (SpecTr)": lambda: ModelDrafter(PADDED_DRAFT, V, 2, n=3, adaptive=False),
    "layer-skip": lambda: ModelDrafter(PADDED, V, 2, layers=(0,), adaptive=False, name="layer-skip"),
}


@pytest.mark.parametrize("name", sorted(PADDED_DRAFTERS))
def test_a_vocabulary_larger_than_the_tokenizer_is_greedy_identical(name):
    from hasten.decoding.drafters.base import NoDraft
    runs = []
    for drafter in (NoDraft(), PADDED_DRAFTERS[name]()):
        stats = DecodeStats()
        runs.append([t for s in decode(PADDED, PROMPT, drafter, SamplingConfig(), 20, set(), stats) for t in s.tokens])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", sorted(PADDED_DRAFTERS))
def test_a_vocabulary_larger_than_the_tokenizer_samples_the_target(name):
    vocab = V + 3
    counts, proposed, _ = sampled_pairs(PADDED, PADDED_DRAFTERS[name](), PLAIN, vocab, trials=TRIALS)
    assert proposed > TRIALS // 2
    assert pvalue(counts, exact_pairs(PADDED, PLAIN, vocab)) > 1e-3
