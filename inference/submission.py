"""Submission: a request validated, stored and admitted (billing holds its credit), or refused with nothing stored."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import uuid
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.files.storage import FileSystemStorage, default_storage
from django.db import DatabaseError, IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.utils.duration import duration_microseconds

from accounts import statements
from accounts.errors import AppError
from accounts.locking import retrying, retrying_atomic
from accounts.models import ApiKey, Organization
from accounts.outages import ServiceUnavailable, connection_broken, on_a_new_connection
from inference import dispatch, files, job_logs
from inference.dispatch import dispatch_organization, dispatch_statements, send_dispatched
from inference.hooks import Refusal, hooks
from inference.inputs import is_storable_text, validate_input
from inference.models import (
    END_USER_MAX_LENGTH,
    Endpoint,
    Job,
    JobLog,
)
from inference.presenters import position_statement
from inference.previews import PREVIEWS_FLAG
from inference.webhooks import WebhookUrlError, check_webhook_url

logger = logging.getLogger(__name__)


class SubmissionRefused(AppError):
    """The request was not queued, and nothing of it was stored: not enough credit, a spend limit, a refused
    webhook URL."""

    status_code = 402

    @classmethod
    def of(cls, refusal: Refusal) -> SubmissionRefused:
        return cls(refusal.detail, error_type=refusal.error_type, status_code=refusal.status_code)


class IdempotencyConflict(SubmissionRefused):
    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used with a different request body or endpoint.",
            error_type="idempotency_key_reused",
            status_code=422,
        )


# An end user's tag (``X-Fal-End-User``): what a reseller calls its own user or project. It starts with a letter or
# digit, so no tag is read as a formula where a spreadsheet opens the usage CSV.
END_USER_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:@+/-]{{0,{END_USER_MAX_LENGTH - 1}}}")
END_USER_RULE = (
    f"1 to {END_USER_MAX_LENGTH} characters: letters, digits and . _ : @ + / -, starting with a letter or digit."
)


def valid_end_user(tag: str) -> bool:
    return END_USER_PATTERN.fullmatch(tag) is not None


def _fingerprint(
    endpoint: Endpoint,
    payload: Any,
    webhook_url: str,
    end_user: str = "",
    *,
    retention_seconds: int | None = None,
    start_timeout: float | None = None,
) -> str:
    """What an Idempotency-Key stands for: the same key with another request is refused, never answered with the
    first request's job. The output retention and the start timeout (headers) are part of the request: a replay that
    asks for others would otherwise get a job that keeps its outputs, or waits to start, other than it asked."""
    request: list[Any] = [endpoint.endpoint_id, payload, webhook_url]
    if end_user:  # only then: the fingerprints of untagged requests stay what they were
        request.append(end_user)
    options = {"retention_seconds": retention_seconds, "start_timeout": start_timeout}
    if any(value is not None for value in options.values()):  # only then, as for the tag
        request.append({name: value for name, value in options.items() if value is not None})
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_job(
    *,
    organization: Organization,
    api_key: ApiKey | None,
    endpoint: Endpoint,
    payload: Any,
    webhook_url: str = "",
    idempotency_key: str | None = None,
    retention_seconds: int | None = None,
    start_timeout: float | None = None,
    base_url: str = "",
    previews: bool = False,
    end_user: str = "",
) -> tuple[Job, bool]:
    """The job for this request and whether it is new (False: an earlier one with the same key).

    ``start_timeout`` (fal's ``X-Fal-Request-Timeout``): seconds from now by which a worker must have started the
    request, or it ends unbilled with ``error_type: timeout``; once started it runs as long as it needs. Now by the
    database's clock, which writes the deadline (``_start_deadline``); the job answered holds what it wrote.

    ``previews``: the worker draws previews of it while it runs (a request submitted through a stream).

    ``end_user``: the end user or project the request is for (``X-Fal-End-User``); billing groups usage by it and
    holds it to the tag's monthly limit. Empty: untagged.

    Raises ``InputError`` (422/413) or ``SubmissionRefused`` (402, 403, 422...). Nothing is stored
    for a refused request.

    A database that fails while the job is stored (a connection lost, a server gone, a full disk) may have committed
    it all the same: the job is looked for on a new connection and answered when it is there
    (``_stored_after_an_outage``); when it is not, ``ServiceUnavailable`` (503) says nothing was queued or charged.
    """
    if organization.is_suspended:
        # Every door (an API key, the dashboard's playground) ends here: dispatch would skip the job, and it would
        # wait in the queue holding credit until the organization is unsuspended. Worded as key authentication is.
        raise SubmissionRefused(
            "This organization is suspended. Contact support.", error_type="organization_suspended", status_code=403
        )
    if end_user and not valid_end_user(end_user):
        raise SubmissionRefused(f"The end user tag must be {END_USER_RULE}", error_type="invalid_end_user",
                                status_code=422)  # fmt: skip
    fingerprint = _fingerprint(
        endpoint, payload, webhook_url, end_user, retention_seconds=retention_seconds, start_timeout=start_timeout
    )
    if idempotency_key:
        earlier = _same_key(organization, idempotency_key, fingerprint)
        if earlier is not None:
            return earlier, False
    generation, inline_image = validate_input(endpoint, payload, organization_id=organization.pk)
    if webhook_url:
        if not is_storable_text(webhook_url):
            raise SubmissionRefused(
                "webhook_url holds characters no URL has.", error_type="invalid_webhook_url", status_code=422
            )
        try:
            check_webhook_url(webhook_url)
        except WebhookUrlError as exc:
            raise SubmissionRefused(str(exc), error_type="invalid_webhook_url", status_code=422) from None
    job_id = uuid.uuid4()
    job_input = generation.as_json()
    if retention_seconds is not None:
        job_input["retention_seconds"] = retention_seconds
    if previews:
        job_input[PREVIEWS_FLAG] = True
    saved_image: str | None = None
    if inline_image is not None:
        saved_image = job_input["image_path"] = files.save_input_image(organization.pk, job_id, inline_image)
    try:
        job = _queued(
            Job(
                id=job_id,
                organization=organization,
                api_key=api_key,
                endpoint=endpoint,
                gpu_class=endpoint.gpu_class,
                input=job_input,
                webhook_url=webhook_url,
                end_user=end_user,
                base_url=base_url,
                idempotency_key=idempotency_key or None,
                request_fingerprint=fingerprint,
                max_attempts=settings.JOB_MAX_ATTEMPTS,
            ),
            _start_deadline(start_timeout),
        )
    except IntegrityError:
        # Another request with the same Idempotency-Key won the race: answer with its job. Ours was not stored, so
        # neither is its image (the earlier job has its own).
        if saved_image is not None:
            _discard_input(saved_image)
        earlier = _same_key(organization, idempotency_key, fingerprint) if idempotency_key else None
        if earlier is None:
            raise
        return earlier, False
    except SubmissionRefused:
        # Refused (no credit, a spend limit, a key's limit): rolled back whole, the job is not there to purge it.
        if saved_image is not None:
            _discard_input(saved_image)
        raise
    except (OperationalError, InterfaceError) as error:
        if connection.in_atomic_block:  # the caller's transaction decides, and its connection cannot be replaced
            raise
        stored = _stored_after_an_outage(job_id, endpoint, error)
        if stored is None:
            if saved_image is not None:
                _discard_input(saved_image)
            raise ServiceUnavailable(NOT_ACCEPTED) from error
        return stored, True
    except BaseException:
        if saved_image is not None and not _stored(job_id):
            _discard_input(saved_image)
        raise
    return job, True


NOT_ACCEPTED = (
    "The database failed while this request was being stored, and it was not: nothing was queued or charged. Send it "
    "again shortly."
)


def _stored_after_an_outage(job_id: uuid.UUID, endpoint: Endpoint, error: BaseException) -> Job | None:
    """The job of a submission whose database failed under it (a connection lost, a server gone, a full disk), as a
    new connection finds it: the COMMIT may have reached the server with its answer lost on the way back, and the
    job's id was chosen before the insert, so its row says which. Found: the submission stands (its job and its hold
    committed together), and its organization is dispatched again, as its own dispatch may not have run (the sweep
    would otherwise send it within ``JOB_SWEEP_SECONDS``); a message sent ahead of the commit finds the job either way.
    None: nothing of it was stored. Raises ``ServiceUnavailable`` naming the job's id when the database does not answer
    again: the client then looks the request up by that id before it sends it again."""
    try:
        stored = on_a_new_connection(lambda: Job.objects.filter(pk=job_id).first())
    except DatabaseError as again:
        logger.error("submission %s: its database failed (%s) and does not answer again", job_id, error, exc_info=again)
        raise ServiceUnavailable(
            "The database failed while this request was being stored, and cannot be reached to tell whether it was. "
            "Look it up by its request_id before sending it again, or send it again with the same Idempotency-Key.",
            request_id=str(job_id),
        ) from error
    if stored is None:
        logger.warning("submission %s was not stored: its database failed (%s)", job_id, error)
        return None
    logger.warning("submission %s committed, then its connection failed (%s): answered as stored", job_id, error)
    try:
        dispatch_organization(stored.organization_id)
        stored.refresh_from_db(fields=["status", "attempt"])
    except Exception:  # the job is queued and holds its credit: the sweep dispatches it
        logger.exception("submission %s: could not dispatch it again; the sweep will", job_id)
    stored.endpoint = endpoint
    return stored


def _stored(job_id: uuid.UUID) -> bool:
    """Whether the job is in the database after ``_queued`` failed: a failure after the commit (a lost connection
    on the way back) leaves it there, its input with it. Where that cannot be read, it may be: its input is kept,
    as a stray file costs less than a job whose input is gone."""
    try:
        return Job.objects.filter(pk=job_id).exists()
    except Exception:  # a broken connection or transaction: the error being raised is the one to tell
        return True


def _discard_input(name: str) -> None:
    """Deletes the input image saved for a job that was not stored: no job points at it, so the purge, which goes by
    jobs, would never reach it. Its folder too where the storage keeps folders, as the purge does
    (``files._delete_job_files``)."""
    storage = default_storage
    try:
        storage.delete(name)
        if isinstance(storage, FileSystemStorage):
            with contextlib.suppress(OSError):  # not empty, or already gone
                os.rmdir(os.path.dirname(storage.path(name)))
    except Exception:  # the request's own answer matters more than a stray file
        logger.warning("could not delete the input %s of a submission that was not stored", name, exc_info=True)


def _start_deadline(start_timeout: float | None) -> statements.FromDatabase:
    """The job's start deadline as its insert writes it: ``start_timeout`` seconds past the database's clock (none
    without one).

    By the database's clock, the one every process that compares the deadline shares: the dispatch, the worker's
    claim, a retry, the sweep (``inference.attempts.lease_deadline``). By the web host's clock, a host 40 s behind the
    database would give a request with a 30 s timeout a deadline already passed (dispatched, never claimable, ended
    by the sweep as a timeout), and one ahead would keep it startable that much longer. The expression's text is the
    same with a timeout or without (NULL seconds make a NULL deadline), so the insert stays one prepared statement;
    its ``RETURNING`` hands the value back, for the job answered and waited on."""
    if connection.vendor == "postgresql":
        seconds: Any = start_timeout
    else:
        seconds = None if start_timeout is None else duration_microseconds(timedelta(seconds=start_timeout))
    return statements.FromDatabase("start_deadline", _start_deadline_sql(connection.vendor), (seconds,))


@functools.cache
def _start_deadline_sql(vendor: str) -> str:
    """Seconds (``%s``) past the database's clock, as Django's ``Now()`` reads it: on PostgreSQL with
    ``make_interval``, which takes NULL; on SQLite, microseconds added as Django adds a duration there."""
    now = statements.now_sql(vendor)
    if vendor == "postgresql":
        return f"{now} + make_interval(secs => %s)"
    return str(connection.ops.combine_duration_expression("+", [now, "%s"]))


def _queued(job: Job, deadline: statements.FromDatabase) -> Job:
    """The job inserted and admitted, then its organization dispatched: the first in one query of its own where it
    can (``_inserted_in_one_query``), else in a transaction (``_insert_and_admit``), which also decides what the one
    query left to billing's ``admit``. ``deadline``: its start deadline, written by the insert (``_start_deadline``)."""
    admission = _admission_in_query(job)
    if admission is None:
        return _insert_and_admit(job, deadline)
    # Built first: the message's thread runs while this one waits on the query, not while it builds it.
    sent = _submission_query(job, admission, deadline)
    if not dispatch.sends_ahead(job.organization_id):
        return _inserted(job, sent, None, deadline)
    message = dispatch.send_ahead(job.pk, job.gpu_class)
    try:
        return _inserted(job, sent, message, deadline)
    finally:
        dispatch.ended_ahead(job.pk, message)  # whatever the outcome: a worker that waits on it reads it


