"""Billing at scale: usage records written per second through the real path, and the usage page at 1M records.

    python -m tests.bench.billing [--records 1000000] [--writes 2000] [--runs 7] [--no-reconcile] [--keep]
    python -m tests.bench.billing --reuse bench_NNNN   # the database a --keep run left, migrated first

10M records (``--records 10000000``) take about 45 minutes to load on two shared cores and 14 GB of disk; ``--keep``
and ``--reuse`` measure those books again after a migration (the monthly partitions of billing/0013 were measured so).

Against DATABASE_URL (PostgreSQL: a scratch database of its own, dropped at the end) or a fresh SQLite file:

1. Bulk books: ``--records`` usage records over 60 days for 10 organizations (one tenant holds half), with the
   jobs and attempts they close, their debits (a true balance chain per organization) and the hourly and daily
   rollups summed from them: the books the real path writes, loaded in bulk (COPY on PostgreSQL).
2. Write rate, on top of those books: ``--writes`` closed attempts recorded one transaction each through
   ``billing.metering.record_attempt`` (price lookup, usage record, hold release under the account lock, the
   debit, two rollup upserts), and as many more through ``inference.closing.finish_attempt`` end to end
   (locks, the attempt and job rows, the log line, the same hook) for context.
3. The usage page: ``billing.selectors.usage`` for the big tenant over 30 days, by day and by day and endpoint,
   p50 of ``--runs``, next to the same report computed from raw usage records; both must agree.
4. Reconciliation (``billing.reconciliation.run_reconciliation``), its time and drift (expected 0): a full run of
   everything, then the nightly incremental one after a day of usage. The full run is taken as last night's: its
   watermark is set back a day (which only makes it claim less), so the last day of the books (1/60 of them) and
   the writes of step 2 are what the incremental run finds written since.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.bench.queue_overhead import drop_postgres, scratch_postgres

REPO = Path(__file__).resolve().parents[2]
ORGANIZATIONS = 10
DAYS = 60
PAGE_DAYS = 30
BATCH = 20_000
SUMS = ("attempts", "billable_attempts", "gpu_ms", "unbilled_gpu_ms", "cost_micros", "work_units")


def p50_ms(run: Callable[[], Any], runs: int) -> tuple[float, Any]:
    timings, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = run()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000, help="usage records loaded in bulk")
    parser.add_argument("--writes", type=int, default=2_000, help="attempts recorded one by one, per path")
    parser.add_argument("--runs", type=int, default=7, help="runs of each page query (p50 reported)")
    parser.add_argument("--no-reconcile", action="store_true", help="skip the reconciliation passes")
    parser.add_argument(
        "--keep", action="store_true", help="PostgreSQL: keep the scratch database (its name is printed) for --reuse"
    )
    parser.add_argument(
        "--reuse",
        metavar="NAME",
        help="PostgreSQL: measure a database a --keep run left (migrated first, nothing loaded; kept afterwards)",
    )
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="bench-billing-"))
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "SECRET_KEY": "bench-only-secret-key",
            "PLATFORM_DATA_DIR": str(data_dir),
            "LOG_LEVEL": "WARNING",
            "STRIPE_SECRET_KEY": "",
        }
    )
    scratch_database = None
    if args.reuse:
        os.environ["DATABASE_URL"] = os.environ["DATABASE_URL"].rsplit("/", 1)[0] + f"/{args.reuse}"
    elif os.environ.get("DATABASE_URL", "").startswith("postgres"):
        # A database of its own, dropped at the end: the benchmark never writes into yours.
        os.environ["DATABASE_URL"], scratch_database = scratch_postgres(os.environ["DATABASE_URL"])
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], env=os.environ, cwd=REPO, check=True)
        if args.reuse:
            print(f"migrated {args.reuse} in {time.perf_counter() - started:.1f} s")
        import django

        django.setup()
        run_benchmark(args)
    finally:
        if args.keep and scratch_database:
            print(f"kept the database {scratch_database}: --reuse {scratch_database}")
        elif scratch_database:
            from django.db import connections

            connections.close_all()
            drop_postgres(os.environ["DATABASE_URL"], scratch_database)


def run_benchmark(args: argparse.Namespace) -> None:
    from django.db import connection

    from billing import selectors
    from billing.models import UsageRecord

    if args.reuse:
        world, load_seconds = found_world(), 0.0
    else:
        world = make_world()
        started = time.perf_counter()
        load_books(world, args.records)
        load_seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    hook_rate, finish_rate, statements = write_rates(world, args.writes)

    big = world["organizations"][0]
    end = datetime.now(UTC).date()
    start = end - timedelta(days=PAGE_DAYS - 1)
    in_page = UsageRecord.objects.filter(
        organization=big,
        recorded_at__gte=selectors.day_start(start),
        recorded_at__lt=selectors.day_start(end) + timedelta(days=1),
    ).count()
    rows: list[tuple[str, float, float, int]] = []
    for group_by in (("day",), ("day", "endpoint")):
        rollup_ms, from_rollups = p50_ms(
            lambda group_by=group_by: selectors.usage(organization_id=big.pk, start=start, end=end, group_by=group_by),
            args.runs,
        )
        raw_ms, from_raw = p50_ms(lambda group_by=group_by: usage_from_raw(big.pk, start, end, group_by), args.runs)
        assert from_raw == comparable(from_rollups), "the rollups and raw usage disagree"
        rows.append((" + ".join(group_by), rollup_ms, raw_ms, len(from_rollups["data"])))

    # The operators' run-rate page: every figure it shows, over all organizations, from the rollups.
    from billing import metrics

    def run_rate_page() -> None:
        metrics.run_rate(end)
        metrics.run_rate_trend(end, points=12, step_days=7)
        metrics.recognized_revenue(start, end)
        metrics.revenue_by_endpoint(start, end)
        metrics.top_organizations(start, end)
        metrics.gross_margin(start, end)
        metrics.cash_collected(start, end)

    run_rate_ms, _ = p50_ms(run_rate_page, args.runs)

    reconciliations: list[tuple[str, float, Any]] = []
    if not args.no_reconcile:
        from billing.models import ReconciliationRun
        from billing.reconciliation import run_reconciliation

        started = time.perf_counter()
        full = run_reconciliation(full=True)
        reconciliations.append(("full", time.perf_counter() - started, full))
        assert full.watermark is not None, full.drift
        # As if it had run a day ago: the last day of usage is what the nightly run finds written since.
        ReconciliationRun.objects.filter(pk=full.pk).update(watermark=full.watermark - timedelta(days=1))
        started = time.perf_counter()
        incremental = run_reconciliation()
        reconciliations.append(("incremental", time.perf_counter() - started, incremental))
        assert incremental.scope == "incremental", incremental.scope

    database = "PostgreSQL" if connection.vendor == "postgresql" else "SQLite"
    total = UsageRecord.objects.count()
    loaded = "none loaded: --reuse" if args.reuse else f"{args.records:,} loaded in {load_seconds:.0f} s"
    print(f"billing benchmark on {database}; {total:,} usage records ({loaded}; peak memory {peak_mib:,.0f} MiB)")
    print(f"  writes, one transaction per closed attempt ({args.writes:,} each):")
    print(f"    billing.metering.record_attempt    {hook_rate:8.0f} records/s  ({statements} statements each)")
    print(f"    inference finish_attempt (whole)   {finish_rate:8.0f} records/s")
    print(f"  usage page, one tenant, {PAGE_DAYS} days ({in_page:,} raw records in range), p50 of {args.runs}:")
    print(f"    {'grouped by':<16} {'rollups':>10} {'raw records':>12} {'speed-up':>9} {'rows':>6}")
    for name, rollup_ms, raw_ms, count in rows:
        print(f"    {name:<16} {rollup_ms:8.1f} ms {raw_ms:9.1f} ms {raw_ms / rollup_ms:8.0f}x {count:6}")
    print(f"  run-rate page, every figure for all organizations, {PAGE_DAYS} days: {run_rate_ms:.1f} ms (p50)")
    for scope, seconds, run in reconciliations:
        drift = sum(item["count"] for item in run.drift)
        print(f"  reconciliation, {run.coverage}: {seconds:.2f} s, drift {drift} (expected 0)")
        print("    " + ", ".join(f"{name} {summary.get('checked', 0):,}" for name, summary in run.checked.items()))
        if scope == "incremental":
            written = UsageRecord.objects.filter(recorded_at__gte=run.since).count()
            print(f"    {written:,} usage records in its window; rollup days {run.checked['rollups'].get('days')}")


# --- The world and its books ------------------------------------------------------------------------------


def make_world() -> dict[str, Any]:
    from accounts.models import Organization
    from accounts.services import create_api_key, sign_up
    from billing.models import Price
    from billing.pricing import price_for
    from inference.catalog import ensure_builtin_endpoints
    from inference.models import Endpoint, GpuClass

    ensure_builtin_endpoints(Endpoint)
    endpoints = list(Endpoint.objects.filter(owner="platform"))
    for name, gpu_class in (("big", GpuClass.H100), ("medium", GpuClass.A10G)):
        endpoints.append(
            Endpoint.objects.create(
                owner="bench", name=name, kind="text-to-image", weights="builtin:tiny-sd", gpu_class=gpu_class
            )
        )
    organizations, keys = [], {}
    for number in range(ORGANIZATIONS):
        user = sign_up(email=f"bench-{number}@example.com", password=None)
        organization = Organization.objects.get(memberships__user=user)
        Organization.objects.filter(pk=organization.pk).update(concurrency_limit=100_000)
        organizations.append(organization)
        made = [
            create_api_key(organization=organization, name=f"key {n}", scopes=["inference"], created_by=user)[0]
            for n in range(3)
        ]
        keys[organization.pk] = [key.pk for key in made] + [None]  # and dashboard runs, without a key
    prices = {endpoint.pk: price_for(endpoint, datetime.now(UTC)) for endpoint in endpoints}
    assert all(quote.price is not None for quote in prices.values()), Price.objects.count()
    return {"organizations": organizations, "endpoints": endpoints, "keys": keys, "prices": prices}


def found_world() -> dict[str, Any]:
    """The world a ``--keep`` run made, read back from its database."""
    from accounts.models import ApiKey, Organization
    from billing.pricing import price_for
    from inference.models import Endpoint

    organizations = sorted(
        Organization.objects.filter(memberships__user__email__startswith="bench-"),
        key=lambda organization: int(organization.memberships.get().user.email.split("-")[1].split("@")[0]),
    )
    endpoints = list(Endpoint.objects.filter(owner__in=("platform", "bench")).order_by("owner", "name"))
    keys = {
        organization.pk: [*ApiKey.objects.filter(organization=organization).values_list("pk", flat=True), None]
        for organization in organizations
    }
    prices = {endpoint.pk: price_for(endpoint, datetime.now(UTC)) for endpoint in endpoints}
    return {"organizations": organizations, "endpoints": endpoints, "keys": keys, "prices": prices}


def load_books(world: dict[str, Any], count: int) -> None:
    """Jobs, attempts, usage records, debits and rollups for ``count`` closed attempts, as the real path writes them."""
    from django.core.management.color import no_style
    from django.db import connection, transaction
    from django.db.models import Max

    from billing.metering import bucket_start
    from billing.models import NO_KEY, Account, CreditEntry, UsageRecord, UsageRecordKey, UsageRollup
    from billing.money import cost_micros
    from inference.models import Job, JobAttempt

    rng = random.Random(42)
    organization_ids, endpoints = [organization.pk for organization in world["organizations"]], world["endpoints"]
    weights = [ORGANIZATIONS - 1] + [1] * (ORGANIZATIONS - 1)  # the first tenant holds half of all usage
    cum_weights = list(itertools.accumulate(weights))  # what choices() would sum on every call
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    next_record = first_record = (UsageRecord.objects.aggregate(top=Max("id"))["top"] or 0) + 1
    next_entry = (CreditEntry.objects.aggregate(top=Max("id"))["top"] or 0) + 1
    balances = {account.pk: account.balance_micros for account in Account.objects.all()}
    # Credit enough for all of it, granted before the first usage: usage never takes a balance below zero, and
    # reconciliation checks that on every debit.
    grants = []
    for organization_id in organization_ids:
        balances[organization_id] += GRANT_MICROS
        grants.append(
            (
                next_entry,
                organization_id,
                "grant",
                GRANT_MICROS,
                balances[organization_id],
                f"bench-grant-{organization_id}",
                None,
                None,
                "bench credit",
                now - timedelta(days=DAYS + 1),
            )
        )
        next_entry += 1
    rollups: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * len(SUMS))
    job_input = {"prompt": "bench", "num_inference_steps": 4, "num_images": 1, "width": 64, "height": 64}
    tables: dict[str, list[tuple[Any, ...]]] = {"jobs": [], "attempts": [], "records": [], "entries": []}

    def flush() -> None:
        insert(Job, JOB_COLUMNS, tables["jobs"])
        insert(JobAttempt, ATTEMPT_COLUMNS, tables["attempts"])
        insert(UsageRecord, RECORD_COLUMNS, tables["records"])
        insert(CreditEntry, ENTRY_COLUMNS, tables["entries"])
        for rows in tables.values():
            rows.clear()

    with transaction.atomic(), bulk_load_mode([Job, JobAttempt, UsageRecord, CreditEntry]):
        insert(CreditEntry, ENTRY_COLUMNS, grants)
        for number, recorded_at in enumerate(spread_moments(rng, now, count)):
            organization_id = rng.choices(organization_ids, cum_weights=cum_weights)[0]
            endpoint = rng.choice(endpoints)
            key = rng.choice(world["keys"][organization_id])
            quote = world["prices"][endpoint.pk]
            roll = rng.random()
            outcome = "succeeded" if roll < 0.95 else "errored" if roll < 0.98 else "failed"
            billable = outcome != "errored"
            gpu_ms = rng.randint(200, 20_000)
            cold_ms = rng.randint(2_000, 8_000) if rng.random() < 0.05 else 0
            units, cost = cost_micros(
                unit=quote.unit,
                unit_price_micros=quote.unit_price_micros,
                gpu_ms=gpu_ms if billable else 0,
                images=1,
                pixels=64 * 64,
            )
            started_at = recorded_at - timedelta(milliseconds=gpu_ms + cold_ms)
            job_id = uuid.uuid4()
            record_id = next_record + number
            tables["jobs"].append(
                (
                    job_id,
                    organization_id,
                    endpoint.pk,
                    key,
                    endpoint.gpu_class,
                    "COMPLETED" if outcome == "succeeded" else "FAILED",
                    job_input,
                    1,
                    3,
                    gpu_ms if billable else 0,
                    cold_ms,
                    started_at - timedelta(milliseconds=150),
                    started_at,
                    recorded_at,
                    recorded_at + timedelta(days=30),
                )
            )
            tables["attempts"].append((job_id, 1, "bench", outcome, gpu_ms, cold_ms, started_at, recorded_at))
            record = (
                record_id,
                organization_id,
                job_id,
                1,
                key,
                endpoint.pk,
                endpoint.gpu_class,
                outcome,
                billable,
                gpu_ms if billable else 0,
                cold_ms + (0 if billable else gpu_ms),
                quote.price.pk,
                quote.unit,
                units,
                quote.unit_price_micros,
                cost,
                4 if billable else 0,
                started_at,
                recorded_at,
            )
            tables["records"].append(record)
            if cost:
                balances[organization_id] -= cost
                tables["entries"].append(
                    (
                        next_entry,
                        organization_id,
                        "usage",
                        -cost,
                        balances[organization_id],
                        f"usage-{record_id}",
                        record_id,
                        job_id,
                        f"{endpoint.endpoint_id}: {units} gpu_second",
                        recorded_at,
                    )
                )
                next_entry += 1
            amounts = (1, int(billable), record[9], record[10], cost, record[16])
            for granularity in ("hour", "day"):
                bucket = (
                    granularity,
                    bucket_start(recorded_at, granularity),
                    organization_id,
                    endpoint.pk,
                    key or NO_KEY,
                    endpoint.gpu_class,
                )
                sums = rollups[bucket]
                for index, amount in enumerate(amounts):
                    sums[index] += amount
            if len(tables["records"]) >= BATCH:
                flush()
        flush()
        insert(UsageRollup, ROLLUP_COLUMNS, [(*bucket, *sums) for bucket, sums in rollups.items()])
        keys = UsageRecordKey._meta.db_table
        if connection.vendor == "postgresql" and keys in connection.introspection.table_names():
            # The key rows the usage records' trigger writes (billing.partitions); triggers are off for the load.
            with connection.cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO {keys} (id, job_id, attempt_number) "  # noqa: S608
                    f"SELECT id, job_id, attempt_number FROM {UsageRecord._meta.db_table} WHERE id >= %s",
                    [first_record],
                )
        for organization_id, balance in balances.items():
            Account.objects.filter(pk=organization_id).update(balance_micros=balance)
        with connection.cursor() as cursor:
            for statement in connection.ops.sequence_reset_sql(no_style(), [UsageRecord, CreditEntry]):
                cursor.execute(statement)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")


GRANT_MICROS = 10**15  # a billion dollars per organization


def spread_moments(rng: random.Random, now: datetime, count: int) -> Iterable[datetime]:
    """``count`` moments uniformly over the ``DAYS`` before ``now``, oldest first, made a segment at a time.

    The span is cut into segments of about ``BATCH`` moments each, drawn and sorted one by one: memory stays that of
    one segment (10M datetimes at once would be over half a gigabyte), and the rows still come in time order, as the
    real path writes them (the time indexes fill at their right edge).
    """
    span = DAYS * 86_400
    segments = max(1, count // BATCH)
    for segment in range(segments):
        size = count // segments + (1 if segment < count % segments else 0)
        low = span * segment / segments
        offsets = sorted(rng.uniform(low, low + span / segments) for _ in range(size))
        yield from (now - timedelta(seconds=span - offset) for offset in offsets)


JOB_COLUMNS = (
    "id", "organization_id", "endpoint_id", "api_key_id", "gpu_class", "status", "input", "attempt", "max_attempts",
    "gpu_ms", "cold_start_ms", "created_at", "started_at", "finished_at", "outputs_expire_at",
)  # fmt: skip
ATTEMPT_COLUMNS = ("job_id", "number", "worker", "outcome", "gpu_ms", "cold_start_ms", "started_at", "finished_at")
RECORD_COLUMNS = (
    "id", "organization_id", "job_id", "attempt_number", "api_key_id", "endpoint_id", "gpu_class", "outcome",
    "billable", "gpu_ms", "unbilled_gpu_ms", "price_id", "unit", "billable_units", "unit_price_micros", "cost_micros",
    "work_units", "started_at", "recorded_at",
)  # fmt: skip
ENTRY_COLUMNS = (
    "id", "organization_id", "kind", "amount_micros", "balance_after_micros", "idempotency_key", "usage_record_id",
    "job_id", "description", "created_at",
)  # fmt: skip
ROLLUP_COLUMNS = ("granularity", "bucket_start", "organization_id", "endpoint_id", "key_id", "gpu_class", *SUMS)


@contextlib.contextmanager
def bulk_load_mode(models: Sequence[Any]) -> Iterator[None]:
    """On PostgreSQL, inside the load's transaction: the tables' secondary indexes dropped and built again once the
    rows are in (a sorted build instead of 10M random insertions into each), and triggers off (the foreign keys'
    checks, queued to COMMIT, are 100M+ lookups at 10M records; the books are consistent by construction).
    ``session_replication_role`` needs a superuser, as the scratch database's owner is here. Elsewhere: nothing.

    A partitioned table's index is dropped with its partitions' indexes and built again on every partition; the
    tables and their partitions are then checked to have every index they had before, under the same names, valid.
    """
    from django.db import connection

    if connection.vendor != "postgresql":
        yield
        return
    tables = [model._meta.db_table for model in models]
    with connection.cursor() as cursor:
        before = index_definitions(cursor, tables)
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute(
            "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
            "WHERE indrelid = ANY(%s::regclass[]) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conindid = indexrelid) "
            "AND NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = indexrelid)",
            [tables],
        )
        indexes = cursor.fetchall()
        for name, _ in indexes:
            cursor.execute(f"DROP INDEX {name}")
    yield
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL maintenance_work_mem = '512MB'")
        for _, definition in indexes:
            cursor.execute(on_every_partition(definition))
        cursor.execute("SET LOCAL session_replication_role = DEFAULT")
        after = index_definitions(cursor, tables)
    if after != before:
        raise RuntimeError(
            f"the bulk load left other indexes than it found: missing {sorted(before - after)}, "
            f"new {sorted(after - before)}"
        )
    print(f"  {len(indexes)} indexes built in {time.perf_counter() - started:.0f} s")


def on_every_partition(definition: str) -> str:
    """An index definition from ``pg_get_indexdef`` made to build the index on every partition of its table.

    PostgreSQL writes a partitioned table's index as ``CREATE INDEX ... ON ONLY <table>``: the parent's index alone,
    invalid until an index of each partition is attached to it. Run as it is, the partitions would be left without
    it and every read of them would scan them; without ``ONLY`` it is made on each partition, under the name
    PostgreSQL chose for it the first time, and attached. A plain table's definition has no ``ONLY``.
    """
    return definition.replace(" ON ONLY ", " ON ", 1)


def index_definitions(cursor: Any, tables: Sequence[str]) -> set[tuple[str, str, str, bool, bool]]:
    """Every index of ``tables`` and of their partitions: its table, name, columns, whether it is unique and whether
    it is valid (a partitioned table's index is not until each partition has its own). Not the definition's text:
    PostgreSQL may write a predicate built again from that text with other casts."""
    cursor.execute(
        "SELECT indrelid::regclass::text, indexrelid::regclass::text, indkey::text, indisunique, indisvalid "
        "FROM pg_index WHERE indrelid = ANY(%s::regclass[]) OR indrelid IN "
        "(SELECT tree.relid FROM unnest(%s::regclass[]) AS parent(relid), pg_partition_tree(parent.relid) AS tree)",
        [list(tables), list(tables)],
    )
    return set(cursor.fetchall())


def insert(model: Any, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> None:
    """Rows of Python values into the model's table: COPY on PostgreSQL, executemany elsewhere.

    Columns the model has but ``columns`` leaves out take their model default (the same for every row).
    """
    from django.db import connections

    connection = connections["default"]
    rows = list(rows)
    if not rows:
        return
    fields = {field.column: field for field in model._meta.concrete_fields}
    defaults = {
        column: field.get_default()
        for column, field in fields.items()
        if column not in columns and not field.primary_key and (field.has_default() or not field.null)
    }
    names = [*columns, *defaults]
    default_values = tuple(fields[column].get_db_prep_save(value, connection) for column, value in defaults.items())
    adapters = [(index, _adapter(fields[column], connection.vendor)) for index, column in enumerate(columns)]
    adapters = [(index, adapt) for index, adapt in adapters if adapt is not None]

    def prepared(row: tuple[Any, ...]) -> tuple[Any, ...]:
        values = list(row)
        for index, adapt in adapters:
            if values[index] is not None:
                values[index] = adapt(values[index])
        return (*values, *default_values)

    table = model._meta.db_table
    if connection.vendor == "postgresql":
        # COPY's text format written by hand, one formatter per column decided once: psycopg's write_row looks up a
        # dumper for every value, a third of the load's time at 10M records.
        formats = [_copy_text(fields[column]) for column in columns]
        tail = "".join(
            "\t" + (NULL if value is None else _copy_text(fields[column])(value)) for column, value in defaults.items()
        )
        with connection.cursor() as cursor:
            raw = cursor.cursor  # psycopg's own cursor, for COPY
            with raw.copy(f'COPY "{table}" ({", ".join(names)}) FROM STDIN') as copy:
                lines = []
                for row in rows:
                    text = "\t".join(
                        [NULL if value is None else write(value) for write, value in zip(formats, row, strict=True)]
                    )
                    lines.append(text + tail + "\n")
                copy.write("".join(lines))
        return
    sql = f'INSERT INTO "{table}" ({", ".join(names)}) VALUES ({", ".join(["%s"] * len(names))})'  # noqa: S608
    with connection.cursor() as cursor:
        cursor.executemany(sql, [prepared(row) for row in rows])


NULL = "\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(field: Any) -> Callable[[Any], str]:
    """How a Python value of this column is written in COPY's text format (None is written as NULL beforehand)."""
    if field.is_relation:
        field = field.target_field
    kind = field.get_internal_type()
    if kind == "JSONField":
        return lambda value: json.dumps(value).translate(_ESCAPES)
    if kind == "BooleanField":
        return lambda value: "t" if value else "f"
    if kind == "DateTimeField":
        return lambda value: value.isoformat()
    if kind in ("CharField", "TextField"):
        return lambda value: str(value).translate(_ESCAPES)
    return str  # integers, decimals, UUIDs


def _adapter(field: Any, vendor: str) -> Callable[[Any], Any] | None:
    """What the driver needs for a Python value of this column (None: the value as it is), decided once.

    What Django's fields do per value, without their per-value cost: 4M rows make it the load's bottleneck.
    """
    if field.is_relation:
        field = field.target_field
    kind = field.get_internal_type()
    if kind == "JSONField":
        if vendor == "postgresql":
            from psycopg.types.json import Jsonb

            return Jsonb
        return json.dumps
    if vendor == "postgresql":
        return None  # psycopg takes UUIDs, aware datetimes and Decimals as they are
    if kind == "UUIDField":
        return lambda value: value.hex
    if kind == "DateTimeField":
        return lambda value: str(value.astimezone(UTC).replace(tzinfo=None))  # SQLite stores naive UTC text
    if kind == "DecimalField":
        return str
    return None


# --- Writes through the real path -------------------------------------------------------------------------


def write_rates(world: dict[str, Any], writes: int) -> tuple[float, float, int]:
    """Records per second through record_attempt alone, then through finish_attempt end to end, and the number
    of statements its transaction sends (as Django counts them)."""
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext

    from billing.metering import record_attempt
    from billing.models import UsageRecord
    from inference import closing, dispatch
    from inference.models import AttemptOutcome, Job, JobAttempt, JobStatus

    dispatch.send_run_message = lambda *args: True  # type: ignore[assignment]  # no broker: nothing is queued
    organization = world["organizations"][1]
    # An image model priced as admission prices it, with holds that cover the cost: each write debits, as a
    # customer's does (an output-priced endpoint given an image result, or a hold below the cost, bills nothing).
    endpoint = next(endpoint for endpoint in world["endpoints"] if endpoint.endpoint_id == "platform/tiny-sd")

    hook_jobs = running_jobs(organization, endpoint, writes)
    pairs = []
    now = datetime.now(UTC)
    # The rows as finish_attempt leaves them before calling the hook (closed beforehand: only billing is timed).
    JobAttempt.objects.filter(job__in=hook_jobs).update(outcome=AttemptOutcome.SUCCEEDED, gpu_ms=1_500, finished_at=now)
    Job.objects.filter(pk__in=hook_jobs).update(
        status=JobStatus.COMPLETED, gpu_ms=1_500, finished_at=now, result={"images": [{"url": "x"}]}
    )
    for job in Job.objects.filter(pk__in=hook_jobs).select_related("endpoint", "organization"):
        pairs.append((job, JobAttempt.objects.get(job=job, number=1)))
    first_job, first_attempt = pairs.pop()
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        record_attempt(first_job, first_attempt)
    assert UsageRecord.objects.get(job=first_job).cost_micros > 0, "the benchmark's writes must debit"
    started = time.perf_counter()
    for job, attempt in pairs:
        with transaction.atomic():
            record_attempt(job, attempt)
    hook_rate = len(pairs) / (time.perf_counter() - started)

    finish_jobs = running_jobs(organization, endpoint, writes)
    started = time.perf_counter()
    for job_id in finish_jobs:
        closing.finish_attempt(
            job_id=str(job_id),
            attempt=1,
            outcome=AttemptOutcome.SUCCEEDED,
            gpu_ms=1_500,
            result={"images": [{"url": "x"}]},
        )
    finish_rate = writes / (time.perf_counter() - started)
    return hook_rate, finish_rate, len(queries)


def running_jobs(organization: Any, endpoint: Any, count: int) -> list[uuid.UUID]:
    """``count`` jobs running their first attempt, each with its hold, as admission and claim leave them."""
    from django.db import transaction
    from django.db.models import F

    from billing.models import Account, Hold
    from billing.money import cost_micros
    from billing.pricing import price_for
    from inference.models import Job, JobAttempt, JobStatus

    now = datetime.now(UTC)
    quote = price_for(endpoint, now, organization.pk)
    # Twice the cost of the 1.5 s of GPU time the benchmark reports, as admission holds an estimate with margin.
    _, cost = cost_micros(
        unit=quote.unit, unit_price_micros=quote.unit_price_micros, gpu_ms=1_500, images=1, pixels=64 * 64
    )
    amount = 2 * int(cost)
    job_input = {"prompt": "bench", "num_inference_steps": 4, "num_images": 1, "width": 64, "height": 64}
    with transaction.atomic():
        jobs = Job.objects.bulk_create(
            [
                Job(
                    organization=organization,
                    endpoint=endpoint,
                    gpu_class=endpoint.gpu_class,
                    input=job_input,
                    status=JobStatus.RUNNING,
                    attempt=1,
                    created_at=now,
                    started_at=now,
                    lease_expires_at=now + timedelta(hours=1),
                )
                for _ in range(count)
            ],
            batch_size=500,
        )
        JobAttempt.objects.bulk_create(
            [JobAttempt(job=job, number=1, worker="bench", started_at=now) for job in jobs], batch_size=500
        )
        Hold.objects.bulk_create(
            [
                Hold(
                    job=job,
                    organization=organization,
                    amount_micros=amount,
                    unit_price_micros=quote.unit_price_micros,
                    unit=quote.unit,
                )
                for job in jobs
            ],
            batch_size=500,
        )
        Account.objects.filter(pk=organization.pk).update(held_micros=F("held_micros") + amount * count)
    return [job.pk for job in jobs]


# --- The usage report from raw records, for contrast ------------------------------------------------------


def usage_from_raw(organization_id: Any, start: Any, end: Any, group_by: Sequence[str]) -> list[dict[str, Any]]:
    """The report's rows computed from raw usage records (what the page would cost without rollups)."""
    from django.db.models import Count, Q, Sum
    from django.db.models.functions import TruncDay

    from billing import selectors
    from billing.models import UsageRecord

    keys = ["day" if dimension == "day" else "endpoint_id" for dimension in group_by]
    rows = (
        UsageRecord.objects.filter(
            organization_id=organization_id,
            recorded_at__gte=selectors.day_start(start),
            recorded_at__lt=selectors.day_start(end + timedelta(days=1)),
        )
        .annotate(day=TruncDay("recorded_at", tzinfo=UTC))
        .values(*keys)
        .annotate(
            attempts=Count("id"),
            billable_attempts=Count("id", filter=Q(billable=True)),
            gpu_ms=Sum("gpu_ms"),
            unbilled_gpu_ms=Sum("unbilled_gpu_ms"),
            cost_micros=Sum("cost_micros"),
        )
        .order_by(*keys)
    )
    return [
        {
            **({"day": row["day"].date().isoformat()} if "day" in row else {}),
            **({"endpoint_id": row["endpoint_id"]} if "endpoint_id" in row else {}),
            **{
                name: int(row[name])
                for name in ("attempts", "billable_attempts", "gpu_ms", "unbilled_gpu_ms", "cost_micros")
            },
        }
        for row in rows
    ]


def comparable(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The selector's rows in the raw report's shape (endpoint ids, not names; requests as billable attempts)."""
    from inference.models import Endpoint

    ids = {endpoint.endpoint_id: endpoint.pk for endpoint in Endpoint.objects.all()}
    return [
        {
            **({"day": row["day"]} if "day" in row else {}),
            **({"endpoint_id": ids[row["endpoint"]]} if "endpoint" in row else {}),
            "attempts": row["attempts"],
            "billable_attempts": row["requests"],
            "gpu_ms": row["gpu_ms"],
            "unbilled_gpu_ms": row["unbilled_gpu_ms"],
            "cost_micros": row["cost_micros"],
        }
        for row in report["data"]
    ]


if __name__ == "__main__":
    main()
