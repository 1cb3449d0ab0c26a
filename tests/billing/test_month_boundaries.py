"""Month and day boundaries: the books agree on which UTC day and month a cost belongs to.

A settlement stamps its usage record, its rollup rows and its debit's ledger entry with one instant, the attempt's
close, so a settlement that straddles midnight (the close read the clock just before it, the debit is written just
after) puts its cost in the same day and month of the usage, the ledger, the month's statement and reconciliation,
whatever the clock reads and in whatever zone it writes the time. The calendar's cuts (``billing.periods``) are
UTC's, and a month's spend is that month's alone.
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import UTC, date, datetime, timedelta
from typing import Any
from unittest import mock
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone
from hypothesis import example, given, settings
from hypothesis import strategies as st

from accounts.models import Organization
from billing import admission, alerts, api, end_users, metering, partitions, periods, reconciliation, statements
from billing.ledger import grant_credits
from billing.models import CreditEntry, EndUserRollup, Granularity, UsageRecord, UsageRollup
from billing.money import MICROS_PER_DOLLAR
from inference import attempts
from inference.models import Endpoint, Job
from tests import lifecycle
from tests.billing import test_settlement_properties as settlement_properties
from tests.billing.test_settlement_properties import debit_refused, rolled_back

pytestmark = pytest.mark.django_db

DATABASE_EXAMPLES = settings(settlement_properties.DATABASE_EXAMPLES, max_examples=40)
GPU_MS = 2_000
TAG = "alice"
# Zones whose local midnight is far from UTC's, both sides of it, and some a half or a quarter hour off.
ZONES = ["UTC", "America/New_York", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kolkata", "Australia/Lord_Howe"]
NEW_YORK = ZoneInfo("America/New_York")


class SteppingClock:
    """Django's clock reading ``first`` once, then ``jump`` later, then ``step`` more at each further read, written
    in ``zone``. The close of an attempt reads it first: whatever its settlement read afterwards (its debit's time,
    were it taken again) lies on the far side of a boundary whenever ``first`` and ``first + jump`` straddle one."""

    def __init__(self, first: datetime, *, jump: timedelta, step: timedelta, zone: str) -> None:
        self.first, self.jump, self.step, self.zone = first, jump, step, ZoneInfo(zone)
        self.reads = 0

    def __call__(self) -> datetime:
        later = self.jump + self.step * (self.reads - 1) if self.reads else timedelta(0)
        self.reads += 1
        return (self.first + later).astimezone(self.zone)


@pytest.fixture
def world(tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None) -> dict[str, Any]:
    Organization.objects.filter(pk=tenant["organization"].pk).update(concurrency_limit=1_000)
    grant_credits(organization=tenant["organization"], amount_micros=10 * MICROS_PER_DOLLAR, reason="Room to spend")
    return {**tenant, "endpoint": builtin_endpoint}


def settle(world: dict[str, Any], clock: Any, *, end_user: str = "", locked: bool = False) -> UsageRecord:
    """A request submitted, started and its hold grown on the real clock, then finished on ``clock``; its record.

    ``locked``: settled on the locked account, as when the balance no longer covers the cost."""
    job = lifecycle.submit(world["organization"], world["endpoint"], api_key=world["api_key"], end_user=end_user)
    running = lifecycle.start(job)
    attempts.reserve_work(job=running, gpu_ms=GPU_MS)
    refused = mock.patch.object(metering, "debit_usage", side_effect=debit_refused) if locked else nullcontext()
    with mock.patch.object(timezone, "now", clock), refused:
        lifecycle.finish(running, gpu_ms=GPU_MS, reserve=False)
    return UsageRecord.objects.get(job=job)


def first_of_months_ahead(months: int) -> datetime:
    boundary = periods.month_start()
    for _ in range(months):
        boundary = periods.next_month(boundary)
    return boundary


def hour_of(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@DATABASE_EXAMPLES
@given(
    months_ahead=st.integers(1, 36),
    day=st.one_of(st.just(0), st.integers(1, 27)),
    # Microseconds from the boundary (the first of a month, or a midnight inside it) to the close's reading.
    offset_us=st.one_of(st.integers(-3_000, 3_000), st.integers(-86_400_000_000, 86_400_000_000)),
    # How much later the clock reads next (at most an hour: a statement's CLOSING_GRACE), and at each further read.
    jump_us=st.one_of(st.integers(0, 3_000), st.integers(0, 3_600_000_000)),
    step_us=st.integers(0, 1_000),
    zone=st.sampled_from(ZONES),
    tagged=st.booleans(),
    locked=st.booleans(),
)
@example(months_ahead=1, day=0, offset_us=-1, jump_us=1, step_us=0, zone="America/New_York", tagged=True, locked=False)
@example(months_ahead=2, day=0, offset_us=-1, jump_us=1, step_us=0, zone="Pacific/Kiritimati", tagged=True, locked=True)
@example(months_ahead=1, day=5, offset_us=-1, jump_us=1, step_us=1, zone="Asia/Kolkata", tagged=False, locked=False)
def test_a_settlement_puts_its_cost_in_one_utc_day_and_month_of_every_book(
    world: dict[str, Any],
    months_ahead: int,
    day: int,
    offset_us: int,
    jump_us: int,
    step_us: int,
    zone: str,
    tagged: bool,
    locked: bool,
) -> None:
    """For any settlement instant (to the microsecond either side of a month's or a day's start), the clock writing
    the time in zones far from UTC's, and the debit made with or without the account's lock taken first: the job,
    its attempt, its usage record and its debit carry one instant; its hour, day and end user rows are that
    instant's; the statement of its month counts its cost once, as usage at price and as the ledger's debit, and the
    months either side count none of it; the month's spend and alert period are its month; reconciliation, the
    month's statement issued, finds nothing."""
    organization = world["organization"]
    boundary = first_of_months_ahead(months_ahead) + timedelta(days=day)
    clock = SteppingClock(
        boundary + timedelta(microseconds=offset_us),
        jump=timedelta(microseconds=jump_us),
        step=timedelta(microseconds=step_us),
        zone=zone,
    )
    with rolled_back():
        record = settle(world, clock, end_user=TAG if tagged else "", locked=locked)
        settled_at = record.recorded_at
        day_start, month_start = periods.day_start(settled_at), periods.month_start(settled_at)
        month = month_start.date()
        cost = record.cost_micros
        assert cost > 0

        # One instant: the job's end, its attempt's, its usage record's and its debit's.
        job = Job.objects.get(pk=record.job_id)
        assert job.finished_at == job.attempts.get().finished_at == settled_at
        debit = CreditEntry.objects.get(usage_record_id=record.pk)
        assert (debit.created_at, debit.amount_micros) == (settled_at, -cost)
        rollups = UsageRollup.objects.filter(organization=organization)
        assert {(row.granularity, row.bucket_start, row.cost_micros) for row in rollups} == {
            (Granularity.HOUR, hour_of(settled_at), cost),
            (Granularity.DAY, day_start, cost),
        }
        tag_days = EndUserRollup.objects.filter(organization=organization).values_list("bucket_start", "cost_micros")
        assert list(tag_days) == ([(day_start, cost)] if tagged else [])

        # The month's statement, and the months either side of it.
        figures = statements.monthly_statement(organization_id=organization.pk, month=month)
        assert figures["balanced"]
        assert figures["usage_cost_micros"] == figures["usage_debited_micros"] == cost
        assert figures["movements"]["usage_micros"] == -cost
        before, after = statements.previous_month(month), periods.next_month(month_start).date()
        for neighbour in (before, after):
            other = statements.monthly_statement(organization_id=organization.pk, month=neighbour)
            assert (other["usage_cost_micros"], other["usage_debited_micros"]) == (0, 0)
            assert other["movements"]["usage_micros"] == 0
            assert other["balanced"]

        # What a month's spend counts: its budget's, its key's, its end user's, and the period its alerts name.
        assert alerts.period_of(settled_at) == f"{month:%Y-%m}"
        for moment, spent in (
            (settled_at, cost),
            (month_start - timedelta(days=1), 0),
            (periods.next_month(month_start), 0),
        ):
            assert alerts.spent_in_month(organization_id=organization.pk, month=moment) == spent
            assert (
                alerts.spent_in_month(organization_id=organization.pk, month=moment, key_id=record.api_key_id) == spent
            )
            tag_spent = end_users.spent_in_month(organization_id=organization.pk, end_user=TAG, month=moment)
            assert tag_spent == (spent if tagged else 0)

        # Reconciliation of the month, its statement issued once the month is closed.
        closed = periods.next_month(month_start) + statements.CLOSING_GRACE
        assert statements.issue_statement(
            organization=Organization.objects.get(pk=organization.pk), month=month, now=closed
        )
        for check in (
            reconciliation.check_usage_debits,
            reconciliation.check_rollups,
            reconciliation.check_end_user_rollups,
            reconciliation.check_ledger_chain,
            reconciliation.check_balances,
            reconciliation.check_statements,
        ):
            assert check().drift == [], check.__name__


