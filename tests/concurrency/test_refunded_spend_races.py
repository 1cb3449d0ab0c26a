"""A refund racing the organization's settlements and a grant on real PostgreSQL takes the refunded request's cost off
the spend its limits count exactly once, whoever commits first (``billing.metering.count_as_refunded``).

The race is ``refund_round`` (tests/concurrency/races.py): two refunds of a finished request, two other requests of
the organization settling into the same rollup rows, and a grant, released together. Beyond that round's own
contract, each round checks that the spend the limits count (rollup rows' cost less their refunded amount) is the
organization's usage less its refunds, and that no row gives back more than it counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db.models import F, Sum

from billing.models import CreditEntry, EntryKind, Granularity, UsageRecord, UsageRollup, net_spend
from inference.models import Endpoint
from tests.concurrency.harness import ActorPool
from tests.concurrency.races import RACE_MARKS, Books, RoundReport, refund_round

pytestmark = RACE_MARKS


def total(queryset: Any, column: str) -> int:
    return int(queryset.aggregate(total=Sum(column))["total"] or 0)


def refund_round_and_the_spend(
    pool: ActorPool, books: Books, *, new_organization: Callable[[], Any], endpoint: Endpoint
) -> RoundReport:
    """``refund_round``, then the spend its organization's limits count: in hour rows and in day rows, its usage less
    its refunds, and no row giving back more than it counted."""
    made: list[Any] = []

    def tracked() -> Any:
        made.append(new_organization())
        return made[-1]

    report = refund_round(pool, books, new_organization=tracked, endpoint=endpoint)
    organization = made[-1]
    used = total(UsageRecord.objects.filter(organization=organization, billable=True), "cost_micros")
    refunded = total(CreditEntry.objects.filter(organization=organization, kind=EntryKind.REFUND), "amount_micros")
    for granularity in (Granularity.HOUR, Granularity.DAY):
        rows = UsageRollup.objects.filter(organization=organization, granularity=granularity)
        spent = int(rows.aggregate(total=net_spend())["total"] or 0)
        if spent != used - refunded:
            report.drift.append(f"{granularity} rows count {spent} µ$ spent; used {used}, refunded {refunded}")
        if rows.filter(refunded_micros__gt=F("cost_micros")).exists():
            report.drift.append(f"a {granularity} row gives back more than it counted")
    return report


def test_a_refund_racing_settlements_takes_its_cost_off_the_spend_once(race: Callable[..., None]) -> None:
    race("refund vs settle and grant: the spend", refund_round_and_the_spend)
