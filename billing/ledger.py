"""The prepaid credit ledger: append entries, keep the cached balance true, grant and refund.

Every movement writes the organization's ``Account`` row (its cached balance) before its entry, whose
``balance_after_micros`` is the balance that write left: the account's lock orders the entries of an organization
as it orders their balances. Grants, refunds and payments lock the account first (``billing.locks``) and then
decide; a settlement's debit, decided by the balance alone, is the one conditional UPDATE that takes the lock
(``debit_usage``), and on PostgreSQL the same statement appends its entry and the rollups, so the lock is held for
the rest of that statement and the COMMIT.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from accounts import statements
from accounts.errors import AppError
from accounts.models import AuditAction, Organization
from accounts.services import SYSTEM, Actor, record_audit
from billing.locks import locked_account
from billing.models import Account, CreditEntry, EntryKind, Payment, UsageRecord
from inference.models import FINAL_STATUSES, Job


class BillingError(AppError):
    """A request the rules of money do not allow now (auto top-up with no saved card, a refund made twice)."""

    status_code = 409
    error_type = "billing_conflict"


def account_of(organization: Organization) -> Account:
    """The account for reading (created on first use)."""
    account, _ = Account.objects.get_or_create(organization=organization)
    return account


def post_entry(
    *,
    account: Account,
    kind: str,
    amount_micros: int,
    idempotency_key: str,
    description: str = "",
    usage_record: UsageRecord | None = None,
    payment: Payment | None = None,
    job: Job | None = None,
    created_by: Any = None,
    key_is_new: bool = False,
    created_at: datetime | None = None,
) -> tuple[CreditEntry, bool]:
    """Appends one entry to a locked account, or returns the entry already posted under this key.

    Must run inside the transaction that locked ``account``; saves its cached balance (and its held
    amount, which a caller may have changed under the same lock). ``key_is_new``: the key names a row
    made in this transaction, so no earlier entry can hold it (the unique index still guards it).
    ``created_at``: the instant of what the entry records, where that has one (a usage debit is stamped with its
    record's ``recorded_at``, so both fall in the same day and month); now otherwise.
    """
    existing = None if key_is_new else CreditEntry.objects.filter(idempotency_key=idempotency_key).first()
    if existing is not None:
        if existing.organization_id != account.organization_id or existing.amount_micros != amount_micros:
            raise BillingError(f"Idempotency key {idempotency_key} was used for a different movement.")
        return existing, False
    account.balance_micros += amount_micros
    account.updated_at = timezone.now()
    entry = _entry_of_moved_balance(
        created_at=account.updated_at if created_at is None else created_at,
        account=account,
        kind=kind,
        amount_micros=amount_micros,
        idempotency_key=idempotency_key,
        description=description,
        usage_record=usage_record,
        payment=payment,
        job=job,
        created_by=created_by,
    )
    account.save(update_fields=["balance_micros", "held_micros", "updated_at"])
    return entry, True


def _entry_of_moved_balance(
    *,
    created_at: datetime,
    account: Account,
    kind: str,
    amount_micros: int,
    idempotency_key: str,
    description: str,
    usage_record: UsageRecord | None = None,
    payment: Payment | None = None,
    job: Job | None = None,
    created_by: Any = None,
) -> CreditEntry:
    """The entry of a movement ``account``'s balance already shows (its row written or to be written in this
    transaction, under its lock); a debit that leaves the account low queues an auto top-up."""
    entry = CreditEntry.objects.create(
        organization_id=account.organization_id,
        kind=kind,
        amount_micros=amount_micros,
        balance_after_micros=account.balance_micros,
        idempotency_key=idempotency_key,
        usage_record=usage_record,
        payment=payment,
        job=job,
        description=description[:300],
        created_by=created_by,
        created_at=created_at,
    )
    if amount_micros < 0:
        from billing import topups  # lazily: the ledger needs no Celery to import

        topups.schedule_if_low(account)
    return entry


# What a settlement's debit reads back from the account it wrote: the balance its entry records, what decides
# an auto top-up, and whether spend alerts watch the organization (billing.alerts).
_DEBITED_COLUMNS = (
    "balance_micros",
    "held_micros",
    "auto_top_up_enabled",
    "auto_top_up_threshold_micros",
    "default_payment_method_id",
    "stripe_customer_id",
    "alerts_armed",
)

Statements = Callable[..., list[tuple[str, list[Any]]]]


def debit_usage(
    *,
    usage_record: UsageRecord,
    released_micros: int,
    job: Job,
    description: str,
    along: Statements | None = None,
) -> Account | None:
    """Debits a settlement's usage (``usage_record.cost_micros``, more than 0) and takes the hold it released off the
    held amount, where the balance covers the debit; then appends the debit's entry. Answers the account as the debit
    left it (the columns of ``_DEBITED_COLUMNS``). None, and nothing written but the record: the balance does not
    cover the cost (credit was taken back), and the caller settles on the locked account.

    ``usage_record``, not yet written, is inserted first (in every case: the record exists whether or not the debit
    is made): on PostgreSQL by the same statement.

    The account's UPDATE is the statement that takes its lock: ``balance -= cost, held -= released`` where
    ``balance >= cost``, a condition PostgreSQL checks again on the row as committed when it had to wait for the
    lock. So usage never takes the balance below zero, and the debit is the one ``cost_within`` gives with the
    balance as a further ceiling (the cost fits under it). The entry records the balance that UPDATE left.

    ``along(usage_record, only_where=...)``: further upserts summarising the debit (the usage rollups, and an end
    user's), written under the same lock and only if the debit is made. On PostgreSQL the record's insert, the UPDATE,
    the entry and those upserts are one statement, so the lock is held for the rest of that statement and the COMMIT;
    where the statement is the transaction's last (``accounts.statements.commits_along``: a worker's finish, a reap)
    the COMMIT goes in the same query, and no round trip of the client's falls inside the lock. Elsewhere (SQLite,
    one writer at a time) they are one statement each.

    The entry is stamped with the record's ``recorded_at``, the instant the rollups are bucketed by, not with the
    moment of this statement: stamped apart, a settlement that straddles midnight would put its cost in one month's
    usage and the next month's ledger (its statement, its reconciliation).
    """
    cost = usage_record.cost_micros
    organization_id = usage_record.organization_id
    now = timezone.now()
    settled_at = usage_record.recorded_at
    columns = {field.name: field for field in Account._meta.concrete_fields}
    balance, held, key = columns["balance_micros"].column, columns["held_micros"].column, columns["organization"]
    returning = ", ".join(f"{columns[name].column}" for name in _DEBITED_COLUMNS)
    debit = (
        f"UPDATE {Account._meta.db_table} SET {balance} = {balance} - %s, {held} = {held} - %s, "  # noqa: S608
        f"{columns['updated_at'].column} = %s WHERE {key.column} = %s AND {balance} >= %s RETURNING {returning}"
    )
    parameters: list[Any] = [
        cost,
        released_micros,
        columns["updated_at"].get_db_prep_value(now, connection),
        key.get_db_prep_value(organization_id, connection),
        cost,
    ]
    if connection.vendor == "postgresql":
        # The record and the entry naming it: the entry's key is the record's.
        record_sql, record_parameters = statements.insertion(usage_record)
        record_id = "(SELECT id FROM record)"
        parameters = [*record_parameters, *parameters]
        entries = {field.name: field for field in CreditEntry._meta.concrete_fields}
        values = {
            "organization": organization_id,
            "kind": EntryKind.USAGE.value,
            "amount_micros": -cost,
            "job": job.pk,
            "description": description[:300],
            "created_at": settled_at,
        }
        names = [*values, "usage_record", "idempotency_key", "balance_after_micros"]
        sql = (
            f"WITH record AS ({record_sql}), debited AS ({debit}), entry AS (INSERT INTO {CreditEntry._meta.db_table} "  # noqa: S608
            f"({', '.join(f'{entries[name].column}' for name in names)}) "
            f"SELECT {', '.join(['%s'] * len(values))}, {record_id}, 'usage-' || {record_id}, {balance} FROM debited)"
        )
        parameters += [entries[name].get_db_prep_value(value, connection) for name, value in values.items()]
        summaries = along(usage_record, only_where="EXISTS (SELECT 1 FROM debited)") if along is not None else []
        for number, (summary, summary_parameters) in enumerate(summaries):
            sql += f", summary_{number} AS ({summary})"
            parameters += summary_parameters
        sql += f" SELECT {record_id}, debited.* FROM (SELECT 1) AS settled LEFT JOIN debited ON true"  # noqa: S608
        with connection.cursor() as cursor:
            if statements.commits_along(connection):
                # The settlement's last statement, carrying its COMMIT: the account's lock is held to the end of this
                # query. A debit the balance does not cover fails it (the transaction runs again, deciding under the
                # lock) rather than commit the record without it.
                unless = statements.unless_unmet(f"debited.{balance} IS NOT NULL")
                statements.commit_along(cursor, (f"{sql} WHERE {unless}", parameters))
            else:
                cursor.execute(sql, parameters)
            record_pk, *row = cursor.fetchone()
        statements.written(usage_record, record_pk)
        if row[0] is None:  # the balance, never NULL where the debit was made
            return None
        account = _debited_account(organization_id, now, tuple(row))
        from billing import topups  # lazily: the ledger needs no Celery to import

        topups.schedule_if_low(account)
        return account
    statements.insert(usage_record)
    with connection.cursor() as cursor:
        cursor.execute(debit, parameters)
        row = cursor.fetchone()
    if row is None:
        return None
    account = _debited_account(organization_id, now, row)
    _entry_of_moved_balance(
        created_at=settled_at,
        account=account,
        kind=EntryKind.USAGE,
        amount_micros=-cost,
        idempotency_key=f"usage-{usage_record.pk}",
        description=description,
        usage_record=usage_record,
        job=job,
    )
    for summary, summary_parameters in along(usage_record) if along is not None else []:
        with connection.cursor() as cursor:
            cursor.execute(summary, summary_parameters)
    return account


def _debited_account(organization_id: Any, updated_at: Any, row: tuple[Any, ...]) -> Account:
    debited = dict(zip(_DEBITED_COLUMNS, row, strict=True))
    return Account(organization_id=organization_id, updated_at=updated_at, **debited)


@transaction.atomic
def grant_credits(
    *,
    organization: Organization,
    amount_micros: int,
    reason: str,
    actor: Actor = SYSTEM,
    idempotency_key: str | None = None,
    kind: str = EntryKind.GRANT,
) -> CreditEntry:
    """Free credits (or, with ``kind=adjustment``, a correction of either sign) from an operator or the system."""
    if kind not in (EntryKind.GRANT, EntryKind.ADJUSTMENT):
        raise BillingError("Only grants and adjustments are made by hand.")
    if amount_micros == 0 or (kind == EntryKind.GRANT and amount_micros < 0):
        raise BillingError("A grant adds a positive amount; use an adjustment to remove credit.")
    if not reason.strip():
        raise BillingError("Say why: the reason is shown to the customer in their ledger.")
    account = locked_account(organization.pk)
    entry, created = post_entry(
        account=account,
        kind=kind,
        amount_micros=amount_micros,
        idempotency_key=idempotency_key or f"{kind}-{uuid.uuid4()}",
        description=reason,
        created_by=actor.user,
    )
    if created:
        record_audit(
            action=AuditAction.CREDITS_GRANTED if kind == EntryKind.GRANT else AuditAction.CREDITS_ADJUSTED,
            actor=actor,
            organization=organization,
            target=entry,
            metadata={"amount_micros": amount_micros, "reason": reason},
        )
    return entry


@transaction.atomic
def refund_job(*, job: Job, actor: Actor = SYSTEM, reason: str = "") -> CreditEntry:
    """Gives back what a finished request cost, once (the usage records stay: the refund is a new entry), and takes it
    off the spend its budget, its key's and its end user's limits count, in the month each record was recorded in
    (``billing.metering.count_as_refunded``, in the same transaction: with the entry, so once).

    Decided under the organization's account lock, which every settlement takes to write a usage record: what it
    sums cannot grow until it commits. A request not finished (queued, running, or requeued by an operator) is
    refused: usage billed after the refund could never be refunded, its one refund spent."""
    from billing import metering  # lazily: metering debits through the ledger

    account = locked_account(job.organization_id)
    status = Job.objects.filter(pk=job.pk).values_list("status", flat=True).first()
    if status not in FINAL_STATUSES:
        raise BillingError("This request has not finished: refund it once it has.")
    # Written after the job was created: the bound prunes earlier months' partitions (billing.partitions).
    billed = list(UsageRecord.objects.filter(job_id=job.pk, billable=True, recorded_at__gte=job.created_at))
    charged = sum(record.cost_micros for record in billed)
    if charged == 0:
        raise BillingError("This request cost nothing; there is nothing to refund.")
    entry, created = post_entry(
        account=account,
        kind=EntryKind.REFUND,
        amount_micros=charged,
        idempotency_key=f"job-refund-{job.pk}",
        description=reason or f"Refund of request {job.pk}",
        job=job,
        created_by=actor.user,
    )
    if not created:
        raise BillingError("This request has already been refunded.")
    metering.count_as_refunded(billed)
    record_audit(
        action=AuditAction.JOB_REFUNDED,
        actor=actor,
        organization=job.organization,
        target=job,
        metadata={"amount_micros": charged, "reason": reason},
    )
    return entry
