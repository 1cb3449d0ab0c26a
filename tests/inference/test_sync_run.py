"""The sync run and fal's start timeout, in process: POST /run/... answers the result once the request ends, 504 (with
the request id) past its own timeout, and never a queue handle; X-Fal-Request-Timeout ends a request that has not
started by then, unbilled. Waiters wake on the job's own moves (inference/job_events.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from billing.models import Account, Hold, UsageRecord
from inference import attempts, closing, dispatch, job_events
from inference.api import latest_end, wait_deadline
from inference.models import AttemptOutcome, Endpoint, Job, JobStatus, WebhookDelivery
from inference.sweep import sweep
from tests import lifecycle
from tests.waiting import wait_until, wait_until_async

APP = "platform/tiny-sd"
SMALL = lifecycle.SMALL


def client_of(tenant: dict[str, Any]) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {tenant['token']}")
    return client


def held(tenant: dict[str, Any]) -> int:
    return Account.objects.get(organization=tenant["organization"]).held_micros


def finish_when_stored(seed: int) -> threading.Thread:
    """A worker of sorts: once the request with ``seed`` is stored, it is started and finished with an output."""

    def work() -> None:
        try:
            job = wait_until(lambda: Job.objects.filter(input__seed=seed).first(), timeout=60, message="the request")
            lifecycle.finish(lifecycle.start(job), result={"images": [], "seed": seed})
        finally:
            connection.close()

    worker = threading.Thread(target=work)
    worker.start()
    return worker


@pytest.mark.django_db(transaction=True)
def test_run_answers_the_result_once_the_request_ends(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None, settings: Any
) -> None:
    settings.SYNC_RUN_TIMEOUT_SECONDS = 120
    worker = finish_when_stored(seed=41)
    response = client_of(tenant).post(f"/run/{APP}", {**SMALL, "seed": 41}, format="json")
    worker.join(timeout=60)
    assert response.status_code == 200, response.content
    assert response.json()["seed"] == 41
    job = Job.objects.get(pk=response["x-fal-request-id"])
    assert job.status == JobStatus.COMPLETED
    assert "request_id" not in response.json()  # the output, not a handle


@pytest.mark.django_db(transaction=True)
def test_run_past_its_timeout_answers_504_and_the_request_goes_on(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None, settings: Any
) -> None:
    settings.SYNC_RUN_TIMEOUT_SECONDS = 1
    response = client_of(tenant).post(f"/run/{APP}", {**SMALL, "seed": 42}, format="json")
    assert response.status_code == 504, response.content
    answer = response.json()
    assert answer["error_type"] == "timeout"
    assert answer["request_id"] == response["x-fal-request-id"]
    assert answer["response_url"].endswith(f"/queue/{APP}/requests/{answer['request_id']}")
    # The request goes on: fal's clients must not send it again (a second request, billed again).
    assert response["X-Fal-Request-Timeout-Type"] == "user"
    job = Job.objects.get(pk=answer["request_id"])
    assert not job.is_final  # it goes on
    lifecycle.finish(lifecycle.start(job))
    result = client_of(tenant).get(f"/queue/{APP}/requests/{job.pk}")
    assert result.status_code == 200, result.content


def run_in_background(tenant: dict[str, Any], seed: int, **headers: str) -> dict[str, Any]:
    """``POST /run`` in a thread of its own; the dict gets its ``response`` once it answers."""
    answer: dict[str, Any] = {}

    def run() -> None:
        try:
            answer["response"] = client_of(tenant).post(
                f"/run/{APP}", {**SMALL, "seed": seed}, format="json", **headers
            )
        finally:
            connection.close()

    threading.Thread(target=run, daemon=True).start()
    return answer


@pytest.mark.django_db(transaction=True)
def test_a_start_deadline_passing_while_the_run_waits_ends_the_request_unbilled(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None, settings: Any
) -> None:
    # The server's own ceiling is far: the answer comes when the request's start deadline passes.
    settings.SYNC_RUN_TIMEOUT_SECONDS = 3600
    held_before = held(tenant)
    answer = run_in_background(tenant, 43, HTTP_X_FAL_REQUEST_TIMEOUT="0.5")
    response = wait_until(lambda: answer.get("response"), timeout=60, message="the run to answer")
    assert response.status_code == 504, response.content
    assert response["X-Fal-Request-Timeout-Type"] == "user"
    body = response.json()
    assert (body["error_type"], body["request_id"]) == ("timeout", response["x-fal-request-id"])
    assert "start timeout" in body["detail"]
    job = Job.objects.get(pk=response["x-fal-request-id"])
    assert (job.status, job.error_type) == (JobStatus.CANCELLED, "timeout")
    assert job.started_at is None
    assert job.gpu_ms == 0
    assert not UsageRecord.objects.filter(job=job).exists()
    assert Hold.objects.get(job=job).released_at is not None
    assert held(tenant) == held_before


@pytest.mark.django_db(transaction=True)
def test_a_run_waits_as_long_as_its_requests_own_limits_then_answers_504(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None, settings: Any
) -> None:
    """A request that started before its start deadline but never ends (a worker stuck, nothing reaping it) is over by
    its own limits at its start deadline plus the longest an attempt may take: the run answers then, not at the
    server's ceiling."""
    settings.SYNC_RUN_TIMEOUT_SECONDS = 3600
    settings.CELERY_TASK_TIME_LIMIT = 2
    settings.JOB_LEASE_SECONDS = 2
    settings.JOB_SWEEP_SECONDS = 1
    answer = run_in_background(tenant, 44, HTTP_X_FAL_REQUEST_TIMEOUT="3")
    job = wait_until(lambda: Job.objects.filter(input__seed=44).first(), timeout=30, message="the run's request")
    lifecycle.start(job)  # claimed in time; it never finishes
    response = wait_until(lambda: answer.get("response"), timeout=60, message="the run to answer")
    assert response.status_code == 504, response.content
    body = response.json()
    assert (body["error_type"], body["request_id"]) == ("timeout", str(job.pk))
    assert response["x-fal-request-id"] == str(job.pk)
    assert body["response_url"].endswith(f"/queue/{APP}/requests/{job.pk}")
    assert response["X-Fal-Request-Timeout-Type"] == "user"  # it goes on: a resend would run and bill it twice
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING  # the run stopped waiting; the request is the sweep's to end
    assert job.start_deadline is not None
    # It waited until the request's own limits were spent, by the database's clock.
    limits = timedelta(
        seconds=settings.CELERY_TASK_TIME_LIMIT + settings.JOB_LEASE_SECONDS + settings.JOB_SWEEP_SECONDS
    )
    assert timezone.now() >= job.start_deadline + limits - timedelta(milliseconds=50)


