"""The one place the Stripe SDK is configured: a ``StripeClient`` built from settings.

``STRIPE_API_BASE`` points it somewhere other than Stripe (the tests' fake); every call that moves
money passes an idempotency key derived from our own rows (``idempotency("payment-12")``).
"""

from __future__ import annotations

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


def idempotency(key: str) -> RequestOptions:
    return {"idempotency_key": key}


def construct_event(payload: bytes, signature: str) -> stripe.Event:
    """The event, if ``signature`` is Stripe's for ``payload`` (raises ``SignatureVerificationError``)."""
    if not settings.STRIPE_WEBHOOK_SECRET:
        raise stripe.SignatureVerificationError("STRIPE_WEBHOOK_SECRET is not set.", signature)  # type: ignore[no-untyped-call]
    return stripe.Webhook.construct_event(payload, signature, settings.STRIPE_WEBHOOK_SECRET)


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
