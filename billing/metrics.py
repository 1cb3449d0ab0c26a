"""Revenue metrics for the operators' run-rate page: plain functions over the daily rollups and payments.

Every amount is an integer in micro-dollars; days are UTC days, ranges include both ends. Each function
runs a fixed number of queries (at most two; revenue by endpoint and top organizations join their names in
them), whatever the number of rows: usage is read from the daily ``UsageRollup`` rows, never from raw usage
records, and request refunds from their credit entries (a partial index holds only those).

Definitions:

- **Recognized revenue** of a day: the cost of the usage recorded that day, which is debited from
  prepaid credit in the same transaction (``billing.metering``), less the requests refunded that day
  (``billing.ledger.refund_job``): revenue is recognized when usage is debited, not when credits are
  bought, and a refund reverses it on the day it is given (past days never change). It includes usage
  paid with granted credits. A day, an endpoint or an organization can show negative revenue when it
  refunded more than it earned. Per endpoint, organization and GPU class, a refund nets against the
  refunded request's own.
- **MRR**: recognized revenue of the 30 days ending on ``as_of`` (inclusive). There are no
  subscriptions, so the monthly recurring figure of usage-based revenue is its trailing 30 days.
- **Run-rate**: MRR x 365 / 30, rounded half up to the micro-dollar (``billing.money.divide_half_up``).
  ``as_of`` defaults to yesterday, the last complete UTC day.
- **Cash collected** on a day: succeeded payments (by the day they succeeded) less what was refunded
  on them. A payment keeps its refunded total, not when each refund happened, so refunds count on the
  payment's day. Disputed amounts are shown apart and not subtracted.
- **GPU cost** of a GPU class: (billed + unbilled GPU ms) x ``BILLING_GPU_COST_MICROS_PER_HOUR`` of the
  class / 3,600,000, rounded half up. **Gross margin** = recognized revenue - GPU cost; its share of
  revenue in basis points (1 bp = 0.01 %), rounded half up, or None without revenue. An endpoint's GPU
  cost is the sum of that figure over the GPU classes it ran on (each rounded on its own), whatever unit
  its revenue is billed in (GPU-seconds, images, seconds of video or audio delivered, videos).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import BigIntegerField, F, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, TruncDay
from django.utils import timezone

from billing.models import Account, CreditEntry, EntryKind, Granularity, Payment, PaymentStatus, UsageRollup
from billing.money import MICROS_PER_CENT, divide_half_up
from billing.selectors import day_start
from inference.models import GpuClass

TRAILING_DAYS = 30
DAYS_PER_YEAR = 365
MS_PER_HOUR = 3_600_000
BASIS_POINTS = 10_000


@dataclass(frozen=True)
class RevenueDay:
    day: date
    usage_micros: int  # the cost of the usage recorded that day
    refunded_micros: int  # requests refunded that day

    @property
    def micros(self) -> int:
        """Recognized revenue: usage less refunds."""
        return self.usage_micros - self.refunded_micros


@dataclass(frozen=True)
class RunRate:
    as_of: date
    window_start: date  # the first of the 30 days summed
    last_30_days_micros: int  # = MRR
    annualized_micros: int


@dataclass(frozen=True)
class CashDay:
    day: date
    paid_micros: int
    refunded_micros: int
    disputed_micros: int

    @property
    def net_micros(self) -> int:
        return self.paid_micros - self.refunded_micros


@dataclass(frozen=True)
class CashCollected:
    days: list[CashDay]
    paid_micros: int
    refunded_micros: int
    disputed_micros: int
    net_micros: int


class _Margin:
    """What a row earned against what its GPU time cost: the revenue net of refunds less the GPU cost."""

    revenue_micros: int
    gpu_cost_micros: int

    @property
    def margin_micros(self) -> int:
        return self.revenue_micros - self.gpu_cost_micros

    @property
    def margin_bps(self) -> int | None:
        return share_bps(self.margin_micros, self.revenue_micros)


@dataclass(frozen=True)
class EndpointRevenue(_Margin):
    endpoint_pk: int
    endpoint: str  # owner/name[/path]
    requests: int  # billable attempts
    gpu_ms: int  # billed
    revenue_micros: int  # net of refunds
    refunded_micros: int = 0
    unbilled_gpu_ms: int = 0
    gpu_cost_micros: int = 0  # of all its GPU time, billed and unbilled, each GPU class at its own rate

    @property
    def total_gpu_ms(self) -> int:
        return self.gpu_ms + self.unbilled_gpu_ms


@dataclass(frozen=True)
class OrganizationRevenue:
    organization_id: Any
    name: str
    slug: str
    requests: int
    gpu_ms: int
    revenue_micros: int  # net of refunds
    refunded_micros: int = 0


@dataclass(frozen=True)
class GpuClassFigures(_Margin):
    gpu_class: str
    billed_gpu_ms: int
    unbilled_gpu_ms: int
    revenue_micros: int  # net of refunds
    cost_per_hour_micros: int
    gpu_cost_micros: int
    refunded_micros: int = 0

    @property
    def total_gpu_ms(self) -> int:
        return self.billed_gpu_ms + self.unbilled_gpu_ms

    @property
    def billed_hours(self) -> Decimal:
        return gpu_hours(self.billed_gpu_ms)

    @property
    def unbilled_hours(self) -> Decimal:
        return gpu_hours(self.unbilled_gpu_ms)


@dataclass(frozen=True)
class GrossMargin:
    by_class: list[GpuClassFigures]
    revenue_micros: int
    gpu_cost_micros: int
    margin_micros: int
    margin_bps: int | None
    billed_gpu_ms: int
    unbilled_gpu_ms: int
    refunded_micros: int = 0

    @property
    def unbilled_share_bps(self) -> int | None:
        """Unbilled GPU time as a share of all GPU time, in basis points."""
        return share_bps(self.unbilled_gpu_ms, self.billed_gpu_ms + self.unbilled_gpu_ms)


def gpu_hours(gpu_ms: int) -> Decimal:
    """GPU-hours to the thousandth (3.6 s), for people; the figures stay in integer ms."""
    return (Decimal(gpu_ms) / MS_PER_HOUR).quantize(Decimal("0.001"))


def share_bps(part: int, whole: int) -> int | None:
    """``part`` as basis points of ``whole``, rounded half up; None when ``whole`` is zero or less."""
    return divide_half_up(part * BASIS_POINTS, whole) if whole > 0 else None


def gpu_cost_micros(gpu_class: str, gpu_ms: int) -> int:
    """What ``gpu_ms`` of this class cost us, from the configured hourly rate (0 for a class without one)."""
    rate = int(settings.BILLING_GPU_COST_MICROS_PER_HOUR.get(gpu_class, 0))
    return divide_half_up(gpu_ms * rate, MS_PER_HOUR)


def last_complete_day() -> date:
    return timezone.now().astimezone(UTC).date() - timedelta(days=1)


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=offset) for offset in range((end - start).days + 1)]


def _day_rollups(start: date, end: date) -> QuerySet[UsageRollup]:
    return UsageRollup.objects.filter(
        granularity=Granularity.DAY,
        bucket_start__gte=day_start(start),
        bucket_start__lt=day_start(end + timedelta(days=1)),
    ).order_by()


def _job_refunds(start: date, end: date) -> QuerySet[CreditEntry]:
    """The credit given back for requests (``billing.ledger.refund_job``) from ``start`` to ``end``."""
    return CreditEntry.objects.filter(
        kind=EntryKind.REFUND,
        job__isnull=False,
        created_at__gte=day_start(start),
        created_at__lt=day_start(end + timedelta(days=1)),
    ).order_by()


def _total(column: str) -> Coalesce:
    return Coalesce(Sum(column), Value(0), output_field=BigIntegerField())


def _usage_and_refunds_per_day(start: date, end: date) -> tuple[dict[date, int], dict[date, int]]:
    usage: dict[date, int] = {}
    for row in _day_rollups(start, end).values("bucket_start").annotate(revenue=_total("cost_micros")):
        day = row["bucket_start"].astimezone(UTC).date()
        usage[day] = usage.get(day, 0) + int(row["revenue"])
    refunds: dict[date, int] = {}
    days = _job_refunds(start, end).annotate(day=TruncDay("created_at", tzinfo=UTC)).values("day")
    for refund in days.annotate(refunded=_total("amount_micros")):
        day = refund["day"].astimezone(UTC).date()
        refunds[day] = refunds.get(day, 0) + int(refund["refunded"])
    return usage, refunds


def _revenue_per_day(start: date, end: date) -> dict[date, int]:
    usage, refunds = _usage_and_refunds_per_day(start, end)
    return {day: usage.get(day, 0) - refunds.get(day, 0) for day in usage.keys() | refunds.keys()}


def recognized_revenue(start: date, end: date) -> list[RevenueDay]:
    """Recognized revenue of each day from ``start`` to ``end`` (usage less refunds), zero on days without either."""
    usage, refunds = _usage_and_refunds_per_day(start, end)
    return [RevenueDay(day, usage.get(day, 0), refunds.get(day, 0)) for day in _days(start, end)]


def mrr(as_of: date | None = None) -> int:
    """Recognized revenue of the 30 days ending on ``as_of`` (default: yesterday)."""
    return run_rate(as_of).last_30_days_micros


def _run_rate(as_of: date, revenue: dict[date, int]) -> RunRate:
    window_start = as_of - timedelta(days=TRAILING_DAYS - 1)
    last_30 = sum(revenue.get(day, 0) for day in _days(window_start, as_of))
    return RunRate(
        as_of=as_of,
        window_start=window_start,
        last_30_days_micros=last_30,
        annualized_micros=divide_half_up(last_30 * DAYS_PER_YEAR, TRAILING_DAYS),
    )


def run_rate(as_of: date | None = None) -> RunRate:
    """The annual revenue run-rate: the last 30 days' recognized revenue x 365 / 30."""
    as_of = as_of or last_complete_day()
    return _run_rate(as_of, _revenue_per_day(as_of - timedelta(days=TRAILING_DAYS - 1), as_of))


