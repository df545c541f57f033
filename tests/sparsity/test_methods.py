"""Sparsifiers on tiny random models (unit) and on the default model with the real corpus (integration).

What must hold: a model at sparsity 0 equals the dense one; calibrated thresholds drop the requested share of
activations on held-out text; each method's sparse model computes its method's function; sparse
self-speculation is lossless (greedy identity, and the target's distribution under sampling); a lossy method's
quality is measured against the dense model on held-out text.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.stats import chisquare

from hasten.decoding.drafters.base import NoDraft
from hasten.decoding.drafters.draft_model import ModelDrafter
from hasten.decoding.loop import DecodeStats, decode
from hasten.decoding.sampling import SamplingConfig
from hasten.sparsity.calibrate import collect, measured_sparsity
from hasten.sparsity.methods.cats import Cats
from hasten.sparsity.methods.teal import Teal
from hasten.sparsity.modules import SparseLinear, sparsify
from hasten.sparsity.quality import compare
from tests.conftest import tiny_model

V = 60
TARGET = tiny_model(31, vocab_size=V, scale=1.0)
CHUNKS = [torch.randint(0, V, (64,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(12)]
STATS = collect(TARGET, CHUNKS[:8])
FAKE_ENGINE = SimpleNamespace(model=TARGET, model_hash="tiny")


def sparse_target(sparsifier):
    sparsifier.calibrate(FAKE_ENGINE, STATS)
    return sparsify(TARGET, sparsifier.replacements(TARGET))


def greedy(model, prompt, n, drafter=None, sampling=SamplingConfig()):
    stats = DecodeStats()
    out = [t for s in decode(model, prompt, drafter or NoDraft(), sampling, n, set(), stats) for t in s.tokens]
    return out, stats


def test_sparsity_zero_is_the_dense_model():
    teal = Teal(0.0)
    teal.calibrate(FAKE_ENGINE, STATS)
    assert len(teal.levels) == TARGET.config.num_layers and teal.replacements(TARGET) == {}  # nothing to drop
    some = Teal(0.25)
    some.calibrate(FAKE_ENGINE, STATS)
    names = [n for n, m in TARGET.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")]
    assert sorted(some.replacements(TARGET)) == sorted(names)  # while any sparsity sparsifies every linear
    # Every linear through the sparse kernel with nothing dropped: same logits up to summation order.
    model = sparsify(TARGET, {n: SparseLinear(TARGET.get_submodule(n), -1.0, 0.5) for n in names})
    ids = torch.tensor([CHUNKS[9][:20]])
    with torch.inference_mode():
        assert torch.allclose(model(ids), TARGET(ids), atol=1e-4)
    for prompt in ([1, 2, 3], CHUNKS[10][:7]):
        assert greedy(model, prompt, 20)[0] == greedy(TARGET, prompt, 20)[0]


def test_sparsify_leaves_the_dense_model_untouched():
    sparse = sparse_target(Teal(0.5))
    assert isinstance(sparse.layers[0].self_attn.q_proj, SparseLinear)
    assert isinstance(TARGET.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert sparse.layers[0].self_attn.q_proj.dense.weight is TARGET.layers[0].self_attn.q_proj.weight  # shared


@pytest.mark.parametrize("target", [0.25, 0.5, 0.65])
def test_teal_thresholds_drop_the_requested_share(target):
    measured = measured_sparsity(sparse_target(Teal(target)), CHUNKS[8:])  # not the calibration chunks
    values = np.array(list(measured.values()))
    assert abs(values.mean() - target) < 0.05, values


def test_cats_drops_the_requested_share_of_neurons():
    sparse = sparse_target(Cats(0.5))
    dropped = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: dropped.append(float((a[0] == 0).float().mean())))
             for layer in sparse.layers]
    with torch.inference_mode():
        for ids in CHUNKS[8:]:
            sparse(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    assert abs(np.mean(dropped) - 0.5) < 0.06


def test_quality_of_the_dense_model_against_itself_is_perfect_and_sparsity_costs_something():
    same = compare(TARGET, TARGET, CHUNKS[8:])
    assert same.top1_agreement == 1.0 and same.mean_kl < 1e-9 and same.perplexity == pytest.approx(same.dense_perplexity)
    lossy = compare(TARGET, sparse_target(Teal(0.65)), CHUNKS[8:])
    assert lossy.top1_agreement < 1.0 and lossy.mean_kl > 0


SPARSE = sparse_target(Teal(0.5))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(0, V - 1), min_size=1, max_size=12), n=st.integers(1, 30), k=st.integers(1, 6))
def test_sparse_self_speculation_is_greedy_identical(prompt, n, k):
    expected, _ = greedy(TARGET, prompt, n)
    got, stats = greedy(TARGET, prompt, n, ModelDrafter(SPARSE, V, k, adaptive=False, name="sparse-draft"))
    assert got == expected


def test_sparse_self_speculation_samples_the_target_distribution():
    """The second token's marginal under speculative sampling with the sparse draft equals the dense target's."""
    v = 8
    target = tiny_model(41, vocab_size=v, scale=0.4)
    stats = collect(target, [torch.randint(0, v, (48,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(6)])
    teal = Teal(0.6)
    teal.calibrate(SimpleNamespace(model=target), stats)
    sparse = sparsify(target, teal.replacements(target))
    prompt = [3, 7, 2]
    with torch.inference_mode():
        p1 = torch.softmax(target(torch.tensor([prompt]))[0, -1], -1)
        ctx = torch.tensor([[*prompt, t] for t in range(v)])
        p2 = (p1[:, None] * torch.softmax(target(ctx)[:, -1], -1)).sum(0).double().numpy()
        q1 = torch.softmax(sparse(torch.tensor([prompt]))[0, -1], -1)
        q2 = (q1[:, None] * torch.softmax(sparse(ctx)[:, -1], -1)).sum(0).double().numpy()
    drafter = ModelDrafter(sparse, v, 3, adaptive=False, name="sparse-draft")
    counts = np.zeros(v)
    n = 800
    for seed in range(n):
        out, _ = greedy(target, prompt, 2, drafter, SamplingConfig(temperature=1.0, seed=seed))
        counts[out[1]] += 1
    expected = p2 / p2.sum() * n
    keep = expected >= 5
    assert keep.sum() >= 4  # a distribution with several likely tokens, not a near-certain one
    observed, expected = np.append(counts[keep], counts[~keep].sum()), np.append(expected[keep], expected[~keep].sum())
    _, pvalue = chisquare(observed, expected * observed.sum() / expected.sum())
    assert pvalue > 1e-3
    # Not vacuous: sampling the sparse draft's own distribution this many times would be caught.
    draft = np.array(q2[keep].tolist() + [q2[~keep].sum()])
    _, draft_p = chisquare(draft / draft.sum() * n, expected / expected.sum() * n)
    assert draft_p < 1e-3


@pytest.mark.integration
def test_default_model_thresholds_hit_the_target_on_heldout_text(default_engine):
    """Calibrated on the corpus's calibration split, measured on its held-out split: within ±0.05 per layer."""
    from hasten.sparsity.calibrate import SEQ_LEN, activation_stats
    from hasten.sparsity.corpus import load
    stats = activation_stats(default_engine, tokens=2048, progress=False)
    teal = Teal(0.5)
    teal.calibrate(default_engine, stats)
    sparse = sparsify(default_engine.model, teal.replacements(default_engine.model))
    heldout = load().token_chunks(default_engine.tokenizer, "heldout", 1024, SEQ_LEN)
    measured = np.array(list(measured_sparsity(sparse, heldout).values()))
    assert len(measured) == 7 * default_engine.model.config.num_layers
    assert abs(measured.mean() - 0.5) < 0.03 and np.abs(measured - 0.5).max() < 0.1, measured


