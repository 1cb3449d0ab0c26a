"""Billing a newcomer can try offline: the fake Stripe's Checkout page, the card it saves, and test mode said on
every page. (The embedded run that starts the fake is tested in tests/accounts/test_demo_and_run.py, and bought
from in a browser in tests/browser/test_billing_documents.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.test import Client

from accounts.models import User
from billing import stripe_events
from billing.models import Payment, PaymentStatus, Receipt
from billing.stripe_client import PaymentMode, payment_mode
from tests.billing.conftest import deliver
from tests.stripe_support import FakeStripe

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = {"mode": "checkout", "success_url": "http://app.test/billing?paid=1", "cancel_url": "http://app.test/no"}


@pytest.mark.parametrize(
    ("key", "fake", "mode"),
    [
        ("", False, PaymentMode.OFF),
        ("sk_test_abc", False, PaymentMode.TEST),
        ("rk_test_abc", False, PaymentMode.TEST),
        ("sk_live_abc", False, PaymentMode.LIVE),
        ("rk_live_abc", False, PaymentMode.LIVE),
        ("sk_test_fake_abc", True, PaymentMode.FAKE),
    ],
)
def test_the_payment_mode_follows_the_key(settings: Any, key: str, fake: bool, mode: str) -> None:
    settings.STRIPE_SECRET_KEY, settings.STRIPE_FAKE = key, fake
    assert payment_mode() == mode


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("key", "fake", "banner"),
    [
        ("sk_test_abc", False, "Test mode: payments go to Stripe in test mode (a test key)."),
        ("sk_test_fake_abc", True, "Test mode: payments go to a fake Stripe running on this machine"),
        ("sk_live_abc", False, None),
        ("", False, None),
    ],
)
def test_every_page_says_when_payments_are_test_mode(
    settings: Any, tenant: dict[str, Any], key: str, fake: bool, banner: str | None
) -> None:
    """The dashboard's pages, the API docs (drf-spectacular's Swagger page) and the admin console's (Django admin)."""
    settings.STRIPE_SECRET_KEY, settings.STRIPE_FAKE = key, fake
    client = Client()
    pages = {"/auth/login": client.get("/auth/login"), "/admin/login/": client.get("/admin/login/")}
    client.force_login(tenant["user"])
    for path in ("/dashboard/", "/dashboard/usage", "/v1/docs"):
        pages[path] = client.get(path)
    operator = Client()
    operator.force_login(User.objects.create_superuser(email="operator@example.com", password="operator password 1"))
    for path in ("/admin/", "/admin/billing/payment/", "/admin/inference/job/", "/admin/accounts/organization/"):
        pages[path] = operator.get(path)
    for path, response in pages.items():
        assert response.status_code == 200, path
        page = response.content.decode()
        if banner is None:
            assert 'data-testid="test-mode"' not in page, path
        else:
            assert page.count('data-testid="test-mode"') == 1, path
            assert banner in page, path
    assert 'id="swagger-ui"' in pages["/v1/docs"].content.decode()  # the banner above the docs, not instead
    assert "Select payment to view" in pages["/admin/billing/payment/"].content.decode()


def settings_of(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'platform'}",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "PLATFORM_DATA_DIR": str(tmp_path),
        "SECRET_KEY": "offline-demo-test-key",
        **variables,
    }
    show = "import django; django.setup(); from django.conf import settings; print(settings.CONTENT_SECURITY_POLICY)"
    return subprocess.run(
        [sys.executable, "-c", show], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_fake_is_refused_with_a_live_key_or_off_loopback(tmp_path: Path) -> None:
    fake = {"STRIPE_FAKE": "1", "STRIPE_API_BASE": "http://127.0.0.1:4242"}
    allowed = settings_of(tmp_path, STRIPE_SECRET_KEY="sk_test_fake_x", **fake)
    assert allowed.returncode == 0, allowed.stderr
    assert "'form-action': [\"'self'\", 'https://checkout.stripe.com', 'http://127.0.0.1:4242']" in allowed.stdout
    live = settings_of(tmp_path, STRIPE_SECRET_KEY="sk_live_x", **fake)
    assert live.returncode != 0
    assert "STRIPE_FAKE=1 with a live Stripe key" in live.stderr
    remote = settings_of(
        tmp_path, STRIPE_SECRET_KEY="sk_test_x", STRIPE_FAKE="1", STRIPE_API_BASE="https://api.stripe.com"
    )
    assert remote.returncode != 0
    assert "STRIPE_API_BASE on loopback" in remote.stderr
    plain = settings_of(tmp_path, STRIPE_SECRET_KEY="sk_test_x", STRIPE_API_BASE="http://127.0.0.1:4242")
    assert "127.0.0.1:4242" not in plain.stdout  # only the fake's own Checkout page is a place forms may go


@pytest.mark.django_db
def test_the_fakes_checkout_page_pays_saves_the_card_and_sends_the_payer_back(
    fake_stripe: FakeStripe, tenant: dict[str, Any], settings: Any
) -> None:
    settings.STRIPE_FAKE = True
    started = tenant["client"].post("/v1/billing/purchases", {"amount_cents": 2_500, **CHECKOUT}, format="json")
    assert started.status_code == 201, started.json()
    url = started.json()["checkout_url"]
    assert url.startswith(fake_stripe.url + "/checkout/cs_test_")
    # A page of the fake's own, reached with no API key, as a browser reaches Stripe's.
    page = httpx.get(url, timeout=10)
    assert page.status_code == 200
    assert "Test mode" in page.text
    assert "Pay $25.00" in page.text
    assert 'href="http://app.test/no"' in page.text
    paid = httpx.post(url, timeout=10)
    assert (paid.status_code, paid.headers["location"]) == (303, CHECKOUT["success_url"])
    assert "Paid" in httpx.get(url, timeout=10).text

    # Stripe's events, delivered and processed as the worker would: the credits, the receipt, the saved card.
    payment = Payment.objects.get(pk=started.json()["id"])
    for event in fake_stripe.events(payment.stripe_checkout_session_id, types=("checkout.session.completed",)):
        assert deliver(tenant["client"], event).status_code == 200
        stripe_events.process_event(event["id"])
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.SUCCEEDED
    receipt = Receipt.objects.get(payment=payment)
    assert (receipt.number, receipt.test_mode, receipt.amount_cents) == ("GM-TEST-R-000001", True, 2_500)
    [card] = tenant["client"].get("/v1/billing/payment-methods").json()["data"]
    assert (card["last4"], card["is_default"]) == ("4242", False)
    # Made the default, it pays at once and can top up automatically.
    assert tenant["client"].post(f"/v1/billing/payment-methods/{card['id']}/default").status_code == 200
    again = tenant["client"].post("/v1/billing/purchases", {"amount_cents": 1_000}, format="json")
    assert again.json()["status"] == "succeeded"
    top_up = {"enabled": True, "threshold_micros": 1_000_000, "amount_cents": 1_000}
    assert tenant["client"].put("/v1/billing/top-up", top_up, format="json").status_code == 200
