"""What the nightly reconciliation's refund check costs as refunds pile up: ``check_refunded_rollups`` on an
incremental window of a fixed size, after more and more refunds made before it.

    DATABASE_URL=postgres://... python -m tests.bench.refunded_reconciliation [--database NAME] [--records 200000]
        [--refunds 1000,3000,6000] [--window-refunds 20] [--window-writes 100] [--history-months 12] [--runs 5]
        [--analyze] [--plans]

PostgreSQL only. ``--database``: an empty database of that name, migrated and loaded here and kept; without it a
scratch database of its own, dropped at the end. The books:

1. the usage records' monthly partitions of ``--history-months`` before now (most of them empty, as a platform with
   that much history has them; the migrations make only this month's and those ahead), then ``--records`` closed
   attempts over the last 60 days loaded in bulk as ``tests.bench.billing`` loads them (10 organizations, one holding
   half; their debits and rollups);
2. for each figure of ``--refunds``: refunds of past requests (``billing.ledger.refund_job``, the real path) until
   that many were made, all before the window; then the window, the same each time: ``--window-refunds`` more refunds
   of requests of the last 60 days and ``--window-writes`` new settlements (``billing.metering.record_attempt``);
3. the check run incrementally from the window's start, in the snapshot the nightly run takes (hash and merge joins
   off), median of ``--runs``; drift must be 0. Then each of its queries explained (EXPLAIN ANALYZE, in the same
   snapshot): its time, and how often it read a usage records' partition (scans of a partition, each scan times its
   loops) and how many partitions it read at all. ``--plans`` prints every plan.

The statistics are those the load left (it ends with ANALYZE: no refunds yet) unless ``--analyze`` refreshes them
before each figure, as autovacuum keeps a busy database's; the planner's choices differ between the two.

After the last figure, a full run of the check (drift 0) for reference.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.bench.queue_overhead import drop_postgres, scratch_postgres

REPO = Path(__file__).resolve().parents[2]
TABLE = "billing_usagerecord"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", help="an empty database to load and keep (default: a scratch one, dropped)")
    parser.add_argument("--records", type=int, default=200_000, help="usage records loaded in bulk")
    parser.add_argument("--refunds", default="1000,3000,6000", help="refunds made before the window, figures")
    parser.add_argument("--window-refunds", type=int, default=20, help="refunds made in the window")
    parser.add_argument("--window-writes", type=int, default=100, help="settlements made in the window")
    parser.add_argument("--history-months", type=int, default=12, help="monthly partitions before this month")
    parser.add_argument("--runs", type=int, default=5, help="runs of the check per figure (median reported)")
    parser.add_argument(
        "--analyze", action="store_true", help="ANALYZE before each figure (else the statistics are the load's)"
    )
    parser.add_argument("--plans", action="store_true", help="print every query's plan")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        parser.error("DATABASE_URL must name a PostgreSQL server")

    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "SECRET_KEY": "bench-only-secret-key",
            "PLATFORM_DATA_DIR": tempfile.mkdtemp(prefix="bench-refunds-"),
            "LOG_LEVEL": "WARNING",
            "STRIPE_SECRET_KEY": "",
        }
    )
    scratch_database = None
    if args.database:
        os.environ["DATABASE_URL"] = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + f"/{args.database}"
    else:
        os.environ["DATABASE_URL"], scratch_database = scratch_postgres(os.environ["DATABASE_URL"])
    try:
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], env=os.environ, cwd=REPO, check=True)
        import django

        django.setup()
        run_benchmark(args)
    finally:
        if scratch_database:
            from django.db import connections

            connections.close_all()
            drop_postgres(os.environ["DATABASE_URL"], scratch_database)


def run_benchmark(args: argparse.Namespace) -> None:
    from django.db import connection
    from django.utils import timezone

    from billing import partitions, periods
    from billing.models import CreditEntry, EntryKind, UsageRecord
    from tests.bench import billing as books

    if UsageRecord.objects.exists():
        raise SystemExit(f"{connection.settings_dict['NAME']} has usage records already: give an empty database")
    month = periods.month_start()
    with connection.cursor() as cursor:
        for _ in range(args.history_months):
            month = periods.month_start(month - timedelta(days=1))
            partitions.create_month_partition(cursor, TABLE, "recorded_at", month)
    world = books.make_world()
    started = time.perf_counter()
    books.load_books(world, args.records)
    loaded = time.perf_counter() - started
    print(f"loaded {args.records:,} usage records in {loaded:.0f} s; {partition_count()} partitions of them")

    rng = random.Random(7)
    # Requests to refund, in a random order: billed, and settled over a day ago (the window is what comes after).
    candidates = list(
        UsageRecord.objects.filter(
            billable=True, cost_micros__gt=0, recorded_at__lt=timezone.now() - timedelta(days=1)
        ).values_list("job_id", flat=True)
    )
    rng.shuffle(candidates)
    figures = [int(figure) for figure in args.refunds.split(",")]
    if len(candidates) < figures[-1] + len(figures) * args.window_refunds:
        raise SystemExit("not enough requests to refund: load more --records")
    print(
        f"refund check, incremental: {args.window_refunds} refunds and {args.window_writes} settlements in its window, "
        f"median of {args.runs} runs"
    )
    for figure in figures:
        made = CreditEntry.objects.filter(kind=EntryKind.REFUND, job__isnull=False).count()
        started = time.perf_counter()
        refund(candidates, figure - made)
        refunds_seconds = time.perf_counter() - started
        since = timezone.now()
        refund(candidates, args.window_refunds)
        settle(world, args.window_writes)
        if args.analyze:
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        seconds, check = timed_check(since, args.runs)
        print(
            f"  {figure:>6,} refunds before the window ({figure - made:,} made in {refunds_seconds:.0f} s): "
            f"{seconds * 1000:7.1f} ms, drift {check.drift_count}, checked {check.checked:,}, "
            f"organization days {check.figures.get('organization_days')}"
        )
        explain(since, args.plans)
    seconds, check = timed_check(None, 1)
    print(f"refund check, full: {seconds:.2f} s, drift {check.drift_count}, checked {check.checked:,}")


def partition_count() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_partition_tree(%s) WHERE isleaf", [TABLE])
        return int(cursor.fetchone()[0])


def refund(candidates: list[Any], count: int) -> None:
    from billing.ledger import refund_job
    from inference.models import Job

    for _ in range(max(count, 0)):
        refund_job(job=Job.objects.get(pk=candidates.pop()), reason="bench")


def settle(world: dict[str, Any], count: int) -> None:
    """``count`` requests of the second organization settled now, one transaction each, as a worker's close does."""
    from django.db import transaction
    from django.utils import timezone

    from billing.metering import record_attempt
    from inference import dispatch
    from inference.models import AttemptOutcome, Job, JobAttempt, JobStatus
    from tests.bench import billing as books

    if not count:
        return
    dispatch.send_run_message = lambda *args: True  # type: ignore[assignment]  # no broker: nothing is queued
    organization = world["organizations"][1]
    endpoint = next(endpoint for endpoint in world["endpoints"] if endpoint.endpoint_id == "platform/tiny-sd")
    jobs = books.running_jobs(organization, endpoint, count)
    now = timezone.now()
    JobAttempt.objects.filter(job__in=jobs).update(outcome=AttemptOutcome.SUCCEEDED, gpu_ms=1_500, finished_at=now)
    Job.objects.filter(pk__in=jobs).update(
        status=JobStatus.COMPLETED, gpu_ms=1_500, finished_at=now, result={"images": [{"url": "x"}]}
    )
    for job in Job.objects.filter(pk__in=jobs).select_related("endpoint", "organization"):
        with transaction.atomic():
            record_attempt(job, JobAttempt.objects.get(job=job, number=1))


