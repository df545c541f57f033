"""Model drafters (a separate draft model, or the target with layers skipped) are lossless under greedy decoding."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hasten.decoding.drafters.base import NoDraft
from hasten.decoding.drafters.draft_model import ModelDrafter, VocabularyMismatchError, check_vocabulary
from hasten.decoding.loop import DecodeStats, decode
from hasten.decoding.sampling import SamplingConfig
from tests.conftest import tiny_model

V = 50
TARGET = tiny_model(21, vocab_size=V, scale=1.0)
DRAFT = tiny_model(22, vocab_size=V + 14, scale=1.0)  # a padded draft vocabulary


def run(drafter, prompt, n, sampling=SamplingConfig()):
    stats = DecodeStats()
    out = [t for s in decode(TARGET, prompt, drafter, sampling, n, set(), stats) for t in s.tokens]
    return out, stats


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(0, V - 1), min_size=1, max_size=16), n=st.integers(1, 30), k=st.integers(1, 6))
def test_draft_model_and_layer_skip_are_greedy_identical(prompt, n, k):
    expected, _ = run(NoDraft(), prompt, n)
    assert run(ModelDrafter(DRAFT, V, k, adaptive=False), prompt, n)[0] == expected
    assert run(ModelDrafter(TARGET, V, k, layers=(0,), adaptive=False, name="layer-skip"), prompt, n)[0] == expected


def test_the_target_as_its_own_draft_is_always_accepted():
    """Not vacuous: a draft equal to the target gets every drafted token accepted."""
    out, stats = run(ModelDrafter(TARGET, V, 4, adaptive=False), [1, 2, 3], 25)
    assert out == run(NoDraft(), [1, 2, 3], 25)[0]
    assert stats.mean_accepted > 4.0


def test_sampling_with_a_draft_model_is_seeded_and_runs_spectr(monkeypatch):
    """n=3 chains go through SpecTr's verifier (its exactness: test_sampling_through_the_loop.py); a seed
    reproduces the output."""
    from hasten.decoding import verify
    drafter = ModelDrafter(DRAFT, V, 3, n=3, adaptive=False)
    calls = []
    original = verify.SpecTrVerifier.verify
    monkeypatch.setattr(verify.SpecTrVerifier, "verify", lambda self, *a: calls.append(len(a[1])) or original(self, *a))
    a, stats = run(drafter, [4, 5], 20, SamplingConfig(temperature=0.7, seed=3))
    b, _ = run(drafter, [4, 5], 20, SamplingConfig(temperature=0.7, seed=3))
    assert a == b and len(a) == 20 and stats.proposed > 0
    assert calls and max(calls) == 9  # three chains of three drafted tokens per step
    c, _ = run(drafter, [4, 5], 20, SamplingConfig(temperature=0.7, seed=4))
    assert c != a


class FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab


def test_a_different_tokenizer_is_refused():
    target = FakeTokenizer({f"t{i}": i for i in range(100)})
    check_vocabulary(target, FakeTokenizer({f"t{i}": i for i in range(100)}), "same")
    with pytest.raises(VocabularyMismatchError, match="different tokenizer"):
        check_vocabulary(target, FakeTokenizer({f"t{i}": (i + 1) % 100 for i in range(100)}), "shifted")


@pytest.mark.integration
def test_layer_skip_on_the_default_model(steady_engine):
    """On this 30-layer 135M model the controller finds that no skip set pays (a draft through 28 layers costs
    nearly a target pass), so `layer-skip` drafts nothing here; a fixed draft size — what the controller picks on
    deeper models — shows that what it would draft is verified losslessly and mostly accepted."""
    prompt = "Explain why the sky is blue."
    base = steady_engine.generate(prompt, max_new_tokens=32, chat=True)
    n = steady_engine.model.config.num_layers
    keep = tuple(i for i in range(n) if i not in (25, 26))
    steady_engine._drafters["layer-skip:fixed"] = ModelDrafter(steady_engine.model, len(steady_engine.tokenizer), 4,
                                                               layers=keep, adaptive=False, name="layer-skip")
    got = steady_engine.generate(prompt, max_new_tokens=32, chat=True, method="layer-skip:fixed")
    assert got.token_ids == base.token_ids
    assert got.sources.count("layer-skip") > 8 and got.target_passes < len(got.token_ids)  # drafts were accepted
    adaptive = steady_engine.generate(prompt, max_new_tokens=32, chat=True, method="layer-skip:skip=25-26")
    assert adaptive.token_ids == base.token_ids
