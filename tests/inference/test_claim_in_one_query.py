"""A worker's claim with no transaction open is one query on PostgreSQL, a transaction of its own: the job's
conditional UPDATE, its attempt and log line, and the job read back with its organization. What it writes and answers
is what the claim in a transaction writes and answers, whatever state the job is in.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts import statements
from billing.models import UsageRecord
from inference import attempts, closing, endpoints, job_events, worker
from inference.models import AttemptOutcome, Endpoint, Job, JobAttempt, JobLog, JobStatus
from tests.lifecycle import finish, on_postgresql_in_transactions

pytestmark = on_postgresql_in_transactions("SQLite claims in a transaction of Django's")


def test_the_worker_tells_a_job_s_waiters_it_runs_from_its_heartbeat_s_thread(
    dispatched: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not before its work starts: the claim's answer goes straight to the work, and the heartbeat's thread, started
    with it, publishes first thing (a Redis round trip off the path to the GPU)."""
    job = dispatched()
    told: list[tuple[str, str]] = []

    def publish(job_id: Any) -> None:
        told.append((str(job_id), threading.current_thread().name))

    for module in (job_events, attempts, worker):
        monkeypatch.setattr(module, "publish", publish)
    worker.execute(str(job.pk), 1)
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    assert told[0] == (str(job.pk), f"heartbeat-{job.pk}")  # the first word of it: from the heartbeat's thread
    # The claim the worker makes tells no one itself (its end does, from the work's thread, once the job is done).
    other = dispatched()
    told.clear()
    assert attempts.claim_message(job_id=str(other.pk), attempt=1, worker="gpu-1", tell_waiters=False) is not None
    assert told == []


def test_a_claim_lost_in_a_crash_stops_its_worker_bills_nothing_and_runs_again_once(dispatched: Any) -> None:
    """The claim's COMMIT does not wait for the disk: a crash may lose it while its worker runs the job. The job is
    then as its dispatch left it; the worker's next heartbeat finds its attempt gone and stops, its finish closes
    nothing, and the job, sent again by the sweep, runs once and is billed once."""
    job = dispatched()
    running = attempts.claim_job(job_id=str(job.pk), attempt=1, worker="gpu-1")
    assert running is not None
    # The crash: the claim's rows as if they had never reached the disk.
    JobAttempt.objects.filter(job=job).delete()
    JobLog.objects.filter(job=job, message__startswith="Attempt ").delete()
    Job.objects.filter(pk=job.pk).update(status=JobStatus.DISPATCHED, worker="", lease_expires_at=None, started_at=None)
    answer = attempts.heartbeat(job_id=str(job.pk), attempt=1, step=1, total=2, gpu_ms=50)
    assert (answer.keep_going, answer.error_type) == (False, "lost")
    closed = closing.finish_attempt(job_id=str(job.pk), attempt=1, outcome=AttemptOutcome.SUCCEEDED, gpu_ms=50,
                                    result={"images": [], "seed": 1})  # fmt: skip
    assert closed is None
    assert not UsageRecord.objects.filter(job=job).exists()
    again = attempts.claim_job(job_id=str(job.pk), attempt=1, worker="gpu-2")  # the sweep's message
    assert again is not None
    finished = finish(again)
    assert finished.status == JobStatus.COMPLETED
    assert UsageRecord.objects.filter(job=job).count() == 1
    assert list(JobAttempt.objects.filter(job=job).values_list("worker", flat=True)) == ["gpu-2"]


def _attempt_lines(job: Job) -> list[str]:
    return [line for line in JobLog.objects.filter(job=job).values_list("message", flat=True) if "Attempt" in line]


