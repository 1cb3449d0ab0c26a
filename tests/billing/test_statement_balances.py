"""A statement's balances are the sums of the entries stamped before each end of its month, though stamps are not in
the order the entries took the account's lock (their ids, the order of the running balances): a debit is stamped with
its attempt's close, read before its transaction waited for the lock. So every month adds up, one month's closing
balance is the next one's opening, and reconciliation, which reads the balances the same way, agrees with both."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from unittest import mock
from uuid import uuid4

import pytest
from django.db.models import Sum
from django.utils import timezone
from hypothesis import example, given
from hypothesis import strategies as st

from accounts.models import Organization
from billing import periods, reconciliation, statements
from billing.ledger import grant_credits, post_entry
from billing.locks import locked_account
from billing.models import CreditEntry, EntryKind
from billing.money import MICROS_PER_DOLLAR
from inference.models import Endpoint
from tests.billing.test_month_boundaries import (
    DATABASE_EXAMPLES,
    SteppingClock,
    first_of_months_ahead,
    rolled_back,
    settle,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None) -> dict[str, Any]:
    """An organization with credit to spend on the built-in endpoint (``settle``'s world)."""
    grant_credits(organization=tenant["organization"], amount_micros=10 * MICROS_PER_DOLLAR, reason="Room to spend")
    return {**tenant, "endpoint": builtin_endpoint}


def stamped_before(organization: Organization, moment: datetime) -> int:
    """The balance before ``moment`` by its definition, without the running balances."""
    entries = CreditEntry.objects.filter(organization=organization, created_at__lt=moment)
    return int(entries.aggregate(total=Sum("amount_micros"))["total"] or 0)


def assert_months_add_up(organization: Organization, first: datetime, last: datetime) -> None:
    """Each month from ``first``'s to ``last``'s adds up and opens with the previous one's closing balance, each end
    at the sum of the entries stamped before it; issued, reconciliation finds them all still the ledger's."""
    month, previous_closing = statements.month_of(first), None
    while month <= statements.month_of(last):
        start, end = statements.month_bounds(month)
        figures = statements.monthly_statement(organization_id=organization.pk, month=month)
        assert figures["opening_balance_micros"] == stamped_before(organization, start)
        assert figures["closing_balance_micros"] == stamped_before(organization, end)
        assert figures["balanced"]
        assert previous_closing in (None, figures["opening_balance_micros"])
        previous_closing = figures["closing_balance_micros"]
        issued = statements.issue_statement(organization=organization, month=month, now=end + statements.CLOSING_GRACE)
        if issued is None:
            assert not statements.had_activity(organization.pk, month)
        else:
            assert (issued.opening_balance_micros, issued.closing_balance_micros) == (
                figures["opening_balance_micros"],
                figures["closing_balance_micros"],
            )
        month = statements.month_of(end)
    check = reconciliation.check_statements()
    assert check.checked
    assert check.drift == []


def test_a_debit_stamped_before_midnight_after_a_grant_stamped_after_it(world: dict[str, Any]) -> None:
    """A grant's transaction stamps its entry just after midnight of the 1st; a debit whose attempt closed just before
    midnight takes the account's lock after it: December's closing balance has the debit and not the grant."""
    organization, midnight = world["organization"], first_of_months_ahead(1)
    with mock.patch.object(timezone, "now", return_value=midnight + timedelta(milliseconds=50)):
        grant = grant_credits(organization=organization, amount_micros=5_000_000, reason="Top-up at midnight")
    clock = SteppingClock(
        midnight - timedelta(milliseconds=100),
        jump=timedelta(milliseconds=200),
        step=timedelta(microseconds=10),
        zone="UTC",
    )
    record = settle(world, clock)
    debit = CreditEntry.objects.get(usage_record=record)
    assert debit.pk > grant.pk
    assert debit.created_at < midnight <= grant.created_at
    assert record.cost_micros > 0

    december = statements.monthly_statement(
        organization_id=organization.pk, month=statements.month_of(midnight - timedelta(days=1))
    )
    assert december["closing_balance_micros"] == grant.balance_after_micros - grant.amount_micros + debit.amount_micros
    assert december["movements"]["usage_micros"] == debit.amount_micros
    assert_months_add_up(organization, midnight - timedelta(days=1), midnight)


def test_the_last_two_entries_of_a_month_stamped_out_of_order(world: dict[str, Any]) -> None:
    """Mid-month, far from its end: the month's last entry by stamp is not its last by id."""
    organization, month = world["organization"], first_of_months_ahead(1)
    noon = month + timedelta(days=14, hours=12)
    with mock.patch.object(timezone, "now", return_value=noon + timedelta(milliseconds=500)):
        grant = grant_credits(organization=organization, amount_micros=2_000_000, reason="Goodwill")
    clock = SteppingClock(noon + timedelta(milliseconds=200), jump=timedelta(seconds=1), step=timedelta(0), zone="UTC")
    record = settle(world, clock)
    debit = CreditEntry.objects.get(usage_record=record)
    assert debit.pk > grant.pk
    assert debit.created_at < grant.created_at

    figures = statements.monthly_statement(organization_id=organization.pk, month=statements.month_of(noon))
    assert figures["closing_balance_micros"] == debit.balance_after_micros
    assert_months_add_up(organization, month - timedelta(days=1), noon)


@DATABASE_EXAMPLES
@given(
    entries=st.lists(
        st.tuples(
            st.integers(1, 2),  # around the first of next month, or of the month after
            st.integers(-10_000_000, 10_000_000),  # microseconds from that midnight, in the order of the lock
            st.integers(-3_000_000, 3_000_000),  # how far the stamp is from it
            st.integers(-3_000_000, 3_000_000).filter(bool),
        ),
        min_size=1,
        max_size=12,
    )
)
@example(entries=[(1, 50_000, 0, 5_000_000), (1, 60_000, -160_000, -200)])
@example(entries=[(2, 0, 0, 1), (2, 1, -2, 2), (2, 2, -1, 3), (1, 0, 1, 4), (1, 1, -3, 5)])
def test_every_month_boundary_has_the_sum_of_the_entries_stamped_before_it(
    tenant: dict[str, Any], quiet_books: None, entries: list[tuple[int, int, int, int]]
) -> None:
    organization = tenant["organization"]
    midnights = [first_of_months_ahead(months) for months in (1, 2)]
    with rolled_back():
        lock_order = sorted(
            (midnights[which - 1] + timedelta(microseconds=offset), jitter, amount)
            for which, offset, jitter, amount in entries
        )
        for locked_at, jitter, amount in lock_order:
            post_entry(
                account=locked_account(organization.pk),
                kind=EntryKind.ADJUSTMENT,
                amount_micros=amount,
                idempotency_key=f"adjustment-{uuid4()}",
                created_at=locked_at + timedelta(microseconds=jitter),
            )
        assert_months_add_up(organization, periods.month_start(), midnights[1])
