"""Calibration of the sparse methods on a tiny model: TEAL's greedy allocation, Deja Vu's predictors and FFSplit's
heavy hitters and light threshold (each fitted on token windows, as on the real corpus)."""
from types import SimpleNamespace

import numpy as np
import torch

from hasten.sparsity.calibrate import SEQ_LEN, collect
from hasten.sparsity.methods import teal as teal_mod
from hasten.sparsity.methods.dejavu import DejaVu, DejaVuBlock
from hasten.sparsity.methods.ffsplit import FFSplit
from hasten.sparsity.modules import sparsify
from tests.conftest import tiny_model

V = 60


class RandomScores(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n, self.generator = n, torch.Generator().manual_seed(0)

    def forward(self, h):
        return torch.rand(*h.shape[:-1], self.n, generator=self.generator)


class Windows:
    """Stands in for the corpus: `token_chunks` gives random windows of the tiny vocabulary."""

    def token_chunks(self, tokenizer, split, n_tokens, seq_len):
        g = torch.Generator().manual_seed(0 if split == "calibration" else 1)
        return torch.randint(0, V, (max(1, n_tokens // seq_len), seq_len), generator=g).tolist()


def setup(model, name):
    stats = collect(model, Windows().token_chunks(None, "calibration", 8 * SEQ_LEN, SEQ_LEN))
    stats.corpus_texts = lambda: Windows()
    return SimpleNamespace(model=model, model_hash=name, tokenizer=None), stats


def test_teal_greedy_allocation_sparsifies_where_it_costs_least(monkeypatch):
    monkeypatch.setattr(teal_mod, "GREEDY_TOKENS", 2 * SEQ_LEN)
    model = tiny_model(71, vocab_size=V, scale=1.0)
    with torch.no_grad():
        model.layers[0].self_attn.o_proj.weight.zero_()  # layer 0's attention adds nothing: its inputs are free
    engine, stats = setup(model, "tiny-teal-greedy")
    plan = teal_mod.greedy_plan(engine, stats, 0.5)
    assert len(plan) == 2
    for block, levels in zip(model.layers, plan):
        weights = teal_mod._site_weights(block)
        reached = sum(weights[s] * levels[s] for s in levels)
        assert 0.5 - 1e-9 <= reached < 0.5 + teal_mod.STEP  # the block's parameter-weighted target, no more
        assert all(abs(v / teal_mod.STEP - round(v / teal_mod.STEP)) < 1e-6 for v in levels.values())
    assert plan[0]["attn_in"] >= 0.9 and plan[0]["o_in"] >= 0.9  # raised first: dropping them changes nothing
    assert plan[0]["attn_in"] > plan[1]["attn_in"]
    assert teal_mod.greedy_plan(engine, stats, 0.5) == plan  # cached
    greedy = teal_mod.Teal(0.5, alloc="greedy")
    greedy.calibrate(engine, stats)
    assert greedy.levels == plan and len(greedy.replacements(model)) == 14


def test_dejavu_predictors_learn_which_neurons_fire(monkeypatch):
    from hasten.sparsity.methods import dejavu
    monkeypatch.setattr(dejavu, "TRAIN_TOKENS", 8 * SEQ_LEN)
    model = tiny_model(72, vocab_size=V, scale=1.0)
    engine, stats = setup(model, "tiny-dejavu")
    method = DejaVu(0.5)
    method.calibrate(engine, stats)
    # a random choice of half the neurons recalls 0.5 of the firing ones
    assert len(method.recall) == 2 and min(method.recall) > 0.55 and sum(method.recall) / 2 > 0.6
    again = DejaVu(0.5)
    again.calibrate(engine, stats)  # from the cache: the same predictors
    assert again.recall == method.recall
    assert torch.equal(again.mlp_predictors[0].fc1.weight, method.mlp_predictors[0].fc1.weight)
    sparse = sparsify(model, method.replacements(model))
    assert all(isinstance(b, DejaVuBlock) and b.keep_neurons == 48 for b in sparse.layers)  # half of 96
    ids = torch.tensor([Windows().token_chunks(None, "heldout", SEQ_LEN, 32)[0]])

    def error():
        with torch.inference_mode():
            dense, approx = model(ids), sparse(ids)
        return float((approx - dense).norm() / dense.norm())

    learned = error()
    for block in sparse.layers:  # the same number of neurons, chosen at random
        block.mlp_predictor = RandomScores(96)
    assert 0 < learned < 0.9 * error()  # the predicted neurons matter more than a random half (0.84 vs 0.99)


def test_ffsplit_keeps_heavy_hitters_and_drops_the_requested_share():
    model = tiny_model(73, vocab_size=V, scale=1.0)
    engine, stats = setup(model, "tiny-ffsplit")
    method = FFSplit(0.5, heavy=0.1)
    method.calibrate(engine, stats)
    for i, heavy in enumerate(method.heavy):  # the neurons with the largest mean |input of down_proj|
        mean = stats.channel_mean[f"layers.{i}.down_in"]
        assert len(heavy) == 10 and set(heavy.tolist()) == set(np.argsort(-mean)[:10].tolist())
    sparse = sparsify(model, method.replacements(model))
    zero_share, heavy_zero = [], []

    def watch(i):
        def hook(module, args):  # returns None: the input goes on unchanged
            zero_share.append(float((args[0] == 0).float().mean()))
            heavy_zero.append(bool((args[0][..., method.heavy[i]] == 0).any()))
        return hook

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(watch(i)) for i, layer in enumerate(sparse.layers)]
    with torch.inference_mode():
        for ids in Windows().token_chunks(None, "heldout", 4 * SEQ_LEN, SEQ_LEN):  # not the calibration windows
            sparse(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    assert abs(np.mean(zero_share) - 0.5) < 0.06 and not any(heavy_zero)
