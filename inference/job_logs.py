"""A job's log lines, as the queue status and the request pages show them, kept for a retention period.

Every job writes a few lines, plus one per denoising step: at a million jobs a day the table grows by tens of millions
of rows a day. Lines of jobs that ended more than ``JOB_LOG_RETENTION_DAYS`` ago are deleted by the hourly retention
task (inference/file_tasks.py), a batch at a time. The money trail (attempts, usage records, credit entries) is not a
log and stays.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from accounts import statements
from inference.job_events import publish_on_commit
from inference.models import JobLog

PRUNE_BATCH_SIZE = 5_000


def log_job(job_id: uuid.UUID | str, message: str, *, level: str = "INFO", source: str = "platform") -> None:
    """Every move of a job writes a line, so the line also tells its waiters (``job_events``) to look again."""
    # Written out (``accounts.statements``): every move of every job sends it, and no one reads it back by its key.
    statements.insert(log_line(job_id, message, level=level, source=source), want_pk=False)


def log_line(job_id: uuid.UUID | str, message: str, *, level: str = "INFO", source: str = "platform") -> JobLog:
    """The line ``log_job`` writes, for its caller to write (with the job's own update: ``statements.update``'s
    ``along``); once the transaction commits, the job's waiters are told to look again, as ``log_job``'s are."""
    publish_on_commit(job_id)
    return line(job_id, message, level=level, source=source)


def line(job_id: uuid.UUID | str, message: str, *, level: str = "INFO", source: str = "platform") -> JobLog:
    """A log line, for a caller that writes it and tells the job's waiters itself (``job_events.publish_on_commit``)
    once that has committed."""
    return JobLog(job_id=job_id, message=message, level=level, source=source)


def prune_job_logs(now: datetime | None = None, *, limit: int = PRUNE_BATCH_SIZE) -> int:
    """Deletes up to ``limit`` log lines of jobs that ended before the retention period; returns how many.

    Oldest lines first: they belong to the oldest jobs, so the scan by id meets them at once, and what a batch leaves
    the next one takes. A job still running (or queued) keeps every line, however old.
    """
    cutoff = (now or timezone.now()) - timedelta(days=settings.JOB_LOG_RETENTION_DAYS)
    expired = list(
        JobLog.objects.filter(job__finished_at__lt=cutoff).order_by("id").values_list("id", flat=True)[:limit]
    )
    if not expired:
        return 0
    deleted, _ = JobLog.objects.filter(id__in=expired).delete()
    return deleted
