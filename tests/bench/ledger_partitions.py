"""What partitioning the credit entries by month would cost their reads: a partitioned copy against the table.

    DATABASE_URL=postgres://... python -m tests.bench.ledger_partitions --database NAME [--history-months 36]

Against a database that ``make bench-billing ARGS="--keep"`` left (PostgreSQL only). It copies
``billing_creditentry`` into ``ledger_probe``, partitioned by RANGE on ``created_at`` per UTC month (the months of
the books, empty ones back to ``--history-months`` before now, as years of history would have, and three ahead)
with the table's indexes on every partition, then times the reads of the balance chain on both, alternating, median
of ``--runs``:

- an organization's latest entry (its balance as the ledger says: reconciliation, statements, the dashboard), for
  the big tenant and for a small one;
- the latest entry that added credit (the low-credit alert's period, read after a settlement of an organization
  that watches its credit), which lies at the start of the books;
- an entry by idempotency key (every grant, payment and refund looks for its key first);
- every organization's latest entry at once (reconciliation's balance check).

The copy is dropped at the end. The write side is not timed: a partitioned ledger would keep its two unique keys
(idempotency key, usage record) on key tables, as the usage records do (billing.partitions).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import psycopg

PROBE = "ledger_probe"


def month_start(moment: datetime) -> datetime:
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def add_months(month: datetime, count: int) -> datetime:
    index = month.year * 12 + month.month - 1 + count
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def build_probe(conn: psycopg.Connection[Any], history_months: int) -> int:
    """The partitioned copy; answers how many partitions it has."""
    conn.execute(f"DROP TABLE IF EXISTS {PROBE}")
    conn.execute(
        f"CREATE TABLE {PROBE} (LIKE billing_creditentry INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
        "PARTITION BY RANGE (created_at)"
    )
    (oldest,) = conn.execute("SELECT min(created_at) FROM billing_creditentry").fetchone()
    now = month_start(datetime.now(UTC))
    month = min(month_start(oldest), add_months(now, -history_months))
    count = 0
    while month <= add_months(now, 3):
        following = add_months(month, 1)
        conn.execute(
            f"CREATE TABLE {PROBE}_p{month:%Y_%m} PARTITION OF {PROBE} "
            f"FOR VALUES FROM ('{month.isoformat()}') TO ('{following.isoformat()}')"
        )
        month, count = following, count + 1
    conn.execute(f"INSERT INTO {PROBE} SELECT * FROM billing_creditentry")  # noqa: S608
    # The table's own indexes, on every partition (the unique ones as plain indexes: a partitioned table cannot
    # hold them without the partition key).
    for (definition,) in conn.execute(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = 'billing_creditentry'::regclass"
    ).fetchall():
        name, rest = definition.split(" ON public.billing_creditentry ", 1)
        name = name.replace("CREATE UNIQUE INDEX ", "").replace("CREATE INDEX ", "")
        conn.execute(f"CREATE INDEX {PROBE}_{name[-40:]} ON {PROBE} {rest}")
    conn.execute(f"ANALYZE {PROBE}")
    return count


def timed(conn: psycopg.Connection[Any], sql: str, parameters: list[Any], runs: int) -> tuple[float, Any]:
    timings, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = conn.execute(sql, parameters).fetchall()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", required=True, help="a database make bench-billing --keep left")
    parser.add_argument("--history-months", type=int, default=36, help="months of (empty) history partitions")
    parser.add_argument("--runs", type=int, default=51)
    args = parser.parse_args()
    url = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + f"/{args.database}"
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        partition_count = build_probe(conn, args.history_months)
        built = time.perf_counter() - started
        try:
            report(conn, partition_count, built, args.runs)
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {PROBE}")


def report(conn: psycopg.Connection[Any], partition_count: int, built: float, runs: int) -> None:
    organizations = [
        row[0]
        for row in conn.execute(
            "SELECT organization_id FROM billing_creditentry GROUP BY organization_id ORDER BY count(*) DESC"
        ).fetchall()
    ]
    big, small = organizations[0], organizations[-1]
    (key,) = conn.execute(
        "SELECT idempotency_key FROM billing_creditentry WHERE kind = 'usage' ORDER BY id LIMIT 1 OFFSET 1000"
    ).fetchone()
    reads = [
        ("latest entry, big tenant", "SELECT id, balance_after_micros FROM {t} WHERE organization_id = %s "
         "ORDER BY id DESC LIMIT 1", [big]),
        ("latest entry, small tenant", "SELECT id, balance_after_micros FROM {t} WHERE organization_id = %s "
         "ORDER BY id DESC LIMIT 1", [small]),
        ("latest entry that added credit", "SELECT id FROM {t} WHERE organization_id = %s AND amount_micros > 0 "
         "ORDER BY id DESC LIMIT 1", [big]),
        ("entry by idempotency key", "SELECT id FROM {t} WHERE idempotency_key = %s", [key]),
        ("every organization's latest entry", "SELECT o, (SELECT balance_after_micros FROM {t} "
         "WHERE organization_id = o ORDER BY id DESC LIMIT 1) FROM unnest(%s::uuid[]) o", [organizations]),
    ]  # fmt: skip
    (entries,) = conn.execute("SELECT count(*) FROM billing_creditentry").fetchone()
    print(
        f"credit entries: {entries:,}; partitioned copy: {partition_count} monthly partitions, built in {built:.0f} s"
    )
    print(f"  {'read (median of ' + str(runs) + ')':<36} {'table':>9} {'partitioned':>12} {'ratio':>6}")
    for name, sql, parameters in reads:
        table_ms = probe_ms = 0.0
        for _ in range(3):  # alternating, so load from other work falls on both
            table_ms, on_table = timed(conn, sql.format(t="billing_creditentry"), parameters, runs)
            probe_ms, on_probe = timed(conn, sql.format(t=PROBE), parameters, runs)
            assert on_table == on_probe, (name, on_table, on_probe)
        print(f"  {name:<36} {table_ms:7.3f} ms {probe_ms:9.3f} ms {probe_ms / table_ms:5.1f}x")
    plan = conn.execute(
        f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT id FROM {PROBE} "  # noqa: S608
        "WHERE organization_id = %s ORDER BY id DESC LIMIT 1",
        [small],
    ).fetchall()
    scanned = sum(1 for (line,) in plan if "Index" in line and "loops=1" in line)
    print(f"  the small tenant's latest entry on the copy: {scanned} partition indexes probed (the table: 1)")


if __name__ == "__main__":
    main()
