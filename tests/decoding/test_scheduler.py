"""The scheduler: many sequences in one packed pass per step, each output exactly its solo output (batch
invariance), chunked prefill beside running decodes, the prefix cache, load-adaptive drafting, failures alone."""
import pytest
import torch
from torch import nn

from hasten.decoding.controller import StepCost
from hasten.decoding.drafters.base import NoDraft, fork
from hasten.decoding.drafters.compose import Composition
from hasten.decoding.drafters.jacobi import Jacobi
from hasten.decoding.drafters.prompt_lookup import PromptLookup
from hasten.decoding.drafters.recycling import TokenRecycling
from hasten.decoding.loop import DecodeStats, Sequence, decode
from hasten.decoding.prefix_cache import PrefixCache
from hasten.decoding.sampling import SamplingConfig
from hasten.decoding.scheduler import Scheduler
from hasten.kernels import cpu as cpu_kernels
from hasten.kernels.quantize import quantize
from hasten.models.quantized import QuantLinear
from tests.conftest import tiny_model

pytestmark = pytest.mark.skipif(cpu_kernels.extension() is None, reason="batch invariance rests on the C++ kernels")
VOCAB = 64


def quantized_tiny_model(seed: int):
    """A tiny random model whose linears are Q8_0 block layers: the kernels behind the one-kernel contract
    (fp32 nn.Linear goes through torch's matmul, which promises no bits across token counts)."""
    model = tiny_model(seed, vocab_size=VOCAB, scale=1.0)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            q = QuantLinear("Q8_0", torch.from_numpy(quantize(module.weight.detach().numpy(), "Q8_0")),
                            module.in_features)
            setattr(model.get_submodule(parent) if parent else model, attr, q)
    return model


@pytest.fixture(scope="module")
def model():
    return quantized_tiny_model(3)


