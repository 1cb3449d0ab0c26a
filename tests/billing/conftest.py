"""Stripe for the billing tests: localstripe (extended by ``fake_stripe.py``) on a loopback port, the SDK
pointed at it, and webhook deliveries signed with the SDK's own scheme."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

from tests.stripe_support import (
    PUBLISHABLE_KEY,
    SECRET_KEY,
    WEBHOOK_PATH,
    WEBHOOK_SECRET,
    FakeStripe,
    running_fake_stripe,
)


@pytest.fixture(scope="session")
def fake_stripe_server() -> Iterator[FakeStripe]:
    with running_fake_stripe() as fake:
        yield fake


@pytest.fixture
def fake_stripe(fake_stripe_server: FakeStripe, settings: Any) -> FakeStripe:
    """Payments on, against the fake Stripe, each test as its own Stripe account."""
    # The fake scopes idempotency keys to the API key, as Stripe does, and ours (payment-<id>) repeat from one
    # test to the next wherever the test database hands out the same ids again (SQLite rolls its counters back).
    settings.STRIPE_SECRET_KEY = f"{SECRET_KEY}_{uuid.uuid4().hex}"
    settings.STRIPE_PUBLISHABLE_KEY = PUBLISHABLE_KEY
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = fake_stripe_server.url
    return fake_stripe_server


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> tuple[str, str]:
    """The body and the ``Stripe-Signature`` header Stripe would send for ``event``."""
    payload = json.dumps(event)
    return payload, stripe.WebhookSignature.generate_signature_header(payload, secret)


def deliver(client: Any, event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> Any:
    """Posts ``event`` to our webhook endpoint as Stripe does (Django's test client)."""
    payload, signature = signed(event, secret)
    return client.post(WEBHOOK_PATH, data=payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=signature)


@pytest.fixture
def quiet_books(priced_without_broker: None, settings: Any) -> None:
    """Jobs dispatched with no broker, the opening rate card in force, Stripe off (reconciliation skips it)."""
    settings.STRIPE_SECRET_KEY = ""
