"""`hasten serve --replicas 2`: two replicas behind Ray Serve's router on a local Ray instance, on loopback."""
import concurrent.futures
import subprocess
import time

import httpx
import pytest

from tests.serve.test_server import start, stop

pytestmark = pytest.mark.integration
openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")

PROMPTS = ["Name three colors.", "What is 2 + 2?", "Say hello in French.", "Name a large animal."]


@pytest.fixture(scope="module")
def replicas():
    proc, url = start("--replicas", "2", "--threads", "1")
    yield proc, url
    stop(proc)


def test_two_replicas_answer_and_both_serve(replicas, steady_engine):
    _, url = replicas
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def ask(i):
        prompt, stream = PROMPTS[i % len(PROMPTS)], i % 2 == 0
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            r = client.chat.completions.create(model=steady_engine.name, messages=messages, max_tokens=12,
                                               temperature=0)
            return prompt, r.choices[0].message.content, r.model_extra["hasten"]["pid"]
        parts = list(client.chat.completions.create(model=steady_engine.name, messages=messages, max_tokens=12,
                                                    temperature=0, stream=True))
        return prompt, "".join(c.choices[0].delta.content or "" for c in parts if c.choices), None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(24)))
    assert len({pid for *_, pid in answers if pid}) == 2, "Ray's router should reach both replicas under load"
    # whichever replica served it, streamed or not, an answer is the engine's own answer alone
    solo = {p: steady_engine.generate([{"role": "user", "content": p}], max_new_tokens=12).text for p in PROMPTS}
    assert all(text == solo[prompt] for prompt, text, _ in answers)


def test_sigterm_shuts_the_replicas_and_ray_down(replicas):
    proc, url = replicas
    stop(proc)
    assert proc.returncode is not None
    deadline = time.time() + 60
    while time.time() < deadline:
        left = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout
        if not left.strip():
            break
        time.sleep(1)
    assert not left.strip(), "the local Ray instance outlived hasten serve"
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)


def test_ray_cli_builder_names_unknown_options():
    from hasten.serve import ray_serve
    with pytest.raises(ValueError, match="unknown option.*bogus"):
        ray_serve.build_app({"bogus": "1"})
    with pytest.raises(ValueError, match="replicas must be"):
        ray_serve.build_app({"replicas": "0"})
