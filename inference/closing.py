"""Where a job is closed: an attempt finished by its worker, reaped when its lease expired, or a cancel."""

from __future__ import annotations

import logging
import math
import uuid
from datetime import datetime, timedelta
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.db import connection, transaction
from django.db.models import Func
from django.db.models.functions import Now
from django.utils import timezone

from accounts import statements
from accounts.locking import retrying_atomic
from inference import files, transitions
from inference.dispatch import dispatch_organization
from inference.hooks import hooks
from inference.job_logs import log_job, log_line
from inference.locks import close_attempt, lock_and_close_attempt, lock_attempt, lock_job, lock_running_job
from inference.models import (
    AttemptOutcome,
    Job,
    JobAttempt,
    JobStatus,
)

logger = logging.getLogger(__name__)

EXPIRE_BATCH_SIZE = 500

FINAL_STATUS = {
    AttemptOutcome.SUCCEEDED: JobStatus.COMPLETED,
    AttemptOutcome.FAILED: JobStatus.FAILED,
    AttemptOutcome.ERRORED: JobStatus.FAILED,
    AttemptOutcome.LOST: JobStatus.FAILED,
    AttemptOutcome.CANCELLED: JobStatus.CANCELLED,
}


def finish_attempt(
    *,
    job_id: str,
    attempt: int,
    outcome: AttemptOutcome,
    gpu_ms: int,
    cold_start_ms: int = 0,
    wasted_ms: int = 0,
    result: dict[str, Any] | None = None,
    error: str = "",
    error_type: str = "",
    retry: bool = False,
) -> Job | None:
    """Closes the attempt and moves the job on, in one transaction with billing's hook.

    ``gpu_ms``: its GPU time (in a batch, its share); ``wasted_ms``: its batch's time that did no job's work, written
    to it to be recorded, never billed (``inference.engine.batch_shares``). ``retry``: the platform failed and the
    job may run again if attempts remain. Returns None if the attempt had already been closed (its lease expired and
    the reaper took the job back).
    """
    return _finish_locked(
        job_id, attempt, outcome=outcome, gpu_ms=gpu_ms, cold_start_ms=cold_start_ms, wasted_ms=wasted_ms,
        result=result, error=error, error_type=error_type, retry=retry,
    )  # fmt: skip


@retrying_atomic
def _finish_locked(
    job_id: str,
    attempt: int,
    *,
    outcome: AttemptOutcome,
    gpu_ms: int,
    cold_start_ms: int,
    wasted_ms: int,
    error: str,
    **closing: Any,
) -> Job | None:
    now = timezone.now()
    # The job's lock and the attempt's close: one statement (``inference.locks``).
    closed = lock_and_close_attempt(
        job_id, attempt, outcome=outcome, gpu_ms=gpu_ms, cold_start_ms=cold_start_ms, wasted_ms=wasted_ms,
        error=error, finished_at=now,
    )  # fmt: skip
    if closed is None:
        return None
    running, attempt_row = closed
    _close(*running, attempt_row, now=now, outcome=outcome, gpu_ms=gpu_ms, cold_start_ms=cold_start_ms, error=error,
           **closing)  # fmt: skip
    return running.job


