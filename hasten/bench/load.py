"""A load test of an OpenAI-compatible server: N concurrent streams of short chats through the official `openai`
async client, on loopback.

For each concurrency level every prompt is sent once (at most `concurrency` in flight). Reported per level:
aggregate completion tokens per second over the level's wall time, time to first token and the time between
streamed events (median and p99), tokens per event (a server may merge steps into one event: hasten serve
--stream-interval), and how many answers equal that server's solo answer (the concurrency-1 pass, streamed). A
non-streamed pass at the highest level and a repeated pass (a warm prefix cache) are checked the same way.
`hasten serve` is started here on the given model unless --url points at a running server; llama-server can
run beside it on the same GGUF file.
"""
from __future__ import annotations

import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

SHORT_CHARS = 160  # "short chats": the first 160 characters of each prompt


@dataclass
class Answer:
    text: str
    tokens: int
    ttft: float
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks
    events: int = 0  # streamed events with content (0: not streamed)


@dataclass
class Row:
    server: str
    label: str
    concurrency: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    equal: int
    total: int
    tokens_per_event: float = 0.0  # streamed: completion tokens per content event (a server may merge steps)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def one(client, model: str, prompt: str, max_tokens: int, stream: bool, extra: dict) -> Answer:
    messages = [{"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    if not stream:
        r = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                 temperature=0, extra_body=extra)
        return Answer(r.choices[0].message.content or "", r.usage.completion_tokens, time.perf_counter() - t0)
    parts, ttft, last, gaps, tokens, events = [], None, None, [], 0, 0
    chunks = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in chunks:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
            events += 1
            parts.append(chunk.choices[0].delta.content)
    return Answer("".join(parts), tokens, ttft or time.perf_counter() - t0, gaps, events)


async def level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, stream: bool,
                extra: dict, timeout: float) -> tuple[list[Answer], float]:
    import openai
    import importlib
    # a new connection per request: llama-server (cpp-httplib) closes a kept-alive connection after a few
    # requests, and a request sent on it as it closes fails with "Server disconnected"; loopback connects are cheap.
    # Limits come from the HTTP package the installed openai client is built on (httpx, or its fork httpx2).
    limits = importlib.import_module(openai.DefaultAsyncHttpxClient.__mro__[1].__module__.split(".")[0]).Limits
    http = openai.DefaultAsyncHttpxClient(limits=limits(max_keepalive_connections=0), timeout=timeout)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout,
                                http_client=http)
    gate = asyncio.Semaphore(concurrency)

    async def bounded(p):
        async with gate:
            return await one(client, model, p, max_tokens, stream, extra)

    t0 = time.perf_counter()
    answers = await asyncio.wait_for(asyncio.gather(*(bounded(p) for p in prompts)), timeout)
    seconds = time.perf_counter() - t0
    await client.close()
    return answers, seconds


