"""A job's message sent ahead of its submission's commit (``inference.dispatch.send_ahead``): the message says when it
was sent, and the submission, once its query has ended, leaves an end signal for the job in Redis; a worker's claim
that finds the job not (yet) dispatched waits for that signal (``JOB_AHEAD_WAIT_MS`` after the message at most) and
claims once more. Nothing is run that was not dispatched, nothing dispatched is left without a message, and every
submission whose message went ahead says it has ended.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
import redis
from django.conf import settings as django_settings
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts import statements
from accounts.models import Organization
from accounts.services import set_concurrency_limit
from billing.ledger import grant_credits
from billing.models import Account, EntryKind
from inference import attempts, dispatch, submission, sweep
from inference.models import ACTIVE_STATUSES, Endpoint, Job, JobStatus
from tests import sessions
from tests.lifecycle import SMALL, finish, submit_as
from tests.waiting import wait_until

# The real senders, before the suite's fixture replaces them with ones that send nothing.
SEND_AHEAD_MESSAGE = dispatch.send_ahead_message
SEND_RUN_MESSAGE = dispatch.send_run_message

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("priced_without_broker"),
]


@pytest.fixture(autouse=True)
def postgresql_only() -> None:
    if connection.vendor != "postgresql" or not django_settings.REDIS_URL:
        pytest.skip("a message goes ahead of its commit on PostgreSQL's one-query path, with Redis for its end")


@pytest.fixture(autouse=True)
def room_unknown(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Each test starts with no organization's room remembered in this process, and nothing holding messages back."""
    dispatch._ahead_room.clear()
    monkeypatch.setattr(dispatch, "_ahead_off_until", 0.0)
    yield
    dispatch._ahead_room.clear()


@pytest.fixture
def messages(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The messages handed to the broker: ahead of the commit, and after the dispatch (``send_run_message``)."""
    sent: dict[str, list[str]] = {"ahead": [], "after": []}

    monkeypatch.setattr(dispatch, "send_ahead_message", lambda job_id, queue: sent["ahead"].append(job_id) or True)
    monkeypatch.setattr(
        dispatch, "send_run_message", lambda job_id, attempt, queue: sent["after"].append(job_id) or True
    )
    return sent


def _other() -> psycopg.Connection[Any]:
    conninfo = sessions.conninfo()
    return psycopg.connect(**conninfo, autocommit=True)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(django_settings.REDIS_URL)


def _ended(*job_ids: Any) -> list[str]:
    """The jobs among ``job_ids`` whose submission left its end signal (on the message's thread: a submission that
    has returned has queued it there; the threads are let finish, and made anew on the next use)."""
    dispatch._sender(os.getpid()).shutdown(wait=True)
    dispatch._sender.cache_clear()
    client = _redis()
    return [str(job_id) for job_id in job_ids if client.lrange(dispatch.ahead_end(job_id), 0, -1) == [b"1"]]


def _waiting_on_an_end() -> int:
    """Redis clients blocked waiting on a submission's end (``dispatch.await_end``)."""
    return sum(1 for client in _redis().client_list() if client.get("cmd") == "blmove" and "b" in client["flags"])


def _status(job_id: str) -> str | None:
    """The job as another session sees it (None: not committed)."""
    with _other() as other:
        row = other.execute("SELECT status FROM inference_job WHERE id = %s", [job_id]).fetchone()
    return None if row is None else str(row[0])


def _funded(tenant: dict[str, Any]) -> Organization:
    organization: Organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=100_000_000, reason="message ahead test")
    return organization


def _claim_as_a_worker(job_id: str, worker: str = "worker-1") -> Job | None:
    """What ``inference.worker.execute`` does with a message sent ahead, up to the start of the work."""
    return attempts.claim_message(job_id=job_id, attempt=1, worker=worker, ahead=time.time())


