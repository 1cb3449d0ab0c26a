"""The job lifecycle: submit, dispatch, claim, heartbeat, finish, reap, cancel, requeue.

Every transition is one conditional UPDATE on the job row, checked by its row count
(healthchecks' sendalerts), so two processes can never both move the same job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import current_app
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Min, Value
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from accounts.errors import AppError
from accounts.locking import lock_organization, retrying_atomic
from accounts.models import ApiKey, Organization
from inference import files, transitions
from inference.hooks import Refusal, Reservation, hooks
from inference.inputs import is_storable_text, validate_input
from inference.locks import lock_attempt, lock_job, lock_job_with_endpoint
from inference.models import (
    ACTIVE_STATUSES,
    AttemptOutcome,
    Endpoint,
    Job,
    JobAttempt,
    JobLog,
    JobStatus,
    WebhookDelivery,
)
from inference.webhooks import WebhookUrlError, check_webhook_url

logger = logging.getLogger(__name__)

RUN_TASK = "inference.run_job"


class SubmissionRefused(AppError):
    """The request was not queued, and nothing of it was stored: not enough credit, a spend limit, a refused
    webhook URL."""

    status_code = 402

    @classmethod
    def of(cls, refusal: Refusal) -> SubmissionRefused:
        return cls(refusal.detail, error_type=refusal.error_type, status_code=refusal.status_code)


class RequeueRefused(SubmissionRefused):
    """A failed or cancelled job was not queued again (credits, a spend limit, a suspended organization, a revoked API
    key); it was left as it was."""


class IdempotencyConflict(SubmissionRefused):
    def __init__(self) -> None:
        super().__init__(
            "This Idempotency-Key was already used with a different request body or endpoint.",
            error_type="idempotency_key_reused",
            status_code=422,
        )


def log_job(job_id: uuid.UUID | str, message: str, *, level: str = "INFO", source: str = "platform") -> None:
    JobLog.objects.create(job_id=job_id, message=message, level=level, source=source)


def _fingerprint(endpoint: Endpoint, payload: Any, webhook_url: str) -> str:
    canonical = json.dumps([endpoint.endpoint_id, payload, webhook_url], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_job(
    *,
    organization: Organization,
    api_key: ApiKey | None,
    endpoint: Endpoint,
    payload: Any,
    webhook_url: str = "",
    idempotency_key: str | None = None,
    retention_seconds: int | None = None,
) -> tuple[Job, bool]:
    """The job for this request and whether it is new (False: an earlier one with the same key).

    Raises ``InputError`` (422/413) or ``SubmissionRefused`` (402, 422...). Nothing is stored
    for a refused request.
    """
    fingerprint = _fingerprint(endpoint, payload, webhook_url)
    if idempotency_key:
        earlier = _same_key(organization, idempotency_key, fingerprint)
        if earlier is not None:
            return earlier, False
    generation, inline_image = validate_input(endpoint, payload, organization_id=organization.pk)
    if webhook_url:
        if not is_storable_text(webhook_url):
            raise SubmissionRefused(
                "webhook_url holds characters no URL has.", error_type="invalid_webhook_url", status_code=422
            )
        try:
            check_webhook_url(webhook_url)
        except WebhookUrlError as exc:
            raise SubmissionRefused(str(exc), error_type="invalid_webhook_url", status_code=422) from None
    job_id = uuid.uuid4()
    job_input = generation.as_json()
    if retention_seconds is not None:
        job_input["retention_seconds"] = retention_seconds
    if inline_image is not None:
        job_input["image_path"] = files.save_input_image(organization.pk, job_id, inline_image)
    try:
        job = _insert_and_admit(
            Job(
                id=job_id,
                organization=organization,
                api_key=api_key,
                endpoint=endpoint,
                gpu_class=endpoint.gpu_class,
                input=job_input,
                webhook_url=webhook_url,
                idempotency_key=idempotency_key or None,
                request_fingerprint=fingerprint,
                max_attempts=settings.JOB_MAX_ATTEMPTS,
            )
        )
    except IntegrityError:
        # Another request with the same Idempotency-Key won the race: answer with its job.
        earlier = _same_key(organization, idempotency_key, fingerprint) if idempotency_key else None
        if earlier is None:
            raise
        return earlier, False
    return job, True


@retrying_atomic
def _insert_and_admit(job: Job) -> Job:
    job.save(force_insert=True)
    if hooks.admit is not None:
        # After the insert, so billing can hold credit against the job; a refusal rolls it back.
        refusal = hooks.admit(job)
        if refusal is not None:
            raise SubmissionRefused.of(refusal)
    log_job(job.id, f"Request queued for {job.endpoint.endpoint_id}.")
    organization_id = job.organization_id
    transaction.on_commit(lambda: dispatch_organization(organization_id), robust=True)
    return job


def _same_key(organization: Organization, idempotency_key: str, fingerprint: str) -> Job | None:
    earlier = Job.objects.filter(organization=organization, idempotency_key=idempotency_key).first()
    if earlier is not None and earlier.request_fingerprint != fingerprint:
        raise IdempotencyConflict()
    return earlier


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
    ids = list(
        Job.objects.filter(organization_id=organization_id, status=JobStatus.QUEUED)
        .order_by("created_at", "id")
        .values_list("id", flat=True)[:capacity]
    )
    if not ids:
        return []
    now = timezone.now()
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


def lease_deadline() -> Any:
    return timezone.now() + timedelta(seconds=settings.JOB_LEASE_SECONDS)


def claim_job(*, job_id: str, attempt: int, worker: str) -> Job | None:
    """The job, now RUNNING on this worker, or None if another message (or a cancel) got there first."""
    if not _claim(job_id, attempt, worker):
        return None
    return Job.objects.select_related("endpoint", "organization").get(pk=job_id)


@retrying_atomic
def _claim(job_id: str, attempt: int, worker: str) -> bool:
    now = timezone.now()
    claimed = Job.objects.filter(pk=job_id, status=JobStatus.DISPATCHED, attempt=attempt).update(
        status=JobStatus.RUNNING,
        worker=worker,
        lease_expires_at=lease_deadline(),
        started_at=Coalesce(F("started_at"), Value(now)),
        progress_step=0,
        progress_total=0,
    )
    if not claimed:
        return False
    JobAttempt.objects.create(job_id=job_id, number=attempt, worker=worker, started_at=now, heartbeat_at=now)
    log_job(job_id, f"Attempt {attempt} started on {worker}.", source="worker")
    return True


def claim_batch_companions(
    *, job: Job, worker: str, room: int, compatible: Callable[[dict[str, Any]], bool], scan: int = 32
) -> list[Job]:
    """Other dispatched jobs of `job`'s endpoint that can run in the same pipeline call, claimed for this worker.

    Oldest first, while their images fit in `room` (images the batch can still take). Each is claimed on its own with
    `claim_job`'s conditional UPDATE, so it gets its own attempt, lease and heartbeat; its Celery message, when it
    arrives, finds the job taken and does nothing. Only jobs already dispatched are taken: the tenant's concurrency
    limit, which counts them as active, still holds.
    """
    candidates = (
        Job.objects.filter(endpoint_id=job.endpoint_id, gpu_class=job.gpu_class, status=JobStatus.DISPATCHED)
        .exclude(pk=job.pk)
        .order_by("dispatched_at", "created_at", "id")
        .values_list("id", "attempt", "input")[:scan]
    )
    companions: list[Job] = []
    for companion_id, attempt, job_input in candidates:
        count = len(job_input.get("seeds") or ())
        if not count or count > room or not compatible(job_input):
            continue
        claimed = claim_job(job_id=str(companion_id), attempt=attempt, worker=worker)
        if claimed is None:
            continue  # another worker (or a cancel) got there first
        companions.append(claimed)
        room -= count
        if room <= 0:
            break
    return companions


@dataclass(frozen=True)
class HeartbeatAnswer:
    keep_going: bool
    reason: str = ""
    error_type: str = ""


def heartbeat(*, job_id: str, attempt: int, step: int, total: int, gpu_ms: int) -> HeartbeatAnswer:
    """Renews the lease and reports progress; says whether the job should go on."""
    now = timezone.now()
    renewed = Job.objects.filter(pk=job_id, status=JobStatus.RUNNING, attempt=attempt).update(
        lease_expires_at=lease_deadline(), progress_step=step, progress_total=total
    )
    if not renewed:
        return HeartbeatAnswer(False, "This attempt no longer owns the job.", "lost")
    JobAttempt.objects.filter(job_id=job_id, number=attempt).update(heartbeat_at=now)
    job = Job.objects.select_related("organization", "api_key", "endpoint").get(pk=job_id)
    if job.cancel_requested_at is not None:
        return HeartbeatAnswer(False, "Cancelled by request.", "cancelled")
    if hooks.may_continue is not None:
        refusal: Refusal | None = hooks.may_continue(job, gpu_ms)
        if refusal is not None:
            return HeartbeatAnswer(False, refusal.detail, refusal.error_type)
    return HeartbeatAnswer(True)


def reserve_work(*, job: Job, gpu_ms: int, ahead_ms: int = 0) -> Reservation | Refusal:
    """Before further work of a running job: may its hold cover ``gpu_ms`` of GPU time in total (billing's hook)?"""
    if hooks.reserve is None:
        return Reservation(covered_gpu_ms=None)
    return hooks.reserve(job, gpu_ms, ahead_ms)


FINAL_STATUS = {
    AttemptOutcome.SUCCEEDED: JobStatus.COMPLETED,
    AttemptOutcome.FAILED: JobStatus.FAILED,
    AttemptOutcome.ERRORED: JobStatus.FAILED,
    AttemptOutcome.LOST: JobStatus.FAILED,
    AttemptOutcome.CANCELLED: JobStatus.CANCELLED,
}


def finish_attempt(
    *,
    job_id: str,
    attempt: int,
    outcome: AttemptOutcome,
    gpu_ms: int,
    cold_start_ms: int = 0,
    result: dict[str, Any] | None = None,
    error: str = "",
    error_type: str = "",
    retry: bool = False,
) -> Job | None:
    """Closes the attempt and moves the job on, in one transaction with billing's hook.

    ``retry``: the platform failed and the job may run again if attempts remain. Returns None if
    the attempt had already been closed (its lease expired and the reaper took the job back).
    """
    return _finish_locked(
        job_id, attempt, outcome=outcome, gpu_ms=gpu_ms, cold_start_ms=cold_start_ms, result=result, error=error,
        error_type=error_type, retry=retry,
    )  # fmt: skip


@retrying_atomic
def _finish_locked(job_id: str, attempt: int, **closing: Any) -> Job | None:
    job = lock_job_with_endpoint(job_id, status=JobStatus.RUNNING, attempt=attempt)
    if job is None:
        return None
    _close(job, lock_attempt(job_id, attempt), **closing)
    return job


def _close(
    job: Job,
    attempt_row: JobAttempt,
    *,
    outcome: AttemptOutcome,
    gpu_ms: int,
    cold_start_ms: int,
    result: dict[str, Any] | None,
    error: str,
    error_type: str,
    retry: bool,
) -> None:
    now = timezone.now()
    attempt_row.outcome = outcome
    attempt_row.gpu_ms = gpu_ms
    attempt_row.cold_start_ms = cold_start_ms
    attempt_row.error = error
    attempt_row.finished_at = now
    attempt_row.save(update_fields=["outcome", "gpu_ms", "cold_start_ms", "error", "finished_at"])
    job.cold_start_ms += cold_start_ms
    # Only what the move writes is saved: the row's input (and whatever else) stays as it is under the lock.
    if retry and job.attempt < job.max_attempts and job.cancel_requested_at is None:
        changed = transitions.assign(job, transitions.retried())
        log_job(job.id, f"Attempt {job.attempt} failed ({error}); the request is queued again.", level="WARNING")
    else:
        status = FINAL_STATUS[outcome]
        if job.cancel_requested_at is not None and outcome in (AttemptOutcome.LOST, AttemptOutcome.ERRORED):
            # The customer asked to stop it and it stopped: that is a cancellation, whatever ended it.
            status, error, error_type = JobStatus.CANCELLED, "Cancelled by request.", "cancelled"
        ending = transitions.ended(
            status,
            result=result,
            error=error,
            error_type=error_type,
            gpu_ms=gpu_ms if attempt_row.billable else 0,
            finished_at=now,
            # Outputs, and the input image of any final job, are deleted once retention has passed.
            outputs_expire_at=now + timedelta(seconds=files.retention_seconds(job)),
        )
        changed = transitions.assign(job, ending)
        log_job(job.id, _final_line(job), level="INFO" if job.status == JobStatus.COMPLETED else "ERROR")
    job.save(update_fields=[*changed, "cold_start_ms"])
    if hooks.attempt_finished is not None:
        hooks.attempt_finished(job, attempt_row)
    organization_id = job.organization_id
    final = job.is_final
    job_id = job.id
    has_webhook = bool(job.webhook_url)
    transaction.on_commit(lambda: _after_attempt(organization_id, job_id, final, has_webhook=has_webhook), robust=True)


def _final_line(job: Job) -> str:
    if job.status == JobStatus.COMPLETED:
        return f"Completed in {job.gpu_ms} ms of GPU time."
    if job.status == JobStatus.CANCELLED:
        return f"Cancelled ({job.error})."
    return f"Failed: {job.error}"


def _after_attempt(organization_id: uuid.UUID, job_id: uuid.UUID, final: bool, *, has_webhook: bool = True) -> None:
    """On commit of a job's move: its webhook if it ended, and the organization's waiting jobs into the freed slot.

    ``has_webhook=False``: the caller read the job (its ``webhook_url`` never changes) and it has none to send.
    """
    from inference.webhooks import schedule_webhook

    if final and has_webhook:
        schedule_webhook(job_id)
    # Most finishes leave nothing waiting: one indexed read instead of locking the organization to find none. A job
    # queued after this read dispatches itself when its own transaction commits (submission, requeue, retry) or at
    # the sweep, as it would had it been queued just after dispatch_organization's own read.
    if Job.objects.filter(organization_id=organization_id, status=JobStatus.QUEUED).exists():
        dispatch_organization(organization_id)


def reap_expired_leases() -> int:
    """Jobs whose worker stopped renewing its lease: close the attempt (unbilled) and retry or fail."""
    now = timezone.now()
    reaped = 0
    for job_id, attempt in Job.objects.filter(status=JobStatus.RUNNING, lease_expires_at__lt=now).values_list(
        "id", "attempt"
    ):
        try:
            reaped += _reap(job_id, attempt, now)
        except Exception:  # one bad row must not stop the reaper for everyone else
            logger.exception("could not reap job %s attempt %s", job_id, attempt)
    return reaped


@retrying_atomic
def _reap(job_id: uuid.UUID, attempt: int, now: Any) -> int:
    job = lock_job_with_endpoint(job_id, status=JobStatus.RUNNING, attempt=attempt, lease_expires_at__lt=now)
    if job is None:
        return 0
    attempt_row = lock_attempt(job_id, attempt)
    # The GPU was held at least until the last heartbeat; record that, unbilled.
    held_ms = max(0, math.ceil((attempt_row.heartbeat_at - attempt_row.started_at).total_seconds() * 1000))
    _close(
        job, attempt_row, outcome=AttemptOutcome.LOST, gpu_ms=held_ms, cold_start_ms=0, result=None,
        error="The worker running this request stopped responding.", error_type="internal_error", retry=True,
    )  # fmt: skip
    return 1


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


def sweep() -> dict[str, int]:
    """The periodic safety net: reap dead workers, re-send lost messages, dispatch waiting work."""
    reaped = reap_expired_leases()
    resent = redispatch_stale()
    dispatched = 0
    # Organizations by their longest-waiting request, so the sweep itself is fair across tenants.
    waiting = (
        Job.objects.filter(status=JobStatus.QUEUED)
        .values("organization_id")
        .annotate(oldest=Min("created_at"))
        .order_by("oldest")
    )
    for row in waiting:
        try:
            dispatched += dispatch_organization(row["organization_id"])
        except Exception:
            logger.exception("could not dispatch for organization %s", row["organization_id"])
    return {"reaped": reaped, "resent": resent, "dispatched": dispatched}


@retrying_atomic
def cancel_job(*, job: Job) -> str:
    """fal's answer: CANCELLATION_REQUESTED or ALREADY_COMPLETED. A job not yet running is cancelled
    at once and never billed; a running one stops at its next denoising step.

    The job's row is locked first, so the answer is decided on its state as last committed: a cancel racing a
    finish, a retry or a reap is either recorded before it (and every closing path then honours it: no requeue,
    no second run) or sees the job final. Once accepted, ``cancel_requested_at`` stays set.
    """
    now = timezone.now()
    locked_job = lock_job(job.pk)
    if locked_job is None or locked_job.is_final:
        return "ALREADY_COMPLETED"
    if locked_job.status == JobStatus.RUNNING:
        if locked_job.cancel_requested_at is None:
            Job.objects.filter(pk=job.pk).update(cancel_requested_at=now)
            log_job(job.pk, "Cancellation requested; the request stops at its next step.")
        return "CANCELLATION_REQUESTED"
    # Queued, or dispatched but not claimed: a claim is a conditional UPDATE on DISPATCHED, so none can follow.
    ending = transitions.ended(
        JobStatus.CANCELLED, finished_at=now, error="Cancelled before it started.", error_type="cancelled"
    )
    if locked_job.input.get("image_path"):
        ending["outputs_expire_at"] = now + timedelta(seconds=files.retention_seconds(locked_job))
    Job.objects.filter(pk=job.pk).update(cancel_requested_at=now, **ending)
    log_job(job.pk, "Cancelled before it started.")
    if hooks.ended_unstarted is not None:
        hooks.ended_unstarted(Job.objects.get(pk=job.pk))
    organization_id, job_id = locked_job.organization_id, locked_job.pk
    transaction.on_commit(lambda: _after_attempt(organization_id, job_id, True), robust=True)
    return "CANCELLATION_REQUESTED"


def requeue_job(*, job: Job, log_line: str = "Requeued by an operator.") -> bool:
    """Puts a failed or cancelled request back in the queue; False if it is in any other state.

    The attempt counter is kept, so a message for an earlier attempt still in the broker can never claim it; a job
    that has used all its attempts gets one more. Its outcome (error, result, GPU time, times) is cleared, and so is
    a cancel request, which the next attempt's heartbeat would otherwise obey at once.

    It goes through the same admission as a submission (billing holds credit for the new run against the balance and
    spend limits); a suspended organization's job, and one sent with an API key since revoked, are refused: raises
    ``RequeueRefused`` when any of these refuses, and then nothing has changed.
    """
    return _requeue(job, log_line)


@retrying_atomic
def _requeue(job: Job, log_line: str) -> bool:
    requeued = Job.objects.filter(pk=job.pk, status__in=(JobStatus.FAILED, JobStatus.CANCELLED)).update(
        max_attempts=Greatest(F("max_attempts"), F("attempt") + 1), **transitions.requeued()
    )
    if not requeued:
        return False
    if Organization.objects.filter(pk=job.organization_id, suspended_at__isnull=False).exists():
        # Dispatch skips a suspended organization: the job would wait in the queue, holding credit.
        raise RequeueRefused(
            "The organization is suspended; unsuspend it before requeueing its requests.",
            error_type="organization_suspended",
            status_code=403,
        )
    if job.api_key_id is not None and ApiKey.objects.filter(pk=job.api_key_id, revoked_at__isnull=False).exists():
        # A revoked key may have leaked: what was sent with it is not run again on the organization's money.
        raise RequeueRefused(
            "The API key this request was sent with has been revoked; submit it again with an active key.",
            error_type="api_key_revoked",
            status_code=403,
        )
    if hooks.admit is not None:
        # After the UPDATE, which holds the row against a second requeue; a refusal rolls the requeue back.
        refusal = hooks.admit(Job.objects.select_related("endpoint").get(pk=job.pk))
        if refusal is not None:
            raise RequeueRefused.of(refusal)
    # The next final state sends the webhook afresh, under a new message id.
    WebhookDelivery.objects.filter(job_id=job.pk).delete()
    log_job(job.pk, log_line)
    organization_id = job.organization_id
    transaction.on_commit(lambda: dispatch_organization(organization_id))
    return True
