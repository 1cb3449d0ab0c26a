"""An operator puts a failed or cancelled request back in the queue, through the same admission as a submission."""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models import F
from django.db.models.functions import Greatest

from accounts.locking import retrying_atomic
from accounts.models import ApiKey, Organization
from inference import transitions
from inference.dispatch import dispatch_organization
from inference.hooks import hooks
from inference.job_logs import log_job
from inference.models import (
    Job,
    JobStatus,
    WebhookDelivery,
)
from inference.submission import SubmissionRefused

logger = logging.getLogger(__name__)


class RequeueRefused(SubmissionRefused):
    """A failed or cancelled job was not queued again (credits, a spend limit, a suspended organization, a revoked API
    key); it was left as it was."""


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
    requeued = Job.objects.filter(
        pk=job.pk, status__in=(JobStatus.FAILED, JobStatus.CANCELLED), archived_at__isnull=True
    ).update(max_attempts=Greatest(F("max_attempts"), F("attempt") + 1), **transitions.requeued())
    if not requeued:
        if Job.objects.filter(pk=job.pk, archived_at__isnull=False).exists():
            raise RequeueRefused(
                "This request was archived after its retention period (its input is gone); submit it again.",
                error_type="request_archived",
                status_code=409,
            )
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
