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
