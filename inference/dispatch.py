"""Dispatch: an organization's queued jobs sent to the workers while it is under its concurrency limit.

**The organization's lock, held for one statement.** Every submission of an organization dispatches it when it
commits, so the organization's row lock, which makes concurrent dispatchers count one after another, is what a busy
tenant's submissions queue for; it is held from the statement that takes it to COMMIT. So the lock is followed by
one statement (``_dispatch_statement``) that reads the active jobs, picks the oldest queued ones that fit under the
limit, moves them to DISPATCHED and returns them, and then COMMIT. The read cannot be part of a statement that takes
the lock itself: PostgreSQL would read it in the snapshot taken before the statement waited for the lock, and miss
what the dispatcher it waited for had just dispatched. The two statements go in one round trip as one query
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
wait gave back. Not kept. Committing dispatch without waiting for the WAL (a lost dispatch is redone by the sweep)
saved under 1 ms of the 5 (a submission's own dispatch now commits that way, for its latency:
``dispatch_statements``). A submission with no transaction open sends the lock and the dispatch in its own query,
after its COMMIT (``dispatch_statements``, ``inference.submission``): one round trip for both.

**The active jobs summed, not counted** (PostgreSQL). A dispatch counted the organization's DISPATCHED and RUNNING
jobs under its lock, so the lock was held longer the more jobs a tenant had running: a tenant with a high limit, or
the hot-tenant benchmark's backlog of thousands, made every one of its dispatches (one per submission and per finish)
slower, and four tenants with a quarter of the jobs each did not pay it. The count is now the sum of a few rows
(``inference.models.ActiveJobCount``) that triggers on the jobs table keep in the transaction of every change of a
job's status, whatever path makes it (a dispatch, a claim, a finish, a cancel, the reaper's requeue, the sweep's
expiry, an operator's requeue or SQL, a deletion): one added to shard 0 when a job becomes active (in practice by a
dispatch, which holds the organization's lock), one taken from a shard of the backend's own when it stops being
active, so concurrent finishes of one organization rarely meet on a row. A snapshot sees the sum its jobs would
count: a finish not yet committed still counts its job, as the count did. Kept in step by the database, not by each
path of the lifecycle (Redis, or a counter each path writes, would be as right as its least careful writer);
``tests/inference/test_active_job_count.py`` checks the sum against the count over any sequence of those paths, and
the race suite after every round. Measured (``make bench-tenants``, README): one organization's submissions 336 →
358-362/s, one organization against four 0.82-0.86x → 0.85-0.90x. SQLite (one writer, the embedded default) counts.

**A job's message ahead of its commit.** Where its organization had room the last time this process looked, a
submission sends its job's message while its query runs (``send_ahead``), not after: the broker's trip and the
worker's start overlap the query instead of following it. The order of the lifecycle is kept where it matters: a
worker runs only a job that is dispatched and committed. The message says when it was sent; once its query has
ended, the submission leaves an end signal for the job in Redis, and a claim that finds the job not (yet) dispatched
waits for that signal, ``JOB_AHEAD_WAIT_MS`` after the message at most, and looks once more
(``inference.attempts.claim_message``); a message whose job was not dispatched (no room after all, refused, rolled
back) is dropped as a stale one is. Measured (``tests/bench/queue_overhead.py``, README): submit to worker start went
from 2.1-2.3x the bare Celery figure to 1.7-1.8x with the wait on a PostgreSQL advisory lock, taken in a round trip
before the message went, and to 1.36-1.54x (median 1.49x in nine runs) with the end signal in Redis, which costs the
submission no round trip to the database but its query.
Where a job's message is lost with a worker killed while it waits, the sweep sends it again, as any lost message
(``redispatch_stale``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery, current_app
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from accounts import statements
from accounts.locking import retrying, retrying_atomic
from accounts.models import Organization
from inference import active_jobs, job_events
from inference.models import (
    ACTIVE_STATUSES,
    ActiveJobCount,
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
# The organization's jobs that count against its limit: on PostgreSQL the sum of its rows that the jobs table's
# triggers keep (``ActiveJobCount``: a few rows, however many jobs are active), elsewhere the jobs counted.
_SUMMED = (
    f"SELECT COALESCE(SUM({ActiveJobCount._meta.get_field('jobs').column}), 0) AS running "  # noqa: S608
    f"FROM {ActiveJobCount._meta.db_table} "
    f"WHERE {ActiveJobCount._meta.get_field('organization_id').column} = %(organization)s"
)
_COUNTED = (
    f"SELECT COUNT(*) AS running FROM {Job._meta.db_table} "  # noqa: S608
    f"WHERE {_column('organization')} = %(organization)s "
    f"AND {_column('status')} IN ({', '.join(f'%(active_{index})s' for index in range(len(ACTIVE_STATUSES)))})"
)


@functools.cache
def _dispatch_statement(running: str, database_now: str) -> str:
    """After the organization's lock, in one statement (PostgreSQL, and SQLite from 3.35): its active jobs
    (``running``), the oldest queued ones that fit picked (not those past their start deadline: the sweep ends them,
    they take no slot), moved to DISPATCHED and returned. The limit is the organization's row as committed when the
    lock was granted (none for a suspended or missing organization).

    A start deadline has passed by the database's clock (``database_now``, as Django's ``Now()`` writes it), the one
    it is written by (``inference.submission``) and a worker's claim reads it by: a dispatcher whose clock is behind
    would send jobs no worker may start, each holding a slot of its organization until the sweep ends it, and one
    ahead would leave startable jobs queued until they expire. ``dispatched_at`` and ``sent_at`` stay this process's
    stamps (``%(now)s``), as ``redispatch_stale`` writes and reads them: when it sent the job, not a deadline."""
    return (
        f"UPDATE {Job._meta.db_table} SET {_column('status')} = %(dispatched)s, {_column('attempt')} = "  # noqa: S608
        f"{_column('attempt')} + 1, {_column('dispatched_at')} = %(now)s, {_column('sent_at')} = %(now)s "
        f"WHERE {_column('status')} = %(queued)s AND {_column('id')} IN ("
        f"SELECT {_column('id')} FROM {Job._meta.db_table} WHERE {_column('organization')} = %(organization)s "
        f"AND {_column('status')} = %(queued)s "
        f"AND ({_column('start_deadline')} IS NULL OR {_column('start_deadline')} > {database_now}) "
        f"ORDER BY {_column('created_at')}, {_column('id')} "
        f"LIMIT COALESCE((SELECT CASE WHEN {_organization_column('suspended_at')} IS NULL "
        f"AND active.running < {_organization_column('concurrency_limit')} "
        f"THEN {_organization_column('concurrency_limit')} - active.running ELSE 0 END "
        f"FROM {Organization._meta.db_table}, ({running}) AS active "
        f"WHERE {Organization._meta.db_table}.{_organization_column('id')} = %(organization)s), 0))"
        f" RETURNING {_column('id')}, {_column('attempt')}, {_column('gpu_class')}, {_column('created_at')}"
    )


def _dispatch_sql() -> str:
    return _dispatch_statement(_SUMMED if active_jobs.kept() else _COUNTED, statements.now_sql(connection.vendor))


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


def dispatch_statements(organization_id: uuid.UUID) -> tuple[statements.Statement, ...]:
    """The organization's dispatch as the last statements of a caller's one query (``accounts.statements.in_turn``),
    after a COMMIT of what came before them, so they are a transaction of their own and the organization's lock is
    taken after the caller's locks are let go (``inference.submission``): its lock, then the dispatch, whose rows go
    to ``send_dispatched``.

    Its COMMIT does not wait for the disk (``accounts.statements.NO_WAIT_FOR_DISK``): a dispatch lost in a crash
    leaves its jobs QUEUED, which the sweep dispatches again (a message already sent for one finds it not dispatched,
    or dispatched again under the same attempt, and only one claim wins), and the next durable commit (the worker's
    first reserve or heartbeat, any session's, or PostgreSQL's WAL writer within a fraction of a second) takes it to
    the disk, the WAL being written in order. The submission's own COMMIT, before it, waits as ever."""
    parameters = _parameters(organization_id)
    return statements.NO_WAIT_FOR_DISK, (_LOCK, parameters), (_dispatch_sql(), parameters)


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
        statements.in_turn(cursor, (_LOCK, parameters), (_dispatch_sql(), parameters), plan_once=True)
        return cursor.fetchall()


