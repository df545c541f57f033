import pytest
import torch

from hasten.decoding.drafters.base import NoDraft
from hasten.decoding.loop import DecodeStats, decode
from hasten.decoding.sampling import SamplingConfig
from tests.conftest import tiny_model


def run(model, prompt, n, sampling=SamplingConfig(), eos=frozenset()):
    stats = DecodeStats()
    out = [t for step in decode(model, prompt, NoDraft(), sampling, n, set(eos), stats) for t in step.tokens]
    return out, stats


def test_greedy_equals_recomputing_the_whole_sequence():
    model = tiny_model(11, scale=1.0)
    prompt = [3, 14, 15, 92, 65]
    out, stats = run(model, prompt, 20)
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]
    assert stats.target_passes == 20 and stats.mean_accepted == 1.0


def test_stops_at_eos_and_reports_it():
    model = tiny_model(12, scale=1.0)
    out, _ = run(model, [1, 2, 3], 30)
    eos = out[5]
    first = out.index(eos)
    stopped, stats = run(model, [1, 2, 3], 30, eos={eos})
    assert stopped == out[:first + 1] and stats.finish_reason == "stop"


def test_max_new_tokens_and_context_limit():
    model = tiny_model(13)  # max_position_embeddings = 256
    out, stats = run(model, [5] * 250, 100)
    assert len(out) == 6 and stats.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model(14, scale=0.5)
    a, _ = run(model, [1, 2], 30, SamplingConfig(temperature=1.0, seed=7))
    b, _ = run(model, [1, 2], 30, SamplingConfig(temperature=1.0, seed=7))
    c, _ = run(model, [1, 2], 30, SamplingConfig(temperature=1.0, seed=8))
    assert a == b and a != c


def test_top_k_one_is_greedy():
    model = tiny_model(15, scale=0.5)
    greedy, _ = run(model, [4, 5, 6], 15)
    top1, _ = run(model, [4, 5, 6], 15, SamplingConfig(temperature=0.8, top_k=1, seed=0))
    assert greedy == top1


class Oracle:
    """Drafts the next k tokens of a known greedy continuation: every draft is accepted in full, so stop
    conditions fall inside accepted drafts. It ignores the budget on purpose: the loop must cut its drafts."""

    name = "oracle"

    def __init__(self, truth, k):
        self.truth, self.k, self.budgets, self.proposed = truth, k, [], []

    def begin(self, state):
        pass

    def propose(self, state):
        from hasten.decoding.tree import Draft
        self.budgets.append(state.budget)
        draft = self.truth[len(state.tokens):len(state.tokens) + self.k]
        self.proposed.append(len(draft))
        return Draft.chain(draft)

    def commit(self, accepted, target_logits):
        pass


def run_with(model, prompt, drafter, n, eos=frozenset()):
    stats = DecodeStats()
    steps = list(decode(model, prompt, drafter, SamplingConfig(), n, set(eos), stats))
    return steps, stats


def test_eos_inside_an_accepted_draft_ends_the_output_there():
    model = tiny_model(16, scale=1.0)
    prompt = [2, 9, 4]
    out, _ = run(model, prompt, 40)
    eos = next(t for i, t in enumerate(out) if i >= 3 and t not in out[:i])  # first occurrence at index ≥ 3
    first = out.index(eos)
    steps, stats = run_with(model, prompt, Oracle(prompt + out, 6), 40, eos={eos})
    got = [t for s in steps for t in s.tokens]
    assert got == out[:first + 1] and stats.finish_reason == "stop" and stats.generated == first + 1
    # the EOS was accepted from a draft, with more drafted tokens after it that were not emitted
    assert steps[-1].sources[-1] == "oracle" and stats.accepted_per_step[-1] > len(steps[-1].tokens) - 1


@pytest.mark.parametrize("n", [4, 9, 13])  # each leaves room for less than a whole draft at some step
def test_max_new_tokens_reached_mid_draft(n):
    model = tiny_model(17, scale=1.0)
    prompt = [5, 6, 7]
    out, _ = run(model, prompt, 40)
    drafter = Oracle(prompt + out, 4)
    steps, stats = run_with(model, prompt, drafter, n)
    assert [t for s in steps for t in s.tokens] == out[:n] and stats.generated == n
    assert stats.finish_reason == "length" and stats.target_passes < n
    assert any(p > b for p, b in zip(drafter.proposed, drafter.budgets))  # the draft ran past the budget


def test_context_limit_reached_mid_draft():
    model = tiny_model(18, scale=1.0)  # max_position_embeddings = 256
    prompt = [(7 * i) % 97 for i in range(243)]
    out, _ = run(model, prompt, 100)
    assert len(out) == 256 - 243
    drafter = Oracle(prompt + out + [0] * 20, 4)  # it would draft past the context if let
    steps, stats = run_with(model, prompt, drafter, 100)
    assert [t for s in steps for t in s.tokens] == out and stats.finish_reason == "length"
    assert stats.target_passes < len(out) and any(p > b for p, b in zip(drafter.proposed, drafter.budgets))
