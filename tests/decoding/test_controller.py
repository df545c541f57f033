"""The draft-size controller and the step-cost model (decoding/controller.py), and layer-skip's calibration."""
from types import SimpleNamespace

import pytest
import torch

from hasten.decoding import controller
from hasten.decoding.controller import DraftSizeController, StepCost
from hasten.decoding.drafters import layer_skip
from tests.conftest import tiny_model


def test_step_cost_is_relative_interpolated_and_linear_past_the_table():
    cost = StepCost({1: 2.0, 4: 3.0, 8: 6.0})
    assert cost(1) == 1.0 and cost(4) == 1.5 and cost(8) == 3.0
    assert cost(2) == pytest.approx(1 + 0.5 / 3) and cost(6) == pytest.approx(2.25)
    assert cost(16) == pytest.approx(6.0)  # twice the largest measured size costs twice as much


def test_step_cost_adds_attention_per_scored_token_and_cached_key_past_its_context():
    cost = StepCost({1: 2.0, 4: 3.0, 8: 6.0}, per_key=1e-4, context=256)
    assert cost(4, context=256) == cost(4) == 1.5  # at the table's context: the table
    assert cost(4, context=4352) == pytest.approx(1.5 + 1e-4 * 4 * 4096)
    assert cost(8, context=4352) - cost(8) == pytest.approx(2 * (cost(4, context=4352) - cost(4)))
    assert cost(4, context=0) == pytest.approx(1.5 - 1e-4 * 4 * 256)  # shorter: cheaper, by at most half
    assert StepCost({1: 2.0, 4: 3.0}, per_key=1.0, context=256)(4, context=0) == 0.75


def test_the_step_pays_the_cache_read_once_and_each_token_its_own_compute():
    cost = StepCost({1: 2.0, 4: 3.0}, per_key=1e-4, context=256, per_key_step=5e-4)
    assert cost(1, context=4352) == pytest.approx(1 + (5e-4 + 1e-4) * 4096)
    assert cost(2, context=4352) - cost(1, context=4352) == pytest.approx(cost(2) - 1 + 1e-4 * 4096)


def test_the_attention_terms_are_fit_from_two_contexts():
    # 1792 keys deeper: a step pays 3e-6 s per key once, and each scored token 1e-6 s per key more
    near, far = {1: 0.010, 8: 0.020}, {1: 0.010 + 1792 * 4e-6, 8: 0.020 + 1792 * 11e-6}
    step, token = controller.attention_cost(near, far, 1792, 0.010)
    assert step == pytest.approx(3e-6 / 0.010) and token == pytest.approx(1e-6 / 0.010)
    assert controller.attention_cost(far, near, 1792, 0.010) == (0.0, 0.0)  # "cheaper deep" is noise: no term


def test_drafts_shrink_where_verification_at_depth_is_costly():
    cost = StepCost({1: 1.0, 2: 1.05, 4: 1.1, 8: 1.3, 16: 1.8}, per_key=2e-5, context=256)
    ctl = DraftSizeController(cost, k_max=12, prior=0.7)
    shallow, deep = ctl.next(context=256), ctl.next(context=16384)
    assert shallow == ctl.next() and 0 < deep < shallow


def test_the_controller_drafts_more_where_verification_is_cheap_and_drafts_are_accepted():
    flat = StepCost({1: 1.0, 32: 1.0})  # scoring 32 tokens costs what one does
    steep = StepCost({1: 1.0, 2: 2.0, 32: 32.0})  # every scored token costs a whole pass
    good = DraftSizeController(flat, k_max=8, prior=0.9)
    assert good.next() == 8 and good.next(available=3) == 3
    assert DraftSizeController(steep, k_max=8, prior=0.9).next() == 0  # a draft can never pay
    assert 0 < DraftSizeController(StepCost.default(), 8, prior=0.9).next() <= 8
    # a costly drafter drafts less than a free one at the same acceptance
    costly = DraftSizeController(StepCost.default(), 8, prior=0.7, draft_cost=0.5)
    assert costly.next() < DraftSizeController(StepCost.default(), 8, prior=0.7).next()


