"""EAGLE-style feature drafting: lossless under greedy decoding and sampling, and its head actually learns."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from scipy.stats import chisquare

from hasten.decoding.drafters.base import NoDraft
from hasten.decoding.drafters.compose import Fallback
from hasten.decoding.drafters.eagle import EagleDrafter, load_head, save_head
from hasten.decoding.drafters.head_training import (agreement_by_depth, chained, chat_features, fit, text_features,
                                                    top1_agreement)
from hasten.decoding.drafters.prompt_lookup import PromptLookup
from hasten.decoding.loop import DecodeStats, decode
from hasten.decoding.sampling import SamplingConfig
from tests.conftest import tiny_model

VOCAB = 40


def generate(m, prompt, drafter, n, sampling=SamplingConfig()):
    stats = DecodeStats()
    out = [t for step in decode(m, prompt, drafter, sampling, n, set(), stats) for t in step.tokens]
    return out, stats


def own_outputs(m, count=24, n=40, seed=0):
    """The model's own greedy continuations of random prompts, as training sequences."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(count):
        prompt = torch.randint(0, VOCAB, (6,), generator=g).tolist()
        out, _ = generate(m, prompt, NoDraft(), n)
        seqs.append((prompt + out, len(prompt) - 1))
    return seqs


def bigram_model():
    """Silenced layers: the output depends on the last token only, so a head can learn it exactly."""
    m = tiny_model(0, vocab_size=VOCAB, scale=1.0)
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return m


_cache = {}


def trained(which):
    if which not in _cache:
        m = bigram_model() if which == "bigram" else tiny_model(1, vocab_size=VOCAB, scale=1.0)
        head, _ = fit(m, own_outputs(m), hidden=64, vocab=VOCAB, epochs=30, top_k=0)
        _cache[which] = (m, head)
    return _cache[which]


def test_the_head_learns_the_targets_choices():
    m, head = trained("bigram")
    agreement, positions = top1_agreement(head, text_features(m, own_outputs(m, count=6, seed=1)))
    assert positions > 100 and agreement > 0.9


def test_features_know_which_pairs_continue_the_same_text():
    m = bigram_model()
    features = text_features(m, [([1, 2, 3, 4, 5], 0), ([6, 7, 8, 9], 1)])
    # pairs t = 0, 1, 2 of the first text, t = 1 of the second: each but the last of a text is followed
    assert chained(features[0], features[3]).tolist() == [True, True, False, False]


