"""The audit console in a real browser (Chromium driven by Playwright) against the real server of
test_console.py: log in, open a flagged conversation, check the token colours and the latent popover,
follow a latent to its feature page, label the record and watch the summary change.

A screenshot of each page goes to $FEATUREWATCH_ARTIFACTS_DIR/console/ (default: test-artifacts/console/
at the repo root, ignored by git). Skipped, saying why, when Playwright or /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_console import Console, console  # noqa: F401  (the module-scoped server fixture)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def shots() -> Path:
    root = Path(os.environ.get("FEATUREWATCH_ARTIFACTS_DIR") or REPO / "test-artifacts")
    folder = root / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    p = ctx.new_page()
    p.set_default_timeout(15_000)
    try:
        yield p
    finally:
        ctx.close()


def summary_row(page: Page, base: str, detector: str) -> tuple[int, str]:
    """(reviewed, precision text) of one detector on the summary page."""
    page.goto(f"{base}/audit/summary")
    row = page.locator(f'tr[data-detector="{detector}"]')
    return int(row.locator("td.reviewed").inner_text()), row.locator("td.precision").inner_text()


def token_colours(page: Page) -> list[tuple[str, str]]:
    """(colour class, computed background colour) of each token of the conversation."""
    js = "els => els.map(e => [e.className.match(/s\\d+/)[0], getComputedStyle(e).backgroundColor])"
    return [tuple(x) for x in page.eval_on_selector_all("#tokens .tok", js)]


def test_review_a_flagged_conversation(console: Console, page: Page, shots: Path) -> None:  # noqa: F811
    base, rid = console.base, console.ids["acme"][1]
    page.goto(f"{base}/audit")
    expect(page).to_have_url(re.compile(r"/audit/login\?next=/audit$"))
    page.screenshot(path=shots / "login.png")
    page.fill("#key", console.keys["reviewer_acme"])
    page.click("form[action='/audit/login'] button[type=submit]")
    expect(page).to_have_url(f"{base}/audit")
    expect(page.locator(f'a[href="/audit/records/{rid}"]')).to_be_visible()
    assert console.ids["globex"][0] not in page.content()
    page.screenshot(path=shots / "list.png", full_page=True)
    reviewed_before, _ = summary_row(page, base, "always")

    # The conversation: choosing a detector re-colours the tokens (console.js submits the picker).
    page.goto(f"{base}/audit/records/{rid}")
    page.select_option("#detector-select", "never")
    expect(page).to_have_url(re.compile(r"detector=never"))
    assert {c for c, _ in token_colours(page)} == {"s0"}
    low = token_colours(page)[0][1]
    page.select_option("#detector-select", "always")
    expect(page).to_have_url(re.compile(r"detector=always"))
    assert {c for c, _ in token_colours(page)} == {"s10"} and token_colours(page)[0][1] != low
    page.select_option("#detector-select", "varied")
    expect(page).to_have_url(re.compile(r"detector=varied"))
    colours = token_colours(page)
    by_bucket: dict[str, set[str]] = {}
    for cls, bg in colours:
        by_bucket.setdefault(cls, set()).add(bg)
    assert len(by_bucket) >= 2, f"the varied detector's tokens fell in one colour step: {colours}"
    assert all(len(bgs) == 1 for bgs in by_bucket.values())  # one colour per step
    assert len({next(iter(b)) for b in by_bucket.values()}) == len(by_bucket)  # different steps differ

    # Hover (and keyboard focus) shows the token's top latents, each linking to its feature page.
    first = page.locator("#tokens .tok").first
    expect(first.locator(".pop")).to_be_hidden()
    first.hover()
    pop = first.locator(".pop")
    expect(pop).to_be_visible()
    expect(pop.locator("a.latent").first).to_contain_text("#")
    expect(pop.locator(".pop-why")).to_contain_text("latents pushing pushy up")
    page.screenshot(path=shots / "conversation.png", full_page=True)
    page.mouse.move(0, 0)
    page.focus("#tokens .tok >> nth=1")
    expect(page.locator("#tokens .tok").nth(1).locator(".pop")).to_be_visible()

    first.hover()
    link = pop.locator("a.latent").first
    latent = (link.get_attribute("href") or "").rsplit("/", 1)[-1]
    link.click()
    expect(page).to_have_url(f"{base}/audit/features/{latent}")
    expect(page.locator("h1")).to_have_text(f"Latent #{latent}")
    expect(page.locator(".neighbours a").first).to_be_visible()
    page.screenshot(path=shots / "feature.png", full_page=True)

    # Label it; the history and the summary change.
    page.goto(f"{base}/audit/records/{rid}")
    page.check("input[name=verdict][value=tp]")
    page.fill("#comment", "a real one")
    page.click(".review-form button[type=submit]")
    expect(page.locator(".history li").first).to_contain_text("tp by rita")
    expect(page.locator(".history li").first).to_contain_text("a real one")
    reviewed_after, precision = summary_row(page, base, "always")
    assert reviewed_after == reviewed_before + 1 and precision == "100%"
    expect(page.locator('tr[data-detector="always"] svg.chart')).to_be_visible()
    page.screenshot(path=shots / "summary.png", full_page=True)


def test_replay_and_logout(console: Console, page: Page, shots: Path) -> None:  # noqa: F811
    base = console.base
    page.goto(f"{base}/audit/login")
    page.fill("#key", console.keys["admin"])
    page.click("form[action='/audit/login'] button[type=submit]")
    expect(page).to_have_url(f"{base}/audit")
    page.goto(f"{base}/audit/replay")
    draft = page.input_value("#policy").replace("action: flag", "action: block")
    page.fill("#policy", draft)
    page.click("form.replay button[type=submit]")
    expect(page.locator("table.counts")).to_be_visible()
    expect(page.locator("tr.changed").first).to_be_visible()
    page.screenshot(path=shots / "replay.png", full_page=True)
    page.click("header form[action='/audit/logout'] button")
    expect(page).to_have_url(f"{base}/audit/login")
    page.goto(f"{base}/audit")
    expect(page).to_have_url(re.compile(r"/audit/login"))
