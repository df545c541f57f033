"""`hasten make-model` and `hasten speed`: a random-weight GGUF written by the CLI loads and is measured; bad input
is one line and exit 2."""
import json
import subprocess
import sys

import pytest

import hasten.models.synthetic as synthetic


def hasten(*args):
    return subprocess.run([sys.executable, "-m", "hasten.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture
def tiny_shape():
    synthetic.SHAPES["tiny"] = synthetic.Shape(256, 2, 4, 2, 512, vocab=49280, context=512)
    yield "tiny"
    del synthetic.SHAPES["tiny"]


def test_make_model_rejects_an_unknown_type_in_one_line(tmp_path):
    out = hasten("make-model", str(tmp_path / "x.gguf"), "--type", "Q3_K")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--type Q3_K is not one of" in out.stderr
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q8_0", "BF16"])
def test_a_written_model_has_the_mix_and_runs(tmp_path, tiny_shape, qtype):
    from hasten.models.loading import load
    path = synthetic.write_random_gguf(tmp_path / "m.gguf", tiny_shape, qtype, progress=False)
    loaded = load(path)
    types = {m.qtype for m in loaded.model.modules() if hasattr(m, "qtype")}
    assert types == ({"Q4_K", "Q6_K"} if qtype == "Q4_K_M" else {qtype})
    # Q4_K_M: the tied output layer and attn_v / ffn_down of the layers that use more bits are Q6_K
    if qtype == "Q4_K_M":
        assert loaded.model.embed_tokens.qtype == "Q6_K" and loaded.model.layers[1].mlp.down_proj.qtype == "Q6_K"
        assert loaded.model.layers[0].mlp.up_proj.qtype == "Q4_K"


def test_speed_measures_a_file_and_writes_json(tmp_path, tiny_shape):
    path = synthetic.write_random_gguf(tmp_path / "m.gguf", tiny_shape, "Q4_0", progress=False)
    out = hasten("speed", "--model", str(path), "-p", "16", "-n", "4", "--rounds", "1", "--threads", "1",
                 "--json", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stderr
    assert "hasten decode" in out.stdout and "peak RSS" in out.stdout
    result = json.loads((tmp_path / "s.json").read_text())
    assert set(result["tokens_per_s"]) == {"hasten prefill", "hasten decode"}
    assert set(result["step_cost"]) == {"1", "2", "4", "8"} and result["step_cost"]["1"] == 1.0


def test_speed_with_llama_bench_needs_a_gguf_file(tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\n")
    out = hasten("speed", "--model", str(tmp_path), "--llama-bench", str(fake))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
