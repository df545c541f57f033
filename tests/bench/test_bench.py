import json

import pytest
from click.testing import CliRunner

from hasten.bench.runner import summarize
from hasten.bench.suite import QuestionsFileError, load_questions
from hasten.cli import main


def test_default_suite_covers_the_task_groups():
    qs = load_questions()
    groups = {q.category for q in qs}
    assert {"conversation", "code", "summarization", "translation", "qa", "math", "rag"} <= groups
    assert all(sum(q.category == g for q in qs) >= 5 for g in groups)
    assert any(q.question_id.startswith("HumanEval/") for q in qs)
    assert len(load_questions(per_category=2)) == 2 * len(groups)


@pytest.mark.parametrize("content,needle", [("not json\n", "not JSON"), ('{"category": "x"}\n', "lacks"),
                                            ("", "no questions"), ('{"question_id": 1, "category": "a", "turns": []}\n',
                                                                   "turns")])
def test_malformed_questions_file(tmp_path, content, needle):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(QuestionsFileError, match=needle):
        load_questions(path)
    result = CliRunner().invoke(main, ["bench", "--questions", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0 and needle in result.output


def record(method, qid, cat, rnd, tokens, seconds, ids, passes):
    return {"method": method, "question_id": qid, "category": cat, "round": rnd, "tokens": tokens,
            "seconds": seconds, "token_ids": ids, "target_passes": passes}


def test_summary_math():
    recs = []
    for rnd, slow in enumerate([1.0, 2.0]):  # round 1: the machine is twice as slow for everyone
        recs += [record("baseline", "a", "g1", rnd, 10, 1.0 * slow, [1], 10),
                 record("baseline", "b", "g2", rnd, 30, 1.0 * slow, [2], 30),
                 record("fast", "a", "g1", rnd, 10, 0.5 * slow, [1], 4),
                 record("fast", "b", "g2", rnd, 30, 1.0 * slow, [3], 10)]
    s = summarize(recs, "baseline")["methods"]
    assert s["baseline"]["tokens_per_s"]["overall"] == pytest.approx(80 / 6)
    assert s["fast"]["speedup"]["g1"]["median"] == pytest.approx(2.0)
    assert s["fast"]["speedup"]["overall"]["min"] == pytest.approx(40 / 1.5 / 20)
    assert s["fast"]["mean_accepted"] == pytest.approx(80 / 28)
    assert s["fast"]["identical"] == 1 and s["fast"]["different"] == ["b"] and s["fast"]["prompts"] == 2
    assert "decode_tokens_per_s" not in s["fast"]  # records without a first-token time: end to end only


def test_decode_rate_leaves_out_the_first_token():
    recs = []
    for rnd, slow in enumerate([1.0, 2.0]):
        # baseline: 1 s of prefill, then 10 tokens in 1 s; sparse: the same prefill, then 10 tokens in 0.5 s
        for method, decode in (("baseline", 1.0), ("sparse", 0.5)):
            recs.append({**record(method, "a", "g1", rnd, 11, (1.0 + decode) * slow, [1], 11),
                         "first_token_seconds": 1.0 * slow})
    s = summarize(recs, "baseline")["methods"]
    assert s["baseline"]["decode_tokens_per_s"]["overall"] == pytest.approx(20 / 3.0)
    assert s["sparse"]["decode_speedup"]["overall"] == pytest.approx(2.0)  # per round: 10/0.5 vs 10/1
    assert s["sparse"]["speedup"]["overall"]["median"] == pytest.approx(2.0 / 1.5)  # end to end: prefill included
    assert s["sparse"]["decode_speedup"]["g1"] == pytest.approx(2.0)


@pytest.mark.integration
def test_bench_end_to_end(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) for i, c, t in [
        (1, "qa", "What is the capital of Italy?"), (2, "math", "What is 12 times 12?")]))
    out = tmp_path / "r.json"
    # the exact fp32-activation path: there the transformers peer must give baseline's tokens too (q8, the
    # default, is compared with fp32 in BENCHMARKS.md)
    result = CliRunner().invoke(main, ["bench", "--questions", str(questions), "--max-new-tokens", "8", "--rounds", "1",
                                       "--activations", "f32", "--methods", "baseline,hf,prompt-lookup",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("cpu", "threads", "model_hash", "torch", "git_commit", "max_new_tokens"):
        assert key in data["context"]
    for m in ("baseline", "hf", "prompt-lookup"):
        entry = data["summary"]["methods"][m]
        assert {"tokens_per_s", "speedup", "decode_tokens_per_s", "decode_speedup", "mean_accepted", "identical",
                "prompts"} <= set(entry)
        assert entry["identical"] == 2
    assert len(data["records"]) == 6
    # A second, different run (other methods, a longer budget); --compare prints B/A per method and group, as
    # the records of the two runs give it, for the methods both runs have.
    second = tmp_path / "r2.json"
    result = CliRunner().invoke(main, ["bench", "--questions", str(questions), "--max-new-tokens", "12", "--rounds", "1",
                                       "--methods", "baseline,prompt-lookup", "--json", str(second)])
    assert result.exit_code == 0, result.output
    compared = CliRunner().invoke(main, ["bench", "--compare", str(out), str(second)])
    assert compared.exit_code == 0, compared.output
    rows = {tuple(line.split()[:2]): line.split() for line in compared.output.splitlines()[1:]}
    b = json.loads(second.read_text())

    def tokens_per_s(run, method, group):
        rs = [r for r in run["records"] if r["method"] == method and group in ("overall", r["category"])]
        return sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs)

    assert set(rows) == {(m, g) for m in ("baseline", "prompt-lookup") for g in ("overall", "qa", "math")}
    for (m, g), cols in rows.items():
        ta, tb = tokens_per_s(data, m, g), tokens_per_s(b, m, g)
        assert float(cols[2]) == pytest.approx(ta, abs=0.051) and float(cols[4]) == pytest.approx(tb, abs=0.051)
        assert cols[5] == f"{tb / ta:.2f}x"


@pytest.mark.integration
def test_rounds_start_from_the_same_drafter_state(default_engine):
    """Token Recycling and Jacobi learn across prompts; a later round must not draft from the same prompt's
    earlier run (that would inflate every round after the first), so each round repeats the first exactly."""
    from hasten.bench import runner
    from hasten.bench.suite import load_questions
    questions = load_questions(per_category=1)[:2]
    # adaptive=0: always draft, whatever step cost this machine measured, so there is something to learn
    config = runner.BenchConfig(("baseline", "recycling:adaptive=0", "prompt-lookup|jacobi"), rounds=2, max_new_tokens=24)
    records = runner.run(default_engine, questions, config, progress=False)
    passes = {}
    for r in records:
        passes.setdefault((r["method"], r["question_id"]), []).append(r["target_passes"])
    assert all(a == b for a, b in passes.values()), passes
    first_turn = [r["method"] for r in records if r["question_id"] == questions[0].question_id]
    assert first_turn[:3] == list(config.methods) and first_turn[3:] == list(config.methods[1:] + config.methods[:1])
    assert passes[("recycling:adaptive=0", questions[1].question_id)][0] < 24  # it did learn within the round


@pytest.mark.integration
def test_a_base_model_is_benchmarked_on_raw_prompts(default_engine, monkeypatch):
    """A model without a chat template (gemma-3-270m, the random-weight shapes) runs the suite's prompts raw
    instead of failing on the template; an instruct model's prompts go through its template."""
    from hasten.bench import runner
    from hasten.bench.suite import load_questions
    question = load_questions(per_category=1)[:1]
    config = runner.BenchConfig(("baseline",), rounds=1, max_new_tokens=4)
    seen = []
    encode = type(default_engine).encode
    monkeypatch.setattr(type(default_engine), "encode",
                        lambda self, prompt, chat=None: seen.append(chat) or encode(self, prompt, chat))
    runner.run(default_engine, question, config, progress=False)
    monkeypatch.setattr(default_engine.tokenizer, "chat_template", None)
    assert not default_engine.has_chat_template
    records = runner.run(default_engine, question, config, progress=False)
    assert seen == [True, False] and records and 1 <= len(records[0]["token_ids"]) <= 4