def test_training_is_deterministic_for_a_seed():
    m = tiny_model(1, vocab_size=VOCAB, scale=1.0)
    data = own_outputs(m, count=4, n=12)
    a, _ = fit(m, data, hidden=32, vocab=VOCAB, epochs=2, seed=7)
    b, _ = fit(m, data, hidden=32, vocab=VOCAB, epochs=2, seed=7)
    c, _ = fit(m, data, hidden=32, vocab=VOCAB, epochs=2, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_agreement_by_depth_follows_drafting():
    m, head = trained("random")
    features = text_features(m, own_outputs(m, count=6, seed=1))
    by_depth = agreement_by_depth(head, features, depth=3)
    top1, _ = top1_agreement(head, features)
    assert len(by_depth["depth"]) == 3 and all(0 <= a <= 1 for a in by_depth["depth"])
    # depth 1 is top-1 agreement (over the positions that have 3 more after them)
    assert abs(by_depth["depth"][0] - top1) < 0.1
    assert by_depth["tau"] == pytest.approx(1 + by_depth["depth"][0] * (1 + by_depth["depth"][1] * (1 + by_depth["depth"][2])), abs=0.05)


def test_context_alignment_drafts_deeper():
    """HASS's context alignment on the bigram target: trained on the target's features only, the head's second
    draft (from its own feature) is nearly always wrong; trained on its own features, nearly always right."""
    m = bigram_model()
    data, held = own_outputs(m), text_features(m, own_outputs(m, count=6, seed=1))
    before = agreement_by_depth(fit(m, data, hidden=64, vocab=VOCAB, epochs=30, steps=1, top_k=0)[0], held)
    after = agreement_by_depth(fit(m, data, hidden=64, vocab=VOCAB, epochs=30, steps=3, top_k=0)[0], held)
    assert after["depth"][0] > 0.85 and before["depth"][0] > 0.85
    assert after["depth"][1] > 0.9 > 0.5 > before["depth"][1]
    assert after["tau"] > before["tau"] + 1


def test_context_alignment_unrolls_only_within_a_text():
    """HASS's steps 2.. continue a text with the head's own feature: texts of one pair each have nothing to unroll
    (training equals single-step training exactly), longer ones do."""
    m = tiny_model(1, vocab_size=VOCAB, scale=1.0)
    single_pairs = [([a, b, c], 0) for a, b, c in torch.randint(0, VOCAB, (40, 3)).tolist()]
    one, _ = fit(m, single_pairs, hidden=32, vocab=VOCAB, epochs=2, steps=1, top_k=0)
    three, _ = fit(m, single_pairs, hidden=32, vocab=VOCAB, epochs=2, steps=3, top_k=0)
    assert torch.equal(one.fc1.weight, three.fc1.weight)
    texts = own_outputs(m, count=4, n=12)
    one, _ = fit(m, texts, hidden=32, vocab=VOCAB, epochs=2, steps=1, top_k=0)
    three, _ = fit(m, texts, hidden=32, vocab=VOCAB, epochs=2, steps=3, top_k=0)
    assert not torch.equal(one.fc1.weight, three.fc1.weight)


@pytest.mark.parametrize("which", ["bigram", "random"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20), n=st.integers(1, 40),
       k=st.integers(1, 6), threshold=st.sampled_from([0.01, 0.4, 0.9]), width=st.integers(1, 3),
       nodes=st.sampled_from([None, 2, 8]))
def test_greedy_identity(which, prompt, n, k, threshold, width, nodes):
    m, head = trained(which)
    expected, _ = generate(m, prompt, NoDraft(), n)
    got, stats = generate(m, prompt, EagleDrafter(head, k, threshold, width, nodes), n)
    assert got == expected and stats.generated == len(got)
    fallback, _ = generate(m, prompt, Fallback([PromptLookup(2, k), EagleDrafter(head, k, threshold, width, nodes)]), n)
    assert fallback == expected


def test_a_wider_draft_is_a_tree_of_the_most_confident_paths():
    from hasten.decoding.tree import depths

    class State:  # what propose reads
        budget, tokens = 100, [3, 7, 1]
        hidden = torch.randn(3, 16)

    m, head = trained("random")
    State.hidden = text_features(m, [([3, 7, 1, 9], 0)])[0][:1]
    chain = EagleDrafter(head, 4, 0.01).propose(State)
    assert chain.is_chain() and len(chain) == 4
    tree = EagleDrafter(head, 4, 0.01, width=3, nodes=9).propose(State)
    assert not tree.is_chain() and len(tree) == 9 and max(depths(tree)) <= 4
    assert tree.tokens[:1] == chain.tokens[:1]  # the most confident first token leads both
    assert all(p < i for i, p in enumerate(tree.parents))  # parents come before their children
    assert len(EagleDrafter(head, 4, 0.999, width=3).propose(State)) == 0  # nothing is that sure


def test_drafts_are_accepted_where_the_head_is_right():
    m, head = trained("bigram")
    expected, _ = generate(m, [3, 7, 1, 9, 4], NoDraft(), 60)
    got, stats = generate(m, [3, 7, 1, 9, 4], EagleDrafter(head, 4, 0.4), 60)
    assert got == expected
    assert stats.mean_accepted > 1.5, stats.mean_accepted


def test_sampling_keeps_the_targets_distribution():
    """The first two sampled tokens follow p(x1) p(x2 | x1) exactly, with drafts proposed at every step (a random
    model's head is often wrong, so rejections and residual resampling are exercised)."""
    m, head = trained("random")
    prompt = [5, 11, 2]
    with torch.inference_mode():
        p1 = m(torch.tensor([prompt]))[0, -1].softmax(-1)  # [V]
        p2 = torch.stack([m(torch.tensor([prompt + [x]]))[0, -1].softmax(-1) for x in range(VOCAB)])  # [V, V]
    exact = (p1[:, None] * p2).flatten().double().numpy()
    exact /= exact.sum()
    trials = 3000
    counts = np.zeros(VOCAB * VOCAB)
    proposed = 0
    drafter = EagleDrafter(head, 3, 0.01, width=2, nodes=5)  # a tree: siblings are tried after a rejection
    for seed in range(trials):
        stats = DecodeStats()
        # 4 new tokens leave room for a draft after the first (the loop never drafts past max_new_tokens)
        out = [t for step in decode(m, prompt, drafter, SamplingConfig(1.0, seed=seed), 4, set(), stats)
               for t in step.tokens]
        counts[out[0] * VOCAB + out[1]] += 1
        proposed += stats.proposed
    assert proposed > trials // 2
    keep = exact * trials >= 5  # chi-square needs expected counts ≥ 5: pool the rare cells into one
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(exact[keep], exact[~keep].sum()) * trials
    assert chisquare(observed, expected).pvalue > 1e-3


def test_save_and_load_round_trip(tmp_path, monkeypatch):
    m, head = trained("bigram")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    class FakeEngine:  # only what load_head reads
        model, name, model_hash = m, "tiny", "tinyhash"

    from hasten.decoding.drafters.eagle import head_path
    save_head(head, head_path(FakeEngine), {"model": "tiny"})
    loaded = load_head(FakeEngine)
    h, x = torch.randn(3, m.config.hidden_size), torch.tensor([1, 2, 3])
    with torch.no_grad():
        drafting = loaded(h, x)  # Q8_0 layers, as drafting runs them
        loaded._q8 = None
        assert torch.equal(loaded(h, x), head(h, x)) and torch.equal(loaded.vocab_ids, head.vocab_ids)
        assert torch.allclose(drafting, head(h, x), atol=0.05 * float(head(h, x).abs().max()))


def test_an_unreadable_head_is_a_one_line_error(tmp_path, monkeypatch):
    from hasten.decoding.drafters import eagle
    m, _ = trained("bigram")
    path = tmp_path / "head.pt"
    path.write_bytes(b"not a torch file")
    monkeypatch.setattr(eagle, "head_path", lambda engine: path)

    class FakeEngine:
        model, name, model_hash = m, "tiny", "tinyhash"

    with pytest.raises(eagle.HeadNotTrainedError, match="train-head` again"):
        load_head(FakeEngine)


@pytest.mark.integration
def test_self_distilled_chats_are_the_targets_own_greedy_answers(default_engine):
    """Batched, left-padded generation gives each question the answer the engine gives it alone, and the features
    recorded on the way are the target's teacher-forced ones, so they train the head like text features do."""
    from hasten.decoding.drafters.head_training import self_distilled_chats
    chats = self_distilled_chats(default_engine, 6, max_new_tokens=8, batch=3, seed=1)
    assert len(chats) >= 3
    assert len({start for _, start, _ in chats}) > 1  # questions of different lengths shared a batch
    header_end = default_engine.encode("x", chat=True)[:-8]  # system turn and "<|im_start|>user"
    for seq, start, hidden in chats:
        prompt, answer = seq[:start + 1], seq[start + 1:]
        assert prompt[:len(header_end)] == header_end and 1 < len(answer) <= 8
        assert answer == default_engine.generate(prompt, max_new_tokens=8).token_ids
        assert hidden.shape == (len(answer), default_engine.model.config.hidden_size)
    recorded = chat_features(chats)
    forced = text_features(default_engine.model, [(seq, start) for seq, start, _ in chats])
    assert torch.equal(recorded[1], forced[1]) and torch.equal(recorded[2], forced[2])  # tokens, target choices
    for a, b in (recorded[0], forced[0]), (recorded[3], forced[3]):  # features, up to bf16 storage
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2 * b.abs().max())


def test_self_written_chats_are_cached_for_the_next_train_head(tmp_path, monkeypatch):
    from hasten.decoding.drafters import eagle, head_training
    monkeypatch.setattr(eagle, "head_path", lambda engine: tmp_path / "model.pt")
    written = []

    def write(engine, samples, progress=None):
        written.append(samples)
        return [head_training.Chat(([1, 2, 3, 4], 1, torch.randn(2, 8, dtype=torch.bfloat16)))]

    monkeypatch.setattr(head_training, "self_distilled_chats", write)

    class FakeEngine:
        model_hash = "tinyhash"

    first = head_training.cached_chats(FakeEngine, 5, None)
    again = head_training.cached_chats(FakeEngine, 5, None)
    assert written == [5] and (tmp_path / "tinyhash-chats-5.pt").exists()
    assert again[0][:2] == first[0][:2] and torch.equal(again[0][2], first[0][2])
    features = head_training.chat_features(again)
    assert features[1].tolist() == [3] and features[2].tolist() == [4]  # x_{t+1}, the choice after it
    head_training.cached_chats(FakeEngine, 7, None)  # another sample count writes its own chats
    assert written == [5, 7]
