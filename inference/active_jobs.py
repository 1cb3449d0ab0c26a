"""An organization's active jobs (DISPATCHED or RUNNING) as its dispatch reads them, checked against its jobs, and
put right where they disagree.

On PostgreSQL the dispatch reads the sum of the organization's ``ActiveJobCount`` rows, which triggers on the jobs
table keep in the transaction of every change of a job's status (``inference.dispatch``, migration 0011). They agree
with the jobs by construction; what could make them disagree is what bypasses triggers: rows loaded with
``session_replication_role = replica``, a restore of one table without the other, a trigger dropped by hand. A sum
above the count holds the organization's queue back; below it, the dispatch would let it past its limit. So billing's
reconciliation compares them on every run (``billing.reconciliation.check_active_jobs``, alerted on as any drift), and
``manage.py recount_active_jobs`` puts them right. SQLite counts the jobs at each dispatch: nothing to compare.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import connection
from django.db.models import Count, Sum

from accounts.locking import lock_organization, locked, retrying_atomic
from inference.models import ACTIVE_STATUSES, ActiveJobCount, Job


def kept() -> bool:
    """Whether this database keeps the sum (PostgreSQL's triggers) for the dispatch to read."""
    return connection.vendor == "postgresql"


def disagreements(organization_ids: list[uuid.UUID] | None = None) -> list[dict[str, Any]]:
    """The organizations whose sum is not their active jobs counted, in one snapshot where the caller holds one
    (reconciliation's): ``{"organization_id", "summed", "counted"}`` each, ordered by organization."""
    if not kept():
        return []
    sums = ActiveJobCount.objects.values("organization_id").annotate(summed=Sum("jobs"))
    counts = Job.objects.filter(status__in=ACTIVE_STATUSES).values("organization_id").annotate(counted=Count("pk"))
    if organization_ids is not None:
        sums, counts = (
            sums.filter(organization_id__in=organization_ids),
            counts.filter(organization_id__in=organization_ids),
        )
    summed = {row["organization_id"]: int(row["summed"] or 0) for row in sums.order_by()}
    counted = {row["organization_id"]: row["counted"] for row in counts.order_by()}
    return [
        {
            "organization_id": organization_id,
            "summed": summed.get(organization_id, 0),
            "counted": counted.get(organization_id, 0),
        }
        for organization_id in sorted(summed.keys() | counted.keys(), key=str)
        if summed.get(organization_id, 0) != counted.get(organization_id, 0)
    ]


@retrying_atomic
def recount(organization_id: uuid.UUID) -> tuple[int, int]:
    """The organization's rows replaced by one that holds its active jobs counted; (the sum before, the count).

    Exact while jobs move: the organization's lock (the dispatch's) keeps any job from becoming active, and every
    active job is share-locked before it is counted, so one that stops being active either committed first (not
    counted, and its row change is among the rows replaced) or waits for this to commit (counted, and its change
    applies to the new row)."""
    if not kept():
        counted = Job.objects.filter(organization_id=organization_id, status__in=ACTIVE_STATUSES).count()
        return counted, counted
    lock_organization(organization_id)
    active = Job.objects.filter(organization_id=organization_id, status__in=ACTIVE_STATUSES).order_by("pk")
    counted = len(locked(active).values_list("pk", flat=True))
    rows = ActiveJobCount.objects.filter(organization_id=organization_id)
    summed = sum(locked(rows.order_by("shard")).values_list("jobs", flat=True))
    rows.delete()
    ActiveJobCount.objects.create(organization_id=organization_id, shard=0, jobs=counted)
    return summed, counted
