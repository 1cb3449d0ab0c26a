"""Locks on inference's rows, in the platform's one lock order (``accounts.locking``): jobs, then attempts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple, cast

from django.db import connection
from django.db.models import Field

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
    then), locked, with what closing it reads: its endpoint (kept in memory, ``inference.endpoints``: billing prices
    by it) and its organization's own output retention. None once the job no longer runs that attempt.

    One statement, written out: every finished attempt sends it, and the ORM's form of it (the job with its
    endpoint joined, then the organization's retention) took three times the CPU and a second round trip
    (``python -m tests.bench.billing``, README "Benchmarks").
    """
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
        f"SELECT j.*, (SELECT s.output_retention_seconds FROM {settings_table} s "  # noqa: S608 - table names only
        f"WHERE s.organization_id = j.organization_id) AS tenant_retention_seconds "
        f"FROM {job_table} j WHERE {' AND '.join(conditions)}{lock}"
    )
    job = next(iter(Job.objects.raw(sql, params)), None)
    if job is None:
        return None
    job.endpoint = endpoints.by_id(job.endpoint_id)
    return RunningJob(job, getattr(job, "tenant_retention_seconds"))  # noqa: B009 - the statement's own column


def lock_attempt(job_id: Any, number: int) -> JobAttempt:
    return locked(JobAttempt.objects.filter(job_id=job_id, number=number)).get()


def close_attempt(job_id: Any, number: int, **closed: Any) -> JobAttempt:
    """Writes ``closed`` (column: value) on the job's attempt and answers the row as written: the attempt's lock
    (step 4 of the lock order, after its job's) and its close in one statement."""
    assignments, params = [], []
    for name, value in closed.items():
        field = cast("Field[Any, Any]", JobAttempt._meta.get_field(name))
        assignments.append(f"{connection.ops.quote_name(cast(str, field.column))} = %s")
        params.append(field.get_db_prep_save(value, connection))
    params += [Job._meta.pk.get_db_prep_value(job_id, connection), number]
    sql = (
        f"UPDATE {JobAttempt._meta.db_table} SET {', '.join(assignments)} "  # noqa: S608 - column names only
        "WHERE job_id = %s AND number = %s RETURNING *"
    )
    closed_row = next(iter(JobAttempt.objects.raw(sql, params)), None)
    if closed_row is None:
        raise JobAttempt.DoesNotExist(f"Job {job_id} has no attempt {number}.")
    return closed_row