def run_rate_trend(as_of: date | None = None, *, points: int = 12, step_days: int = 7) -> list[RunRate]:
    """The run-rate at ``points`` days ``step_days`` apart, oldest first, the last one on ``as_of``.

    Weekly by default (12 weeks); ``step_days=1`` gives a daily trend. One query for the whole span.
    """
    if points < 1 or step_days < 1:
        raise ValueError("points and step_days must be positive")
    as_of = as_of or last_complete_day()
    first = as_of - timedelta(days=step_days * (points - 1))
    revenue = _revenue_per_day(first - timedelta(days=TRAILING_DAYS - 1), as_of)
    return [_run_rate(first + timedelta(days=step_days * n), revenue) for n in range(points)]


def cash_collected(start: date, end: date) -> CashCollected:
    """Succeeded payments less their refunds, for each day from ``start`` to ``end`` and in total."""
    rows = (
        Payment.objects.filter(
            status=PaymentStatus.SUCCEEDED,
            succeeded_at__gte=day_start(start),
            succeeded_at__lt=day_start(end + timedelta(days=1)),
        )
        .order_by()
        .annotate(day=TruncDay("succeeded_at", tzinfo=UTC))
        .values("day")
        .annotate(
            paid=_total("amount_cents"),
            refunded=_total("amount_refunded_cents"),
            disputed=_total("amount_disputed_cents"),
        )
    )
    per_day = {row["day"].astimezone(UTC).date(): row for row in rows}
    zero = {"paid": 0, "refunded": 0, "disputed": 0}
    days = [
        CashDay(
            day=day,
            paid_micros=int(per_day.get(day, zero)["paid"]) * MICROS_PER_CENT,
            refunded_micros=int(per_day.get(day, zero)["refunded"]) * MICROS_PER_CENT,
            disputed_micros=int(per_day.get(day, zero)["disputed"]) * MICROS_PER_CENT,
        )
        for day in _days(start, end)
    ]
    paid = sum(day.paid_micros for day in days)
    refunded = sum(day.refunded_micros for day in days)
    return CashCollected(
        days=days,
        paid_micros=paid,
        refunded_micros=refunded,
        disputed_micros=sum(day.disputed_micros for day in days),
        net_micros=paid - refunded,
    )


