"""The llama.cpp peers of `hasten bench`: skipped with one line when llama-cpp-python is missing, and on the
default model greedy tokens that agree with hasten's baseline (llama.cpp computes from the quantized blocks, so
exact identity over a long answer is not expected), each result carrying its weight precision."""
import json
import sys

import pytest
from click.testing import CliRunner

from hasten.bench import report
from hasten.bench.peers import HFPeer, LlamaCppPeer, SkippedPeer
from hasten.bench.runner import summarize
from hasten.cli import main

SKIP_NOTE = "hasten: skipping llama-cpp (pip install 'hasten[llama-cpp]' to compare against llama.cpp)"
# Prompts whose first greedy tokens are clear choices (top-2 logit margins > 0.5): on a near-tie (SmolLM2 puts
# "The" and "L" 0.09 apart after "What is the capital of France?") llama.cpp's Q8-quantized activations can
# pick the other token, which is a property of its arithmetic, not a bug of the peer.
PROMPTS = ["Count from one to ten in words.", "Repeat after me: the quick brown fox jumps over the lazy dog."]


def test_precision_column_in_tables():
    recs = [{"method": m, "question_id": "q", "category": "qa", "round": 0, "tokens": 4, "seconds": 1.0,
             "token_ids": [1, 2, 3, 4], "target_passes": 4, **extra}
            for m, extra in [("baseline", {}), ("hf", {"precision": "fp32"}),
                             ("llama-cpp", {"precision": "Q4_1/Q8_0 GGUF"})]]
    recs.append({"method": "llama-cpp-pld", "question_id": "q", "category": "qa", "round": 0, "tokens": 0,
                 "seconds": 0.0, "token_ids": [], "target_passes": 0, "precision": "—", "skipped": "not installed"})
    result = {"summary": summarize(recs, "baseline"), "records": recs,
              "context": {"weights": "gguf Q4_1/Q8_0 → fp32 (exact dequantized values)", "dtype": "float32"}}
    md = report.markdown(result)
    assert "| precision |" in md
    assert "| fp32 dequantized (block kernels) |" in md and "| fp32 |" in md and "| Q4_1/Q8_0 GGUF |" in md
    assert "| skipped: not installed |" in md
    term = report.terminal(result)
    assert term.splitlines()[2].split()[-1] == "precision" and "Q4_1/Q8_0 GGUF" in term
    result["context"]["activations"] = "q8 (Q4_1, Q8_0)"  # runs since 2026-12-03 record the activation path
    assert "| blocks, q8 (Q4_1, Q8_0) activations |" in report.markdown(result)


@pytest.mark.integration
def test_bench_runs_the_rest_without_llama_cpp(tmp_path, monkeypatch):
    for mod in ("llama_cpp", "llama_cpp.llama_speculative"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import llama_cpp` raises ImportError
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": [PROMPTS[0]]}))
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["bench", "--questions", str(questions), "--max-new-tokens", "6", "--rounds", "1",
                                       "--methods", "baseline,llama-cpp,llama-cpp-pld", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if "llama-cpp" in line] == [SKIP_NOTE]
    data = json.loads(out.read_text())
    baseline = [r for r in data["records"] if r["method"] == "baseline"]
    assert baseline and all(r["tokens"] > 0 for r in baseline)
    assert {r["method"] for r in data["records"]} == {"baseline"}  # the skipped peers left no records
    assert set(data["summary"]["methods"]) == {"baseline"}


@pytest.mark.integration
def test_skipped_when_the_model_is_not_a_gguf(default_engine, monkeypatch, capsys):
    pytest.importorskip("llama_cpp")
    monkeypatch.setattr(default_engine.loaded, "source", "/nonexistent/checkpoint-dir")
    monkeypatch.setattr(default_engine, "_peer_notes", set(), raising=False)
    peer = HFPeer(default_engine, "llama-cpp")
    assert isinstance(peer, SkippedPeer) and peer.run([1, 2], 4)["token_ids"] == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not loaded from a GGUF file" in err[0]


@pytest.mark.integration
def test_llama_cpp_agrees_with_baseline(default_engine):
    pytest.importorskip("llama_cpp")
    plain, pld = HFPeer(default_engine, "llama-cpp"), HFPeer(default_engine, "llama-cpp-pld")
    assert isinstance(plain, LlamaCppPeer) and isinstance(pld, LlamaCppPeer)
    for prompt in PROMPTS:
        ids = default_engine.encode(prompt, chat=True)
        ref = default_engine.generate(ids, max_new_tokens=16, method="baseline").token_ids
        for peer in (plain, pld):
            got = peer.run(ids, 16)
            assert got["precision"] == "Q4_1/Q8_0 GGUF"
            assert 0 < len(got["token_ids"]) <= 16 and got["seconds"] > 0 and got["target_passes"] >= 2
            assert got["token_ids"][:4] == ref[:4], (peer.name, prompt, got["token_ids"], ref)
