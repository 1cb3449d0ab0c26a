"""Locks on inference's rows, in the platform's one lock order (``accounts.locking``): jobs, then attempts."""

from __future__ import annotations

from typing import Any

from accounts.locking import locked
from inference.models import Job, JobAttempt


def lock_job(job_id: Any, **conditions: Any) -> Job | None:
    """The job, locked, if it still meets ``conditions`` once the lock is held (the row as last committed)."""
    return locked(Job.objects.filter(pk=job_id, **conditions)).first()


def lock_job_with_endpoint(job_id: Any, **conditions: Any) -> Job | None:
    """``lock_job`` that reads the endpoint in the same query (billing prices by it); only the job is locked."""
    return locked(Job.objects.filter(pk=job_id, **conditions)).select_related("endpoint").first()


def lock_attempt(job_id: Any, number: int) -> JobAttempt:
    return locked(JobAttempt.objects.filter(job_id=job_id, number=number)).get()
