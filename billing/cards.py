"""Customers and saved cards: the organization's Stripe customer, and the cards saved to it.

Stripe is called before the database records what it did, so no lock is held across a network call; each
change is stored and audited under the account's lock in a transaction of its own.
"""

from __future__ import annotations

from typing import Any

import stripe
from django.db import transaction
from django.utils import timezone

from accounts.models import AuditAction, Membership, Organization, Role
from accounts.services import SYSTEM, Actor, record_audit
from billing import controls
from billing.ledger import account_of
from billing.locks import locked_account
from billing.models import Account
from billing.stripe_client import field, idempotency, object_id, stripe_client
from billing.stripe_errors import PaymentError, catch_stripe_errors


@catch_stripe_errors()
def ensure_customer(organization: Organization) -> str:
    """The organization's Stripe customer id, creating the customer on first use (once, however often called).

    The customer is looked up at Stripe first: one deleted there (by an operator in Stripe's dashboard) is forgotten
    (``forget_deleted_customer``) and a new one made, so the organization can save a card and pay again."""
    account = account_of(organization)
    if account.stripe_customer_id:
        if not deleted_at_stripe(account.stripe_customer_id):
            return account.stripe_customer_id
        forgotten = forget_deleted_customer(customer_id=account.stripe_customer_id)
        account = forgotten if forgotten is not None else account_of(organization)
        if account.stripe_customer_id:  # another request made the new one first
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
    customer = stripe_client().v1.customers.create(
        params=params,  # type: ignore[arg-type]
        options=idempotency(customer_idempotency_key(organization.pk, deleted=account.stripe_customers_deleted)),
    )
    with transaction.atomic(durable=True):
        account = locked_account(organization.pk)
        if not account.stripe_customer_id:
            account.stripe_customer_id = customer.id
            account.updated_at = timezone.now()
            account.save(update_fields=["stripe_customer_id", "updated_at"])
    return account.stripe_customer_id


def customer_idempotency_key(organization_id: Any, *, deleted: int) -> str:
    """The key the organization's Stripe customer is made under: ``customer-<organization>`` for the first, and one
    more suffix per customer deleted at Stripe (Stripe answers a key it has seen with what it made then, for a day:
    the deleted customer). A retry after a crash reuses it: the count changes only when a customer is forgotten."""
    return f"customer-{organization_id}" + (f"-{deleted}" if deleted else "")


def deleted_at_stripe(customer_id: str) -> bool:
    """Whether Stripe has deleted the customer (it answers a deleted one as ``deleted: true``, or not at all: 404).
    Raises Stripe's error when Stripe could not say."""
    try:
        customer = stripe_client().v1.customers.retrieve(customer_id)
    except stripe.InvalidRequestError as exc:
        if exc.http_status == 404:
            return True
        raise
    return bool(field(customer, "deleted"))


def forget_deleted_customer(*, customer_id: str) -> Account | None:
    """Forgets a Stripe customer deleted at Stripe, with the cards it held (Stripe deletes them with it): the account
    has no customer and no default card, auto top-up is turned off (nothing is left to charge), and the next
    ``ensure_customer`` makes a new customer under a key of its own. Audited as the default card's removal.

    Answers the account as left, or ``None`` when no organization has this customer (one forgotten before, or never
    ours). Payments made through the deleted customer keep it (``Payment.stripe_customer_id``): their refunds and
    disputes still apply to them."""
    organization_id = Account.objects.filter(stripe_customer_id=customer_id).values_list("pk", flat=True).first()
    if organization_id is None:
        return None
    with transaction.atomic():
        account = locked_account(organization_id)
        if account.stripe_customer_id != customer_id:  # forgotten (and perhaps replaced) meanwhile
            return None
        removed_card = account.default_payment_method_id
        account.stripe_customer_id = ""
        account.default_payment_method_id = ""
        account.stripe_customers_deleted += 1
        account.updated_at = timezone.now()
        account.save(
            update_fields=["stripe_customer_id", "default_payment_method_id", "stripe_customers_deleted", "updated_at"]
        )
        organization = Organization.objects.get(pk=organization_id)
        record_audit(
            action=AuditAction.PAYMENT_METHOD_REMOVED,
            organization=organization,
            target=account,
            metadata={
                "payment_method_id": removed_card or None,
                "stripe_customer_id": customer_id,
                "reason": "The Stripe customer was deleted at Stripe, with its cards.",
            },
        )
        if account.auto_top_up_enabled:
            account = controls.set_auto_top_up(organization=organization, enabled=False)
    return account


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


