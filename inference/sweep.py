"""The periodic safety net: reap dead workers, re-send lost messages, dispatch waiting work."""

from __future__ import annotations

import logging

from celery.exceptions import SoftTimeLimitExceeded
from django.db.models import Min

from inference.closing import expire_unstarted, reap_expired_leases
from inference.dispatch import dispatch_organization, redispatch_stale
from inference.models import (
    Job,
    JobStatus,
)

logger = logging.getLogger(__name__)


def sweep() -> dict[str, int]:
    """The periodic safety net: reap dead workers, end requests past their start deadline, re-send lost messages,
    dispatch waiting work."""
    reaped = reap_expired_leases()
    expired = expire_unstarted()
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
        except SoftTimeLimitExceeded:
            raise  # the task's time is up: it stops here, and the next sweep starts over, not the hard kill
        except Exception:
            logger.exception("could not dispatch for organization %s", row["organization_id"])
    return {"reaped": reaped, "expired": expired, "resent": resent, "dispatched": dispatched}
