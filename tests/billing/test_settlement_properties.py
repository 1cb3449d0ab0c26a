"""What admission and settlement decide without the account's lock is what they would decide under it.

Admission adds a job's hold to the account with one conditional UPDATE (``balance - held >= estimate``, no budget)
and settlement debits with one (``balance >= cost``), each the statement that takes the account's lock; anything
else is decided on the locked account, as before (``billing/admission.py``, ``billing/metering.py``). These
properties pin the two facts that design rests on:

- a settlement prices its usage before the lock, with the hold as the ceiling; wherever the balance covers that
  cost, the balance as a further ceiling changes nothing (``cost_within``), so the condition is exactly the debit's
  rule; where it does not, the debit under the lock never takes the balance below zero;
- for any credit, budget and key limit around a job's estimate, and any balance around a settlement's cost, the
  conditional statements decide as the locked path decides (the same refusal or the same hold, the same debit,
  record and rollups), and the books agree after either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from django.db import transaction
from django.db.models import Sum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts import statements
from accounts.models import ApiKey, Organization, Scope
from accounts.services import create_api_key
from billing import admission, controls, metering, pricing
from billing.admission import member_held, member_spent_this_month, spent_this_month
from billing.ledger import grant_credits
from billing.models import Account, CreditEntry, EntryKind, Granularity, Hold, UsageRecord, UsageRollup
from billing.money import cost_within
from inference import attempts, submission
from inference.models import AttemptOutcome, Endpoint
from tests import lifecycle

pytestmark = pytest.mark.django_db

DATABASE_EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def attempts_to_price(draw: st.DrawFn) -> dict[str, Any]:
    unit = draw(st.sampled_from(["gpu_second", "image", "megapixel", "video", "video_second", "audio_second"]))
    images = draw(st.integers(0, 8))
    side = draw(st.integers(1, 2048))
    return {
        "unit": unit,
        "unit_price_micros": draw(st.integers(0, 2_000_000)),
        "gpu_ms": draw(st.integers(0, 10_000_000)),
        "images": images,
        "pixels": side * draw(st.integers(1, 2048)) * images,
        "videos": draw(st.integers(0, 4)),
        "video_ms": draw(st.integers(0, 600_000)),
        "audio_ms": draw(st.integers(0, 600_000)),
    }


@given(attempt=attempts_to_price(), hold=st.integers(0, 10**9), balance=st.integers(-(10**9), 10**9))
def test_where_the_balance_covers_the_cost_within_the_hold_it_changes_nothing_and_never_goes_below_zero(
    attempt: dict[str, Any], hold: int, balance: int
) -> None:
    within_the_hold = cost_within(**attempt, ceiling_micros=hold)
    within_both = cost_within(**attempt, ceiling_micros=min(hold, max(balance, 0)))
    cost = within_the_hold[1]
    assert cost <= hold
    if balance >= cost:
        assert within_both == within_the_hold  # the conditional debit is the debit the lock would make
    else:
        assert within_both[1] <= max(balance, 0)  # the locked path's debit leaves the balance at zero or above


# --- The same decisions, with and without the account's lock ------------------------------------------------


@contextmanager
def rolled_back() -> Iterator[None]:
    """A savepoint undone at the end: each example, and each path of one, starts from the same books."""
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


def debit_refused(*, usage_record: UsageRecord, **_: Any) -> None:
    """``ledger.debit_usage`` where the balance does not cover the cost: the record written, nothing else."""
    statements.insert(usage_record)


@contextmanager
def under_the_lock_only() -> Iterator[None]:
    """Admission and settlement with their conditional statements refused: every decision made on the locked
    account."""
    with (
        mock.patch.object(admission, "_hold_within_credit", return_value=False),
        mock.patch.object(metering, "debit_usage", side_effect=debit_refused),
    ):
        yield


def books(organization: Organization) -> dict[str, Any]:
    account = Account.objects.get(pk=organization.pk)
    open_holds = Hold.objects.filter(organization=organization, released_at=None)
    entries = CreditEntry.objects.filter(organization=organization)
    return {
        "balance": account.balance_micros,
        "held": account.held_micros,
        "open_holds": int(open_holds.aggregate(total=Sum("amount_micros"))["total"] or 0),
        "ledger": int(entries.aggregate(total=Sum("amount_micros"))["total"] or 0),
    }


def both_ways(act: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    with rolled_back():
        as_built = act()
    with rolled_back(), under_the_lock_only():
        locked = act()
    return as_built, locked


def set_balance(organization: Organization, balance: int) -> None:
    current = Account.objects.get(pk=organization.pk).balance_micros
    if balance != current:
        grant_credits(
            organization=organization, amount_micros=balance - current, reason="set up", kind=EntryKind.ADJUSTMENT
        )


@pytest.fixture
def world(tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None) -> dict[str, Any]:
    Organization.objects.filter(pk=tenant["organization"].pk).update(concurrency_limit=1_000)
    return {"organization": tenant["organization"], "api_key": tenant["api_key"], "endpoint": builtin_endpoint}


@DATABASE_EXAMPLES
@given(
    credit=st.integers(-3, 3),
    budget=st.one_of(st.none(), st.integers(-3, 3)),
    key_limit=st.one_of(st.none(), st.integers(-3, 3)),
    member_limit=st.one_of(st.none(), st.integers(-3, 3)),
    sent_with=st.sampled_from(["the key", "another key of its maker", "no key"]),
)
def test_admission_holds_and_refuses_exactly_as_under_the_lock(
    world: dict[str, Any],
    credit: int,
    budget: int | None,
    key_limit: int | None,
    member_limit: int | None,
    sent_with: str,
) -> None:
    """Each of credit, budget, key limit and the limit of the key's maker (shared by every key they made) leaves
    ``estimate + offset`` of room for one more job (another job of the key already holds its estimate): it is
    admitted exactly when every offset that applies to it is at least zero. The key's limit binds that key only; its
    maker's binds another key the maker makes after it was set too, never a request without a key."""
    organization, api_key, endpoint = world["organization"], world["api_key"], world["endpoint"]
    maker = api_key.created_by
    with rolled_back():
        running = lifecycle.submit(organization, endpoint, api_key=api_key)
        estimate = Hold.objects.get(job=running).amount_micros  # the same input: the same estimate
        held = Account.objects.get(pk=organization.pk).held_micros
        set_balance(organization, held + estimate + credit)
        if budget is not None:
            room = spent_this_month(organization_id=organization.pk) + held + estimate + budget
            controls.set_monthly_budget(organization=organization, budget_micros=room)
        if key_limit is not None:
            key_held = int(
                Hold.objects.filter(api_key=api_key, released_at=None).aggregate(t=Sum("amount_micros"))["t"]
            )
            spent = spent_this_month(organization_id=organization.pk, key_id=api_key.pk)
            controls.set_key_limit(api_key=api_key, monthly_limit_micros=spent + key_held + estimate + key_limit)
        if member_limit is not None:
            room = member_spent_this_month(organization_id=organization.pk, user_id=maker.pk) + member_held(
                organization_id=organization.pk, user_id=maker.pk
            )
            controls.set_member_limit(
                organization=organization, user=maker, monthly_limit_micros=room + estimate + member_limit
            )
        key: ApiKey | None = {
            "the key": api_key,
            "another key of its maker": create_api_key(
                organization=organization, name="another", scopes=[Scope.INFERENCE], created_by=maker
            )[0],
            "no key": None,
        }[sent_with]

        def submit() -> dict[str, Any]:
            try:
                job = lifecycle.submit(organization, endpoint, api_key=key)
            except submission.SubmissionRefused as refused:
                return {"refused": refused.error_type, **books(organization)}
            return {"held": Hold.objects.get(job=job).amount_micros, **books(organization)}

        as_built, locked = both_ways(submit)

    assert as_built == locked
    assert as_built["held"] == as_built["open_holds"]
    assert as_built["balance"] == as_built["ledger"]
    limits = (
        [credit]
        + ([budget] if budget is not None else [])
        + ([key_limit] if key_limit is not None and sent_with == "the key" else [])
        + ([member_limit] if member_limit is not None and key is not None else [])
    )
    assert ("refused" not in as_built) == (min(limits) >= 0)


