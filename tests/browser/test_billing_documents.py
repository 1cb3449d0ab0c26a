"""Billing offline, as a newcomer tries it: the embedded run (``manage.py runplatform``, what ``make run`` starts)
with no Stripe key, in headless Chromium. The demo developer sets the billing details, buys credits on the fake
Stripe's Checkout page, downloads the receipt PDF and reads it, then pays again with the card Checkout saved.

No database fixture: the run has its own SQLite file; everything is seen through the browser and the PDF.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from pypdf import PdfReader

from config.embedded_process import free_port
from tests.accounts.test_demo_and_run import REPO_ROOT, STOP_TIMEOUT_SECONDS, EmbeddedRun, embedded_env
from tests.browser.conftest import LAPTOP, TIMEOUT_MS, Tab, chromium_path
from tests.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RECEIPT_NUMBER = re.compile(r"GM-TEST-R-\d{6}")


@pytest.fixture
def embedded_run(tmp_path: Path) -> Iterator[EmbeddedRun]:
    """``make run`` on a fresh data directory, with its workers, and no STRIPE_SECRET_KEY in its environment."""
    port = free_port()
    env = {name: value for name, value in embedded_env(tmp_path).items() if not name.startswith("STRIPE_")}
    log = tmp_path / "runplatform.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runplatform", "--port", str(port), "--tls-port", "0"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    run = EmbeddedRun(process, port, tmp_path, log)
    try:
        run.wait_until_ready()
        yield run
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_SECONDS)


def pdf_text(content: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(content)).pages)


def download_receipt(page: Page, number: str) -> tuple[str, str]:
    """Clicks the receipt's link on the billing page; the downloaded file's name and its text."""
    with page.expect_download() as started:
        page.get_by_role("link", name=f"{number} (PDF)").click()
    download = started.value
    return download.suggested_filename, pdf_text(Path(download.path()).read_bytes())


def receipts_listed(page: Page) -> list[str]:
    """The receipt numbers in the billing page's payments table (none while it has no payment)."""
    table = page.get_by_test_id("payments")
    return RECEIPT_NUMBER.findall(table.inner_text()) if table.count() else []


def test_buying_credits_in_the_embedded_run_gives_a_receipt_pdf(embedded_run: EmbeddedRun) -> None:
    credentials = json.loads((embedded_run.data_dir / "demo_credentials.json").read_text())
    assert "Payments: TEST MODE, against a fake Stripe" in embedded_run.log_text()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path())
        context = browser.new_context(viewport=LAPTOP, accept_downloads=True, base_url=embedded_run.base_url)
        context.set_default_timeout(TIMEOUT_MS)
        tab = Tab(page=context.new_page(), test_name="buying_credits_offline")
        tab.watch()
        page = tab.page
        try:
            page.goto("/auth/login")
            page.fill("#id_username", credentials["developer_email"])
            page.fill("#id_password", credentials["developer_password"])
            page.locator("form [type=submit]").click()
            page.goto("/dashboard/billing")
            expect(page.get_by_test_id("test-mode")).to_contain_text("a fake Stripe running on this machine")
            tab.shot("billing-in-test-mode")

            details = page.get_by_test_id("billing-details")
            details.locator("#id_legal_name").fill("Pixel Forge Ltd")
            details.locator("#id_address").fill("1 High Street\nLondon EC1A 1AA\nUnited Kingdom")
            details.locator("#id_tax_id").fill("GB123456789")
            details.get_by_role("button", name="Save").click()
            expect(page.locator(".messages")).to_contain_text("Billing details saved")

            # Checkout: the fake's own page, in test mode, pays with the test card and sends the payer back.
            page.fill("#id_amount_dollars", "20")
            page.get_by_role("button", name=re.compile("Pay on Stripe Checkout")).click()
            page.wait_for_url(re.compile(r"/checkout/cs_test_\w+$"))
            expect(page.get_by_test_id("test-mode")).to_contain_text("No real money moves")
            tab.shot("fake-checkout")
            page.get_by_role("button", name="Pay $20.00").click()
            page.wait_for_url(re.compile(r"/dashboard/billing\?paid=1$"))
            expect(page.get_by_test_id("paid")).to_be_visible()

            # The webhook reaches the run, its worker credits the payment and issues the receipt.
            def listed() -> list[str]:
                page.reload()
                return receipts_listed(page)

            [first] = wait_until(listed, timeout=60, message=lambda: f"a receipt\n{embedded_run.log_text()[-3000:]}")
            tab.shot("receipt-listed")
            filename, text = download_receipt(page, first)
            assert filename == f"receipt-{first}.pdf"
            for expected in (
                "Receipt",
                first,
                "TEST MODE",
                "$20.00",
                "Prepaid credits",
                "Pixel Forge Ltd",
                "London EC1A 1AA",
                "Tax ID: GB123456789",
            ):
                assert expected in text, (expected, text)

            # The card Checkout saved: made the default, it pays at once, with a receipt of its own.
            page.get_by_role("button", name="Make default").click()
            expect(page.locator(".messages")).to_contain_text("Default card changed")
            page.fill("#id_amount_dollars", "7.50")
            page.get_by_role("button", name="Pay with my default card").click()
            expect(page.locator(".messages")).to_contain_text("Paid $7.50")
            numbers = receipts_listed(page)
            assert len(numbers) == 2
            second = next(number for number in numbers if number != first)
            assert int(second[-6:]) == int(first[-6:]) + 1  # the next number of the series
            tab.shot("second-receipt")
            _, text = download_receipt(page, second)
            assert "$7.50" in text
            assert second in text
        finally:
            context.close()
            browser.close()
    assert not tab.errors, tab.errors
