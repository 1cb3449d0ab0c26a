"""The dashboard as a person uses it, in headless Chromium against the running platform:
a developer signs up, makes a key, runs a model in the playground and finds it in the history, the
usage and the bill; the same pages at a phone's width; an operator opens the run-rate page.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC
from decimal import Decimal
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import LAPTOP, PHONE, TIMEOUT_MS, Tab, dollars, off_the_loop, wait_in_page
from tests.conftest import TEST_PASSWORD
from tests.e2e.conftest import BASE_URL, Stack
from tests.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

APP = "platform/tiny-sd"
# The API calls only need to exist: the least work the model does.
QUICK = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
PAGES = {
    "overview": "/dashboard/",
    "playground": "/dashboard/playground",
    "requests": "/dashboard/requests",
    "usage": "/dashboard/usage",
    "keys": "/dashboard/keys",
    "members": "/dashboard/members",
    "billing": "/dashboard/billing",
}


def with_password(user: Any) -> Any:
    """The server hashes with the production hasher; the suite's fast one (tests/conftest.py) would not verify there."""
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    hasher = PBKDF2PasswordHasher()
    user.password = hasher.encode(TEST_PASSWORD, hasher.salt())
    user.save(update_fields=["password"])
    return user


@pytest.fixture
def developer(seeded: None) -> dict[str, Any]:
    """Someone who can log in, with an inference key of their organization."""
    from accounts.models import Organization, Scope
    from accounts.services import create_api_key, sign_up

    user = with_password(sign_up(email=f"developer-{uuid.uuid4().hex[:8]}@example.com", password=None))
    organization = Organization.objects.get(memberships__user=user)
    _, key = create_api_key(organization=organization, name="program key", scopes=[Scope.INFERENCE], created_by=user)
    return {"email": user.email, "key": key}


@pytest.fixture
def operator(seeded: None) -> str:
    from accounts.models import User

    user = User.objects.create_superuser(email=f"ops-{uuid.uuid4().hex[:8]}@example.com")
    return str(with_password(user).email)


def run_with_key(stack: Stack, key: str) -> str:
    """One request through the sync API, as a program would make it."""
    with stack.client(key) as api:
        response = api.post(f"/run/{APP}", json=QUICK)
    assert response.status_code == 200, response.text
    return str(response.headers["x-fal-request-id"])


def requests_per_day(email: str) -> Counter[str]:
    """The billed requests of the user's organization by the UTC day they were recorded on."""
    from billing.models import UsageRecord

    records = UsageRecord.objects.filter(organization__memberships__user__email=email, billable=True)
    return Counter(
        f"{recorded_at.astimezone(UTC):%Y-%m-%d}" for recorded_at in records.values_list("recorded_at", flat=True)
    )


def side_link(page: Page, name: str) -> Any:
    return page.locator("nav.side").get_by_role("link", name=name, exact=True)


def loaded(page: Page, images: Any) -> None:
    """Every image of the locator finished loading and decoded to something."""
    assert images.count() > 0
    for n in range(images.count()):
        images.nth(n).scroll_into_view_if_needed()
        wait_in_page(page, "img => img.complete && img.naturalWidth > 0", images.nth(n).element_handle())


def emailed_link(stack: Stack, to: str, path: str) -> str:
    """The path of the link to ``path`` in the last email sent to ``to``: the server's console email backend
    writes its emails to the server's log."""

    def link_in_log() -> str | None:
        log = stack.logs["web"].read_text(errors="replace")
        sent = log.rfind(f"To: {to}")
        link = re.search(rf"https?://[^/\s]+({re.escape(path)}\S+)", log[sent:]) if sent >= 0 else None
        return link.group(1) if link else None

    return wait_until(link_in_log, timeout=10, message=f"an email to {to} with a link to {path} in the server's log")


def log_in(tab: Tab, email: str, path: str = "/auth/login") -> None:
    page = tab.open(path)
    page.fill("#id_username", email)
    page.fill("#id_password", TEST_PASSWORD)
    tab.shot("log-in")
    page.locator("form [type=submit]").click()


# Records every text of the status line and every value of the progress bar, however fast they change.
WATCH_PROGRESS = """() => {
  window.progressSeen = [];
  const status = document.getElementById("run-status");
  const bar = document.querySelector("#run-state .progress");
  const note = () => window.progressSeen.push({text: status.textContent, value: bar.getAttribute("aria-valuenow")});
  new MutationObserver(note).observe(status, {childList: true, characterData: true, subtree: true});
  new MutationObserver(note).observe(bar, {attributes: true, attributeFilter: ["aria-valuenow"]});
}"""

# A chart was drawn: Chart.js loaded, it owns the canvas, and the canvas has painted pixels.
CHART_DRAWN = """canvas => {
  if (!window.Chart || !window.Chart.getChart(canvas) || !canvas.width || !canvas.height) return false;
  const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < pixels.length; i += 4) if (pixels[i] !== 0) return true;
  return false;
}"""