@DATABASE_EXAMPLES
@given(
    balance=st.one_of(
        st.tuples(st.just("the cost plus"), st.integers(-3, 3)), st.tuples(st.just("any"), st.integers(-(10**6), 10**6))
    ),
    gpu_ms=st.integers(0, 60_000),
    outcome=st.sampled_from([AttemptOutcome.SUCCEEDED, AttemptOutcome.CANCELLED, AttemptOutcome.ERRORED]),
)
def test_settlement_debits_records_and_rolls_up_exactly_as_under_the_lock(
    world: dict[str, Any], balance: tuple[str, int], gpu_ms: int, outcome: AttemptOutcome
) -> None:
    """The balance is the cost (priced within the hold) plus a few micro-dollars either side, or anything; a refunded
    payment may have taken it below zero while the job ran."""
    organization, api_key, endpoint = world["organization"], world["api_key"], world["endpoint"]
    with rolled_back():
        job = lifecycle.start(lifecycle.submit(organization, endpoint, api_key=api_key))
        attempts.reserve_work(job=job, gpu_ms=gpu_ms // 2)  # the hold grew for part of the work, not all of it
        hold = Hold.objects.get(job=job).amount_micros
        price = pricing.price_for(endpoint, job.started_at, organization.pk).unit_price_micros
        priced = cost_within(
            unit="gpu_second", unit_price_micros=price, gpu_ms=gpu_ms, images=0, pixels=0, ceiling_micros=hold
        )[1]
        kind, amount = balance
        set_balance(organization, priced + amount if kind == "the cost plus" else amount)

        def settle() -> dict[str, Any]:
            lifecycle.finish(job, outcome, gpu_ms=gpu_ms, reserve=False)
            record = UsageRecord.objects.get(job=job)
            entry = CreditEntry.objects.filter(usage_record=record).values_list("amount_micros", "balance_after_micros")
            rollups = UsageRollup.objects.filter(organization=organization, granularity=Granularity.DAY)
            return {
                "record": (record.gpu_ms, record.unbilled_gpu_ms, record.billable_units, record.cost_micros),
                "entry": list(entry),
                "rolled_up": int(rollups.aggregate(total=Sum("cost_micros"))["total"] or 0),
                "hold_released": not Hold.objects.filter(job=job, released_at=None).exists(),
                **books(organization),
            }

        as_built, locked = both_ways(settle)
        before = max(Account.objects.get(pk=organization.pk).balance_micros, 0)

    assert as_built == locked
    cost = as_built["record"][3]
    assert cost <= hold
    assert cost <= before  # never below zero
    assert as_built["entry"] == ([(-cost, as_built["balance"])] if cost else [])
    assert as_built["held"] == as_built["open_holds"]
    assert as_built["balance"] == as_built["ledger"]
    assert as_built["hold_released"]
