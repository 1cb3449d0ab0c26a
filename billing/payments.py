"""Stripe's side of money: customers, saved cards, buying credits, auto top-ups, refunds and disputes.

Stripe is the truth about what was paid. A ``Payment`` row is committed before Stripe is called, so
the idempotency key ``payment-<id>`` is ours, and the ledger is credited once, under the entry key
``payment-<id>``, when the PaymentIntent has succeeded: whether the synchronous answer or the webhook
tells us first. Refunds and disputes are read from Stripe's current state, never from an event's
snapshot, and each becomes one entry keyed by its Stripe id, so their effect never exceeds Stripe's.

A request sent again under a key Stripe has seen must be the identical request, or Stripe refuses it
(400 ``idempotency_error``): the payment row records what its first request named (customer, card) and
every send is built from the row alone. Such a refusal is never a decline: Stripe has seen the payment,
so its PaymentIntent is looked up (by the ``payment_id`` in its metadata) and applied.

A client's purchase may carry an ``Idempotency-Key``: its retries answer the payment the first try made.

Functions named ``apply_*`` touch only the database (one transaction, the account row locked first);
the reads from Stripe happen before them, so no lock is held across a network call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import stripe
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone

from accounts.locking import locked
from accounts.models import AuditAction, Membership, Organization, Role
from accounts.services import SYSTEM, Actor, record_audit
from billing import controls, topups
from billing.ledger import BillingError, account_of, locked_account, post_entry
from billing.models import Account, CreditEntry, EntryKind, Payment, PaymentKind, PaymentStatus
from billing.money import cents_to_micros, micros_to_cents
from billing.stripe_client import field, idempotency, object_id, stripe_client

logger = logging.getLogger(__name__)

PURCHASE_ENTRY_KINDS = (EntryKind.PURCHASE, EntryKind.AUTO_TOP_UP)
# Dispute states in which Stripe has taken the disputed amount back (inquiries, ``warning_*``, take nothing).
DISPUTE_FUNDS_WITHDRAWN = frozenset({"needs_response", "under_review", "lost"})
REFUND_COUNTED = frozenset({"succeeded", "pending"})
REFUND_UNDONE = frozenset({"failed", "canceled"})
# Stripe keeps an idempotency key at least 24 hours; past that a re-send could charge anew, so none is sent.
RESEND_WITHIN = timedelta(hours=23)
# How much earlier than our row Stripe's clock may date the PaymentIntent made for it.
CLOCK_SKEW = timedelta(minutes=10)


class PaymentError(BillingError):
    """Stripe declined, refused or could not be reached; ``status`` and ``error_type`` are the API's answer."""

    def __init__(self, message: str, *, error_type: str, status: int, payment: Payment | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status = status
        self.payment = payment


class IdempotencyKeyReused(BillingError):
    """A client's Idempotency-Key already bought something else (another amount, card or mode)."""

    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was already used with a different purchase.")


@dataclass(frozen=True)
class Charged:
    """A payment after Stripe's answer; ``client_secret`` is set when the customer must still act (3-D Secure).

    ``replayed``: the payment of an earlier request with the same Idempotency-Key, answered again.
    """

    payment: Payment
    client_secret: str | None = None
    replayed: bool = False


@dataclass(frozen=True)
class CheckoutStarted:
    """A purchase through Stripe Checkout: the page the payer is sent to (``None`` once it is closed)."""

    payment: Payment
    url: str | None
    replayed: bool = False


def _failure(exc: stripe.StripeError) -> PaymentError:
    if isinstance(exc, stripe.IdempotencyError):
        return PaymentError(
            "The payment provider is still settling an earlier attempt of this payment; try again shortly.",
            error_type="payment_in_progress",
            status=409,
        )
    if isinstance(exc, stripe.CardError):
        return PaymentError(exc.user_message or "Your card was declined.", error_type="card_declined", status=402)
    if (
        isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError | stripe.AuthenticationError)
        or (exc.http_status or 0) >= 500
    ):
        logger.warning("Stripe unavailable: %s", exc)
        return PaymentError(
            "The payment provider could not be reached; try again shortly.",
            error_type="payment_provider_unavailable",
            status=503,
        )
    return PaymentError(
        exc.user_message or "The payment provider refused the request.", error_type="payment_refused", status=400
    )


def _refused(exc: stripe.StripeError, failure: PaymentError) -> bool:
    """Whether Stripe answered no, so nothing was charged. An ``idempotency_error`` is not a no: Stripe has seen
    the key (the request made something, or is making it); a 5xx or no answer leaves the outcome unknown."""
    return failure.status < 500 and not isinstance(exc, stripe.IdempotencyError)


