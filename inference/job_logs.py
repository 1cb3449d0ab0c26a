"""A job's log lines, as the queue status and the request pages show them."""

from __future__ import annotations

import uuid

from inference.job_events import publish_on_commit
from inference.models import JobLog


def log_job(job_id: uuid.UUID | str, message: str, *, level: str = "INFO", source: str = "platform") -> None:
    """Every move of a job writes a line, so the line also tells its waiters (``job_events``) to look again."""
    JobLog.objects.create(job_id=job_id, message=message, level=level, source=source)
    publish_on_commit(job_id)
