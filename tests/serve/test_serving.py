"""The server in this process (uvicorn on loopback, in a thread) over the real default model, wrapped in a probe that
can fail a generation on purpose and counts generations running at once. Cancellation and throughput are checked
by the server's own counters (/metrics), never by the clock."""
import copy
import json
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from hasten import methods as registry
from hasten.decoding.drafters.base import NoDraft
from hasten.serve.app import create_app

pytestmark = pytest.mark.integration
uvicorn = pytest.importorskip("uvicorn")

MODEL = "SmolLM2-135M-Instruct"
REPEAT = ("Repeat this list exactly: alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu. "
          "Once more: alpha beta gamma delta epsilon zeta eta theta")


class Probe:
    """The real engine, plus: `fail_after = n` makes the next generation raise after n chunks; `active` counts
    generations being iterated now."""

    def __init__(self, engine, tokenizer=None):
        self._engine = engine
        self.tokenizer = tokenizer or engine.tokenizer
        self.fail_after = None
        self.active = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, *args, **kw):
        return _ProbeGeneration(self._engine.run(*args, **kw), self)


class _ProbeGeneration:
    def __init__(self, gen, probe):
        self.gen, self.probe, self.n, self.fail, self.live = gen, probe, 0, probe.fail_after, False
        probe.fail_after = None

    @property
    def result(self):
        return self.gen.result

    def __iter__(self):
        return self

    def __next__(self):
        if not self.live:
            self.live, self.probe.active = True, self.probe.active + 1
        try:
            if self.fail is not None and self.n >= self.fail:
                raise RuntimeError("injected failure")
            self.n += 1
            return next(self.gen)
        except BaseException:
            self._end()
            raise

    def close(self):
        self._end()
        self.gen.close()

    def _end(self):
        if self.live:
            self.live, self.probe.active = False, self.probe.active - 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(engine, **kw):
    app = create_app(engine, **kw)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{server.config.port}", server.config.port
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def probe(default_engine):
    return Probe(default_engine)


@pytest.fixture(scope="module")
def server(probe):
    with serving(probe, method="prompt-lookup", queue_size=8) as (url, port):
        yield url, port


@pytest.fixture
def url(server):
    return server[0]


def metrics(url) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(predicate, what: str, limit: float = 120):
    """Poll until predicate() holds; the deadline only bounds a broken server, the assertion is on counts."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def chat(url, content, **kw):
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 8, **kw}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=300)


def sse(response) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in response.iter_lines() if line.startswith("data: ")]


# ---- request shapes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,extra,field", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
     "response_format"),
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/chat/completions", {"logit_bias": {"42": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"frobnicate": True}, "frobnicate"),
    ("/v1/chat/completions", {"n": 2}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
])
def test_fields_hasten_does_not_honour_answer_400_naming_them(url, path, extra, field):
    body = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}) | extra
    r = httpx.post(url + path, json={"max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(field + ":") and err["param"] == field and "Traceback" not in r.text
    assert "\n" not in err["message"]


def test_fields_set_to_their_off_value_are_accepted(url):
    off = {"tools": [], "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": None, "user": "u-1",
           "response_format": {"type": "text"}, "n": 1, "tool_choice": None}
    r = chat(url, "Say hi.", max_tokens=2, **off)
    assert r.status_code == 200, r.text


def test_content_as_text_parts_equals_the_joined_string_and_other_parts_are_refused(url):
    parts = [{"type": "text", "text": "Name two colours."}, {"type": "text", "text": "Be brief."}]
    as_parts = chat(url, parts).json()
    as_string = chat(url, "Name two colours.\nBe brief.").json()
    assert as_parts["choices"][0]["message"]["content"] == as_string["choices"][0]["message"]["content"]
    assert as_parts["usage"]["prompt_tokens"] == as_string["usage"]["prompt_tokens"]
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    r = chat(url, image)
    assert r.status_code == 400 and "'image_url'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages[0].content[1].type"


def test_a_base_model_without_chat_template_is_sent_to_completions(default_engine):
    tokenizer = copy.copy(default_engine.tokenizer)
    tokenizer.chat_template = None
    with serving(Probe(default_engine, tokenizer)) as (url, _):
        r = chat(url, "hi")
        assert r.status_code == 400 and "/v1/completions" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "no_chat_template"
        ok = httpx.post(url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200


# ---- logprobs ------------------------------------------------------------------------------------------------
def recomputed_logprobs(engine, prompt_ids, out_ids):
    """Each generated token's logprob from one plain forward pass over prompt + output."""
    logits = engine.logits(prompt_ids + out_ids)[0]  # [T, V]
    logp = torch.log_softmax(logits.float(), -1)
    return [float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(out_ids)]