def _inserted(
    job: Job, sent: tuple[statements.Statement, ...], message: Future[bool] | None, deadline: statements.FromDatabase
) -> Job:
    """``_queued``'s query and what follows it; ``message``: the job's message sent ahead (``dispatch.send_ahead``)."""
    try:
        dispatched = _inserted_in_one_query(job, sent, deadline)
    except DatabaseError as error:
        if not statements.was_unmet(error):
            raise
        # Rolled back whole: billing decides under the account's lock (a refusal, a budget, a key's limit).
        return _insert_and_admit(job, deadline)
    statements.written(job, job.pk)
    if dispatched is None:
        _dispatch_once_committed(job)  # the query's dispatch failed: again, in a query of its own
        return job
    dispatch.note_room(job.organization_id, job.pk, dispatched)
    if message is None:
        send_dispatched(dispatched)
    elif message.result():
        send_dispatched([row for row in dispatched if row[0] != job.pk])  # its message is on its way
    else:
        dispatch.unsent(dispatched)  # the broker refused its message a moment ago: it would refuse theirs
    return job


def _admission_in_query(job: Job) -> list[statements.Statement] | None:
    """Billing's admission of ``job`` as statements of the submission's own query (none without billing), or None
    where the submission runs in a transaction: inside a caller's transaction, on SQLite, with statements sent one
    per query (``server_side_binding``), or where billing decides the job with ``admit``."""
    if not (statements.in_one_query(connection) and connection.get_autocommit()):
        return None
    if hooks.admit is None:
        return []
    if hooks.admit_in_query is None:
        return None
    return hooks.admit_in_query(job)