def test_the_message_goes_before_the_dispatch_and_the_end_is_said_once_it_has_committed(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submission's dispatch is held up (another session holds the organization's row) until the message has
    gone: as it goes, the job is not dispatched and its submission has not said it has ended, so a worker that takes
    it waits. Once the dispatch has committed, the end signal is there for a worker that waits."""
    organization = _funded(tenant)
    seen: list[tuple[str, Any, str | None, bool]] = []  # as the message goes
    after: list[str] = []
    blocker = _other()
    blocker.execute("BEGIN")
    blocker.execute("SELECT 1 FROM accounts_organization WHERE id = %s FOR NO KEY UPDATE", [organization.pk])
    released = threading.Lock()

    def release() -> None:
        if released.acquire(blocking=False):
            blocker.execute("COMMIT")

    def publish(job_id: str, attempt: int, queue: str, *, ahead: bool = False) -> None:
        try:
            seen.append((queue, _redis().lrange(dispatch.ahead_end(job_id), 0, -1), _status(job_id), ahead))
        finally:
            release()

    monkeypatch.setattr(dispatch, "send_ahead_message", SEND_AHEAD_MESSAGE)
    monkeypatch.setattr(dispatch, "publish_run", publish)
    monkeypatch.setattr(dispatch, "send_run_message", lambda job_id, attempt, queue: after.append(job_id) or True)
    deadline = threading.Timer(60, release)  # only if no message went ahead: the submission must not wait for ever
    deadline.start()
    try:
        job = submit_as(tenant, builtin_endpoint)
    finally:
        deadline.cancel()
        release()
        blocker.close()
    assert seen == [(builtin_endpoint.gpu_class, [], seen[0][2], True)]
    assert seen[0][2] in (None, JobStatus.QUEUED)  # not yet committed, or committed and not dispatched
    assert after == []  # its message went ahead: none after the dispatch
    job.refresh_from_db()
    assert (job.status, job.attempt) == (JobStatus.DISPATCHED, 1)
    assert _ended(job.pk) == [str(job.pk)]
    claimed = _claim_as_a_worker(str(job.pk))
    assert claimed is not None
    assert claimed.status == JobStatus.RUNNING


def test_a_submission_that_sends_ahead_is_one_round_trip(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]]
) -> None:
    """The submission's one query (its insert, admission, COMMIT and the dispatch) is its only round trip to the
    database: the mark and the end signal are Redis's."""
    _funded(tenant)
    submit_as(tenant, builtin_endpoint)  # the endpoint's measured time cached, the statements prepared
    with CaptureQueriesContext(connection) as sent:
        job = submit_as(tenant, builtin_endpoint)
    # Not counted: the endpoint's measured GPU time, read at every admission until the endpoint has usage.
    queries = [
        sql
        for sql in (query["sql"] for query in sent.captured_queries)
        if not statements.is_preparation(sql) and "billing_usagerollup" not in sql
    ]
    assert len(queries) == 1, queries
    assert messages["ahead"][-1] == str(job.pk)
    assert _ended(job.pk) == [str(job.pk)]


def test_a_claim_that_comes_before_the_dispatch_waits_for_it_and_runs_the_job(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submission's dispatch is held up (another session holds the organization's row): the worker's first claim
    finds the job not dispatched, waits on the submission's end, and claims it once the dispatch has committed."""
    organization = _funded(tenant)
    events: list[Any] = []
    claimer: list[threading.Thread] = []
    sent_at = time.time()
    blocker = _other()
    blocker.execute("BEGIN")
    blocker.execute("SELECT 1 FROM accounts_organization WHERE id = %s FOR NO KEY UPDATE", [organization.pk])

    def worker(job_id: str) -> None:
        try:
            first = attempts.claim_job(job_id=job_id, attempt=1, worker="worker-1")
            events.append(("first claim", first))
            waited = dispatch.await_end(job_id, sent_at)
            events.append(("waited", waited))
            again = attempts.claim_job(job_id=job_id, attempt=1, worker="worker-1")
            events.append(("claimed", again.status if again else None))
        finally:
            connections.close_all()

    def ahead(job_id: str, queue: str) -> bool:
        thread = threading.Thread(target=worker, args=(job_id,))
        thread.start()
        claimer.append(thread)
        return True

    def release_when_the_worker_waits() -> None:
        try:
            # (or for the worker to be done without waiting: then the events say what went wrong)
            wait_until(lambda: _waiting_on_an_end() == 1 or len(events) == 3, timeout=30,
                       message="the worker to wait on the submission's end")  # fmt: skip
        except AssertionError:
            events.append("the worker never waited on the submission's end")
        finally:
            blocker.execute("COMMIT")  # whatever happened: the submission must not wait for ever

    monkeypatch.setattr(dispatch, "send_ahead_message", ahead)
    releaser = threading.Thread(target=release_when_the_worker_waits)
    releaser.start()
    try:
        job = submit_as(tenant, builtin_endpoint)
    finally:
        releaser.join(60)
        for thread in claimer:
            thread.join(60)
        blocker.close()
    assert events == [("first claim", None), ("waited", True), ("claimed", JobStatus.RUNNING)]
    job.refresh_from_db()
    assert (job.status, job.attempt, job.worker) == (JobStatus.RUNNING, 1, "worker-1")
    assert _waiting_on_an_end() == 0


