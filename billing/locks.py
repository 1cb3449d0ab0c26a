"""Locks on billing's rows, in the platform's one lock order (``accounts.locking``): a Stripe event before
anything else, later the organization's account, then its payments.

A transaction that writes money locks the organization's ``Account`` first: the cached balance and held amount
change with the rows they summarise, one writer per organization at a time. A job's hold and a payment are
written only under that lock; a payment row is locked after it, so each writer of a payment takes both in the
same order.
"""

from __future__ import annotations

import uuid

from django.db import IntegrityError, transaction

from accounts.locking import locked
from billing.models import Account, Payment, StripeEvent


def locked_stripe_event(event_id: str) -> StripeEvent:
    """The stored Stripe event, locked while its effects are applied (one processing of it at a time)."""
    return locked(StripeEvent.objects.filter(pk=event_id)).get()


def locked_account(organization_id: uuid.UUID) -> Account:
    """The organization's account, locked for this transaction (created on first use); only its own row."""
    account = locked(Account.objects.filter(pk=organization_id)).first()
    if account is None:
        try:
            with transaction.atomic():
                Account.objects.create(organization_id=organization_id)
        except IntegrityError:
            pass  # created by a concurrent transaction: lock that one
        account = locked(Account.objects.filter(pk=organization_id)).get()
    return account


def locked_payment(payment: Payment) -> tuple[Account, Payment]:
    """The payment's account, then the payment (as last committed), both locked for this transaction."""
    account = locked_account(payment.organization_id)
    return account, locked(Payment.objects.filter(pk=payment.pk)).get()
