"""An attempt on a worker: claimed, its lease renewed by heartbeats, its work reserved against the hold."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any, cast

from django.conf import settings
from django.db import DatabaseError, OperationalError, connection
from django.db.models import Exists, F, OuterRef, Q, Value
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from accounts import statements
from accounts.locking import retrying, retrying_atomic
from inference import dispatch, endpoints
from inference.hooks import Refusal, Reservation, hooks
from inference.job_events import publish
from inference.job_logs import line as job_line
from inference.job_logs import log_line
from inference.models import (
    AttemptOutcome,
    Job,
    JobAttempt,
    JobStatus,
)

logger = logging.getLogger(__name__)


# The database's clock in the statements written out here (PostgreSQL's, as Django's ``Now()`` writes it there), and
# a lease taken or renewed by such a statement: ``JOB_LEASE_SECONDS`` past it, the seconds a parameter of its own so
# that a prepared statement's text stays the same whatever the setting (``accounts.statements.in_turn``).
DATABASE_NOW = "statement_timestamp()"
LEASE_SQL = f"{DATABASE_NOW} + make_interval(secs => %s)"


def lease_deadline() -> CombinedExpression:
    """When a lease taken or renewed now lapses: ``JOB_LEASE_SECONDS`` past the database's clock, an expression for
    the ORM's UPDATE (the statements written out send ``LEASE_SQL``).

    Which clock. A lease is written by the worker that holds it and compared by the housekeeping process that reaps
    it (``inference.closing.reap_expired_leases``); a start deadline is written by a web host and compared by the
    worker that claims the job, the worker or reaper that decides on a retry, and the sweep that ends the request.
    Every such write and comparison goes by the one clock all of them share, the database's (``Now()``: PostgreSQL's
    ``statement_timestamp()``, SQLite's own clock on the one machine it serves): with each process's own clock, a
    worker 40 s behind the reaper would have every live job reaped (its paid work thrown away and run again), and one
    40 s ahead would keep a dead worker's job 40 s longer.

    The stamps that record when something happened stay on the clock of the process that did it: an attempt's
    ``started_at`` and ``heartbeat_at`` (the worker's), a job's ``started_at`` and ``finished_at``. A reap records
    the GPU time an attempt held unbilled as ``heartbeat_at - started_at``, two readings of its worker's clock that a
    stamp of another clock on either side would move by the skew; the GPU time billed is the worker's monotonic
    clock's. No lease or deadline is compared with them. The one comparison of such stamps across machines,
    reconciliation's check that no attempt started after its cancel was accepted (a worker's ``started_at`` against
    a web host's ``cancel_requested_at``), can report a false drift under a skew, and changes nothing that runs or
    is billed."""
    return Now() + timedelta(seconds=settings.JOB_LEASE_SECONDS)


def claim_message(
    *, job_id: str, attempt: int, worker: str, ahead: float | bool = False, tell_waiters: bool = True
) -> Job | None:
    """``claim_job`` for a worker's message. ``ahead``: the message was sent before its job's submission committed
    (``inference.dispatch.send_ahead``), at that time (seconds since the epoch; True: by the release before, which
    held a lock for it, ``_await_locked_submission``): a claim that finds the job not (yet) dispatched waits for the
    submission's end signal (``inference.dispatch.await_end``) and claims once more, reading its outcome. Where the
    submission had ended already, as it mostly has by the time a worker takes the message, the first claim is the
    only round trip; where it had ended without dispatching the job, the second claim finds nothing either and the
    message is dropped."""
    job = claim_job(job_id=job_id, attempt=attempt, worker=worker, tell_waiters=tell_waiters)
    if job is None and ahead:
        if ahead is True:
            _await_locked_submission(job_id)
        else:
            dispatch.await_end(job_id, float(ahead))
        job = claim_job(job_id=job_id, attempt=attempt, worker=worker, tell_waiters=tell_waiters)
    return job


# A message sent ahead by a web process of the release before 2026-12-07 says ``ahead=True``: its submission held a
# PostgreSQL advisory lock named by the job until its dispatch had committed, and says no end in Redis. A worker waits
# on that lock, as that release's workers did, while web processes of both releases run side by side during an
# upgrade (workers go first: a worker of the release before would not wait on the end signal). To be removed once no
# web process of that release runs.
_LEGACY_KEY_SPACE = 0x6A6F62
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock not granted within lock_timeout


def _await_locked_submission(job_id: str) -> None:
    if connection.vendor != "postgresql":
        return
    key = (_LEGACY_KEY_SPACE, int.from_bytes(uuid.UUID(job_id).bytes[-4:], "big", signed=True))
    with connection.cursor() as cursor:
        try:
            cursor.execute(
                f"SET LOCAL lock_timeout = {int(settings.JOB_AHEAD_WAIT_MS)}; "
                "SELECT pg_advisory_xact_lock_shared(%s, %s)",
                key,
            )
        except OperationalError as error:
            if getattr(error.__cause__, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            logger.warning("job %s's submission did not end within %s ms: its message is dropped", job_id,
                           settings.JOB_AHEAD_WAIT_MS)  # fmt: skip


def claim_job(*, job_id: str, attempt: int, worker: str, tell_waiters: bool = True) -> Job | None:
    """The job, now RUNNING on this worker (with its endpoint), or None if another message (or a cancel) got there
    first. One query with no transaction open on PostgreSQL (``_claimed_by_one_query``). ``tell_waiters``: its
    waiters are told it runs (``job_events``) before this returns; the worker tells them from its heartbeat's thread
    instead, while the work starts (a Redis round trip less before it).

    The job's ``company_waiting``: whether another job of its endpoint and GPU class was dispatched and not yet
    claimed as it was claimed, one its batch could take along (``inference.worker.gather_companions``)."""
    if statements.in_one_query(connection) and connection.get_autocommit():
        row = _claimed_by_one_query(job_id, attempt, worker)
        if row is None:
            return None
        if tell_waiters:
            publish(job_id)  # committed: the job's waiters see it running
        job = cast(Job, statements.built(Job, row[:-1]))
        job.company_waiting = row[-1]
        job.endpoint = endpoints.by_id(job.endpoint_id)
        return job
    if not _claim(job_id, attempt, worker):
        return None
    others = Job.objects.filter(
        endpoint_id=OuterRef("endpoint_id"), gpu_class=OuterRef("gpu_class"), status=JobStatus.DISPATCHED
    ).exclude(pk=OuterRef("pk"))
    return Job.objects.select_related("endpoint").annotate(company_waiting=Exists(others)).get(pk=job_id)


@retrying_atomic
def _claim(job_id: str, attempt: int, worker: str) -> bool:
    now = timezone.now()
    # A request whose start deadline has passed (by the database's clock: ``lease_deadline``) is not started: the
    # sweep (or its waiting sync run) ends it.
    claimed = Job.objects.filter(
        Q(start_deadline__isnull=True) | Q(start_deadline__gt=Now()),
        pk=job_id,
        status=JobStatus.DISPATCHED,
        attempt=attempt,
    ).update(
        status=JobStatus.RUNNING,
        worker=worker,
        lease_expires_at=lease_deadline(),
        started_at=Coalesce(F("started_at"), Value(now)),
        progress_step=0,
        progress_total=0,
    )
    if not claimed:
        return False
    # The attempt and its log line: one statement on PostgreSQL (``accounts.statements``).
    started = JobAttempt(job_id=job_id, number=attempt, worker=worker, started_at=now, heartbeat_at=now)
    statements.insert(
        started, want_pk=False, along=log_line(job_id, f"Attempt {attempt} started on {worker}.", source="worker")
    )
    return True


@retrying
def _claimed_by_one_query(job_id: str, attempt: int, worker: str) -> Sequence[Any] | None:
    """``_claim`` and the read of the job as one statement with no transaction open, a transaction of its own: the
    job's conditional UPDATE, its attempt and log line inserted for each row it changed (one or none), and the job
    as changed (its columns, then ``company_waiting``). One round trip where a transaction took five (BEGIN, the
    UPDATE, the attempt, COMMIT, the read), all of it between a job's message and the start of its work. Retried
    alone when it loses a lock race: what follows its commit is the caller's.

    Its COMMIT does not wait for the disk (``accounts.statements.NO_WAIT_FOR_DISK``), as its dispatch's did not: the
    worker's next durable commit (its first reserve or heartbeat, or any session's, or PostgreSQL's WAL writer within
    a fraction of a second) takes both there, the WAL being written in order. A claim lost in a crash leaves the job
    as its dispatch did (or QUEUED, the dispatch lost too), to be sent again by the sweep; the worker that ran it
    finds its lease gone at its next heartbeat and stops, and its finish finds no attempt to close: nothing billed."""
    now = timezone.now()
    started = JobAttempt(job_id=job_id, number=attempt, worker=worker, started_at=now, heartbeat_at=now)
    line = job_line(job_id, f"Attempt {attempt} started on {worker}.", source="worker")
    attempt_sql, attempt_values = statements.insertion_for_each(started, "claimed")
    line_sql, line_values = statements.insertion_for_each(line, "claimed")
    datetime_field = Job._meta.get_field("started_at")
    claim_values = [
        JobStatus.RUNNING.value,
        worker,
        settings.JOB_LEASE_SECONDS,
        datetime_field.get_db_prep_value(now, connection),
        Job._meta.pk.get_db_prep_value(job_id, connection),
        JobStatus.DISPATCHED.value,
        attempt,
    ]
    with connection.cursor() as cursor:
        statements.in_turn(
            cursor,
            statements.NO_WAIT_FOR_DISK,
            (
                _claim_statement(attempt_sql, line_sql),
                [*claim_values, *attempt_values, *line_values, JobStatus.DISPATCHED.value],
            ),
            plan_once=True,
        )
        row: Sequence[Any] | None = cursor.fetchone()
    return row


@cache
def _claim_statement(attempt_sql: str, line_sql: str) -> str:
    job_table = Job._meta.db_table
    # The lease, and whether the start deadline has passed, by the database's clock (``lease_deadline``).
    return (
        f"WITH claimed AS (UPDATE {job_table} SET status = %s, worker = %s, lease_expires_at = {LEASE_SQL}, "  # noqa: S608
        "started_at = COALESCE(started_at, %s), progress_step = 0, progress_total = 0 "
        "WHERE id = %s AND status = %s AND attempt = %s "
        f"AND (start_deadline IS NULL OR start_deadline > {DATABASE_NOW}) "
        f"RETURNING {statements.columns(Job)}), "
        f"started AS ({attempt_sql}), line AS ({line_sql}) "
        f"SELECT {statements.columns(Job, 'claimed')}, "
        f"EXISTS (SELECT 1 FROM {job_table} other WHERE other.status = %s AND other.gpu_class = claimed.gpu_class "
        "AND other.endpoint_id = claimed.endpoint_id AND other.id <> claimed.id) "
        "FROM claimed"
    )


def claim_batch_companions(
    *, job: Job, worker: str, room: int, compatible: Callable[[dict[str, Any]], bool], scan: int = 32
) -> list[Job]:
    """Other dispatched jobs of `job`'s endpoint that can run in the same pipeline call, claimed for this worker.

    Oldest first, while their images fit in `room` (images the batch can still take). Each is claimed on its own with
    `claim_job`'s conditional UPDATE, so it gets its own attempt, lease and heartbeat; its Celery message, when it
    arrives, finds the job taken and does nothing. Only jobs already dispatched are taken: the tenant's concurrency
    limit, which counts them as active, still holds.
    """
    candidates = (
        Job.objects.filter(endpoint_id=job.endpoint_id, gpu_class=job.gpu_class, status=JobStatus.DISPATCHED)
        .exclude(pk=job.pk)
        .order_by("dispatched_at", "created_at", "id")
        .values_list("id", "attempt", "input")[:scan]
    )
    companions: list[Job] = []
    for companion_id, attempt, job_input in candidates:
        count = len(job_input.get("seeds") or ())
        if not count or count > room or not compatible(job_input):
            continue
        try:
            claimed = claim_job(job_id=str(companion_id), attempt=attempt, worker=worker)
        except DatabaseError:
            # Those claimed so far are this worker's and run (left out, they would wait for the reaper with an
            # attempt spent); the rest stay dispatched, for their own messages.
            logger.exception("job %s: claiming companion %s failed; the batch runs without it", job.pk, companion_id)
            connection.close_if_unusable_or_obsolete()
            break
        if claimed is None:
            continue  # another worker (or a cancel) got there first
        companions.append(claimed)
        room -= count
        if room <= 0:
            break
    return companions


@dataclass(frozen=True)
class HeartbeatAnswer:
    keep_going: bool
    reason: str = ""
    error_type: str = ""


def heartbeat(*, job_id: str, attempt: int, step: int, total: int, gpu_ms: int) -> HeartbeatAnswer:
    """Renews the lease and reports progress; says whether the job should go on."""
    job = _renewed(job_id, attempt, step, total)
    if job is None:
        return HeartbeatAnswer(False, "This attempt no longer owns the job.", "lost")
    publish(job_id)  # progress: waiting streams show it now
    if job.cancel_requested_at is not None:
        return HeartbeatAnswer(False, "Cancelled by request.", "cancelled")
    if hooks.may_continue is not None:
        refusal: Refusal | None = hooks.may_continue(job, gpu_ms)
        if refusal is not None:
            return HeartbeatAnswer(False, refusal.detail, refusal.error_type)
    return HeartbeatAnswer(True)


def _renewed(job_id: str, attempt: int, step: int, total: int) -> Job | None:
    """The attempt's heartbeat time, the job's lease and progress written, and the job as written; None once this
    attempt no longer runs it. The progress a reader sees on the job is never newer than the GPU time a reap of this
    attempt records (held until its last heartbeat): on PostgreSQL both are written by one statement (a
    data-modifying ``WITH``, one round trip where three went), elsewhere the attempt's first."""
    now = timezone.now()
    if connection.vendor == "postgresql":
        datetime_field = Job._meta.get_field("lease_expires_at")
        job_key = Job._meta.pk.get_db_prep_value(job_id, connection)
        values = [
            datetime_field.get_db_prep_value(now, connection), job_key, attempt, AttemptOutcome.RUNNING.value,
            settings.JOB_LEASE_SECONDS, step, total, job_key, JobStatus.RUNNING.value, attempt,
        ]  # fmt: skip
        with connection.cursor() as cursor:
            # Planned once where a stale plan can be prepared afresh and sent again: with no transaction open, as a
            # worker's heartbeat thread runs.
            statements.in_turn(cursor, (_heartbeat_statement(), values), plan_once=connection.get_autocommit())
            row = cursor.fetchone()
        return None if row is None else cast(Job, statements.built(Job, row))
    JobAttempt.objects.filter(job_id=job_id, number=attempt, outcome=AttemptOutcome.RUNNING).update(heartbeat_at=now)
    renewed = Job.objects.filter(pk=job_id, status=JobStatus.RUNNING, attempt=attempt).update(
        lease_expires_at=lease_deadline(), progress_step=step, progress_total=total
    )
    return Job.objects.get(pk=job_id) if renewed else None


@cache
def _heartbeat_statement() -> str:
    return (
        f"WITH beat AS (UPDATE {JobAttempt._meta.db_table} SET heartbeat_at = %s "  # noqa: S608 - names only
        "WHERE job_id = %s AND number = %s AND outcome = %s) "
        f"UPDATE {Job._meta.db_table} SET lease_expires_at = {LEASE_SQL}, progress_step = %s, progress_total = %s "
        f"WHERE id = %s AND status = %s AND attempt = %s RETURNING {statements.columns(Job)}"
    )


def reserve_work(*, job: Job, gpu_ms: int, ahead_ms: int = 0) -> Reservation | Refusal:
    """Before further work of a running job: may its hold cover ``gpu_ms`` of GPU time in total (billing's hook)?"""
    if hooks.reserve is None:
        return Reservation(covered_gpu_ms=None)
    return hooks.reserve(job, gpu_ms, ahead_ms)
