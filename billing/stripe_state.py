"""Stripe's state applied to our books: a PaymentIntent's outcome, a Checkout Session, refunds and disputes.

A payment that succeeds gets its receipt in the same transaction (``billing.receipts``). Refunds and disputes are
read from Stripe's current state, never from an event's snapshot, and each becomes one entry keyed by its Stripe
id, so their effect never exceeds Stripe's.

These functions touch only the database: the reads from Stripe happen before them, so no lock is held across a
network call. Each runs in one transaction, the payment's account and then the payment locked first
(``billing.locks``); the Stripe inbox (``stripe_events``) runs them inside its own transaction, which holds the
event's lock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import stripe
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from billing import controls
from billing.ledger import BillingError, post_entry
from billing.locks import locked_payment
from billing.models import Account, CreditEntry, EntryKind, Payment, PaymentKind, PaymentStatus
from billing.money import cents_to_micros, micros_to_cents
from billing.receipts import issue_receipt
from billing.stripe_client import field, object_id

# Dispute states in which Stripe has taken the disputed amount back (inquiries, ``warning_*``, take nothing).
DISPUTE_FUNDS_WITHDRAWN = frozenset({"needs_response", "under_review", "lost"})
REFUND_COUNTED = frozenset({"succeeded", "pending"})
REFUND_UNDONE = frozenset({"failed", "canceled"})


def _payment_for(
    *, metadata: Any, payment_intent_id: str | None = None, session_id: str | None = None
) -> Payment | None:
    payment_id = field(metadata, "payment_id")
    if payment_id and str(payment_id).isdigit():
        found = Payment.objects.filter(pk=int(payment_id)).first()
        if found is not None:
            return found
    if payment_intent_id:
        found = Payment.objects.filter(stripe_payment_intent_id=payment_intent_id).first()
        if found is not None:
            return found
    if session_id:
        return Payment.objects.filter(stripe_checkout_session_id=session_id).first()
    return None


def _check_customer(account: Account, payment: Payment, customer: Any, what: str) -> None:
    """Refuses a Stripe object of another customer than the one ``payment`` was made for (the account's, for a
    payment made before payments recorded it): the account's customer may have been replaced since
    (``cards.forget_deleted_customer``), and the refunds and disputes of older payments still apply."""
    customer_id = object_id(customer)
    expected = payment.stripe_customer_id or account.stripe_customer_id
    if customer_id and expected and customer_id != expected:
        raise BillingError(f"{what} belongs to customer {customer_id}, not {expected}.")


def _locked_payment_of(intent: stripe.PaymentIntent) -> tuple[Account, Payment] | None:
    """The payment the PaymentIntent pays, locked with its account; ``None`` when it is not one of ours."""
    found = _payment_for(metadata=field(intent, "metadata"), payment_intent_id=intent.id)
    return None if found is None else locked_payment(found)


@transaction.atomic
def apply_payment_intent(intent: stripe.PaymentIntent) -> Payment | None:
    """Brings our payment in line with the PaymentIntent's current state; credits the ledger once on success.

    Returns ``None`` when the PaymentIntent is not one of ours.
    """
    rows = _locked_payment_of(intent)
    if rows is None:
        return None
    account, payment = rows
    return _apply_intent(account, payment, intent)


def _apply_intent(account: Account, payment: Payment, intent: stripe.PaymentIntent) -> Payment:
    """``apply_payment_intent`` on the payment and account this transaction has locked."""
    _check_customer(account, payment, field(intent, "customer"), f"PaymentIntent {intent.id}")
    if payment.stripe_payment_intent_id and payment.stripe_payment_intent_id != intent.id:
        raise BillingError(f"payment-{payment.pk} is paid by {payment.stripe_payment_intent_id}, not {intent.id}.")
    payment.stripe_payment_intent_id = intent.id
    newly_paid = False
    if intent.status == "succeeded":
        received = int(field(intent, "amount_received") or 0)
        if received != payment.amount_cents or intent.currency != payment.currency:
            raise BillingError(
                f"PaymentIntent {intent.id} received {received} {intent.currency}; "
                f"payment-{payment.pk} is for {payment.amount_cents} {payment.currency}."
            )
        auto = payment.kind == PaymentKind.AUTO_TOP_UP
        post_entry(
            account=account,
            kind=EntryKind.AUTO_TOP_UP if auto else EntryKind.PURCHASE,
            amount_micros=cents_to_micros(received),
            idempotency_key=payment.idempotency_key,
            description="Auto top-up" if auto else "Credits bought",
            payment=payment,
            created_by=payment.created_by,
        )
        newly_paid = payment.status != PaymentStatus.SUCCEEDED
        if newly_paid:
            payment.status = PaymentStatus.SUCCEEDED
            payment.succeeded_at = timezone.now()
            payment.failure_message = ""
    elif payment.status == PaymentStatus.PENDING:
        error = field(intent, "last_payment_error")
        if intent.status == "canceled":
            payment.status = PaymentStatus.CANCELED
        elif intent.status == "requires_payment_method" and error:
            payment.status = PaymentStatus.FAILED
            payment.failure_message = str(field(error, "message") or "The payment failed.")[:500]
    payment.save(update_fields=["stripe_payment_intent_id", "status", "succeeded_at", "failure_message"])
    if intent.status == "succeeded" and newly_paid:
        # Stripe says whether this money is real: a test-mode PaymentIntent (or the fake's) is not live.
        issue_receipt(payment, test_mode=field(intent, "livemode") is not True)
    return payment


@transaction.atomic
def apply_checkout_session(session: Any, intent: stripe.PaymentIntent | None) -> Payment | None:
    """A Checkout Session's state: linked to its payment, paid through its PaymentIntent, or expired."""
    found = _payment_for(
        metadata=field(session, "metadata"),
        payment_intent_id=object_id(field(session, "payment_intent")),
        session_id=session.id,
    )
    if found is None:
        return None
    account, payment = locked_payment(found)
    _check_customer(account, payment, field(session, "customer"), f"Checkout Session {session.id}")
    if payment.stripe_checkout_session_id not in (None, "", session.id):
        raise BillingError(f"payment-{payment.pk} is paid through {payment.stripe_checkout_session_id}.")
    payment.stripe_checkout_session_id = session.id
    if field(session, "status") == "expired" and payment.status == PaymentStatus.PENDING:
        payment.status = PaymentStatus.CANCELED
    payment.save(update_fields=["stripe_checkout_session_id", "status"])
    if intent is not None:
        # The PaymentIntent pays the payment its metadata names (Checkout copies the session's onto it): this one.
        return apply_payment_intent(intent)
    return payment