def between_steps_or_final(request_id: str) -> Any:
    """The job, once it has reported a step before its last one or has finished; None before."""
    from inference.models import Job

    job = Job.objects.get(pk=request_id)
    return job if job.is_final or 0 < job.progress_step < job.progress_total else None


def intermediate_progress(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    between = []
    for state in seen:
        step = re.fullmatch(r"Step (\d+) of (\d+)", state["text"] or "")
        value = int(state["value"] or 0)
        if (step and 0 < int(step[1]) < int(step[2])) or 0 < value < 100:
            between.append(state)
    return between


def test_a_developer_signs_up_runs_a_model_and_finds_it_in_history_usage_and_billing(
    seeded: None, stack: Stack, open_tab: Callable[..., Tab]
) -> None:
    tab = open_tab(LAPTOP)
    page = tab.page

    # Sign up through the form, then the emailed link: a password, and straight to the overview with the free credits.
    email = f"dev-{uuid.uuid4().hex[:8]}@example.com"
    tab.open("/auth/signup")
    page.fill("#id_email", email)
    tab.shot("sign-up")
    page.get_by_role("button", name="Sign up").click()
    page.wait_for_url(f"{BASE_URL}/auth/signup/sent")
    expect(page.get_by_role("heading", name="Check your email")).to_be_visible()
    tab.open(emailed_link(stack, email, "/auth/signup/confirm/"))
    page.fill("#id_password", TEST_PASSWORD)
    tab.shot("choose-password")
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url(f"{BASE_URL}/dashboard/")
    free = dollars(page.get_by_test_id("available").inner_text())
    assert free > 0
    expect(page.get_by_text("No requests yet.")).to_be_visible()
    tab.shot("overview")

    # A key: its secret shown once, with a copy button that copies it.
    side_link(page, "API keys").click()
    page.fill("#id_name", "browser key")
    page.get_by_role("button", name="Create key").click()
    secret = page.get_by_test_id("new-key").inner_text().strip()
    assert len(secret) > 20
    copy = page.locator("button[data-copy='#new-key']")
    expect(copy).to_be_visible()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=BASE_URL)
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    tab.shot("key-created")
    tab.open("/dashboard/keys")
    expect(page.get_by_test_id("new-key")).to_have_count(0)
    expect(page.get_by_role("cell", name="browser key", exact=True)).to_be_visible()
    assert secret not in page.content()

    # A program uses the key once (the usage page shows it by key).
    api_request = run_with_key(stack, secret)

    # The playground: small settings, Run, and the bar moves through the steps.
    side_link(page, "Playground").click()
    page.select_option("#endpoint", APP)
    page.fill("#field-image_size", "64")
    page.fill("#field-image_size-height", "64")
    page.fill("#field-num_inference_steps", "50")
    page.fill("#field-prompt", "a red bicycle in the snow")
    page.evaluate(WATCH_PROGRESS)
    tab.shot("playground")
    with page.expect_response(lambda response: response.request.method == "POST") as submitted:
        page.get_by_role("button", name="Run").click()
    playground_job = submitted.value.json()["request_id"]

    def reported_a_step() -> Any:
        return wait_until(
            lambda: between_steps_or_final(playground_job),
            timeout=90,
            interval=0.01,
            message=f"the playground's request {playground_job} to report a step",
        )

    # The GPU worker is held still between two steps until the page has shown that step, however fast the machine
    # runs them (the status stream looks at the job every 0.1 s and could miss every step between).
    job = off_the_loop(reported_a_step)
    if not job.is_final:
        with stack.paused("gpu"):
            wait_until(
                lambda: intermediate_progress(page.evaluate("window.progressSeen")),
                timeout=TIMEOUT_MS / 1000,
                message=f"the bar to show step {job.progress_step} of {job.progress_total}",
            )
            tab.shot("playground-running")
    outcome = page.get_by_test_id("outcome")
    expect(outcome).to_be_visible(timeout=90_000)
    expect(outcome).to_have_attribute("data-status", "COMPLETED")
    expect(page.locator("#run-status")).to_have_text("Done")
    seen = page.evaluate("window.progressSeen")
    assert intermediate_progress(seen), f"the bar never showed a step in between: {seen}"
    loaded(page, outcome.locator(".gallery img"))
    gpu_seconds = float(outcome.get_by_test_id("gpu-time").inner_text().removesuffix(" s").replace(",", ""))
    assert gpu_seconds > 0
    cost_text = outcome.get_by_test_id("cost").inner_text()
    assert dollars(cost_text) > 0
    playground_request = outcome.locator("a code").inner_text().strip()
    tab.shot("playground-done")

    # The history: both requests, the playground's with its thumbnail and the same cost.
    side_link(page, "Requests").click()
    rows = page.locator("table.requests tbody tr")
    expect(rows).to_have_count(2)
    row = rows.filter(has=page.locator(f"a[href='/dashboard/requests/{playground_request}']"))
    expect(row).to_have_count(1)
    expect(row.locator("td[data-label=Status]")).to_have_text("Completed")
    expect(row.locator("td[data-label=Cost]")).to_have_text(cost_text)
    loaded(page, row.locator("td.thumb img"))
    expect(rows.filter(has=page.locator(f"a[href='/dashboard/requests/{api_request}']"))).to_have_count(1)
    tab.shot("requests")

    # Its page: the timeline, the image and the logs.
    row.get_by_role("link").click()
    page.wait_for_url(f"{BASE_URL}/dashboard/requests/{playground_request}")
    timeline = page.locator("ol.timeline")
    for event in ("Queued", "Dispatched", "Started", "Finished"):
        expect(timeline).to_contain_text(event)
    expect(page.locator("pre.logs")).not_to_have_text("No logs.")
    expect(page.get_by_test_id("cost")).to_contain_text(cost_text)
    loaded(page, page.locator(".gallery img"))
    tab.shot("request")

    # Usage: the chart drawn, and the same figures in tables (the day's row, or a row for each day when the requests
    # were recorded either side of midnight; the key by name).
    side_link(page, "Usage").click()
    chart = page.locator("#usage-chart")
    wait_in_page(page, CHART_DRAWN, chart.element_handle())
    days = off_the_loop(lambda: requests_per_day(email))
    assert sum(days.values()) == 2
    cost = Decimal(0)
    for recorded_on, requests in days.items():
        day = page.get_by_test_id("per-day").locator("tbody tr").filter(has_text=recorded_on)
        expect(day).to_have_count(1)
        expect(day.locator("td[data-label=Requests]")).to_have_text(str(requests))
        cost += dollars(day.locator("td[data-label=Cost]").inner_text())
    assert cost > dollars(cost_text)
    by_key = page.locator("h2:text-is('By key') + table tbody")
    expect(by_key.locator("tr").filter(has_text="browser key")).to_have_count(1)
    tab.shot("usage")

    # Billing: the usage debits in the ledger, and less credit than the free grant.
    side_link(page, "Billing").click()
    ledger = page.get_by_test_id("ledger")
    debits = ledger.locator("tbody tr").filter(has_text="Usage")
    expect(debits).to_have_count(2)
    for n in range(2):
        assert dollars(debits.nth(n).locator("td[data-label=Amount]").inner_text()) < 0
    assert dollars(page.get_by_test_id("available").inner_text()) < free
    tab.shot("billing")


