"""Billing offline, as a newcomer tries it: the embedded run (``manage.py runplatform``, what ``make run`` starts)
with no Stripe key, in headless Chromium. The demo developer sets the billing details, buys credits on the fake
Stripe's Checkout page, downloads the receipt PDF and reads it, pays again with the card Checkout saved, turns auto
top-up on and spends below its threshold, and downloads the top-up's receipt; the API docs and the admin console say
test mode too.

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
SMALL_REQUEST = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
# The run's first request loads the model in its worker.
RUN_TIMEOUT_SECONDS = 180


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

            # Auto top-up, on at what is available now: one request takes the balance below it, and the run's worker
            # charges the default card on the fake Stripe, off-session, with a receipt of its own.
            available = page.get_by_test_id("available").inner_text()
            top_up = page.locator("form", has=page.get_by_role("heading", name="Auto top-up"))
            top_up.get_by_label("Top up automatically").check()
            top_up.get_by_label("When available falls below ($)").fill(available.lstrip("$").replace(",", ""))
            top_up.get_by_label("Buy ($)").fill("10")
            top_up.get_by_role("button", name="Save").click()
            expect(page.locator(".messages")).to_contain_text("Auto top-up settings saved")
            expect(page.get_by_test_id("available")).to_have_text(available)  # not below it yet: nothing charged
            assert "Auto top-up" not in page.get_by_test_id("payments").inner_text()
            tab.shot("auto-top-up-on")
            with embedded_run.api_client() as api:
                ran = api.post("/run/platform/tiny-sd", json=SMALL_REQUEST, timeout=RUN_TIMEOUT_SECONDS)
                assert ran.status_code == 200, ran.text
                assert ran.json()["usage"]["cost_micros"] > 0

            def topped_up() -> str | None:
                page.reload()
                row = page.get_by_test_id("payments").locator("tr", has_text="Auto top-up")
                found = RECEIPT_NUMBER.search(row.inner_text()) if row.count() else None
                return found.group(0) if found else None

            third = wait_until(
                topped_up, timeout=60, message=lambda: f"an auto top-up receipt\n{embedded_run.log_text()[-3000:]}"
            )
            assert int(third[-6:]) == int(second[-6:]) + 1
            tab.shot("auto-top-up-receipt")
            filename, text = download_receipt(page, third)
            assert filename == f"receipt-{third}.pdf"
            for expected in (third, "TEST MODE", "Prepaid credits (auto top-up)", "$10.00", "Pixel Forge Ltd"):
                assert expected in text, (expected, text)

            # The API docs and the admin console say test mode too.
            page.goto("/v1/docs")
            expect(page.get_by_test_id("test-mode")).to_contain_text("a fake Stripe running on this machine")
            expect(page.locator("#swagger-ui")).to_contain_text("Generative media platform API")
            tab.shot("api-docs-in-test-mode")
            page.goto("/admin/login/")
            expect(page.get_by_test_id("test-mode")).to_contain_text("a fake Stripe running on this machine")
            page.fill("#id_username", credentials["operator_email"])
            page.fill("#id_password", credentials["operator_password"])
            page.locator("form [type=submit]").click()
            page.goto("/admin/billing/payment/")
            expect(page.get_by_test_id("test-mode")).to_contain_text("a fake Stripe running on this machine")
            expect(page.locator("#result_list tbody tr")).to_have_count(3)
            tab.shot("admin-in-test-mode")
        finally:
            context.close()
            browser.close()
    assert not tab.errors, tab.errors
