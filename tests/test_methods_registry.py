import pytest

from hasten import methods


def test_method_lists_keep_parameters_with_commas_together():
    assert methods.split_list("baseline, teal:0.5,alloc=greedy,prompt-lookup:n=2,k=5,hf") == [
        "baseline", "teal:0.5,alloc=greedy", "prompt-lookup:n=2,k=5", "hf"]
    assert methods.split_list("prompt-lookup+recycling:nodes=6,k=4,cats:0.4") == [
        "prompt-lookup+recycling:nodes=6,k=4", "cats:0.4"]


def test_sparse_methods_are_registered_lossy_and_sparse_draft_lossless():
    assert [s.lossless for s in methods.parse("teal:0.5,alloc=greedy")] == [False]
    assert [s.lossless for s in methods.parse("cats:0.5")] == [False]
    assert [s.lossless for s in methods.parse("sparse-draft:0.6")] == [True]
    with pytest.raises(methods.UnknownMethodError, match="has no parameter"):
        methods.parse("teal:0.5,foo=1")


def test_fallback_syntax_parses_every_alternative_and_rejects_what_cannot_combine():
    assert [s.name for s in methods.parse("prompt-lookup:k=5|jacobi+recycling:nodes=6")] == [
        "prompt-lookup", "jacobi", "recycling"]
    assert methods.split_list("baseline,prompt-lookup|recycling:nodes=6,k=4,hf") == [
        "baseline", "prompt-lookup|recycling:nodes=6,k=4", "hf"]
    with pytest.raises(methods.UnknownMethodError, match="cannot be composed"):
        methods.parse("prompt-lookup|baseline")
    with pytest.raises(methods.UnknownMethodError, match="teal changes the model"):
        methods.parse("prompt-lookup+teal:0.5")
    with pytest.raises(methods.UnknownMethodError, match="unknown method"):
        methods.parse("prompt-lookup|recyling")


def test_fallback_builds_nested_compositions():
    from types import SimpleNamespace

    from hasten.decoding.controller import StepCost
    from hasten.decoding.drafters.compose import Composition, Fallback
    from tests.conftest import tiny_model
    engine = SimpleNamespace(model=tiny_model(), _step_cost=StepCost.default())
    drafter = methods.build("prompt-lookup:k=4|jacobi+recycling", engine)
    assert isinstance(drafter, Fallback) and drafter.name == "prompt-lookup|jacobi+recycling"
    assert isinstance(drafter.drafters[1], Composition)