@retrying_atomic
def _dispatched_in_a_transaction(parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Inside a caller's transaction, on SQLite (one writer at a time: no lock to take), or where statements go one
    per query (``server_side_binding``)."""
    with connection.cursor() as cursor:
        if connection.features.has_select_for_update:
            statements.in_turn(cursor, (_LOCK, parameters), (_dispatch_sql(), parameters))
        else:
            cursor.execute(_dispatch_sql(), parameters)
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
        publish_run(job_id, attempt, queue)
    except Exception as exc:
        logger.warning("broker refused job %s attempt %s: %s; it waits for the next sweep", job_id, attempt, exc)
        _back_to_queue(job_id, attempt)
        return False
    return True


def publish_run(job_id: str, attempt: int, queue: str, *, ahead: bool = False, app: Celery | None = None) -> None:
    """``run_job``'s message for one attempt, on the job's queue (through ``app``, the current app by default); raises
    what the broker raised.

    Celery's own message (``AMQP.create_task_message``: task protocol 2, the app's serializer) handed to Celery's own
    sender (``AMQP.send_task_message``: the queue's exchange and routing, the publish signals) through the app's
    producer pool, once, with no retry (``CELERY_BROKER_TRANSPORT_OPTIONS``: a broker that is down refuses at once).
    What ``send_task`` adds on top is left out, because nothing on this path needs it: the router (the queue is
    named), the merge of the task's options with the settings, looked up through Django's settings on every call,
    and the argument reprs built by ``saferepr`` (the arguments are two ids and a time). No result is asked for (with
    a result backend set, as the benchmarks set one, Celery would otherwise name a reply queue). A worker cannot tell
    it from ``send_task``'s; the one difference is that a message sent from inside a task does not name that task
    as its parent. Measured on its own (local Redis, a quiet process): 0.29 ms a message against ``send_task``'s
    0.45, of which the Redis round trip is 0.12; under the submission's load, where its thread waits for the
    interpreter, the difference is larger (README, "The job's message without send_task")."""
    app = app or current_app
    arguments = [job_id, attempt]
    keywords = {"ahead": time.time()} if ahead else {}  # when it was sent: how long a worker may wait on its job
    message = app.amqp.create_task_message(
        str(uuid.uuid4()), RUN_TASK, arguments, keywords, ignore_result=True, origin=_origin(os.getpid()),
        argsrepr=repr(arguments), kwargsrepr=repr(keywords),
    )  # fmt: skip
    # As send_task does: the transport's errors (a Redis that is down) raised as kombu's OperationalError.
    with app.producer_or_acquire() as producer, producer.connection._reraise_as_library_errors():
        app.amqp.send_task_message(producer, RUN_TASK, message, queue=queue, retry=False)


@functools.cache
def _origin(pid: int) -> str:
    """The node a message says it came from, as Celery names an anonymous sender: made once per process (the pid is
    part of it), not per message."""
    from celery.utils.nodenames import anon_nodename

    return anon_nodename()


def unsent(dispatched: list[tuple[Any, ...]]) -> None:
    """The jobs a dispatch statement returned, back to the queue unsent (the broker is down): the sweep sends them."""
    for job_id, attempt, _, _ in dispatched:
        _back_to_queue(str(job_id), attempt)


def _back_to_queue(job_id: str, attempt: int) -> None:
    Job.objects.filter(pk=job_id, status=JobStatus.DISPATCHED, attempt=attempt).update(
        status=JobStatus.QUEUED, attempt=attempt - 1, dispatched_at=None, sent_at=None
    )


REDISPATCH_BACKOFF_CAP = 16  # the longest wait between two sends of a dispatched job: this many times the first


def _due_again(dispatched_at: datetime | None, sent_at: datetime | None, now: datetime, after: timedelta) -> bool:
    """Whether a dispatched job's message is due to be sent again: ``after`` past its last send at first, then as long
    as it had waited from its dispatch to that send (1, 2, 4, 8... times ``after``), at most
    ``REDISPATCH_BACKOFF_CAP`` times ``after``. Never sent: due (its times were checked against ``after``)."""
    if sent_at is None or dispatched_at is None:
        return True
    wait = min(max(after, sent_at - dispatched_at), after * REDISPATCH_BACKOFF_CAP)
    return now - sent_at >= wait


def redispatch_stale() -> int:
    """Re-sends dispatched jobs no worker has claimed for a while: the broker may have lost them.

    A job's message went out at ``sent_at``. A dispatched job without one (dispatched before the column existed, or
    set DISPATCHED by an operator or by SQL) counts from when it was dispatched, else from when it was submitted: left
    out, a lost message of such a job would never be sent again, and the job would hold a slot of its organization
    for ever. Read through the index that starts with the status (``job_status_class_dispatched``), whose DISPATCHED
    rows are only the jobs waiting for a worker's claim (each holds a slot of its organization): few, whatever the
    table holds. ``sent_at`` has no index: a message sent again changes it alone, a HOT update.

    A job sent again waits twice as long as it had waited before the next time (``_due_again``): a message that
    waits behind a worker's backlog is not lost, and a copy of it every minute would grow the class's queue, which
    KEDA scales the GPU workers on, by the backlog's length each minute. The wait is capped at
    ``REDISPATCH_BACKOFF_CAP`` times the first, so a message lost late in a long wait is sent again within that.
    """
    now = timezone.now()
    after = timedelta(seconds=settings.JOB_REDISPATCH_AFTER_SECONDS)
    cutoff = now - after
    never_sent = Q(sent_at__isnull=True) & (
        Q(dispatched_at__lt=cutoff) | Q(dispatched_at__isnull=True, created_at__lt=cutoff)
    )
    candidates = (
        Job.objects.filter(Q(sent_at__lt=cutoff) | never_sent, status=JobStatus.DISPATCHED)
        .order_by("dispatched_at", "created_at")  # oldest first, as they were queued
        .values_list("id", "attempt", "gpu_class", "dispatched_at", "sent_at")
    )
    stale = [
        (job_id, attempt, gpu_class)
        for job_id, attempt, gpu_class, dispatched_at, sent_at in candidates
        if _due_again(dispatched_at, sent_at, now, after)
    ]
    for job_id, attempt, gpu_class in stale:
        # dispatched_at keeps the job's place in line (queue_position); sent_at says when it last went out.
        Job.objects.filter(pk=job_id, status=JobStatus.DISPATCHED, attempt=attempt).update(sent_at=timezone.now())
        if not send_run_message(str(job_id), attempt, gpu_class):
            break  # the broker is down: the rest stay dispatched for the next sweep
    return len(stale)


# A message sent ahead of its job's commit. A submission that expects its job to be dispatched at once (its
# organization had room the last time this process looked) sends the job's message while its query runs, the message
# saying when it was sent; once the query has ended (the job dispatched and committed, or not) the submission leaves
# an end signal for the job in Redis. A worker whose claim finds the job not (yet) dispatched waits for that signal,
# at most until ``JOB_AHEAD_WAIT_MS`` after the message was sent, and claims once more
# (``inference.attempts.claim_message``), reading the submission's outcome: the job dispatched (claimed and run), or
# not (over the limit, refused, rolled back: the message is dropped, as a stale one). The broker's trip and the
# worker's start run alongside the submission's query instead of after it.
#
# The end signal (``end_ahead``) is one element pushed on the job's end list, kept ``JOB_AHEAD_WAIT_MS``: a worker
# finds it however late its wait comes (a BLMOVE of the list onto itself, which leaves the element for the next
# worker a message delivered twice brings), and a message that comes later than that finds its submission ended
# long since and does not wait. The wait is Redis's, not the database's: nothing before the message goes, no round
# trip of the submission's to the database but its query (a PostgreSQL advisory lock, taken before the message went
# and handed over inside the query, cost one, and a mark set in Redis first cost the message a round trip: README,
# "The end of a submission in Redis"), and nothing that outlives a transaction, so a message goes ahead behind a
# transaction pooler too. A submission whose end could not be said (Redis down) sends nothing ahead for
# ``_AHEAD_BREAKER_SECONDS``: a worker that took such a message would wait for nothing.
AHEAD_END_PREFIX = "job-ahead-end:"
_ahead_room: dict[uuid.UUID, bool] = {}  # organization -> whether its last submission here was dispatched at once
_AHEAD_ROOM_KEPT = 10_000
_REDIS_CONNECT_SECONDS = 0.5
_AHEAD_BREAKER_SECONDS = 5.0
_ahead_off_until = 0.0


def ahead_end(job_id: uuid.UUID | str) -> str:
    """The Redis list that holds the end signal of a job's submission, for a worker that waits on it."""
    return f"{AHEAD_END_PREFIX}{job_id}"


