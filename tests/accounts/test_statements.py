"""``accounts.statements`` writes the row ``save()`` writes: every column compared, read back from the database."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import DatabaseError, connection
from django.db.models import Model
from django.test.utils import CaptureQueriesContext

from accounts import statements
from tests import sessions
from tests.waiting import wait_until


def _columns(instance: Model) -> dict[str, Any]:
    """The row as the database holds it, every concrete column but the primary key."""
    row = type(instance)._default_manager.filter(pk=instance.pk).values().get()
    row.pop(type(instance)._meta.pk.attname)
    return row


def _job(tenant: dict[str, Any], endpoint: Any, **fields: Any) -> Any:
    from inference.models import Job

    return Job(
        organization=tenant["organization"],
        api_key=tenant["api_key"],
        endpoint=endpoint,
        gpu_class=endpoint.gpu_class,
        input={"prompt": "a lighthouse", "num_images": 2, "seed": 7},
        end_user="customer-9",
        **fields,
    )


@pytest.mark.django_db
def test_an_insert_writes_the_row_that_save_writes(tenant: dict[str, Any], builtin_endpoint: Any) -> None:
    from billing.models import UsageRecord
    from inference.models import Job, JobAttempt, JobLog

    moment = datetime(2026, 12, 5, 12, 30, tzinfo=UTC)
    saved_job, written_job = _job(tenant, builtin_endpoint), _job(tenant, builtin_endpoint)
    saved_job.save()
    statements.insert(written_job)
    assert written_job.pk is not None
    assert written_job.pk != saved_job.pk
    assert Job.objects.get(pk=written_job.pk).input == saved_job.input
    expected, written = _columns(saved_job), _columns(written_job)
    for moment_column in ("created_at",):  # each row took its own "now"
        assert abs(expected.pop(moment_column) - written.pop(moment_column)) < timedelta(seconds=60)
    assert written == expected

    JobAttempt.objects.create(job=saved_job, number=1, worker="w", started_at=moment, heartbeat_at=moment)
    statements.insert(JobAttempt(job=written_job, number=1, worker="w", started_at=moment, heartbeat_at=moment))
    attempts = [_columns(JobAttempt.objects.get(job=job)) for job in (saved_job, written_job)]
    assert [attempt.pop("job_id") for attempt in attempts] == [saved_job.pk, written_job.pk]
    assert attempts[0] == attempts[1]

    record_fields: dict[str, Any] = {
        "organization": tenant["organization"], "attempt_number": 1, "api_key": tenant["api_key"],
        "endpoint": builtin_endpoint, "end_user": "customer-9", "gpu_class": builtin_endpoint.gpu_class,
        "outcome": "succeeded", "billable": True, "gpu_ms": 1_234, "unbilled_gpu_ms": 56, "unit": "image",
        "billable_units": Decimal("2.500000"), "unit_price_micros": 400, "cost_micros": 1_000, "work_units": 9,
        "started_at": moment, "recorded_at": moment + timedelta(seconds=3),
    }  # fmt: skip
    saved_record = UsageRecord.objects.create(job=saved_job, **record_fields)
    written_record = UsageRecord(job=written_job, **record_fields)
    statements.insert(written_record)
    assert isinstance(written_record.pk, int)
    assert written_record.pk > saved_record.pk
    assert not written_record._state.adding
    records = [_columns(saved_record), _columns(written_record)]
    assert [record.pop("job_id") for record in records] == [saved_job.pk, written_job.pk]
    assert records[0] == records[1]
    assert records[1]["billable_units"] == Decimal("2.5")
    assert records[1]["price_id"] is None

    saved_line = JobLog.objects.create(job=saved_job, message="Completed.", level="INFO", source="platform")
    statements.insert(JobLog(job=written_job, message="Completed.", level="INFO", source="platform"), want_pk=False)
    lines = [_columns(saved_line), _columns(JobLog.objects.get(job=written_job))]
    assert abs(lines[0].pop("created_at") - lines[1].pop("created_at")) < timedelta(seconds=60)
    assert [line.pop("job_id") for line in lines] == [saved_job.pk, written_job.pk]
    assert lines[0] == lines[1]


@pytest.mark.django_db
def test_an_update_writes_what_save_with_update_fields_writes(tenant: dict[str, Any], builtin_endpoint: Any) -> None:
    from inference.models import Job, JobStatus

    created = datetime(2026, 12, 5, 12, 59, tzinfo=UTC)
    jobs = [_job(tenant, builtin_endpoint, created_at=created), _job(tenant, builtin_endpoint, created_at=created)]
    for job in jobs:
        job.save()
    finished = datetime(2026, 12, 5, 13, 0, tzinfo=UTC)
    for job in jobs:
        job.status, job.result, job.finished_at, job.gpu_ms = JobStatus.COMPLETED, {"images": [1]}, finished, 900
        job.error = "not written: not among the fields"
    jobs[0].save(update_fields=["status", "result", "finished_at", "gpu_ms"])
    with CaptureQueriesContext(connection) as sent:
        statements.update(jobs[1], ["status", "result", "finished_at", "gpu_ms", "status"])
    assert len(sent) == 1
    rows = [_columns(Job.objects.get(pk=job.pk)) for job in jobs]
    assert rows[0] == rows[1]
    assert rows[1]["status"] == JobStatus.COMPLETED
    assert rows[1]["error"] == ""
    assert rows[1]["gpu_ms"] == 900


@pytest.mark.django_db
def test_what_the_statements_refuse(tenant: dict[str, Any], builtin_endpoint: Any) -> None:
    from inference.models import JobLog

    job = _job(tenant, builtin_endpoint)
    job.save()
    line = JobLog.objects.create(job=job, message="queued")
    with pytest.raises(ValueError, match="already has a primary key"):
        statements.insert(line)
    with pytest.raises(ValueError, match="not a column"):
        statements.update(job, ["id"])
    type(job).objects.filter(pk=job.pk).delete()
    with pytest.raises(DatabaseError, match="not there to update"):
        statements.update(job, ["status"])


@pytest.mark.django_db
def test_a_row_along_lands_with_its_statement_in_one_round_trip_on_postgresql(
    tenant: dict[str, Any], builtin_endpoint: Any
) -> None:
    from inference.models import Job, JobLog, JobStatus

    job = _job(tenant, builtin_endpoint)
    with CaptureQueriesContext(connection) as sent:
        statements.insert(job, along=JobLog(job=job, message="Request queued.", source="platform"))
    job.status = JobStatus.CANCELLED
    with CaptureQueriesContext(connection) as sent_too:
        statements.update(job, ["status"], along=JobLog(job=job, message="Cancelled.", source="platform"))
    one_statement = connection.vendor == "postgresql"
    assert (len(sent), len(sent_too)) == ((1, 1) if one_statement else (2, 2))
    assert Job.objects.get(pk=job.pk).status == JobStatus.CANCELLED
    lines = JobLog.objects.filter(job=job).order_by("id")
    assert [line.message for line in lines] == ["Request queued.", "Cancelled."]


@pytest.mark.django_db
def test_a_column_written_by_the_database_s_expression_is_returned_to_the_instance(
    tenant: dict[str, Any], builtin_endpoint: Any
) -> None:
    """``FromDatabase``: the column takes the database's value (here its clock), not the instance's, in the same
    statement, and the instance holds what was written: by ``insert``, and by ``insertion`` sent first in ``in_turn``
    (its rows read on the way to the last statement's)."""
    from django.db.models.functions import Now

    from inference.models import Job

    def database_now() -> datetime:
        return type(builtin_endpoint).objects.annotate(now=Now()).values_list("now", flat=True)[:1].get()

    stamped = statements.FromDatabase("start_deadline", statements.now_sql(connection.vendor))
    job = _job(tenant, builtin_endpoint, start_deadline=datetime(2000, 1, 1, tzinfo=UTC))  # not what is written
    before = database_now()
    with CaptureQueriesContext(connection) as sent:
        statements.insert(job, from_database=[stamped])
    assert len(sent) == 1
    stored = Job.objects.get(pk=job.pk).start_deadline
    assert job.start_deadline == stored
    assert before <= stored <= database_now()

    other = _job(tenant, builtin_endpoint)
    first_rows: list[Any] = []
    with connection.cursor() as cursor:
        statements.in_turn(
            cursor, statements.insertion(other, from_database=[stamped]), ("SELECT 7", ()), rows={0: first_rows}
        )
        assert cursor.fetchall() == [(7,)]
    statements.written(other, other.pk)
    statements.returned(other, first_rows[0], [stamped])
    assert other.start_deadline == Job.objects.get(pk=other.pk).start_deadline
    assert stored <= other.start_deadline <= database_now()


@pytest.mark.django_db(transaction=True)
def test_a_statement_in_turn_reads_what_the_lock_it_waited_for_committed() -> None:
    """``in_turn``: the second statement sees what the holder of the lock the first waited for committed (one round
    trip on PostgreSQL); one statement holding both the lock and the read would not (its snapshot predates the
    wait), which is why admission and dispatch send two."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks and snapshots: PostgreSQL (SQLite runs one writer at a time)")
    import psycopg
    from django.db import transaction

    conninfo = sessions.conninfo()
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE turn_lock (id int PRIMARY KEY); CREATE TABLE turn_rows (id int)")
        cursor.execute("INSERT INTO turn_lock VALUES (1)")
    seen: dict[str, int] = {}

    def reader(name: str) -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                if name == "in turn":
                    statements.in_turn(
                        cursor,
                        ("SELECT 1 FROM turn_lock WHERE id = %s FOR KEY SHARE", [1]),
                        ("SELECT count(*) FROM turn_rows", []),
                    )
                else:
                    cursor.execute(
                        "SELECT (SELECT count(*) FROM turn_rows) FROM turn_lock WHERE id = %s FOR KEY SHARE", [1]
                    )
                seen[name] = cursor.fetchone()[0]
        finally:
            connection.close()

    try:
        with psycopg.connect(**conninfo) as holder, psycopg.connect(**conninfo, autocommit=True) as watcher:
            holder.execute("SELECT 1 FROM turn_lock WHERE id = 1 FOR UPDATE")
            holder.execute("INSERT INTO turn_rows VALUES (1)")
            threads = [threading.Thread(target=reader, args=(name,)) for name in ("in turn", "one statement")]
            for thread in threads:
                thread.start()
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%turn_lock%'"
            )
            wait_until(
                lambda: watcher.execute(waiting).fetchone()[0] == 2,  # type: ignore[index]
                timeout=30,
                message="both readers to wait for the lock",
            )
            holder.commit()
            for thread in threads:
                thread.join(timeout=30)
        assert seen == {"in turn": 1, "one statement": 0}
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS turn_lock; DROP TABLE IF EXISTS turn_rows")


def _plans_once_here() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("prepared statements: PostgreSQL")


@pytest.mark.django_db(transaction=True)
def test_statements_planned_once_are_prepared_once_per_connection_and_answer_as_sent_plain(
    tenant: dict[str, Any], builtin_endpoint: Any
) -> None:
    _plans_once_here()
    from inference.models import Job

    job = _job(tenant, builtin_endpoint)
    statements.insert(job)
    count = (f"SELECT count(*) FROM {Job._meta.db_table} WHERE organization_id = %s AND input ->> 'seed' = %s", [  # noqa: S608
        tenant["organization"].pk, "7"])  # fmt: skip
    named = ("SELECT %(word)s || '%%' || %(word)s, %(number)s::int + 1", {"word": "it's", "number": 41})
    answers = []
    for _ in range(3):
        with CaptureQueriesContext(connection) as sent, connection.cursor() as cursor:
            statements.in_turn(cursor, count, named, plan_once=True)
            answers.append(cursor.fetchall())
        # Besides, once per connection, what the server holds prepared already (statements.is_preparation).
        sql = [query["sql"] for query in sent.captured_queries if query["sql"] != statements._PREPARED_ON_THE_SERVER]
        answers.append([text.split(" ", 1)[0] for text in sql])
    assert answers[0] == answers[2] == answers[4] == [("it's%it's", 42)]
    assert answers[1] == ["PREPARE", "PREPARE", "EXECUTE"]  # each statement prepared, then both in one query
    assert answers[3] == answers[5] == ["EXECUTE"]
    with connection.cursor() as cursor:
        statements.in_turn(cursor, count)
        assert cursor.fetchall() == [(1,)]
    connection.close()  # back to the pool: the next connection (maybe this one again) prepares what it lacks
    with connection.cursor() as cursor:
        statements.in_turn(cursor, count, plan_once=True)
        assert cursor.fetchall() == [(1,)]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("plan_once", [False, True])
def test_in_turn_keeps_the_rows_of_the_statements_asked_for_by_index(plan_once: bool) -> None:
    """A dispatch's rows read on the way to a last statement (``inference.submission``): by index, from either end,
    on one query or one execute each, prepared or not."""
    sent = [(f"SELECT %s * {n} UNION ALL SELECT %s * {n}", [1, 2]) for n in (1, 10, 100, 1000)]
    first: list[Any] = []
    third: list[Any] = []
    with connection.cursor() as cursor:
        statements.in_turn(cursor, *sent, plan_once=plan_once, rows={0: first, -2: third})
        assert cursor.fetchall() == [(1000,), (2000,)]  # left on the last
    assert (first, third) == ([(1,), (2,)], [(100,), (200,)])


@pytest.mark.django_db(transaction=True)
def test_a_statement_deallocated_on_the_server_is_prepared_again() -> None:
    _plans_once_here()
    statement = ("SELECT %s::int * 2", [21])
    with connection.cursor() as cursor:
        statements.in_turn(cursor, statement, plan_once=True)
        assert cursor.fetchall() == [(42,)]
        cursor.execute("DEALLOCATE ALL")  # as DISCARD ALL or a session pooler's reset does
        statements.in_turn(cursor, statement, plan_once=True)
        assert cursor.fetchall() == [(42,)]


@pytest.mark.django_db(transaction=True)
def test_behind_a_transaction_pooler_nothing_is_prepared(settings: Any) -> None:
    _plans_once_here()
    settings.DATABASE_TRANSACTION_POOLING = True
    with CaptureQueriesContext(connection) as sent, connection.cursor() as cursor:
        statements.in_turn(cursor, ("SELECT %s::int + 1", [1]), ("SELECT %s::int + 2", [1]), plan_once=True)
        assert cursor.fetchall() == [(3,)]
    assert [query["sql"] for query in sent.captured_queries] == ["SELECT 1::int + 1; SELECT 1::int + 2"]


@pytest.mark.django_db(transaction=True)
def test_a_statement_gone_stale_or_half_deallocated_is_prepared_afresh() -> None:
    _plans_once_here()
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE statements_stale (x integer)")
        try:
            cursor.execute("INSERT INTO statements_stale VALUES (7)")
            read = ("SELECT x FROM statements_stale WHERE x > %s", [0])
            other = ("SELECT %s::int + 1", [1])
            statements.in_turn(cursor, read, plan_once=True)
            assert cursor.fetchall() == [(7,)]
            # A migration changes what the prepared statement returns ("cached plan must not change result type").
            cursor.execute("ALTER TABLE statements_stale ALTER COLUMN x TYPE bigint")
            statements.in_turn(cursor, read, plan_once=True)
            assert cursor.fetchall() == [(7,)]
            # One of two statements deallocated: the other, still there, is not prepared twice.
            statements.in_turn(cursor, read, other, plan_once=True)
            name, _ = statements._preparation(statements._positional(read)[0])
            cursor.execute(f"DEALLOCATE {name}")
            for _ in range(2):
                statements.in_turn(cursor, read, other, plan_once=True)
                assert cursor.fetchall() == [(2,)]
        finally:
            cursor.execute("DROP TABLE statements_stale")


@pytest.mark.django_db(transaction=True)
def test_prepared_statements_that_keep_vanishing_turn_preparing_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What an undeclared transaction pooler does: the next query runs on a server connection without the statement.
    _plans_once_here()
    monkeypatch.setattr(statements, "_preparing", True)
    sent = statements._in_turn

    def on_another_server_connection(cursor: Any, statements_sent: Any, **options: Any) -> None:
        if statements_sent[0][0].startswith("EXECUTE "):
            cursor.execute("DEALLOCATE ALL")
        sent(cursor, statements_sent, **options)

    monkeypatch.setattr(statements, "_in_turn", on_another_server_connection)
    with connection.cursor() as cursor:
        statements.in_turn(cursor, ("SELECT %s::int * 3", [5]), plan_once=True)
        assert cursor.fetchall() == [(15,)]
    assert statements._preparing is False
    assert "DATABASE_TRANSACTION_POOLING" in caplog.text
    with CaptureQueriesContext(connection) as after, connection.cursor() as cursor:
        statements.in_turn(cursor, ("SELECT %s::int * 3", [5]), plan_once=True)
        assert cursor.fetchall() == [(15,)]
    assert [query["sql"] for query in after.captured_queries] == ["SELECT 5::int * 3"]
