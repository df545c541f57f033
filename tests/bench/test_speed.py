"""`hasten speed --depth`: decode and prefill measured after D cached tokens, and llama-bench asked for the same."""
import json

from hasten.bench import speed
from tests.conftest import tiny_model


def test_decode_and_prefill_at_depth_run_after_that_many_cached_tokens(monkeypatch):
    model = tiny_model(max_position_embeddings=2048)
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda n: caches.append(new_cache(n)) or caches[-1])
    assert speed.hasten_decode(model, 5, depth=700) > 0
    assert caches[-1].length == 700 + 1 + 5  # the context, the one-token prompt, then the 5 timed tokens
    assert speed.hasten_prefill(model, 16, depth=600) > 0
    assert caches[-1].length == 600 + 16
    assert speed.hasten_decode(model, 3) > 0 and caches[-1].length == 4  # no depth: as before


def test_llama_bench_gets_the_same_depth(tmp_path):
    args = tmp_path / "args"
    fake = tmp_path / "llama-bench"
    rows = [{"n_prompt": 16, "n_gen": 0, "avg_ts": 100.0}, {"n_prompt": 0, "n_gen": 4, "avg_ts": 50.0}]
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {args}\necho '{json.dumps(rows)}'\n")
    fake.chmod(0o755)
    assert speed.llama_bench(str(fake), "m.gguf", 2, 16, 4, depth=4096) == (100.0, 50.0)
    assert args.read_text().split()[-2:] == ["-d", "4096"]
    speed.llama_bench(str(fake), "m.gguf", 2, 16, 4)
    assert "-d" not in args.read_text().split()