def _close(
    job: Job,
    tenant_retention_seconds: int | None,
    attempt_row: JobAttempt,
    *,
    now: datetime,
    outcome: AttemptOutcome,
    gpu_ms: int,
    cold_start_ms: int,
    result: dict[str, Any] | None,
    error: str,
    error_type: str,
    retry: bool,
) -> None:
    """Moves ``job`` (locked by ``lock_running_job``) on from its attempt ``attempt_row``, closed at ``now``."""
    job.cold_start_ms += cold_start_ms
    # Only what the move writes is saved: the row's input (and whatever else) stays as it is under the lock.
    if retry and _may_retry(job):
        changed = transitions.assign(job, transitions.retried())
        again = f"Attempt {job.attempt} failed ({error}); the request is queued again."
        line = log_line(job.id, again, level="WARNING")
    else:
        status = FINAL_STATUS[outcome]
        if job.cancel_requested_at is not None and outcome in (AttemptOutcome.LOST, AttemptOutcome.ERRORED):
            # The customer asked to stop it and it stopped: that is a cancellation, whatever ended it.
            status, error, error_type = JobStatus.CANCELLED, "Cancelled by request.", "cancelled"
        ending = transitions.ended(
            status,
            result=result,
            error=error,
            error_type=error_type,
            gpu_ms=gpu_ms if attempt_row.billable else 0,
            finished_at=now,
            # Outputs, and the input image of any final job, are deleted once retention has passed.
            outputs_expire_at=now
            + timedelta(seconds=files.retention_seconds(job, tenant_seconds=tenant_retention_seconds)),
        )
        changed = transitions.assign(job, ending)
        line = log_line(job.id, _final_line(job), level="INFO" if job.status == JobStatus.COMPLETED else "ERROR")
    # The job's move and the line telling of it: one statement on PostgreSQL.
    statements.update(job, [*changed, "cold_start_ms"], along=line)
    organization_id = job.organization_id
    final = job.is_final
    job_id = job.id
    has_webhook = bool(job.webhook_url)
    if final and has_webhook:
        _record_webhook(job)
    # Before the settlement: what raises once its statement has committed (a time limit) still leaves this to run
    # (``accounts.locking.retrying_atomic``).
    transaction.on_commit(lambda: _after_attempt(organization_id, job_id, final, has_webhook=has_webhook), robust=True)
    if hooks.attempt_finished is not None:
        # Billing's settlement writes the transaction's last rows: the statement of it that locks the organization's
        # account may carry the COMMIT (``accounts.statements.commits_along``), so no round trip of this process's
        # falls inside that lock, which every submission and finish of the organization takes.
        with statements.last_of_the_transaction():
            hooks.attempt_finished(job, attempt_row)


def _may_retry(job: Job) -> bool:
    """Whether the platform runs a failed attempt again: attempts remain, the customer has not asked to stop, and the
    request's start deadline (X-Fal-Request-Timeout) has not passed. As on fal, the start timeout covers retries
    too: once it is reached no further attempt starts, and the attempt's own failure is the request's outcome.

    The deadline by the database's clock, as the claim and the sweep read it (``attempts.lease_deadline``), not by
    the clock of the worker or reaper closing the attempt: one read, only for a request with a start deadline that
    could run again."""
    if job.attempt >= job.max_attempts or job.cancel_requested_at is not None:
        return False
    if job.start_deadline is not None and Job.objects.filter(pk=job.pk, start_deadline__lte=Now()).exists():
        log_job(job.id, "Its start timeout has passed: the request is not retried.", level="WARNING")
        return False
    return True


def _final_line(job: Job) -> str:
    if job.status == JobStatus.COMPLETED:
        return f"Completed in {job.gpu_ms} ms of GPU time."
    if job.status == JobStatus.CANCELLED:
        return f"Cancelled ({job.error})."
    return f"Failed: {job.error}"


def _record_webhook(job: Job) -> None:
    """The webhook's delivery of a job this transaction ends, written with its end (``webhooks.record_delivery``)."""
    from inference.webhooks import record_delivery

    record_delivery(job)


def _after_attempt(organization_id: uuid.UUID, job_id: uuid.UUID, final: bool, *, has_webhook: bool = True) -> None:
    """On commit of a job's move: its webhook's first try if it ended, and the organization's waiting jobs into the
    freed slot.

    ``has_webhook=False``: the caller read the job (its ``webhook_url`` never changes) and it has none to send.
    """
    from inference.webhooks import send_first_try

    if final and has_webhook:
        send_first_try(job_id)
    # Most finishes leave nothing waiting: one indexed read instead of locking the organization to find none. A job
    # queued after this read dispatches itself when its own transaction commits (submission, requeue, retry) or at
    # the sweep, as it would had it been queued just after dispatch_organization's own read.
    if _has_queued_jobs(organization_id):
        dispatch_organization(organization_id)