# Money Stripe takes back from a succeeded payment.


class Standing(enum.Enum):
    """Where money Stripe may take back stands now."""

    TAKEN = "taken"  # Stripe has taken it (a refund made, a dispute's funds withdrawn)
    GIVEN_BACK = "given_back"  # Stripe gave it back after (a refund that failed, a dispute won)
    NEITHER = "neither"  # nothing taken yet (a refund waiting for action, a dispute that is an inquiry)


@dataclass(frozen=True)
class TakenBack:
    """One refund or dispute of a payment, as Stripe has it now, and the entries it makes in our ledger: one
    negative entry ``key`` while it is taken, and one entry ``key-reversed`` returning it if given back after."""

    kind: EntryKind
    key: str
    cents: int
    standing: Standing
    description: str
    reversal: str

    @classmethod
    def refund(cls, refund: Any) -> TakenBack:
        if refund.status in REFUND_COUNTED:
            standing = Standing.TAKEN
        elif refund.status in REFUND_UNDONE:
            standing = Standing.GIVEN_BACK
        else:
            standing = Standing.NEITHER
        return cls(
            kind=EntryKind.REFUND,
            key=f"refund-{refund.id}",
            cents=int(refund.amount),
            standing=standing,
            description="Refunded to the card",
            reversal="Refund canceled" if refund.status == "canceled" else "Refund to the card failed",
        )

    @classmethod
    def dispute(cls, dispute: Any) -> TakenBack:
        if dispute.status in DISPUTE_FUNDS_WITHDRAWN:
            standing = Standing.TAKEN
        elif dispute.status == "won":
            standing = Standing.GIVEN_BACK
        else:
            standing = Standing.NEITHER
        return cls(
            kind=EntryKind.DISPUTE,
            key=f"dispute-{dispute.id}",
            cents=int(dispute.amount),
            standing=standing,
            description=f"Payment disputed ({field(dispute, 'reason') or 'no reason given'})",
            reversal="Dispute won: the amount is back",
        )


