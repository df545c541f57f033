"""The load test against the server in this process: every pass's answers equal the solo ones, and the table
has a row per pass."""
import pytest

from hasten.bench import load

pytestmark = pytest.mark.integration
pytest.importorskip("openai")
pytest.importorskip("uvicorn")


def test_load_test_rows_check_every_answer_against_its_solo_answer(default_engine, capsys):
    from tests.serve.test_serving import serving
    with serving(default_engine, queue_size=8, max_batch=4, step_tokens=64) as (url, _):
        rows, solo, scaling = load.measure("hasten", url, default_engine.name, load.chats(4), [1, 4], 8, {}, 300, True,
                                           rounds=2)
        # one stream beside the engine, interleaved: the server's answers, streamed or not, are the engine's own
        one, ratios = load.one_stream(default_engine, url, default_engine.name, load.chats(4), 8, "baseline", None,
                                      solo, rounds=2)
    assert [r.label for r in rows] == ["cold x4", "stream x1", "stream x4", "no stream x4", "repeated x4"]
    # the streamed levels ran twice (interleaved rounds), every answer checked against its solo answer
    assert [r.total for r in rows] == [4, 8, 8, 4, 4]
    assert all(r.equal == r.total and r.tokens_per_s > 0 and r.ttft_p50 > 0 for r in rows)
    assert scaling[1] == (1.0, 1.0, 1.0) and set(scaling) == {1, 4}
    assert scaling[4][1] <= scaling[4][0] <= scaling[4][2]
    assert load.table(rows).count("| hasten |") == 5
    assert len(solo) == 4 and all(solo)
    assert [r.label for r in one] == ["in-process x1", "stream x1, beside the engine", "no stream x1, beside the engine"]
    assert all(r.equal == r.total == 8 for r in one)
    assert set(ratios) == {"stream", "no stream"} and all(lo <= med <= hi for med, lo, hi in ratios.values())


def test_full_prompts_are_the_whole_prompts():
    short, full = load.chats(18, "short"), load.chats(18, "full")
    assert all(len(s) <= load.SHORT_CHARS and f.startswith(s) for s, f in zip(short, full))
    assert max(map(len, full)) > load.SHORT_CHARS
    docs = load.chats(4, "docs")
    assert len(set(docs)) == 4 and all(1000 < len(d) <= load.DOC_CHARS + 60 for d in docs)


def test_percentile():
    assert load.percentile([], 0.5) == 0.0
    assert load.percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and load.percentile(list(range(101)), 0.99) == 99
