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
