"""The CLI's happy paths with small budgets: models, report, tune (then --method auto), calibrate, train-head."""
import json

import pytest
from click.testing import CliRunner

from hasten.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_report_writes_tables_plot_and_token_view(tmp_path):
    from tests.bench.test_report import result
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(result()))
    out = invoke("report", saved, "--out", tmp_path / "report").output
    for name in ("report.md", "speedup.png", "tokens.html"):
        assert f"wrote {tmp_path / 'report' / name}" in out and (tmp_path / "report" / name).stat().st_size > 200
    assert "prompt-lookup" in out and "2.00x" in out  # the terminal table: 4 tokens in 0.5 s against 1.0 s


@pytest.mark.integration
def test_models_lists_the_default_model_its_cached_metadata_and_the_methods(default_engine, session_cache):
    from hasten import methods
    out = invoke("models").output
    assert out.startswith(f"default model: SmolLM2-135M-Instruct ({default_engine.loaded.source})")
    assert f"cached model metadata in {session_cache / 'models'} (config and tokenizer" in out
    assert f"  {default_engine.model_hash}-v" in out  # the metadata default_engine cached in this session's cache
    assert "kernels: " in out and "Q4_K" in out
    listed = {line.split()[0] for line in out.split("methods:\n")[1].splitlines()}
    assert listed == set(methods.available())


@pytest.mark.integration
def test_tune_saves_a_profile_that_generate_auto_uses(tmp_path, monkeypatch):
    from hasten import methods
    from hasten.bench import tune
    space = ("prompt-lookup:k=4", "recycling:nodes=6")
    monkeypatch.setattr(tune, "search_space", lambda engine: (space, None))  # a two-configuration search
    monkeypatch.setattr(methods, "profile_path", lambda engine: tmp_path / "profile.json")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Repeat: red, green, blue."]}))
    out = invoke("tune", "--questions", questions, "--budget", 10, "-n", 8).output
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert {r["method"] for r in profile["ranking"]} == set(space) and profile["max_new_tokens"] == 8
    for r in profile["ranking"]:
        assert f"{r['method']:40s} {r['speedup']:.2f}x  identical" in out
    assert f"best: {profile['best']} → saved {tmp_path / 'profile.json'}" in out
    generated = invoke("generate", "Repeat: red, green, blue.", "--chat", "-n", 8, "--method", "auto", "--json")
    assert f"--method auto uses {profile['best']}" in generated.output
    plain = invoke("generate", "Repeat: red, green, blue.", "--chat", "-n", 8, "--json")
    last = [json.loads(r.stdout[r.stdout.index("{"):]) for r in (generated, plain)]
    assert last[0]["token_ids"] == last[1]["token_ids"] and last[0]["method"] == "auto"


@pytest.mark.integration
def test_calibrate_reports_the_share_dropped_and_the_quality(tmp_path):
    out_json = tmp_path / "calibration.json"
    out = invoke("calibrate", "--methods", "teal:0.5,cats:0.3", "--tokens", 512, "--heldout-tokens", 256,
                 "--json", out_json).output
    assert "calibration: 512 tokens of debian:" in out
    rows = {r["method"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert set(rows) == {"teal:0.5", "cats:0.3"}
    teal = rows["teal:0.5"]
    assert 0.4 < teal["dropped"] < 0.6  # thresholds from 512 calibration tokens, measured on held-out text
    assert teal["perplexity"] > teal["dense_perplexity"] and 0 < teal["top1_agreement"] < 1 and teal["mean_kl"] > 0
    assert rows["cats:0.3"]["mean_kl"] < teal["mean_kl"]  # CATS at 30% of the MLP loses less than TEAL at 50%
    for m in rows:
        assert m in out


@pytest.mark.integration
def test_train_head_saves_a_head_that_eagle_drafts_with(tmp_path, monkeypatch):
    from hasten.decoding.drafters import eagle
    head = tmp_path / "head.pt"
    monkeypatch.setattr(eagle, "head_path", lambda engine: head)
    out = invoke("train-head", "--tokens", 512, "--chat-samples", 0, "--hidden", 32, "--vocab", 64,
                 "--epochs", 1).output
    summary = json.loads(head.with_suffix(".json").read_text())
    assert summary["train_positions"] > 400 and summary["vocab"] == 64 and summary["hidden"] == 32
    assert f"saved {head}" in out and "train_positions" in out
    result = invoke("generate", "def add(a, b):", "-n", 12, "--method", "eagle:threshold=0.01", "--json")
    drafted = json.loads(result.stdout[result.stdout.index("{"):])
    plain = invoke("generate", "def add(a, b):", "-n", 12, "--json")
    assert drafted["token_ids"] == json.loads(plain.stdout[plain.stdout.index("{"):])["token_ids"]
    assert drafted["method"] == "eagle:threshold=0.01"
