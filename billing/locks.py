"""Locks on billing's rows, in the platform's one lock order (``accounts.locking``): a Stripe event before
anything else; then, after inference's rows, the job's API key (shared), the job's hold, the organization's
account, then its payments.

The organization's ``Account`` row caches the balance and the held amount, so every admission and settlement of
the organization writes it: its lock is the one a busy tenant's work queues for. A transaction therefore takes it
as late as it can and keeps the work after it small. Rows nobody else contends for (the job's hold, its usage
record) are written first; where a decision needs only the account's own columns (is the credit there, is there no
budget; does the balance cover this debit) it is the condition of the one UPDATE that takes the lock, which
PostgreSQL checks again on the row as committed when it had to wait for it. A decision that reads other rows (a
budget's or a key's spend, from the rollups and holds) is made under the lock (``locked_account``), where nothing
it reads can change until it commits: every writer of a hold or of spend writes the account in the same
transaction. A payment row is locked after the account, so each writer of a payment takes both in the same order.

A spend limit on a key, or on a member (every key the member made), is read by admission behind the key's share lock
and changed behind an exclusive lock on the key, or on every key of the member (``share_key``, ``lock_key``,
``lock_member_keys``).
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import IntegrityError, connection, transaction

from accounts.locking import locked
from accounts.models import ApiKey, Organization
from billing.models import Account, Hold, Payment, StripeEvent


def locked_stripe_event(event_id: str) -> StripeEvent:
    """The stored Stripe event, locked while its effects are applied (one processing of it at a time)."""
    return locked(StripeEvent.objects.filter(pk=event_id)).get()


def share_key(api_key_id: uuid.UUID) -> None:
    """Share-locks the API key's row for this transaction, before its spend limit is read.

    Every admission under the key may hold this lock at once; a new or changed limit (``lock_key``) waits for the
    admissions that hold it to commit, and the admissions after it wait for the limit to commit. So an admission
    that read "no limit" committed its hold before the limit took effect, and the next admission under the limit
    counts that hold. (A plain SELECT: SQLite runs one writer at a time.)
    """
    if not connection.features.has_select_for_update:
        return
    with connection.cursor() as cursor:
        cursor.execute(*key_share_lock(api_key_id))


def key_share_lock(api_key_id: uuid.UUID) -> tuple[str, list[Any]]:
    """The statement ``share_key`` sends (PostgreSQL), for a caller that sends it with the next one
    (``accounts.statements.in_turn``)."""
    pk = ApiKey._meta.pk
    assert pk is not None  # noqa: S101 - every model has one
    return (
        f"SELECT 1 FROM {ApiKey._meta.db_table} WHERE {pk.column} = %s FOR KEY SHARE",  # noqa: S608
        [pk.get_db_prep_value(api_key_id, connection)],
    )


def lock_key(api_key_id: uuid.UUID) -> None:
    """Locks the API key's row exclusively for this transaction, while its spend limit changes (``share_key``)."""
    list(ApiKey.objects.select_for_update(of=("self",)).filter(pk=api_key_id).values_list("pk", flat=True))


def lock_member_keys(organization_id: uuid.UUID, user_id: Any) -> None:
    """Locks every API key the member made in the organization exclusively for this transaction, while the member's
    spend limit changes (``billing.controls.set_member_limit``).

    The member's limit is read by an admission under any of those keys behind that key's share lock (``share_key``),
    as the key's own limit is: the change waits for those admissions to commit, and the admissions after it wait for
    the change, so every admission that read the old limit (or none) has its hold in the books the next one counts.
    The caller first locks the organization (``accounts.locking.lock_organization``), which the making of a key takes
    too (``accounts.services.create_api_key``): no key of the member is being made while this reads which keys are
    theirs, and none is made until the change commits. Plain ``FOR UPDATE`` on the keys, in primary-key order, and
    nothing else (step 5 of the lock order, after the organization).
    """
    keys = ApiKey.objects.select_for_update(of=("self",)).filter(organization_id=organization_id, created_by_id=user_id)
    list(keys.order_by("pk").values_list("pk", flat=True))


def lock_organization_exclusively(organization_id: uuid.UUID) -> None:
    """Locks the organization's row with a plain ``FOR UPDATE`` while an end user's limit changes: it waits for the
    admissions that share-locked the row to read a tag's limit (``billing.end_users``), and they for it."""
    rows = Organization.objects.select_for_update(of=("self",)).filter(pk=organization_id)
    list(rows.values_list("pk", flat=True))


def locked_open_hold(job_id: uuid.UUID) -> Hold | None:
    """The job's open hold (None: none is open), locked for this transaction, before its account's lock."""
    return locked(Hold.objects.filter(job_id=job_id, released_at=None)).first()


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