def test_a_message_ahead_of_a_job_over_the_limit_is_dropped_and_the_next_goes_after(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]]
) -> None:
    organization = _funded(tenant)
    set_concurrency_limit(organization=organization, limit=1)
    first = submit_as(tenant, builtin_endpoint)
    second = submit_as(tenant, builtin_endpoint)  # no room: it waits, its message ahead finds it queued
    assert messages == {"ahead": [str(first.pk), str(second.pk)], "after": []}
    assert Job.objects.get(pk=second.pk).status == JobStatus.QUEUED
    assert _claim_as_a_worker(str(second.pk)) is None  # dropped, as a stale message
    assert Job.objects.get(pk=second.pk).status == JobStatus.QUEUED
    # The organization had no room: its next submission sends nothing ahead, and waits too.
    third = submit_as(tenant, builtin_endpoint)
    assert messages["ahead"] == [str(first.pk), str(second.pk)]
    running = _claim_as_a_worker(str(first.pk))
    assert running is not None
    # The first ends: its finish dispatches the second, whose message goes after that dispatch.
    finish(running)
    assert Job.objects.get(pk=second.pk).status == JobStatus.DISPATCHED
    assert messages["after"] == [str(second.pk)]
    assert Job.objects.get(pk=third.pk).status == JobStatus.QUEUED
    assert _ended(first.pk, second.pk) == [str(first.pk), str(second.pk)]


def test_a_submission_that_finds_room_again_sends_ahead_again(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]]
) -> None:
    organization = _funded(tenant)
    set_concurrency_limit(organization=organization, limit=1)
    first = submit_as(tenant, builtin_endpoint)
    submit_as(tenant, builtin_endpoint)  # over the limit: room is remembered as none
    Job.objects.exclude(pk=first.pk).update(status=JobStatus.CANCELLED)
    set_concurrency_limit(organization=organization, limit=5)
    third = submit_as(tenant, builtin_endpoint)  # sent after its dispatch: its own job was dispatched
    assert messages["after"] == [str(third.pk)]
    fourth = submit_as(tenant, builtin_endpoint)
    assert messages["ahead"][-1] == str(fourth.pk)
    assert Job.objects.get(pk=fourth.pk).status == JobStatus.DISPATCHED


def test_a_refused_submission_says_it_has_ended_and_its_message_finds_nothing(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]]
) -> None:
    organization: Organization = tenant["organization"]
    account = Account.objects.get(pk=organization.pk)
    grant_credits(organization=organization, amount_micros=-account.balance_micros, reason="none left",
                  kind=EntryKind.ADJUSTMENT)  # fmt: skip
    with pytest.raises(submission.SubmissionRefused):
        submit_as(tenant, builtin_endpoint)
    assert len(messages["ahead"]) == 1
    assert _ended(*messages["ahead"]) == messages["ahead"]
    assert not Job.objects.filter(organization=organization).exists()
    assert _claim_as_a_worker(messages["ahead"][0]) is None


def test_a_reused_idempotency_key_says_it_has_ended(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]], monkeypatch: Any
) -> None:
    organization = _funded(tenant)
    arguments = {"organization": organization, "api_key": tenant["api_key"], "endpoint": builtin_endpoint,
                 "payload": dict(SMALL), "idempotency_key": "same"}  # fmt: skip
    first, _ = submission.submit_job(**arguments)
    looked: list[int] = []

    def not_yet(*args: Any) -> Job | None:  # the second request did not see the first: its insert meets the key
        looked.append(1)
        return None if len(looked) == 1 else first

    monkeypatch.setattr(submission, "_same_key", not_yet)
    again, new = submission.submit_job(**arguments)  # its insert fails on the key, after its message went ahead
    assert (again.pk, new) == (first.pk, False)
    assert _ended(*messages["ahead"]) == messages["ahead"]
    assert Job.objects.filter(organization=organization).count() == 1
    assert _claim_as_a_worker(messages["ahead"][-1]) is None  # the second's message: no such job


