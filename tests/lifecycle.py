"""Jobs driven through inference's services with no worker or broker: submitted, claimed as a worker claims
them and finished, so that billing writes its usage record, debit and rollups through the real services.

Callers patch ``inference.dispatch.send_run_message`` (no broker) and put a price in force themselves.
``tenant`` is the fixture of that name in tests/conftest.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum

from accounts.models import ApiKey, Organization
from inference import attempts, closing, dispatch, submission
from inference.models import ACTIVE_STATUSES, ActiveJobCount, AttemptOutcome, Endpoint, Job

SMALL = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}


def submit(
    organization: Organization, endpoint: Endpoint, *, api_key: ApiKey | None = None, end_user: str = "", **payload: Any
) -> Job:
    """A request for ``SMALL`` with ``payload`` laid over it (``end_user``: its X-Fal-End-User tag)."""
    job, _ = submission.submit_job(
        organization=organization, api_key=api_key, endpoint=endpoint, payload={**SMALL, **payload}, end_user=end_user
    )
    return job


def submit_as(tenant: dict[str, Any], endpoint: Endpoint, **payload: Any) -> Job:
    """``submit`` with the tenant's organization and API key."""
    return submit(tenant["organization"], endpoint, api_key=tenant["api_key"], **payload)


def start(job: Job) -> Job:
    """Dispatches the job (its on-commit hand-off never runs inside a test's transaction) and claims it."""
    dispatch.dispatch_organization(job.organization_id)
    job.refresh_from_db()
    claimed = attempts.claim_job(job_id=str(job.pk), attempt=job.attempt, worker="worker-1")
    assert claimed is not None, f"{job.pk} could not be claimed ({job.status})"
    return claimed


def finish(
    job: Job, outcome: str = AttemptOutcome.SUCCEEDED, *, gpu_ms: int = 1_000, reserve: bool = True, **kwargs: Any
) -> Job:
    """Closes the running attempt as a worker does, with one 64x64 image per requested image on success.

    ``reserve``: first extend the job's hold to cover ``gpu_ms``, as a worker does step by step (credit allowing;
    without it, settlement bills only what the hold covers). ``kwargs`` go to ``finish_attempt`` as they are:
    ``cold_start_ms``, ``error``, ``error_type``, ``retry``, or a ``result`` of the caller's own.
    """
    if reserve:
        attempts.reserve_work(job=job, gpu_ms=gpu_ms)
    if outcome == AttemptOutcome.SUCCEEDED:
        images = [{"url": "x", "width": 64, "height": 64}] * int(job.input.get("num_images", 1))
        kwargs.setdefault("result", {"images": images, "seed": 1})
    finished = closing.finish_attempt(
        job_id=str(job.pk), attempt=job.attempt, outcome=AttemptOutcome(outcome), gpu_ms=gpu_ms, **kwargs
    )
    assert finished is not None
    return finished


def run(organization: Organization, endpoint: Endpoint, *, api_key: ApiKey | None = None, **kwargs: Any) -> Job:
    """A request for ``SMALL`` submitted, started and finished; ``kwargs`` go to ``finish`` (``outcome``,
    ``gpu_ms``...): it succeeds unless ``outcome`` says otherwise."""
    return finish(start(submit(organization, endpoint, api_key=api_key)), **kwargs)


def run_as(tenant: dict[str, Any], endpoint: Endpoint, **kwargs: Any) -> Job:
    """``run`` with the tenant's organization and API key."""
    return run(tenant["organization"], endpoint, api_key=tenant["api_key"], **kwargs)


def active_counts(organization_id: Any) -> tuple[int, int]:
    """The organization's active jobs as the dispatch reads them (on PostgreSQL the sum of the rows the jobs table's
    triggers keep; elsewhere the count) and as the jobs count them: the two must agree."""
    counted = counted_active(organization_id)
    if connection.vendor != "postgresql":
        return counted, counted
    return summed_active(organization_id), counted


def counted_active(organization_id: Any) -> int:
    """The organization's jobs that count against its concurrency limit (DISPATCHED, RUNNING), counted in one
    statement (one snapshot)."""
    return Job.objects.filter(organization_id=organization_id, status__in=ACTIVE_STATUSES).count()


def summed_active(organization_id: Any) -> int:
    """The sum of the organization's rows that the jobs table's triggers keep (PostgreSQL)."""
    total = ActiveJobCount.objects.filter(organization_id=organization_id).aggregate(total=Sum("jobs"))["total"]
    return int(total or 0)


def on_postgresql_in_transactions(why_not_elsewhere: str) -> list[pytest.MarkDecorator]:
    """A module's marks for tests of what runs on PostgreSQL alone (``why_not_elsewhere``: what SQLite does instead),
    with transactions of their own (the code under test commits) and a price in force with no broker."""
    return [
        pytest.mark.django_db(transaction=True),
        pytest.mark.usefixtures("priced_without_broker"),
        pytest.mark.skipif(connection.vendor != "postgresql", reason=why_not_elsewhere),
    ]