def _has_queued_jobs(organization_id: uuid.UUID) -> bool:
    """Whether the organization has a job waiting: ``Job.objects.filter(...).exists()`` written out, as every
    finish asks it and the ORM's building of it took 0.44 ms of CPU against 0.11 ms for this (README "Benchmarks")."""
    organization = Job._meta.get_field("organization")
    with connection.cursor() as cursor:
        statements.in_turn(
            cursor,
            (
                f"SELECT 1 FROM {Job._meta.db_table} WHERE organization_id = %s AND status = %s LIMIT 1",  # noqa: S608
                [organization.get_db_prep_value(organization_id, connection), JobStatus.QUEUED.value],
            ),
            plan_once=True,
        )
        return cursor.fetchone() is not None


def reap_expired_leases() -> int:
    """Jobs whose worker stopped renewing its lease: close the attempt (unbilled) and retry or fail.

    A lease has lapsed once the database's clock has passed it, the clock it was written by
    (``attempts.lease_deadline``), whatever this process's clock says. That clock is read with the rows, and each
    reap takes its job only if, once it is locked, its lease still lapsed before that reading: a heartbeat since
    keeps it."""
    reaped = 0
    expired = Job.objects.filter(status=JobStatus.RUNNING, lease_expires_at__lt=Now()).annotate(database_now=Now())
    for job_id, attempt, database_now in expired.values_list("id", "attempt", "database_now"):
        try:
            reaped += _reap(job_id, attempt, database_now)
        except SoftTimeLimitExceeded:
            raise  # the sweep's time is up: it stops here (the next one starts over), not at the hard kill
        except Exception:  # one bad row must not stop the reaper for everyone else
            logger.exception("could not reap job %s attempt %s", job_id, attempt)
    return reaped


@retrying_atomic
def _reap(job_id: uuid.UUID, attempt: int, expired_before: datetime) -> int:
    running = lock_running_job(job_id, attempt, lease_expired_before=expired_before)
    if running is None:
        return 0
    now = timezone.now()  # the attempt's and the job's end, stamped as every stamp is (``attempts.lease_deadline``)
    attempt_row = lock_attempt(job_id, attempt)
    # The GPU was held at least until the last heartbeat; record that, unbilled.
    held_ms = max(0, math.ceil((attempt_row.heartbeat_at - attempt_row.started_at).total_seconds() * 1000))
    error = "The worker running this request stopped responding."
    attempt_row = close_attempt(
        job_id, attempt, outcome=AttemptOutcome.LOST, gpu_ms=held_ms, cold_start_ms=0, error=error, finished_at=now
    )
    _close(
        *running, attempt_row, now=now, outcome=AttemptOutcome.LOST, gpu_ms=held_ms, cold_start_ms=0, result=None,
        error=error, error_type="internal_error", retry=True,
    )  # fmt: skip
    return 1


@retrying_atomic
def cancel_job(*, job: Job) -> str:
    """fal's answer: CANCELLATION_REQUESTED or ALREADY_COMPLETED. A job not yet running is cancelled
    at once and never billed; a running one stops at its next denoising step.

    The job's row is locked first, so the answer is decided on its state as last committed: a cancel racing a
    finish, a retry or a reap is either recorded before it (and every closing path then honours it: no requeue,
    no second run) or sees the job final. Once accepted, ``cancel_requested_at`` stays set, and every cancel of the
    job after it answers CANCELLATION_REQUESTED as the first did, whatever the job became since: a client whose
    answer was lost (the cancel committed, its connection died on the way back) sends it again and hears the same.
    """
    locked_job = lock_job(job.pk)
    # The moment it was accepted: read once the lock is held, so it follows whatever committed before (a worker's
    # claim that won the race starts before it; reconciliation checks that no attempt starts after a cancel).
    now = timezone.now()
    if locked_job is None:
        return "ALREADY_COMPLETED"
    if locked_job.cancel_requested_at is not None:
        return "CANCELLATION_REQUESTED"  # accepted before: answered again as it was then
    if locked_job.is_final:
        return "ALREADY_COMPLETED"
    if locked_job.status == JobStatus.RUNNING:
        Job.objects.filter(pk=job.pk).update(cancel_requested_at=now)
        log_job(job.pk, "Cancellation requested; the request stops at its next step.")
        return "CANCELLATION_REQUESTED"
    # Queued, or dispatched but not claimed: a claim is a conditional UPDATE on DISPATCHED, so none can follow.
    _end_unstarted(
        locked_job, now, error="Cancelled before it started.", error_type="cancelled", cancel_requested_at=now
    )
    return "CANCELLATION_REQUESTED"