def test_a_broker_that_refuses_the_message_ahead_leaves_what_was_dispatched_to_the_sweep(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As after a dispatch whose first message the broker refused (``send_run_messages``): the rest are not tried,
    each would cost the request the broker's timeout; the jobs go back to the queue, and the sweep sends them."""
    organization = _funded(tenant)
    after: list[str] = []
    monkeypatch.setattr(dispatch, "send_ahead_message", lambda job_id, queue: False)
    monkeypatch.setattr(dispatch, "send_run_message", lambda job_id, attempt, queue: after.append(job_id) or True)
    set_concurrency_limit(organization=organization, limit=2)
    waiting = submit_as(tenant, builtin_endpoint)  # its dispatch took it; its message refused: back to the queue
    job = submit_as(tenant, builtin_endpoint)  # its dispatch takes both: neither is tried
    assert after == []
    for queued in (waiting, job):
        queued.refresh_from_db()
        assert (queued.status, queued.attempt) == (JobStatus.QUEUED, 0)
    sweep.sweep()  # the broker is back
    assert sorted(after) == sorted([str(waiting.pk), str(job.pk)])
    assert _ended(waiting.pk, job.pk) == []  # no message went ahead: no worker waits


def test_a_claim_that_waits_too_long_drops_the_message_and_the_sweep_sends_it(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]], settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A submission that did not say it had ended (its process died): a worker waits ``JOB_AHEAD_WAIT_MS`` from when
    the message was sent, no longer; a message that comes later than that does not wait at all."""
    settings.JOB_REDISPATCH_AFTER_SECONDS = 1
    job = submit_as(_funded_tenant(tenant), builtin_endpoint)
    assert _ended(job.pk) == [str(job.pk)]
    assert dispatch.await_end(str(job.pk), time.time()) is True  # an end said is read at once
    settings.JOB_AHEAD_WAIT_MS = 200
    silent = str(uuid.uuid4())  # a job whose submission never says it has ended
    started = time.monotonic()
    assert dispatch.await_end(silent, time.time()) is False
    assert time.monotonic() - started >= 0.15
    with monkeypatch.context() as patched:  # sent a second ago: its wait is over, nothing is asked of Redis
        patched.setattr(dispatch, "_waiting_client", lambda *args: pytest.fail("a late message waited"))
        assert dispatch.await_end(silent, time.time() - 1) is False
    Job.objects.filter(pk=job.pk).update(sent_at=Job.objects.get(pk=job.pk).sent_at.replace(year=2000))
    sweep.sweep()
    assert messages["after"] == [str(job.pk)]  # sent again: the job was dispatched, its message dropped


def test_a_message_older_than_its_wait_finds_its_job_not_dispatched_and_is_dropped_at_once(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message that waited in the broker longer than ``JOB_AHEAD_WAIT_MS`` (its organization had no room after all)
    does not wait on its submission, which ended long since: nothing is asked of Redis."""
    organization = _funded(tenant)
    set_concurrency_limit(organization=organization, limit=1)
    submit_as(tenant, builtin_endpoint)
    waiting = submit_as(tenant, builtin_endpoint)  # no room: QUEUED, its message ahead on the broker
    monkeypatch.setattr(dispatch, "_waiting_client", lambda *args: pytest.fail("an old message waited"))
    sent_at = time.time() - django_settings.JOB_AHEAD_WAIT_MS / 1000 - 1
    assert attempts.claim_message(job_id=str(waiting.pk), attempt=1, worker="w", ahead=sent_at) is None
    assert Job.objects.get(pk=waiting.pk).status == JobStatus.QUEUED


