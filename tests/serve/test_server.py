"""The real server in a subprocess, on loopback, driven by the official `openai` client."""
import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hasten.cli", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300  # a cold start on a loaded 2-core machine (imports, model load) takes a while
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server():
    proc, url = start("--method", "prompt-lookup", "--queue-size", "32")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_chat_stream_equals_non_stream(client):
    kw = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name three fruits."}],
              max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    parts = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert full.choices[0].message.content and streamed == full.choices[0].message.content
    assert 0 < full.usage.completion_tokens <= 24
    assert parts[-1].usage.completion_tokens == full.usage.completion_tokens
    assert parts[-1].usage.prompt_tokens == full.usage.prompt_tokens > 10
    assert full.model_extra["hasten"]["method"] == "prompt-lookup"
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == full.choices[0].finish_reason


def test_completions_stream_equals_non_stream_and_method_override(client):
    kw = dict(model="SmolLM2-135M-Instruct", prompt="The three primary colours are", max_tokens=16, temperature=0)
    full = client.completions.create(extra_body={"method": "baseline"}, **kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full.choices[0].text
    assert full.model_extra["hasten"]["method"] == "baseline" and full.model_extra["hasten"]["mean_accepted"] == 1.0


def test_stop_and_seeded_sampling(client):
    kw = dict(model="SmolLM2-135M-Instruct", prompt="Count: one, two, three,", max_tokens=20)
    a = client.completions.create(temperature=0.8, seed=5, **kw).choices[0].text
    b = client.completions.create(temperature=0.8, seed=5, **kw).choices[0].text
    assert a == b
    stopped = client.completions.create(temperature=0, stop=[","], **kw).choices[0]
    assert "," not in stopped.text and stopped.finish_reason == "stop"


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    ({"messages": "hello"}, 400, "messages"),
    ({"model": "SmolLM2-135M-Instruct"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "does not exist"),
    ({"messages": [{"role": "user", "content": "hi"}], "method": "warp"}, 400, "unknown method"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "context"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == status
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] and "Traceback" not in r.text


def test_sixteen_concurrent_streams_each_get_their_own_output(server, client):
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]

    def stream(p):
        parts = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": p}],
                                               max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in parts if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, prompts))
    alone = [stream(p) for p in prompts]
    assert together == alone and len(set(alone)) > 8


def metrics(url) -> dict[str, float]:
    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
    return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in lines if l and not l.startswith("#")}


def test_full_queue_answers_503_and_disconnect_frees_the_slot():
    proc, url = start("--queue-size", "1")
    try:
        # greedy counting runs to max_tokens (~20 s here), so the first request is still running when it is dropped
        body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # held: a dropped line iterator closes the connection when it is collected
            next(lines)  # the first request is running
            busy = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
        # the first client went away mid-stream: the server counts it cancelled (not finished) and frees its
        # slot; the deadline only bounds a broken server, the verdict is the count
        deadline, ended = time.time() + 120, {}
        while time.time() < deadline and not any(ended.values()):
            m = metrics(url)
            ended = {k: m[k] for k in ("hasten_requests_cancelled_total", "hasten_requests_finished_total")}
            time.sleep(0.1)
        assert ended == {"hasten_requests_cancelled_total": 1, "hasten_requests_finished_total": 0}
        assert metrics(url)["hasten_requests_rejected_total"] == 1
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
    finally:
        stop(proc)


def test_sigterm_ends_streams_in_flight_cleanly():
    proc, url = start()
    body = {"messages": [{"role": "user", "content": "Count from one to twenty."}], "max_tokens": 48, "stream": True}
    lines = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 3:
                proc.send_signal(signal.SIGTERM)  # graceful: the stream in flight still finishes
    # uvicorn finishes in-flight requests, then re-raises the signal: exit status -SIGTERM after a clean stream
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    data = [l.removeprefix("data: ") for l in lines if l.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "chat.completion.chunk" for d in data[:-1])