@catch_stripe_errors()
def list_payment_methods(organization: Organization) -> list[dict[str, Any]]:
    account = account_of(organization)
    if not account.stripe_customer_id:
        return []
    methods = stripe_client().v1.payment_methods.list(
        params={"customer": account.stripe_customer_id, "type": "card", "limit": 100}
    )
    return [card_summary(method, default_id=account.default_payment_method_id) for method in methods.auto_paging_iter()]


@catch_stripe_errors()
def own_method(customer_id: str, payment_method_id: str) -> stripe.PaymentMethod:
    """The saved payment method, if it belongs to this customer (never another organization's card)."""
    try:
        method = stripe_client().v1.payment_methods.retrieve(payment_method_id)
    except stripe.InvalidRequestError:
        method = None
    if method is None or object_id(method.customer) != customer_id:
        raise PaymentError(f"No saved payment method {payment_method_id}.", error_type="not_found", status_code=404)
    return method


@catch_stripe_errors()
def _check_attachable(customer_id: str, payment_method_id: str) -> None:
    """Refuses a card already saved to another customer: Stripe's attach would move it, and another
    organization's card would then pay for this one. A card on no customer yet (fresh from Stripe.js) is fine.

    Answered as an unknown id (404), so that probing says nothing about other organizations' cards.
    """
    try:
        method = stripe_client().v1.payment_methods.retrieve(payment_method_id)
    except stripe.InvalidRequestError:
        raise PaymentError(f"No payment method {payment_method_id}.", error_type="not_found", status_code=404) from None
    owner = object_id(method.customer)
    if owner and owner != customer_id:
        raise PaymentError(f"No payment method {payment_method_id}.", error_type="not_found", status_code=404)


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


@catch_stripe_errors()
def attach_payment_method(
    *, organization: Organization, payment_method_id: str, make_default: bool = False, actor: Actor = SYSTEM
) -> dict[str, Any]:
    """Saves a payment method (e.g. made by Stripe.js) to the organization; the first one becomes the default."""
    customer_id = ensure_customer(organization)
    _check_attachable(customer_id, payment_method_id)
    method = stripe_client().v1.payment_methods.attach(payment_method_id, params={"customer": customer_id})
    made_default = make_default or not account_of(organization).default_payment_method_id
    if made_default:
        _make_stripe_default(customer_id=customer_id, payment_method_id=method.id)
    with transaction.atomic(durable=True):
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
    method = own_method(customer_id, payment_method_id)
    _make_stripe_default(customer_id=customer_id, payment_method_id=method.id)
    with transaction.atomic(durable=True):
        account = locked_account(organization.pk)
        previous_id = _save_default(account, method.id)
        _record_card_change(
            AuditAction.PAYMENT_METHOD_DEFAULT_CHANGED, account=account, organization=organization, actor=actor,
            method=method, previous_default_id=previous_id or None,
        )  # fmt: skip
    return card_summary(method, default_id=method.id)


@catch_stripe_errors()
def _make_stripe_default(*, customer_id: str, payment_method_id: str) -> None:
    """The card Stripe charges by default (before the database says so: no lock is held across the call)."""
    stripe_client().v1.customers.update(
        customer_id, params={"invoice_settings": {"default_payment_method": payment_method_id}}
    )


def _save_default(account: Account, payment_method_id: str) -> str:
    """Records the default card on a locked account; the id of the one it replaces ("" if none)."""
    previous_id = account.default_payment_method_id
    account.default_payment_method_id = payment_method_id
    account.updated_at = timezone.now()
    account.save(update_fields=["default_payment_method_id", "updated_at"])
    return previous_id


@catch_stripe_errors()
def detach_payment_method(*, organization: Organization, payment_method_id: str, actor: Actor = SYSTEM) -> None:
    """Removes a saved card. Removing the default one turns auto top-up off (it would have nothing to charge)."""
    account = account_of(organization)
    if not account.stripe_customer_id:
        raise PaymentError(f"No saved payment method {payment_method_id}.", error_type="not_found", status_code=404)
    method = own_method(account.stripe_customer_id, payment_method_id)
    stripe_client().v1.payment_methods.detach(method.id)
    with transaction.atomic(durable=True):
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