def test_a_months_spend_is_that_months_alone(world: dict[str, Any]) -> None:
    """A tag's spend in a month ends where the next month begins: a request settled next month is not counted in
    this month's, by the tag's limit, the budget, the key's limit or the limits' page."""
    organization, key = world["organization"], world["api_key"]
    month = first_of_months_ahead(1)
    following = periods.next_month(month)
    this_months = settle(world, lambda: month + timedelta(days=9, hours=23), end_user=TAG)
    next_months = settle(world, lambda: following + timedelta(days=2), end_user=TAG)
    next_months_too = settle(world, lambda: following, end_user=TAG)  # the very first instant is the next month's
    assert this_months.cost_micros > 0

    def tag_spent(moment: datetime) -> int:
        return end_users.spent_in_month(organization_id=organization.pk, end_user=TAG, month=moment)

    assert tag_spent(month) == this_months.cost_micros
    assert tag_spent(month + timedelta(days=20)) == this_months.cost_micros  # any moment names its month
    assert tag_spent(following) == next_months.cost_micros + next_months_too.cost_micros
    assert tag_spent(periods.next_month(following)) == 0
    assert alerts.spent_in_month(organization_id=organization.pk, month=month) == this_months.cost_micros

    # "This month", read during the first month: what admission, the limits and the dashboard count.
    with mock.patch.object(timezone, "now", return_value=month + timedelta(days=20)):
        assert admission.spent_this_month(organization_id=organization.pk) == this_months.cost_micros
        assert admission.spent_this_month(organization_id=organization.pk, key_id=key.pk) == this_months.cost_micros
        assert api.key_spend_this_month(organization.pk) == {str(key.pk): this_months.cost_micros}
        assert api.end_user_spend_this_month(organization.pk) == {TAG: this_months.cost_micros}


