"""Retention: the periodic purge of outputs past their expiry, of old jobs' log lines, and the archive of old requests
(scheduled in CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from collections.abc import Callable

from celery import shared_task

from inference.archive import ARCHIVE_BATCH_SIZE, archive_old_jobs
from inference.files import PURGE_BATCH_SIZE, purge_expired_outputs
from inference.job_logs import PRUNE_BATCH_SIZE, prune_job_logs

# Batches per run: the hourly run keeps up with this many expiring jobs an hour, and a backlog
# drains over the next runs instead of holding one task for long.
MAX_BATCHES_PER_RUN = 25


def _drain(batch: Callable[..., int], size: int) -> int:
    """Runs ``batch(limit=size)`` until one comes back short (or for ``MAX_BATCHES_PER_RUN``); the total done."""
    done = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        count = batch(limit=size)
        done += count
        if count < size:
            break
    return done


@shared_task(name="inference.purge_expired_outputs", ignore_result=True, soft_time_limit=600, time_limit=660)
def purge_expired_outputs_task() -> int:
    return _drain(purge_expired_outputs, PURGE_BATCH_SIZE)


@shared_task(name="inference.prune_job_logs", ignore_result=True, soft_time_limit=600, time_limit=660)
def prune_job_logs_task() -> int:
    return _drain(prune_job_logs, PRUNE_BATCH_SIZE)


@shared_task(name="inference.archive_old_jobs", ignore_result=True, soft_time_limit=600, time_limit=660)
def archive_old_jobs_task() -> int:
    return _drain(archive_old_jobs, ARCHIVE_BATCH_SIZE)
