"""Charging: buying credits with a saved card and sending a payment's charge to Stripe; and what a purchase through
Stripe Checkout (``billing.checkout``) shares with it: the row made for it, the client's Idempotency-Key, a refusal.

Stripe is the truth about what was paid. A ``Payment`` row is committed before Stripe is called, so the
idempotency key ``payment-<id>`` is ours; the ledger is credited when Stripe says the payment succeeded
(``stripe_state.apply_payment_intent``), whether the synchronous answer or the webhook tells us first.

A request sent again under a key Stripe has seen must be the identical request, or Stripe refuses it
(400 ``idempotency_error``): the payment row records what its first request named (customer, card) and
every send is built from the row alone. Such a refusal is never a decline: Stripe has seen the payment,
so its PaymentIntent is looked up (by the ``payment_id`` in its metadata) and applied.

A client's purchase may carry an ``Idempotency-Key``: its retries answer the payment the first try made.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import stripe
from django.conf import settings
from django.db import DatabaseError, IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from accounts.errors import problem
from accounts.models import Organization
from accounts.outages import ServiceUnavailable, on_a_new_connection
from accounts.services import SYSTEM, Actor
from billing.cards import ensure_customer, own_method
from billing.ledger import BillingError, account_of
from billing.locks import locked_payment
from billing.models import Payment, PaymentKind, PaymentStatus
from billing.stripe_client import field, idempotency, stripe_client
from billing.stripe_errors import PaymentError, PaymentInProgress, catch_stripe_errors
from billing.stripe_state import apply_payment_intent

logger = logging.getLogger(__name__)

# Stripe keeps an idempotency key at least 24 hours; past that a re-send could charge anew, so none is sent.
RESEND_WITHIN = timedelta(hours=23)
# How much earlier than our row Stripe's clock may date the PaymentIntent made for it.
CLOCK_SKEW = timedelta(minutes=10)


class IdempotencyKeyReused(BillingError):
    """A client's Idempotency-Key already bought something else (another amount, card or mode): a 422 located at
    the ``Idempotency-Key`` header, which carries the key."""

    status_code = 422
    error_type = "idempotency_key_reused"

    def __init__(self) -> None:
        message = "This Idempotency-Key was already used with a different purchase."
        super().__init__([problem(["header", "Idempotency-Key"], message, self.error_type)])


@dataclass(frozen=True)
class Charged:
    """A payment after Stripe's answer; ``client_secret`` is set when the customer must still act (3-D Secure).

    ``replayed``: the payment of an earlier request with the same Idempotency-Key, answered again.
    """

    payment: Payment
    client_secret: str | None = None
    replayed: bool = False


def payment_metadata(payment: Payment) -> dict[str, str]:
    """What our requests to Stripe tag a payment's objects with, so that they can be found again."""
    return {"payment_id": str(payment.pk), "organization_id": str(payment.organization_id), "kind": payment.kind}


def check_amount(amount_cents: int) -> None:
    """Refuses a purchase outside ``BILLING_MIN_PURCHASE_CENTS`` to ``BILLING_MAX_PURCHASE_CENTS``."""
    low, high = settings.BILLING_MIN_PURCHASE_CENTS, settings.BILLING_MAX_PURCHASE_CENTS
    if not low <= amount_cents <= high:
        raise BillingError(f"Buy between {low} and {high} cents of credit at a time.")


# Buying credits with a saved card.