def _submission_query(
    job: Job, admission: list[statements.Statement], deadline: statements.FromDatabase
) -> tuple[statements.Statement, ...]:
    """The statements of ``_inserted_in_one_query``."""
    return (
        statements.NO_WAIT_FOR_DISK,
        statements.insertion(job, along=_first_line(job), from_database=(deadline,)),
        *admission,
        statements.COMMIT,
        *dispatch_statements(job.organization_id),
        statements.COMMIT,
        statements.DURABLE_FROM_HERE,
        position_statement(job.pk),
    )


@retrying
def _inserted_in_one_query(
    job: Job, sent: tuple[statements.Statement, ...], deadline: statements.FromDatabase
) -> list[tuple[Any, ...]] | None:
    """The job's insert with its first log line, then billing's admission, COMMIT, then the organization's dispatch,
    COMMIT, then the job's queue position for the answer, as one query with no transaction open; the dispatch's rows,
    or None where the submission committed and its dispatch (or the position's read) failed. The job takes the start
    deadline its insert wrote (``deadline``), read from the insert's own result on the way to the dispatch's, and the
    position (``Job.position_when_submitted``): read after the dispatch committed, so the organization's lock is not
    held for it, and in the same round trip (as a query of its own it cost a submission 0.2-0.4 ms of the web
    process's CPU and a round trip).

    PostgreSQL runs the statements before the COMMIT as a transaction, committed as the COMMIT runs: one round trip
    where a transaction took four (BEGIN, the insert, the admission, COMMIT), and the account's lock, which billing's
    last statement takes, is held to the end of that transaction, not across a round trip of the client's. A
    statement of it that fails (billing's admission where it must decide under a lock, a reused Idempotency-Key)
    rolls all of it back, and nothing after it runs. The dispatch's two statements after the COMMIT are a transaction
    of their own, committed as the query ends (``inference.dispatch.dispatch_statements``): the organization's lock is
    taken after the account's is let go, as the lock order has it, and held for the dispatch alone (sent within the
    submission's own transaction, it would come first and be held for the whole submission, and one organization's
    submissions would queue behind each other on it: ``make bench-tenants``, one organization against four fell from
    0.85-0.95x to 0.72-0.75x). So a submission is one round trip to the database, not two, before its message goes.

    Neither transaction waits for the disk at its COMMIT (``statements.NO_WAIT_FOR_DISK``): the job is dispatched,
    and visible to the worker its message reaches, as soon as their statements have run. The last one, the position's
    read after ``statements.DURABLE_FROM_HERE``, waits, and for the two before it with it: the query ends, and the
    caller is answered, only once the submission is on disk, as when its own COMMIT waited; the WAL's flush (0.2-0.5
    ms on this machine's disk, ``pg_test_fsync``) now runs while the message is on its way to the worker, not before
    the dispatch. A crash before that flush loses the submission whole, never answered (its job, its hold, its
    dispatch and any claim of it: the WAL is replayed in order), as a crash before its COMMIT did.

    A failure after the COMMIT (a lost lock race in the dispatch, a statement timeout) leaves the submission
    committed: its job is there, and its dispatch is sent again on its own. A connection lost on the way (before the
    COMMIT or after it) answers nothing more: ``submit_job`` looks for the job on a new one
    (``_stored_after_an_outage``)."""
    written: list[Any] = []
    dispatched: list[tuple[Any, ...]] = []
    with connection.cursor() as cursor:
        try:
            statements.in_turn(cursor, *sent, plan_once=True, rows={1: written, -4: dispatched})
        except DatabaseError:
            if connection_broken():
                raise  # no answer comes on this connection: ``submit_job`` looks on a new one
            stored = Job.objects.filter(pk=job.pk).values_list("start_deadline").first()
            if stored is None:
                raise  # nothing of it stayed: decided, or run again, as any failed transaction
            job.start_deadline = stored[0]
            logger.warning("submission %s committed, its dispatch failed: dispatching it again", job.pk, exc_info=True)
            return None
        statements.returned(job, next(iter(written), None), (deadline,))
        position = cursor.fetchone()
    job.position_when_submitted = None if position is None else int(position[0])
    return dispatched


