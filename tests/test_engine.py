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
    s = full.stats()
    assert s["target_passes"] == 24 and s["mean_accepted"] == 1.0 and s["tokens_per_s"] > 0


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


def test_logits_shape(default_engine):
    logits = default_engine.logits([[1, 2, 3], [4, 5, 6]])
    assert tuple(logits.shape) == (2, 3, 49152)
