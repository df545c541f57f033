"""Greedy identity on the real default model for every configuration `--method auto` can pick (the tune search
space, eagle's included), and the stop conditions that fall inside an accepted draft: EOS, a stop string in a
multi-token step, max_new_tokens. Each check also shows that drafts were proposed and accepted, so identity
does not hold merely because nothing was drafted.

The engine here is the default model with a fixed step-cost table (see `steady_engine`), so which drafts the
adaptive drafters choose to propose does not depend on how loaded this machine is.
"""
import pytest

from hasten.bench import tune
from hasten.bench.suite import load_questions

pytestmark = pytest.mark.integration

TOKENS = 32
# the rag prompt: its answer quotes the document (prompt lookup), repeats itself (recycling, jacobi), and is
# easy for layer-skip, sparse and eagle drafts alike
PROMPT = next(q for q in load_questions(per_category=1) if q.category == "rag").prompt


@pytest.fixture(scope="module")
def expected(steady_engine):
    return steady_engine.generate(PROMPT, max_new_tokens=TOKENS, chat=True).token_ids


@pytest.fixture(scope="module")
def eagle_head(steady_engine, expected):
    """A small eagle head and blockwise heads for the default model, trained in seconds on corpus text and on the
    target's own answer to PROMPT (so that their drafts are accepted there), saved where the methods look;
    removed afterwards."""
    from hasten.decoding.drafters.eagle import head_path, save_head
    from hasten.decoding.drafters.blockwise import heads_path, save_heads
    from hasten.decoding.drafters.head_training import fit, fit_blockwise
    from hasten.sparsity.corpus import load
    engine = steady_engine
    prompt = engine.encode(PROMPT, chat=True)
    texts = [(c, 0) for c in load().token_chunks(engine.tokenizer, "calibration", 1024, 256)]
    data = texts + [(prompt + expected, len(prompt) - 1)] * 8
    head, _ = fit(engine.model, data, hidden=256, vocab=2048, epochs=4)
    heads, _ = fit_blockwise(engine.model, data, heads=3, hidden=256, vocab=2048, epochs=4)
    path, blockwise_path = head_path(engine), heads_path(engine)
    save_head(head, path, {"model": engine.name})
    save_heads(heads, blockwise_path, {"model": engine.name})
    yield path
    for p in (path, blockwise_path):
        p.unlink()
        p.with_suffix(".json").unlink()


def accepted(result) -> int:
    return sum(s != "target" for s in result.sources)


def test_every_configuration_auto_can_pick_is_greedy_identical(steady_engine, expected, eagle_head, monkeypatch):
    from hasten.decoding.drafters import sparse_draft
    # a sparse draft's price is measured by timing when it is built: fixed here, like the step cost
    monkeypatch.setattr(sparse_draft, "relative_cost", lambda dense, sparse: 0.6)
    space, note = tune.search_space(steady_engine)
    assert note is None and set(tune.SEARCH_SPACE) | set(tune.EAGLE_SPACE) | set(tune.BLOCKWISE_SPACE) == set(space)
    for name in ("prompt-lookup+eagle", "prompt-lookup|layer-skip", "sparse-draft:0.5,method=cats"):
        assert name in space
    undrafted = []
    for method in space:
        got = steady_engine.generate(PROMPT, max_new_tokens=TOKENS, chat=True, method=method)
        assert got.token_ids == expected, method
        if not accepted(got):  # drafters that learn across prompts (recycling, jacobi) draft on a second run
            got = steady_engine.generate(PROMPT, max_new_tokens=TOKENS, chat=True, method=method)
            assert got.token_ids == expected, method
            if not accepted(got):
                undrafted.append(method)
    # Layer-skip's calibration finds no skip set that pays on this cost table for a 30-layer 135M model, so it
    # keeps every layer and its controller never drafts (a draft would cost a target pass): identity is all it
    # can show here, and its `prompt-lookup|layer-skip` form drafts through prompt lookup. A sparse draft whose
    # first draft on this prompt is rejected backs off for the rest of a 32-token answer (each request's
    # controller starts from the prior; which ones are rejected depends on the activation path), so sparse
    # drafts may show identity only here; fixed-size sparse drafts are shown accepted in
    # tests/sparsity/test_methods.py. Every other configuration must have drafts accepted.
    skip_all = steady_engine.drafter("layer-skip")
    may_not_draft = {m for m in space if m.startswith("sparse-draft")}
    if len(skip_all.layers) == steady_engine.model.config.num_layers:
        may_not_draft.add("layer-skip")
    assert set(undrafted) <= may_not_draft and len(undrafted) < len(space) // 4, undrafted


def test_eos_inside_an_accepted_draft(steady_engine):
    """The answer repeats the prompt's sentence, after which the prompt had <|im_end|>: prompt lookup drafts the
    EOS together with the tokens that followed it in the prompt. Output stops at the EOS, as baseline's does."""
    prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog."
    base = steady_engine.generate(prompt, max_new_tokens=60, chat=True)
    got = steady_engine.generate(prompt, max_new_tokens=60, chat=True, method="prompt-lookup")
    assert base.finish_reason == got.finish_reason == "stop" and len(base.token_ids) < 60
    assert got.token_ids == base.token_ids and got.text == base.text
    assert got.token_ids[-1] in steady_engine.eos_ids and got.sources[-1] == "prompt-lookup"


def test_stop_string_inside_a_multi_token_step(steady_engine, expected):
    """A stop string that ends in the middle of a step of several accepted tokens cuts the text where baseline
    cuts it, and the tokens are exactly the ones baseline emitted."""
    from hasten.decoding.detokenize import Detokenizer
    run = steady_engine.run(PROMPT, max_new_tokens=TOKENS, chat=True, method="prompt-lookup")
    steps = [chunk.tokens for chunk in run if chunk.tokens]
    start = next(sum(map(len, steps[:i])) for i, s in enumerate(steps) if len(s) >= 4 and i > 0)
    detok = Detokenizer(steady_engine.tokenizer)
    before = "".join(detok.push([t]) for t in expected[:start + 2])  # the text through the step's 2nd token
    stop = before[-6:]
    assert stop.strip() and before.index(stop) == len(before) - 6, "pick a stop string that occurs only here"
    base = steady_engine.generate(PROMPT, max_new_tokens=TOKENS, chat=True, stop=[stop])
    got = steady_engine.generate(PROMPT, max_new_tokens=TOKENS, chat=True, method="prompt-lookup", stop=[stop])
    assert base.finish_reason == got.finish_reason == "stop"
    assert got.text == base.text == before[:-6]
    assert got.token_ids == base.token_ids  # the step's tokens past the one that completed the stop are dropped


@pytest.mark.parametrize("method", ["prompt-lookup", "recycling"])  # layer-skip drafted nothing here in CI
def test_max_new_tokens_reached_mid_draft(steady_engine, expected, method):
    for n in (5, 13, 22):
        got = steady_engine.generate(PROMPT, max_new_tokens=n, chat=True, method=method)
        assert got.token_ids == expected[:n] and got.finish_reason == "length", (method, n)
    assert got.target_passes < n  # drafts were accepted on the way
