"""Spend alerts: an organization is told, once per period and limit, when its spend reaches a threshold it watches.

**What is watched** (``AlertSettings``, changed with ``controls.set_alert_settings``): percentages of the monthly budget
and of each API key's monthly limit (50, 80 and 100% unless set), and a floor under the available credit. A member's
monthly limit (``MemberSpendLimit``, shared by every key the member made) is watched at the key's percentages, with
scope ``member`` and the member's user id as its subject. A percentage below 100 is ``billing.threshold_reached``. The
100% one is ``billing.budget_exhausted`` (for a key's limit too, with scope ``key``, and a member's, with scope
``member``): reached when the month's spend is the whole budget, or when what is left of it no longer covers the hold of
the request that just settled, so admission would refuse a request like it (admission holds each request's estimate, so
spend seldom meets a budget to the micro-dollar). Spend is what admission counts against the same limits: the month's
usage less what refunds gave back of it (``billing.models.net_spend``). The floor is ``billing.credits_low``, once each
time the credit goes below the floor: its period is the last ledger entry that added credit and left the balance at or
above the floor (``credit_period``), so credit added that leaves it below (a refund, a dispute won back) does not tell
it again.

**Per limit.** A percentage is told once per month for each budget (or key's or member's limit) it is a percentage of: a
budget changed during the month re-arms its percentages for the new figure. A customer who raised a used-up budget is
told 50%, 80% and used up again as the spend reaches them under the new one; thresholds the spend has already reached
under a new budget when it is set (a budget lowered) are told at the next settlement, as any level is. A budget set back
to a figure already told this month is not told again: its alerts are there. The period stays the UTC month, in the
webhook's body and the API; the limit is the alert's ``limit_micros``. The credit floor's alert has no limit (its period
is its own) and is not re-armed by a budget or a key's or member's limit.

**When.** Crossing is found after a settlement commits (``look_after_settlement``, on commit of the transaction that
closed the attempt), never by polling; a member's limit is looked at after a settlement under any key the member made.
Each look is a level, not an edge: it finds every threshold the organization's committed spend has reached, not only
those this settlement crossed. Settlements commit one after another on the account's row, so the last to commit sees all
of them: a threshold is never missed, and a look lost with its process is made good by the next settlement that costs
something (a free one moves no spend, and does not look).

**Exactly once.** Several settlements may see the same threshold reached at once. Each inserts its row with ``INSERT ...
ON CONFLICT DO NOTHING RETURNING``, and the unique constraint on (organization, scope, subject, threshold, period,
limit_key_micros) (``ONCE_PER``; the limit, 0 for the credit floor: a NULL never conflicts) lets one of them have it:
only the transaction that inserted the row creates its webhook delivery and queues its email, in the same transaction. A
settlement of an organization that watches nothing pays nothing: ``Account.alerts_armed``, set once a budget, a key's or
member's limit or a floor is set, comes back with the debit.

**How it is told.** The row itself is the dashboard's notice; an email to every member who may manage billing (owners,
admins, billing members: ``accounts.policy``; for a member's limit, the member too), sent by a task with a claim on the
row, and retried by ``send_due_alert_emails`` until sent; and a signed webhook to the organization's billing webhook URL
through inference's retrying delivery (``inference.webhooks.schedule_event``), whose ``webhook-id`` is the alert's."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import current_app
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.mail import send_mail
from django.db import connection, transaction
from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone

from accounts import policy
from accounts.models import ApiKey, Membership, User
from billing.models import (
    DEFAULT_THRESHOLDS,
    Account,
    AlertEvent,
    AlertScope,
    AlertSettings,
    CreditEntry,
    Granularity,
    MemberSpendLimit,
    SpendAlert,
    UsageRecord,
    UsageRollup,
    net_spend,
)
from billing.money import format_micros
from billing.periods import month_bounds, month_start
from inference.webhooks import schedule_event

logger = logging.getLogger(__name__)

EMAIL_TASK = "billing.send_alert_email"
# An email claimed this long ago and still not sent (its worker died) is sent again by the sweep.
EMAIL_CLAIM_SECONDS = 600
# The sweep leaves an alert's email this long to the task queued when the alert was made.
EMAIL_SWEEP_AFTER_SECONDS = 30
FULL = 100
# What an alert is once for: the columns of its unique constraint (``spend_alert_once_per_limit``).
ONCE_PER = ("organization", "scope", "subject", "threshold", "period", "limit_key_micros")


@dataclass(frozen=True)
class Reached:
    """A threshold the organization's spend has reached, as its alert row would record it."""

    scope: str
    subject: str
    threshold: int
    period: str
    event_type: str
    spent_micros: int
    limit_micros: int | None
    available_micros: int

    @property
    def limit_key_micros(self) -> int:
        """The limit the alert is once for (``SpendAlert.limit_key_micros``): the budget or the key's or member's
        limit, 0 for the credit floor."""
        return self.limit_micros if self.limit_micros is not None else 0

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        """What the alert is once for: its columns in the unique constraint, less the organization."""
        return (self.scope, self.subject, self.threshold, self.period, self.limit_key_micros)


