"""Holds: credit set aside for a queued or running job, released when the job reaches its end."""

from __future__ import annotations

import uuid

from django.db import connection
from django.utils import timezone

from billing.models import Account, Hold


def place(*, account: Account, hold: Hold) -> None:
    """Saves the job's hold on a locked account and adds it to the cached ``held_micros``.

    ``hold`` is a new, open row object. A job has one hold row (keyed by the job). A job an operator requeued had its
    earlier hold released when that run ended: the row is overwritten, open again, with the new amount. Were it still
    open (a final job holds nothing: books reconciliation already flags), it is replaced, never counted twice.
    """
    earlier = Hold.objects.filter(job_id=hold.job_id).values_list("amount_micros", "released_at").first()
    if earlier is None:
        hold.save(force_insert=True)
    else:
        earlier_micros, earlier_released_at = earlier
        if earlier_released_at is None:
            account.held_micros -= earlier_micros
        hold.save(force_update=True)
    account.held_micros += hold.amount_micros
    account.save(update_fields=["held_micros"])


def release(*, account: Account, job_id: uuid.UUID, save: bool = True) -> int:
    """Releases the job's open hold on a locked account; the amount released (0 if none was open).

    ``save=False``: the caller saves the account itself in this transaction (``ledger.post_entry`` does).
    """
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
    if released is None:
        return 0
    (amount_micros,) = released
    account.held_micros -= amount_micros
    if save:
        account.save(update_fields=["held_micros"])
    return amount_micros
