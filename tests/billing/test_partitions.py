"""The usage records' monthly partitions (billing.partitions): made ahead by the scheduler's task, idempotently; each
row in its month's partition; and the guarantees a partitioned table cannot hold itself still held by the database.

The partition tests need PostgreSQL (SQLite keeps a plain table); the guarantees are checked on both.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.migrations.recorder import MigrationRecorder
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import partitions
from billing.models import CreditEntry, EntryKind, UsageRecord
from billing.tasks import create_partitions_ahead
from inference.models import Job, JobStatus

postgresql_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="partitions are PostgreSQL's")
TABLE = "billing_usagerecord"


def partitions_of(table: str) -> dict[str, str]:
    """Partition name -> its bounds, as PostgreSQL describes them."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT child.relname, pg_get_expr(child.relpartbound, child.oid) FROM pg_inherits "
            "JOIN pg_class child ON child.oid = inhrelid WHERE inhparent = %s::regclass",
            [table],
        )
        return dict(cursor.fetchall())


def partition_of_row(record_id: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT tableoid::regclass::text FROM {TABLE} WHERE id = %s", [record_id])  # noqa: S608
        return cursor.fetchone()[0]


def new_job(tenant: dict[str, Any], endpoint: Any) -> Job:
    return Job.objects.create(
        organization=tenant["organization"],
        endpoint=endpoint,
        gpu_class=endpoint.gpu_class,
        input={},
        status=JobStatus.COMPLETED,
    )


def record(
    job: Job, *, attempt_number: int = 1, recorded_at: datetime, cost_micros: int = 0, **fields: Any
) -> UsageRecord:
    return UsageRecord.objects.create(
        **fields,
        organization_id=job.organization_id,
        job=job,
        attempt_number=attempt_number,
        endpoint_id=job.endpoint_id,
        gpu_class=job.gpu_class,
        outcome="succeeded",
        billable=True,
        gpu_ms=1_000,
        unbilled_gpu_ms=0,
        unit="gpu_second",
        billable_units=1,
        unit_price_micros=cost_micros,
        cost_micros=cost_micros,
        started_at=recorded_at - timedelta(seconds=1),
        recorded_at=recorded_at,
    )


def checked_now(sql: str, parameters: list[Any]) -> None:
    """Runs ``sql`` and checks the deferred foreign keys at once (they would be checked at COMMIT)."""
    with connection.cursor() as cursor:
        cursor.execute(sql, parameters)
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")


@postgresql_only
@pytest.mark.django_db
def test_the_task_creates_this_month_and_the_next_three_once() -> None:
    now = datetime(2031, 11, 20, 8, 30, tzinfo=UTC)
    expected = [f"{TABLE}_p2031_11", f"{TABLE}_p2031_12", f"{TABLE}_p2032_01", f"{TABLE}_p2032_02"]
    assert not set(expected) & set(partitions_of(TABLE))

    assert partitions.create_partitions_ahead(now=now) == expected
    made = partitions_of(TABLE)
    assert made[f"{TABLE}_p2031_12"] == "FOR VALUES FROM ('2031-12-01 00:00:00+00') TO ('2032-01-01 00:00:00+00')"
    assert made[f"{TABLE}_p2032_02"] == "FOR VALUES FROM ('2032-02-01 00:00:00+00') TO ('2032-03-01 00:00:00+00')"
    # Run again (the beat runs hourly), and a month later: only the month not yet made.
    assert partitions.create_partitions_ahead(now=now) == []
    assert partitions.create_partitions_ahead(now=now + timedelta(days=15)) == [f"{TABLE}_p2032_03"]
    assert set(partitions_of(TABLE)) >= {*expected, f"{TABLE}_p2032_03"}


@postgresql_only
@pytest.mark.django_db
def test_the_scheduled_task_finds_this_month_made_by_the_migration() -> None:
    """The migration made its month and the next three; the beat's task (run as Celery runs it) adds nothing, unless
    a month ended since the migration made the test database: then the months the task's own month reaches past
    them."""
    migrated = MigrationRecorder.Migration.objects.get(app="billing", name="0013_partition_usage_records").applied
    month = partitions.month_start(migrated)
    for _ in range(partitions.MONTHS_AHEAD + 1):
        assert partitions.partition_name(TABLE, month) in partitions_of(TABLE)
        month = partitions.next_month(month)
    first_not_made = month

    def beyond_the_migrations(now: datetime) -> list[str]:
        last = partitions.month_start(now)
        for _ in range(partitions.MONTHS_AHEAD):
            last = partitions.next_month(last)
        names, month = [], first_not_made
        while month <= last:
            names.append(partitions.partition_name(TABLE, month))
            month = partitions.next_month(month)
        return names

    before = timezone.now()  # the task's clock
    made = create_partitions_ahead.apply().get()
    assert made in (beyond_the_migrations(before), beyond_the_migrations(timezone.now()))


@postgresql_only
@pytest.mark.django_db
def test_rows_land_in_their_months_partition(tenant: dict[str, Any], builtin_endpoint: Any) -> None:
    partitions.create_partitions_ahead(now=datetime(2031, 1, 10, tzinfo=UTC), months=1)
    job = new_job(tenant, builtin_endpoint)
    moments = {
        1: datetime(2031, 1, 1, 0, 0, tzinfo=UTC),  # the first instant of January
        2: datetime(2031, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # the last of January
        3: datetime(2031, 2, 1, 0, 0, tzinfo=UTC),  # February's first
    }
    made = {number: record(job, attempt_number=number, recorded_at=moment) for number, moment in moments.items()}
    assert partition_of_row(made[1].pk) == f"{TABLE}_p2031_01"
    assert partition_of_row(made[2].pk) == f"{TABLE}_p2031_01"
    assert partition_of_row(made[3].pk) == f"{TABLE}_p2031_02"
    # A month without a partition (the beat stopped) is not refused: its rows wait in the default partition, and
    # the task leaves that month alone rather than fail on them.
    late = record(job, attempt_number=4, recorded_at=datetime(2033, 6, 2, tzinfo=UTC))
    assert partition_of_row(late.pk) == f"{TABLE}_default"
    assert partitions.create_partitions_ahead(now=datetime(2033, 6, 1, tzinfo=UTC), months=1) == [f"{TABLE}_p2033_07"]
    assert f"{TABLE}_p2033_06" not in partitions_of(TABLE)
    # The page's read of one month touches that month's partition only.
    with connection.cursor() as cursor:
        cursor.execute(
            f"EXPLAIN SELECT * FROM {TABLE} WHERE recorded_at >= %s AND recorded_at < %s",  # noqa: S608
            [datetime(2031, 1, 5, tzinfo=UTC), datetime(2031, 1, 9, tzinfo=UTC)],
        )
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert f"{TABLE}_p2031_01" in plan, plan
    assert f"{TABLE}_p2031_02" not in plan, plan
    assert "default" not in plan, plan


@pytest.mark.django_db
def test_one_record_per_attempt_across_months(tenant: dict[str, Any], builtin_endpoint: Any) -> None:
    """The unique (job, attempt) holds whatever month each copy would fall in (PostgreSQL: on the key table)."""
    job = new_job(tenant, builtin_endpoint)
    record(job, recorded_at=datetime.now(UTC))
    with pytest.raises(IntegrityError), transaction.atomic():
        record(job, recorded_at=datetime.now(UTC) - timedelta(days=40))
    assert UsageRecord.objects.filter(job=job).count() == 1


@postgresql_only
@pytest.mark.django_db
def test_a_debited_record_keeps_its_entry_and_its_identity(tenant: dict[str, Any], builtin_endpoint: Any) -> None:
    job = new_job(tenant, builtin_endpoint)
    used = record(job, recorded_at=datetime.now(UTC), cost_micros=500)
    CreditEntry.objects.create(
        organization=tenant["organization"],
        kind=EntryKind.USAGE,
        amount_micros=-500,
        balance_after_micros=0,
        idempotency_key=f"usage-{used.pk}",
        usage_record=used,
    )
    # Deleting the record behind the entry's back (raw SQL: the ORM's PROTECT would stop it first) is refused.
    with pytest.raises(IntegrityError), transaction.atomic():
        checked_now(f"DELETE FROM {TABLE} WHERE id = %s", [used.pk])  # noqa: S608
    # An entry naming a record that does not exist is refused.
    with pytest.raises(IntegrityError), transaction.atomic():
        checked_now(
            "INSERT INTO billing_creditentry (organization_id, kind, amount_micros, balance_after_micros, "
            "idempotency_key, usage_record_id, description, created_at) VALUES (%s, 'usage', -1, 0, 'usage-x', %s, '', "
            "now())",
            [tenant["organization"].pk, used.pk + 1_000_000],
        )
    # Its identity is not rewritten (the key row is its identity); a new recorded_at moves it to that month's
    # partition, the same record under the same key, still behind its entry.
    with pytest.raises(IntegrityError), transaction.atomic():
        UsageRecord.objects.filter(pk=used.pk).update(attempt_number=2)
    partitions.create_partitions_ahead(now=datetime(2031, 3, 1, tzinfo=UTC), months=0)
    UsageRecord.objects.filter(pk=used.pk).update(recorded_at=datetime(2031, 3, 5, tzinfo=UTC))
    checked_now("SELECT 1", [])
    assert partition_of_row(used.pk) == f"{TABLE}_p2031_03"
    assert CreditEntry.objects.get(usage_record__job=job).usage_record_id == used.pk
    # Another record under its id, whichever month, is refused.
    with pytest.raises(IntegrityError), transaction.atomic():
        record(job, attempt_number=9, recorded_at=datetime.now(UTC), id=used.pk)
    # A record with no debit can go, and takes its key with it: its attempt can be recorded again.
    spare = record(job, attempt_number=2, recorded_at=datetime.now(UTC))
    UsageRecord.objects.filter(pk=spare.pk).delete()
    record(job, attempt_number=2, recorded_at=datetime.now(UTC) - timedelta(days=40))


@pytest.mark.django_db
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 2), st.integers(-70, 100)), min_size=1, max_size=12))
def test_records_are_one_per_attempt_each_in_its_month(
    tenant: dict[str, Any], builtin_endpoint: Any, writes: list[tuple[int, int, int]]
) -> None:
    """Any sequence of records (a job, an attempt, a day from two months back to three ahead): the first of each
    attempt is kept and every later one refused; on PostgreSQL each kept row sits in the partition of its month
    (or the default one) and has exactly one key row."""
    partitions.create_partitions_ahead()
    jobs = [new_job(tenant, builtin_endpoint) for _ in range(3)]
    now = datetime.now(UTC)
    kept: dict[tuple[uuid.UUID, int], datetime] = {}
    for job_number, attempt_number, day in writes:
        job, moment = jobs[job_number], now + timedelta(days=day)
        try:
            with transaction.atomic():
                record(job, attempt_number=attempt_number, recorded_at=moment)
        except IntegrityError:
            assert (job.pk, attempt_number) in kept
        else:
            assert (job.pk, attempt_number) not in kept
            kept[(job.pk, attempt_number)] = moment
    rows = list(UsageRecord.objects.filter(job__in=jobs))
    assert {(row.job_id, row.attempt_number): row.recorded_at for row in rows} == kept
    if connection.vendor == "postgresql":
        made = partitions_of(TABLE)
        for row in rows:
            month = partitions.partition_name(TABLE, partitions.month_start(row.recorded_at))
            assert partition_of_row(row.pk) == (month if month in made else f"{TABLE}_default")
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT job_id, attempt_number FROM billing_usagerecordkey WHERE id = ANY(%s)",
                [[row.pk for row in rows]],
            )
            assert sorted(cursor.fetchall()) == sorted(kept)
    UsageRecord.objects.filter(job__in=jobs).delete()  # the next example starts from no records


def test_months_are_cut_in_utc() -> None:
    moments = [datetime(2030, 12, 31, 23, 0, tzinfo=UTC), datetime(2031, 1, 1, 0, 30, tzinfo=UTC)]
    assert [partitions.month_start(moment) for moment in moments] == [
        datetime(2030, 12, 1, tzinfo=UTC),
        datetime(2031, 1, 1, tzinfo=UTC),
    ]
    month, months = datetime(2030, 11, 1, tzinfo=UTC), []
    for _ in range(4):
        months.append(f"{month:%Y-%m}")
        month = partitions.next_month(month)
    assert months == ["2030-11", "2030-12", "2031-01", "2031-02"]
