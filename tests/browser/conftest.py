"""The dashboard in real headless Chromium: Debian's ``chromium`` (``make browser`` installs it), driven by
Playwright, against the e2e stack (the HTTPS server and real workers, tests/e2e/conftest.py).

Playwright's sync API keeps an event loop running on this thread while it is open, and Django refuses
ORM calls under a running loop. So each test opens its own Playwright after its database fixtures
(ask for them before ``browser``) and closes it before they are torn down; the test body itself uses
the browser and HTTP, and reads the database only through ``off_the_loop``. A launch costs about a second.

Every page a test looks at is saved as a full-page screenshot under var/screenshots/, named
``<test>-<nn>-<what>-<width>.png``; the run prints the folder.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import pytest
from django.db import connection
from playwright.sync_api import Browser, BrowserContext, Page, ViewportSize, sync_playwright

from tests.e2e.conftest import BASE_URL, REPO
from tests.waiting import wait_until

SCREENSHOTS = REPO / "var" / "screenshots"
LAPTOP: ViewportSize = {"width": 1366, "height": 768}
PHONE: ViewportSize = {"width": 390, "height": 844}
TIMEOUT_MS = 30_000

T = TypeVar("T")


def wait_in_page(page: Page, expression: str, arg: Any = None, timeout_ms: int = TIMEOUT_MS) -> None:
    """Waits until ``expression`` (a JavaScript expression or function, as ``page.evaluate`` takes it) is truthy.

    Not Playwright's ``wait_for_function``: its predicate runs through ``eval`` inside the page, which the pages'
    Content-Security-Policy refuses (no 'unsafe-eval'); ``evaluate`` goes through the DevTools protocol.
    """
    wait_until(
        lambda: page.evaluate(expression, arg), timeout=timeout_ms / 1000, message=f"the page to say: {expression}"
    )


def off_the_loop(function: Callable[[], T]) -> T:
    """Calls ``function`` on a thread of its own, where the ORM works while Playwright's loop runs on this one."""

    def call() -> T:
        try:
            return function()
        finally:
            connection.close()  # the thread's own connection

    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(call).result()


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is not installed (/usr/bin/chromium): `make browser` installs it.")
    return path


def _clear_screenshots() -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink(missing_ok=True)


_cleared = False
_taken: list[Path] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _taken:
        terminalreporter.write_line(f"browser screenshots: {len(_taken)} in {SCREENSHOTS}")


@dataclass
class Tab:
    """One page of a browser context, with what went wrong in it and a screenshot helper."""

    page: Page
    test_name: str
    errors: list[str] = field(default_factory=list)
    shots: int = 0

    def open(self, path: str) -> Page:
        response = self.page.goto(BASE_URL + path)
        assert response is not None
        assert response.ok, f"{path}: HTTP {response.status}"
        return self.page

    @property
    def width(self) -> int:
        size = self.page.viewport_size
        assert size is not None
        return int(size["width"])

    def shot(self, what: str) -> Path:
        self.shots += 1
        path = SCREENSHOTS / f"{self.test_name}-{self.shots:02d}-{what}-{self.width}.png"
        self.page.screenshot(path=str(path), full_page=True)
        _taken.append(path)
        return path

    def scrolls_sideways(self) -> bool:
        return bool(self.page.evaluate("document.scrollingElement.scrollWidth > window.innerWidth + 1"))

    def watch(self) -> None:
        def on_console(message: Any) -> None:
            source = message.location.get("url") or self.page.url
            # Chromium asks every site for /favicon.ico on its own; the admin's pages name no icon.
            if message.type == "error" and not source.endswith("/favicon.ico"):
                self.errors.append(f"console error from {source}: {message.text}")

        self.page.on("console", on_console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error on {self.page.url}: {error}"))


@pytest.fixture
def browser(stack: Any, seeded: None) -> Iterator[Browser]:
    global _cleared
    if not _cleared:  # this run's screenshots only
        _clear_screenshots()
        _cleared = True
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path())
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def open_tab(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[..., Tab]]:
    """Opens a tab in a fresh context (its own cookies) at a viewport; fails the test on any console error."""
    contexts: list[BrowserContext] = []
    tabs: list[Tab] = []
    test_name = request.node.name.removeprefix("test_")[:60]

    def open_one(viewport: ViewportSize = LAPTOP) -> Tab:
        context = browser.new_context(viewport=viewport, ignore_https_errors=True, base_url=BASE_URL)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        tab = Tab(page=context.new_page(), test_name=test_name)
        tab.watch()
        tabs.append(tab)
        return tab

    yield open_one
    for context in contexts:
        context.close()
    errors = [error for tab in tabs for error in tab.errors]
    assert not errors, "\n".join(errors)


@pytest.fixture
def seeded(transactional_db: None) -> None:
    """The built-in endpoints and the opening prices (a transactional test before this one emptied the tables)."""
    from billing.models import Price
    from billing.rates import ensure_media_prices, ensure_opening_prices
    from inference.catalog import ensure_builtin_endpoints
    from inference.models import Endpoint

    ensure_builtin_endpoints(Endpoint)
    ensure_opening_prices(Price)
    ensure_media_prices(Price, Endpoint)


def dollars(text: str) -> Decimal:
    """$1,234.50 or -$0.000123 as a Decimal."""
    match = re.search(r"(-?)\$([\d,]+(?:\.\d+)?)", text)
    assert match, f"no dollar amount in {text!r}"
    return Decimal(match[1] + match[2].replace(",", ""))