def test_a_message_of_the_release_before_waits_on_its_submission_s_lock(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]]
) -> None:
    """During an upgrade a web process of the release before sends ``ahead=True`` and holds a lock named by the job
    until its dispatch commits: a worker's claim that finds the job not dispatched waits on that lock, then claims."""
    organization = _funded(tenant)
    set_concurrency_limit(organization=organization, limit=1)
    running = submit_as(tenant, builtin_endpoint)
    job = submit_as(tenant, builtin_endpoint)  # QUEUED: the old submission's dispatch is still to come
    key = (0x6A6F62, int.from_bytes(job.pk.bytes[-4:], "big", signed=True))
    claimed: list[Job | None] = []

    def worker() -> None:
        try:
            claimed.append(attempts.claim_message(job_id=str(job.pk), attempt=1, worker="w", ahead=True))
        finally:
            connections.close_all()

    def waiting_on_the_lock() -> bool:
        with _other() as other:
            row = other.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND mode = 'ShareLock'"
            ).fetchone()
        return row is not None and row[0] == 1

    with _other() as old_web:
        old_web.execute("SELECT pg_advisory_lock(%s, %s)", key)
        thread = threading.Thread(target=worker)
        thread.start()
        try:
            wait_until(waiting_on_the_lock, timeout=30, message="the claim to wait on the old submission's lock")
            Job.objects.filter(pk=running.pk).update(status=JobStatus.CANCELLED)  # room: the old dispatch takes it
            assert dispatch.dispatch_organization(organization.pk) == 1
        finally:
            old_web.execute("SELECT pg_advisory_unlock(%s, %s)", key)
            thread.join(60)
    assert len(claimed) == 1
    assert claimed[0] is not None
    assert (claimed[0].pk, claimed[0].status) == (job.pk, JobStatus.RUNNING)


def _funded_tenant(tenant: dict[str, Any]) -> dict[str, Any]:
    _funded(tenant)
    return tenant


@pytest.mark.parametrize("switch", ["JOB_MESSAGE_AHEAD", "REDIS_URL"])
def test_nothing_goes_ahead_when_switched_off_or_without_redis(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]], settings: Any, switch: str
) -> None:
    setattr(settings, switch, False if switch == "JOB_MESSAGE_AHEAD" else "")
    job = submit_as(_funded_tenant(tenant), builtin_endpoint)
    assert messages == {"ahead": [], "after": [str(job.pk)]}


def test_a_message_goes_ahead_behind_a_transaction_pooler(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]], settings: Any
) -> None:
    """Nothing of it outlives a transaction: the mark is Redis's."""
    settings.DATABASE_TRANSACTION_POOLING = True
    job = submit_as(_funded_tenant(tenant), builtin_endpoint)
    assert messages == {"ahead": [str(job.pk)], "after": []}


