"""A job's log lines, as the queue status and the request pages show them."""

from __future__ import annotations

import uuid

from inference.models import JobLog


def log_job(job_id: uuid.UUID | str, message: str, *, level: str = "INFO", source: str = "platform") -> None:
    JobLog.objects.create(job_id=job_id, message=message, level=level, source=source)
