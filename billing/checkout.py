"""Buying credits through Stripe Checkout: a page of Stripe's where the payer pays; the webhook credits the ledger.

The payment row is committed before the Checkout Session is asked for, under the same idempotency key ``payment-<id>``
as a card charge (``billing.charges``, which holds what both ways of buying share); Stripe's state is applied by
``stripe_state.apply_checkout_session`` when the webhook or the sweep reports the session paid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accounts.models import Organization
from accounts.services import SYSTEM, Actor
from billing.cards import ensure_customer
from billing.charges import (
    check_amount,
    check_resendable,
    earlier_purchase,
    mark_failed,
    new_purchase,
    payment_metadata,
    purchase_fingerprint,
)
from billing.ledger import account_of
from billing.models import Payment
from billing.stripe_client import field, idempotency, stripe_client
from billing.stripe_errors import PaymentError, catch_stripe_errors


@dataclass(frozen=True)
class CheckoutStarted:
    """A purchase through Stripe Checkout: the page the payer is sent to (``None`` once it is closed)."""

    payment: Payment
    url: str | None
    replayed: bool = False


def start_checkout(
    *,
    organization: Organization,
    amount_cents: int,
    success_url: str,
    cancel_url: str,
    actor: Actor = SYSTEM,
    idempotency_key: str | None = None,
) -> CheckoutStarted:
    """A Stripe Checkout page that buys credits; the webhook credits the ledger when it is paid.

    With ``idempotency_key`` (the client's), a retry answers the page its first try opened, as ``buy_credits`` does.
    """
    check_amount(amount_cents)
    fingerprint = purchase_fingerprint("checkout", amount_cents, success_url, cancel_url)
    if idempotency_key:
        earlier = earlier_purchase(organization, idempotency_key, fingerprint)
        if earlier is not None:
            return _checkout_again(earlier, success_url=success_url, cancel_url=cancel_url)
    customer_id = ensure_customer(organization)
    payment, created = new_purchase(
        organization=organization,
        amount_cents=amount_cents,
        currency=account_of(organization).currency,
        created_by=actor.user,
        stripe_customer_id=customer_id,
        client_idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
    if not created:
        return _checkout_again(payment, success_url=success_url, cancel_url=cancel_url)
    return CheckoutStarted(payment=payment, url=_open_checkout(payment, success_url=success_url, cancel_url=cancel_url))


def _open_checkout(payment: Payment, *, success_url: str, cancel_url: str) -> str | None:
    """Sends the Checkout Session of ``payment`` to Stripe (built from the row and the client's URLs, so a re-send
    under the same key is the same request); answers the page's URL. A refusal marks the payment failed."""
    metadata = payment_metadata(payment)
    params: dict[str, Any] = {
        "mode": "payment",
        "customer": payment.stripe_customer_id,
        "client_reference_id": str(payment.pk),
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": payment.currency,
                    "unit_amount": payment.amount_cents,
                    "product_data": {"name": "Prepaid credits"},
                },
            }
        ],
        "success_url": success_url,
        "cancel_url": cancel_url,
        "metadata": metadata,
        # The card is kept on the customer, so it can be made the default for auto top-ups.
        "payment_intent_data": {"metadata": metadata, "setup_future_usage": "off_session"},
    }
    try:
        with catch_stripe_errors():
            session = stripe_client().v1.checkout.sessions.create(
                params=params,  # type: ignore[arg-type]
                options=idempotency(payment.idempotency_key),
            )
    except PaymentError as failure:
        if failure.refused:
            mark_failed(payment, message=str(failure))
        payment.refresh_from_db()
        raise
    Payment.objects.filter(pk=payment.pk).update(stripe_checkout_session_id=session.id)
    payment.stripe_checkout_session_id = session.id
    url = field(session, "url")
    return str(url) if url else None


@catch_stripe_errors()
def _checkout_again(payment: Payment, *, success_url: str, cancel_url: str) -> CheckoutStarted:
    """A Checkout purchase made before under the same Idempotency-Key: its page as Stripe has it now (no URL once
    paid or expired), or, if the first try never heard of one, the identical request sent again."""
    if payment.stripe_checkout_session_id:
        session = stripe_client().v1.checkout.sessions.retrieve(payment.stripe_checkout_session_id)
        url = field(session, "url")
        return CheckoutStarted(payment=payment, url=str(url) if url else None, replayed=True)
    check_resendable(payment)
    url = _open_checkout(payment, success_url=success_url, cancel_url=cancel_url)
    return CheckoutStarted(payment=payment, url=url, replayed=True)
