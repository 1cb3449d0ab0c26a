"""Dispatch: an organization's queued jobs sent to the workers while it is under its concurrency limit.

**The organization's lock, held for one statement.** Every submission of an organization dispatches it when it
commits, so the organization's row lock, which makes concurrent dispatchers count one after another, is what a busy
tenant's submissions queue for; it is held from the statement that takes it to COMMIT. So the lock is followed by
one statement (``_DISPATCH``) that counts the active jobs, picks the oldest queued ones that fit under the limit,
moves them to DISPATCHED and returns them, and then COMMIT. The count cannot be part of a statement that takes the
lock itself: PostgreSQL would read it in the snapshot taken before the statement waited for the lock, and miss what
the dispatcher it waited for had just dispatched. The two statements go in one round trip as one query
(``accounts.statements.in_turn``: each statement of it takes its own snapshot), and the limit and suspension are
read by the second from the organization's row. Sent with no transaction open (a submission's or a finish's dispatch,
once that has committed), the query is a transaction of its own: PostgreSQL commits it as it ends, so a dispatch is
one round trip, not three (BEGIN, the query, COMMIT), and the lock is held for no round trip of the client's. A job a
dispatcher picks is moved only if it is still QUEUED (the condition is checked again on the row if another
transaction, a cancel, held it), so two dispatchers never send the same job. Measured (``make bench-tenants``,
README): one busy organization's row is locked about 5 ms per job, half the time, and a submission waits about 1 ms
for it. The alternatives weighed: a dispatch that does not wait for one under way was built and measured
(2026-12-06: a gate taken with ``pg_try_advisory_xact_lock`` before the row lock; one that found it held left an ask
in an unlogged table and tried once more after committing it, the holder read the asks after its COMMIT and looked
again, all of it in the look's one query): one organization's submissions no longer waited on the row, and ran no
faster (one organization against four 0.77-1.01x against 0.82-1.07x in seven alternating runs of ``make
bench-tenants``): on cores the processes keep busy, a backend waiting for the lock leaves its core to the others,
and the gate's own work (a round trip for each dispatch that found it held, the holder's second look) took what the
wait gave back. Not kept. Concurrency slots kept in Redis or on a counter row would have to be kept in step
by every way a job ends; committing dispatch without waiting for the WAL (a lost dispatch is redone by the sweep)
saved under 1 ms of the 5. A submission with no transaction open sends the lock and the dispatch in its own query,
after its COMMIT (``dispatch_statements``, ``inference.submission``): one round trip for both.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from accounts import statements
from accounts.locking import retrying, retrying_atomic
from accounts.models import Organization
from inference.models import (
    ACTIVE_STATUSES,
    Job,
    JobStatus,
)

logger = logging.getLogger(__name__)

RUN_TASK = "inference.run_job"


def dispatch_organization(organization_id: uuid.UUID) -> int:
    """Sends this organization's oldest queued jobs to the workers while it is under its limit.

    The organization row is locked, so concurrent dispatchers cannot together exceed the limit.
    Jobs over the limit wait in QUEUED; a tenant's burst never fills another tenant's slots.
    """
    to_send = _dispatch(organization_id)
    return len(to_send)


_FIELDS = {field.name: field for field in Job._meta.concrete_fields}


def _column(name: str) -> str:
    return f"{_FIELDS[name].column}"


_ORGANIZATION = {field.name: field for field in Organization._meta.concrete_fields}


def _organization_column(name: str) -> str:
    return f"{_ORGANIZATION[name].column}"


# The organization's lock: its row, FOR NO KEY UPDATE as ``accounts.locking.lock_organization`` takes it.
_LOCK = (
    f"SELECT 1 FROM {Organization._meta.db_table} WHERE {_organization_column('id')} = %(organization)s "  # noqa: S608
    "FOR NO KEY UPDATE"
)
# After the organization's lock, in one statement (PostgreSQL, and SQLite from 3.35): its jobs that count against
# the limit counted, the oldest queued ones that fit picked (not those past their start deadline: the sweep ends
# them, they take no slot), moved to DISPATCHED and returned. The limit is the organization's row as committed when
# the lock was granted (none for a suspended or missing organization).
_DISPATCH = (
    f"UPDATE {Job._meta.db_table} SET {_column('status')} = %(dispatched)s, {_column('attempt')} = "  # noqa: S608
    f"{_column('attempt')} + 1, {_column('dispatched_at')} = %(now)s, {_column('sent_at')} = %(now)s "
    f"WHERE {_column('status')} = %(queued)s AND {_column('id')} IN ("
    f"SELECT {_column('id')} FROM {Job._meta.db_table} WHERE {_column('organization')} = %(organization)s "
    f"AND {_column('status')} = %(queued)s "
    f"AND ({_column('start_deadline')} IS NULL OR {_column('start_deadline')} > %(now)s) "
    f"ORDER BY {_column('created_at')}, {_column('id')} "
    f"LIMIT COALESCE((SELECT CASE WHEN {_organization_column('suspended_at')} IS NULL "
    f"AND active.running < {_organization_column('concurrency_limit')} "
    f"THEN {_organization_column('concurrency_limit')} - active.running ELSE 0 END "
    f"FROM {Organization._meta.db_table}, (SELECT COUNT(*) AS running "
    f"FROM {Job._meta.db_table} WHERE {_column('organization')} = %(organization)s "
    f"AND {_column('status')} IN ({', '.join(f'%(active_{index})s' for index in range(len(ACTIVE_STATUSES)))})"
    f") AS active WHERE {Organization._meta.db_table}.{_organization_column('id')} = %(organization)s), 0))"
    f" RETURNING {_column('id')}, {_column('attempt')}, {_column('gpu_class')}, {_column('created_at')}"
)


def _dispatch(organization_id: uuid.UUID) -> list[tuple[str, int, str]]:
    parameters = _parameters(organization_id)
    # No transaction open (not only no atomic block: Django's manual transactions turn autocommit off too).
    if statements.in_one_query(connection) and connection.get_autocommit():
        dispatched = _dispatched_by_one_query(parameters)  # committed as it returns
    else:
        dispatched = _dispatched_in_a_transaction(parameters)
    return send_dispatched(dispatched)


def _parameters(organization_id: uuid.UUID) -> dict[str, Any]:
    return {
        "dispatched": JobStatus.DISPATCHED.value,
        "queued": JobStatus.QUEUED.value,
        "now": _FIELDS["dispatched_at"].get_db_prep_value(timezone.now(), connection),
        "organization": _FIELDS["organization"].get_db_prep_value(organization_id, connection),
        **{f"active_{index}": status for index, status in enumerate(ACTIVE_STATUSES)},
    }


def dispatch_statements(organization_id: uuid.UUID) -> tuple[statements.Statement, statements.Statement]:
    """The organization's dispatch as the last statements of a caller's one query (``accounts.statements.in_turn``),
    after a COMMIT of what came before them, so they are a transaction of their own and the organization's lock is
    taken after the caller's locks are let go (``inference.submission``): its lock, then the dispatch, whose rows go
    to ``send_dispatched``."""
    parameters = _parameters(organization_id)
    return (_LOCK, parameters), (_DISPATCH, parameters)


def send_dispatched(dispatched: list[tuple[Any, ...]]) -> list[tuple[str, int, str]]:
    """The jobs a dispatch statement returned, to the broker in the order they were queued, once committed."""
    dispatched.sort(key=lambda row: (row[3], row[0]))
    to_send = [(str(uuid.UUID(str(job_id))), attempt, gpu_class) for job_id, attempt, gpu_class, _ in dispatched]
    if to_send:
        transaction.on_commit(lambda: send_run_messages(to_send), robust=True)
    return to_send


@retrying
def _dispatched_by_one_query(parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The lock and the dispatch as one query with no transaction open: PostgreSQL runs it as a transaction of its
    own (``accounts.locking.retrying``), so a submission's dispatch is one round trip, not BEGIN, the query and
    COMMIT, and the organization's lock is held for no round trip of the client's."""
    with connection.cursor() as cursor:
        statements.in_turn(cursor, (_LOCK, parameters), (_DISPATCH, parameters), plan_once=True)
        return cursor.fetchall()