def period_of(moment: datetime) -> str:
    """The UTC month of ``moment``: the period of a budget's, a key's and a member's alerts (in UTC whatever zone
    ``moment`` is written in, as the spend it counts is)."""
    return f"{month_start(moment):%Y-%m}"


def settings_of(organization_id: Any) -> AlertSettings:
    """The organization's alert settings, or the defaults (not stored) when it never changed them."""
    found = AlertSettings.objects.filter(pk=organization_id).first()
    return found if found is not None else AlertSettings(organization_id=organization_id)


def look_after_settlement(record: UsageRecord, *, hold_micros: int) -> None:
    """Inside a settlement's transaction: once it commits, look for the thresholds its organization's spend reached.

    ``hold_micros``: what the settled job held, the size of a request like it (the budget's exhaustion)."""
    organization_id, key_id, at = record.organization_id, record.api_key_id, record.recorded_at
    transaction.on_commit(
        lambda: look(organization_id=organization_id, api_key_id=key_id, at=at, hold_micros=hold_micros), robust=True
    )


def look(
    *, organization_id: Any, api_key_id: Any = None, at: datetime | None = None, hold_micros: int = 0
) -> list[int]:
    """Records an alert for every threshold reached and not yet recorded in its period for its limit; the ids of those
    it made."""
    reached = reached_thresholds(
        organization_id=organization_id, api_key_id=api_key_id, at=at or timezone.now(), hold_micros=hold_micros
    )
    if not reached:
        return []
    recorded = set(
        SpendAlert.objects.filter(organization_id=organization_id, period__in={item.period for item in reached})
        .values_list(*ONCE_PER[1:])
        .order_by()
    )
    new = [item for item in reached if item.key not in recorded]
    return record_alerts(organization_id, new) if new else []


def _reached_percent(spent: int, limit: int, percent: int, hold_micros: int) -> bool:
    if spent * 100 >= percent * limit:
        return True
    # Exhausted: what is left cannot cover a request like the one that just settled (admission would refuse it).
    return percent >= FULL and limit - spent < hold_micros


def _percent_events(
    *,
    scope: str,
    subject: str,
    thresholds: Iterable[int],
    spent: int,
    limit: int,
    period: str,
    available: int,
    hold_micros: int,
) -> list[Reached]:
    return [
        Reached(
            scope=scope,
            subject=subject,
            threshold=percent,
            period=period,
            event_type=AlertEvent.BUDGET_EXHAUSTED if percent >= FULL else AlertEvent.THRESHOLD_REACHED,
            spent_micros=spent,
            limit_micros=limit,
            available_micros=available,
        )
        for percent in sorted(set(thresholds))
        if _reached_percent(spent, limit, percent, hold_micros)
    ]