def sends_ahead(organization_id: uuid.UUID) -> bool:
    """Whether a submission of this organization sends its job's message ahead of its commit: on PostgreSQL's
    one-query path, with Redis (``REDIS_URL``) for the end signal (and not within ``_AHEAD_BREAKER_SECONDS`` of one
    that failed), ``JOB_MESSAGE_AHEAD`` on, and the organization's last submission in this process dispatched at once
    (unknown: yes)."""
    return (
        settings.JOB_MESSAGE_AHEAD
        and bool(settings.REDIS_URL)
        and statements.in_one_query(connection)
        and _ahead_room.get(organization_id, True)
        and time.monotonic() >= _ahead_off_until
    )


def _signal_client() -> redis.Redis | None:
    """Where a submission's end is said: the process's client for short signals (``job_events.publishing_client``)."""
    return job_events.publishing_client()


@functools.cache
def _waiting_client(pid: int, wait_ms: int) -> redis.Redis:
    """The process's Redis client for a worker's wait on an end signal: its reads wait as long as the wait may."""
    return redis.Redis.from_url(
        str(settings.REDIS_URL),
        socket_connect_timeout=_REDIS_CONNECT_SECONDS,
        socket_timeout=wait_ms / 1000 + _REDIS_CONNECT_SECONDS,
    )


