import pytest

from hasten import methods
from hasten.bench import tune
from hasten.bench.suite import load_questions

pytestmark = pytest.mark.integration


def test_tune_saves_a_lossless_profile_that_auto_uses(default_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "profile_path", lambda engine: tmp_path / "profile.json")
    with pytest.raises(methods.UnknownMethodError, match="hasten tune"):
        methods.build("auto", default_engine)
    qs = load_questions(per_category=1)[1:3]
    profile = tune.tune(default_engine, qs, budget_s=10_000, max_new_tokens=16,
                        space=("prompt-lookup:k=4", "recycling:nodes=6"), progress=False)
    assert {r["method"] for r in profile["ranking"]} == {"prompt-lookup:k=4", "recycling:nodes=6"}
    assert all(r["identical"] for r in profile["ranking"])
    assert profile["best"] in ("prompt-lookup:k=4", "recycling:nodes=6", "baseline")
    for r in profile["ranking"]:  # finalists were measured again, and the speedup pools every pass
        assert r["passes"] == (4 if r["method"] in profile["finalists"] and len(profile["finalists"]) > 1 else 1)
        assert r["speedup"] == pytest.approx(r["base_s"] / r["seconds"])
    tune.save(default_engine, profile)
    drafter = methods.build("auto", default_engine)
    expected = methods.build(profile["best"], default_engine)
    assert type(drafter) is type(expected)


def test_tune_screens_on_one_prompt_per_category_and_runs_finalists_on_all(default_engine):
    qs = [q for q in load_questions(per_category=2) if q.category == "summarization"]  # prompt lookup pays here
    assert len(qs) == 2
    space = ("prompt-lookup:k=4", "prompt-lookup:k=2")
    profile = tune.tune(default_engine, qs, budget_s=10_000, max_new_tokens=24, space=space, progress=False,
                        final_rounds=2)
    assert profile["prompts"] == 2 and profile["screening_prompts"] == 1
    assert sorted(profile["finalists"]) == sorted(space)
    for r in profile["ranking"]:  # one screening run, then 2 final passes over both prompts
        assert r["runs"] == 1 + 2 * 2


def test_tune_stops_at_its_budget(default_engine):
    qs = load_questions(per_category=1)[1:2]
    profile = tune.tune(default_engine, qs, budget_s=0, max_new_tokens=4, space=("prompt-lookup:k=4",), progress=False)
    assert profile["ranking"] == [] and profile["skipped_for_budget"] == ["prompt-lookup:k=4"]
    assert profile["best"] == "baseline"


def test_eagle_configurations_join_the_space_once_a_head_is_trained(tmp_path, monkeypatch):
    from hasten.decoding.drafters import eagle
    head = tmp_path / "head.pt"
    monkeypatch.setattr(eagle, "head_path", lambda engine: head)
    space, note = tune.search_space(object())
    assert space == tune.SEARCH_SPACE and "hasten train-head" in note
    head.write_bytes(b"")
    space, note = tune.search_space(object())
    assert note is None and set(tune.EAGLE_SPACE) <= set(space) and "prompt-lookup|eagle" in space
