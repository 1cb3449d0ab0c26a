"""How jobs look from outside: fal's status and handle objects, queue positions, result errors."""

from __future__ import annotations

from typing import Any

from django.db.models import Q
from django.http import HttpRequest

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
    """0-based: the jobs that will start before this one on its GPU class.

    Never the job itself: a submission answers with the job it inserted, which the dispatcher may have sent on
    (DISPATCHED in the database) by the time this counts.
    """
    waiting_on_class = Job.objects.filter(status=JobStatus.DISPATCHED, gpu_class=job.gpu_class).exclude(pk=job.pk)
    if job.status == JobStatus.DISPATCHED:
        # Jobs dispatched together share dispatched_at and went to the broker in queue order.
        ahead = Q(dispatched_at__lt=job.dispatched_at) | Q(
            dispatched_at=job.dispatched_at, created_at__lt=job.created_at
        )
        return waiting_on_class.filter(ahead).count()
    if job.status == JobStatus.QUEUED:
        # Its tenant's queued jobs before it, then everything already sent to its class: one count, as the two sets
        # (QUEUED, DISPATCHED) never share a job.
        ahead_in_tenant = Q(organization_id=job.organization_id, status=JobStatus.QUEUED, created_at__lt=job.created_at)
        waiting = Q(status=JobStatus.DISPATCHED, gpu_class=job.gpu_class)
        return Job.objects.filter(ahead_in_tenant | waiting).exclude(pk=job.pk).count()
    return 0


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
