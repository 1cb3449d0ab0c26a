"""How jobs look from outside: fal's status and handle objects, queue positions, result errors."""

from __future__ import annotations

import functools
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.http import HttpRequest

from accounts import statements
from inference.hooks import Usage, hooks
from inference.models import Job, JobLog, JobStatus

# fal's client knows three statuses; failed and cancelled requests are COMPLETED with an error.
FAL_STATUS = {
    JobStatus.QUEUED: "IN_QUEUE",
    JobStatus.DISPATCHED: "IN_QUEUE",
    JobStatus.RUNNING: "IN_PROGRESS",
    JobStatus.COMPLETED: "COMPLETED",
    JobStatus.FAILED: "COMPLETED",
    JobStatus.CANCELLED: "COMPLETED",
}

# The HTTP status of a result URL whose request did not produce an output.
RESULT_ERROR_STATUS = {
    "cancelled": 400,
    "image_load_error": 422,
    "image_too_large": 413,
    "insufficient_credits": 402,
    "spend_limit_exceeded": 402,
    "timeout": 504,
    "model_unavailable": 503,
}


def queue_position(job: Job) -> int:
    """0-based: the jobs that will start before this one on its GPU class, by its row as the database has it now.

    DISPATCHED: the jobs of its class dispatched before it; jobs dispatched together share ``dispatched_at`` and went
    to the broker in queue order, so ``created_at`` breaks the tie. QUEUED: its organization's queued jobs created
    before it, and every dispatched job of its class. Any other status: 0. Never the job itself. ``job``'s own status
    only says whether to ask: a job read as waiting may have been dispatched, or started, since it was read.

    Every status read of a waiting request asks this (a submission reads it in its own query:
    ``position_statement``), so the count is SQL written once per database vendor (``_position_sql``) and only its
    parameters are prepared per call. Built with the ORM on each call (Q objects, ``exclude``, compiling), the same
    count took about 17% of the web process's CPU per submission (py-spy --gil, PostgreSQL), nearly all of it in
    Python, not in the database: about 1 to 1.7 ms of CPU per call, against 0.15 to 0.3 ms as SQL (a few hundred jobs
    dispatched to the class).
    """
    if job.status not in (JobStatus.QUEUED, JobStatus.DISPATCHED):
        return 0
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        statements.in_turn(cursor, position_statement(job.pk), plan_once=True)  # planned once per connection
        found = cursor.fetchone()
    return 0 if found is None else int(found[0])


def position_statement(job_id: Any) -> statements.Statement:
    """``queue_position``'s count for the job ``job_id`` as a statement of a caller's query (``accounts.statements``):
    one row, its position (none if the job is gone)."""
    database = connections[DEFAULT_DB_ALIAS]  # looked up once: ``connection`` looks it up again on each use
    parameters = {
        "job": _JOB_FIELDS["id"].get_db_prep_value(job_id, database),
        "queued": _JOB_FIELDS["status"].get_db_prep_value(JobStatus.QUEUED, database),
        "dispatched": _JOB_FIELDS["status"].get_db_prep_value(JobStatus.DISPATCHED, database),
    }
    return _position_sql(database.vendor), parameters


_JOB_FIELDS = {field.name: field for field in Job._meta.concrete_fields}

# Names in braces are Job's table and columns (``_position_sql`` fills them in); %(...)s are parameters; ``j`` is the
# job, ``o`` the others. The DISPATCHED count's ``dispatched_at <=`` follows from its OR; it lets PostgreSQL read one
# range of the (status, gpu_class, dispatched_at) index instead of OR-ing two scans of it. The QUEUED count: the two
# sets (QUEUED, DISPATCHED) never share a job, so one count of either is their sum. Only the branch of the job's
# status is counted.
_POSITION = (
    "SELECT CASE j.{status} "
    "WHEN %(dispatched)s THEN (SELECT COUNT(*) FROM {table} o WHERE o.{status} = %(dispatched)s "
    "AND o.{gpu_class} = j.{gpu_class} AND o.{dispatched_at} <= j.{dispatched_at} "
    "AND (o.{dispatched_at} < j.{dispatched_at} OR (o.{dispatched_at} = j.{dispatched_at} "
    "AND o.{created_at} < j.{created_at})) AND o.{id} <> j.{id}) "
    "WHEN %(queued)s THEN (SELECT COUNT(*) FROM {table} o "
    "WHERE ((o.{organization} = j.{organization} AND o.{status} = %(queued)s AND o.{created_at} < j.{created_at}) "
    "OR (o.{status} = %(dispatched)s AND o.{gpu_class} = j.{gpu_class})) AND o.{id} <> j.{id}) "
    "ELSE 0 END FROM {table} j WHERE j.{id} = %(job)s"
)


