"""Retention: the periodic purge of outputs past their expiry, of old jobs' log lines, and the archive of old requests
(scheduled in CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import shared_task

from inference.archive import ARCHIVE_BATCH_SIZE, archive_old_jobs
from inference.files import PURGE_BATCH_SIZE, PurgeBatch, purge_expired_outputs, purge_expired_uploads
from inference.job_logs import PRUNE_BATCH_SIZE, prune_job_logs

logger = logging.getLogger(__name__)

# Batches per run: the hourly run keeps up with this many expiring jobs an hour, and a backlog
# drains over the next runs instead of holding one task for long.
MAX_BATCHES_PER_RUN = 25


def _drain(batch: Callable[..., int], size: int) -> int:
    """Runs ``batch(limit=size)`` until one comes back short (or for ``MAX_BATCHES_PER_RUN``); the total done.

    For batches that finish every row they take up or raise (the archive, the log prune): a short count means no row
    was left (or a concurrent run took some, and drains them itself). The purge leaves rows it could not delete, so
    it drains on the rows it took up instead (``_drain_purge``)."""
    done = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        count = batch(limit=size)
        done += count
        if count < size:
            break
    return done


def _drain_purge(batch: Callable[..., PurgeBatch], size: int) -> PurgeBatch:
    """Runs ``batch(limit=size)``, each batch past the last row of the one before, until one takes up fewer rows than
    ``size`` (or for ``MAX_BATCHES_PER_RUN``); the totals. A row whose files could not be deleted is taken up once a
    run and left for the next, so a few that fail for ever (a file we may not remove) cost one try an hour each, not
    the rest of the backlog."""
    looked_at = purged = failed = 0
    last = None
    for _ in range(MAX_BATCHES_PER_RUN):
        done = batch(limit=size, after=last)
        looked_at, purged, failed = looked_at + done.looked_at, purged + done.purged, failed + done.failed
        last = done.last or last
        if done.looked_at < size:
            break
    return PurgeBatch(looked_at=looked_at, purged=purged, failed=failed, last=last)


@shared_task(name="inference.purge_expired_outputs", ignore_result=True, soft_time_limit=600, time_limit=660)
def purge_expired_outputs_task() -> dict[str, int]:
    """Jobs' outputs and uploads past their retention, each drained apart; how many of each were purged, and how many
    could not be (logged one by one with their errors, tried again next run)."""
    jobs = _drain_purge(purge_expired_outputs, PURGE_BATCH_SIZE)
    uploads = _drain_purge(purge_expired_uploads, PURGE_BATCH_SIZE)
    if jobs.failed or uploads.failed:
        logger.warning(
            "the purge could not delete the files of %d jobs and %d uploads past their retention; the next run "
            "tries again", jobs.failed, uploads.failed,
        )  # fmt: skip
    return {
        "jobs": jobs.purged,
        "jobs_failed": jobs.failed,
        "uploads": uploads.purged,
        "uploads_failed": uploads.failed,
    }


@shared_task(name="inference.prune_job_logs", ignore_result=True, soft_time_limit=600, time_limit=660)
def prune_job_logs_task() -> int:
    return _drain(prune_job_logs, PRUNE_BATCH_SIZE)


@shared_task(name="inference.archive_old_jobs", ignore_result=True, soft_time_limit=600, time_limit=660)
def archive_old_jobs_task() -> int:
    return _drain(archive_old_jobs, ARCHIVE_BATCH_SIZE)
