"""End users: the tag a reseller puts on each request for its own user or project (``X-Fal-End-User``).

A tagged request's usage record carries its tag, and its settlement adds it to the tag's day row
(``EndUserRollup``, beside the usage rollups), which the usage report groups and exports by tag and which a tag's
monthly limit is checked against. A tag's limit (``EndUserLimit``) holds at admission and at every reservation as a
key's does: the tag's spend this month plus what its running requests hold may not pass it (402
``end_user_limit_exceeded``).

**A new limit and the admissions racing it.** A tag has no row of its own to share-lock, as a key's limit has the
key's. Admission of a tagged request reads the tag's limit behind a share lock on the organization's row
(``FOR KEY SHARE``: it waits for nothing but a writer of the organization's key, so dispatch's ``FOR NO KEY UPDATE``
and the other admissions pass), and ``set_end_user_limit`` takes that row exclusively (``FOR UPDATE``). So an
admission that read "no limit" commits before the limit does, and one after it reads the limit; the admissions that
read the limit decide on the locked account, where every hold and settlement of the organization is ordered.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from accounts.models import AuditAction, Organization
from accounts.services import SYSTEM, Actor, record_audit
from billing.ledger import BillingError
from billing.locks import lock_organization_exclusively
from billing.models import EndUserLimit, EndUserRollup, Hold, net_spend
from billing.periods import month_bounds
from inference.submission import END_USER_RULE, valid_end_user


def limit_for_admission(organization_id: Any, end_user: str) -> int | None:
    """The tag's monthly limit, read behind a share lock on the organization's row (None: no limit).

    Two statements: the lock, then the read. One ``SELECT ... FOR KEY SHARE`` joined to the limits would not do: when
    it waits for a new limit's transaction, PostgreSQL re-reads the locked row after that commits, but the joined
    rows from the statement's first snapshot, so it would miss the limit it waited for (``make race`` races admissions
    against a new limit of the end user).
    (A plain read on SQLite, which runs one writer at a time.)"""
    share_organization(organization_id)
    return limit_of(organization_id, end_user)


def share_organization(organization_id: Any) -> None:
    """Share-locks the organization's row for this transaction (``FOR KEY SHARE``: dispatch's ``FOR NO KEY UPDATE``
    and other admissions pass; ``lock_organization_exclusively`` waits for it, and it for that)."""
    if not connection.features.has_select_for_update:
        return
    pk = Organization._meta.pk
    assert pk is not None  # noqa: S101 - every model has one
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT 1 FROM {Organization._meta.db_table} WHERE {pk.column} = %s FOR KEY SHARE",  # noqa: S608
            [pk.get_db_prep_value(organization_id, connection)],
        )


def limit_of(organization_id: Any, end_user: str) -> int | None:
    """The tag's monthly limit, read without a lock (None: no limit)."""
    return (
        EndUserLimit.objects.filter(organization_id=organization_id, end_user=end_user)
        .values_list("monthly_limit_micros", flat=True)
        .first()
    )


def spent_in_month(*, organization_id: Any, end_user: str, month: datetime) -> int:
    """Cost of the tag's requests recorded in the UTC month of ``month`` less what refunds gave back of it, from its
    day rows: bounded at both ends, so a past month's spend is that month's alone, not everything since it began."""
    start, end = month_bounds(month)
    rows = EndUserRollup.objects.filter(
        organization_id=organization_id, end_user=end_user, bucket_start__gte=start, bucket_start__lt=end
    )
    return int(rows.aggregate(total=net_spend())["total"] or 0)


def held(organization_id: Any, end_user: str, *, besides_job_id: Any = None) -> int:
    """What the tag's open holds add up to, less ``besides_job_id``'s (the hold an admission is placing)."""
    holds = Hold.objects.filter(organization_id=organization_id, end_user=end_user, released_at=None).exclude(
        end_user=""
    )
    if besides_job_id is not None:
        holds = holds.exclude(job_id=besides_job_id)
    return int(holds.aggregate(total=Sum("amount_micros"))["total"] or 0)


@transaction.atomic
def set_end_user_limit(
    *, organization: Organization, end_user: str, monthly_limit_micros: int | None, actor: Actor = SYSTEM
) -> EndUserLimit | None:
    """Sets (or, with None, removes) the tag's monthly limit; audited. Takes the organization's row exclusively, so
    it waits for the admissions that read the tag's limit and those after it read the new one."""
    if not valid_end_user(end_user):
        raise BillingError(f"An end user tag is {END_USER_RULE}")
    if monthly_limit_micros is not None and monthly_limit_micros < 0:
        raise BillingError("A limit cannot be negative.")
    lock_organization_exclusively(organization.pk)
    limit = None
    if monthly_limit_micros is None:
        EndUserLimit.objects.filter(organization=organization, end_user=end_user).delete()
    else:
        limit, _ = EndUserLimit.objects.update_or_create(
            organization=organization,
            end_user=end_user,
            defaults={"monthly_limit_micros": monthly_limit_micros, "updated_at": timezone.now()},
        )
    record_audit(
        action=AuditAction.SPEND_LIMITS_CHANGED,
        actor=actor,
        organization=organization,
        target=organization,
        metadata={"end_user": end_user, "monthly_limit_micros": monthly_limit_micros},
    )
    return limit