def spent_in_month(*, organization_id: Any, month: datetime, key_id: Any = None, member_id: Any = None) -> int:
    """Cost recorded in the UTC month of ``month`` less what refunds gave back of it, from the daily rollups (one
    indexed query): what the budget, a key's limit (``key_id``) and a member's (``member_id``: every key the member made
    in the organization) count (``billing.admission.spent_this_month``, ``member_spent_this_month``)."""
    start, end = month_bounds(month)
    rows = UsageRollup.objects.filter(granularity=Granularity.DAY, bucket_start__gte=start, bucket_start__lt=end)
    if key_id is not None:
        rows = rows.filter(key_id=key_id)
    elif member_id is not None:
        keys = ApiKey.objects.filter(organization_id=organization_id, created_by_id=member_id).values("pk")
        rows = rows.filter(key_id__in=Subquery(keys))
    else:
        rows = rows.filter(organization_id=organization_id)
    return int(rows.aggregate(total=net_spend())["total"] or 0)


def reached_thresholds(*, organization_id: Any, api_key_id: Any, at: datetime, hold_micros: int) -> list[Reached]:
    """Every threshold the organization watches that its committed spend has reached in the period of ``at``."""
    account = Account.objects.filter(pk=organization_id).values(
        "balance_micros", "held_micros", "monthly_budget_micros"
    )
    figures = account.first()
    if figures is None:
        return []
    watched = settings_of(organization_id)
    available = figures["balance_micros"] - figures["held_micros"]
    month = month_start(at)
    period = period_of(month)
    reached: list[Reached] = []
    budget = figures["monthly_budget_micros"]
    if budget is not None:
        spent = spent_in_month(organization_id=organization_id, month=month)
        reached += _percent_events(
            scope=AlertScope.BUDGET, subject="", thresholds=watched.budget_thresholds, spent=spent, limit=budget,
            period=period, available=available, hold_micros=hold_micros,
        )  # fmt: skip
    if api_key_id is not None:
        # The key's own limit and that of the member who made it, in one query (as admission reads them).
        members = MemberSpendLimit.objects.filter(
            organization_id=OuterRef("organization_id"), user_id=OuterRef("created_by_id")
        )
        row = (
            ApiKey.objects.filter(pk=api_key_id)
            .annotate(member_limit=Subquery(members.values("monthly_limit_micros")[:1]))
            .values_list("spend_limit__monthly_limit_micros", "member_limit", "created_by_id")
            .first()
        )
        key_limit, member_limit, maker_id = row if row is not None else (None, None, None)
        if key_limit is not None:
            spent = spent_in_month(organization_id=organization_id, month=month, key_id=api_key_id)
            reached += _percent_events(
                scope=AlertScope.KEY, subject=str(api_key_id), thresholds=watched.key_thresholds, spent=spent,
                limit=key_limit, period=period, available=available, hold_micros=hold_micros,
            )  # fmt: skip
        if member_limit is not None:
            spent = spent_in_month(organization_id=organization_id, month=month, member_id=maker_id)
            reached += _percent_events(
                scope=AlertScope.MEMBER, subject=str(maker_id), thresholds=watched.key_thresholds, spent=spent,
                limit=member_limit, period=period, available=available, hold_micros=hold_micros,
            )  # fmt: skip
    floor = watched.credit_floor_micros
    if floor is not None and available < floor:
        reached.append(
            Reached(
                scope=AlertScope.CREDITS,
                subject="",
                threshold=floor,
                period=credit_period(organization_id, floor),
                event_type=AlertEvent.CREDITS_LOW,
                spent_micros=0,
                limit_micros=None,
                available_micros=available,
            )
        )
    return reached