@pytest.mark.django_db
def test_a_request_without_a_start_deadline_has_no_limit_of_its_own(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None, settings: Any
) -> None:
    settings.CELERY_TASK_TIME_LIMIT = 900
    settings.JOB_LEASE_SECONDS = 30
    settings.JOB_SWEEP_SECONDS = 5
    waiting = lifecycle.submit_as(tenant, builtin_endpoint)
    assert latest_end(waiting) is None
    now = time.monotonic()
    assert wait_deadline(waiting, now + 60) == now + 60
    deadline = timezone.now() + timedelta(seconds=10)
    Job.objects.filter(pk=waiting.pk).update(start_deadline=deadline)
    waiting.refresh_from_db()
    assert latest_end(waiting) == deadline + timedelta(seconds=900 + 30 + 5)
    # The server's ceiling caps it.
    assert wait_deadline(waiting, now + 60) == now + 60
    assert now + 940 < wait_deadline(waiting, now + 3600) < now + 950


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["0", "0.1", "-3", "soon", "nan", "inf", str(24 * 3600 + 1)])
def test_a_start_timeout_out_of_range_is_a_located_422(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None, value: str
) -> None:
    response = client_of(tenant).post(f"/queue/{APP}", SMALL, format="json", HTTP_X_FAL_REQUEST_TIMEOUT=value)
    assert response.status_code == 422, response.content
    assert response.json()["detail"][0]["loc"] == ["header", "X-Fal-Request-Timeout"]
    assert not Job.objects.exists()