def revenue_by_endpoint(start: date, end: date) -> list[EndpointRevenue]:
    """Recognized revenue (net of the refunds of its requests), requests, GPU time (billed and unbilled), GPU cost
    and margin of each endpoint used or refunded in the range, highest revenue first.

    The GPU cost is that of ``gross_margin``, taken per GPU class the endpoint ran on: an endpoint billed per output
    (per second of video or audio, per video) earns by what it delivered and costs by the GPU time of every attempt.
    """
    names = ("endpoint__owner", "endpoint__name", "endpoint__path")
    used = (
        _day_rollups(start, end)
        .values("endpoint_id", "gpu_class", *names)
        .annotate(
            revenue=_total("cost_micros"),
            requests=_total("billable_attempts"),
            gpu_ms=_total("gpu_ms"),
            unbilled_gpu_ms=_total("unbilled_gpu_ms"),
        )
    )
    refunded = (
        _job_refunds(start, end)
        .values(endpoint_id=F("job__endpoint_id"), **{name: F(f"job__{name}") for name in names})
        .annotate(refunded=_total("amount_micros"))
    )
    figures = ("revenue", "requests", "gpu_ms", "unbilled_gpu_ms", "refunded", "gpu_cost")
    rows: dict[int, dict[str, Any]] = {}
    for row in [*used, *refunded]:
        merged = rows.setdefault(row["endpoint_id"], dict.fromkeys(figures, 0))
        merged.update({name: row[name] for name in names})
        for figure in figures:
            merged[figure] += int(row.get(figure, 0))
        if "gpu_class" in row:
            merged["gpu_cost"] += gpu_cost_micros(row["gpu_class"], int(row["gpu_ms"]) + int(row["unbilled_gpu_ms"]))
    result = [
        EndpointRevenue(
            endpoint_pk=endpoint_pk,
            endpoint="/".join(part for part in (row[name] for name in names) if part),
            requests=row["requests"],
            gpu_ms=row["gpu_ms"],
            revenue_micros=row["revenue"] - row["refunded"],
            refunded_micros=row["refunded"],
            unbilled_gpu_ms=row["unbilled_gpu_ms"],
            gpu_cost_micros=row["gpu_cost"],
        )
        for endpoint_pk, row in rows.items()
    ]
    return sorted(result, key=lambda endpoint: (-endpoint.revenue_micros, endpoint.endpoint_pk))