def send_ahead(job_id: uuid.UUID, queue: str) -> Future[bool]:
    """The job's first message (attempt 1, ``ahead``: when it was sent), sent on a thread of its own while the
    caller's query runs: the query waits on PostgreSQL with Python's lock let go, so the two overlap. Its result:
    whether the broker took it."""
    return _sender(os.getpid()).submit(send_ahead_message, str(job_id), queue)


@functools.cache
def _sender(pid: int) -> ThreadPoolExecutor:
    """The process's message threads, made on their first use in each process (the pid is part of the key: a forked
    child has none of its parent's threads)."""
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="message-ahead")


def send_ahead_message(job_id: str, queue: str) -> bool:
    """The message of a job sent ahead of its commit, on the broker; False if the broker refused it."""
    try:
        publish_run(job_id, 1, queue, ahead=True)
    except Exception as exc:
        logger.warning("broker refused job %s's message ahead of its commit: %s", job_id, exc)
        return False
    return True


def ended_ahead(job_id: uuid.UUID, message: Future[bool]) -> None:
    """The end of a submission whose job's message went ahead, said once its query has ended whatever the outcome
    (``end_ahead``): at once on the request's thread where the message has gone, else on the message's thread, after
    the message. Said on a thread of its own, the end waited for the interpreter while the request's answer was
    built, and the worker waits for the end: measured (``tests/bench/queue_overhead.py``, six alternating runs, README
    "The end said on the request's thread"), submit to worker start 1.44-1.68x the bare Celery figure (median 1.55x)
    became 1.44-1.54x (median 1.46x), end to end 1.48-1.73x became 1.36-1.46x, for one round trip to Redis in the
    request (sustained submits over HTTP, one web process: median 226 against 213/s). A Redis that does not answer
    holds each request that reaches it up to its timeouts (0.5 s to connect, 0.5 s to read) until the first such
    failure stops messages going ahead for ``_AHEAD_BREAKER_SECONDS``."""
    if message.done():
        end_ahead(job_id, message)
    else:
        _sender(os.getpid()).submit(end_ahead, job_id, message)