@pytest.mark.django_db
def test_the_sweep_ends_queued_and_dispatched_requests_past_their_start_deadline_and_never_started_ones_only(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None
) -> None:
    submitted = client_of(tenant).post(f"/queue/{APP}", SMALL, format="json", HTTP_X_FAL_REQUEST_TIMEOUT="30")
    assert submitted.status_code == 200, submitted.content
    dispatched = Job.objects.get(pk=submitted.json()["request_id"])
    assert dispatched.start_deadline is not None
    assert 29 <= (dispatched.start_deadline - dispatched.created_at).total_seconds() <= 31
    dispatch.dispatch_organization(tenant["organization"].pk)
    dispatched.refresh_from_db()
    assert dispatched.status == JobStatus.DISPATCHED
    running = lifecycle.start(lifecycle.submit_as(tenant, builtin_endpoint))
    queued = lifecycle.submit_as(tenant, builtin_endpoint)
    past = timezone.now() - timedelta(seconds=1)
    Job.objects.filter(pk__in=[dispatched.pk, running.pk, queued.pk]).update(start_deadline=past)

    # Past its deadline a job is not dispatched, nor claimed by a message already sent.
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 0
    assert attempts.claim_job(job_id=str(dispatched.pk), attempt=dispatched.attempt, worker="late") is None

    assert sweep()["expired"] == 2
    for job in (dispatched, queued):
        job.refresh_from_db()
        assert (job.status, job.error_type) == (JobStatus.CANCELLED, "timeout")
        assert job.attempts.count() == 0
        assert Hold.objects.get(job=job).released_at is not None
    running.refresh_from_db()
    assert running.status == JobStatus.RUNNING  # started before its deadline: it runs as long as it needs
    assert closing.expire_unstarted() == 0

    result = client_of(tenant).get(f"/queue/{APP}/requests/{queued.pk}")
    assert result.status_code == 504, result.content
    assert result["X-Fal-Request-Timeout-Type"] == "user"
    assert result.json()["error_type"] == "timeout"


@pytest.mark.django_db
def test_the_start_timeout_covers_retries(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None
) -> None:
    """As on fal, the start timeout caps retries too: an attempt the platform fails before the deadline is retried;
    a retry still waiting when it passes ends as a timeout; an attempt failing after it is not retried."""
    past = timezone.now() - timedelta(seconds=1)
    retried = lifecycle.start(lifecycle.submit_as(tenant, builtin_endpoint))
    Job.objects.filter(pk=retried.pk).update(start_deadline=timezone.now() + timedelta(minutes=5))
    lifecycle.finish(retried, AttemptOutcome.ERRORED, reserve=False, error="worker lost its GPU", retry=True)
    retried.refresh_from_db()
    assert retried.status == JobStatus.QUEUED
    Job.objects.filter(pk=retried.pk).update(start_deadline=past)
    assert closing.expire_unstarted() == 1
    retried.refresh_from_db()
    assert (retried.status, retried.error_type) == (JobStatus.CANCELLED, "timeout")
    assert retried.error.startswith("The request's retry did not start")
    assert Hold.objects.get(job=retried).released_at is not None
    # The caller's timeout though an attempt had started: fal's clients must not send the request again.
    result = client_of(tenant).get(f"/queue/{APP}/requests/{retried.pk}")
    assert result.status_code == 504, result.content
    assert result["X-Fal-Request-Timeout-Type"] == "user"

    late = lifecycle.start(lifecycle.submit_as(tenant, builtin_endpoint))
    Job.objects.filter(pk=late.pk).update(start_deadline=past)
    late.refresh_from_db()
    lifecycle.finish(late, AttemptOutcome.ERRORED, reserve=False, error="worker lost its GPU", retry=True)
    late.refresh_from_db()
    assert (late.status, late.error) == (JobStatus.FAILED, "worker lost its GPU")
    assert late.attempt == 1
    assert Hold.objects.get(job=late).released_at is not None
    assert "not retried" in " ".join(late.logs.values_list("message", flat=True))


@pytest.mark.django_db
def test_an_expired_request_sends_its_webhook(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    priced_without_broker: None,
    django_capture_on_commit_callbacks: Any,
) -> None:
    job = lifecycle.submit_as(tenant, builtin_endpoint)
    Job.objects.filter(pk=job.pk).update(
        webhook_url="https://93.184.215.14/hook", start_deadline=timezone.now() - timedelta(seconds=1)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert closing.expire_unstarted() == 1
    assert WebhookDelivery.objects.filter(job=job).exists()


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="job events travel through Redis")
def test_a_watch_wakes_on_the_jobs_own_move_only() -> None:
    async def scenario() -> None:
        async with job_events.watching("job-a") as watch, job_events.watching("job-b") as other:
            assert watch.listener is not None
            watch.listener.start()
            listener = watch.listener
            await wait_until_async(lambda: listener.live, timeout=10, message="the listener to subscribe")
            watch.event.clear()  # subscribing wakes every waiter once, for what it may have missed
            other.event.clear()
            await asyncio.to_thread(job_events.publish, "job-a")
            await asyncio.wait_for(watch.event.wait(), timeout=10)
            assert not other.event.is_set()

    asyncio.run(scenario())