def _end_unstarted(job: Job, now: Any, *, error: str, error_type: str, **also: Any) -> None:
    """Ends a locked job that never started (queued, or dispatched and not claimed): never billed, its hold released,
    its webhook sent and its organization's slot handed on once this commits."""
    ending = transitions.ended(JobStatus.CANCELLED, finished_at=now, error=error, error_type=error_type)
    if job.input.get("image_path"):
        ending["outputs_expire_at"] = now + timedelta(seconds=files.retention_seconds(job))
    Job.objects.filter(pk=job.pk).update(**ending, **also)
    log_job(job.pk, error)
    has_webhook = bool(job.webhook_url)
    if has_webhook:
        _record_webhook(job)
    if hooks.ended_unstarted is not None:
        hooks.ended_unstarted(Job.objects.get(pk=job.pk))
    organization_id, job_id = job.organization_id, job.pk
    transaction.on_commit(lambda: _after_attempt(organization_id, job_id, True, has_webhook=has_webhook), robust=True)


def expire_unstarted(*, job_id: uuid.UUID | None = None) -> int:
    """Requests whose start deadline (``X-Fal-Request-Timeout``) passed before a worker started them: ended as
    CANCELLED with ``error_type: timeout``, never billed. The sweep calls it for all of them; a sync run waiting on
    one calls it for that one (``job_id``), the moment its deadline passes. A claim made before the deadline wins: a
    started request runs as long as it needs.

    Passed by the database's clock alone, the clock that wrote the deadline (``submission``), that the claim reads it
    by (``attempts.lease_deadline``) and that a waiting sync run measures its wait by: a request left here is one a
    worker may still start, whatever any caller's own clock says."""
    passed: Func = Now()
    waiting = Job.objects.filter(
        status__in=(JobStatus.QUEUED, JobStatus.DISPATCHED), start_deadline__isnull=False, start_deadline__lte=passed
    )
    if job_id is not None:
        waiting = waiting.filter(pk=job_id)
    expired = 0
    for expiring_id in waiting.order_by("start_deadline").values_list("id", flat=True)[:EXPIRE_BATCH_SIZE]:
        try:
            expired += _expire(expiring_id, passed)
        except SoftTimeLimitExceeded:
            raise  # the sweep's time is up: it stops here (the next one starts over), not at the hard kill
        except Exception:  # one bad row must not stop the sweep for everyone else
            logger.exception("could not expire job %s", expiring_id)
    return expired


@retrying_atomic
def _expire(job_id: uuid.UUID, passed: Func) -> int:
    # Still unstarted, and its deadline passed, once the lock is held: a claim that got there first wins.
    job = lock_job(job_id, status__in=(JobStatus.QUEUED, JobStatus.DISPATCHED), start_deadline__lte=passed)
    if job is None or job.start_deadline is None:
        return 0
    now = timezone.now()
    seconds = f"{round((job.start_deadline - job.created_at).total_seconds(), 1):g} s"
    # A retried request (started before, failed by the platform) is not started again past the deadline either.
    error = (
        f"The request's retry did not start within its start timeout of {seconds}."
        if job.started_at is not None
        else f"The request did not start within its start timeout of {seconds}."
    )
    _end_unstarted(job, now, error=error, error_type="timeout")
    return 1
