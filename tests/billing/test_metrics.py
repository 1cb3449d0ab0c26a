"""Revenue metrics on known rollups and payments, with the exact figures each definition gives."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from billing import metrics
from billing.ledger import grant_credits, refund_job
from billing.models import (
    NO_KEY,
    CreditEntry,
    EntryKind,
    Granularity,
    Payment,
    PaymentKind,
    PaymentStatus,
    Price,
    UsageRecord,
    UsageRollup,
)
from billing.rates import ensure_media_prices
from inference.models import AttemptOutcome, Endpoint, GpuClass, JobStatus
from tests import lifecycle
from tests.lifecycle import run

pytestmark = pytest.mark.django_db

AS_OF = date(2026, 3, 31)


@pytest.fixture(autouse=True)
def _gpu_rates(settings: Any) -> None:
    settings.BILLING_GPU_COST_MICROS_PER_HOUR = {"gpu-h100": 2_200_000, "gpu-a10g": 600_000, "cpu": 40_000}


def today() -> date:
    return timezone.now().astimezone(UTC).date()


def usage_days() -> tuple[date, date]:
    """The first and last UTC day of the usage recorded: the same day unless the test crossed midnight."""
    days = [moment.astimezone(UTC).date() for moment in UsageRecord.objects.values_list("recorded_at", flat=True)]
    return min(days), max(days)


@pytest.fixture
def h100_endpoint(db: None) -> Endpoint:
    return Endpoint.objects.create(owner="test", name="big", kind="text-to-image", weights="builtin:tiny-sd",
                                   gpu_class=GpuClass.H100)  # fmt: skip


def rollup(organization: Any, endpoint: Endpoint, day: date, granularity: str = Granularity.DAY, **sums: int) -> None:
    UsageRollup.objects.create(
        granularity=granularity,
        bucket_start=datetime(day.year, day.month, day.day, tzinfo=UTC),
        organization=organization,
        endpoint=endpoint,
        key_id=NO_KEY,
        gpu_class=endpoint.gpu_class,
        **sums,
    )


@pytest.fixture
def usage(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, h100_endpoint: Endpoint
) -> dict[str, Any]:
    acme, beta = tenant["organization"], other_tenant["organization"]
    rollup(acme, builtin_endpoint, AS_OF, cost_micros=1_000_000, gpu_ms=10_000_000, unbilled_gpu_ms=3_600_000,
           billable_attempts=10, attempts=11)  # fmt: skip
    rollup(acme, builtin_endpoint, AS_OF, Granularity.HOUR, cost_micros=999, gpu_ms=999)  # never read
    # The first day of the 30 ending on AS_OF, and the day before it.
    rollup(beta, h100_endpoint, date(2026, 3, 2), cost_micros=2_000_003, gpu_ms=7_200_000, billable_attempts=3)
    rollup(acme, h100_endpoint, date(2026, 3, 1), cost_micros=500_000, gpu_ms=1_800_000, billable_attempts=1)
    return {"acme": acme, "beta": beta}


def test_recognized_revenue_per_day_fills_days_without_usage(
    usage: dict[str, Any], django_assert_num_queries: Any
) -> None:
    with django_assert_num_queries(2):  # the rollups, and the refunds
        days = metrics.recognized_revenue(date(2026, 2, 28), date(2026, 3, 3))
    assert [(day.day.isoformat(), day.micros) for day in days] == [
        ("2026-02-28", 0), ("2026-03-01", 500_000), ("2026-03-02", 2_000_003), ("2026-03-03", 0),
    ]  # fmt: skip


def test_mrr_and_run_rate_round_half_up(usage: dict[str, Any], django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(2):
        rate = metrics.run_rate(AS_OF)
    # 03-02 .. 03-31: 1,000,000 + 2,000,003; x 365 / 30 = 36,500,036.5, rounded half up.
    assert rate == metrics.RunRate(
        as_of=AS_OF, window_start=date(2026, 3, 2), last_30_days_micros=3_000_003, annualized_micros=36_500_037
    )
    assert metrics.mrr(AS_OF) == 3_000_003


def test_run_rate_trend(usage: dict[str, Any], django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(2):
        trend = metrics.run_rate_trend(AS_OF, points=3, step_days=1)
    assert [(point.as_of.day, point.last_30_days_micros, point.annualized_micros) for point in trend] == [
        (29, 2_500_003, 30_416_703),  # 02-28 .. 03-29: still holds 03-01
        (30, 2_500_003, 30_416_703),
        (31, 3_000_003, 36_500_037),  # 03-01 has left the window, 03-31 came in
    ]
    weekly = metrics.run_rate_trend(AS_OF, points=2)
    assert [point.as_of for point in weekly] == [date(2026, 3, 24), AS_OF]
    with pytest.raises(ValueError, match="positive"):
        metrics.run_rate_trend(AS_OF, points=0)


def test_the_run_rate_defaults_to_the_last_complete_day(usage: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.setattr(timezone, "now", lambda: datetime(2026, 4, 1, 0, 30, tzinfo=UTC))
    assert metrics.run_rate().as_of == AS_OF
    assert metrics.mrr() == 3_000_003


def test_revenue_by_endpoint_and_top_organizations(usage: dict[str, Any], django_assert_num_queries: Any) -> None:
    march = (date(2026, 3, 1), AS_OF)
    with django_assert_num_queries(2):
        endpoints = metrics.revenue_by_endpoint(*march)
    assert [(e.endpoint, e.requests, e.gpu_ms, e.revenue_micros) for e in endpoints] == [
        ("test/big", 4, 9_000_000, 2_500_003),
        ("platform/tiny-sd", 10, 10_000_000, 1_000_000),
    ]
    with django_assert_num_queries(2):
        top = metrics.top_organizations(*march, limit=1)
    assert [(o.organization_id, o.revenue_micros, o.requests) for o in top] == [(usage["beta"].pk, 2_000_003, 3)]
    assert top[0].name == usage["beta"].name
    second = metrics.top_organizations(*march)[1]
    assert (second.organization_id, second.revenue_micros, second.gpu_ms) == (usage["acme"].pk, 1_500_000, 11_800_000)
    assert metrics.top_organizations(date(2026, 3, 3), date(2026, 3, 30)) == []


def test_gpu_time_cost_and_gross_margin_per_class(usage: dict[str, Any], django_assert_num_queries: Any) -> None:
    with django_assert_num_queries(2):
        margin = metrics.gross_margin(date(2026, 3, 1), AS_OF)
    h100, a10g, cpu = margin.by_class
    assert [figures.gpu_class for figures in margin.by_class] == ["gpu-h100", "gpu-a10g", "cpu"]
    # CPU: (10,000,000 + 3,600,000) ms x 40,000 µ$/h / 3,600,000 = 151,111.1 -> 151,111.
    assert (cpu.billed_gpu_ms, cpu.unbilled_gpu_ms, cpu.gpu_cost_micros) == (10_000_000, 3_600_000, 151_111)
    assert (cpu.billed_hours, cpu.unbilled_hours) == (Decimal("2.778"), Decimal("1.000"))
    assert (cpu.revenue_micros, cpu.margin_micros, cpu.margin_bps) == (1_000_000, 848_889, 8_489)
    # H100: 9,000,000 ms = 2.5 h x 2,200,000 = 5,500,000 against 2,500,003 of revenue: a loss.
    assert (h100.total_gpu_ms, h100.gpu_cost_micros, h100.margin_micros) == (9_000_000, 5_500_000, -2_999_997)
    assert h100.margin_bps == -12_000  # -11,999.97 bp, half away from zero
    assert (a10g.total_gpu_ms, a10g.gpu_cost_micros, a10g.margin_bps) == (0, 0, None)
    assert (margin.revenue_micros, margin.gpu_cost_micros, margin.margin_micros) == (3_500_003, 5_651_111, -2_151_108)
    assert margin.margin_bps == -6_146
    assert (margin.billed_gpu_ms, margin.unbilled_gpu_ms, margin.unbilled_share_bps) == (19_000_000, 3_600_000, 1_593)


def refunded_on(job: Any, moment: datetime) -> CreditEntry:
    """The request refunded through the ledger, the refund dated ``moment``."""
    entry = refund_job(job=job, reason="bad output")
    CreditEntry.objects.filter(pk=entry.pk).update(created_at=moment)
    return entry


@pytest.mark.usefixtures("quiet_books")
def test_request_refunds_net_against_revenue_on_the_day_they_are_given(
    usage: dict[str, Any], builtin_endpoint: Endpoint, django_assert_num_queries: Any
) -> None:
    acme, beta = usage["acme"], usage["beta"]
    job = run(acme, builtin_endpoint, gpu_ms=2_000)  # 200 µ$, recorded today, outside the range
    refunded_on(job, datetime(2026, 3, 31, 12, tzinfo=UTC))
    # A refund of a card payment takes credit back (not a request refund): it is cash, not revenue.
    CreditEntry.objects.create(organization=beta, kind=EntryKind.REFUND, amount_micros=-5_000_000,
                               balance_after_micros=0, idempotency_key="refund-re_1",
                               created_at=datetime(2026, 3, 31, 13, tzinfo=UTC))  # fmt: skip
    march = (date(2026, 3, 1), AS_OF)

    with django_assert_num_queries(2):
        [day] = metrics.recognized_revenue(AS_OF, AS_OF)
    assert (day.usage_micros, day.refunded_micros, day.micros) == (1_000_000, 200, 999_800)
    assert metrics.recognized_revenue(date(2026, 3, 30), date(2026, 3, 30))[0].refunded_micros == 0
    assert metrics.run_rate(AS_OF).last_30_days_micros == 3_000_003 - 200
    endpoints = {
        e.endpoint: (e.requests, e.revenue_micros, e.refunded_micros) for e in metrics.revenue_by_endpoint(*march)
    }
    assert endpoints == {"test/big": (4, 2_500_003, 0), "platform/tiny-sd": (10, 999_800, 200)}
    organizations = {
        o.organization_id: (o.revenue_micros, o.refunded_micros) for o in metrics.top_organizations(*march)
    }
    assert organizations == {acme.pk: (1_499_800, 200), beta.pk: (2_000_003, 0)}
    margin = metrics.gross_margin(*march)
    cpu = margin.by_class[2]
    assert (cpu.gpu_class, cpu.revenue_micros, cpu.refunded_micros, cpu.margin_micros) == ("cpu", 999_800, 200, 848_689)
    assert (margin.revenue_micros, margin.refunded_micros) == (3_500_003 - 200, 200)


@pytest.mark.usefixtures("quiet_books")
def test_a_refund_can_reorder_the_top_organizations_and_list_one_with_only_refunds(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    acme, beta = tenant["organization"], other_tenant["organization"]
    for organization in (acme, beta):
        grant_credits(organization=organization, amount_micros=10_000_000, reason="test")
    big = run(acme, builtin_endpoint, gpu_ms=30_000_000)  # $3.00
    run(beta, builtin_endpoint, gpu_ms=20_000_000)  # $2.00
    # From the day of the first usage to the day it is now: one day, or two when the test crossed midnight.
    first = UsageRecord.objects.earliest("recorded_at").recorded_at.astimezone(UTC).date()
    assert [o.organization_id for o in metrics.top_organizations(first, today(), limit=1)] == [acme.pk]

    refund_job(job=big)

    [top] = metrics.top_organizations(first, today(), limit=1)
    assert (top.organization_id, top.revenue_micros) == (beta.pk, 2_000_000)
    # Tomorrow acme used nothing but gave a refund: it is listed, with negative revenue, and so is its endpoint.
    tomorrow = today() + timedelta(days=1)
    CreditEntry.objects.filter(job=big).update(created_at=datetime.combine(tomorrow, time(1), tzinfo=UTC))
    [only] = metrics.top_organizations(tomorrow, tomorrow)
    assert (only.organization_id, only.name, only.requests, only.revenue_micros) == (acme.pk, acme.name, 0, -3_000_000)
    [endpoint] = metrics.revenue_by_endpoint(tomorrow, tomorrow)
    assert (endpoint.endpoint, endpoint.requests, endpoint.revenue_micros) == ("platform/tiny-sd", 0, -3_000_000)
    assert metrics.recognized_revenue(tomorrow, tomorrow)[0].micros == -3_000_000


def test_cash_collected_is_succeeded_payments_less_refunds(
    tenant: dict[str, Any], django_assert_num_queries: Any
) -> None:
    organization = tenant["organization"]

    def pay(day: int | None, cents: int, status: str = PaymentStatus.SUCCEEDED, **amounts: int) -> None:
        succeeded_at = datetime(2026, 3, day, 23, 59, tzinfo=UTC) if day else datetime(2026, 2, 28, 12, tzinfo=UTC)
        Payment.objects.create(organization=organization, kind=PaymentKind.PURCHASE, status=status,
                               amount_cents=cents, succeeded_at=succeeded_at, **amounts)  # fmt: skip

    pay(2, 5_000, amount_refunded_cents=1_000)
    pay(2, 2_000)
    pay(5, 10_000, amount_disputed_cents=10_000)
    pay(3, 9_999, status=PaymentStatus.PENDING)
    pay(4, 9_999, status=PaymentStatus.FAILED)
    pay(None, 7_777)  # the day before the range
    with django_assert_num_queries(1):
        cash = metrics.cash_collected(date(2026, 3, 1), date(2026, 3, 5))
    assert [(d.day.day, d.paid_micros, d.refunded_micros, d.net_micros, d.disputed_micros) for d in cash.days] == [
        (1, 0, 0, 0, 0),
        (2, 70_000_000, 10_000_000, 60_000_000, 0),
        (3, 0, 0, 0, 0),
        (4, 0, 0, 0, 0),
        (5, 100_000_000, 0, 100_000_000, 100_000_000),
    ]
    assert (cash.paid_micros, cash.refunded_micros, cash.net_micros, cash.disputed_micros) == (
        170_000_000, 10_000_000, 160_000_000, 100_000_000,
    )  # fmt: skip


@pytest.mark.usefixtures("quiet_books")
def test_revenue_from_real_usage_is_what_was_debited(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    for gpu_ms in (1_235, 2_000, 17):
        run(tenant["organization"], builtin_endpoint, gpu_ms=gpu_ms)
    start, end = usage_days()
    # 1.235 s -> 124 µ$ (123.5 rounded half up), 2 s -> 200, 0.017 s -> 2 (1.7): at 100 µ$ per CPU-second.
    assert sum(day.micros for day in metrics.recognized_revenue(start, end)) == 326
    assert sum(record.cost_micros for record in UsageRecord.objects.all()) == 326
    figures = metrics.gross_margin(start, end).by_class[2]
    assert (figures.gpu_class, figures.billed_gpu_ms, figures.gpu_cost_micros) == ("cpu", 3_252, 36)


@pytest.mark.usefixtures("quiet_books")
def test_an_endpoint_billed_per_second_of_video_has_its_margin_from_all_its_gpu_time(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, django_assert_num_queries: Any
) -> None:
    """Revenue per second of video delivered, GPU cost per millisecond held, by every attempt: the one the platform
    failed (unbilled, retried) as well as the one that delivered."""
    ensure_media_prices(Price, Endpoint)
    video = Endpoint.objects.get(owner="platform", name="tiny-ltx-video", path="")
    Endpoint.objects.filter(pk=video.pk).update(gpu_class=GpuClass.H100)
    video.refresh_from_db()
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=10_000_000, reason="test")
    job = lifecycle.start(lifecycle.submit(organization, video, prompt="x", num_frames=17, fps=8))
    job = lifecycle.finish(job, AttemptOutcome.ERRORED, gpu_ms=3_600, reserve=False, retry=True)
    assert job.status == JobStatus.QUEUED
    frames = {"path": "x", "content_type": "video/mp4", "width": 64, "height": 64, "fps": 8, "num_frames": 17}
    lifecycle.finish(lifecycle.start(job), gpu_ms=9_000, reserve=False, result={"video": frames, "seed": 1})
    run(organization, builtin_endpoint, gpu_ms=2_000)  # an image endpoint billed per GPU-second, beside it
    records = UsageRecord.objects.filter(job=job).order_by("attempt_number")
    assert [(r.unit, r.cost_micros, r.gpu_ms, r.unbilled_gpu_ms) for r in records] == [
        ("video_second", 0, 0, 3_600), ("video_second", 21_250, 9_000, 0)
    ]  # fmt: skip
    start, end = usage_days()

    with django_assert_num_queries(2):
        endpoints = {e.endpoint: e for e in metrics.revenue_by_endpoint(start, end)}
    by_video = endpoints["platform/tiny-ltx-video"]
    # 17 frames at 8 fps = 2.125 s at the 64p tier's 10,000 µ$/s; 12.6 s of H100 at 2,200,000 µ$/h = 7,700 µ$.
    assert (by_video.requests, by_video.revenue_micros) == (1, 21_250)
    assert (by_video.gpu_ms, by_video.unbilled_gpu_ms, by_video.total_gpu_ms) == (9_000, 3_600, 12_600)
    assert (by_video.gpu_cost_micros, by_video.margin_micros, by_video.margin_bps) == (7_700, 13_550, 6_376)
    by_image = endpoints["platform/tiny-sd"]
    # 2 s of CPU at 100 µ$/s, costing 2 s at 40,000 µ$/h = 22.2 µ$.
    assert (by_image.revenue_micros, by_image.total_gpu_ms, by_image.gpu_cost_micros) == (200, 2_000, 22)
    # The per-endpoint figures add up to the per-class ones (one endpoint per class here, so no rounding apart).
    margin = metrics.gross_margin(start, end)
    h100 = margin.by_class[0]
    assert (h100.gpu_class, h100.total_gpu_ms, h100.gpu_cost_micros) == ("gpu-h100", 12_600, 7_700)
    assert margin.gpu_cost_micros == sum(e.gpu_cost_micros for e in endpoints.values())


def test_outstanding_credit_is_the_sum_of_balances(tenant: dict[str, Any], other_tenant: dict[str, Any]) -> None:
    assert metrics.outstanding_credit() == 2 * django_settings.BILLING_SIGNUP_CREDITS_MICROS
