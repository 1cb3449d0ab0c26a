"""What every page of the site is told, whoever looks: whether payments here move real money."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from billing.stripe_client import PaymentMode
from billing.stripe_client import payment_mode as current_payment_mode

NOTICES = {
    PaymentMode.TEST: "Test mode: payments go to Stripe in test mode (a test key). Only test cards work; no real "
    "money moves.",
    PaymentMode.FAKE: "Test mode: payments go to a fake Stripe running on this machine (localstripe). "
    "Nothing leaves it and no real money moves.",
}


def payment_mode(request: HttpRequest) -> dict[str, Any]:
    mode = current_payment_mode()
    return {"payment_mode": mode, "test_mode_notice": NOTICES.get(mode, "")}