def _metadata(payment: Payment) -> dict[str, str]:
    return {"payment_id": str(payment.pk), "organization_id": str(payment.organization_id), "kind": payment.kind}


def check_amount(amount_cents: int) -> None:
    low, high = settings.BILLING_MIN_PURCHASE_CENTS, settings.BILLING_MAX_PURCHASE_CENTS
    if not low <= amount_cents <= high:
        raise BillingError(f"Buy between {low} and {high} cents of credit at a time.")


# Customers and saved cards.


def ensure_customer(organization: Organization) -> str:
    """The organization's Stripe customer id, creating the customer on first use (once, however often called)."""
    account = account_of(organization)
    if account.stripe_customer_id:
        return account.stripe_customer_id
    params: dict[str, Any] = {"name": organization.name, "metadata": {"organization_id": str(organization.pk)}}
    owner = (
        Membership.objects.filter(organization=organization, role=Role.OWNER)
        .select_related("user")
        .order_by("created_at")
        .first()
    )
    if owner is not None:
        params["email"] = owner.user.email
    try:
        customer = stripe_client().v1.customers.create(
            params=params,  # type: ignore[arg-type]
            options=idempotency(f"customer-{organization.pk}"),
        )
    except stripe.StripeError as exc:
        raise _failure(exc) from exc
    with transaction.atomic():
        account = locked_account(organization.pk)
        if not account.stripe_customer_id:
            account.stripe_customer_id = customer.id
            account.updated_at = timezone.now()
            account.save(update_fields=["stripe_customer_id", "updated_at"])
    return account.stripe_customer_id


def card_summary(method: stripe.PaymentMethod, *, default_id: str) -> dict[str, Any]:
    card = field(method, "card")
    return {
        "id": method.id,
        "type": method.type,
        "brand": field(card, "brand"),
        "last4": field(card, "last4"),
        "exp_month": field(card, "exp_month"),
        "exp_year": field(card, "exp_year"),
        "is_default": method.id == default_id,
    }


def list_payment_methods(organization: Organization) -> list[dict[str, Any]]:
    account = account_of(organization)
    if not account.stripe_customer_id:
        return []
    try:
        methods = stripe_client().v1.payment_methods.list(
            params={"customer": account.stripe_customer_id, "type": "card", "limit": 100}
        )
        return [
            card_summary(method, default_id=account.default_payment_method_id) for method in methods.auto_paging_iter()
        ]
    except stripe.StripeError as exc:
        raise _failure(exc) from exc


def _own_method(customer_id: str, payment_method_id: str) -> stripe.PaymentMethod:
    """The saved payment method, if it belongs to this customer (never another organization's card)."""
    try:
        method = stripe_client().v1.payment_methods.retrieve(payment_method_id)
    except stripe.InvalidRequestError:
        method = None
    except stripe.StripeError as exc:
        raise _failure(exc) from exc
    if method is None or object_id(method.customer) != customer_id:
        raise PaymentError(f"No saved payment method {payment_method_id}.", error_type="not_found", status=404)
    return method


def _check_attachable(customer_id: str, payment_method_id: str) -> None:
    """Refuses a card already saved to another customer: Stripe's attach would move it, and another
    organization's card would then pay for this one. A card on no customer yet (fresh from Stripe.js) is fine.

    Answered as an unknown id (404), so that probing says nothing about other organizations' cards.
    """
    try:
        method = stripe_client().v1.payment_methods.retrieve(payment_method_id)
    except stripe.InvalidRequestError:
        raise PaymentError(f"No payment method {payment_method_id}.", error_type="not_found", status=404) from None
    except stripe.StripeError as exc:
        raise _failure(exc) from exc
    owner = object_id(method.customer)
    if owner and owner != customer_id:
        raise PaymentError(f"No payment method {payment_method_id}.", error_type="not_found", status=404)


def _record_card_change(
    action: AuditAction,
    *,
    account: Account,
    organization: Organization,
    actor: Actor,
    method: stripe.PaymentMethod,
    **details: Any,
) -> None:
    """Audits a saved-card change inside the transaction that stores it: which card, never what could charge it."""
    card = field(method, "card")
    record_audit(
        action=action,
        actor=actor,
        organization=organization,
        target=account,
        metadata={
            "payment_method_id": method.id,
            "brand": field(card, "brand"),
            "last4": field(card, "last4"),
            **details,
        },
    )


