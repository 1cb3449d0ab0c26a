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
from django.db.models import ProtectedError
from django.utils import timezone

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
    cutoff = now - timedelta(days=settings.JOB_RETENTION_DAYS)
    due = list(
        Job.objects.filter(
            archived_at__isnull=True,
            status__in=FINAL_STATUSES,
            finished_at__lt=cutoff,
            outputs_expire_at__isnull=True,  # an organization that keeps outputs longer keeps the request with them
        )
        .order_by("finished_at", "id")
        .values_list("id", "started_at")[:limit]
    )
    if not due:
        return 0
    never_started = [job_id for job_id, started_at in due if started_at is None]
    deleted = _delete(never_started)
    started = [job_id for job_id, started_at in due if started_at is not None or job_id not in deleted]
    return len(deleted) + sum(_archive(job_id, now) for job_id in started)


def _delete(job_ids: list[Any]) -> set[Any]:
    """Deletes the jobs that never started; returns the ids deleted. One the books point at after all is archived."""
    if not job_ids:
        return set()
    try:
        with transaction.atomic():
            Job.objects.filter(pk__in=job_ids, started_at__isnull=True, archived_at__isnull=True).delete()
        return set(job_ids)
    except ProtectedError:
        deleted = set()
        for job_id in job_ids:
            try:
                with transaction.atomic():
                    Job.objects.filter(pk=job_id, started_at__isnull=True, archived_at__isnull=True).delete()
                deleted.add(job_id)
            except ProtectedError:
                continue
        return deleted


@transaction.atomic
def _archive(job_id: Any, now: datetime) -> int:
    job = Job.objects.select_for_update().filter(pk=job_id, archived_at__isnull=True).only("id", "input").first()
    if job is None:
        return 0
    WebhookDelivery.objects.filter(job_id=job_id).delete()
    return Job.objects.filter(pk=job_id, archived_at__isnull=True).update(
        input=archived_input(job.input), archived_at=now
    )
