"""Monthly partitions of the usage records on PostgreSQL, and the task's work of creating them ahead.

``billing_usagerecord`` is a table partitioned by RANGE on ``recorded_at``, one partition per UTC month
(``billing_usagerecord_p2026_12``), and a DEFAULT partition that catches a row whose month has no partition yet
(a beat that stopped for months): a usage record is never refused for want of a partition. The scheduler
(``billing.create_partitions_ahead``, hourly) creates the current month and the ``MONTHS_AHEAD`` after it, so the
default partition stays empty. SQLite keeps a plain table: migration 0013 converts only on PostgreSQL.

Why the table is split, and what keeps its guarantees:

- A month is the unit of history: the usage page, rollup rebuilds and the incremental reconciliation read a range
  of ``recorded_at``, which the planner prunes to the months it touches, and a closed month can be detached and
  archived whole, vacuumed and indexed apart from the month being written.
- PostgreSQL enforces a partitioned table's unique constraints only if they include the partition key, so
  ``(job, attempt_number)`` cannot be unique on the usage records themselves, nor ``id`` alone. The narrow,
  unpartitioned ``billing_usagerecordkey`` (``UsageRecordKey``: id, job, attempt number) carries both: its primary
  key is the record's id, and the unique constraint ``usage_one_record_per_attempt`` lives on it. A ``BEFORE
  INSERT`` row trigger on the usage records inserts the key row in the same statement as the record, so the hot path
  sends no extra statement and a second record of an attempt violates ``usage_one_record_per_attempt``, as on
  SQLite's plain table; each record references its key (a foreign key from every partition), and an ``AFTER DELETE``
  trigger removes the key with its record. The usage records' primary key is ``(id, recorded_at)``.
- ``CreditEntry.usage_record`` (one entry per record, its unique index on the unpartitioned entries) references the
  key row: an entry cannot name a record that does not exist, and a record whose debit names it cannot be deleted
  (its key's delete is refused).
- A record's ``id``, job and attempt number are never changed (a ``BEFORE UPDATE`` trigger refuses): the key row is
  its identity. Its ``recorded_at`` may be (an operator's correction, a test's old books): PostgreSQL moves the row
  to that month's partition (a delete and an insert in one statement), and the triggers keep its key row, as itself.
- Reads that do not name a month visit every partition's index: a lookup by job (its usage object) is bounded
  below by the job's creation, which prunes the months before it (``billing.admission.job_usage``).

The credit entries are not partitioned: the balance chain is read as an organization's latest entry by id (every
refusal, statement, alert and reconciliation), which a table split by month would answer by probing every month's
index, and their two unique keys (the idempotency key, the usage record) would each need a key table of their own.
What was measured is in docs/money.md and the README's benchmarks.
"""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import connection, transaction
from django.db.backends.utils import CursorWrapper
from django.utils import timezone

from billing.periods import month_start, next_month

logger = logging.getLogger(__name__)

# Partitioned table -> the time column its months are cut on.
PARTITIONED = {"billing_usagerecord": "recorded_at"}
MONTHS_AHEAD = 3
# How long creating a partition waits for its lock on the table (it needs the parent exclusively for an instant):
# behind a long read it gives up and the next run tries again, instead of queueing every settlement behind it.
LOCK_TIMEOUT = "2s"


def partition_name(table: str, month: datetime) -> str:
    return f"{table}_p{month:%Y_%m}"


def default_partition(table: str) -> str:
    return f"{table}_default"


def is_partitioned(cursor: CursorWrapper, table: str) -> bool:
    cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = to_regclass(%s))", [table])
    return bool(cursor.fetchone()[0])


def create_month_partition(cursor: CursorWrapper, table: str, column: str, month: datetime) -> bool:
    """Creates ``table``'s partition of ``month`` unless it exists; True if it made it.

    Rows of that month already in the default partition (no partition existed when they were written) would be
    refused by the new partition's bounds: they stay where they are, the partition is not made, and it is logged
    as an error (moving them is an operator's step, at a quiet hour).
    """
    name = partition_name(table, month)
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [name])
    if cursor.fetchone()[0]:
        return False
    start, end = month.isoformat(), next_month(month).isoformat()
    default = default_partition(table)
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [default])
    if cursor.fetchone()[0]:
        cursor.execute(
            f'SELECT EXISTS (SELECT 1 FROM "{default}" WHERE "{column}" >= %s AND "{column}" < %s)',  # noqa: S608
            [start, end],
        )
        if cursor.fetchone()[0]:
            logger.error("%s holds rows of %s: its partition %s is not created", default, f"{month:%Y-%m}", name)
            return False
    cursor.execute(f"CREATE TABLE \"{name}\" PARTITION OF \"{table}\" FOR VALUES FROM ('{start}') TO ('{end}')")
    return True


def create_partitions_ahead(*, now: datetime | None = None, months: int = MONTHS_AHEAD) -> list[str]:
    """Creates every partitioned table's partitions of this UTC month and the ``months`` after it; the names made.

    Idempotent (what exists is left alone); nothing on SQLite or where a table is not partitioned.
    """
    if connection.vendor != "postgresql":
        return []
    made = []
    month_of_now = month_start(now or timezone.now())
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        for table, column in PARTITIONED.items():
            if not is_partitioned(cursor, table):
                continue
            month = month_of_now
            for _ in range(months + 1):
                if create_month_partition(cursor, table, column, month):
                    made.append(partition_name(table, month))
                month = next_month(month)
    if made:
        logger.info("created partitions %s", ", ".join(made))
    return made
