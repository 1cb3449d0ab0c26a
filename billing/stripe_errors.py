"""Stripe's errors as ours: ``PaymentError``, with the status and ``error_type`` the API answers.

Each function that calls Stripe for a request runs under ``catch_stripe_errors`` (as a decorator, or around the
one call whose failure it handles), so an SDK error leaves it as a ``PaymentError``: a decline 402
``card_declined``, Stripe unreachable 503 ``payment_provider_unavailable``, any other refusal 400
``payment_refused``, and a key Stripe is still settling 409 ``payment_in_progress`` (``PaymentInProgress``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import stripe

from billing.ledger import BillingError
from billing.stripe_client import object_id

logger = logging.getLogger(__name__)


class PaymentError(BillingError):
    """Stripe declined, refused or could not be reached; ``status_code`` and ``error_type`` are the API's answer.

    ``refused``: Stripe answered no, so nothing was charged (an unreachable Stripe leaves the outcome unknown).
    ``payment_intent_id``: the PaymentIntent Stripe's refusal names, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str,
        status_code: int,
        refused: bool = False,
        payment_intent_id: str | None = None,
    ) -> None:
        super().__init__(message, error_type=error_type, status_code=status_code)
        self.refused = refused
        self.payment_intent_id = payment_intent_id


class PaymentInProgress(PaymentError):
    """Stripe has seen this idempotency key (``idempotency_error``): an earlier send of the same request made
    something, or is making it. Not a refusal: the outcome is that earlier send's."""

    def __init__(self) -> None:
        super().__init__(
            "The payment provider is still settling an earlier attempt of this payment; try again shortly.",
            error_type="payment_in_progress",
            status_code=409,
        )


def payment_error(exc: stripe.StripeError) -> PaymentError:
    """The API's answer to an error of Stripe's SDK.

    A 409 is Stripe's answer to a request whose idempotency key another request is still executing (a re-send that
    overlaps the first send's retries): the SDK raises it as a plain ``APIError`` unless Stripe typed it
    ``idempotency_error``. Never a refusal: the first send may still charge the card."""
    if isinstance(exc, stripe.IdempotencyError) or exc.http_status == 409:
        return PaymentInProgress()
    intent_id = object_id(exc.error.payment_intent) if exc.error is not None else None
    if isinstance(exc, stripe.CardError):
        return PaymentError(
            exc.user_message or "Your card was declined.",
            error_type="card_declined",
            status_code=402,
            refused=True,
            payment_intent_id=intent_id,
        )
    if (
        isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError | stripe.AuthenticationError)
        or (exc.http_status or 0) >= 500
    ):
        logger.warning("Stripe unavailable: %s", exc)
        return PaymentError(
            "The payment provider could not be reached; try again shortly.",
            error_type="payment_provider_unavailable",
            status_code=503,
        )
    return PaymentError(
        exc.user_message or "The payment provider refused the request.",
        error_type="payment_refused",
        status_code=400,
        refused=True,
        payment_intent_id=intent_id,
    )


@contextmanager
def catch_stripe_errors() -> Iterator[None]:
    """Turns an error of Stripe's SDK raised inside into ``PaymentError`` (the SDK's error is its cause)."""
    try:
        yield
    except stripe.StripeError as exc:
        raise payment_error(exc) from exc