def measure(server: str, url: str, model: str, prompts: list[str], levels: list[int], max_tokens: int,
            extra: dict, timeout: float, repeat: bool, rounds: int = 1) -> tuple[list[Row], list[str], dict]:
    """→ (a row per pass, the solo answers, {concurrency: (median, min, max)} of the per-round ratio of its
    streamed tokens/s to the 1-stream pass's). Every pass sends all prompts. The streamed passes at each level run
    `rounds` times, interleaved (round r starts at the r-th level, so no level always runs first or after the
    same one, as MEASURING.md asks of methods); a level's row adds up its rounds. With `repeat`, the first pass
    (at the highest level) is the cold one — the server sees these prompts for the first time — and the last
    repeats it on a warm prefix cache; the passes between see a warm cache too, so measure batching alone with
    the cache off. Answers are compared with the first round's concurrency-1 streamed pass (the solo answers)."""
    top = max(levels)
    streamed = sorted(set(levels) | {1})
    plan = [(c, True, f"stream x{c}", r) for r in range(rounds) for c in streamed[r % len(streamed):] +
            streamed[:r % len(streamed)]] + [(top, False, f"no stream x{top}", 0)]
    if repeat:
        plan = [(top, True, f"cold x{top}", 0)] + plan + [(top, True, f"repeated x{top}", 0)]
    results: dict[str, list] = {}  # label -> [concurrency, answers over rounds, seconds over rounds]
    rates: dict[tuple[int, int], float] = {}  # (round, concurrency) -> streamed tokens/s
    for concurrency, stream, label, rnd in plan:
        answers, seconds = asyncio.run(level(url, model, prompts, concurrency, max_tokens, stream, extra, timeout))
        entry = results.setdefault(label, [concurrency, [], 0.0])
        entry[1] += answers
        entry[2] += seconds
        rate = sum(a.tokens for a in answers) / seconds
        if label.startswith("stream"):
            rates[(rnd, concurrency)] = rate
        print(f"{server} {label}{f' (round {rnd + 1})' if rounds > 1 and label.startswith('stream') else ''}: "
              f"{rate:.1f} tokens/s", file=sys.stderr, flush=True)
    solo = results["stream x1"][1][:len(prompts)]
    rows = [row(server, label, c, answers, seconds, solo * (len(answers) // len(prompts)))
            for label, (c, answers, seconds) in results.items()]
    scaling = {}
    for c in streamed:
        ratios = sorted(rates[(r, c)] / rates[(r, 1)] for r in range(rounds))
        scaling[c] = (statistics.median(ratios), ratios[0], ratios[-1])
    return rows, [a.text for a in solo], scaling


def row(server: str, label: str, concurrency: int, answers: list[Answer], seconds: float, solo: list[Answer]) -> Row:
    ttfts = [a.ttft for a in answers]
    gaps = [g for a in answers for g in a.gaps]
    return Row(server, label, concurrency, sum(a.tokens for a in answers) / seconds, statistics.median(ttfts),
               percentile(ttfts, 0.99), statistics.median(gaps) if gaps else 0.0, percentile(gaps, 0.99),
               sum(a.text == s.text for a, s in zip(answers, solo)), len(answers),
               sum(a.tokens for a in answers) / max(1, sum(a.events for a in answers)) if any(a.events for a in answers) else 0.0)


def one_stream(model, url: str, name: str, prompts: list[str], max_tokens: int, method: str, threads: int | None,
               solo: list[str], rounds: int = 3, timeout: float = 1800) -> tuple[list[Row], dict]:
    """One stream, the server against hasten's engine in this process (no server, no HTTP: the figure a one-stream
    server is held to), interleaved as MEASURING.md asks: for every prompt the engine, a streamed request and a
    non-streamed one, in an order that rotates per prompt, for `rounds` rounds. → (a row for each of the three,
    over all rounds; {"stream": (median, min, max), "no stream": …} of the per-round throughput ratios to the
    engine). Answers are compared with the server's solo answers. `model`: a path (None: the default model) or a
    loaded Engine."""
    import torch

    import hasten
    if threads:
        torch.set_num_threads(threads)
    engine = model if isinstance(model, hasten.Engine) else hasten.load(model)
    kinds = ("engine", "stream", "no stream")

    async def a_round(client):
        answers = {k: [] for k in kinds}
        seconds = dict.fromkeys(kinds, 0.0)
        for i, p in enumerate(prompts):
            for k in kinds[i % 3:] + kinds[:i % 3]:
                t0 = time.perf_counter()
                if k == "engine":
                    r = engine.generate([{"role": "user", "content": p}], max_new_tokens=max_tokens, method=method)
                    a = Answer(r.text, r.tokens, time.perf_counter() - t0)
                else:
                    a = await one(client, name, p, max_tokens, k == "stream", {})
                seconds[k] += time.perf_counter() - t0
                answers[k].append(a)
        return answers, seconds

    async def measure_rounds():
        import openai
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
        await one(client, name, prompts[0], 8, True, {})  # warm-up, both sides
        engine.generate([{"role": "user", "content": prompts[0]}], max_new_tokens=8, method=method)
        out = [await a_round(client) for _ in range(rounds)]
        await client.close()
        return out

    results = asyncio.run(measure_rounds())
    rate = [{k: sum(a.tokens for a in ans[k]) / sec[k] for k in kinds} for ans, sec in results]
    ratios = {k: sorted(r[k] / r["engine"] for r in rate) for k in kinds[1:]}
    summary = {k: (statistics.median(v), v[0], v[-1]) for k, v in ratios.items()}
    rows = []
    for k in kinds:
        answers = [a for ans, _ in results for a in ans[k]]
        label = "in-process x1" if k == "engine" else f"{k} x1, beside the engine"
        rows.append(row("hasten engine" if k == "engine" else "hasten", label, 1, answers,
                        sum(s[k] for _, s in results), [Answer(t, 0, 0.0) for t in solo] * rounds))
    return rows, summary


def format_row(r: Row) -> str:
    return (f"| {r.server} | {r.label} | {r.tokens_per_s:.1f} | {1000 * r.ttft_p50:.0f} / {1000 * r.ttft_p99:.0f} | "
            f"{1000 * r.itl_p50:.1f} / {1000 * r.itl_p99:.1f} | {r.tokens_per_event or '':.3} | {r.equal}/{r.total} |")


def table(rows: list[Row]) -> str:
    head = ("| server | pass | tokens/s (all requests) | TTFT ms p50 / p99 | between events ms p50 / p99 | "
            "tokens per event | answers equal to solo |\n|---|---|---|---|---|---|---|")
    return "\n".join([head, *map(format_row, rows)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, log_path: str, limit: float = 600) -> subprocess.Popen:
    import httpx
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not answer /health within {limit:.0f} s; see {log_path}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


DOC_CHARS = 2800  # "docs": a held-out document cut to about 700 tokens, then a question about it


def chats(count: int, workload: str = "short") -> list[str]:
    """`count` prompts: "short" = the first 160 characters of each suite prompt, "full" = whole suite prompts,
    "docs" = a held-out document of the installed corpus (about 700 tokens) and a request to summarize it — the
    prefill-heavy workload (RAG, summaries) that a prefix cache is for."""
    if workload == "docs":
        from ..sparsity import corpus
        texts = [t for t in corpus.load().texts("heldout") if len(t) >= DOC_CHARS][:count]
        if len(texts) < count:
            raise ValueError(f"the corpus has {len(texts)} held-out documents of {DOC_CHARS} characters; "
                             f"ask for at most that many prompts")
        cut = [t[:t.rfind("\n", 0, DOC_CHARS)] if "\n" in t[:DOC_CHARS] else t[:DOC_CHARS] for t in texts]
        return [c.strip() + "\n\nSummarize the text above in three sentences." for c in cut]
    from .suite import load_questions
    questions = load_questions()[:count]
    return [q.prompt[:SHORT_CHARS] if workload == "short" else q.prompt for q in questions]


def run(model: str | None, url: str | None, method: str, levels: list[int], prompts: int, max_tokens: int,
        max_batch: int, step_tokens: int, prefix_cache_mb: float, threads: int | None, llama_server: str | None,
        gguf: str | None, timeout: float, repeat: bool = True, workload: str = "short",
        engine: bool = False, engine_rounds: int = 3, stream_interval_ms: float | None = None,
        rounds: int = 1) -> list[Row]:
    """Run the load test against hasten serve (started here unless `url`) and, with `llama_server`, against
    llama-server on `gguf`; with `engine`, one stream against hasten's engine in this process on the same chats,
    interleaved over `engine_rounds` rounds; print the table and a JSON line; return the rows."""
    texts = chats(prompts, workload)
    rows, procs, scaling = [], [], {}
    try:
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "hasten.cli", "serve", "--port", str(port), "--method", method,
                   "--queue-size", str(max(levels) * 2), "--max-batch", str(max_batch),
                   "--step-tokens", str(step_tokens), "--prefix-cache-mb", str(prefix_cache_mb)]
            cmd += (["--model", model] if model else []) + (["--threads", str(threads)] if threads else [])
            cmd += ["--stream-interval", str(stream_interval_ms)] if stream_interval_ms is not None else []
            procs.append(start(cmd, url, "/tmp/hasten-load-serve.log"))
        import httpx
        name = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        hasten_rows, solo, scaling["hasten"] = measure("hasten", url, name, texts, levels, max_tokens, {}, timeout,
                                                       repeat, rounds)
        rows += hasten_rows
        if engine:
            one_rows, ratios = one_stream(model, url, name, texts, max_tokens, method, threads, solo, engine_rounds,
                                          timeout=timeout)
            rows += one_rows
            for k, (med, lo, hi) in ratios.items():
                print(f"one stream, {k}, against the engine in process: {med:.3f}x ({lo:.3f}–{hi:.3f}) over "
                      f"{engine_rounds} interleaved rounds", flush=True)
        if llama_server:
            if not gguf:
                raise ValueError("--llama-server needs --gguf FILE, the model file it serves")
            port = free_port()
            lurl = f"http://127.0.0.1:{port}"
            cmd = [llama_server, "-m", gguf, "--port", str(port), "-np", str(max(levels)), "-c", "16384",
                   "--temp", "0"] + (["-t", str(threads)] if threads else [])
            procs.append(start(cmd, lurl, "/tmp/hasten-load-llama-server.log"))
            # llama-server's prompt cache off when hasten's is: the same work for both
            extra = {} if prefix_cache_mb > 0 else {"cache_prompt": False}
            llama_rows, _, scaling["llama-server"] = measure("llama-server", lurl, "model", texts, levels, max_tokens,
                                                             extra, timeout, repeat, rounds)
            rows += llama_rows
    finally:
        for proc in procs:
            stop(proc)
    print(table(rows))
    for server, by_level in scaling.items():
        for c, (med, lo, hi) in by_level.items():
            if c > 1:
                print(f"{server}: {c} streams / 1 stream {med:.2f}x ({lo:.2f}–{hi:.2f}) over {rounds} interleaved "
                      f"round{'s' if rounds > 1 else ''}")
    print(json.dumps({"load_test": [r.__dict__ for r in rows],
                      "scaling": {s: {str(c): v for c, v in by.items()} for s, by in scaling.items()}}))
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m hasten.bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model for hasten serve (default: the embedded default model)")
    p.add_argument("--url", default=None, help="a running OpenAI-compatible server instead of starting hasten serve")
    p.add_argument("--method", default="baseline")
    p.add_argument("--levels", default="1,4,8,16", help="concurrency levels, comma-separated")
    p.add_argument("--prompts", type=int, default=18, help="short chats per level")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--step-tokens", type=int, default=256)
    p.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="hasten serve's prefix cache (0: off, and llama-server's prompt cache off too) "
                        "[default: the server's, an eighth of memory up to 4096]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--llama-server", default=None, help="path of a llama-server binary to measure beside hasten")
    p.add_argument("--gguf", default=None, help="the GGUF file llama-server serves (hasten's --model should match)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds each pass may take at most")
    p.add_argument("--no-repeat", action="store_true",
                   help="skip the cold and repeated passes (the prefix cache's gain on prompts seen before)")
    p.add_argument("--workload", choices=("short", "full", "docs"), default="short",
                   help="short chats (first 160 characters of each suite prompt), full suite prompts, or held-out "
                        "documents of ~700 tokens to summarize (prefill-heavy: what a prefix cache is for)")
    p.add_argument("--engine", action="store_true",
                   help="also compare one stream with hasten's engine in this process on the same chats: engine, "
                        "streamed and non-streamed request per prompt, interleaved over --engine-rounds rounds")
    p.add_argument("--engine-rounds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3,
                   help="streamed passes per level, interleaved across levels; the scaling (N streams / 1 stream) "
                        "is the median of the per-round ratios")
    p.add_argument("--stream-interval", type=float, default=None,
                   help="hasten serve --stream-interval MS (default: the server's)")
    a = p.parse_args(argv)
    try:
        levels = sorted({int(x) for x in a.levels.split(",") if x.strip()})
    except ValueError:
        p.error(f"--levels must be integers separated by commas, e.g. 1,4,8,16 (got {a.levels!r})")
    if not levels or min(levels) < 1 or a.prompts < 1 or a.rounds < 1:
        p.error("--levels, --prompts and --rounds must be ≥ 1")
    if a.prefix_cache_mb is None:
        from ..decoding.prefix_cache import default_mb
        a.prefix_cache_mb = default_mb()
    run(a.model, a.url, a.method, levels, a.prompts, a.max_tokens, a.max_batch, a.step_tokens, a.prefix_cache_mb,
        a.threads, a.llama_server, a.gguf, a.timeout, not a.no_repeat, a.workload, a.engine, a.engine_rounds,
        a.stream_interval, a.rounds)


if __name__ == "__main__":
    main()
