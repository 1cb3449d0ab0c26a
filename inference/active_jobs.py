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

# The jobs table's triggers that keep the rows (migration 0011).
TRIGGERS = (
    "inference_job_active_inserted",
    "inference_job_active_changed",
    "inference_job_active_deleted",
    "inference_job_active_truncated",
)
_in_place: set[str] = set()  # the database aliases whose triggers this process found in place


def kept() -> bool:
    """Whether the dispatch reads the sum: PostgreSQL, with the triggers that keep it in place. Found in place once,
    they are taken to stay (no look per dispatch); until then every call looks. A schema built without the
    migrations (or before this one ran), or triggers dropped or disabled by hand, leave the dispatch counting the jobs
    (slower, never wrong) rather than reading rows that nothing keeps; reconciliation reports them missing
    (``triggers_in_place``)."""
    if connection.vendor != "postgresql":
        return False
    if connection.alias not in _in_place:
        if not triggers_in_place():
            return False
        _in_place.add(connection.alias)
    return True


def triggers_in_place() -> bool:
    """Whether every trigger that keeps the sum is on the jobs table and enabled, as the database says now."""
    with connection.cursor() as cursor:
        cursor.execute(  # to_regclass: no table yet (before the migrations) is none of its triggers
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = ANY(%s) AND tgenabled <> 'D'",
            [Job._meta.db_table, list(TRIGGERS)],
        )
        row = cursor.fetchone()
    return bool(row) and row[0] == len(TRIGGERS)


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
    active job is locked before it is counted, so one that stops being active either committed first (not
    counted, and its row change is among the rows replaced) or waits for this to commit (counted, and its change
    applies to the new row)."""
    if not kept():
        counted = Job.objects.filter(organization_id=organization_id, status__in=ACTIVE_STATUSES).count()
        return counted, counted
    if lock_organization(organization_id) is None:
        return 0, 0  # no such organization: nothing to put right
    active = Job.objects.filter(organization_id=organization_id, status__in=ACTIVE_STATUSES).order_by("pk")
    list(locked(active).values_list("pk", flat=True))  # none of them stops being active until this commits
    rows = ActiveJobCount.objects.filter(organization_id=organization_id)
    summed = sum(locked(rows.order_by("shard")).values_list("jobs", flat=True))
    # Counted again once the rows are locked: a job made active without the organization's lock (an operator's SQL)
    # by a transaction that wrote its row after the jobs above were read has committed by now, and is counted.
    counted = active.count()
    rows.delete()
    ActiveJobCount.objects.create(organization_id=organization_id, shard=0, jobs=counted)
    return summed, counted
