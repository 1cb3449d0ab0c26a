"""Locks on inference's rows, in the platform's one lock order (``accounts.locking``): jobs, then attempts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

from django.db import connection
from django.db.models import Field

from accounts import statements
from accounts.locking import locked
from inference import endpoints
from inference.models import Job, JobAttempt, JobStatus, TenantSettings


def lock_job(job_id: Any, **conditions: Any) -> Job | None:
    """The job, locked, if it still meets ``conditions`` once the lock is held (the row as last committed)."""
    return locked(Job.objects.filter(pk=job_id, **conditions)).first()


class RunningJob(NamedTuple):
    job: Job
    tenant_retention_seconds: int | None  # the organization's own output retention; None: it has none


def lock_running_job(job_id: Any, attempt: int, *, lease_expired_before: datetime | None = None) -> RunningJob | None:
    """The job while it runs ``attempt`` (and, given ``lease_expired_before``, only if its lease expired before
    then: a reading of the database's clock, the one leases are written by, ``inference.attempts.lease_deadline``),
    locked, with what closing it reads: its endpoint (kept in memory, ``inference.endpoints``: billing prices
    by it) and its organization's own output retention. None once the job no longer runs that attempt.

    One statement, written out: the ORM's form of it (the job with its endpoint joined, then the organization's
    retention) took three times the CPU and a second round trip (``python -m tests.bench.billing``, README
    "Benchmarks"). A reap sends it; a worker's finish sends ``lock_and_close_attempt``.
    """
    sql, params = _running_job(job_id, attempt, lease_expired_before)
    with connection.cursor() as cursor:
        columns = statements.columns(Job, "j")
        cursor.execute(f"{sql} SELECT {columns}, j.tenant_retention_seconds FROM j", params)  # noqa: S608
        row = cursor.fetchone()
    return None if row is None else _running(row)


def lock_and_close_attempt(job_id: Any, attempt: int, **closed: Any) -> tuple[RunningJob, JobAttempt] | None:
    """``lock_running_job`` and ``close_attempt`` in one statement, taking their locks in the same order (the job's
    is a scalar subquery the attempt's UPDATE waits for, so it is held first): a worker's finished attempt, where
    nothing needs to be read from the attempt before it is closed. None, and nothing written, once the job no longer
    runs that attempt. Two statements where there is no data-modifying ``WITH`` (SQLite)."""
    if connection.vendor != "postgresql":
        running = lock_running_job(job_id, attempt)
        return None if running is None else (running, close_attempt(job_id, attempt, **closed))
    sql, params = _running_job(job_id, attempt, None)
    assignments, closing_params = _assignments(closed)
    sql += (
        f", a AS (UPDATE {JobAttempt._meta.db_table} SET {assignments} "  # noqa: S608 - column names only
        f"WHERE job_id = (SELECT id FROM j) AND number = %s RETURNING *) "
        f"SELECT {statements.columns(Job, 'j')}, j.tenant_retention_seconds, {statements.columns(JobAttempt, 'a')} "
        f"FROM j LEFT JOIN a ON a.job_id = j.id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, *closing_params, attempt])
        row = cursor.fetchone()
    if row is None:
        return None
    job_width = statements.width(Job) + 1
    closed_row = row[job_width:]
    if all(value is None for value in closed_row):  # the LEFT JOIN found no attempt to close
        raise JobAttempt.DoesNotExist(f"Job {job_id} has no attempt {attempt}.")
    return _running(row[:job_width]), cast(JobAttempt, statements.built(JobAttempt, closed_row))


def _running_job(job_id: Any, attempt: int, lease_expired_before: datetime | None) -> tuple[str, list[Any]]:
    """``WITH j AS (…)``: the running job locked, with its organization's output retention."""
    job_table, settings_table = Job._meta.db_table, TenantSettings._meta.db_table
    conditions = ["j.id = %s", "j.status = %s", "j.attempt = %s"]
    params: list[Any] = [Job._meta.pk.get_db_prep_value(job_id, connection), JobStatus.RUNNING.value, attempt]
    if lease_expired_before is not None:
        conditions.append("j.lease_expires_at < %s")
        lease = Job._meta.get_field("lease_expires_at")
        params.append(lease.get_db_prep_value(lease_expired_before, connection))
    # ``FOR NO KEY UPDATE`` of the job alone, as ``accounts.locking.locked`` takes it (SQLite locks the database).
    lock = " FOR NO KEY UPDATE OF j" if connection.features.has_select_for_update else ""
    sql = (
        f"WITH j AS (SELECT j.*, (SELECT s.output_retention_seconds FROM {settings_table} s "  # noqa: S608
        f"WHERE s.organization_id = j.organization_id) AS tenant_retention_seconds "
        f"FROM {job_table} j WHERE {' AND '.join(conditions)}{lock})"
    )
    return sql, params


def _running(row: Sequence[Any]) -> RunningJob:
    job = cast(Job, statements.built(Job, row[:-1]))
    job.endpoint = endpoints.by_id(job.endpoint_id)
    return RunningJob(job, row[-1])


def lock_attempt(job_id: Any, number: int) -> JobAttempt:
    return locked(JobAttempt.objects.filter(job_id=job_id, number=number)).get()


def close_attempt(job_id: Any, number: int, **closed: Any) -> JobAttempt:
    """Writes ``closed`` (column: value) on the job's attempt and answers the row as written: the attempt's lock
    (step 4 of the lock order, after its job's) and its close in one statement."""
    assignments, params = _assignments(closed)
    params += [Job._meta.pk.get_db_prep_value(job_id, connection), number]
    sql = (
        f"UPDATE {JobAttempt._meta.db_table} SET {assignments} "  # noqa: S608 - column names only
        f"WHERE job_id = %s AND number = %s RETURNING {statements.columns(JobAttempt)}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        raise JobAttempt.DoesNotExist(f"Job {job_id} has no attempt {number}.")
    return cast(JobAttempt, statements.built(JobAttempt, row))


def _assignments(closed: dict[str, Any]) -> tuple[str, list[Any]]:
    assignments, params = [], []
    for name, value in closed.items():
        field = cast("Field[Any, Any]", JobAttempt._meta.get_field(name))
        assignments.append(f"{connection.ops.quote_name(cast(str, field.column))} = %s")
        params.append(field.get_db_prep_save(value, connection))
    return ", ".join(assignments), params