def end_ahead(job_id: uuid.UUID, message: Future[bool]) -> None:
    """The end signal left for a worker that waits on the job, in one round trip, where its message went (``message``
    is done: it was queued on the thread before). Never raises: a worker that waits on an end that does not come
    gives up ``JOB_AHEAD_WAIT_MS`` after the message was sent and drops it, and the sweep sends a dispatched job
    again."""
    global _ahead_off_until
    if message.exception() is not None or not message.result():
        return  # no message went: no worker waits
    end = ahead_end(job_id)
    client = _signal_client()
    if client is None:
        return  # no Redis: nothing went ahead (``sends_ahead``)
    try:
        with client.pipeline(transaction=True) as pipe:  # the push never without its expiry
            pipe.rpush(end, b"1")
            pipe.pexpire(end, settings.JOB_AHEAD_WAIT_MS)
            pipe.execute()
    except (redis.RedisError, OSError) as exc:
        _ahead_off_until = time.monotonic() + _AHEAD_BREAKER_SECONDS
        logger.warning("job %s's submission could not say it has ended (nothing goes ahead for %s s): %s", job_id,
                       _AHEAD_BREAKER_SECONDS, exc)  # fmt: skip


def await_end(job_id: str, sent_at: float) -> bool:
    """For a worker whose claim of a message sent ahead (at ``sent_at``, seconds since the epoch) found the job not
    dispatched: waits for its submission's end signal, at most until ``JOB_AHEAD_WAIT_MS`` after the message was
    sent. False if none came by then, or Redis could not say: the claim that follows is the last (a job dispatched
    meanwhile is sent again by the sweep)."""
    wait_ms = settings.JOB_AHEAD_WAIT_MS
    # The web process's clock against this one's: hosts that agree to well within JOB_AHEAD_WAIT_MS (NTP keeps them
    # within milliseconds). A clock ahead by more would drop early messages, their jobs sent again by the sweep.
    left = min(wait_ms / 1000, sent_at + wait_ms / 1000 - time.time())
    if left <= 0:
        return False  # a message that waited in the queue longer than that: its submission ended long since
    if not settings.REDIS_URL:
        logger.warning("job %s's message was sent ahead, and this process has no REDIS_URL to wait on", job_id)
        return False
    end = ahead_end(job_id)
    try:
        # The element moved from the list's head back to its tail, not taken: every worker that waits on the job
        # (a message delivered twice) wakes on it. Redis takes a fraction of a second (from 6.0, not 0: for ever);
        # redis-py's stub says int.
        client = _waiting_client(os.getpid(), wait_ms)
        if client.blmove(end, end, max(left, 0.001), "LEFT", "RIGHT") is not None:  # type: ignore[arg-type]
            return True
    except (redis.RedisError, OSError) as exc:
        logger.warning("job %s's submission's end could not be read: %s", job_id, exc)
        return False
    logger.warning("job %s's submission did not end within %s ms of its message: the message is dropped", job_id,
                   wait_ms)  # fmt: skip
    return False


def note_room(organization_id: uuid.UUID, job_id: uuid.UUID, dispatched: list[tuple[Any, ...]]) -> None:
    """Whether a submission's dispatch sent its own job, kept for the organization's next submission here."""
    if len(_ahead_room) >= _AHEAD_ROOM_KEPT and organization_id not in _ahead_room:
        _ahead_room.clear()
    _ahead_room[organization_id] = any(row[0] == job_id for row in dispatched)
