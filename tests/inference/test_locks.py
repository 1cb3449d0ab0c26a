"""``inference.locks``: the running job's lock and its attempt's close, whether one statement (PostgreSQL) or two."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from inference import locks
from inference.models import AttemptOutcome, Endpoint, JobAttempt, JobStatus, TenantSettings
from tests.lifecycle import start, submit_as

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_broker(monkeypatch: pytest.MonkeyPatch, tenant: dict[str, Any]) -> None:
    from billing.ledger import grant_credits
    from inference import dispatch

    monkeypatch.setattr(dispatch, "send_run_message", lambda *args: True)
    grant_credits(organization=tenant["organization"], amount_micros=10_000_000, reason="Lock tests")


def test_the_running_job_is_locked_and_its_attempt_closed_as_written(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    TenantSettings.objects.update_or_create(
        organization=tenant["organization"], defaults={"output_retention_seconds": 90}
    )
    job = start(submit_as(tenant, builtin_endpoint))
    finished_at = timezone.now()
    with transaction.atomic(), CaptureQueriesContext(connection) as sent:
        closed = locks.lock_and_close_attempt(
            job.pk, job.attempt, outcome=AttemptOutcome.FAILED, gpu_ms=1_234, cold_start_ms=56, error="boom",
            finished_at=finished_at,
        )  # fmt: skip
    # The endpoint comes from memory where a worker has closed one of its requests before; a test's transaction keeps
    # nothing in memory (accounts/memo.py), so it may be read here.
    lock_and_close = [query["sql"] for query in sent if "inference_endpoint" not in query["sql"].split(" WHERE ")[0]]
    assert len(lock_and_close) == (1 if connection.vendor == "postgresql" else 2), lock_and_close
    assert closed is not None
    (running_job, retention), attempt = closed
    assert (running_job.pk, running_job.status, running_job.input) == (job.pk, JobStatus.RUNNING, job.input)
    assert running_job.endpoint == builtin_endpoint
    assert running_job.created_at == job.created_at
    assert retention == 90
    assert isinstance(attempt, JobAttempt)
    assert (attempt.job_id, attempt.number, attempt.worker) == (job.pk, job.attempt, "worker-1")
    assert (attempt.outcome, attempt.gpu_ms, attempt.cold_start_ms, attempt.error) == ("failed", 1_234, 56, "boom")
    assert attempt.finished_at == finished_at
    stored = JobAttempt.objects.get(pk=attempt.pk)
    assert (stored.outcome, stored.gpu_ms, stored.finished_at) == ("failed", 1_234, finished_at)


def test_a_job_no_longer_running_that_attempt_is_neither_locked_nor_closed(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = start(submit_as(tenant, builtin_endpoint))
    with transaction.atomic():
        assert locks.lock_and_close_attempt(job.pk, job.attempt + 1, outcome=AttemptOutcome.SUCCEEDED) is None
        assert locks.lock_running_job(job.pk, job.attempt, lease_expired_before=timezone.now()) is None
        assert locks.lock_running_job(job.pk, job.attempt, lease_expired_before=timezone.now() + timedelta(days=1))
    type(job).objects.filter(pk=job.pk).update(status=JobStatus.COMPLETED)
    with transaction.atomic():
        assert locks.lock_and_close_attempt(job.pk, job.attempt, outcome=AttemptOutcome.SUCCEEDED) is None
    attempt = JobAttempt.objects.get(job=job, number=job.attempt)
    assert (attempt.outcome, attempt.finished_at) == (AttemptOutcome.RUNNING, None)


def test_a_running_job_without_its_attempt_row_is_an_error_not_a_silent_close(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = start(submit_as(tenant, builtin_endpoint))
    JobAttempt.objects.filter(job=job).delete()
    with pytest.raises(JobAttempt.DoesNotExist), transaction.atomic():
        locks.lock_and_close_attempt(job.pk, job.attempt, outcome=AttemptOutcome.SUCCEEDED)


def test_an_attempt_closed_without_a_finish_time_is_still_the_attempt(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    # Its last column (finished_at) stays NULL: the statement's answer still holds the attempt.
    job = start(submit_as(tenant, builtin_endpoint))
    with transaction.atomic():
        closed = locks.lock_and_close_attempt(job.pk, job.attempt, gpu_ms=7)
    assert closed is not None
    _, attempt = closed
    assert (attempt.job_id, attempt.gpu_ms, attempt.finished_at) == (job.pk, 7, None)