def test_chat_logprobs_come_from_the_target_and_are_the_same_under_speculation(url, default_engine):
    kw = dict(max_tokens=24, logprobs=True, top_logprobs=3)
    spec = chat(url, REPEAT, method="prompt-lookup", **kw).json()
    plain = chat(url, REPEAT, method="baseline", **kw).json()
    assert spec["hasten"]["mean_accepted"] > 1.1  # drafts were accepted: some logprobs came from multi-token passes
    assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    a, b = spec["choices"][0]["logprobs"]["content"], plain["choices"][0]["logprobs"]["content"]
    assert len(a) == spec["usage"]["completion_tokens"] == 24
    assert [t["token"] for t in a] == [t["token"] for t in b]
    assert [t["logprob"] for t in a] == [t["logprob"] for t in b]  # exact: hasten's kernels don't depend on T
    for t in a:  # greedy: the chosen token is the most likely one, listed first among the top 3
        assert len(t["top_logprobs"]) == 3 and t["top_logprobs"][0]["token"] == t["token"]
        assert t["top_logprobs"][0]["logprob"] == t["logprob"] <= 0
        assert t["bytes"] == list(t["token"].encode())
    prompt_ids = default_engine.encode([{"role": "user", "content": REPEAT}])
    out_ids = [tid for tid in default_engine.generate(prompt_ids, 24).token_ids]
    assert [default_engine.tokenizer.decode([i]) for i in out_ids] == [t["token"] for t in a]
    expected = recomputed_logprobs(default_engine, prompt_ids, out_ids)
    assert [t["logprob"] for t in a] == pytest.approx(expected, abs=1e-4)


def test_streamed_chat_logprobs_equal_the_non_streamed_ones(url):
    kw = dict(max_tokens=12, logprobs=True, top_logprobs=1)
    full = chat(url, REPEAT, **kw).json()["choices"][0]["logprobs"]["content"]
    body = {"messages": [{"role": "user", "content": REPEAT}], "temperature": 0, "stream": True, **kw}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        events = sse(r)
    streamed = [t for e in events[:-1] if (lp := e["choices"][0]["logprobs"]) for t in lp["content"]]
    assert streamed == full


def test_completion_logprobs_and_echo(url, default_engine):
    prompt = "The capital of France is"
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                                  "logprobs": 2, "echo": True}, timeout=120).json()
    choice = r["choices"][0]
    prompt_ids = default_engine.tokenizer(prompt).input_ids
    n_prompt, n_out = len(prompt_ids), r["usage"]["completion_tokens"]
    lp = choice["logprobs"]
    assert choice["text"].startswith(prompt) and len(choice["text"]) > len(prompt)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == n_prompt + n_out
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    logits = default_engine.logits(prompt_ids)[0]
    logp = torch.log_softmax(logits.float(), -1)
    expected = [float(logp[i - 1, prompt_ids[i]]) for i in range(1, n_prompt)]
    assert lp["token_logprobs"][1:n_prompt] == pytest.approx(expected, abs=1e-4)
    for tokens, top in zip(lp["tokens"][n_prompt:], lp["top_logprobs"][n_prompt:]):
        assert 2 <= len(top) <= 3 and max(top, key=top.get) == tokens  # greedy: the chosen token is the best
    plain = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                                      "echo": True}, timeout=120).json()["choices"][0]
    assert plain["text"] == choice["text"] and plain["logprobs"] is None
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0,
                                                              "echo": True, "logprobs": 2, "stream": True},
                      timeout=120) as s:
        events = sse(s)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]
    streamed = [x for e in events[:-1] if e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]