def credit_period(organization_id: Any, floor: int) -> str:
    """The period of a low-credit alert: the last entry that added credit and left the balance at or above the floor
    (``credit-<entry id>``; ``credit-0`` before any).

    So the alert is told once each time credit goes below the floor after a refill brought it back to the floor or
    above. Credit added that leaves the balance below the floor (a request's refund, a dispute won back, a small
    grant) starts no new period: the balance never left the low it was told about. Usage only lowers the balance
    (its entries are never the period), and holds coming and going are no refill; the ledger records balances, not
    holds, so credit added that leaves the balance at or above the floor is a refill even while running requests
    hold the available credit below it (as any credit added was before). One index range
    (``credit_entry_added``), read back from the newest entry that added credit: the entries after the refill,
    which all left the balance below the floor, are the only ones passed over."""
    refill = (
        CreditEntry.objects.filter(
            organization_id=organization_id, amount_micros__gt=0, balance_after_micros__gte=floor
        )
        .order_by("-id")
        .values_list("id", flat=True)
        .first()
    )
    return f"credit-{refill or 0}"


def record_alerts(organization_id: Any, reached: list[Reached]) -> list[int]:
    """Inserts the alerts; for each one this call inserted (no other had it), its webhook and its email.

    One statement inserts them all, ``ON CONFLICT DO NOTHING RETURNING``: a row another transaction inserted first
    (committed, or committing while this one waits on its index entry) comes back as nothing, so it is notified by
    that transaction alone. The webhook deliveries are written in the same transaction as the rows.
    """
    table = SpendAlert._meta.db_table
    fields = {field.name: field for field in SpendAlert._meta.concrete_fields}
    names = ["organization", "scope", "subject", "threshold", "period", "limit_key_micros", "event_type",
             "spent_micros", "limit_micros", "available_micros", "created_at"]  # fmt: skip
    now = timezone.now()
    rows: list[str] = []
    parameters: list[Any] = []
    for item in reached:
        values = {
            "organization": organization_id, "scope": item.scope, "subject": item.subject,
            "threshold": item.threshold, "period": item.period, "limit_key_micros": item.limit_key_micros,
            "event_type": item.event_type,
            "spent_micros": item.spent_micros, "limit_micros": item.limit_micros,
            "available_micros": item.available_micros, "created_at": now,
        }  # fmt: skip
        rows.append(f"({', '.join(['%s'] * len(names))})")
        parameters += [fields[name].get_db_prep_value(values[name], connection) for name in names]
    columns = {name: str(fields[name].column) for name in names}
    unique = ", ".join(columns[name] for name in ONCE_PER)
    sql = (
        f"INSERT INTO {table} ({', '.join(columns.values())}) VALUES {', '.join(rows)} "  # noqa: S608
        f"ON CONFLICT ({unique}) DO NOTHING RETURNING {fields['id'].column}"
    )
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(sql, parameters)
            made = sorted(int(row[0]) for row in cursor.fetchall())
        if made:
            watched = settings_of(organization_id)
            for alert in SpendAlert.objects.filter(pk__in=made):
                if watched.webhook_url:
                    schedule_event(
                        organization_id=alert.organization_id,
                        url=watched.webhook_url,
                        event_type=alert.event_type,
                        message_id=message_id_of(alert),
                        payload=event_body(alert),
                    )
                alert_id = alert.pk
                transaction.on_commit(lambda alert_id=alert_id: enqueue_email(alert_id), robust=True)  # type: ignore[misc]
    if made:
        logger.info("spend alerts %s recorded for %s", made, organization_id)
    return made


def message_id_of(alert: SpendAlert) -> str:
    return f"msg_alert_{alert.pk}"


