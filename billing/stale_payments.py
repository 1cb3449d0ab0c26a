"""The sweep of payments left pending: each settled from Stripe's own state when no answer or webhook settled it."""

from __future__ import annotations

import logging
from datetime import timedelta

import stripe
from django.conf import settings
from django.utils import timezone

from accounts.sweeps import each_apart
from billing import topups
from billing.charges import RESEND_WITHIN, charge, find_payment_intent, mark_failed
from billing.ledger import BillingError, account_of
from billing.models import Payment, PaymentKind, PaymentStatus
from billing.stripe_client import field, object_id, stripe_client
from billing.stripe_errors import PaymentError
from billing.stripe_state import apply_checkout_session, apply_payment_intent

logger = logging.getLogger(__name__)


def settle_stale_payments(*, older_than: timedelta | None = None, limit: int = 100) -> int:
    """Settles payments still pending long after Stripe was called, from Stripe's own state.

    An auto top-up that never got Stripe's answer is re-sent, the identical request under the same
    idempotency key (Stripe answers the first attempt's result, or makes it now), while the organization
    would be charged unattended now (``topups.charges_now``); otherwise it is looked up. Any other payment
    with no PaymentIntent known is looked up at Stripe by its metadata (the answer and the webhook
    may both have been lost) and marked failed only if Stripe has none (a late success still
    credits it); a PaymentIntent left waiting for the customer a day is cancelled.
    """
    now = timezone.now()
    if older_than is None:
        older_than = timedelta(seconds=settings.BILLING_PAYMENT_SETTLE_AFTER_SECONDS)
    cutoff = now - older_than
    client = stripe_client()

    def settle(payment: Payment) -> bool:
        try:
            _settle(client, payment, abandon=payment.created_at < now - timedelta(days=1))
        except (stripe.StripeError, BillingError) as exc:  # Stripe's refusal or outage: the next sweep asks again
            logger.warning("could not settle payment-%s: %s", payment.pk, exc)
            return False
        return True

    # Each apart: a payment that raises anything else (logged) leaves the others settled, and the sweep failed.
    pending = Payment.objects.filter(status=PaymentStatus.PENDING, created_at__lt=cutoff).order_by("created_at")
    return each_apart(pending[:limit], settle, name=lambda payment: f"settling payment-{payment.pk}")


def _settle(client: stripe.StripeClient, payment: Payment, *, abandon: bool) -> None:
    if payment.stripe_checkout_session_id and not payment.stripe_payment_intent_id:
        session = client.v1.checkout.sessions.retrieve(payment.stripe_checkout_session_id)
        intent_id = object_id(field(session, "payment_intent"))
        apply_checkout_session(session, client.v1.payment_intents.retrieve(intent_id) if intent_id else None)
        return
    resend = payment.kind == PaymentKind.AUTO_TOP_UP and payment.created_at >= timezone.now() - RESEND_WITHIN
    # A send that never reached Stripe would charge the card now: only while the organization would be charged now.
    # Otherwise (auto top-up turned off, by its members or by a dispute; the balance topped up meanwhile; suspended)
    # it is looked up at Stripe as a purchase is, and credited if the first send did charge.
    if not payment.stripe_payment_intent_id and resend and topups.charges_now(account_of(payment.organization)):
        if not payment.stripe_customer_id:  # made before payments recorded their request: the best guess
            account = account_of(payment.organization)
            payment.stripe_customer_id = account.stripe_customer_id
            payment.stripe_payment_method_id = account.default_payment_method_id
        try:
            charge(payment)
        except PaymentError as exc:
            logger.warning("auto top-up payment-%s retried: %s", payment.pk, exc)
        return
    if payment.stripe_payment_intent_id:
        intent: stripe.PaymentIntent | None = client.v1.payment_intents.retrieve(payment.stripe_payment_intent_id)
    else:
        intent = find_payment_intent(client, payment)
    if intent is None:  # Stripe made nothing for it: nothing was charged
        mark_failed(payment, message="No answer from the payment provider.")
        return
    if abandon and intent.status in ("requires_action", "requires_payment_method", "requires_confirmation"):
        # Under a key of the payment's own, as every write to Stripe: a retry after a lost answer is answered the same.
        intent = client.v1.payment_intents.cancel(
            intent.id, options={"idempotency_key": f"{payment.idempotency_key}-cancel"}
        )
    apply_payment_intent(intent)