def _post_taken_back(account: Account, payment: Payment, taken_back: TakenBack) -> bool:
    """Posts the entries ``taken_back`` stands for now on the locked account; answers whether it took the money
    away just now (the first time it was seen taken).

    Stripe moves a refund or a dispute one way only: taken, then perhaps given back (a refund that failed, a dispute
    won), never taken again. But each event reads Stripe before it takes the payment's lock (``stripe_events``), so
    a state read before another event's newer one was applied can be applied after it. The books move one way too:
    "given back" posts the taken entry where it is missing and its reversal (they net to zero, and say what happened
    at Stripe), so a "taken" read earlier and applied later finds its key used and changes nothing."""
    if taken_back.standing is Standing.NEITHER:
        return False
    amount = cents_to_micros(taken_back.cents)
    _, taken = post_entry(
        account=account,
        kind=taken_back.kind,
        amount_micros=-amount,
        idempotency_key=taken_back.key,
        description=taken_back.description,
        payment=payment,
    )
    if taken_back.standing is Standing.TAKEN:
        return taken
    post_entry(
        account=account,
        kind=taken_back.kind,
        amount_micros=amount,
        idempotency_key=f"{taken_back.key}-reversed",
        description=taken_back.reversal,
        payment=payment,
    )
    return False


@transaction.atomic
def apply_refunds(*, charge: Any, intent: stripe.PaymentIntent, refunds: Iterable[Any]) -> Payment | None:
    """One negative entry per Stripe refund that has gone through (``refund-<id>``), returned if it later failed.

    The PaymentIntent is applied first, so a refund seen before the payment's own event still finds it credited.
    """
    rows = _locked_payment_of(intent)
    if rows is None:
        return None
    account, payment = rows
    _apply_intent(account, payment, intent)
    if payment.status != PaymentStatus.SUCCEEDED:
        return payment
    _check_customer(account, payment, field(charge, "customer"), f"Charge {charge.id}")
    for refund in refunds:
        _post_taken_back(account, payment, TakenBack.refund(refund))
    payment.amount_refunded_cents = _cents_out(payment, EntryKind.REFUND)
    payment.save(update_fields=["amount_refunded_cents"])
    return payment


@transaction.atomic
def apply_dispute(*, dispute: Any, intent: stripe.PaymentIntent) -> Payment | None:
    """A dispute takes its amount back while open or lost (``dispute-<id>``) and returns it if won.

    A new dispute also turns auto top-up off: charging, unattended, a card whose owner disputes a charge
    invites the next dispute.
    """
    rows = _locked_payment_of(intent)
    if rows is None:
        return None
    account, payment = rows
    _apply_intent(account, payment, intent)
    if payment.status != PaymentStatus.SUCCEEDED:
        return payment
    opened = _post_taken_back(account, payment, TakenBack.dispute(dispute))
    if opened and account.auto_top_up_enabled:
        controls.set_auto_top_up(organization=payment.organization, enabled=False)
    payment.amount_disputed_cents = _cents_out(payment, EntryKind.DISPUTE)
    payment.save(update_fields=["amount_disputed_cents"])
    return payment


def _cents_out(payment: Payment, kind: str) -> int:
    total = CreditEntry.objects.filter(payment=payment, kind=kind).aggregate(total=Sum("amount_micros"))["total"]
    return max(0, micros_to_cents(-(total or 0)))
