"""The chat page in headless Chromium (Debian's chromium, driven by Playwright): it streams an answer."""
import shutil

import pytest

from tests.serve.test_server import start, stop

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make setup` installs it as root)")
def test_chat_page_streams_an_answer():
    sync_api = pytest.importorskip("playwright.sync_api")
    # One event per step (no coalescing) and one token per step, so the page must render many chunks.
    proc, url = start("--method", "baseline", "--stream-interval", "0")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.fill("#input", "Repeat after me: the quick brown fox jumps over the lazy dog.")
            page.click("#send")
            page.wait_for_selector('.assistant[data-state="done"]', timeout=120_000)
            answer = page.inner_text(".assistant")
            assert len(answer.strip()) > 10
            assert page.locator(".assistant .token").count() > 3  # arrived in several streamed chunks
            assert "tokens/s" in page.inner_text("#stats")
            assert not errors
            browser.close()
    finally:
        stop(proc)
