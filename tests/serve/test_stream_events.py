"""How the server turns a job's chunks into streamed events (app._coalesced): merged within the interval, in order,
nothing lost, and the end of a stream never held back by the interval."""
import asyncio

from hasten.engine import Chunk, TokenLogprob
from hasten.serve.app import _coalesced
from hasten.serve.worker import END

RESULT = object()  # stands for the GenerationResult that follows a generation's last chunk


def chunk(i: int, logprobs: bool = False) -> Chunk:
    return Chunk(f"t{i} ", [i], ["target"], [TokenLogprob(i, -0.1 * i, [])] if logprobs else None)


async def collect(interval: float, schedule: list[tuple[float, object]]) -> list:
    """Feed `schedule` ((delay after start in s, item) pairs) into a queue as the worker thread would, and return
    what _coalesced yields."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    for delay, item in schedule:
        loop.call_later(delay, out.put_nowait, item)
    return [item async for item in _coalesced(out, interval)]


def test_no_interval_sends_every_chunk_as_it_comes():
    items = [chunk(i) for i in range(5)]
    got = asyncio.run(collect(0, [(0.001 * i, c) for i, c in enumerate(items)] + [(0.01, RESULT), (0.01, END)]))
    assert got == [*items, RESULT]


def test_chunks_within_the_interval_merge_in_order_and_the_end_does_not_wait():
    async def run():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await collect(60.0, [(0.0, chunk(0, True)), (0.01, chunk(1, True)), (0.02, chunk(2, True)),
                                   (0.03, RESULT), (0.03, END)])
        return got, loop.time() - t0
    got, seconds = asyncio.run(run())
    first, merged, result = got
    assert first == chunk(0, True)  # the first chunk goes at once
    assert merged.text == "t1 t2 " and merged.tokens == [1, 2] and merged.sources == ["target", "target"]
    assert [lp.token for lp in merged.logprobs] == [1, 2]
    assert result is RESULT
    assert seconds < 30  # the result ended the 60 s wait: a stream's end is never held back by the interval


def test_an_interval_sends_at_most_one_event_per_interval():
    steps = [(0.004 * i, chunk(i)) for i in range(40)]  # a step every 4 ms for 160 ms
    got = asyncio.run(collect(0.05, steps + [(0.17, RESULT), (0.17, END)]))
    chunks = got[:-1]
    assert "".join(c.text for c in chunks) == "".join(c.text for _, c in steps)  # nothing lost, nothing reordered
    assert [t for c in chunks for t in c.tokens] == list(range(40))
    assert len(chunks) <= 6  # 160 ms at one event per 50 ms, plus the first
    assert all(c.logprobs is None for c in chunks)