def test_a_claim_is_one_query_committed_and_answers_the_running_job(
    dispatched: Any, builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = dispatched()
    told: list[str] = []
    monkeypatch.setattr(job_events, "publish", told.append)
    monkeypatch.setattr(attempts, "publish", told.append)
    endpoints.by_id(builtin_endpoint.pk)  # kept in the worker's memory once it has run a job of the endpoint
    with CaptureQueriesContext(connection) as sent:
        claimed = attempts.claim_job(job_id=str(job.pk), attempt=1, worker="gpu-1")
    queries = [query["sql"] for query in sent.captured_queries if not statements.is_preparation(query["sql"])]
    assert len(queries) == 1, queries
    assert connection.get_autocommit()  # no transaction was opened around it: the query committed itself
    assert claimed is not None
    assert (claimed.status, claimed.worker, claimed.attempt) == (JobStatus.RUNNING, "gpu-1", 1)
    assert claimed.started_at is not None
    assert claimed.lease_expires_at is not None
    assert claimed.lease_expires_at > claimed.started_at
    assert claimed.endpoint == builtin_endpoint
    assert claimed.organization_id == job.organization_id
    assert claimed.input == job.input
    assert claimed.company_waiting is False
    assert told == [str(job.pk)]
    stored = Job.objects.get(pk=job.pk)
    assert (stored.status, stored.worker, stored.started_at) == (JobStatus.RUNNING, "gpu-1", claimed.started_at)
    attempt = JobAttempt.objects.get(job=job)
    assert (attempt.number, attempt.worker, attempt.started_at) == (1, "gpu-1", claimed.started_at)
    assert _attempt_lines(job) == ["Attempt 1 started on gpu-1."]


def test_a_second_message_a_cancel_or_a_passed_deadline_claims_nothing_and_writes_nothing(dispatched: Any) -> None:
    job = dispatched()
    assert attempts.claim_job(job_id=str(job.pk), attempt=1, worker="gpu-1") is not None
    assert attempts.claim_job(job_id=str(job.pk), attempt=1, worker="gpu-2") is None  # the same message twice
    assert Job.objects.get(pk=job.pk).worker == "gpu-1"
    assert JobAttempt.objects.filter(job=job).count() == 1
    assert _attempt_lines(job) == ["Attempt 1 started on gpu-1."]

    late = dispatched()
    Job.objects.filter(pk=late.pk).update(start_deadline=timezone.now() - timedelta(seconds=1))
    assert attempts.claim_job(job_id=str(late.pk), attempt=1, worker="gpu-1") is None
    stale = dispatched()
    assert attempts.claim_job(job_id=str(stale.pk), attempt=2, worker="gpu-1") is None  # an older attempt's message
    cancelled = dispatched()
    Job.objects.filter(pk=cancelled.pk).update(status=JobStatus.CANCELLED)
    assert attempts.claim_job(job_id=str(cancelled.pk), attempt=1, worker="gpu-1") is None
    for unclaimed in (late, stale, cancelled):
        assert not JobAttempt.objects.filter(job=unclaimed).exists()
        assert not _attempt_lines(unclaimed)
        assert Job.objects.get(pk=unclaimed.pk).worker == ""


def test_the_claim_says_whether_another_job_of_its_endpoint_waits(dispatched: Any) -> None:
    first, second = dispatched(), dispatched()
    claimed = attempts.claim_job(job_id=str(first.pk), attempt=1, worker="gpu-1")
    assert claimed is not None
    assert claimed.company_waiting is True  # the second, dispatched and not claimed
    last = attempts.claim_job(job_id=str(second.pk), attempt=1, worker="gpu-1")
    assert last is not None
    assert last.company_waiting is False  # the first is running, not waiting


_STATES = st.fixed_dictionaries(
    {
        "status": st.sampled_from([JobStatus.DISPATCHED, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLED]),
        "message_attempt": st.sampled_from([1, 2]),
        "deadline": st.sampled_from([None, -60, 60]),
        "started_before": st.booleans(),
        "others_waiting": st.booleans(),
    }
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=_STATES)
def test_one_query_and_a_transaction_claim_alike(
    dispatched: Any, monkeypatch: pytest.MonkeyPatch, state: dict[str, Any]
) -> None:
    """Two jobs in the same state, one claimed by the one query, one in a transaction (the path inside a caller's
    transaction and on SQLite): the same answer, the same rows."""
    Job.objects.filter(status__in=[JobStatus.DISPATCHED, JobStatus.QUEUED]).update(status=JobStatus.CANCELLED)
    jobs = [dispatched(), dispatched()]
    if state["others_waiting"]:
        dispatched()
    started_before = timezone.now() - timedelta(minutes=5)
    Job.objects.filter(pk__in=[job.pk for job in jobs]).update(
        status=state["status"],
        start_deadline=None if state["deadline"] is None else timezone.now() + timedelta(seconds=state["deadline"]),
        started_at=started_before if state["started_before"] else None,
    )
    results = []
    for job, twin, one_query in ((jobs[0], jobs[1], True), (jobs[1], jobs[0], False)):
        gpu_class = twin.gpu_class
        Job.objects.filter(pk=twin.pk).update(gpu_class="elsewhere")  # not the other's company
        with monkeypatch.context() as patched:
            patched.setattr(statements, "in_one_query", lambda db, one_query=one_query: one_query)
            claimed = attempts.claim_job(job_id=str(job.pk), attempt=state["message_attempt"], worker="gpu-1")
        Job.objects.filter(pk=twin.pk).update(gpu_class=gpu_class)
        stored = Job.objects.get(pk=job.pk)
        results.append(
            {
                "answered": None if claimed is None else (claimed.status, claimed.worker, claimed.company_waiting),
                "same_as_stored": claimed is None or claimed.started_at == stored.started_at,
                "row": (stored.status, stored.worker, stored.progress_step, stored.lease_expires_at is not None),
                "kept_start": stored.started_at == started_before,
                "attempts": list(JobAttempt.objects.filter(job=job).values_list("number", "worker", "outcome")),
                "lines": _attempt_lines(job),
            }
        )
    assert results[0] == results[1]
    claimable = state["status"] == JobStatus.DISPATCHED and state["message_attempt"] == 1 and state["deadline"] != -60
    assert (results[0]["answered"] is not None) == claimable
    if claimable:
        assert results[0]["kept_start"] == state["started_before"]  # a retry keeps the job's first start
