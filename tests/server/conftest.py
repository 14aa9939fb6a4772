"""A real headless chromium for the dashboard tests (see tests/support/browser.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser

from tests.support.browser import WatchedPage, chromium_or_skip, launch_chromium, watched_page


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One chromium for the whole session; each test gets its own context and page."""
    async with launch_chromium(chromium_or_skip()) as running:
        yield running


@pytest.fixture
async def web(browser: Browser) -> AsyncIterator[WatchedPage]:
    """A fresh page (no storage shared with other tests) that records script errors."""
    async with watched_page(browser) as watched:
        yield watched