def test_acceptance_follows_what_was_accepted_and_drifts_back_to_the_prior_when_idle():
    ctl = DraftSizeController(StepCost.default(), k_max=8, prior=0.5)
    start = ctl.next()
    for _ in range(20):
        ctl.update(proposed=6, accepted=6)
    assert ctl.acceptance > 0.9 and ctl.next() > start
    for _ in range(60):
        ctl.update(proposed=6, accepted=0)
    assert ctl.acceptance < 0.05 and ctl.next() == 0  # drafts keep failing: stop drafting
    for _ in range(80):
        ctl.update(proposed=0, accepted=0)  # not drafting teaches nothing: back towards 0.5, so drafting resumes
    assert ctl.acceptance == pytest.approx(0.5, abs=0.01) and ctl.next() == start > 0
    assert ctl.expected(3) == pytest.approx(0.5 + 0.25 + 0.125, abs=0.01)  # E[accepted | k] of the geometric model


def test_step_cost_is_measured_once_per_model_and_cached(monkeypatch, session_cache):
    model = tiny_model(61)
    table = controller.measure_step_cost(model, context=16, sizes=(1, 2, 4), repeats=1)
    assert sorted(table) == [1, 2, 4] and all(v > 0 for v in table.values())
    calls = []
    monkeypatch.setattr(controller, "measure_step_cost", lambda m: calls.append(m) or {1: 1.0, 4: 2.0})
    first = controller.step_cost(SimpleNamespace(model=model, model_hash="tiny-step-cost"))
    again = controller.step_cost(SimpleNamespace(model=model, model_hash="tiny-step-cost"))  # a new engine
    assert calls == [model] and first(4) == again(4) == 2.0
    assert list((session_cache / "step_cost").glob("tiny-step-cost-*threads.json"))


def skip_friendly_model():
    """6 layers of which 2 and 3 are silenced (their branches add nothing): skipping them changes nothing."""
    m = tiny_model(62, vocab_size=50, scale=1.0, num_hidden_layers=6)
    with torch.no_grad():
        for i in (2, 3):
            m.layers[i].self_attn.o_proj.weight.zero_()
            m.layers[i].mlp.down_proj.weight.zero_()
    return m


class SkipEngine:
    def __init__(self, model):
        self.model, self.model_hash, self.tokenizer = model, "tiny-layer-skip", list(range(50))
        self._step_cost = StepCost({1: 1.0, 2: 1.05, 4: 1.15, 8: 1.4, 32: 3.0})
        self.calibrations = 0

    def generate(self, prompt, max_new_tokens, chat=True):
        self.calibrations += 1
        g = torch.Generator().manual_seed(len(prompt))
        return SimpleNamespace(token_ids=torch.randint(0, 50, (max_new_tokens,), generator=g).tolist())


def test_layer_skip_calibration_skips_the_layers_that_do_not_matter():
    engine = SkipEngine(skip_friendly_model())
    result = layer_skip.calibrate(engine, k=4)
    assert {2, 3} <= set(result["skip"]) and not {0, 5} & set(result["skip"])  # first and last always kept
    # computed from the engine's fixed cost table, not timed: the skip set found must beat skipping nothing,
    # whose expected speed is 1.0 by construction (a draft costing a whole target pass never pays)
    skipping_nothing = 1.0
    assert result["expected_speedup"] > skipping_nothing
    if set(result["skip"]) == {2, 3}:
        assert result["agreement"] == 1.0


def test_layer_skip_calibrates_once_and_drafts_with_the_kept_layers():
    engine = SkipEngine(skip_friendly_model())
    drafter = layer_skip.layer_skip(engine)
    calls = engine.calibrations
    assert calls == len(layer_skip.CALIBRATION_PROMPTS)
    assert 2 not in drafter.layers and 3 not in drafter.layers and drafter.model is engine.model
    again = layer_skip.layer_skip(SkipEngine(engine.model))  # cached under the model hash
    assert again.layers == drafter.layers
    assert layer_skip.layer_skip(engine, skip="1-2").layers == (0, 3, 4, 5)
    with pytest.raises(ValueError, match="skip= must name layers"):
        layer_skip.layer_skip(engine, skip="4-9")


def test_measuring_step_cost_keeps_no_logits_of_the_context(monkeypatch):
    """The context prefill asks for the last row's logits only: every row's would be [256, V] (268 MB at
    gemma-3's 262k vocabulary), the largest allocation of `hasten speed`."""
    model = tiny_model(62)
    rows = []
    forward = type(model).forward

    def recording(self, tokens, *args, **kwargs):
        out = forward(self, tokens, *args, **kwargs)
        rows.append((tokens.shape[1], out.shape[1]))
        return out
    monkeypatch.setattr(type(model), "forward", recording)
    controller.measure_step_cost(model, context=16, sizes=(1, 4), repeats=1)
    assert rows[0] == (16, 1)  # the context: one row of logits
    assert (4, 4) in rows  # a step keeps all its rows (verification needs them)