# ---- metrics -------------------------------------------------------------------------------------------------
def test_metrics_are_prometheus_text_and_count_what_happened(url):
    text = httpx.get(url + "/metrics").text
    declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert name in declared or name.rsplit("_", 1)[0] in declared, line
            float(line.rsplit(" ", 1)[1])
    assert "hasten_prefix_cache_hits_total" in declared  # the server's prefix cache is on by default
    before = metrics(url)
    r = chat(url, REPEAT, max_tokens=20).json()
    after = metrics(url)
    h = r["hasten"]
    assert after["hasten_requests_finished_total"] == before["hasten_requests_finished_total"] + 1
    assert after["hasten_generated_tokens_total"] - before["hasten_generated_tokens_total"] == r["usage"]["completion_tokens"]
    assert after["hasten_target_passes_total"] - before["hasten_target_passes_total"] == h["target_passes"]
    assert after["hasten_mean_accepted_tokens"] == pytest.approx(
        after["hasten_generated_tokens_total"] / after["hasten_target_passes_total"], abs=1e-3)
    assert after["hasten_time_to_first_token_seconds_count"] == before["hasten_time_to_first_token_seconds_count"] + 1
    assert after["hasten_requests_running"] == 0 and after["hasten_requests_waiting"] == 0
    assert 0 < h["time_to_first_token_s"] and h["queue_s"] >= 0


def test_warm_up_runs_one_generation_before_the_first_request_unseen_by_metrics_and_cache(default_engine, monkeypatch):
    """The warm-up runs on the worker's thread (OpenMP keeps a thread team per calling thread: warming up on the
    server's thread halved its speed), before the app is returned."""
    import threading
    threads = []
    run = type(default_engine).run
    monkeypatch.setattr(type(default_engine), "run",
                        lambda self, *a, **kw: threads.append(threading.current_thread()) or run(self, *a, **kw))
    app = create_app(default_engine, method="baseline", queue_size=4, warm_up=True, prefix_cache_mb=64)
    worker = app.state.worker
    try:
        assert threads == [worker.thread]
        assert worker.scheduler.steps_run > 0  # the warm-up ran through the worker's own scheduler
        assert not worker.scheduler.running and not worker.scheduler.waiting
        assert worker.scheduler.prefix_cache is not None and worker.scheduler.prefix_cache.bytes == 0 and worker.scheduler.prefix_cache.lookups == 0
        m = app.state.metrics
        assert m.tokens == 0 and m.finished == 0 and m.steps == 0
    finally:
        worker.stop()


# ---- batching ------------------------------------------------------------------------------------------------
def test_concurrent_requests_share_steps_and_each_gets_its_solo_answer(url):
    """Six requests at once — mixed methods, greedy and seeded sampling, streamed and not — step together (fewer
    packed steps than target passes), and every answer is the one it gets alone."""
    import concurrent.futures
    asks = [("Name a colour.", {}), ("Count to five.", {"method": "baseline"}), (REPEAT, {"method": "prompt-lookup"}),
            ("Say hello in French.", {"temperature": 0.8, "seed": 11}), ("What is 3+4?", {"method": "recycling"}),
            ("Name a river.", {"temperature": 1.0, "seed": 2, "method": "baseline"})]

    def ask(i):
        text, extra = asks[i]
        if i % 2:
            r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": text}],
                           "temperature": 0, "max_tokens": 16, "stream": True, **extra}, timeout=300)
            return "".join(e["choices"][0]["delta"].get("content") or "" for e in sse(r)[:-1] if e["choices"])
        return chat(url, text, max_tokens=16, **extra).json()["choices"][0]["message"]["content"]

    alone = [ask(i) for i in range(len(asks))]
    before = metrics(url)
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(ask, range(len(asks))))
    after = metrics(url)
    assert together == alone
    steps = after["hasten_batch_steps_total"] - before["hasten_batch_steps_total"]
    passes = after["hasten_target_passes_total"] - before["hasten_target_passes_total"]
    assert steps < passes  # requests shared packed steps
    assert after["hasten_prefix_cache_hits_total"] > before["hasten_prefix_cache_hits_total"]  # the chat template


# ---- cancellation --------------------------------------------------------------------------------------------
LONG = {"messages": [{"role": "user", "content": "Write a very long story about a dragon, chapter by chapter."}],
        "max_tokens": 2000, "temperature": 0}


def ended(url, before):
    m = metrics(url)
    done = {k: m[k] - before[k] for k in ("hasten_requests_cancelled_total", "hasten_requests_finished_total")}
    return done if any(done.values()) and m["hasten_requests_running"] == 0 else None


