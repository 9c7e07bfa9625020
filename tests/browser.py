"""Debian's headless Chromium, driven by Playwright (the ``browser`` fixture in conftest).

A missing browser fails the page tests instead of skipping them: ``scripts/test.sh``
installs ``chromium``, and a suite that passed without the page would prove nothing about it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

from playwright.sync_api import Browser, sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed (bash scripts/test.sh installs it)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
