"""The one place the Stripe SDK is configured: a ``StripeClient`` built from settings.

``STRIPE_API_BASE`` points it somewhere other than Stripe (the tests' fake); every call that moves
money passes an idempotency key derived from our own rows (``idempotency("payment-12")``).
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import stripe
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from stripe import RequestOptions


def stripe_client() -> stripe.StripeClient:
    return _client(
        settings.STRIPE_SECRET_KEY,
        settings.STRIPE_API_BASE,
        settings.STRIPE_TIMEOUT_SECONDS,
        settings.STRIPE_MAX_NETWORK_RETRIES,
    )


@lru_cache(maxsize=4)
def _client(secret_key: str, api_base: str, timeout: int, retries: int) -> stripe.StripeClient:
    if not secret_key:
        raise ImproperlyConfigured("STRIPE_SECRET_KEY is not set: payments are off.")
    return stripe.StripeClient(
        secret_key,
        base_addresses={"api": api_base} if api_base else None,
        max_network_retries=retries,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


def payments_enabled() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


class PaymentMode:
    """Which Stripe the payments go to, as pages, receipts and statements say it."""

    LIVE = "live"  # a live key: real money
    TEST = "test"  # a test key: Stripe's test mode, test cards only
    FAKE = "fake"  # the fake Stripe the embedded run starts on loopback (config/fake_stripe.py)
    OFF = "off"  # no key: no card payments (credits are granted)


def payment_mode() -> str:
    """``PaymentMode`` of this deployment: from ``STRIPE_FAKE`` and the secret key's prefix (``sk_live_``/``rk_live_``
    is live; any other key is treated as test mode, so nothing unknown is ever labelled real money)."""
    key = settings.STRIPE_SECRET_KEY
    if not key:
        return PaymentMode.OFF
    if settings.STRIPE_FAKE:
        return PaymentMode.FAKE
    return PaymentMode.LIVE if key.startswith(("sk_live_", "rk_live_")) else PaymentMode.TEST


def is_test_mode() -> bool:
    """Payments here move no real money (Stripe's test mode or the fake)."""
    return payment_mode() in (PaymentMode.TEST, PaymentMode.FAKE)


def idempotency(key: str) -> RequestOptions:
    return {"idempotency_key": key}


# How far a signature's timestamp may lie from now, either way. The SDK refuses only old ones (replays); one
# from the future would stay "fresh" until then, so a signed delivery leaked today could be replayed for that long.
SIGNATURE_TOLERANCE_SECONDS = stripe.Webhook.DEFAULT_TOLERANCE


def construct_event(payload: bytes, signature: str) -> stripe.Event:
    """The event, if ``signature`` is Stripe's for ``payload`` and was made within the tolerance of now, before or
    after (raises ``SignatureVerificationError``)."""
    if not settings.STRIPE_WEBHOOK_SECRET:
        raise stripe.SignatureVerificationError("STRIPE_WEBHOOK_SECRET is not set.", signature)  # type: ignore[no-untyped-call]
    event = stripe.Webhook.construct_event(
        payload, signature, settings.STRIPE_WEBHOOK_SECRET, tolerance=SIGNATURE_TOLERANCE_SECONDS
    )
    # The timestamp the SDK has just verified: the first ``t=`` of the header, as it reads it.
    items = (part.partition("=") for part in signature.split(","))
    timestamp = next(int(value) for key, _, value in items if key == "t")
    if timestamp > time.time() + SIGNATURE_TOLERANCE_SECONDS:
        raise stripe.SignatureVerificationError(  # type: ignore[no-untyped-call]
            f"Timestamp is in the future, outside the tolerance zone ({timestamp}).", signature
        )
    return event


def field(stripe_object: Any, name: str) -> Any:
    """A field of a Stripe object (or plain dict), ``None`` when absent (Stripe objects are not dicts: no ``get``)."""
    if stripe_object is None or name not in stripe_object:
        return None
    return stripe_object[name]


def object_id(value: Any) -> str | None:
    """The id of an expandable field, whether Stripe sent the id or the object."""
    if value is None or isinstance(value, str):
        return value
    return str(value["id"])