def attach_payment_method(
    *, organization: Organization, payment_method_id: str, make_default: bool = False, actor: Actor = SYSTEM
) -> dict[str, Any]:
    """Saves a payment method (e.g. made by Stripe.js) to the organization; the first one becomes the default."""
    customer_id = ensure_customer(organization)
    _check_attachable(customer_id, payment_method_id)
    try:
        method = stripe_client().v1.payment_methods.attach(payment_method_id, params={"customer": customer_id})
    except stripe.StripeError as exc:
        raise _failure(exc) from exc
    made_default = make_default or not account_of(organization).default_payment_method_id
    if made_default:
        _make_stripe_default(customer_id=customer_id, payment_method_id=method.id)
    with transaction.atomic():
        account = locked_account(organization.pk)
        if made_default:
            _save_default(account, method.id)
        _record_card_change(
            AuditAction.PAYMENT_METHOD_ADDED, account=account, organization=organization, actor=actor, method=method,
            made_default=made_default,
        )  # fmt: skip
    return card_summary(method, default_id=account.default_payment_method_id)


def set_default_payment_method(
    *, organization: Organization, payment_method_id: str, actor: Actor = SYSTEM
) -> dict[str, Any]:
    customer_id = ensure_customer(organization)
    method = _own_method(customer_id, payment_method_id)
    _make_stripe_default(customer_id=customer_id, payment_method_id=method.id)
    with transaction.atomic():
        account = locked_account(organization.pk)
        previous_id = _save_default(account, method.id)
        _record_card_change(
            AuditAction.PAYMENT_METHOD_DEFAULT_CHANGED, account=account, organization=organization, actor=actor,
            method=method, previous_default_id=previous_id or None,
        )  # fmt: skip
    return card_summary(method, default_id=method.id)


def _make_stripe_default(*, customer_id: str, payment_method_id: str) -> None:
    """The card Stripe charges by default (before the database says so: no lock is held across the call)."""
    try:
        stripe_client().v1.customers.update(
            customer_id, params={"invoice_settings": {"default_payment_method": payment_method_id}}
        )
    except stripe.StripeError as exc:
        raise _failure(exc) from exc


def _save_default(account: Account, payment_method_id: str) -> str:
    """Records the default card on a locked account; the id of the one it replaces ("" if none)."""
    previous_id = account.default_payment_method_id
    account.default_payment_method_id = payment_method_id
    account.updated_at = timezone.now()
    account.save(update_fields=["default_payment_method_id", "updated_at"])
    return previous_id


def detach_payment_method(*, organization: Organization, payment_method_id: str, actor: Actor = SYSTEM) -> None:
    """Removes a saved card. Removing the default one turns auto top-up off (it would have nothing to charge)."""
    account = account_of(organization)
    if not account.stripe_customer_id:
        raise PaymentError(f"No saved payment method {payment_method_id}.", error_type="not_found", status=404)
    method = _own_method(account.stripe_customer_id, payment_method_id)
    try:
        stripe_client().v1.payment_methods.detach(method.id)
    except stripe.StripeError as exc:
        raise _failure(exc) from exc
    with transaction.atomic():
        account = locked_account(organization.pk)
        was_default = account.default_payment_method_id == method.id
        if was_default:
            _save_default(account, "")
        _record_card_change(
            AuditAction.PAYMENT_METHOD_REMOVED, account=account, organization=organization, actor=actor, method=method,
            was_default=was_default,
        )  # fmt: skip
        if was_default and account.auto_top_up_enabled:
            controls.set_auto_top_up(organization=organization, enabled=False, actor=actor)


