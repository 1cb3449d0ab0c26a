"""A running job's hold, grown before each unit of work (``attempts.reserve_work``), to the micro-dollar.

The hold is reserved at the price the job is billed at, the one in force when it started, whatever price comes
into force while it runs; each job's reservation grows its own hold and no other. A reservation reads the hold,
then locks it and the account and reads them again: what another transaction changed in between (the job ended,
its hold grew, a budget was lowered) decides the answer, as if that transaction committed while this one waited for
the locks.

The built-in endpoint's opening price is 100 µ$ per CPU-second: 1 µ$ buys 10 ms, and ``h`` µ$ cover
``h x 10 + 4`` ms (4 ms more still cost ``h + 0.4``, which rounds down to ``h``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings

from accounts.models import Organization
from billing import admission, controls
from billing.models import Account, Hold, Price, UsageRecord
from inference import attempts
from inference.hooks import Refusal, Reservation
from inference.models import Endpoint, Job
from tests.lifecycle import finish, start, submit

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]


def books(job: Job) -> Account:
    return Account.objects.get(pk=job.organization_id)


def held_for(job: Job) -> int:
    return Hold.objects.get(job=job).amount_micros


def meanwhile(monkeypatch: pytest.MonkeyPatch, change: Callable[[], Any]) -> None:
    """Runs ``change`` once, right before the next reservation locks the job's hold and then the account (after its
    first read)."""
    lock = admission.locked_open_hold

    def lock_after_the_change(job_id: Any) -> Hold | None:
        monkeypatch.setattr(admission, "locked_open_hold", lock)
        change()
        return lock(job_id)

    monkeypatch.setattr(admission, "locked_open_hold", lock_after_the_change)


def test_a_price_change_while_a_job_runs_changes_neither_what_its_hold_covers_nor_what_it_pays(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = start(submit(tenant["organization"], builtin_endpoint, api_key=tenant["api_key"]))
    held = held_for(job)
    Price.objects.create(gpu_class="cpu", unit_price_micros=1_000)  # 10x, in force from now on

    # At the 100 µ$/s the job started at, its hold covers held x 10 + 4 ms: answered without growing it.
    assert attempts.reserve_work(job=job, gpu_ms=held * 10 + 4) == Reservation(covered_gpu_ms=held * 10 + 4)
    assert held_for(job) == held
    # 5 s more cost 500 µ$ at 100 µ$/s (5,000 at the new price): the hold grows by 500.
    grown = attempts.reserve_work(job=job, gpu_ms=held * 10 + 5_000)
    assert grown == Reservation(covered_gpu_ms=(held + 500) * 10 + 4)
    assert (held_for(job), books(job).held_micros) == (held + 500, held + 500)

    finish(job, gpu_ms=held * 10 + 5_000, reserve=False)
    record = UsageRecord.objects.get(job=job)
    assert (record.unit_price_micros, record.gpu_ms, record.cost_micros, record.unbilled_gpu_ms) == (
        100,
        held * 10 + 5_000,
        held + 500,
        0,
    )
    assert (books(job).balance_micros, books(job).held_micros) == (
        settings.BILLING_SIGNUP_CREDITS_MICROS - held - 500,
        0,
    )


def test_running_jobs_of_two_organizations_each_grow_their_own_hold(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    mine, theirs = tenant["organization"], other_tenant["organization"]
    Organization.objects.filter(pk=mine.pk).update(concurrency_limit=1_000)
    jobs = [
        start(submit(mine, builtin_endpoint, api_key=tenant["api_key"])),
        start(submit(mine, builtin_endpoint, api_key=tenant["api_key"])),
        start(submit(theirs, builtin_endpoint, api_key=other_tenant["api_key"])),
    ]
    held = [held_for(job) for job in jobs]
    # 100, 200 and 300 µ$ of work beyond each hold, in turn: each hold grows by its own job's need, no other.
    for job, amount, more in zip(jobs, held, (100, 200, 300), strict=True):
        gpu_ms = (amount + more) * 10
        assert attempts.reserve_work(job=job, gpu_ms=gpu_ms) == Reservation(covered_gpu_ms=gpu_ms + 4)
    assert [held_for(job) for job in jobs] == [held[0] + 100, held[1] + 200, held[2] + 300]
    assert (books(jobs[0]).held_micros, books(jobs[2]).held_micros) == (held[0] + held[1] + 300, held[2] + 300)


def test_a_reservation_that_meets_the_jobs_end_at_the_lock_holds_nothing_more(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = start(submit(tenant["organization"], builtin_endpoint, api_key=tenant["api_key"]))
    held = held_for(job)
    # The hold covers held x 10 + 4 ms, so 100 µ$ more of work needs the lock; the job ends first: 10 ms, 1 µ$.
    meanwhile(monkeypatch, lambda: finish(job, gpu_ms=10, reserve=False))
    assert attempts.reserve_work(job=job, gpu_ms=(held + 100) * 10) == Reservation(covered_gpu_ms=None)

    hold = Hold.objects.get(job=job)
    assert (hold.amount_micros, hold.released_at is not None) == (held, True)  # released, never grown
    assert UsageRecord.objects.get(job=job).cost_micros == 1
    assert (books(job).balance_micros, books(job).held_micros) == (settings.BILLING_SIGNUP_CREDITS_MICROS - 1, 0)


def test_work_that_the_hold_covers_by_the_time_of_the_lock_is_never_refused_nor_held_twice(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    organization = tenant["organization"]
    job = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    held = held_for(job)
    gpu_ms = (held + 100) * 10  # 100 µ$ beyond the hold

    def covered_then_budget_spent() -> None:
        # Another reservation of the same work grew the hold by exactly those 100 µ$...
        assert attempts.reserve_work(job=job, gpu_ms=gpu_ms) == Reservation(covered_gpu_ms=gpu_ms + 4)
        # ...and the budget was cut to nothing: no further credit may be set aside.
        controls.set_monthly_budget(organization=organization, budget_micros=0)

    meanwhile(monkeypatch, covered_then_budget_spent)
    assert attempts.reserve_work(job=job, gpu_ms=gpu_ms, ahead_ms=60_000) == Reservation(covered_gpu_ms=gpu_ms + 4)
    assert (held_for(job), books(job).held_micros) == (held + 100, held + 100)
    # 5 ms more cost 0.5 µ$, which rounds up to 1: beyond the budget, refused.
    refusal = attempts.reserve_work(job=job, gpu_ms=gpu_ms + 5)
    assert isinstance(refusal, Refusal)
    assert refusal.error_type == "spend_limit_exceeded"
    assert held_for(job) == held + 100


def test_a_limit_on_another_key_of_the_organization_does_not_limit_this_keys_reservations(
    tenant: dict[str, Any], make_key: Callable[..., Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    other_key, _ = make_key(organization)
    controls.set_key_limit(api_key=other_key, monthly_limit_micros=0)
    job = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    held = held_for(job)
    # 100 µ$ beyond the hold: the other key's limit has no room at all, this key has no limit.
    assert attempts.reserve_work(job=job, gpu_ms=(held + 100) * 10) == Reservation(covered_gpu_ms=(held + 100) * 10 + 4)
    assert held_for(job) == held + 100
