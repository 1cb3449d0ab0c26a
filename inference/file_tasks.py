"""Retention: the periodic purge of outputs past their expiry and of old jobs' log lines (scheduled in
CELERY_BEAT_SCHEDULE)."""

from __future__ import annotations

from celery import shared_task

from inference.files import PURGE_BATCH_SIZE, purge_expired_outputs
from inference.job_logs import PRUNE_BATCH_SIZE, prune_job_logs

# Batches per run: the hourly run keeps up with this many expiring jobs an hour, and a backlog
# drains over the next runs instead of holding one task for long.
MAX_BATCHES_PER_RUN = 25


@shared_task(name="inference.purge_expired_outputs", ignore_result=True, soft_time_limit=600, time_limit=660)
def purge_expired_outputs_task() -> int:
    purged = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        batch = purge_expired_outputs(limit=PURGE_BATCH_SIZE)
        purged += batch
        if batch < PURGE_BATCH_SIZE:
            break
    return purged


@shared_task(name="inference.prune_job_logs", ignore_result=True, soft_time_limit=600, time_limit=660)
def prune_job_logs_task() -> int:
    pruned = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        batch = prune_job_logs(limit=PRUNE_BATCH_SIZE)
        pruned += batch
        if batch < PRUNE_BATCH_SIZE:
            break
    return pruned