def buy_credits(
    *,
    organization: Organization,
    amount_cents: int,
    payment_method_id: str | None = None,
    actor: Actor = SYSTEM,
    idempotency_key: str | None = None,
) -> Charged:
    """Charges a saved card now (the default one unless told) and credits the ledger when Stripe says paid.

    A decline marks the payment failed and raises ``PaymentError`` (402 ``card_declined``); nothing is credited.
    With ``idempotency_key`` (the client's), a purchase made before with that key is answered again
    (``_charge_again``) and never charged twice; used before for another purchase, it raises ``IdempotencyKeyReused``.
    """
    check_amount(amount_cents)
    fingerprint = purchase_fingerprint("card", amount_cents, payment_method_id or None)
    if idempotency_key:
        earlier = earlier_purchase(organization, idempotency_key, fingerprint)
        if earlier is not None:
            return _charge_again(earlier)
    customer_id = ensure_customer(organization)
    account = account_of(organization)
    method_id = payment_method_id or account.default_payment_method_id
    if not method_id:
        raise BillingError("Save a card first, or pay through Checkout.")
    if method_id != account.default_payment_method_id:
        own_method(customer_id, method_id)
    payment, created = new_purchase(
        organization=organization,
        amount_cents=amount_cents,
        currency=account.currency,
        created_by=actor.user,
        stripe_customer_id=customer_id,
        stripe_payment_method_id=method_id,
        client_idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
    return charge(payment) if created else _charge_again(payment)


def purchase_fingerprint(*request: Any) -> str:
    """A digest of what a purchase asked for, which a retry under the same Idempotency-Key must repeat."""
    canonical = json.dumps(request, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def earlier_purchase(organization: Organization, idempotency_key: str, fingerprint: str) -> Payment | None:
    """The purchase an earlier try with the client's ``idempotency_key`` made, if any; ``IdempotencyKeyReused`` when
    that try asked for something else."""
    earlier = Payment.objects.filter(organization=organization, client_idempotency_key=idempotency_key).first()
    if earlier is not None and earlier.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    return earlier


def new_purchase(
    *, organization: Organization, client_idempotency_key: str | None, fingerprint: str, **fields: Any
) -> tuple[Payment, bool]:
    """A new purchase, committed before Stripe is called; or, when another try of the client's with the same
    Idempotency-Key made one first, that one (``False``)."""
    try:
        with transaction.atomic(durable=True):
            payment = Payment.objects.create(
                organization=organization,
                kind=PaymentKind.PURCHASE,
                client_idempotency_key=client_idempotency_key or None,
                request_fingerprint=fingerprint if client_idempotency_key else "",
                **fields,
            )
    except IntegrityError:
        earlier = (
            earlier_purchase(organization, client_idempotency_key, fingerprint) if client_idempotency_key else None
        )
        if earlier is None:
            raise
        return earlier, False
    except (OperationalError, InterfaceError) as error:
        # Stripe has not been called: whatever became of the row (a pending payment Stripe never saw is marked failed
        # by the sweep), nothing was charged.
        raise ServiceUnavailable(
            "The database failed before the payment was sent to Stripe: nothing was charged. Try again shortly."
        ) from error
    return payment, True


@catch_stripe_errors()
def _charge_again(payment: Payment) -> Charged:
    """A card purchase made before under the same Idempotency-Key, as it stands now. One whose outcome is
    unknown is sent to Stripe again, the identical request under the same key: Stripe answers with the
    first attempt's result (or makes the charge now if the first never reached it), so it charges once."""
    if payment.status == PaymentStatus.SUCCEEDED:
        return Charged(payment=payment, replayed=True)
    if payment.stripe_payment_intent_id and payment.status == PaymentStatus.PENDING:  # e.g. waiting for 3-D Secure
        intent = stripe_client().v1.payment_intents.retrieve(payment.stripe_payment_intent_id)
        return replace(_charged(payment, intent), replayed=True)
    check_resendable(payment)
    return replace(charge(payment), replayed=True)


def _intent_params(payment: Payment) -> dict[str, Any]:
    """The request that charges ``payment``, built from the row alone, so that every send of it is the same."""
    params: dict[str, Any] = {
        "amount": payment.amount_cents,
        "currency": payment.currency,
        "customer": payment.stripe_customer_id,
        "payment_method": payment.stripe_payment_method_id,
        "payment_method_types": ["card"],
        "confirm": True,
        "metadata": payment_metadata(payment),
    }
    if payment.kind == PaymentKind.AUTO_TOP_UP:
        params["off_session"] = True  # nobody is there to confirm it
    return params


def charge(payment: Payment) -> Charged:
    """Sends the charge of ``payment`` to Stripe (first, or again under the same key) and applies the answer.

    A refusal marks the payment failed; when Stripe could not be reached the outcome is unknown and the payment
    stays pending until the webhook or the sweep settles it. Either raises ``PaymentError``, with ``payment``
    refreshed from the database.
    """
    try:
        with catch_stripe_errors():
            intent = stripe_client().v1.payment_intents.create(
                params=_intent_params(payment),  # type: ignore[arg-type]
                options=idempotency(payment.idempotency_key),
            )
    except PaymentInProgress as in_progress:
        return _charged_before(payment, in_progress)
    except PaymentError as failure:
        if failure.refused:
            mark_failed(payment, message=str(failure), payment_intent_id=failure.payment_intent_id)
        payment.refresh_from_db()
        raise
    return _charged(payment, intent)


def _charged(payment: Payment, intent: stripe.PaymentIntent) -> Charged:
    try:
        settled = apply_payment_intent(intent) or payment
    except (OperationalError, InterfaceError) as error:
        if connection.in_atomic_block:
            raise
        settled = _applied_after_an_outage(payment, intent, error)
    waiting = intent.status == "requires_action"
    return Charged(payment=settled, client_secret=intent.client_secret if waiting else None)


def _applied_after_an_outage(payment: Payment, intent: stripe.PaymentIntent, error: BaseException) -> Payment:
    """Stripe's answer applied after the database failed under it (a connection lost before the COMMIT or after):
    applied again on a new connection, which credits the ledger once however often it runs (``apply_payment_intent``).
    Where the database does not answer again, a 503 tells the truth: Stripe has the payment, its credit follows once
    the database is back (the webhook and the sweep apply it), and buying again would pay twice."""
    try:
        return on_a_new_connection(lambda: apply_payment_intent(intent)) or payment
    except DatabaseError:
        logger.error("payment-%s: Stripe answered %s (%s), the database cannot record it", payment.pk, intent.id,
                     intent.status, exc_info=error)  # fmt: skip
        raise ServiceUnavailable(
            f"The payment was sent to Stripe (payment {payment.pk}: {intent.status}), but the database could not "
            "record it. Its credit is added once the database is back: do not buy again, look for it in your "
            "purchases.",
            payment_id=payment.pk,
        ) from error


def _charged_before(payment: Payment, in_progress: PaymentInProgress) -> Charged:
    """Stripe refused the key because it has seen it: the PaymentIntent an earlier send made is the outcome.

    If none can be found (the earlier send still running), the payment stays pending for the next sweep.
    """
    try:
        intent = find_payment_intent(stripe_client(), payment)
    except stripe.StripeError as lookup_error:
        logger.warning("payment-%s: could not look for its PaymentIntent: %s", payment.pk, lookup_error)
        intent = None
    if intent is not None:
        logger.info("payment-%s: Stripe had seen its key; settled from %s", payment.pk, intent.id)
        return _charged(payment, intent)
    logger.warning(
        "payment-%s: Stripe has seen its key (%s) but no PaymentIntent of it was found; left pending",
        payment.pk,
        in_progress.__cause__,
    )
    payment.refresh_from_db()
    raise in_progress


def find_payment_intent(client: stripe.StripeClient, payment: Payment) -> stripe.PaymentIntent | None:
    """The PaymentIntent Stripe made for ``payment``, found among its customer's by the metadata we set on it."""
    customer_id = payment.stripe_customer_id or account_of(payment.organization).stripe_customer_id
    if not customer_id:
        return None
    since = payment.created_at - CLOCK_SKEW
    listing = client.v1.payment_intents.list(
        params={"customer": customer_id, "created": {"gte": int(since.timestamp())}, "limit": 100}
    )
    found = [
        intent
        for intent in listing.auto_paging_iter()
        if field(field(intent, "metadata"), "payment_id") == str(payment.pk)
        and field(field(intent, "metadata"), "organization_id") == str(payment.organization_id)
    ]
    if len(found) > 1:
        logger.error("payment-%s has %d PaymentIntents: %s", payment.pk, len(found), [i.id for i in found])
    # A succeeded one is what the customer paid; otherwise the newest (Stripe lists newest first).
    return next((intent for intent in found if intent.status == "succeeded"), found[0] if found else None)


def mark_failed(payment: Payment, *, message: str, payment_intent_id: str | None = None) -> None:
    """Marks a payment still pending failed: Stripe refused it, or made nothing for it."""
    with transaction.atomic(durable=True):
        _, row = locked_payment(payment)
        if row.status != PaymentStatus.PENDING:
            return
        row.status = PaymentStatus.FAILED
        row.failure_message = message[:500]
        if payment_intent_id and not row.stripe_payment_intent_id:
            row.stripe_payment_intent_id = payment_intent_id
        row.save(update_fields=["status", "failure_message", "stripe_payment_intent_id"])


def check_resendable(payment: Payment) -> None:
    """Raises the answer for a payment of a client's retry that must not be sent to Stripe again: one that failed,
    or one whose first send is older than Stripe keeps its key (the sweep settles it from Stripe's state)."""
    if payment.status != PaymentStatus.PENDING:
        message = payment.failure_message or "The payment did not go through."
        raise PaymentError(message, error_type="payment_failed", status_code=402)
    if payment.created_at < timezone.now() - RESEND_WITHIN:
        raise PaymentError(
            "This payment's outcome is not known yet; it is settled shortly.",
            error_type="payment_in_progress",
            status_code=409,
        )
