"""KV policies compose with every drafter and with the scheduler: under a window or a hybrid policy whose rings
compact many times, each drafter's greedy output is the same policy's baseline; a sequence's output in a batch
is its output alone; the prefix cache stores nothing from a ring that let positions go."""
import pytest
import torch

from hasten.decoding.drafters.base import NoDraft
from hasten.decoding.drafters.draft_model import ModelDrafter
from hasten.decoding.loop import Sequence
from hasten.decoding.prefix_cache import PrefixCache
from hasten.decoding.sampling import SamplingConfig
from hasten.decoding.scheduler import Scheduler
from hasten.kernels import cpu as cpu_kernels
from hasten.models import kv_cache
from tests.conftest import tiny_model
from tests.decoding import test_drafters_greedy as greedy
from tests.decoding import test_scheduler as batching

POLICIES = ["window:6,sinks:2", "hybrid:global=every2,window=5,sinks=1"]
SLACK = 10  # rings of sinks + window + 10: with 60-token contexts they compact every few steps


@pytest.fixture(autouse=True)
def small_rings(monkeypatch):
    monkeypatch.setattr(kv_cache, "RING_SLACK", SLACK)


def generate(model, prompt, drafter, n):
    """→ (tokens, the sequence's cache after it ended)."""
    scheduler = Scheduler()
    seq = Sequence(model, prompt, drafter, SamplingConfig(), n, set())
    tokens = [t for step in scheduler.steps(seq) for t in step.tokens]
    return tokens, scheduler.free[0]


def model_drafters():
    draft = tiny_model(7, vocab_size=greedy.VOCAB, scale=1.0)
    return {
        "draft-model": lambda m, k: ModelDrafter(draft, greedy.VOCAB, k, adaptive=False),
        "layer-skip": lambda m, k: ModelDrafter(m, greedy.VOCAB, k, layers=(0,), adaptive=False, name="layer-skip"),
    }


DRAFTERS = {name: (lambda make: lambda m, k: make(k))(make) for name, make in greedy.DRAFTERS.items()}
DRAFTERS.update(model_drafters())


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_every_drafter_keeps_greedy_identity_under_a_policy(name, policy, monkeypatch):
    m = tiny_model(1, vocab_size=greedy.VOCAB, scale=1.0)
    monkeypatch.setattr(m, "kv_policy", policy)
    if name == "draft-model":  # the draft model's own cache takes a window too (LongSpec's constant-size draft KV)
        monkeypatch.setattr(DRAFTERS[name](m, 4).model, "kv_policy", policy)
    g = torch.Generator().manual_seed(3)
    compacted = 0
    for k, length in [(3, 9), (6, 20), (4, 30)]:
        prompt = torch.randint(0, greedy.VOCAB, (length,), generator=g).tolist()
        prompt += prompt[: length // 2]  # repeats: prompt lookup and the draft models have something to find
        expected, base_cache = generate(m, prompt, NoDraft(), 40)
        drafter = DRAFTERS[name](m, k)
        got, cache = generate(m, prompt, drafter, 40)
        assert got == expected, (k, length)
        compacted += cache.dropped and base_cache.dropped
        if isinstance(drafter, ModelDrafter):
            assert drafter.cache.dropped  # its own ring compacted as well
    assert compacted == 3


def test_a_window_policy_changes_what_a_full_attention_model_says():
    """Not vacuous: the window is in effect (a full-attention model trained without it answers otherwise)."""
    m = tiny_model(1, vocab_size=greedy.VOCAB, scale=1.0)
    prompt = torch.randint(0, greedy.VOCAB, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    full, _ = generate(m, prompt, NoDraft(), 40)
    m.kv_policy = "window:4,sinks:1"
    windowed, cache = generate(m, prompt, NoDraft(), 40)
    assert windowed != full and cache.dropped


@pytest.mark.skipif(cpu_kernels.extension() is None, reason="batch invariance rests on the C++ kernels")
@pytest.mark.parametrize("policy", POLICIES)
def test_batch_under_a_window_policy_equals_each_sequence_alone(policy):
    model = batching.quantized_tiny_model(3)
    model.kv_policy = policy
    methods = sorted(batching.DRAFTERS)
    jobs = [(p, methods[i % len(methods)], 30 + 3 * i, SamplingConfig()) for i, p in enumerate(batching.prompts(6))]
    expected = [batching.solo(model, p, m, n) for p, m, n, _ in jobs]
    outs, seqs = batching.run_batch(Scheduler(max_batch=4, step_tokens=24), model, jobs,
                                    join_at={2: 2, 3: 5, 4: 5, 5: 9})
    assert [outs[i] for i in range(len(jobs))] == expected


def test_prefix_cache_stores_only_what_a_ring_still_holds_whole():
    model = tiny_model(2, vocab_size=greedy.VOCAB, scale=1.0)
    model.kv_policy = "window:30,sinks:2"  # rings of 42 entries
    prefix = PrefixCache(1 << 30, block=8)
    scheduler = Scheduler(prefix_cache=prefix)
    short = list(range(2, 26))  # 24 tokens: whole when its prefill ends
    solo = generate(model, short, NoDraft(), 40)[0]
    outs, seqs = batching.run_batch(scheduler, model, [(short, "baseline", 40, SamplingConfig())])
    assert outs[0] == solo and len(prefix.blocks) == 3  # the prompt's blocks; not the answer's (dropped by then)
    outs, _ = batching.run_batch(scheduler, model, [(short + [30, 31], "prompt-lookup", 40, SamplingConfig())])
    assert prefix.hits == 1 and prefix.hit_tokens == 24
    assert outs[0] == generate(model, short + [30, 31], NoDraft(), 40)[0]
    long = list(range(2, 60))  # 58 tokens: the ring let positions go before the prompt was scored
    blocks = len(prefix.blocks)
    batching.run_batch(scheduler, model, [(long, "baseline", 4, SamplingConfig())])
    assert len(prefix.blocks) == blocks
