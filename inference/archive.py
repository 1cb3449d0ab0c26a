"""Old requests, archived: what a request carried goes after ``JOB_RETENTION_DAYS``; the row the money trail points
at stays.

A job row is small but for what the caller sent (a prompt, an image as a data URI, megabytes at worst) and what the
platform kept for it (webhook deliveries with their bodies; log lines and output files have shorter retentions of
their own: inference/job_logs.py, inference/files.py). At a million requests a day that is most of the table.

Past the retention period, an ended job whose outputs are already purged is **archived**: its input keeps only its
settings (numbers, switches and enum-like words such as ``output_format``: what billing's resolution tiers and the
progress figures read), never free text, URLs or paths; its webhook delivery rows are deleted; ``archived_at`` is
stamped, and an archived job is never run again (requeue refuses it). The row itself stays: usage records and
credit entries point at it (``on_delete=PROTECT``), and the books are proved against it every week. A job that never
started has no such records: it is deleted outright (with its released hold and log lines).

The hourly retention task (inference/file_tasks.py) calls ``archive_old_jobs`` a batch at a time, oldest first.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import ProtectedError, QuerySet
from django.utils import timezone

from accounts.locking import locked
from inference.models import FINAL_STATUSES, Job, WebhookDelivery

ARCHIVE_BATCH_SIZE = 1_000
# A string setting kept in an archived input: a short lowercase token ("png", "16:9", "landscape_4_3"), not text.
_SETTING = re.compile(r"^[a-z0-9_:.\-]{1,32}$")
# A field's name as the API's inputs spell them (snake_case); anything else is data, not a setting.
_FIELD = re.compile(r"^[a-z0-9_]{1,64}$")
# Fields whose values are what the caller wrote or pointed at, whatever they look like.
_FREE_TEXT = re.compile(r"prompt|text|lyrics|url|path|uri|caption|name")


def archived_input(payload: Any) -> dict[str, Any]:
    """The settings of a request's input, without anything the caller wrote or pointed at."""
    if not isinstance(payload, dict):
        return {}
    kept: dict[str, Any] = {}
    for key, value in payload.items():
        if not isinstance(key, str) or not _FIELD.match(key) or _FREE_TEXT.search(key):
            continue
        if isinstance(value, dict):
            value = archived_input(value)
            if not value:
                continue
        elif isinstance(value, list):
            if not all(isinstance(item, (bool, int, float)) for item in value):
                continue
        elif isinstance(value, str):
            if not _SETTING.match(value):
                continue
        elif value is not None and not isinstance(value, (bool, int, float)):
            continue
        kept[key] = value
    return kept


def archive_old_jobs(now: datetime | None = None, *, limit: int = ARCHIVE_BATCH_SIZE) -> int:
    """Archives (or deletes, if never started) up to ``limit`` jobs that ended before the retention period and whose
    outputs are purged; returns how many. Oldest first, through the index of jobs not yet archived."""
    now = now or timezone.now()
    due = list(_due(now).order_by("finished_at", "id").values_list("id", "started_at")[:limit])
    if not due:
        return 0
    never_started = [job_id for job_id, started_at in due if started_at is None]
    deleted = _delete(never_started, now)
    started = [job_id for job_id, started_at in due if started_at is not None or job_id not in deleted]
    return len(deleted) + sum(_archive(job_id, now) for job_id in started)


def _due(now: datetime) -> QuerySet[Job]:
    """The jobs due for the archive at ``now``: ended before the retention period, their outputs purged, not archived.

    Read once to pick a batch, and again on each job once it is locked (``_delete``, ``_archive``): an operator may
    requeue one in between (``inference.requeue``), and a requeued job is QUEUED with a new hold and its input to
    run. Deleted on the first reading, its hold went with it and the account's held amount never came down (that
    credit unavailable for good); archived on it, it would run without its prompt."""
    return Job.objects.filter(
        archived_at__isnull=True,
        status__in=FINAL_STATUSES,
        finished_at__lt=now - timedelta(days=settings.JOB_RETENTION_DAYS),
        outputs_expire_at__isnull=True,  # an organization that keeps outputs longer keeps the request with them
    )


def _delete(job_ids: list[Any], now: datetime) -> set[Any]:
    """Deletes the jobs that never started and are still due once locked; returns the ids deleted. One the books point
    at after all is archived. (Django's ``delete()`` reads the rows, then deletes them by id: the lock keeps a
    requeue from committing in between.)"""
    if not job_ids:
        return set()
    try:
        return _delete_locked(job_ids, now)
    except ProtectedError:
        deleted: set[Any] = set()
        for job_id in job_ids:
            try:
                deleted |= _delete_locked([job_id], now)
            except ProtectedError:
                continue
        return deleted


@transaction.atomic
def _delete_locked(job_ids: list[Any], now: datetime) -> set[Any]:
    # Several jobs are locked in ``created_at, id`` order (``accounts.locking``).
    due = locked(_due(now).filter(pk__in=job_ids, started_at__isnull=True)).order_by("created_at", "id")
    locked_ids = set(due.values_list("id", flat=True))
    if locked_ids:
        Job.objects.filter(pk__in=locked_ids).delete()
    return locked_ids


@transaction.atomic
def _archive(job_id: Any, now: datetime) -> int:
    """Archives the job if it is still due once locked (``_due``)."""
    job = locked(_due(now).filter(pk=job_id)).only("id", "input").first()
    if job is None:
        return 0
    WebhookDelivery.objects.filter(job_id=job_id).delete()
    return Job.objects.filter(pk=job_id, archived_at__isnull=True).update(
        input=archived_input(job.input), archived_at=now
    )
