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

import pytest
from django.conf import settings
from django.db.models import F, Sum

from billing.models import CreditEntry, EntryKind, Granularity, UsageRecord, UsageRollup, net_spend
from inference.models import Endpoint
from tests.concurrency.harness import ActorPool
from tests.concurrency.races import refund_round, repetitions, run_race

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("priced_without_broker"),
    pytest.mark.skipif(
        settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
        reason="races need PostgreSQL (DATABASE_URL): SQLite runs one writer at a time, so they cannot happen there",
    ),
]


def total(queryset: Any, column: str) -> int:
    return int(queryset.aggregate(total=Sum(column))["total"] or 0)


def test_a_refund_racing_settlements_takes_its_cost_off_the_spend_once(
    actor_pool: ActorPool, new_organization: Callable[[], Any], builtin_endpoint: Endpoint
) -> None:
    made: list[Any] = []

    def tracked() -> Any:
        made.append(new_organization())
        return made[-1]

    def round_and_spend(books: Any, _: int) -> Any:
        report = refund_round(actor_pool, books, new_organization=tracked, endpoint=builtin_endpoint)
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

    tally = run_race("refund vs settle and grant: the spend", repetitions(), round_and_spend)
    assert tally.findings == 0, tally.summary()