DRAFTERS = {
    "baseline": NoDraft,
    "prompt-lookup": lambda: PromptLookup(n=2, k=6, adaptive=False),
    "jacobi": lambda: Jacobi(block=3, blocks=2, ngram=3, adaptive=False),
    "recycling": lambda: TokenRecycling(VOCAB, top_k=3, max_nodes=8, depth=4, adaptive=False),
    "prompt-lookup+jacobi": lambda: Composition([PromptLookup(2, 4, adaptive=False), Jacobi(block=3, blocks=1)]),
}


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        base = torch.randint(2, VOCAB, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        out.append(base + base[: len(base) // 2])  # repeats: prompt lookup has something to find
    return out


def solo(model, prompt, method, n, sampling=SamplingConfig()):
    return [t for s in decode(model, prompt, DRAFTERS[method](), sampling, n, set(), DecodeStats()) for t in s.tokens]


def run_batch(scheduler, model, jobs, join_at=None, leave=None, eos=frozenset()):
    """jobs: (prompt, method, n, sampling); job i joins at step join_at[i]; `leave` = {job: step} removes it."""
    join_at, leave = join_at or {}, leave or {}
    seqs, outs, step = {}, {}, 0
    while True:
        for i, (prompt, method, n, sampling) in enumerate(jobs):
            if i not in seqs and join_at.get(i, 0) <= step:
                seqs[i] = Sequence(model, prompt, DRAFTERS[method](), sampling, n, set(eos))
                outs[i] = []
                scheduler.add(seqs[i])
            if i in seqs and leave.get(i) == step:
                scheduler.remove(seqs[i])
        if len(seqs) == len(jobs) and not scheduler.running and not scheduler.waiting:
            return outs, seqs
        scheduler.step()
        step += 1
        for i, seq in seqs.items():
            while seq.out:
                outs[i] += seq.out.popleft().tokens
            if seq.finished and leave.get(i, 10 ** 9) > step:
                scheduler.remove(seq)
        assert step < 2000


def test_packed_pass_equals_each_sequence_alone(model):
    """One packed forward over three sequences' segments gives every row the bits of its own forward."""
    caches = [model.new_cache(64) for _ in range(3)]
    chunks = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    from hasten.models.kv_cache import Segment
    with torch.inference_mode():
        alone = [model(torch.tensor([c]), cache=model.new_cache(64))[0] for c in chunks]
        tokens = torch.tensor([t for c in chunks for t in c])
        positions = torch.cat([torch.arange(len(c)) for c in chunks])
        packed = model.packed(tokens, positions, [Segment(cache, 0, len(c)) for cache, c in zip(caches, chunks)])
    assert torch.equal(torch.cat(alone), packed)


@pytest.mark.parametrize("step_tokens", [None, 24])
def test_greedy_batch_of_mixed_methods_equals_solo_with_joins_and_leaves(model, step_tokens):
    methods = sorted(DRAFTERS)
    jobs = [(p, methods[i % len(methods)], 12 + 3 * i, SamplingConfig()) for i, p in enumerate(prompts(8))]
    expected = [solo(model, p, m, n) for p, m, n, _ in jobs]
    assert len({tuple(e) for e in expected}) > 4
    outs, _ = run_batch(Scheduler(max_batch=5, step_tokens=step_tokens), model, jobs,
                        join_at={3: 2, 4: 5, 5: 5, 6: 9, 7: 12}, leave={2: 4})
    for i, out in outs.items():
        if i == 2:  # left at step 4: what it got is a prefix of its solo answer
            assert out == expected[i][:len(out)]
        else:
            assert out == expected[i], (i, jobs[i][1])


def test_seeded_sampling_in_a_batch_equals_solo(model):
    jobs = [(p, m, 20, SamplingConfig(temperature=1.0, top_p=0.9, seed=i))
            for i, (p, m) in enumerate(zip(prompts(6, seed=1), ["baseline", "prompt-lookup", "jacobi"] * 2))]
    expected = [solo(model, p, m, n, s) for p, m, n, s in jobs]
    outs, _ = run_batch(Scheduler(max_batch=6, step_tokens=16, cost=StepCost({1: 1.0, 8: 8.0})), model, jobs,
                        join_at={1: 1, 4: 3})
    assert [outs[i] for i in range(len(jobs))] == expected


def test_a_long_prompt_is_prefilled_in_chunks_beside_running_decodes(model):
    short = [([3, 4, 5], "baseline", 30, SamplingConfig()), ([7, 8], "prompt-lookup", 30, SamplingConfig())]
    long = (list(range(2, 60)) * 4, "baseline", 8, SamplingConfig())  # 232 tokens
    scheduler = Scheduler(max_batch=3, step_tokens=40)
    seqs = [Sequence(model, p, DRAFTERS[m](), s, n, set()) for p, m, n, s in short]
    for s in seqs:
        scheduler.add(s)
    scheduler.step()
    big = Sequence(model, long[0], NoDraft(), long[3], long[2], set())
    scheduler.add(big)
    steps_to_prefill = 0
    while big.prefilling:
        before = [len(s.out) for s in seqs]
        scheduler.step()
        steps_to_prefill += 1
        assert all(len(s.out) == b + 1 for s, b in zip(seqs, before))  # every stream moved on every step
        assert scheduler.last_packed <= 40
    assert steps_to_prefill >= 232 // 40
    while scheduler.running:
        scheduler.step()
    got = [t for s in big.out for t in s.tokens]
    assert got == solo(model, long[0], "baseline", 8)


def test_prefix_cache_hit_gives_the_same_answer(model):
    cache = PrefixCache(1 << 30, block=8)
    system = list(range(2, 40))  # 38 shared tokens: 4 whole blocks
    a, b = system + [40, 41, 42], system + [50, 51]
    scheduler = Scheduler(max_batch=2, prefix_cache=cache)
    outs, seqs = run_batch(scheduler, model, [(a, "baseline", 10, SamplingConfig())])
    assert cache.hits == 0 and cache.blocks
    outs, seqs = run_batch(scheduler, model, [(b, "prompt-lookup", 10, SamplingConfig()),
                                              (a, "jacobi", 10, SamplingConfig())])
    assert cache.hits == 2 and cache.hit_tokens >= 32 + 40
    assert outs[0] == solo(model, b, "baseline", 10) and outs[1] == solo(model, a, "baseline", 10)
    # a repeated prompt with the answer cached too: all but the last prompt token come from the cache
    outs, _ = run_batch(scheduler, model, [(a, "baseline", 10, SamplingConfig(temperature=0.8, seed=3))])
    assert outs[0] == solo(model, a, "baseline", 10, SamplingConfig(temperature=0.8, seed=3))


def test_prefix_cache_stays_within_its_bound_and_evicts_least_recent(model):
    one_block = 2 * model.config.num_layers * model.config.num_kv_heads * 8 * model.config.head_dim * 4
    cache = PrefixCache(4 * one_block, block=8)
    scheduler = Scheduler(prefix_cache=cache)
    run_batch(scheduler, model, [(list(range(2, 50)), "baseline", 2, SamplingConfig())])  # 6 blocks
    assert cache.bytes <= cache.capacity and len(cache.blocks) == 4 and cache.evicted >= 2
    run_batch(scheduler, model, [(list(range(2, 50)), "baseline", 2, SamplingConfig())])
    assert cache.hits == 1 and cache.hit_tokens == 32  # the chain's first four blocks survived, not its tail


def test_drafts_shrink_when_the_step_is_expensive(model):
    """Under a steep step cost, a batch of eight drafts little; alone, a sequence drafts what its drafter
    proposes. The outputs are the same either way."""
    jobs = [(p, "prompt-lookup", 20, SamplingConfig()) for p in prompts(8, seed=2)]
    steep = StepCost({1: 1.0, 2: 2.0, 64: 64.0})  # every token costs as much as a step: drafting never pays
    outs, seqs = run_batch(Scheduler(max_batch=8, cost=steep), model, jobs)
    assert all(s.stats.proposed == 0 for s in seqs.values())
    assert [outs[i] for i in range(8)] == [solo(model, p, m, n) for p, m, n, _ in jobs]
    flat = StepCost({1: 1.0, 64: 1.0})  # free tokens: every draft node is kept
    _, seqs = run_batch(Scheduler(max_batch=8, cost=flat), model, jobs)
    assert sum(s.stats.proposed for s in seqs.values()) > 0


class Exploding(NoDraft):
    name = "exploding"

    def propose(self, state):
        if len(state.tokens) > state.prompt_len + 3:
            raise RuntimeError("drafter broke")
        return super().propose(state)


def test_a_sequence_that_fails_fails_alone(model):
    scheduler = Scheduler(max_batch=2)
    good = Sequence(model, [3, 4, 5], NoDraft(), SamplingConfig(), 12, set())
    bad = Sequence(model, [6, 7], Exploding(), SamplingConfig(), 12, set())
    gen_bad = scheduler.steps(bad, pump=False)
    gen_good = scheduler.steps(good, pump=False)
    next(gen_bad), next(gen_good)  # both join
    with pytest.raises(RuntimeError, match="drafter broke"):
        while True:
            scheduler.step()
            while next(gen_bad) is not None:
                pass
    got = []
    while scheduler.running:
        scheduler.step()
    for step in gen_good:
        if step is None:
            break
        got += step.tokens
    assert got == solo(model, [3, 4, 5], "baseline", 12)


def test_fork_owns_controllers_and_caches_and_shares_what_is_learned():
    r = TokenRecycling(VOCAB, 3, 8, 4)
    twin = fork(r)
    assert twin.table is r.table and twin.controller is not r.controller
    comp = fork(Composition([PromptLookup(), r]))
    assert comp.drafters[1] is not r and comp.drafters[1].table is r.table


@pytest.mark.integration
def test_default_model_batch_equals_solo(default_engine):
    """The real model through Engine.run: greedy and seeded answers in a batch (mixed methods, a shared system
    prompt in the prefix cache) are the solo answers."""
    e = default_engine
    system = {"role": "system", "content": "You are a terse assistant. Answer in one short sentence."}
    asks = ["Name a colour.", "What is 2+2?", "Repeat: red green blue red green blue", "Name a planet."]
    jobs = [([system, {"role": "user", "content": a}], m, s) for a, m, s in zip(
        asks, ["baseline", "prompt-lookup", "prompt-lookup|recycling", "baseline"],
        [{}, {}, {}, {"temperature": 0.9, "seed": 5}])]
    alone = [e.generate(p, 16, method=m, **s).token_ids for p, m, s in jobs]
    batch = e.scheduler(max_batch=4, step_tokens=48, prefix_cache_mb=64)
    for _ in range(2):  # the second round hits the prefix cache
        gens = [e.run(p, 16, method=m, batch=batch, **s) for p, m, s in jobs]
        live = list(gens)
        while live:
            batch.step()
            for g in list(live):
                for chunk in g:
                    if chunk is _idle():
                        break
                else:
                    live.remove(g)
        assert [g.result.token_ids for g in gens] == alone
    assert batch.prefix_cache.hits >= 4
    assert len(batch.free) == 4  # the second round ran in the caches the first left behind


def _idle():
    from hasten.engine import IDLE
    return IDLE


def test_the_default_prefix_cache_grows_with_the_machine(monkeypatch):
    """The server's default prefix cache is an eighth of physical memory, capped at 4 GiB (256 MB thrashed on
    18 prompts of ~700 tokens)."""
    import os

    from hasten.decoding.prefix_cache import default_mb
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 * 2 ** 30 // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert default_mb() == 3072
    pages["SC_PHYS_PAGES"] = 256 * 2 ** 30 // 4096
    assert default_mb() == 4096
