"""Blockwise parallel decoding (drafters/blockwise.py): the heads learn what comes after the next token, drafts are
verified losslessly (greedy identity, chi-square under sampling), and bad head files are one-line errors."""
import pytest
import torch

from hasten.decoding.drafters.base import NoDraft
from hasten.decoding.drafters.blockwise import BlockwiseDrafter, heads_path, load_heads, save_heads
from hasten.decoding.drafters.eagle import HeadNotTrainedError
from hasten.decoding.drafters.head_training import ahead, blockwise_agreement, fit_blockwise, text_features
from tests.conftest import tiny_model
from tests.decoding import test_sampling_through_the_loop as loop_tests
from tests.decoding.test_eagle import VOCAB, bigram_model, generate, own_outputs

_cache = {}


def trained(which):
    if which not in _cache:
        m = bigram_model() if which == "bigram" else tiny_model(1, vocab_size=VOCAB, scale=1.0)
        heads, _ = fit_blockwise(m, own_outputs(m), heads=3, hidden=64, vocab=VOCAB, epochs=30)
        _cache[which] = (m, heads)
    return _cache[which]


def test_ahead_lines_up_the_tokens_each_head_learns():
    Y = torch.tensor([10, 11, 12, 20, 21])
    following = torch.tensor([True, True, False, True, False])  # texts: pairs 0-2, pairs 3-4
    assert ahead(Y, following, 3).tolist() == [[10, 11, 12], [11, 12, -100], [12, -100, -100],
                                               [20, 21, -100], [21, -100, -100]]


def test_the_heads_learn_the_tokens_after_the_next():
    m, heads = trained("bigram")
    by_head = blockwise_agreement(heads, text_features(m, own_outputs(m, count=6, seed=1)))
    assert by_head["depth"][0] > 0.85 and by_head["depth"][1] > 0.8 and by_head["tau"] > 3.0, by_head


@pytest.mark.parametrize("which", ["bigram", "random"])
@pytest.mark.parametrize("k,width,threshold,nodes", [(3, 1, 0.01, 16), (2, 2, 0.05, 5), (3, 3, 0.2, 16), (1, 1, 0.5, 1)])
def test_greedy_identity(which, k, width, threshold, nodes):
    m, heads = trained(which)
    for prompt in ([3, 7, 1, 9], [5], [12, 12, 12, 30, 2, 8]):
        expected, _ = generate(m, prompt, NoDraft(), 30)
        got, stats = generate(m, prompt, BlockwiseDrafter(heads, k, width, threshold, nodes), 30)
        assert got == expected and stats.generated == len(got)


def test_drafts_are_accepted_where_the_heads_are_right():
    m, heads = trained("bigram")
    got, stats = generate(m, [3, 7, 1, 9, 4], BlockwiseDrafter(heads, 3, 1, 0.1), 60)
    assert got == generate(m, [3, 7, 1, 9, 4], NoDraft(), 60)[0]
    assert stats.mean_accepted > 2.0, stats.mean_accepted


def test_a_wider_draft_is_a_tree_under_the_threshold():
    from hasten.decoding.tree import depths
    m, heads = trained("random")

    class State:
        budget, tokens = 100, [3, 7, 1]
        hidden = text_features(m, [([3, 7, 1, 9], 0)])[0][:1]

    chain = BlockwiseDrafter(heads, 3, 1, 0.001).propose(State)
    assert chain.is_chain() and len(chain) == 3
    tree = BlockwiseDrafter(heads, 3, 2, 0.001, nodes=7).propose(State)
    assert len(tree) == 7 and not tree.is_chain() and max(depths(tree)) <= 3
    assert all(p < i for i, p in enumerate(tree.parents))
    assert len(BlockwiseDrafter(heads, 3, 2, 0.999).propose(State)) == 0


@pytest.mark.parametrize("sampling", [loop_tests.PLAIN, loop_tests.TOP_K], ids=["plain", "top-k"])
def test_sampling_keeps_the_targets_distribution(sampling):
    target = loop_tests.TARGET
    heads, _ = fit_blockwise(target, [(loop_tests.PROMPT + [1, 2, 3, 1, 2, 3, 4, 0], 0)] * 4, heads=2, hidden=16,
                             vocab=loop_tests.V, epochs=20)
    drafter = BlockwiseDrafter(heads, 2, 2, 0.05)
    counts, proposed, accepted = loop_tests.sampled_pairs(target, drafter, sampling, loop_tests.V)
    assert proposed > loop_tests.TRIALS // 2 and accepted > loop_tests.TRIALS // 10
    assert loop_tests.pvalue(counts, loop_tests.exact_pairs(target, sampling, loop_tests.V)) > 1e-3


def test_training_is_deterministic_for_a_seed():
    m = tiny_model(1, vocab_size=VOCAB, scale=1.0)
    data = own_outputs(m, count=4, n=12)
    a, _ = fit_blockwise(m, data, heads=2, hidden=16, vocab=VOCAB, epochs=2, seed=3)
    b, _ = fit_blockwise(m, data, heads=2, hidden=16, vocab=VOCAB, epochs=2, seed=3)
    assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)


def test_bad_parameters_and_bad_files_are_one_line_errors(tmp_path, monkeypatch):
    from hasten.decoding.drafters import blockwise
    m, heads = trained("random")
    with pytest.raises(ValueError, match="k=4 needs 4 heads but 3 were trained"):
        BlockwiseDrafter(heads, k=4)
    with pytest.raises(ValueError, match="threshold"):
        BlockwiseDrafter(heads, threshold=1.5)

    class Engine:
        name, model_hash, model = "tiny", "tinyhash", m

    path = tmp_path / "tiny-blockwise.pt"
    monkeypatch.setattr(blockwise, "heads_path", lambda engine: path)
    with pytest.raises(HeadNotTrainedError, match="train-head --heads 3` once"):
        load_heads(Engine)
    save_heads(heads, path, {})
    assert load_heads(Engine).heads == 3
    path.write_bytes(b"not a torch file")
    with pytest.raises(HeadNotTrainedError, match="unreadable or for another model") as e:
        load_heads(Engine)
    assert "\n" not in str(e.value)

    class Other:  # a model of another width: the saved heads do not fit it
        name, model_hash, model = "other", "otherhash", tiny_model(0, vocab_size=VOCAB, hidden_size=48)

    save_heads(heads, path, {})
    with pytest.raises(HeadNotTrainedError, match="for another model"):
        load_heads(Other)
    assert heads_path is not None
