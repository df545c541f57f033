"""Structured output (decoding/grammar.py): drafts pruned by the grammar, target rows masked before verification.

Losslessness under a grammar means: greedy output equal to constrained plain decoding for every method, and
sampled output distributed as the constrained target (chi-square through the whole loop on a 5-token model whose
p(x1) p(x2 | x1) under the grammar is computable)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hasten.decoding.drafters.draft_model import ModelDrafter
from hasten.decoding.drafters.prompt_lookup import PromptLookup
from hasten.decoding.drafters.recycling import TokenRecycling
from hasten.decoding.grammar import Grammar, GrammarError, compile_grammar, constrain
from hasten.decoding.loop import DecodeStats, decode
from hasten.decoding.sampling import SamplingConfig, probabilities
from hasten.decoding.tree import Draft
from tests.conftest import tiny_model

llguidance = pytest.importorskip("llguidance")

V = 5  # tokens a, b, c, d and end of sequence
EOS = 4
PATTERN = "[ab][cda][abcd]*"  # first token a|b, second c|d|a, then anything
TARGET = tiny_model(53, vocab_size=V, scale=0.3)
DRAFT = tiny_model(53, vocab_size=V, scale=0.25)
PROMPT = [3, 1, 2, 3, 1, 2, 3, 1]
TRIALS = 600


@pytest.fixture(scope="module")
def ll_tokenizer():
    import llguidance.hf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "c": 2, "d": 3, "</s>": EOS}, merges=[]))
    tok.decoder, tok.pre_tokenizer = decoders.ByteLevel(), pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    return llguidance.hf.from_tokenizer(hf, n_vocab=V, eos_token=EOS)


def grammar(ll_tokenizer, pattern=PATTERN):
    return Grammar(ll_tokenizer, compile_grammar({"type": "regex", "regex": pattern}), V)


def test_prune_drops_forbidden_nodes_with_their_subtrees_and_masks_follow_each_path(ll_tokenizer):
    g = grammar(ll_tokenizer)
    # root → a (ok) → c (ok) → d (ok); root → c (forbidden first) → a (under it); a → b (forbidden second)
    draft = Draft([0, 2, 2, 3, 0, 1], [-1, 0, -1, 1, 2, 0])
    before = g.allowed()
    pruned = g.prune(draft)
    assert pruned.tokens == [0, 2, 3] and pruned.parents == [-1, 0, 1]
    masks = g.masks(pruned)
    assert masks.tolist() == [[True, True, False, False, False],  # first: a | b
                              [True, False, True, True, False],  # after a: c | d | a
                              [True, True, True, True, True],  # after a c: anything, or the end
                              [True, True, True, True, True]]
    assert torch.equal(g.allowed(), before), "pruning must leave the matcher where it was"
    with pytest.raises(GrammarError, match="prune it first"):
        g.masks(draft)


def test_commit_stops_at_the_end_of_a_complete_match(ll_tokenizer):
    g = grammar(ll_tokenizer, "ab")
    g.commit([0, 1])
    assert g.done and g.allowed().tolist() == [False, False, False, False, True]
    g.commit([EOS])  # the end of sequence ends the output; nothing is consumed past it
    with pytest.raises(GrammarError, match="refused"):
        grammar(ll_tokenizer, "ab").commit([2])


@pytest.mark.parametrize("bad", [{"type": "xml"}, {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}},
                                 {"type": "json_schema"}, "json"])
def test_bad_formats_are_one_line_errors(bad):
    with pytest.raises(GrammarError) as e:
        compile_grammar(bad)
    assert str(e.value).startswith("response_format") and "\n" not in str(e.value)


def exact_pairs(sampling):
    """p(x1) p(x2 | x1) of the target under the grammar: the masked logits, then temperature/top-k/top-p."""
    first = torch.tensor([True, True, False, False, False])
    second = torch.tensor([True, False, True, True, False])
    with torch.inference_mode():
        p1 = probabilities(constrain(TARGET(torch.tensor([PROMPT]))[0, -1:], first[None])[0], sampling)
        logits2 = TARGET(torch.tensor([PROMPT + [x] for x in range(V)]))[:, -1]
        p2 = probabilities(constrain(logits2, second.expand(V, V)), sampling)  # [V, V]
    exact = (p1[:, None] * p2).flatten().double().numpy()
    return exact / exact.sum()


DRAFTERS = {
    "prompt-lookup": lambda: PromptLookup(n=2, k=2, adaptive=False),
    "recycling": lambda: TokenRecycling(V, top_k=3, max_nodes=3, depth=2, adaptive=False),
    "draft-model": lambda: ModelDrafter(DRAFT, V, 2, adaptive=False),
}


@pytest.mark.parametrize("name", DRAFTERS)
@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.3, top_k=2)],
                         ids=["plain", "top-k"])
def test_sampling_under_a_grammar_is_the_constrained_target(ll_tokenizer, name, sampling):
    drafter = DRAFTERS[name]()
    counts, proposed, accepted = np.zeros(V * V), 0, 0
    for seed in range(TRIALS):
        stats = DecodeStats()
        out = [t for step in decode(TARGET, PROMPT, drafter, replace(sampling, seed=seed), 5, {EOS}, stats,
                                    grammar=grammar(ll_tokenizer)) for t in step.tokens]
        counts[out[0] * V + out[1]] += 1
        proposed += stats.proposed
        accepted += sum(stats.accepted_per_step)
    assert proposed > 0 and accepted > 0, "drafts must be proposed and some accepted for the test to mean anything"
    exact = exact_pairs(sampling)
    assert counts[exact == 0].sum() == 0, "a token the grammar forbids was emitted"
    mask = exact > 0
    assert chisquare(counts[mask], exact[mask] * counts.sum()).pvalue > 1e-3


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}}, "required": ["name", "age", "city"]}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON with name, age and city. Then repeat the JSON."}]


@pytest.mark.integration
@pytest.mark.parametrize("method", ["prompt-lookup", "recycling", "jacobi", "layer-skip", "prompt-lookup|recycling"])
def test_greedy_under_a_schema_equals_constrained_baseline(steady_engine, method):
    base = steady_engine.generate(MESSAGES, max_new_tokens=64, response_format=JSON_FORMAT)
    value = json.loads(base.text)
    assert set(value) >= {"name", "age", "city"} and isinstance(value["age"], int)
    r = steady_engine.generate(MESSAGES, max_new_tokens=64, method=method, response_format=JSON_FORMAT)
    assert r.token_ids == base.token_ids


@pytest.mark.integration
def test_drafts_are_accepted_under_a_schema(steady_engine):
    r = steady_engine.generate(MESSAGES, max_new_tokens=64, method="recycling", response_format=JSON_FORMAT)
    assert r.stats()["mean_accepted"] > 1.0