def scope_from(since: Any) -> Any:
    from billing.reconciliation import FULL, Scope

    return FULL if since is None else Scope(since=since)


def timed_check(since: Any, runs: int) -> tuple[float, Any]:
    """The median time of the refund check over ``since``'s window (None: a full run), in the nightly run's snapshot."""
    from billing import reconciliation

    scope = scope_from(since)
    timings, check = [], None
    for _ in range(runs):
        with reconciliation._snapshot(scope):
            started = time.perf_counter()
            check = reconciliation.check_refunded_rollups(scope)
            timings.append(time.perf_counter() - started)
        assert check.drift == [], check.drift
    return statistics.median(timings), check


PARTITION_SCAN = re.compile(r" on (\w+)(?: \w+)?\s+\((?:actual time=\S+ rows=\d+ loops=(\d+)|never executed)\)")


def explain(since: Any, print_plans: bool) -> None:
    """Each query of one incremental check, explained: its time and the partitions of the usage records it read."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from billing import reconciliation

    scope = scope_from(since)
    with connection.cursor() as cursor:
        cursor.execute("SELECT relid::text FROM pg_partition_tree(%s) WHERE isleaf", [TABLE])
        leaves = {name for (name,) in cursor.fetchall()}
    with reconciliation._snapshot(scope):
        with CaptureQueriesContext(connection) as captured:
            reconciliation.check_refunded_rollups(scope)
        total_ms, total_reads = 0.0, 0
        for number, query in enumerate(captured.captured_queries, start=1):
            with connection.cursor() as cursor:
                cursor.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {query['sql']}")
                plan = [line for (line,) in cursor.fetchall()]
            milliseconds = float(next(line for line in plan if line.startswith("Execution Time")).split()[2])
            scans = [(match[1], int(match[2] or 0)) for line in plan for match in PARTITION_SCAN.finditer(line)]
            reads = sum(loops for name, loops in scans if name in leaves)
            read = {name for name, loops in scans if name in leaves and loops}
            total_ms, total_reads = total_ms + milliseconds, total_reads + reads
            if reads or milliseconds >= 1 or print_plans:
                print(
                    f"      query {number:>2}: {milliseconds:8.1f} ms, {reads:>7,} partition reads, "
                    f"{len(read)} of {len(leaves)} partitions: {' '.join(query['sql'].split())[:90]}"
                )
            if print_plans:
                print("\n".join(f"          {line}" for line in plan))
        print(
            f"      {len(captured.captured_queries)} queries, {total_ms:.1f} ms explained, "
            f"{total_reads:,} partition reads"
        )


if __name__ == "__main__":
    main()