def test_an_end_redis_does_not_take_stops_messages_going_ahead_for_a_while(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis down as a submission ends: a worker that took its message waits for nothing until its wait runs out, so
    the process sends nothing ahead for a while (its messages go once the job is dispatched), and the request is
    answered as ever."""
    nowhere = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    monkeypatch.setattr(dispatch, "_signal_client", lambda: nowhere)
    monkeypatch.setattr(dispatch, "_ahead_off_until", 0.0)
    organization = _funded(tenant)
    first = submit_as(tenant, builtin_endpoint)
    assert _ended(first.pk) == []  # said on the message's thread: it could not
    second = submit_as(tenant, builtin_endpoint)
    assert _ended(second.pk) == []
    assert messages == {"ahead": [str(first.pk)], "after": [str(second.pk)]}
    assert [Job.objects.get(pk=job.pk).status for job in (first, second)] == [JobStatus.DISPATCHED] * 2
    assert organization.concurrency_limit >= 2


def test_a_dispatch_lost_after_its_message_went_is_redone_and_run_once(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, messages: dict[str, list[str]]
) -> None:
    """The dispatch's COMMIT does not wait for the disk: a crash may lose it after the message went. The job is then
    QUEUED as before its dispatch; the message finds it so and is dropped; the sweep dispatches it under the same
    attempt, and of the two messages only one claim runs it."""
    job = submit_as(_funded_tenant(tenant), builtin_endpoint)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.QUEUED, attempt=0, dispatched_at=None, sent_at=None)
    assert _claim_as_a_worker(str(job.pk)) is None
    sweep.sweep()
    assert messages["after"] == [str(job.pk)]
    job.refresh_from_db()
    assert (job.status, job.attempt) == (JobStatus.DISPATCHED, 1)
    claims = [_claim_as_a_worker(str(job.pk), worker) for worker in ("worker-1", "worker-2")]
    assert [claimed is not None for claimed in claims] == [True, False]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    limit=st.integers(min_value=1, max_value=3),
    steps=st.lists(st.sampled_from(["submit", "submit", "deliver", "finish", "broker"]), min_size=1, max_size=14),
    order=st.randoms(use_true_random=False),
)
def test_every_dispatched_job_is_claimed_once_and_nothing_else_runs(
    make_user: Any, builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, limit: int, steps: list[str],
    order: Any,
) -> None:  # fmt: skip
    """Submissions (their messages ahead of the commit, or after the dispatch, or refused by a broker that is down),
    the broker's messages delivered in any order (some twice), finishes, the broker going down and coming back (then
    the sweep): at every step no more jobs are dispatched or running than the limit and no job was claimed twice; at
    the end, with the broker up and every message delivered, no dispatched job is left unclaimed, and every submission
    whose message went ahead has said it ended."""
    user = make_user(email=f"ahead-{uuid.uuid4().hex[:10]}@example.com")
    organization = Organization.objects.get(memberships__user=user, is_personal=True)
    grant_credits(organization=organization, amount_micros=100_000_000, reason="property")
    set_concurrency_limit(organization=organization, limit=limit)
    organization.refresh_from_db()
    dispatch._ahead_room.clear()
    on_the_broker: list[tuple[str, int, float | bool]] = []  # the messages: job id, attempt, sent ahead (when)
    broker_up = [True]
    claims: dict[str, int] = {}

    went_ahead: set[str] = set()
    # Every end said is kept for the whole example, however slow the machine.
    monkeypatch.setattr(django_settings, "JOB_AHEAD_WAIT_MS", 60_000)

    def publish_run(job_id: str, attempt: int, queue: str, *, ahead: bool = False) -> None:
        if not broker_up[0]:
            raise ConnectionError("the broker is down")
        on_the_broker.append((job_id, attempt, time.time() if ahead else False))  # as the message says
        if ahead:
            went_ahead.add(job_id)

    # The real senders (the suite's fixture answers True without sending), over a broker this test plays.
    monkeypatch.setattr(dispatch, "send_ahead_message", SEND_AHEAD_MESSAGE)
    monkeypatch.setattr(dispatch, "send_run_message", SEND_RUN_MESSAGE)
    monkeypatch.setattr(dispatch, "publish_run", publish_run)

    def deliver() -> None:
        order.shuffle(on_the_broker)
        for job_id, attempt, ahead in list(on_the_broker):
            job = attempts.claim_message(job_id=job_id, attempt=attempt, worker="w", ahead=ahead)
            if job is not None:
                claims[job_id] = claims.get(job_id, 0) + 1
            if order.random() < 0.8:  # acknowledged; else delivered again later (a worker lost before its ack)
                on_the_broker.remove((job_id, attempt, ahead))

    def active() -> int:
        return Job.objects.filter(organization=organization, status__in=ACTIVE_STATUSES).count()

    for step in steps:
        if step == "submit":
            submission.submit_job(organization=organization, api_key=None, endpoint=builtin_endpoint,
                                  payload=dict(SMALL))  # fmt: skip
        elif step == "deliver":
            deliver()
        elif step == "finish":
            running = Job.objects.filter(organization=organization, status=JobStatus.RUNNING).first()
            if running is not None:
                finish(running)
        else:
            broker_up[0] = not broker_up[0]
            if broker_up[0]:
                sweep.sweep()
        assert active() <= limit
        assert all(count == 1 for count in claims.values()), claims
    broker_up[0] = True
    sweep.sweep()
    while on_the_broker:
        deliver()
    assert not Job.objects.filter(organization=organization, status=JobStatus.DISPATCHED).exists()
    assert all(count == 1 for count in claims.values()), claims
    assert sorted(_ended(*went_ahead)) == sorted(went_ahead)
    running = Job.objects.filter(organization=organization, status=JobStatus.RUNNING).count()
    queued = Job.objects.filter(organization=organization, status=JobStatus.QUEUED).count()
    assert running == min(limit, running + queued)  # nothing waits while there is room
