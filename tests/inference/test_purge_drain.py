"""The hourly purge drains its backlog past files it cannot delete: those are logged, counted and tried again next run,
and never stop the rest (or the archive, which waits for the purge) for ever."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.utils import timezone

from inference import file_tasks, files
from inference.models import Endpoint, Job, JobStatus, Upload, UploadStatus

pytestmark = pytest.mark.django_db

NO_FAILURES = {"jobs_failed": 0, "uploads_failed": 0}


def expired_jobs(tenant: dict[str, Any], endpoint: Endpoint, count: int) -> list[Job]:
    """``count`` completed jobs whose outputs expired ten days ago, one second apart (the first expired last)."""
    now = timezone.now()
    jobs = [
        Job(
            id=uuid.uuid4(), organization=tenant["organization"], endpoint=endpoint, gpu_class="cpu",
            input={"prompt": "x"}, status=JobStatus.COMPLETED, finished_at=now - timedelta(days=40),
            outputs_expire_at=now - timedelta(days=10, seconds=n), result={"images": []},
        )
        for n in range(count)
    ]  # fmt: skip
    return Job.objects.bulk_create(jobs)


def oldest_first(jobs: list[Job]) -> list[Job]:
    return sorted(jobs, key=lambda job: (job.outputs_expire_at, str(job.pk)))


def refusing(monkeypatch: pytest.MonkeyPatch, refused: set[Any], name: str = "_delete_job_files") -> None:
    """``files.<name>`` raises for the rows in ``refused`` (as a file of the wrong owner does) while they are in it;
    deletes the others."""
    real = getattr(files, name)

    def delete(row: Any) -> None:
        if row.pk in refused:
            raise PermissionError(13, "Permission denied")
        real(row)

    monkeypatch.setattr(files, name, delete)


def test_one_undeletable_job_does_not_stop_the_drain(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    jobs = expired_jobs(tenant, builtin_endpoint, 3 * files.PURGE_BATCH_SIZE)
    stuck = oldest_first(jobs)[0]
    refusing(monkeypatch, {stuck.pk})

    with caplog.at_level(logging.ERROR, logger="inference.files"):
        purged = file_tasks.purge_expired_outputs_task()

    assert purged == {"jobs": len(jobs) - 1, "jobs_failed": 1, "uploads": 0, "uploads_failed": 0}
    assert list(Job.objects.filter(outputs_expire_at__isnull=False).values_list("pk", flat=True)) == [stuck.pk]
    failure = next(record for record in caplog.records if str(stuck.pk) in record.getMessage())
    assert failure.exc_info is not None
    assert isinstance(failure.exc_info[1], PermissionError)  # the error itself, logged with the job


def test_more_stuck_jobs_than_a_batch_holds_leave_the_rest_to_be_purged(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = oldest_first(expired_jobs(tenant, builtin_endpoint, 2 * files.PURGE_BATCH_SIZE + 10))
    stuck = {job.pk for job in jobs[: files.PURGE_BATCH_SIZE + 5]}  # the oldest: every batch would start with them
    refusing(monkeypatch, stuck)
    how_many = len(stuck)

    purged = file_tasks.purge_expired_outputs_task()

    assert (purged["jobs"], purged["jobs_failed"]) == (len(jobs) - len(stuck), len(stuck))
    assert set(Job.objects.filter(outputs_expire_at__isnull=False).values_list("pk", flat=True)) == stuck
    # Still past their retention to the API while their files wait: no URL comes back.
    waiting = Job.objects.get(pk=jobs[0].pk)
    waiting.result = {"images": [{"path": f"outputs/x/{waiting.pk}/0.png", "content_type": "image/png"}]}
    assert files.render_result(waiting, base_url="http://testserver")["images"][0]["url"] is None  # type: ignore[index]

    # The next run tries them again: once the files can go, they go.
    stuck.clear()
    assert file_tasks.purge_expired_outputs_task() == {"jobs": how_many, "uploads": 0, **NO_FAILURES}
    assert not Job.objects.filter(outputs_expire_at__isnull=False).exists()


def test_a_full_batch_of_failures_is_not_retried_within_the_run(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = expired_jobs(tenant, builtin_endpoint, files.PURGE_BATCH_SIZE)
    tried: list[Any] = []

    def refuse(job: Job) -> None:
        tried.append(job.pk)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "_delete_job_files", refuse)
    purged = file_tasks.purge_expired_outputs_task()
    assert purged == {"jobs": 0, "jobs_failed": len(jobs), "uploads": 0, "uploads_failed": 0}
    assert sorted(tried, key=str) == sorted((job.pk for job in jobs), key=str)  # each once: not 25 batches of them


def test_jobs_and_uploads_are_counted_apart(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    expired_jobs(tenant, builtin_endpoint, 3)
    past = timezone.now() - timedelta(days=1)
    uploads = [
        Upload.objects.create(
            organization=tenant["organization"], status=UploadStatus.PENDING, file_name=f"{n}.png",
            content_type="image/png", expires_at=past - timedelta(seconds=n),
        )
        for n in range(2)
    ]  # fmt: skip
    refused = {uploads[1].pk}
    refusing(monkeypatch, refused, name="delete_upload_files")

    assert file_tasks.purge_expired_outputs_task() == {"jobs": 3, "jobs_failed": 0, "uploads": 1, "uploads_failed": 1}
    assert Upload.objects.get(pk=uploads[1].pk).status == UploadStatus.PENDING  # tried again next run
    refused.clear()
    assert file_tasks.purge_expired_outputs_task() == {"jobs": 0, "uploads": 1, **NO_FAILURES}
    assert set(Upload.objects.values_list("status", flat=True)) == {UploadStatus.EXPIRED}


def test_the_soft_time_limit_stops_the_purge(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = oldest_first(expired_jobs(tenant, builtin_endpoint, 5))
    real = files._delete_job_files

    def delete(job: Job) -> None:
        if job.pk == jobs[2].pk:
            raise SoftTimeLimitExceeded()
        real(job)

    monkeypatch.setattr(files, "_delete_job_files", delete)
    with pytest.raises(SoftTimeLimitExceeded):
        file_tasks.purge_expired_outputs_task()
    # What it purged before stays purged; the rest waits for the next run.
    left = set(Job.objects.filter(outputs_expire_at__isnull=False).values_list("pk", flat=True))
    assert left == {job.pk for job in jobs[2:]}