@pytest.mark.integration
def test_sparse_draft_on_the_default_model_is_lossless(default_engine):
    prompt = "Write a haiku about the sea."
    base = default_engine.generate(prompt, max_new_tokens=24, chat=True)
    # adaptive=0: always draft k tokens (the adaptive controller may rightly decide drafting does not pay here)
    got = default_engine.generate(prompt, max_new_tokens=24, chat=True, method="sparse-draft:0.5,k=3,adaptive=0")
    assert got.token_ids == base.token_ids
    assert got.mean_accepted > 1.0  # drafts were proposed and some accepted: the check above is not vacuous


def test_dejavu_block_computes_the_mlp_on_the_predicted_neurons_only():
    import torch.nn.functional as F
    from hasten.sparsity.methods.dejavu import DejaVuBlock, Predictor, _top_mask
    from hasten.sparsity.modules import clone
    block = TARGET.layers[1]
    predictor = Predictor(64, 96, 8)
    dv = DejaVuBlock(clone(block), predictor, keep_neurons=40, head_predictor=None, keep_heads=4, sparsity=0.58,
                     head_sparsity=0.0)
    x = torch.randn(1, 5, 64)
    cos, sin = TARGET._rope(torch.arange(5))
    with torch.inference_mode():
        got = dv(x, cos, sin, 1, None, None)
        h = block.input_layernorm(x)
        keep = _top_mask(predictor(h), 40)
        mid = x + block.self_attn(h, cos, sin, 1, None, None)
        y = block.post_attention_layernorm(mid)
        ref = mid + block.mlp.down_proj(F.silu(block.mlp.gate_proj(y)) * block.mlp.up_proj(y) * keep)
    assert keep.sum(-1).eq(40).all()
    assert torch.allclose(got, ref, atol=1e-5)