def key_names(alerts: Iterable[SpendAlert]) -> dict[str, str]:
    """The names of the alerts' subjects, by subject: a key's name for a key's limit, the member's email for a member's
    (a key's id is a UUID, a member's a number: one never reads as the other). One query per scope present."""
    alerts = list(alerts)
    ids = {alert.subject for alert in alerts if alert.scope == AlertScope.KEY}
    valid = [key for key in ids if _is_uuid(key)]
    names = (
        {str(pk): name for pk, name in ApiKey.objects.filter(pk__in=valid).values_list("pk", "name")} if valid else {}
    )
    people = {int(alert.subject) for alert in alerts if alert.scope == AlertScope.MEMBER and alert.subject.isdigit()}
    if people:
        names.update({str(pk): email for pk, email in User.objects.filter(pk__in=people).values_list("pk", "email")})
    return names


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def event_body(alert: SpendAlert, key_name: str | None = None) -> dict[str, Any]:
    """The webhook's body: Standard Webhooks' ``{type, timestamp, data}``. ``key_name``: the key's name for a key's
    limit, the member's email for a member's (read when not given)."""
    if alert.scope in (AlertScope.KEY, AlertScope.MEMBER) and key_name is None:
        key_name = key_names([alert]).get(alert.subject, "")
    member = (
        {"user_id": int(alert.subject) if alert.subject.isdigit() else None, "email": key_name}
        if alert.scope == AlertScope.MEMBER
        else None
    )
    return {
        "type": alert.event_type,
        "timestamp": alert.created_at.isoformat(),
        "data": {
            "alert_id": alert.pk,
            "organization_id": str(alert.organization_id),
            "scope": alert.scope,
            "api_key": {"id": alert.subject, "name": key_name} if alert.scope == AlertScope.KEY else None,
            "member": member,
            "threshold_percent": alert.threshold if alert.scope != AlertScope.CREDITS else None,
            "credit_floor_micros": alert.threshold if alert.scope == AlertScope.CREDITS else None,
            "period": alert.period,
            "spent_micros": alert.spent_micros,
            "limit_micros": alert.limit_micros,
            "available_micros": alert.available_micros,
            "currency": "usd",
            "message": describe(alert, key_name=key_name),
        },
    }


def describe(alert: SpendAlert, *, key_name: str | None = None) -> str:
    """The alert in one sentence, as the dashboard and the email say it. ``key_name``: the key's name for a key's limit,
    the member's email for a member's."""
    if alert.scope == AlertScope.CREDITS:
        return (
            f"Available credit is {format_micros(alert.available_micros)}, below your alert floor of "
            f"{format_micros(alert.threshold)}."
        )
    limit = format_micros(alert.limit_micros or 0)
    if alert.scope == AlertScope.BUDGET:
        what = "the monthly budget"
    elif alert.scope == AlertScope.MEMBER:
        what = f"the monthly member limit of {key_name or f'user {alert.subject}'}"
    else:
        what = f"the monthly limit of key “{key_name or alert.subject}”"
    month = alert.period
    if alert.event_type == AlertEvent.BUDGET_EXHAUSTED:
        return (
            f"{what[0].upper()}{what[1:]} ({limit}) is used up for {month}: {format_micros(alert.spent_micros)} spent. "
            "New requests are refused until the month ends or it is raised."
        )
    return f"{alert.threshold}% of {what} ({limit}) is spent for {month}: {format_micros(alert.spent_micros)}."


# --- Email ----------------------------------------------------------------------------------------------------


def enqueue_email(alert_id: int) -> bool:
    try:
        current_app.send_task(EMAIL_TASK, args=[alert_id], retry=False)
    except Exception as exc:
        logger.warning("broker refused the email of spend alert %s: %s; the sweep will send it", alert_id, exc)
        return False
    return True


def recipients_of(organization_id: Any, *, member_id: Any = None) -> list[str]:
    """Everyone who may manage the organization's billing: owners, admins and billing members, active; with
    ``member_id`` (a member's limit), that member too while an active member of the organization."""
    roles = [role for role in policy.ROLE_ACTIONS if policy.role_can(role, policy.MANAGE_BILLING)]
    told = Q(role__in=roles) | Q(user_id=member_id) if member_id is not None else Q(role__in=roles)
    members = Membership.objects.filter(told, organization_id=organization_id, user__is_active=True)
    return sorted(set(members.values_list("user__email", flat=True)))