def top_organizations(start: date, end: date, *, limit: int = 10) -> list[OrganizationRevenue]:
    """The organizations with the most recognized revenue (net of their refunds) in the range, highest first.

    Refunds only lower an organization's revenue, so the top ``limit`` after netting are among the top ``limit``
    plus the number of refunded organizations before it: two queries, whatever the number of organizations.
    """
    names = ("organization__name", "organization__slug")
    refunded = {
        row["organization_id"]: row
        for row in _job_refunds(start, end).values("organization_id", *names).annotate(refunded=_total("amount_micros"))
    }
    used = (
        _day_rollups(start, end)
        .values("organization_id", *names)
        .annotate(revenue=_total("cost_micros"), requests=_total("billable_attempts"), gpu_ms=_total("gpu_ms"))
        .order_by("-revenue", "organization__slug")[: limit + len(refunded)]
    )
    rows = {row["organization_id"]: row for row in used}
    for organization_id, row in refunded.items():
        rows.setdefault(organization_id, {**row, "revenue": 0, "requests": 0, "gpu_ms": 0})
    result = []
    for organization_id, row in rows.items():
        refund = int(refunded[organization_id]["refunded"]) if organization_id in refunded else 0
        result.append(
            OrganizationRevenue(
                organization_id=organization_id,
                name=row["organization__name"],
                slug=row["organization__slug"],
                requests=int(row["requests"]),
                gpu_ms=int(row["gpu_ms"]),
                revenue_micros=int(row["revenue"]) - refund,
                refunded_micros=refund,
            )
        )
    result.sort(key=lambda organization: (-organization.revenue_micros, organization.slug))
    return result[:limit]


def gross_margin(start: date, end: date) -> GrossMargin:
    """GPU time (billed and unbilled), revenue, GPU cost and margin of each GPU class, and in total.

    Every class in ``GpuClass`` is listed, in its declared order, with zeros when it was not used.
    """
    rows = (
        _day_rollups(start, end)
        .values("gpu_class")
        .annotate(revenue=_total("cost_micros"), billed=_total("gpu_ms"), unbilled=_total("unbilled_gpu_ms"))
    )
    found = {row["gpu_class"]: row for row in rows}
    refunds = {
        row["gpu_class"]: int(row["refunded"])
        for row in _job_refunds(start, end)
        .values(gpu_class=F("job__gpu_class"))
        .annotate(refunded=_total("amount_micros"))
    }
    classes = [*GpuClass.values, *sorted((set(found) | set(refunds)) - set(GpuClass.values))]
    by_class = []
    for gpu_class in classes:
        row = found.get(gpu_class, {"revenue": 0, "billed": 0, "unbilled": 0})
        billed, unbilled, refunded = int(row["billed"]), int(row["unbilled"]), refunds.get(gpu_class, 0)
        by_class.append(
            GpuClassFigures(
                gpu_class=gpu_class,
                billed_gpu_ms=billed,
                unbilled_gpu_ms=unbilled,
                revenue_micros=int(row["revenue"]) - refunded,
                cost_per_hour_micros=int(settings.BILLING_GPU_COST_MICROS_PER_HOUR.get(gpu_class, 0)),
                gpu_cost_micros=gpu_cost_micros(gpu_class, billed + unbilled),
                refunded_micros=refunded,
            )
        )
    revenue = sum(figures.revenue_micros for figures in by_class)
    cost = sum(figures.gpu_cost_micros for figures in by_class)
    return GrossMargin(
        by_class=by_class,
        revenue_micros=revenue,
        gpu_cost_micros=cost,
        margin_micros=revenue - cost,
        margin_bps=share_bps(revenue - cost, revenue),
        billed_gpu_ms=sum(figures.billed_gpu_ms for figures in by_class),
        unbilled_gpu_ms=sum(figures.unbilled_gpu_ms for figures in by_class),
        refunded_micros=sum(figures.refunded_micros for figures in by_class),
    )


def outstanding_credit() -> int:
    """Prepaid credit not yet used, over all accounts: revenue still to be recognized (deferred)."""
    return int(Account.objects.aggregate(total=_total("balance_micros"))["total"])
