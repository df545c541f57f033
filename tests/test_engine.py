"""The public API on the real default model."""
import pytest

from hasten.decoding.detokenize import Detokenizer
from hasten.engine import GenerationError

pytestmark = pytest.mark.integration


def test_stream_joins_to_generate_text(default_engine):
    prompt = "List three colours of the rainbow."
    full = default_engine.generate(prompt, max_new_tokens=24, chat=True)
    streamed = "".join(default_engine.stream(prompt, max_new_tokens=24, chat=True))
    assert streamed == full.text and full.tokens == 24
    assert full.text == default_engine.tokenizer.decode(full.token_ids, skip_special_tokens=True)
    s = full.stats()
    assert s["target_passes"] == 24 and s["mean_accepted"] == 1.0 and s["finish_reason"] == "length"
    assert s["prompt_tokens"] == len(default_engine.encode(prompt, chat=True)) and s["tokens"] == 24


def test_stop_string_truncates_and_finishes(default_engine):
    full = default_engine.generate("Count from one to ten in words:", max_new_tokens=40, chat=True)
    word = full.text.split()[3]
    stopped = default_engine.generate("Count from one to ten in words:", max_new_tokens=40, chat=True, stop=[word])
    assert stopped.finish_reason == "stop" and word not in stopped.text
    assert full.text.startswith(stopped.text)


def test_detokenizer_never_splits_multibyte_characters(default_engine):
    tok = default_engine.tokenizer
    text = "Größe 東京 naïve 🚀🔥 café — ünïcödé ✓"
    ids = tok(text).input_ids
    detok = Detokenizer(tok)
    pieces = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_messages_use_the_chat_template(default_engine):
    ids = default_engine.encode([{"role": "user", "content": "hello"}])
    assert default_engine.tokenizer.decode(ids).rstrip().endswith("<|im_start|>assistant")
    with pytest.raises(GenerationError, match="messages"):
        default_engine.encode([{"content": "no role"}])


def test_logits_are_the_models_next_token_scores(default_engine):
    """Row t scores the token after position t: greedy decoding's tokens are the argmax of the last row, and a
    batch's rows are each sequence's own logits."""
    import torch
    ids = default_engine.encode("The capital of France is")
    greedy = default_engine.generate(ids, max_new_tokens=3).token_ids
    logits = default_engine.logits([ids + greedy[:2], [4, 5, 6] + ids[3:] + [7, 8]])
    assert tuple(logits.shape) == (2, len(ids) + 2, 49152)
    assert logits[0, -3:].argmax(-1).tolist() == greedy
    alone = default_engine.logits(ids + greedy[:2])
    assert torch.allclose(alone[0], logits[0], atol=1e-4)
    assert not torch.allclose(logits[0], logits[1], atol=1e-2)


def test_a_kv_policy_is_the_engines_own(default_engine):
    """An engine with a window policy over the same loaded model: its caches are rings; the original engine keeps
    the full cache and its answer; the window is lossy on this full-attention model and says so."""
    from hasten.engine import Engine
    windowed = Engine(default_engine.loaded, "window:16,sinks:4")
    assert windowed.kv_lossy and not default_engine.kv_lossy
    prompt = "Write a long list of fruits, one per line."
    full = default_engine.generate(prompt, max_new_tokens=64, chat=True)
    got = windowed.generate(prompt, max_new_tokens=64, chat=True)
    again = windowed.generate(prompt, max_new_tokens=64, chat=True, method="prompt-lookup")
    assert got.stats()["kv_policy"] == "window:16,sinks:4" and got.kv_lossy
    assert windowed._cache.rings and windowed._cache.dropped and not default_engine._cache.rings
    assert again.token_ids == got.token_ids  # lossless against the same policy's baseline
    assert default_engine.generate(prompt, max_new_tokens=64, chat=True).token_ids == full.token_ids