def test_a_streaming_client_that_disconnects_is_cancelled_at_the_next_step(url):
    solo = chat(url, "Name a colour.", max_tokens=6).json()["choices"][0]["message"]["content"]
    before = metrics(url)
    with httpx.stream("POST", url + "/v1/chat/completions", json={**LONG, "stream": True}, timeout=300) as r:
        lines = r.iter_lines()
        read = sum(1 for _, line in zip(range(8), lines) if line.startswith("data: "))
    done = wait_for(lambda: ended(url, before), "the request ended")
    assert done == {"hasten_requests_cancelled_total": 1, "hasten_requests_finished_total": 0}
    generated = metrics(url)["hasten_generated_tokens_total"] - before["hasten_generated_tokens_total"]
    assert read - 1 <= generated < 200  # (the first event is the role) far from 2000: stopped soon after the client left
    again = chat(url, "Name a colour.", max_tokens=6).json()["choices"][0]["message"]["content"]
    assert again == solo  # nothing of the cancelled request leaks into the next


def test_a_non_streaming_client_that_disconnects_is_cancelled(url, server):
    before = metrics(url)
    body = json.dumps(LONG).encode()
    s = socket.create_connection(("127.0.0.1", server[1]))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body) + body)
    wait_for(lambda: metrics(url)["hasten_generated_tokens_total"] > before["hasten_generated_tokens_total"] + 4,
             "decoding began")
    s.close()
    done = wait_for(lambda: ended(url, before), "the request ended")
    assert done == {"hasten_requests_cancelled_total": 1, "hasten_requests_finished_total": 0}
    assert metrics(url)["hasten_generated_tokens_total"] - before["hasten_generated_tokens_total"] < 200


# ---- failures and new methods --------------------------------------------------------------------------------
def test_an_error_mid_generation_reaches_only_its_client(url, probe):
    solo = chat(url, "Name a fruit.", max_tokens=10).json()["choices"][0]["message"]["content"]
    probe.fail_after = 3
    body = {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 30, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        events = sse(r)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert events[-2]["error"]["type"] == "server_error" and "injected failure" in events[-2]["error"]["message"]
    assert all("choices" in e for e in events[:-2])  # the tokens before the failure, then the error event
    probe.fail_after = 2
    r = chat(url, "Count to ten.", max_tokens=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "Traceback" not in r.text
    assert chat(url, "Name a fruit.", max_tokens=10).json()["choices"][0]["message"]["content"] == solo


def test_a_new_method_is_built_off_the_event_loop_and_not_beside_a_generation(url, probe):
    release, seen = threading.Event(), {}

    def factory(engine):
        seen["active"] = probe.active  # generations running while this method is built
        seen["health"] = httpx.get(url + "/health", timeout=30).status_code  # the event loop still answers
        release.wait(120)
        return NoDraft()

    registry.register("probe-slow-build", factory)
    results = {}
    try:
        body = {"messages": [{"role": "user", "content": "Count from one to twenty."}], "max_tokens": 40,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()
            next(lines)
            newcomer = threading.Thread(target=lambda: results.update(
                r=chat(url, "Say hi.", max_tokens=3, method="probe-slow-build")))
            newcomer.start()
            wait_for(lambda: "active" in seen or metrics(url)["hasten_requests_waiting"] == 1, "the newcomer arrived")
            events = [line for line in lines if line.startswith("data: ")]  # the running stream is not blocked
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"]
        wait_for(lambda: "health" in seen, "the method is being built")
        assert seen == {"active": 0, "health": 200}
        release.set()
        newcomer.join(120)
        assert results["r"].status_code == 200 and results["r"].json()["hasten"]["method"] == "probe-slow-build"
    finally:
        release.set()
        registry._REGISTRY.pop("probe-slow-build", None)
        probe._engine._drafters.pop("probe-slow-build", None)


def test_response_format_json_schema_streamed_or_not_is_valid_json(url):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    whole = chat(url, "Give a person as JSON.", max_tokens=120, response_format=fmt)
    assert whole.status_code == 200, whole.text
    assert whole.json()["choices"][0]["finish_reason"] == "stop"
    text = whole.json()["choices"][0]["message"]["content"]
    value = json.loads(text)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    body = {"messages": [{"role": "user", "content": "Give a person as JSON."}], "temperature": 0, "max_tokens": 120,
            "response_format": fmt, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        events = sse(r)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e != "[DONE]" and e["choices"])
    assert streamed == text
    anything = chat(url, "Give a person as JSON.", max_tokens=200, response_format={"type": "json_object"})
    if anything.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(anything.json()["choices"][0]["message"]["content"]), dict)
    assert anything.json()["choices"][0]["message"]["content"].lstrip().startswith("{")
