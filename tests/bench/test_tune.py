from types import SimpleNamespace

import pytest

from hasten import methods
from hasten.bench import tune
from hasten.bench.suite import Question, load_questions


class ClockedEngine:
    """An engine whose every run of a method takes a fixed number of seconds: tune's ranking, finalists and
    choice are then known in advance. "wrong" is the fastest but its output differs from baseline's."""

    name, model_hash = "clocked", "clockedhash"
    has_chat_template = True
    SECONDS = {"baseline": 1.0, "fast": 0.5, "medium": 0.8, "slow": 2.0, "wrong": 0.1}

    def __init__(self):
        self.runs = []

    def encode(self, prompt, chat=None):
        return [len(prompt)]

    def generate(self, ids, max_new_tokens, method="baseline"):
        self.runs.append((method, ids[0]))
        return SimpleNamespace(token_ids=[0] if method == "wrong" else [ids[0]] * max_new_tokens,
                               seconds=self.SECONDS[method])

    def drafter(self, method):
        return object()


QUESTIONS = [Question(str(i), cat, "x" * (i + 1)) for i, cat in enumerate(["qa", "qa", "math", "math"])]


def test_tune_ranks_by_measured_speed_and_keeps_only_identical_outputs():
    engine = ClockedEngine()
    profile = tune.tune(engine, QUESTIONS, budget_s=10_000, max_new_tokens=4, space=("slow", "wrong", "medium", "fast"),
                        progress=False, finalists=2, final_rounds=2, group=2)
    assert profile["best"] == "fast"
    assert [r["method"] for r in profile["ranking"]] == ["fast", "medium", "slow", "wrong"]
    by = {r["method"]: r for r in profile["ranking"]}
    assert [by[m]["identical"] for m in ("fast", "medium", "slow", "wrong")] == [True, True, True, False]
    assert by["fast"]["speedup"] == pytest.approx(2.0) and by["medium"]["speedup"] == pytest.approx(1.25)
    assert by["slow"]["speedup"] == pytest.approx(0.5) and by["wrong"]["speedup"] == pytest.approx(10.0)
    # the two fastest lossless configurations, screened on one prompt per category, then twice on all four
    assert profile["finalists"] == ["fast", "medium"] and profile["screening_prompts"] == 2
    assert by["fast"]["runs"] == by["medium"]["runs"] == 2 + 2 * 4 and by["slow"]["runs"] == by["wrong"]["runs"] == 2
    assert by["fast"]["passes"] == 3 and by["slow"]["passes"] == 1
    screened = {ids for m, ids in engine.runs if m == "slow"}
    assert screened == {1, 3}  # the first question of each category


def test_tune_keeps_baseline_when_nothing_lossless_is_faster():
    profile = tune.tune(ClockedEngine(), QUESTIONS, budget_s=10_000, max_new_tokens=4, space=("slow", "wrong"),
                        progress=False)
    assert profile["best"] == "baseline" and profile["finalists"] == []


@pytest.mark.integration
def test_tune_on_the_default_model_finds_lossless_configurations(default_engine):
    qs = load_questions(per_category=1)[1:3]
    profile = tune.tune(default_engine, qs, budget_s=10_000, max_new_tokens=16,
                        space=("prompt-lookup:k=4", "recycling:nodes=6"), progress=False)
    assert {r["method"] for r in profile["ranking"]} == {"prompt-lookup:k=4", "recycling:nodes=6"}
    assert all(r["identical"] for r in profile["ranking"])  # their outputs were compared with baseline's


@pytest.mark.integration
def test_auto_builds_the_saved_profiles_best(default_engine, tmp_path, monkeypatch, capsys):
    from hasten.decoding.drafters.prompt_lookup import PromptLookup
    from hasten.decoding.drafters.recycling import TokenRecycling
    monkeypatch.setattr(methods, "profile_path", lambda engine: tmp_path / "profile.json")
    with pytest.raises(methods.UnknownMethodError, match="hasten tune"):
        methods.build("auto", default_engine)
    profile = tune.tune(ClockedEngine(), QUESTIONS, budget_s=10_000, max_new_tokens=4, space=("fast",), progress=False)
    for best, kind, check in [("prompt-lookup:n=2,k=4", PromptLookup, lambda d: (d.n, d.k) == (2, 4)),
                              ("recycling:nodes=6", TokenRecycling, lambda d: d.max_nodes == 6)]:
        path = tune.save(default_engine, dict(profile, best=best))
        assert path == methods.profile_path(default_engine)
        drafter = methods.build("auto", default_engine)
        assert isinstance(drafter, kind) and check(drafter)
        assert f"--method auto uses {best}" in capsys.readouterr().err


def test_tune_stops_at_its_budget():
    profile = tune.tune(ClockedEngine(), QUESTIONS, budget_s=0, max_new_tokens=4, space=("fast", "medium"),
                        progress=False)
    assert profile["ranking"] == [] and profile["skipped_for_budget"] == ["fast", "medium"]
    assert profile["best"] == "baseline"


def test_eagle_configurations_join_the_space_once_a_head_is_trained(tmp_path, monkeypatch):
    from hasten.decoding.drafters import blockwise, eagle
    head, heads = tmp_path / "head.pt", tmp_path / "heads.pt"
    monkeypatch.setattr(eagle, "head_path", lambda engine: head)
    monkeypatch.setattr(blockwise, "heads_path", lambda engine: heads)
    space, note = tune.search_space(object())
    assert space == tune.SEARCH_SPACE and "hasten train-head" in note and "eagle and blockwise" in note
    head.write_bytes(b"")
    space, note = tune.search_space(object())
    assert set(tune.EAGLE_SPACE) <= set(space) and "prompt-lookup|eagle" in space
    assert not set(tune.BLOCKWISE_SPACE) & set(space) and note.startswith("blockwise configurations left out")
    heads.write_bytes(b"")
    space, note = tune.search_space(object())
    assert note is None and set(tune.EAGLE_SPACE) | set(tune.BLOCKWISE_SPACE) <= set(space)


def test_without_a_head_the_note_says_when_it_joins_and_what_training_would_cost(monkeypatch):
    from hasten.decoding.controller import StepCost
    engine = ClockedEngine()
    engine._step_cost = StepCost.default()  # what step_cost(engine) measured
    monkeypatch.setattr(tune, "search_space", lambda e: (("fast",), "eagle configurations left out: no trained "
                                                         "draft head; after `hasten train-head` the next `hasten tune` tries them"))
    profile = tune.tune(engine, QUESTIONS, budget_s=10_000, max_new_tokens=4, progress=False)
    # baseline takes 1 s for 4 tokens here: 0.25 s a step, priced up for batched chat writing and the corpus pass
    minutes = round(tune.train_head_estimate(engine, 0.25) / 60)
    assert minutes > 10 and f"`hasten train-head` costs ~{minutes} min here, an estimate" in profile["note"]
    assert "the next `hasten tune` tries them" in profile["note"]
    doubled = tune.train_head_estimate(engine, 0.5)
    assert doubled == pytest.approx(2 * tune.train_head_estimate(engine, 0.25))  # a slower step, a longer training