def _first_line(job: Job) -> JobLog:
    """The job's first log line, written with its insert. No one is told of it (``job_events``): no one can wait on
    a job before its id is answered, and a waiter reads the job when it starts (``job_events.watching``). Telling
    cost every submission a Redis round trip."""
    return job_logs.line(job.id, f"Request queued for {job.endpoint.endpoint_id}.")


@retrying_atomic
def _insert_and_admit(job: Job, deadline: statements.FromDatabase) -> Job:
    # The job and its first log line: one statement on PostgreSQL (``accounts.statements``); its start deadline by
    # the database's clock, as the insert wrote it (``_start_deadline``).
    statements.insert(job, along=_first_line(job), from_database=(deadline,))
    if hooks.admit is not None:
        # Last: billing locks the organization's account, which every submission and settlement of the organization
        # waits for, until this commits. After the insert, so it can hold credit against the job; a refusal rolls
        # the whole submission back.
        refusal = hooks.admit(job, new=True)
        if refusal is not None:
            raise SubmissionRefused.of(refusal)
    _dispatch_once_committed(job)
    return job


def _dispatch_once_committed(job: Job) -> None:
    """The organization dispatched once the submission has committed; a dispatch that fails (a lost connection) is
    logged and leaves the queued job to the sweep, the request answered with it."""
    organization_id = job.organization_id
    transaction.on_commit(lambda: dispatch_organization(organization_id), robust=True)


def _same_key(organization: Organization, idempotency_key: str, fingerprint: str) -> Job | None:
    earlier = Job.objects.filter(organization=organization, idempotency_key=idempotency_key).first()
    if earlier is not None and earlier.request_fingerprint != fingerprint:
        raise IdempotencyConflict()
    return earlier
