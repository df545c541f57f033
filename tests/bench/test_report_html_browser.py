"""The HTML token view that `hasten report` writes, in headless Chromium (Debian's chromium via Playwright):
it renders without page or console errors and marks every token by where it came from."""
import shutil

import pytest

from hasten.bench import report
from tests.bench.test_report import result

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make setup` installs it as root)")
def test_token_view_renders_draft_and_bonus_marks(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    page_path = [p for p in report.write_all(result(), tmp_path) if p.suffix == ".html"][0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            runs = page.locator("section.run")
            assert runs.count() == 2  # round 0 of baseline and prompt-lookup
            # baseline: 4 target tokens; prompt-lookup: target, 2 accepted drafts, bonus
            assert page.locator("section.run .tok.src-target").count() == 6
            assert page.locator("section.run .tok.src-prompt-lookup").count() == 2
            assert page.locator("p .tok.src-prompt-lookup").count() == 1  # the legend
            drafted = page.locator("section.run .tok.src-prompt-lookup").first
            bonus = page.locator("section.run .tok.src-target").first
            assert drafted.get_attribute("title") == "prompt-lookup" and bonus.get_attribute("title") == "target"
            colour = drafted.evaluate("e => getComputedStyle(e).backgroundColor")
            assert colour == "rgb(183, 228, 199)"  # the first palette colour
            assert bonus.evaluate("e => getComputedStyle(e).backgroundColor") == "rgba(0, 0, 0, 0)"
            assert runs.nth(1).inner_text().count("<wor") == 1  # escaped text shows as text
            assert page.locator("section.run .steps i").count() == 6  # one bar per step: 4 + 2
            assert not errors, errors
        finally:
            browser.close()