def test_the_pages_fit_a_phone(developer: dict[str, Any], stack: Stack, open_tab: Callable[..., Tab]) -> None:
    request_id = run_with_key(stack, developer["key"])
    tab = open_tab(PHONE)
    page = tab.page
    log_in(tab, developer["email"])
    page.wait_for_url(f"{BASE_URL}/dashboard/")
    for name, path in [*PAGES.items(), ("request", f"/dashboard/requests/{request_id}")]:
        tab.open(path)
        if name == "usage":
            wait_in_page(page, CHART_DRAWN, page.locator("#usage-chart").element_handle())
        if name == "playground":
            expect(page.locator("#field-prompt")).to_be_visible()
        tab.shot(name)
        assert not tab.scrolls_sideways(), f"{path} scrolls sideways at {tab.width} px"
        # Every section is a tap away: the navigation is on screen, not off its right edge.
        for link in page.locator("nav.side a").all():
            expect(link).to_be_visible()
            box = link.bounding_box()
            assert box is not None
            assert box["x"] >= 0
            assert box["x"] + box["width"] <= tab.width, f"{link.inner_text()} is off screen on {path}"
    side_link(page, "Usage").click()
    page.wait_for_url(f"{BASE_URL}/dashboard/usage")


def test_an_operator_opens_the_run_rate_page(
    developer: dict[str, Any], operator: str, stack: Stack, open_tab: Callable[..., Tab]
) -> None:
    run_with_key(stack, developer["key"])  # some revenue to show
    tab = open_tab(LAPTOP)
    page = tab.page
    log_in(tab, operator, "/admin/login/?next=/admin/run-rate/")
    page.wait_for_url(f"{BASE_URL}/admin/run-rate/")
    for heading in ("Run-rate", "MRR"):
        title = page.get_by_role("heading", name=heading, exact=True)
        expect(title).to_be_visible()
        figure = title.locator("xpath=following-sibling::*[1]")
        assert dollars(figure.inner_text()) > 0, f"{heading}: {figure.inner_text()}"
    for canvas in page.locator("canvas").all():
        wait_in_page(page, CHART_DRAWN, canvas.element_handle())
    tab.shot("run-rate")
    page.set_viewport_size(PHONE)
    # Chart.js follows the new width on its next frame.
    wait_in_page(
        page,
        "[...document.querySelectorAll('canvas')].every(canvas => canvas.getBoundingClientRect().right <= innerWidth)",
    )
    tab.shot("run-rate")
