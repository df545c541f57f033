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
        rows = load.measure("hasten", url, default_engine.name, load.short_chats(4), [1, 4], 8, {}, 300, True)
    assert [r.label for r in rows] == ["stream x1", "stream x4", "no stream x4", "repeated x4"]
    assert all(r.equal == r.total == 4 and r.tokens_per_s > 0 and r.ttft_p50 > 0 for r in rows)
    assert load.table(rows).count("| hasten |") == 4


def test_percentile():
    assert load.percentile([], 0.5) == 0.0
    assert load.percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and load.percentile(list(range(101)), 0.99) == 99