# --- The calendar -------------------------------------------------------------------------------------------------


def test_one_calendar_cuts_every_month() -> None:
    """Admission, alerts and the partitions take their months from the one helper."""
    assert admission.month_start is alerts.month_start is partitions.month_start is periods.month_start
    assert partitions.next_month is periods.next_month


def test_a_moment_written_in_another_zone_belongs_to_its_utc_month() -> None:
    evening = datetime(2026, 3, 31, 20, tzinfo=NEW_YORK)  # midnight of April 1st in UTC
    assert periods.month_start(evening) == datetime(2026, 4, 1, tzinfo=UTC)
    assert periods.day_start(evening) == datetime(2026, 4, 1, tzinfo=UTC)
    assert periods.month_bounds(evening) == (datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC))
    assert admission.month_start(evening) == alerts.month_start(evening) == datetime(2026, 4, 1, tzinfo=UTC)
    assert alerts.period_of(evening) == "2026-04"
    assert statements.month_of(evening) == date(2026, 4, 1)
    with pytest.raises(ValueError, match="no time zone"):
        periods.month_start(datetime(2026, 3, 31, 20))  # noqa: DTZ001 - the naive moment refused


@given(
    moment=st.datetimes(
        min_value=datetime(2001, 1, 1),  # noqa: DTZ001 - hypothesis bounds are naive; the zones come from timezones
        max_value=datetime(2199, 12, 1),  # noqa: DTZ001
        timezones=st.timezones(),
    )
)
def test_the_calendar_cuts_utc_days_and_months_whatever_zone_a_moment_is_written_in(moment: datetime) -> None:
    utc = moment.astimezone(UTC)
    start, end = periods.month_bounds(moment)
    assert start == datetime(utc.year, utc.month, 1, tzinfo=UTC)
    assert start <= moment < end
    assert (end - timedelta(microseconds=1)).astimezone(UTC).month == utc.month
    assert periods.month_start(moment) == start == periods.month_start(utc)
    assert periods.next_month(moment) == end
    assert periods.day_start(moment) == datetime(utc.year, utc.month, utc.day, tzinfo=UTC)
    assert alerts.period_of(moment) == f"{utc:%Y-%m}"
    assert metering.bucket_start(moment, Granularity.DAY) == periods.day_start(moment)