@retrying_atomic
def _dispatched_in_a_transaction(parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Inside a caller's transaction, on SQLite (one writer at a time: no lock to take), or where statements go one
    per query (``server_side_binding``)."""
    with connection.cursor() as cursor:
        if connection.features.has_select_for_update:
            statements.in_turn(cursor, (_LOCK, parameters), (_DISPATCH, parameters))
        else:
            cursor.execute(_DISPATCH, parameters)
        return cursor.fetchall()


def send_run_messages(messages: list[tuple[str, int, str]]) -> None:
    """Hands dispatched jobs to the broker in order; after the first refusal the rest go back to the queue unsent.

    A broker that refused one message will refuse the next: trying each would cost every submission a timeout
    per waiting job while the broker is down. The sweep sends them all once it is back.
    """
    for index, (job_id, attempt, queue) in enumerate(messages):
        if not send_run_message(job_id, attempt, queue):
            for unsent_id, unsent_attempt, _ in messages[index + 1 :]:
                _back_to_queue(unsent_id, unsent_attempt)
            return


def send_run_message(job_id: str, attempt: int, queue: str) -> bool:
    """Hands a dispatched job to the broker. If the broker is down, the job goes back to the queue."""
    try:
        # No result is kept: with a result backend set (the benchmarks set one) Celery would otherwise subscribe to
        # every message's result.
        current_app.send_task(RUN_TASK, args=[job_id, attempt], queue=queue, retry=False, ignore_result=True)
    except Exception as exc:
        logger.warning("broker refused job %s attempt %s: %s; it waits for the next sweep", job_id, attempt, exc)
        _back_to_queue(job_id, attempt)
        return False
    return True


def _back_to_queue(job_id: str, attempt: int) -> None:
    Job.objects.filter(pk=job_id, status=JobStatus.DISPATCHED, attempt=attempt).update(
        status=JobStatus.QUEUED, attempt=attempt - 1, dispatched_at=None, sent_at=None
    )


def redispatch_stale() -> int:
    """Re-sends dispatched jobs no worker has claimed for a while: the broker may have lost them."""
    cutoff = timezone.now() - timedelta(seconds=settings.JOB_REDISPATCH_AFTER_SECONDS)
    stale = list(
        Job.objects.filter(status=JobStatus.DISPATCHED, sent_at__lt=cutoff)
        .order_by("dispatched_at", "created_at")  # oldest first, as they were queued
        .values_list("id", "attempt", "gpu_class")
    )
    for job_id, attempt, gpu_class in stale:
        # dispatched_at keeps the job's place in line (queue_position); sent_at says when it last went out.
        Job.objects.filter(pk=job_id, status=JobStatus.DISPATCHED, attempt=attempt).update(sent_at=timezone.now())
        if not send_run_message(str(job_id), attempt, gpu_class):
            break  # the broker is down: the rest stay dispatched for the next sweep
    return len(stale)
