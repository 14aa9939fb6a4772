"""Debian's headless chromium driven by playwright, for tests that use the dashboard as a
person does.

No browser is ever downloaded: the chromium is the machine's own (``chromium`` on
PATH, or the file named by ``TRAPLINE_TEST_CHROMIUM``), and playwright only drives it
(never ``playwright install``). Without one the browser tests skip, saying why, unless
``TRAPLINE_TEST_REQUIRE_BROWSER=1`` (CI sets it): then they fail, so that CI cannot
go green having never opened the page.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

CHROMIUM_ENV = "TRAPLINE_TEST_CHROMIUM"
REQUIRE_ENV = "TRAPLINE_TEST_REQUIRE_BROWSER"

# Chromium logs every failed HTTP request (a 401, a reset connection) as a console
# error; those are the network's doing, not the page's, and tests that cause them on
# purpose check what the page shows instead.
_NETWORK_LOG_PREFIX = "Failed to load resource:"

# How long a page action or an expect() waits for the page before failing: generous for
# a shared 2-core machine, and only ever reached when the page is wrong.
PAGE_TIMEOUT_MS = 10_000
expect.set_options(timeout=PAGE_TIMEOUT_MS)


def browser_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def chromium_path() -> Path | None:
    """The chromium to drive: ``$TRAPLINE_TEST_CHROMIUM`` if set, else ``chromium`` on PATH."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        found = shutil.which(named)
        return Path(found) if found else None
    found = shutil.which("chromium")
    return Path(found) if found else None


def chromium_or_skip() -> Path:
    """The chromium path; otherwise skip the test, or fail it when CI requires a browser."""
    path = chromium_path()
    if path is not None:
        return path
    named = os.environ.get(CHROMIUM_ENV)
    why = (
        f"{CHROMIUM_ENV}={named!r} is not an executable"
        if named
        else f"no `chromium` on PATH (install Debian's chromium, or set {CHROMIUM_ENV})"
    )
    if browser_required():
        pytest.fail(f"{REQUIRE_ENV} is set but {why}", pytrace=False)
    pytest.skip(f"dashboard browser tests need a chromium: {why}")


@asynccontextmanager
async def launch_chromium(executable: Path) -> AsyncIterator[Browser]:
    """A headless chromium at ``executable`` (playwright adds --no-sandbox, so root works)."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class WatchedPage:
    """A page in a fresh browser context, with what went wrong in its scripts."""

    page: Page
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    network_errors: list[str] = field(default_factory=list)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        if message.text.startswith(_NETWORK_LOG_PREFIX):
            self.network_errors.append(f"{message.text} ({message.location.get('url', '')})")
        else:
            self.console_errors.append(message.text)

    @property
    def js_errors(self) -> list[str]:
        """Uncaught exceptions and console errors of the page's own scripts."""
        return [*self.page_errors, *self.console_errors]

    def assert_no_js_errors(self) -> None:
        assert self.js_errors == [], f"the page's scripts reported errors: {self.js_errors}"


@asynccontextmanager
async def watched_page(browser: Browser) -> AsyncIterator[WatchedPage]:
    """A new page with its own storage (no token left over from another test)."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        page = await context.new_page()
        watched = WatchedPage(page)
        page.on("console", watched._on_console)
        page.on("pageerror", lambda error: watched.page_errors.append(str(error)))
        yield watched
    finally:
        await context.close()
