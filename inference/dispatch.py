"""Dispatch: an organization's queued jobs sent to the workers while it is under its concurrency limit."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from celery import current_app
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from accounts.locking import lock_organization, retrying_atomic
from inference.models import (
    ACTIVE_STATUSES,
    Job,
    JobStatus,
)

logger = logging.getLogger(__name__)

RUN_TASK = "inference.run_job"


def dispatch_organization(organization_id: uuid.UUID) -> int:
    """Sends this organization's oldest queued jobs to the workers while it is under its limit.

    The organization row is locked, so concurrent dispatchers cannot together exceed the limit.
    Jobs over the limit wait in QUEUED; a tenant's burst never fills another tenant's slots.
    """
    to_send = _dispatch(organization_id)
    return len(to_send)


@retrying_atomic
def _dispatch(organization_id: uuid.UUID) -> list[tuple[str, int, str]]:
    organization = lock_organization(organization_id)
    if organization is None or organization.is_suspended:
        return []
    active = Job.objects.filter(organization_id=organization_id, status__in=ACTIVE_STATUSES).count()
    capacity = organization.concurrency_limit - active
    if capacity <= 0:
        return []
    now = timezone.now()
    ids = list(
        Job.objects.filter(organization_id=organization_id, status=JobStatus.QUEUED)
        .exclude(start_deadline__lte=now)  # past its start deadline: the sweep ends it, it takes no slot
        .order_by("created_at", "id")
        .values_list("id", flat=True)[:capacity]
    )
    if not ids:
        return []
    Job.objects.filter(pk__in=ids, status=JobStatus.QUEUED).update(
        status=JobStatus.DISPATCHED, attempt=F("attempt") + 1, dispatched_at=now, sent_at=now
    )
    to_send = [
        (str(job_id), attempt, gpu_class)
        for job_id, attempt, gpu_class in Job.objects.filter(pk__in=ids, status=JobStatus.DISPATCHED)
        .order_by("created_at", "id")  # to the broker in the order they were queued
        .values_list("id", "attempt", "gpu_class")
    ]
    transaction.on_commit(lambda: send_run_messages(to_send), robust=True)
    return to_send


def send_run_messages(messages: list[tuple[str, int, str]]) -> None:
    """Hands dispatched jobs to the broker in order; after the first refusal the rest go back to the queue unsent.

    A broker that refused one message will refuse the next: trying each would cost every submission a timeout
    per waiting job while the broker is down. The sweep sends them all once it is back.
    """
    for index, (job_id, attempt, queue) in enumerate(messages):
        if not send_run_message(job_id, attempt, queue):
            for unsent_id, unsent_attempt, _ in messages[index + 1 :]:
                _back_to_queue(unsent_id, unsent_attempt)
            return


def send_run_message(job_id: str, attempt: int, queue: str) -> bool:
    """Hands a dispatched job to the broker. If the broker is down, the job goes back to the queue."""
    try:
        current_app.send_task(RUN_TASK, args=[job_id, attempt], queue=queue, retry=False)
    except Exception as exc:
        logger.warning("broker refused job %s attempt %s: %s; it waits for the next sweep", job_id, attempt, exc)
        _back_to_queue(job_id, attempt)
        return False
    return True


def _back_to_queue(job_id: str, attempt: int) -> None:
    Job.objects.filter(pk=job_id, status=JobStatus.DISPATCHED, attempt=attempt).update(
        status=JobStatus.QUEUED, attempt=attempt - 1, dispatched_at=None, sent_at=None
    )


def redispatch_stale() -> int:
    """Re-sends dispatched jobs no worker has claimed for a while: the broker may have lost them."""
    cutoff = timezone.now() - timedelta(seconds=settings.JOB_REDISPATCH_AFTER_SECONDS)
    stale = list(
        Job.objects.filter(status=JobStatus.DISPATCHED, sent_at__lt=cutoff)
        .order_by("dispatched_at", "created_at")  # oldest first, as they were queued
        .values_list("id", "attempt", "gpu_class")
    )
    for job_id, attempt, gpu_class in stale:
        # dispatched_at keeps the job's place in line (queue_position); sent_at says when it last went out.
        Job.objects.filter(pk=job_id, status=JobStatus.DISPATCHED, attempt=attempt).update(sent_at=timezone.now())
        if not send_run_message(str(job_id), attempt, gpu_class):
            break  # the broker is down: the rest stay dispatched for the next sweep
    return len(stale)
