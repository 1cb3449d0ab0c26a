"""Stripe webhook signatures are accepted only within five minutes of now, in either direction: the SDK
refuses old ones (replays), and we refuse ones from the future, which would otherwise stay fresh until then."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import stripe
from django.test import Client

from billing.models import StripeEvent
from tests.stripe_support import WEBHOOK_PATH, WEBHOOK_SECRET

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _webhook_secret(settings: Any) -> None:
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET


def deliver_signed_at(timestamp: int, event_id: str) -> Any:
    """A delivery as Stripe signs it (the SDK's own scheme), with the signature's time set to ``timestamp``."""
    payload = json.dumps({"id": event_id, "object": "event", "type": "customer.updated", "data": {"object": {}}})
    signature = stripe.WebhookSignature.generate_signature_header(payload, WEBHOOK_SECRET, timestamp=timestamp)
    return Client().post(WEBHOOK_PATH, data=payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=signature)


@pytest.mark.parametrize("seconds_ahead", [3600, 6 * 60, 24 * 3600 * 365])
def test_a_signature_from_the_future_is_refused_and_nothing_is_stored(seconds_ahead: int) -> None:
    response = deliver_signed_at(int(time.time()) + seconds_ahead, "evt_from_the_future")
    assert response.status_code == 400
    assert response.json()["error_type"] == "invalid_signature"
    assert not StripeEvent.objects.exists()


@pytest.mark.parametrize("seconds_ahead", [0, 60, 4 * 60, -4 * 60])
def test_a_signature_within_five_minutes_of_now_is_accepted(seconds_ahead: int) -> None:
    # Clocks drift: a few minutes either way is Stripe's own tolerance.
    response = deliver_signed_at(int(time.time()) + seconds_ahead, f"evt_near_{seconds_ahead}")
    assert response.status_code == 200, response.content
    assert StripeEvent.objects.filter(pk=f"evt_near_{seconds_ahead}").exists()


def test_an_old_signature_is_still_refused() -> None:
    response = deliver_signed_at(int(time.time()) - 6 * 60, "evt_replayed")
    assert response.status_code == 400
    assert not StripeEvent.objects.exists()