def send_alert_email(alert_id: int) -> bool:
    """Sends the alert's email once it is claimed (a conditional UPDATE), and marks it sent. True if sent now.

    A claim older than ``EMAIL_CLAIM_SECONDS`` whose email was never marked sent (the worker died) may be taken again:
    an email is sent at least once, and twice only if a worker dies between sending it and marking it.
    """
    now = timezone.now()
    stale = now - timedelta(seconds=EMAIL_CLAIM_SECONDS)
    claimed = (
        SpendAlert.objects.filter(pk=alert_id, emailed_at__isnull=True)
        .filter(Q(email_claimed_at__isnull=True) | Q(email_claimed_at__lt=stale))
        .update(email_claimed_at=now)
    )
    if not claimed:
        return False
    alert = SpendAlert.objects.select_related("organization").get(pk=alert_id)
    limited = alert.scope == AlertScope.MEMBER and alert.subject.isdigit()
    to = recipients_of(alert.organization_id, member_id=int(alert.subject) if limited else None)
    if to:
        named = alert.scope in (AlertScope.KEY, AlertScope.MEMBER)
        key_name = key_names([alert]).get(alert.subject) if named else None
        subject = {
            AlertEvent.THRESHOLD_REACHED: f"{alert.threshold}% of your spend limit reached",
            AlertEvent.BUDGET_EXHAUSTED: "Spend limit used up",
            AlertEvent.CREDITS_LOW: "Your available credit is low",
        }.get(AlertEvent(alert.event_type), "Spend alert")
        send_mail(
            subject=f"[{alert.organization.name}] {subject}",
            message=(
                f"{describe(alert, key_name=key_name)}\n\n"
                f"Budgets, limits and alerts: {settings.PUBLIC_BASE_URL.rstrip('/')}/dashboard/billing\n"
            ),
            from_email=settings.DEFAULT_FROM_EMAIL,
            recipient_list=to,
        )
    SpendAlert.objects.filter(pk=alert_id).update(emailed_at=timezone.now())
    return True


def send_due_alert_emails(limit: int = 100) -> int:
    """The sweep: sends the emails of alerts whose task never ran (the broker lost it) or whose worker died."""
    due = SpendAlert.objects.filter(
        emailed_at__isnull=True, created_at__lte=timezone.now() - timedelta(seconds=EMAIL_SWEEP_AFTER_SECONDS)
    )
    sent = 0
    for alert_id in due.order_by("created_at").values_list("pk", flat=True)[:limit]:
        try:
            sent += send_alert_email(alert_id)
        except SoftTimeLimitExceeded:
            raise  # the task's time is up: the rest wait for the next sweep
        except Exception:  # one alert the mail server refuses must not keep the others unsent
            logger.exception("could not send the email of spend alert %s; the sweep tries again", alert_id)
    return sent


# --- What the dashboard shows ---------------------------------------------------------------------------------


RECENT_ALERT_DAYS = 31
RECENT_ALERTS_SHOWN = 5


def recent_alerts(organization_id: Any) -> list[dict[str, Any]]:
    """The organization's alerts of the last ``RECENT_ALERT_DAYS`` that nobody dismissed, newest first (at most
    ``RECENT_ALERTS_SHOWN``), each with its sentence: the notices on top of every dashboard page."""
    alerts = list(
        SpendAlert.objects.filter(
            organization_id=organization_id,
            dismissed_at__isnull=True,
            created_at__gte=timezone.now() - timedelta(days=RECENT_ALERT_DAYS),
        )[:RECENT_ALERTS_SHOWN]
    )
    names = key_names(alerts)
    return [{"alert": alert, "message": describe(alert, key_name=names.get(alert.subject))} for alert in alerts]


def dismiss(*, organization_id: Any, alert_id: int) -> bool:
    """Takes an alert off the dashboard's notices (it stays in the alert history); False if it was not there."""
    return bool(
        SpendAlert.objects.filter(organization_id=organization_id, pk=alert_id, dismissed_at__isnull=True).update(
            dismissed_at=timezone.now()
        )
    )


__all__ = ["DEFAULT_THRESHOLDS", "look", "look_after_settlement", "record_alerts", "send_alert_email"]