@functools.cache
def _position_sql(vendor: str) -> str:
    """``queue_position``'s count in this vendor's SQL (every connection of a vendor quotes names alike)."""
    quote = connection.ops.quote_name
    names = {name: quote(str(field.column)) for name, field in _JOB_FIELDS.items()}  # concrete: never None
    names["table"] = quote(Job._meta.db_table)
    return _POSITION.format(**names)


def base_url(request: HttpRequest) -> str:
    return f"{request.scheme}://{request.get_host()}"


def handle_urls(job: Job, request: HttpRequest) -> dict[str, str]:
    """fal's client also builds these itself as ``{queue}/{owner}/{name}/requests/{id}`` (no sub-path)."""
    root = f"{base_url(request)}/queue/{job.endpoint.app_id}/requests/{job.id}"
    return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}


def logs_of(job: Job) -> list[dict[str, Any]]:
    return [entry.as_fal() for entry in JobLog.objects.filter(job_id=job.id).order_by("id")]


def logs_after(job: Job, last_id: int) -> tuple[list[dict[str, Any]], int]:
    """The job's log lines written after the line ``last_id`` (0: all of them), and the id of the last one."""
    entries = list(JobLog.objects.filter(job_id=job.id, id__gt=last_id).order_by("id"))
    return [entry.as_fal() for entry in entries], (entries[-1].id if entries else last_id)


def planned_steps(job_input: dict[str, Any]) -> int:
    """The denoising steps a job's input asks for: all of them, or image to image's share (``strength``) of them."""
    steps = int(job_input.get("num_inference_steps") or 0)
    strength = job_input.get("strength")
    if strength is None:
        return steps
    return min(int(steps * float(strength)), steps)


def progress_of(job: Job) -> dict[str, int]:
    """Step k of n; before the worker reports its first step, n is the steps the input plans."""
    return {"step": job.progress_step, "total": job.progress_total or planned_steps(job.input)}


def usage_of(job: Job) -> Usage | None:
    if not job.is_final or hooks.usage is None:
        return None
    return hooks.usage(job)


def status_payload(
    job: Job, request: HttpRequest, *, with_logs: bool, logs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """fal's status object. ``logs``: the lines to show (the status streams send only new ones); all by default."""
    status = FAL_STATUS[JobStatus(job.status)]
    payload: dict[str, Any] = {
        "status": status,
        "request_id": str(job.id),
        **handle_urls(job, request),
        "logs": (logs_of(job) if logs is None else logs) if with_logs else None,
    }
    if status == "IN_QUEUE":
        payload["queue_position"] = queue_position(job)
    elif status == "IN_PROGRESS":
        payload["progress"] = progress_of(job)
    else:
        payload["metrics"] = {"inference_time": round(job.gpu_ms / 1000, 3)} if job.gpu_ms else {}
        payload["error"] = job.error or None
        payload["error_type"] = job.error_type or None
    payload["usage"] = usage_of(job)
    return payload


def result_error(job: Job) -> tuple[int, dict[str, Any]]:
    """The answer of a result URL for a request that ended without an output."""
    status = RESULT_ERROR_STATUS.get(job.error_type, 500)
    return status, {"detail": job.error or "The request failed.", "error_type": job.error_type or "internal_error"}