def test_ffsplit_keeps_heavy_hitters_whatever_their_gate():
    import torch.nn.functional as F
    from hasten.sparsity.methods.ffsplit import SplitMLP
    mlp = TARGET.layers[0].mlp
    heavy = torch.tensor([0, 7, 50])
    split = SplitMLP(mlp, heavy, threshold=1e9, sparsity=0.9)  # a threshold no light neuron passes
    x = torch.randn(1, 3, 64)
    with torch.inference_mode():
        gate = F.silu(mlp.gate_proj(x))
        h = torch.zeros_like(gate)
        h[..., heavy] = (gate * mlp.up_proj(x))[..., heavy]
        assert torch.allclose(split(x), mlp.down_proj(h), atol=1e-5)


@pytest.mark.integration
def test_generate_with_a_corpus_of_ones_own(tmp_path, session_cache, monkeypatch):
    """--corpus: calibration on the user's text file (its first three quarters), cached under its own name."""
    from click.testing import CliRunner

    from hasten.sparsity import calibrate
    from tests.conftest import CALIBRATION_TOKENS
    monkeypatch.setattr(calibrate, "DEFAULT_TOKENS", CALIBRATION_TOKENS)

    from hasten.cli import main
    from hasten.sparsity.corpus import load
    try:
        text = "\n\n".join(load().texts("heldout")[:3])
    except Exception:
        pytest.skip("no Debian Python docs to make a corpus file from")
    path = tmp_path / "my_corpus.txt"
    path.write_text(text)
    result = CliRunner().invoke(main, ["generate", "The capital of France is", "-n", "8", "--method", "teal:0.3",
                                       "--corpus", str(path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert out["method"] == "teal:0.3" and len(out["token_ids"]) > 0
    from hasten.models.loading import cache_dir
    # calibrated on that file, in this session's own cache (so no file from an earlier run can satisfy this)
    assert cache_dir() == session_cache
    assert any("my-corpus" in p.name for p in (session_cache / "sparsity").iterdir())
