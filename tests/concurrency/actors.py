"""What each actor process does in a round, through the platform's own services.

Each actor is a function of JSON-able arguments that loads its rows (before the barrier) and returns the call to
make once the actors are released; that call answers a small dict of plain values: the service's answer and what the
actor read right after it, in a statement of its own (so after its transaction committed).

Imported only in actor processes, after ``django.setup()``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from accounts.models import ApiKey, Organization, Scope, User
from accounts.services import create_api_key
from billing import controls, end_users
from billing.ledger import BillingError, grant_credits, refund_job
from inference import attempts, closing, submission
from inference.dispatch import dispatch_organization
from inference.models import AttemptOutcome, Endpoint, Job
from tests.concurrency.harness import Act
from tests.lifecycle import SMALL, counted_active


def idle() -> Act:
    """Takes part in the barrier and does nothing (a round with fewer calls than processes)."""
    return lambda: None


def cancel(*, job_id: str) -> Act:
    """``cancel_job`` as the API's cancel endpoint calls it, then the job's state as the caller could read it next."""
    job = Job.objects.get(pk=job_id)

    def act() -> dict[str, Any]:
        answer = closing.cancel_job(job=job)
        seen = Job.objects.values("status", "attempt", "cancel_requested_at").get(pk=job_id)
        return {
            "answer": answer,
            "seen_status": seen["status"],
            "seen_attempt": seen["attempt"],
            "seen_cancel_requested": seen["cancel_requested_at"] is not None,
            "active_after": counted_active(job.organization_id),
        }

    return act


def finish(*, job_id: str, attempt: int, outcome: str = AttemptOutcome.SUCCEEDED, retry: bool = False) -> Act:
    """The worker closing its attempt: succeeded with one image per requested image, or failed (``retry``: the
    platform's fault, so the job may run again)."""
    job = Job.objects.get(pk=job_id)
    kwargs: dict[str, Any] = {"gpu_ms": 1_500, "cold_start_ms": 0, "retry": retry}
    # The hold grew to cover the work before it was done, as the worker reserves step by step (tests.lifecycle.finish).
    attempts.reserve_work(job=job, gpu_ms=kwargs["gpu_ms"])
    if outcome == AttemptOutcome.SUCCEEDED:
        images = [{"url": "x", "width": 64, "height": 64}] * int(job.input.get("num_images", 1))
        kwargs["result"] = {"images": images, "seed": 1}
    else:
        kwargs.update(error="The GPU fell off the bus.", error_type="internal_error")

    def act() -> dict[str, Any]:
        closed = closing.finish_attempt(job_id=job_id, attempt=attempt, outcome=AttemptOutcome(outcome), **kwargs)
        return {
            "closed": closed is not None,
            "status": closed.status if closed is not None else None,
            "active_after": counted_active(job.organization_id),
        }

    return act


def claim(*, job_id: str, attempt: int, worker: str) -> Act:
    """A worker taking the job's message: ``claim_job`` as ``inference.worker.execute`` calls it (no transaction
    open: one statement on PostgreSQL)."""

    def act() -> dict[str, Any]:
        claimed = attempts.claim_job(job_id=job_id, attempt=attempt, worker=worker)
        return {"claimed": claimed is not None, "worker": worker}

    return act


def reap() -> Act:
    """The sweep's reaper: closes the attempts whose lease expired and retries or fails their jobs."""
    return lambda: {"reaped": closing.reap_expired_leases()}


def submit(*, organization_id: str, endpoint_id: int, api_key_id: str | None = None, end_user: str = "") -> Act:
    """A new request of ``tests.lifecycle.SMALL`` (its on-commit hand-off dispatches the organization), sent with
    the API key ``api_key_id`` or none, tagged ``end_user`` or not."""
    organization = Organization.objects.get(pk=organization_id)
    endpoint = Endpoint.objects.get(pk=endpoint_id)
    api_key = ApiKey.objects.get(pk=api_key_id) if api_key_id else None

    def act() -> dict[str, Any]:
        try:
            job, _ = submission.submit_job(
                organization=organization, api_key=api_key, endpoint=endpoint, payload=SMALL, end_user=end_user
            )
        except submission.SubmissionRefused as refused:
            return {"refused": refused.error_type, "active_after": counted_active(organization_id)}
        return {"job_id": str(job.pk), "active_after": counted_active(organization_id)}

    return act


def submit_ahead(*, organization_id: str, endpoint_id: int, job_id: str) -> Act:
    """``submit`` whose job takes the id ``job_id`` (known to the round's workers beforehand, as its message will
    make it known to them): its message goes ahead of its commit where the organization has room."""
    act = submit(organization_id=organization_id, endpoint_id=endpoint_id)
    chosen = uuid.UUID(job_id)

    def with_its_id() -> dict[str, Any]:
        real = submission.uuid.uuid4
        submission.uuid.uuid4 = lambda: chosen  # type: ignore[assignment]  # the one new id this call makes
        try:
            return act()
        finally:
            submission.uuid.uuid4 = real  # type: ignore[assignment]

    return with_its_id


def claim_ahead(*, job_id: str, worker: str) -> Act:
    """A worker taking a job's message sent ahead of its submission's commit, as ``inference.worker.execute`` does."""

    def act() -> dict[str, Any]:
        # Released as the message is sent: when it was sent, as the message says.
        claimed = attempts.claim_message(job_id=job_id, attempt=1, worker=worker, ahead=time.time())
        return {"claimed": claimed is not None, "worker": worker}

    return act


def dispatch(*, organization_id: str) -> Act:
    """The dispatcher (as the sweep and every on-commit hand-off call it)."""

    def act() -> dict[str, Any]:
        sent = dispatch_organization(uuid.UUID(organization_id))
        return {"dispatched": sent, "active_after": counted_active(organization_id)}

    return act


def refund(*, job_id: str) -> Act:
    """An operator refunding a finished request; a second refund is answered with ``BillingError``, not made."""
    job = Job.objects.select_related("organization").get(pk=job_id)

    def act() -> dict[str, Any]:
        try:
            entry = refund_job(job=job, reason="race")
        except BillingError as refused:
            return {"refunded": False, "reason": str(refused)}
        return {"refunded": True, "entry_id": entry.pk, "amount_micros": entry.amount_micros}

    return act


def key_limit(*, api_key_id: str, monthly_limit_micros: int) -> Act:
    """A customer setting a monthly spending limit on an API key."""
    api_key = ApiKey.objects.get(pk=api_key_id)

    def act() -> dict[str, Any]:
        controls.set_key_limit(api_key=api_key, monthly_limit_micros=monthly_limit_micros)
        return {"monthly_limit_micros": monthly_limit_micros}

    return act


def member_limit(*, organization_id: str, user_id: int, monthly_limit_micros: int) -> Act:
    """A billing manager setting the monthly limit of a member, which every key the member made shares."""
    organization = Organization.objects.get(pk=organization_id)
    user = User.objects.get(pk=user_id)

    def act() -> dict[str, Any]:
        controls.set_member_limit(organization=organization, user=user, monthly_limit_micros=monthly_limit_micros)
        return {"monthly_limit_micros": monthly_limit_micros}

    return act


def new_key_submit(*, organization_id: str, endpoint_id: int, user_id: int) -> Act:
    """A member making a new API key (in its own transaction, as the dashboard does) and submitting through it."""
    organization = Organization.objects.get(pk=organization_id)
    user = User.objects.get(pk=user_id)

    def act() -> dict[str, Any]:
        api_key, _ = create_api_key(organization=organization, name="new", scopes=[Scope.INFERENCE], created_by=user)
        answer = submit(organization_id=organization_id, endpoint_id=endpoint_id, api_key_id=str(api_key.pk))()
        return {**answer, "api_key_id": str(api_key.pk)}

    return act


def end_user_limit(*, organization_id: str, end_user: str, monthly_limit_micros: int) -> Act:
    """A reseller setting a monthly spending limit on one of its end user tags."""
    organization = Organization.objects.get(pk=organization_id)

    def act() -> dict[str, Any]:
        end_users.set_end_user_limit(
            organization=organization, end_user=end_user, monthly_limit_micros=monthly_limit_micros
        )
        return {"monthly_limit_micros": monthly_limit_micros}

    return act


def grant(*, organization_id: str, amount_micros: int) -> Act:
    """An operator granting credits."""
    organization = Organization.objects.get(pk=organization_id)

    def act() -> dict[str, Any]:
        entry = grant_credits(organization=organization, amount_micros=amount_micros, reason="race")
        return {"entry_id": entry.pk, "amount_micros": entry.amount_micros}

    return act


ACTORS: dict[str, Any] = {
    "idle": idle,
    "cancel": cancel,
    "finish": finish,
    "reap": reap,
    "claim": claim,
    "submit": submit,
    "submit_ahead": submit_ahead,
    "claim_ahead": claim_ahead,
    "dispatch": dispatch,
    "refund": refund,
    "grant": grant,
    "key_limit": key_limit,
    "end_user_limit": end_user_limit,
    "member_limit": member_limit,
    "new_key_submit": new_key_submit,
}
