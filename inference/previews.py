"""The latest preview of each streamed job, kept in the shared cache where the web process reads it.

Only jobs submitted through a ``/stream`` route carry ``PREVIEWS_FLAG`` in their input; the worker draws previews for
those alone (``inference.engine.previews``), and publishes the latest one here, replacing the one before. A short
lifetime: a preview matters only while its job runs. Without a shared cache (no REDIS_URL, where each process keeps
its own memory) a stream gets no previews; its progress and output come from the database as always.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.core.cache import cache

from inference import job_events

# The key in a job's input that asks the worker for previews.
PREVIEWS_FLAG = "stream_previews"
PREVIEW_TTL_SECONDS = 60


def _key(job_id: uuid.UUID | str) -> str:
    return f"inference:preview:{job_id}"


def publish_preview(job_id: uuid.UUID | str, preview: dict[str, Any]) -> None:
    """``preview``: ``{step, total, images: [{url, width, height, content_type}]}``."""
    cache.set(_key(job_id), preview, PREVIEW_TTL_SECONDS)
    job_events.publish(job_id)  # its stream sends it now


def latest_preview(job_id: uuid.UUID | str) -> dict[str, Any] | None:
    found = cache.get(_key(job_id))
    return found if isinstance(found, dict) else None
