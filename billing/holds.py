"""Holds: credit set aside for a queued or running job, released when the job reaches its end.

A job's hold row is written before its organization's account, whose ``held_micros`` caches the sum of the open
holds (the lock order of ``accounts.locking``: the job's hold, then the account). The hold row is the job's own:
nobody else waits for it, so writing it first keeps it out of the time the account's row stays locked, which every
admission and settlement of the organization shares. These functions write the hold row and answer how much the
account's held amount changes; the caller moves the account by that much in the same transaction.
"""

from __future__ import annotations

import uuid

from django.db import connection
from django.utils import timezone

from accounts import statements
from billing.models import Account, Hold


def place(*, hold: Hold, new: bool = False) -> int:
    """Saves the job's hold, open; the change to the account's held amount (the caller applies it).

    ``hold`` is a new, open row object. A job has one hold row (keyed by the job). A job an operator requeued had its
    earlier hold released when that run ended: the row is overwritten, open again, with the new amount. Were it still
    open (a final job holds nothing: books reconciliation already flags), it is replaced, never counted twice.

    ``new``: the job was inserted by this transaction (a submission), so no earlier row can exist and none is looked
    for: the insert alone, one statement of every submission fewer. Were one there after all, the insert fails on
    the job's unique key and the submission rolls back; nothing is counted twice.
    """
    if new:
        hold.save(force_insert=True)
        return hold.amount_micros
    earlier = Hold.objects.filter(job_id=hold.job_id).values_list("amount_micros", "released_at").first()
    if earlier is None:
        hold.save(force_insert=True)
        return hold.amount_micros
    earlier_micros, earlier_released_at = earlier
    hold.save(force_update=True)
    return hold.amount_micros - (earlier_micros if earlier_released_at is None else 0)


def release(*, job_id: uuid.UUID) -> int:
    """Releases the job's open hold; the amount released (0 if none was open), which the caller takes off the
    account's held amount in the same transaction."""
    # One statement closes the job's open hold (one row at most) and says how much it held (PostgreSQL, and SQLite
    # from 3.35).
    fields = {field.name: field for field in Hold._meta.concrete_fields}
    released_at, job, amount = fields["released_at"], fields["job"], fields["amount_micros"]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Hold._meta.db_table} SET {released_at.column} = %s "  # noqa: S608
            f"WHERE {job.column} = %s AND {released_at.column} IS NULL RETURNING {amount.column}",
            [released_at.get_db_prep_value(timezone.now(), connection), job.get_db_prep_value(job_id, connection)],
        )
        released = cursor.fetchone()
    return 0 if released is None else int(released[0])


def take_off_held(*, organization_id: uuid.UUID, amount_micros: int) -> None:
    """Takes a released hold off the account's held amount: one UPDATE, the statement that locks the account (no
    limit can refuse credit given back, so nothing is read under the lock first)."""
    with connection.cursor() as cursor:
        for sql, values in taking_off_held(organization_id=organization_id, amount_micros=amount_micros):
            cursor.execute(sql, values)


def taking_off_held(*, organization_id: uuid.UUID, amount_micros: int) -> list[statements.Statement]:
    """``take_off_held``'s UPDATE as a statement to send with others (none where nothing was released)."""
    if not amount_micros:
        return []
    columns = {field.name: field.column for field in Account._meta.concrete_fields}
    key = Account._meta.get_field("organization")
    sql = (
        f"UPDATE {Account._meta.db_table} SET {columns['held_micros']} = {columns['held_micros']} - %s "  # noqa: S608
        f"WHERE {columns['organization']} = %s"
    )
    return [(sql, [amount_micros, key.get_db_prep_value(organization_id, connection)])]