# Buying credits.


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
    fingerprint = _fingerprint("card", amount_cents, payment_method_id or None)
    if idempotency_key:
        earlier = _earlier_purchase(organization, idempotency_key, fingerprint)
        if earlier is not None:
            return _charge_again(earlier)
    customer_id = ensure_customer(organization)
    account = account_of(organization)
    method_id = payment_method_id or account.default_payment_method_id
    if not method_id:
        raise BillingError("Save a card first, or pay through Checkout.")
    if method_id != account.default_payment_method_id:
        _own_method(customer_id, method_id)
    payment, created = _new_purchase(
        organization=organization,
        amount_cents=amount_cents,
        currency=account.currency,
        created_by=actor.user,
        stripe_customer_id=customer_id,
        stripe_payment_method_id=method_id,
        client_idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
    return _charge(payment) if created else _charge_again(payment)


def _fingerprint(*request: Any) -> str:
    """A digest of what a purchase asked for, which a retry under the same Idempotency-Key must repeat."""
    canonical = json.dumps(request, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _earlier_purchase(organization: Organization, idempotency_key: str, fingerprint: str) -> Payment | None:
    earlier = Payment.objects.filter(organization=organization, client_idempotency_key=idempotency_key).first()
    if earlier is not None and earlier.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    return earlier


def _new_purchase(
    *, organization: Organization, client_idempotency_key: str | None, fingerprint: str, **fields: Any
) -> tuple[Payment, bool]:
    """A new purchase, committed before Stripe is called; or, when another try of the client's with the same
    Idempotency-Key made one first, that one (``False``)."""
    try:
        with transaction.atomic():
            payment = Payment.objects.create(
                organization=organization,
                kind=PaymentKind.PURCHASE,
                client_idempotency_key=client_idempotency_key or None,
                request_fingerprint=fingerprint if client_idempotency_key else "",
                **fields,
            )
    except IntegrityError:
        earlier = (
            _earlier_purchase(organization, client_idempotency_key, fingerprint) if client_idempotency_key else None
        )
        if earlier is None:
            raise
        return earlier, False
    return payment, True


def _charge_again(payment: Payment) -> Charged:
    """A card purchase made before under the same Idempotency-Key, as it stands now. One whose outcome is
    unknown is sent to Stripe again, the identical request under the same key: Stripe answers with the
    first attempt's result (or makes the charge now if the first never reached it), so it charges once."""
    if payment.status == PaymentStatus.SUCCEEDED:
        return Charged(payment=payment, replayed=True)
    if payment.stripe_payment_intent_id and payment.status == PaymentStatus.PENDING:  # e.g. waiting for 3-D Secure
        try:
            intent = stripe_client().v1.payment_intents.retrieve(payment.stripe_payment_intent_id)
        except stripe.StripeError as exc:
            raise _failure(exc) from exc
        return replace(_charged(payment, intent), replayed=True)
    _check_resendable(payment)
    return replace(_charge(payment), replayed=True)


def _intent_params(payment: Payment) -> dict[str, Any]:
    """The request that charges ``payment``, built from the row alone, so that every send of it is the same."""
    params: dict[str, Any] = {
        "amount": payment.amount_cents,
        "currency": payment.currency,
        "customer": payment.stripe_customer_id,
        "payment_method": payment.stripe_payment_method_id,
        "payment_method_types": ["card"],
        "confirm": True,
        "metadata": _metadata(payment),
    }
    if payment.kind == PaymentKind.AUTO_TOP_UP:
        params["off_session"] = True  # nobody is there to confirm it
    return params


def _charge(payment: Payment) -> Charged:
    """Sends the charge of ``payment`` to Stripe (first, or again under the same key) and applies the answer."""
    try:
        intent = stripe_client().v1.payment_intents.create(
            params=_intent_params(payment),  # type: ignore[arg-type]
            options=idempotency(payment.idempotency_key),
        )
    except stripe.IdempotencyError as exc:
        return _charged_before(payment, exc)
    except stripe.StripeError as exc:
        failure = _failure(exc)
        if _refused(exc, failure):
            intent_id = object_id(exc.error.payment_intent) if exc.error is not None else None
            _mark_failed(payment.pk, message=str(failure), payment_intent_id=intent_id)
        # Otherwise the outcome is unknown: the payment stays pending until the webhook or the sweep settles it.
        payment.refresh_from_db()
        failure.payment = payment
        raise failure from exc
    return _charged(payment, intent)


def _charged(payment: Payment, intent: stripe.PaymentIntent) -> Charged:
    settled = apply_payment_intent(intent) or payment
    waiting = intent.status == "requires_action"
    return Charged(payment=settled, client_secret=intent.client_secret if waiting else None)


def _charged_before(payment: Payment, exc: stripe.IdempotencyError) -> Charged:
    """Stripe refused the key because it has seen it: the PaymentIntent an earlier send made is the outcome.

    If none can be found (the earlier send still running), the payment stays pending for the next sweep.
    """
    try:
        intent = _find_payment_intent(stripe_client(), payment)
    except stripe.StripeError as lookup_error:
        logger.warning("payment-%s: could not look for its PaymentIntent: %s", payment.pk, lookup_error)
        intent = None
    if intent is not None:
        logger.info("payment-%s: Stripe had seen its key; settled from %s", payment.pk, intent.id)
        return _charged(payment, intent)
    logger.warning(
        "payment-%s: Stripe has seen its key (%s) but no PaymentIntent of it was found; left pending",
        payment.pk,
        exc.user_message,
    )
    payment.refresh_from_db()
    failure = _failure(exc)
    failure.payment = payment
    raise failure from exc


def _find_payment_intent(client: stripe.StripeClient, payment: Payment) -> stripe.PaymentIntent | None:
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


def _mark_failed(payment_id: int, *, message: str, payment_intent_id: str | None = None) -> None:
    with transaction.atomic():
        payment = locked(Payment.objects.filter(pk=payment_id)).get()
        if payment.status != PaymentStatus.PENDING:
            return
        payment.status = PaymentStatus.FAILED
        payment.failure_message = message[:500]
        if payment_intent_id and not payment.stripe_payment_intent_id:
            payment.stripe_payment_intent_id = payment_intent_id
        payment.save(update_fields=["status", "failure_message", "stripe_payment_intent_id"])


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
    fingerprint = _fingerprint("checkout", amount_cents, success_url, cancel_url)
    if idempotency_key:
        earlier = _earlier_purchase(organization, idempotency_key, fingerprint)
        if earlier is not None:
            return _checkout_again(earlier, success_url=success_url, cancel_url=cancel_url)
    customer_id = ensure_customer(organization)
    payment, created = _new_purchase(
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
    under the same key is the same request); answers the page's URL."""
    metadata = _metadata(payment)
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
        session = stripe_client().v1.checkout.sessions.create(
            params=params,  # type: ignore[arg-type]
            options=idempotency(payment.idempotency_key),
        )
    except stripe.StripeError as exc:
        failure = _failure(exc)
        if _refused(exc, failure):
            _mark_failed(payment.pk, message=str(failure))
        payment.refresh_from_db()
        failure.payment = payment
        raise failure from exc
    Payment.objects.filter(pk=payment.pk).update(stripe_checkout_session_id=session.id)
    payment.stripe_checkout_session_id = session.id
    url = field(session, "url")
    return str(url) if url else None


def _checkout_again(payment: Payment, *, success_url: str, cancel_url: str) -> CheckoutStarted:
    """A Checkout purchase made before under the same Idempotency-Key: its page as Stripe has it now (no URL once
    paid or expired), or, if the first try never heard of one, the identical request sent again."""
    if payment.stripe_checkout_session_id:
        try:
            session = stripe_client().v1.checkout.sessions.retrieve(payment.stripe_checkout_session_id)
        except stripe.StripeError as exc:
            raise _failure(exc) from exc
        url = field(session, "url")
        return CheckoutStarted(payment=payment, url=str(url) if url else None, replayed=True)
    _check_resendable(payment)
    url = _open_checkout(payment, success_url=success_url, cancel_url=cancel_url)
    return CheckoutStarted(payment=payment, url=url, replayed=True)


def _check_resendable(payment: Payment) -> None:
    """Raises the answer for a payment of a client's retry that must not be sent to Stripe again: one that failed,
    or one whose first send is older than Stripe keeps its key (the sweep settles it from Stripe's state)."""
    if payment.status != PaymentStatus.PENDING:
        message = payment.failure_message or "The payment did not go through."
        raise PaymentError(message, error_type="payment_failed", status=402, payment=payment)
    if payment.created_at < timezone.now() - RESEND_WITHIN:
        raise PaymentError(
            "This payment's outcome is not known yet; it is settled shortly.",
            error_type="payment_in_progress",
            status=409,
            payment=payment,
        )


# Auto top-up.


def auto_top_up(*, organization_id: uuid.UUID) -> Payment | None:
    """Charges the default card off-session when the balance is below the threshold, at most one at a time.

    The payment is created under the account's lock after checking that none is pending (and a unique
    constraint backs that), and not within ``BILLING_AUTO_TOP_UP_RETRY_SECONDS`` of a declined one.
    """
    with transaction.atomic():
        account = locked_account(organization_id)
        if not topups.needs_top_up(account):
            return None
        mine = Payment.objects.filter(organization_id=organization_id, kind=PaymentKind.AUTO_TOP_UP)
        if mine.filter(status=PaymentStatus.PENDING).exists():
            return None
        retry_after = timezone.now() - timedelta(seconds=settings.BILLING_AUTO_TOP_UP_RETRY_SECONDS)
        if mine.filter(status=PaymentStatus.FAILED, created_at__gte=retry_after).exists():
            return None
        payment = Payment.objects.create(
            organization_id=organization_id,
            kind=PaymentKind.AUTO_TOP_UP,
            amount_cents=account.auto_top_up_amount_cents,
            currency=account.currency,
            stripe_customer_id=account.stripe_customer_id,
            stripe_payment_method_id=account.default_payment_method_id,
        )
    try:
        return _charge(payment).payment
    except PaymentError as exc:
        logger.warning("auto top-up payment-%s of %s: %s", payment.pk, organization_id, exc)
        return exc.payment or payment


# Applying Stripe's state to our books (database only).


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


def _lock(payment: Payment) -> tuple[Account, Payment]:
    """The account, then the payment: the fixed order every writer of a payment takes."""
    account = locked_account(payment.organization_id)
    return account, locked(Payment.objects.filter(pk=payment.pk)).get()


def _check_customer(account: Account, customer: Any, what: str) -> None:
    customer_id = object_id(customer)
    if customer_id and account.stripe_customer_id and customer_id != account.stripe_customer_id:
        raise BillingError(f"{what} belongs to customer {customer_id}, not {account.stripe_customer_id}.")


@transaction.atomic
def apply_payment_intent(intent: stripe.PaymentIntent) -> Payment | None:
    """Brings our payment in line with the PaymentIntent's current state; credits the ledger once on success.

    Returns ``None`` when the PaymentIntent is not one of ours.
    """
    found = _payment_for(metadata=field(intent, "metadata"), payment_intent_id=intent.id)
    if found is None:
        return None
    account, payment = _lock(found)
    _check_customer(account, field(intent, "customer"), f"PaymentIntent {intent.id}")
    if payment.stripe_payment_intent_id and payment.stripe_payment_intent_id != intent.id:
        raise BillingError(f"payment-{payment.pk} is paid by {payment.stripe_payment_intent_id}, not {intent.id}.")
    payment.stripe_payment_intent_id = intent.id
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
        if payment.status != PaymentStatus.SUCCEEDED:
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
    account, payment = _lock(found)
    _check_customer(account, field(session, "customer"), f"Checkout Session {session.id}")
    if payment.stripe_checkout_session_id not in (None, "", session.id):
        raise BillingError(f"payment-{payment.pk} is paid through {payment.stripe_checkout_session_id}.")
    payment.stripe_checkout_session_id = session.id
    if field(session, "status") == "expired" and payment.status == PaymentStatus.PENDING:
        payment.status = PaymentStatus.CANCELED
    payment.save(update_fields=["stripe_checkout_session_id", "status"])
    if intent is not None:
        return apply_payment_intent(intent)
    return payment


def _take_back(
    account: Account,
    payment: Payment,
    *,
    kind: str,
    key: str,
    cents: int,
    taken: bool,
    given_back: bool,
    description: str,
    reversal: str,
) -> bool:
    """Money Stripe took back from a payment (a refund, a dispute): one negative entry ``key`` while it is
    taken, and one entry ``key-reversed`` that returns it if Stripe gives it back after. Answers whether
    the first was posted just now."""
    if taken:
        sign, entry_key, text = -1, key, description
    elif given_back and CreditEntry.objects.filter(idempotency_key=key).exists():
        sign, entry_key, text = 1, f"{key}-reversed", reversal
    else:
        return False
    _, posted = post_entry(
        account=account,
        kind=kind,
        amount_micros=sign * cents_to_micros(cents),
        idempotency_key=entry_key,
        description=text,
        payment=payment,
    )
    return posted and taken


@transaction.atomic
def apply_refunds(*, charge: Any, intent: stripe.PaymentIntent, refunds: Iterable[Any]) -> Payment | None:
    """One negative entry per Stripe refund that has gone through (``refund-<id>``), returned if it later failed.

    The PaymentIntent is applied first, so a refund seen before the payment's own event still finds it credited.
    """
    payment = apply_payment_intent(intent)
    if payment is None or payment.status != PaymentStatus.SUCCEEDED:
        return payment
    account = locked_account(payment.organization_id)  # already held: apply_payment_intent took it
    _check_customer(account, field(charge, "customer"), f"Charge {charge.id}")
    for refund in refunds:
        _take_back(
            account,
            payment,
            kind=EntryKind.REFUND,
            key=f"refund-{refund.id}",
            cents=int(refund.amount),
            taken=refund.status in REFUND_COUNTED,
            given_back=refund.status in REFUND_UNDONE,
            description="Refunded to the card",
            reversal="Refund to the card failed",
        )
    payment.amount_refunded_cents = _cents_out(payment, EntryKind.REFUND)
    payment.save(update_fields=["amount_refunded_cents"])
    return payment


@transaction.atomic
def apply_dispute(*, dispute: Any, intent: stripe.PaymentIntent) -> Payment | None:
    """A dispute takes its amount back while open or lost (``dispute-<id>``) and returns it if won.

    A new dispute also turns auto top-up off: charging, unattended, a card whose owner disputes a charge
    invites the next dispute.
    """
    payment = apply_payment_intent(intent)
    if payment is None or payment.status != PaymentStatus.SUCCEEDED:
        return payment
    account = locked_account(payment.organization_id)  # already held: apply_payment_intent took it
    opened = _take_back(
        account,
        payment,
        kind=EntryKind.DISPUTE,
        key=f"dispute-{dispute.id}",
        cents=int(dispute.amount),
        taken=dispute.status in DISPUTE_FUNDS_WITHDRAWN,
        given_back=dispute.status == "won",
        description=f"Payment disputed ({field(dispute, 'reason') or 'no reason given'})",
        reversal="Dispute won: the amount is back",
    )
    if opened and account.auto_top_up_enabled:
        controls.set_auto_top_up(organization=payment.organization, enabled=False)
    payment.amount_disputed_cents = _cents_out(payment, EntryKind.DISPUTE)
    payment.save(update_fields=["amount_disputed_cents"])
    return payment


def _cents_out(payment: Payment, kind: str) -> int:
    total = CreditEntry.objects.filter(payment=payment, kind=kind).aggregate(total=Sum("amount_micros"))["total"]
    return max(0, micros_to_cents(-(total or 0)))


# Settling what was left pending (the sweep).


def settle_stale_payments(*, older_than: timedelta | None = None, limit: int = 100) -> int:
    """Settles payments still pending long after Stripe was called, from Stripe's own state.

    An auto top-up that never got Stripe's answer is re-sent, the identical request under the same
    idempotency key (Stripe answers the first attempt's result, or makes it now). Any other payment
    with no PaymentIntent known is looked up at Stripe by its metadata (the answer and the webhook
    may both have been lost) and marked failed only if Stripe has none (a late success still
    credits it); a PaymentIntent left waiting for the customer a day is cancelled.
    """
    now = timezone.now()
    if older_than is None:
        older_than = timedelta(seconds=settings.BILLING_PAYMENT_SETTLE_AFTER_SECONDS)
    cutoff = now - older_than
    settled = 0
    client = stripe_client()
    for payment in Payment.objects.filter(status=PaymentStatus.PENDING, created_at__lt=cutoff).order_by("created_at")[
        :limit
    ]:
        try:
            _settle(client, payment, abandon=payment.created_at < now - timedelta(days=1))
            settled += 1
        except (stripe.StripeError, BillingError) as exc:
            logger.warning("could not settle payment-%s: %s", payment.pk, exc)
    return settled


def _settle(client: stripe.StripeClient, payment: Payment, *, abandon: bool) -> None:
    if payment.stripe_checkout_session_id and not payment.stripe_payment_intent_id:
        session = client.v1.checkout.sessions.retrieve(payment.stripe_checkout_session_id)
        intent_id = object_id(field(session, "payment_intent"))
        apply_checkout_session(session, client.v1.payment_intents.retrieve(intent_id) if intent_id else None)
        return
    resend = payment.kind == PaymentKind.AUTO_TOP_UP and payment.created_at >= timezone.now() - RESEND_WITHIN
    if not payment.stripe_payment_intent_id and resend:
        if not payment.stripe_customer_id:  # made before payments recorded their request: the best guess
            account = account_of(payment.organization)
            payment.stripe_customer_id = account.stripe_customer_id
            payment.stripe_payment_method_id = account.default_payment_method_id
        try:
            _charge(payment)
        except PaymentError as exc:
            logger.warning("auto top-up payment-%s retried: %s", payment.pk, exc)
        return
    if payment.stripe_payment_intent_id:
        intent: stripe.PaymentIntent | None = client.v1.payment_intents.retrieve(payment.stripe_payment_intent_id)
    else:
        intent = _find_payment_intent(client, payment)
    if intent is None:  # Stripe made nothing for it: nothing was charged
        _mark_failed(payment.pk, message="No answer from the payment provider.")
        return
    if abandon and intent.status in ("requires_action", "requires_payment_method", "requires_confirmation"):
        intent = client.v1.payment_intents.cancel(intent.id)
    apply_payment_intent(intent)


# The proof that our payments and Stripe's agree (billing.reconciliation calls this).


def compare_with_stripe(*, since: datetime | None = None) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Counts checked and every drift between our succeeded payments and Stripe's succeeded PaymentIntents.

    Ours → Stripe: each succeeded payment created since ``since`` has a succeeded PaymentIntent of
    the same amount, currency and customer, its credit entry posted once with the right micros, and
    refund entries that add up to what Stripe refunded. Stripe → ours: every succeeded PaymentIntent
    of our customers created since ``since`` is a succeeded payment of ours.
    """
    since = since or timezone.now() - timedelta(days=settings.BILLING_STRIPE_RECONCILE_DAYS)
    client = stripe_client()
    customers = set(Account.objects.exclude(stripe_customer_id="").values_list("stripe_customer_id", flat=True))
    listing = client.v1.payment_intents.list(
        params={"created": {"gte": int(since.timestamp())}, "limit": 100, "expand": ["data.latest_charge"]}
    )
    intents = {
        intent.id: intent
        for intent in listing.auto_paging_iter()
        if (object_id(field(intent, "customer")) or "") in customers
    }
    checked = {"payments": 0, "stripe_payment_intents": 0, "refunds": 0}
    drift: list[dict[str, Any]] = []

    def report(check: str, payment: Payment | None, intent_id: str | None, detail: str) -> None:
        drift.append(
            {
                "check": check,
                "payment_id": payment.pk if payment else None,
                "organization_id": str(payment.organization_id) if payment else None,
                "payment_intent": intent_id,
                "detail": detail,
            }
        )

    ours = Payment.objects.filter(status=PaymentStatus.SUCCEEDED, created_at__gte=since).select_related(
        "organization__billing_account"
    )
    for payment in ours.order_by("pk"):
        checked["payments"] += 1
        checked["refunds"] += _compare_payment(client, payment, intents, report)

    succeeded = {intent_id for intent_id, intent in intents.items() if intent.status == "succeeded"}
    known = {
        payment.stripe_payment_intent_id: payment
        for payment in Payment.objects.filter(stripe_payment_intent_id__in=succeeded)
    }
    for intent_id in sorted(succeeded):
        checked["stripe_payment_intents"] += 1
        recorded = known.get(intent_id)
        if recorded is None:
            report("stripe_payment_missing", None, intent_id, "Stripe has this succeeded payment; our ledger does not.")
        elif recorded.status != PaymentStatus.SUCCEEDED:
            report("stripe_payment_missing", recorded, intent_id, f"Stripe says succeeded; we say {recorded.status}.")
    return checked, drift


def _compare_payment(client: stripe.StripeClient, payment: Payment, intents: dict[str, Any], report: Any) -> int:
    """Reports the drifts of one payment; answers 1 if its refunds could be compared, else 0."""
    intent_id = payment.stripe_payment_intent_id
    if not intent_id:
        report("payment_without_intent", payment, None, "A succeeded payment with no PaymentIntent.")
        return 0
    intent = intents.get(intent_id)
    if intent is None:
        try:
            intent = client.v1.payment_intents.retrieve(intent_id, params={"expand": ["latest_charge"]})
        except stripe.InvalidRequestError:
            report("intent_missing", payment, intent_id, "Stripe has no such PaymentIntent.")
            return 0
    customer = payment.organization.billing_account.stripe_customer_id
    received = int(field(intent, "amount_received") or 0)
    if intent.status != "succeeded":
        report("intent_not_succeeded", payment, intent_id, f"Stripe says {intent.status}.")
    if received != payment.amount_cents or intent.currency != payment.currency:
        report(
            "amount",
            payment,
            intent_id,
            f"Stripe received {received} {intent.currency}; we say {payment.amount_cents} {payment.currency}.",
        )
    if object_id(field(intent, "customer")) != customer:
        report(
            "customer",
            payment,
            intent_id,
            f"Stripe's customer {object_id(field(intent, 'customer'))}, ours {customer}.",
        )
    posted = list(CreditEntry.objects.filter(payment=payment, kind__in=PURCHASE_ENTRY_KINDS))
    expected = cents_to_micros(payment.amount_cents)
    if len(posted) != 1 or posted[0].idempotency_key != payment.idempotency_key:
        report("credit_count", payment, intent_id, f"{len(posted)} credit entries for the payment; expected one.")
    elif posted[0].amount_micros != expected:
        report("credit_amount", payment, intent_id, f"Credited {posted[0].amount_micros} µ$; paid {expected} µ$.")
    charge = field(intent, "latest_charge")
    if charge is None or isinstance(charge, str):
        return 0
    refunded_cents = int(field(charge, "amount_refunded") or 0)
    entries = CreditEntry.objects.filter(payment=payment, kind=EntryKind.REFUND).aggregate(total=Sum("amount_micros"))
    refunded_micros = -(entries["total"] or 0)
    if refunded_micros != cents_to_micros(refunded_cents) or payment.amount_refunded_cents != refunded_cents:
        report(
            "refunds",
            payment,
            intent_id,
            f"Stripe refunded {refunded_cents}¢; our entries {refunded_micros} µ$, "
            f"our payment {payment.amount_refunded_cents}¢.",
        )
    return 1
