"""Old jobs' log lines go after their retention period, a batch at a time; running jobs and the money trail stay."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from inference.file_tasks import prune_job_logs_task
from inference.job_logs import log_job, prune_job_logs
from inference.models import Endpoint, Job, JobLog, JobStatus
from tests.lifecycle import submit_as

pytestmark = pytest.mark.django_db


def job_with_lines(tenant: dict[str, Any], endpoint: Endpoint, *, ended_days_ago: int | None, lines: int = 3) -> Job:
    job = submit_as(tenant, endpoint)
    for step in range(lines):
        log_job(job.pk, f"Step {step + 1}/{lines}", source="worker")
    if ended_days_ago is not None:
        finished = timezone.now() - timedelta(days=ended_days_ago)
        Job.objects.filter(pk=job.pk).update(status=JobStatus.COMPLETED, finished_at=finished)
    return job


def test_lines_of_jobs_ended_past_the_retention_are_deleted_in_batches(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any
) -> None:
    settings.JOB_LOG_RETENTION_DAYS = 30
    old = [job_with_lines(tenant, builtin_endpoint, ended_days_ago=31) for _ in range(3)]
    recent = job_with_lines(tenant, builtin_endpoint, ended_days_ago=29)
    running = job_with_lines(tenant, builtin_endpoint, ended_days_ago=None)
    Job.objects.filter(pk=running.pk).update(created_at=timezone.now() - timedelta(days=90))  # old, but not ended
    kept = {job.pk: JobLog.objects.filter(job=job).count() for job in (recent, running)}
    old_lines = JobLog.objects.filter(job__in=old).count()
    assert old_lines >= 9

    assert prune_job_logs(limit=4) == 4  # one batch, the oldest lines first
    assert JobLog.objects.filter(job__in=old).count() == old_lines - 4
    assert prune_job_logs_task() == old_lines - 4  # the hourly task drains the rest
    assert not JobLog.objects.filter(job__in=old).exists()
    assert {job.pk: JobLog.objects.filter(job=job).count() for job in (recent, running)} == kept
    assert Job.objects.filter(pk__in=[job.pk for job in old]).count() == 3  # the jobs themselves stay
    assert prune_job_logs() == 0


def test_the_retention_period_is_a_setting(tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any) -> None:
    job = job_with_lines(tenant, builtin_endpoint, ended_days_ago=8)
    settings.JOB_LOG_RETENTION_DAYS = 10
    assert prune_job_logs() == 0
    lines = JobLog.objects.filter(job=job).count()
    settings.JOB_LOG_RETENTION_DAYS = 7
    assert prune_job_logs() == lines > 0
    assert not JobLog.objects.filter(job=job).exists()
