"""Real headless Chromium (Debian's package) driven by Playwright, for page tests.

`chromium_page()` yields a page plus the lists a test asserts on: console errors, page errors
and failed requests (a report or page that needs the network shows up in the last).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("Chromium is required under CI (apt-get install chromium) and was not found")
        pytest.skip("Chromium not installed (apt-get install chromium)")
    return path


@contextmanager
def chromium_page(viewport=(1280, 900)):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            problems = {"console": [], "page": [], "failed": []}
            page.on("console", lambda m: problems["console"].append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems["page"].append(str(e)))
            page.on("requestfailed", lambda r: problems["failed"].append(f"{r.url} ({r.failure})"))
            yield page, problems
        finally:
            browser.close()
