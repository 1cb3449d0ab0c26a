"""What a customer pays, to the micro-dollar, in the cases mutation testing found unpinned.

Each case is computed by hand in its comments: two organizations and two keys spending side by side (each limit
counts only its own), limits met exactly (equal admits, one micro-dollar less refuses), a price change between
attempts, endpoints billed per image and per megapixel (success, cancelled while running, a platform failure, a
settlement capped by what is left), rollup buckets at the edges of an hour and a day, and ``cost_within`` itself.

Per-image prices make admission's estimate exact (images x price), so limits can be set to the micro-dollar; a
GPU-second estimate depends on the GPU time measured so far, so those cases read the hold they got.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from accounts import key_cache
from accounts.models import ApiKey, AuditAction, AuditEvent, Organization
from billing import admission, controls, holds, pricing, topups
from billing.ledger import BillingError, account_of, grant_credits, refund_job
from billing.locks import locked_account
from billing.metering import add_amounts_to_rollups, add_to_rollups, bucket_start
from billing.models import (
    NO_KEY,
    Account,
    CreditEntry,
    EntryKind,
    Granularity,
    Hold,
    Price,
    PriceUnit,
    UsageRecord,
    UsageRollup,
)
from billing.money import (
    cost_micros,
    cost_within,
    divide_half_up,
    dollars_to_micros,
    format_micros,
    gpu_cost_micros,
    gpu_ms_within,
)
from inference import attempts, closing, requeue, submission
from inference.hooks import Refusal, Reservation
from inference.models import AttemptOutcome, Endpoint, Job, JobAttempt, JobStatus
from tests.lifecycle import finish, start, submit

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]

CPU_PRICE = 100  # µ$ per CPU-second: the opening rate card, the built-in endpoint's class
IMAGE_PRICE = 2_500  # µ$ per image
MEGAPIXEL_PRICE = 250_000  # µ$ per megapixel


# --- Helpers -----------------------------------------------------------------------------------------------------


def books(organization: Organization) -> Account:
    return Account.objects.get(pk=organization.pk)


def set_balance(organization: Organization, micros: int) -> None:
    """An operator's adjustment that leaves the balance at exactly ``micros``."""
    difference = micros - books(organization).balance_micros
    if difference:
        grant_credits(
            organization=organization, amount_micros=difference, reason="test: set the balance",
            kind=EntryKind.ADJUSTMENT,
        )  # fmt: skip


def refused(organization: Organization, endpoint: Endpoint, api_key: ApiKey | None, **payload: Any) -> Any:
    """The refusal of a submission that must be refused (nothing stored)."""
    jobs_before = Job.objects.count()
    with pytest.raises(submission.SubmissionRefused) as refusal:
        submit(organization, endpoint, api_key=api_key, **payload)
    assert Job.objects.count() == jobs_before
    assert refusal.value.status_code == 402
    return refusal.value


def admitted(organization: Organization, endpoint: Endpoint, api_key: ApiKey | None, **payload: Any) -> int:
    """Submits a request that must be admitted, then cancels it in the queue; the amount it held."""
    job = submit(organization, endpoint, api_key=api_key, **payload)
    held = Hold.objects.get(job=job).amount_micros
    assert closing.cancel_job(job=job) == "CANCELLATION_REQUESTED"  # gives its hold back, costs nothing
    return held


def run_images(organization: Organization, endpoint: Endpoint, api_key: ApiKey | None, images: int) -> Job:
    return finish(start(submit(organization, endpoint, api_key=api_key, num_images=images)), gpu_ms=1_000)


def run_seconds(organization: Organization, endpoint: Endpoint, api_key: ApiKey | None, gpu_ms: int) -> Job:
    return finish(start(submit(organization, endpoint, api_key=api_key)), gpu_ms=gpu_ms)


def usage_of(job: Job) -> dict[str, Any] | None:
    return admission.job_usage(Job.objects.select_related("endpoint").get(pk=job.pk))


def priced_endpoint(name: str, unit: str, micros: int) -> Endpoint:
    endpoint = Endpoint.objects.create(owner="test", name=name, kind="text-to-image", weights="builtin:tiny-sd")
    Price.objects.create(endpoint=endpoint, unit=unit, unit_price_micros=micros)
    return endpoint


@pytest.fixture
def per_image(db: None) -> Endpoint:
    return priced_endpoint("per-image", PriceUnit.IMAGE, IMAGE_PRICE)


@pytest.fixture
def per_megapixel(db: None) -> Endpoint:
    return priced_endpoint("per-megapixel", PriceUnit.MEGAPIXEL, MEGAPIXEL_PRICE)


@pytest.fixture
def two_organizations(tenant: dict[str, Any], other_tenant: dict[str, Any], make_key: Any) -> dict[str, Any]:
    """Organization A with keys A1 and A2, organization B with key B1; no concurrency limit in the way."""
    a, b = tenant["organization"], other_tenant["organization"]
    Organization.objects.filter(pk__in=[a.pk, b.pk]).update(concurrency_limit=1_000)
    a2, _ = make_key(a)
    return {"a": a, "b": b, "a1": tenant["api_key"], "a2": a2, "b1": other_tenant["api_key"]}


# --- Two organizations, two keys: each limit counts only its own ---------------------------------------------------


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_budget_key_limit_and_holds_count_only_their_own_organization_and_key(
    two_organizations: dict[str, Any], per_image: Endpoint, clock_held_in_the_hour: datetime
) -> None:
    a, b, a1, a2, b1 = (two_organizations[name] for name in ("a", "b", "a1", "a2", "b1"))
    run_images(b, per_image, b1, 4)  # B spends 4 x 2,500 = 10,000
    submit(b, per_image, api_key=b1, num_images=2)  # and holds 5,000
    run_images(a, per_image, a2, 2)  # key A2 spends 5,000
    submit(a, per_image, api_key=a2, num_images=1)  # and holds 2,500
    run_images(a, per_image, a1, 1)  # key A1 spends 2,500, holds nothing

    assert admission.spent_this_month(organization_id=a.pk) == 7_500  # A1 + A2, never B's
    assert admission.spent_this_month(organization_id=b.pk) == 10_000
    assert admission.spent_this_month(organization_id=a.pk, key_id=a1.pk) == 2_500
    assert admission.spent_this_month(organization_id=a.pk, key_id=a2.pk) == 5_000
    assert admission.spent_this_month(organization_id=b.pk, key_id=b1.pk) == 10_000
    assert (books(a).held_micros, books(b).held_micros) == (2_500, 5_000)

    # A's budget: 7,500 spent + 2,500 held + one more image = 12,500 admits it exactly; a micro-dollar less refuses.
    controls.set_monthly_budget(organization=a, budget_micros=12_500)
    assert admitted(a, per_image, a1, num_images=1) == 2_500
    controls.set_monthly_budget(organization=a, budget_micros=12_499)
    refusal = refused(a, per_image, a1, num_images=1)
    assert refusal.error_type == "spend_limit_exceeded"
    assert refusal.detail == (
        "The organization's monthly budget of $0.012499 is spent ($0.0075 used, $0.0025 held by running requests)."
    )
    # B's budget counts B alone: 10,000 + 5,000 + 2,500.
    controls.set_monthly_budget(organization=b, budget_micros=17_500)
    assert admitted(b, per_image, b1, num_images=1) == 2_500
    controls.set_monthly_budget(organization=b, budget_micros=17_499)
    assert refused(b, per_image, b1, num_images=1).error_type == "spend_limit_exceeded"
    controls.set_monthly_budget(organization=a, budget_micros=None)

    # Key A1: 2,500 spent, nothing held; A2's 5,000 spent and 2,500 held, and B's, are not A1's.
    controls.set_key_limit(api_key=a1, monthly_limit_micros=5_000)
    assert admitted(a, per_image, a1, num_images=1) == 2_500
    controls.set_key_limit(api_key=a1, monthly_limit_micros=4_999)
    refusal = refused(a, per_image, a1, num_images=1)
    assert (refusal.error_type, refusal.detail) == (
        "spend_limit_exceeded",
        "This API key's monthly limit of $0.004999 is spent ($0.0025 used).",
    )
    # Key A2: 5,000 spent + its own open hold of 2,500 (its finished job's hold, released, no longer counts).
    controls.set_key_limit(api_key=a2, monthly_limit_micros=10_000)
    assert admitted(a, per_image, a2, num_images=1) == 2_500
    controls.set_key_limit(api_key=a2, monthly_limit_micros=9_999)
    assert refused(a, per_image, a2, num_images=1).error_type == "spend_limit_exceeded"
    # A1's limit still binds only A1; a request without a key meets no key limit.
    assert admitted(a, per_image, None, num_images=1) == 2_500


def test_available_credit_exactly_equal_to_the_estimate_admits(
    two_organizations: dict[str, Any], per_image: Endpoint
) -> None:
    a, b, a1, b1 = (two_organizations[name] for name in ("a", "b", "a1", "b1"))
    submit(a, per_image, api_key=a1, num_images=2)  # A holds 5,000
    submit(b, per_image, api_key=b1, num_images=4)  # B's 10,000 held is B's alone
    set_balance(a, 5_000 + 7_500)  # available: 7,500 = three images
    assert admitted(a, per_image, a1, num_images=3) == 7_500
    set_balance(a, 5_000 + 7_499)
    refusal = refused(a, per_image, a1, num_images=3)
    assert (refusal.error_type, refusal.detail) == (
        "insufficient_credits",
        "Not enough credits: this request needs about $0.0075 and $0.007499 is available. Add credits in billing.",
    )
    set_balance(a, 4_000)  # below what A holds: available is -1,000, shown as nothing
    refusal = refused(a, per_image, a1, num_images=1)
    assert refusal.detail == (
        "Not enough credits: this request needs about $0.0025 and $0.00 is available. Add credits in billing."
    )


def test_when_two_limits_are_equally_tight_the_credit_is_named_then_the_budget(
    tenant: dict[str, Any], per_image: Endpoint
) -> None:
    organization, key = tenant["organization"], tenant["api_key"]
    set_balance(organization, 2_000)
    controls.set_monthly_budget(organization=organization, budget_micros=2_000)  # room 2,000 each, 2,500 wanted
    assert refused(organization, per_image, key).error_type == "insufficient_credits"  # checked first, kept on a tie
    set_balance(organization, 10_000)
    controls.set_key_limit(api_key=key, monthly_limit_micros=2_000)  # budget and key limit: 2,000 each
    refusal = refused(organization, per_image, key)
    assert refusal.error_type == "spend_limit_exceeded"
    assert "organization's monthly budget" in refusal.detail  # the budget was the tightest first


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_spent_this_month_starts_at_midnight_utc_on_the_first(
    two_organizations: dict[str, Any], builtin_endpoint: Endpoint, clock_held_in_the_hour: datetime
) -> None:
    a, a1 = two_organizations["a"], two_organizations["a1"]
    start_of_month = admission.month_start()
    assert (start_of_month.day, start_of_month.hour, start_of_month.minute, start_of_month.second) == (1, 0, 0, 0)
    assert start_of_month.microsecond == 0
    for recorded_at, cost in ((start_of_month - timedelta(microseconds=1), 1_000), (start_of_month, 30)):
        add_amounts_to_rollups(
            recorded_at=recorded_at, organization_id=a.pk, endpoint_id=builtin_endpoint.pk, key_id=a1.pk,
            gpu_class="cpu", amounts={"attempts": 1, "billable_attempts": 1, "gpu_ms": 10, "unbilled_gpu_ms": 0,
                                      "cost_micros": cost, "work_units": 1},
        )  # fmt: skip
    # Last month's 1,000 is not this month's; the first microsecond of this month is.
    assert admission.spent_this_month(organization_id=a.pk) == 30
    assert admission.spent_this_month(organization_id=a.pk, key_id=a1.pk) == 30


# --- Hold extensions while a job runs: the same limits, to the micro-dollar ---------------------------------------


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_hold_extension_meets_each_limit_exactly_and_counts_only_its_own(
    two_organizations: dict[str, Any], builtin_endpoint: Endpoint, clock_held_in_the_hour: datetime
) -> None:
    a, b, a1, a2, b1 = (two_organizations[name] for name in ("a", "b", "a1", "a2", "b1"))
    run_seconds(b, builtin_endpoint, b1, 10_000)  # B spends 1,000
    theirs = start(submit(b, builtin_endpoint, api_key=b1))
    assert isinstance(attempts.reserve_work(job=theirs, gpu_ms=500_000), Reservation)  # B holds 50,000 for it
    run_seconds(a, builtin_endpoint, a2, 20_000)  # key A2 spends 2,000
    sibling = start(submit(a, builtin_endpoint, api_key=a2))
    assert isinstance(attempts.reserve_work(job=sibling, gpu_ms=400_000), Reservation)  # A2 holds 40,000
    run_seconds(a, builtin_endpoint, a1, 3_000)  # key A1 spends 300
    job = start(submit(a, builtin_endpoint, api_key=a1))
    held = Hold.objects.get(job=job).amount_micros
    others = {theirs.pk: 50_000, sibling.pk: 40_000}
    assert {pk: Hold.objects.get(job_id=pk).amount_micros for pk in others} == others

    # Exactly covered: answered from the hold and the account, no extension (ms at 100 µ$/s: 10 per µ$, +4 ms that
    # still round down to the hold).
    covered = gpu_ms_within(held, CPU_PRICE)
    assert covered == held * 10 + 4
    assert attempts.reserve_work(job=job, gpu_ms=covered) == Reservation(covered_gpu_ms=covered)
    assert Hold.objects.get(job=job).amount_micros == held

    # Key A1's limit: 300 spent + `held` held + 50 more exactly: the extension fits, then not a micro-dollar more.
    # With no look-ahead the hold grows by what the work needs: (held + 40) x 10 + 4 ms cost held + 40.4 -> held + 40.
    controls.set_key_limit(api_key=a1, monthly_limit_micros=300 + held + 50)
    grown = attempts.reserve_work(job=job, gpu_ms=(held + 40) * 10 + 4)
    assert grown == Reservation(covered_gpu_ms=(held + 40) * 10 + 4)
    assert Hold.objects.get(job=job).amount_micros == held + 40
    grown = attempts.reserve_work(job=job, gpu_ms=(held + 50) * 10, ahead_ms=10**9)
    assert grown == Reservation(covered_gpu_ms=(held + 50) * 10 + 4)
    assert Hold.objects.get(job=job).amount_micros == held + 50
    refusal = attempts.reserve_work(job=job, gpu_ms=(held + 51) * 10)
    assert isinstance(refusal, Refusal)
    assert refusal.error_type == "spend_limit_exceeded"
    assert Hold.objects.get(job=job).amount_micros == held + 50
    controls.set_key_limit(api_key=a1, monthly_limit_micros=None)

    # A's budget: 2,300 spent + 40,000 and held + 50 held + 70 more; B's spending and holds are not A's. Asked to
    # look far ahead, the hold grows to all the room (70), not only the 20 the work needs.
    controls.set_monthly_budget(organization=a, budget_micros=2_300 + 40_000 + held + 50 + 70)
    ahead = attempts.reserve_work(job=job, gpu_ms=(held + 70) * 10, ahead_ms=10**9)
    assert ahead == Reservation(covered_gpu_ms=(held + 120) * 10 + 4)
    assert Hold.objects.get(job=job).amount_micros == held + 120
    refusal = attempts.reserve_work(job=job, gpu_ms=(held + 121) * 10)
    assert isinstance(refusal, Refusal)
    assert refusal.error_type == "spend_limit_exceeded"
    controls.set_monthly_budget(organization=a, budget_micros=None)

    # The available credit: exactly 31 more, what (held + 150) x 10 + 5 ms cost (held + 150.5 -> held + 151) beyond
    # the hold. A negative look-ahead never shrinks what the work itself needs.
    set_balance(a, books(a).held_micros + 31)
    assert attempts.reserve_work(job=job, gpu_ms=(held + 150) * 10 + 5, ahead_ms=-10_000) == Reservation(
        covered_gpu_ms=(held + 151) * 10 + 4
    )
    assert books(a).available_micros == 0
    refusal = attempts.reserve_work(job=job, gpu_ms=(held + 151) * 10 + 5)  # 0.5 µ$ more rounds up to 1
    assert isinstance(refusal, Refusal)
    assert (refusal.error_type, refusal.detail) == ("insufficient_credits", "Credits ran out while this request ran.")
    # Only this job's hold ever grew.
    assert {pk: Hold.objects.get(job_id=pk).amount_micros for pk in others} == others

    # Settled within the hold: the available credit stays at zero, the balance pays exactly what was held.
    balance = books(a).balance_micros
    finish(job, gpu_ms=(held + 150) * 10 + 5, reserve=False)
    record = UsageRecord.objects.get(job=job)
    assert (record.gpu_ms, record.cost_micros, record.unbilled_gpu_ms) == ((held + 150) * 10 + 5, held + 151, 0)
    assert (books(a).balance_micros, books(a).held_micros) == (balance - held - 151, 40_000)
    # Ended, it holds nothing: there is nothing left to extend.
    assert attempts.reserve_work(job=job, gpu_ms=1) == Reservation(covered_gpu_ms=None)


# Committed, as a deployed rate card is: a memo keeps nothing a transaction read after changing a kept row (the
# test's own transaction, had the fixtures written the endpoints and prices inside it).
@pytest.mark.django_db(transaction=True)
def test_a_hold_that_already_covers_the_work_is_answered_from_three_reads(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, django_assert_num_queries: Any
) -> None:
    job = start(submit(tenant["organization"], builtin_endpoint, api_key=tenant["api_key"]))
    covered = gpu_ms_within(Hold.objects.get(job=job).amount_micros, CPU_PRICE)
    # The job's open hold, the account's balance and holds, the price in force when the job started (kept from the
    # submission where the cache is shared: accounts/memo.py).
    with django_assert_num_queries(3 - (key_cache.generation() is not None)):
        assert attempts.reserve_work(job=job, gpu_ms=covered) == Reservation(covered_gpu_ms=covered)


def test_a_balance_exactly_equal_to_what_is_held_keeps_running_jobs_going(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    set_balance(organization, books(organization).held_micros)  # nothing available, nothing owed
    beat = attempts.heartbeat(job_id=str(job.pk), attempt=job.attempt, step=1, total=2, gpu_ms=10)
    assert beat.keep_going
    assert isinstance(attempts.reserve_work(job=job, gpu_ms=1), Reservation)
    set_balance(organization, books(organization).held_micros - 1)  # a refund took one micro-dollar of it
    beat = attempts.heartbeat(job_id=str(job.pk), attempt=job.attempt, step=1, total=2, gpu_ms=10)
    assert (beat.keep_going, beat.error_type) == (False, "insufficient_credits")
    # Another organization's books are its own: its job goes on.
    other = other_tenant["organization"]
    theirs = start(submit(other, builtin_endpoint, api_key=other_tenant["api_key"]))
    assert attempts.heartbeat(job_id=str(theirs.pk), attempt=theirs.attempt, step=1, total=2, gpu_ms=10).keep_going


# --- A price change between attempts, and between admission and start --------------------------------------------


def test_a_retry_after_a_price_change_is_billed_at_the_price_in_force_when_the_job_started(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    opening = Price.objects.get(gpu_class="cpu", endpoint=None)
    job = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    finish(job, AttemptOutcome.ERRORED, gpu_ms=900, cold_start_ms=300, error="CUDA out of memory", retry=True)
    first_attempt = JobAttempt.objects.get(job=job, number=1)
    raised = Price.objects.create(gpu_class="cpu", unit_price_micros=1_000)  # 10x, in force from now on
    balance = books(organization).balance_micros
    finish(start(job), gpu_ms=2_000)

    first, second = UsageRecord.objects.filter(job=job).order_by("attempt_number")
    # The platform's failure: recorded at no cost, when that attempt ended (not when the job did).
    assert (first.billable, first.gpu_ms, first.unbilled_gpu_ms, first.cost_micros) == (False, 0, 1_200, 0)
    assert first.work_units == 0
    assert first.recorded_at == first_attempt.finished_at
    # The retry: 2.000 s at the opening 100 µ$/s (the job started before the raise) = 200 µ$.
    assert (second.price_id, second.unit_price_micros, second.billable_units, second.cost_micros) == (
        opening.pk,
        100,
        Decimal(2),
        200,
    )
    assert second.price_id != raised.pk
    assert second.work_units == 2  # 2 steps x 1 image x one 512² tile
    assert CreditEntry.objects.get(usage_record=second).amount_micros == -200
    assert books(organization).balance_micros == balance - 200
    expected = {
        "gpu_class": "cpu", "gpu_ms": 2_000, "billable_units": 2.0, "unit": "gpu_second", "unit_price_micros": 100,
        "cost_micros": 200,
    }  # fmt: skip
    assert usage_of(job) == expected
    status = tenant["client"].get(f"/queue/platform/tiny-sd/requests/{job.pk}/status").json()
    assert status["usage"] == expected


def test_a_price_cut_between_admission_and_start_bills_the_price_in_force_at_the_start(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = submit(organization, builtin_endpoint, api_key=tenant["api_key"])
    assert Hold.objects.get(job=job).unit_price_micros == 100  # held at the price when admitted
    cut = Price.objects.create(gpu_class="cpu", unit_price_micros=10)
    job = start(job)
    assert usage_of(job) is None  # not final: no usage object yet
    balance = books(organization).balance_micros
    finish(job, gpu_ms=2_345)
    record = UsageRecord.objects.get(job=job)
    # 2.345 s x 10 µ$/s = 23.45 µ$ -> 23.
    assert (record.price_id, record.unit_price_micros, record.gpu_ms, record.cost_micros) == (cut.pk, 10, 2_345, 23)
    assert books(organization).balance_micros == balance - 23
    assert books(organization).held_micros == 0
    assert usage_of(job) == {
        "gpu_class": "cpu", "gpu_ms": 2_345, "billable_units": 2.345, "unit": "gpu_second", "unit_price_micros": 10,
        "cost_micros": 23,
    }  # fmt: skip


def test_a_price_raise_between_admission_and_start_still_bills_all_the_measured_time(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = submit(organization, builtin_endpoint, api_key=tenant["api_key"])
    Price.objects.create(gpu_class="cpu", unit_price_micros=1_000)
    job = start(job)
    finish(job, gpu_ms=50_000)  # reserves 50 s first, as a worker does step by step; credit is plentiful
    record = UsageRecord.objects.get(job=job)
    # The hold grew at the price the job is billed at (the one in force when it started, 1,000 µ$/s): all 50 s are
    # billed, 50,000 µ$, nothing is recorded unbilled while the organization has credit.
    assert (record.unit_price_micros, record.gpu_ms, record.unbilled_gpu_ms) == (1_000, 50_000, 0)
    assert record.cost_micros == gpu_cost_micros(50_000, 1_000) == 50_000


def test_the_usage_of_a_job_that_was_never_billed_shows_the_price_when_it_started_or_was_submitted(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization, key = tenant["organization"], tenant["api_key"]
    failed = submit(organization, builtin_endpoint, api_key=key)
    queued = submit(organization, builtin_endpoint, api_key=key)
    Price.objects.create(gpu_class="cpu", unit_price_micros=1_000)
    finish(start(failed), AttemptOutcome.ERRORED, gpu_ms=700, error="CUDA out of memory")  # no retry: it failed
    closing.cancel_job(job=queued)  # never started
    nothing = {"gpu_class": "cpu", "gpu_ms": 0, "billable_units": 0.0, "unit": "gpu_second", "cost_micros": 0}
    assert usage_of(failed) == {**nothing, "unit_price_micros": 1_000}  # the price when it started
    assert usage_of(queued) == {**nothing, "unit_price_micros": 100}  # the price when it was submitted


def test_a_requeued_job_billed_twice_shows_the_sum_at_its_last_price(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    closing.cancel_job(job=job)
    finish(job, AttemptOutcome.CANCELLED, gpu_ms=500, error="Cancelled by request.", error_type="cancelled")
    Price.objects.create(gpu_class="cpu", unit_price_micros=1_000)
    assert requeue.requeue_job(job=job)
    finish(start(Job.objects.get(pk=job.pk)), gpu_ms=2_000)
    first, second = UsageRecord.objects.filter(job=job).order_by("attempt_number")
    assert (first.unit_price_micros, first.cost_micros) == (100, 50)  # 0.5 s at 100 µ$/s
    assert (second.unit_price_micros, second.cost_micros) == (1_000, 2_000)  # 2 s at the new 1,000 µ$/s
    assert usage_of(job) == {
        "gpu_class": "cpu", "gpu_ms": 2_500, "billable_units": 2.5, "unit": "gpu_second", "unit_price_micros": 1_000,
        "cost_micros": 2_050,
    }  # fmt: skip
    refund = refund_job(job=job)  # both billed attempts, once
    assert (refund.amount_micros, refund.description) == (2_050, f"Refund of request {job.pk}")


# --- Billed per image and per megapixel --------------------------------------------------------------------------


def test_per_image_success_cancel_platform_failure_and_capped_settlement(
    tenant: dict[str, Any], per_image: Endpoint
) -> None:
    organization, key = tenant["organization"], tenant["api_key"]
    signup = settings.BILLING_SIGNUP_CREDITS_MICROS
    Organization.objects.filter(pk=organization.pk).update(concurrency_limit=1_000)

    succeeded = submit(organization, per_image, api_key=key, num_images=3)
    assert Hold.objects.get(job=succeeded).amount_micros == 7_500  # exact: 3 x 2,500
    finish(start(succeeded), gpu_ms=1_800, cold_start_ms=400)
    record = UsageRecord.objects.get(job=succeeded)
    assert (record.unit, record.billable_units, record.cost_micros) == ("image", Decimal(3), 7_500)
    assert (record.gpu_ms, record.unbilled_gpu_ms) == (1_800, 400)  # GPU time recorded whatever the unit
    assert CreditEntry.objects.get(usage_record=record).amount_micros == -7_500
    assert usage_of(succeeded) == {
        "gpu_class": "cpu", "gpu_ms": 1_800, "billable_units": 3.0, "unit": "image", "unit_price_micros": 2_500,
        "cost_micros": 7_500,
    }  # fmt: skip
    assert (books(organization).balance_micros, books(organization).held_micros) == (signup - 7_500, 0)

    # Cancelled while running: billable, but no image was produced, so it costs nothing; its hold is given back.
    cancelled = start(submit(organization, per_image, api_key=key, num_images=3))
    # Priced by output, the hold was whole at admission: any GPU time is covered, nothing to extend.
    assert attempts.reserve_work(job=cancelled, gpu_ms=10**9) == Reservation(covered_gpu_ms=None)
    assert Hold.objects.get(job=cancelled).amount_micros == 7_500
    assert books(organization).held_micros == 7_500
    closing.cancel_job(job=cancelled)
    finish(cancelled, AttemptOutcome.CANCELLED, gpu_ms=700, error="Cancelled by request.", error_type="cancelled")
    record = UsageRecord.objects.get(job=cancelled)
    assert (record.billable, record.billable_units, record.cost_micros) == (True, Decimal(0), 0)
    assert (record.gpu_ms, record.unbilled_gpu_ms) == (700, 0)
    assert not CreditEntry.objects.filter(usage_record=record).exists()
    assert usage_of(cancelled) == {
        "gpu_class": "cpu", "gpu_ms": 700, "billable_units": 0.0, "unit": "image", "unit_price_micros": 2_500,
        "cost_micros": 0,
    }  # fmt: skip
    assert (books(organization).balance_micros, books(organization).held_micros) == (signup - 7_500, 0)

    # The platform's failure: nothing billed, all its GPU time recorded unbilled.
    crashed = start(submit(organization, per_image, api_key=key, num_images=2))
    finish(crashed, AttemptOutcome.ERRORED, gpu_ms=1_200, cold_start_ms=300, error="CUDA out of memory")
    record = UsageRecord.objects.get(job=crashed)
    assert (record.billable, record.billable_units, record.cost_micros) == (False, Decimal(0), 0)
    assert (record.gpu_ms, record.unbilled_gpu_ms) == (0, 1_500)
    with pytest.raises(BillingError, match="cost nothing"):
        refund_job(job=crashed)
    assert (books(organization).balance_micros, books(organization).held_micros) == (signup - 7_500, 0)

    # Capped: a dispute took the balance to 6,000 while 7,500 was held. Whole images that fit: 2 (5,000 µ$), and
    # two thirds of the GPU time (1,800 x 2 // 3 = 1,200 ms); the other 600 ms are recorded unbilled.
    capped = start(submit(organization, per_image, api_key=key, num_images=3))
    set_balance(organization, 6_000)
    finish(capped, gpu_ms=1_800)
    record = UsageRecord.objects.get(job=capped)
    assert (record.billable_units, record.cost_micros, record.gpu_ms, record.unbilled_gpu_ms) == (
        Decimal(2),
        5_000,
        1_200,
        600,
    )
    assert (books(organization).balance_micros, books(organization).held_micros) == (1_000, 0)


def test_per_megapixel_success_cancel_and_capped_settlement(tenant: dict[str, Any], per_megapixel: Endpoint) -> None:
    organization, key = tenant["organization"], tenant["api_key"]
    Organization.objects.filter(pk=organization.pk).update(concurrency_limit=1_000)

    # 3 images of 64 x 64 = 12,288 pixels = 0.012288 MP x 250,000 µ$ = 3,072 µ$, held exactly.
    succeeded = submit(organization, per_megapixel, api_key=key, num_images=3)
    assert Hold.objects.get(job=succeeded).amount_micros == 3_072
    finish(start(succeeded), gpu_ms=1_800)
    record = UsageRecord.objects.get(job=succeeded)
    assert (record.unit, record.billable_units, record.cost_micros, record.gpu_ms) == (
        "megapixel",
        Decimal("0.012288"),
        3_072,
        1_800,
    )

    cancelled = start(submit(organization, per_megapixel, api_key=key, num_images=3))
    closing.cancel_job(job=cancelled)
    finish(cancelled, AttemptOutcome.CANCELLED, gpu_ms=600, error="Cancelled by request.", error_type="cancelled")
    record = UsageRecord.objects.get(job=cancelled)
    assert (record.billable_units, record.cost_micros, record.gpu_ms) == (Decimal(0), 0, 600)

    # Capped at a balance of 1,000 µ$: whole pixels whose cost rounds to at most 1,000: (1,000 x 10⁶ + 499,999) //
    # 250,000 = 4,001 pixels (1,000.25 µ$ -> 1,000); GPU time 1,800 x 4,001 // 12,288 = 586 ms billed, 1,214 not.
    capped = start(submit(organization, per_megapixel, api_key=key, num_images=3))
    set_balance(organization, 1_000)
    finish(capped, gpu_ms=1_800)
    record = UsageRecord.objects.get(job=capped)
    assert (record.billable_units, record.cost_micros, record.gpu_ms, record.unbilled_gpu_ms) == (
        Decimal("0.004001"),
        1_000,
        586,
        1_214,
    )
    assert (books(organization).balance_micros, books(organization).held_micros) == (0, 0)


def test_a_gpu_second_settlement_capped_by_the_balance_never_takes_it_below_zero(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    attempts.reserve_work(job=job, gpu_ms=10_000)  # the worker reserved all of it...
    assert Hold.objects.get(job=job).amount_micros >= 1_000
    set_balance(organization, 333)  # ...then a refunded payment took the balance down to 333 µ$
    finish(job, gpu_ms=10_000, reserve=False)  # 1,000 µ$ of work
    record = UsageRecord.objects.get(job=job)
    # The most ms whose cost rounds to at most 333 µ$: (333,000 + 499) // 100 = 3,334 (333.4 -> 333).
    assert (record.gpu_ms, record.cost_micros, record.unbilled_gpu_ms) == (3_334, 333, 6_666)
    assert record.billable_units == Decimal("3.334")
    assert (books(organization).balance_micros, books(organization).held_micros) == (0, 0)


# --- cost_within: the settlement's ceiling -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "price", "gpu_ms", "images", "pixels", "ceiling", "expected"),
    [
        # Under or at the ceiling: cost_micros unchanged, all the GPU time billed.
        ("gpu_second", 100, 1_235, 0, 0, 124, (Decimal("1.235"), 124, 1_235)),
        ("gpu_second", 100, 1_235, 0, 0, 10**6, (Decimal("1.235"), 124, 1_235)),
        ("image", 2_500, 1_800, 3, 12_288, 7_500, (Decimal(3), 7_500, 1_800)),
        ("megapixel", 250_000, 1_800, 3, 12_288, 3_072, (Decimal("0.012288"), 3_072, 1_800)),
        # Free: nothing to pay, even with nothing left (settlement's ceiling is never below zero).
        ("gpu_second", 0, 5_000, 0, 0, 0, (Decimal(5), 0, 5_000)),
        ("image", 0, 5_000, 2, 0, 0, (Decimal(2), 0, 5_000)),
        ("megapixel", 0, 5_000, 1, 4_096, 0, (Decimal("0.004096"), 0, 5_000)),
        # Over: whole ms, images or pixels that fit; the GPU time shrinks in proportion, rounded down.
        ("gpu_second", 100, 1_235, 0, 0, 123, (Decimal("1.234"), 123, 1_234)),  # (123,000 + 499) // 100
        ("gpu_second", 100, 10_000, 0, 0, 333, (Decimal("3.334"), 333, 3_334)),
        ("gpu_second", 7, 10_000, 0, 0, 1, (Decimal("0.214"), 1, 214)),  # (1,000 + 499) // 7; 1.498 -> 1
        ("gpu_second", 100, 1_235, 0, 0, 0, (Decimal("0.004"), 0, 4)),  # 0.4 µ$ rounds to nothing
        ("gpu_second", 100, 1_235, 0, 0, -50, (Decimal("0.004"), 0, 4)),  # a ceiling below zero is zero
        ("image", 2_500, 1_800, 3, 12_288, 7_499, (Decimal(2), 5_000, 1_200)),
        ("image", 2_500, 1_800, 3, 12_288, 4_999, (Decimal(1), 2_500, 600)),
        ("image", 2_500, 1_800, 3, 12_288, 0, (Decimal(0), 0, 0)),
        ("image", 2_500, 1_801, 3, 12_288, 2_500, (Decimal(1), 2_500, 600)),  # 1,801 // 3 rounds down
        ("megapixel", 250_000, 1_800, 3, 12_288, 1_000, (Decimal("0.004001"), 1_000, 586)),
        ("megapixel", 250_000, 1_800, 3, 12_288, 3_071, (Decimal("0.012285"), 3_071, 1_799)),
        ("megapixel", 7_777, 1_800, 3, 12_288, 50, (Decimal("0.006493"), 50, 951)),
        ("megapixel", 250_000, 1_800, 3, 12_288, -1, (Decimal("0.000001"), 0, 0)),  # 0.25 µ$ rounds to nothing
        # At 1 µ$/MP, 499,999 pixels still round to 0 µ$; the 500,000th would cost 1.
        ("megapixel", 1, 1_000, 1, 1_000_000, 0, (Decimal("0.499999"), 0, 499)),
    ],
)
def test_cost_within_bills_what_fits_under_the_ceiling(
    unit: str, price: int, gpu_ms: int, images: int, pixels: int, ceiling: int, expected: tuple[Decimal, int, int]
) -> None:
    assert (
        cost_within(
            unit=unit, unit_price_micros=price, gpu_ms=gpu_ms, images=images, pixels=pixels, ceiling_micros=ceiling
        )
        == expected
    )


def test_cost_within_refuses_an_unknown_unit() -> None:
    with pytest.raises(ValueError, match="unknown price unit"):
        cost_within(unit="token", unit_price_micros=1, gpu_ms=1, images=1, pixels=1, ceiling_micros=0)


def test_gpu_ms_within_is_the_most_time_a_sum_pays_for() -> None:
    assert gpu_ms_within(124, 100) == 1_244  # 124.4 µ$ rounds down to 124; 1,245 ms would cost 124.5 -> 125
    assert gpu_cost_micros(1_244, 100) == 124
    assert gpu_cost_micros(1_245, 100) == 125
    assert gpu_ms_within(0, 1_110) == 0
    assert gpu_ms_within(-5, 100) == 0  # nothing to spend, no time
    assert gpu_ms_within(1, 3) == 499  # 1.497 µ$ -> 1; 500 ms would cost 1.5 -> 2
    with pytest.raises(ValueError, match="free price"):
        gpu_ms_within(100, 0)


@hypothesis_settings(database=None, deadline=None)
@given(
    unit=st.sampled_from(["gpu_second", "image", "megapixel"]),
    price=st.integers(min_value=1, max_value=5_000_000),
    gpu_ms=st.integers(min_value=0, max_value=10**7),
    images=st.integers(min_value=1, max_value=8),
    side=st.integers(min_value=1, max_value=2_048),
    ceiling=st.integers(min_value=-1_000, max_value=10**8),
)
def test_cost_within_never_bills_above_the_ceiling_and_bills_all_that_fits(
    unit: str, price: int, gpu_ms: int, images: int, side: int, ceiling: int
) -> None:
    pixels = side * side * images
    units, cost, billed_ms = cost_within(
        unit=unit, unit_price_micros=price, gpu_ms=gpu_ms, images=images, pixels=pixels, ceiling_micros=ceiling
    )
    full_units, full_cost = cost_micros(unit=unit, unit_price_micros=price, gpu_ms=gpu_ms, images=images, pixels=pixels)
    assert 0 <= billed_ms <= gpu_ms
    if full_cost <= ceiling:
        assert (units, cost, billed_ms) == (full_units, full_cost, gpu_ms)
        return
    assert 0 <= cost <= max(ceiling, 0)
    # What was billed is priced by the one rule, and one more unit (ms, image, pixel) would not have fit. (All of it
    # fits where it rounds to nothing and the ceiling is below zero.)
    room = max(ceiling, 0)
    if unit == "gpu_second":
        assert units == Decimal(billed_ms) / 1000
        assert cost == gpu_cost_micros(billed_ms, price)
        assert billed_ms == gpu_ms or gpu_cost_micros(billed_ms + 1, price) > room
    elif unit == "image":
        billed_images = int(units)
        assert units == billed_images
        assert cost == billed_images * price
        assert billed_images == images or (billed_images + 1) * price > room
        assert billed_ms == gpu_ms * billed_images // images
    else:
        billed_pixels = int(units * 1_000_000)
        assert units * 1_000_000 == billed_pixels
        assert cost == cost_micros(unit=unit, unit_price_micros=price, gpu_ms=0, images=0, pixels=billed_pixels)[1]
        one_more = cost_micros(unit=unit, unit_price_micros=price, gpu_ms=0, images=0, pixels=billed_pixels + 1)[1]
        assert billed_pixels == pixels or one_more > room
        assert billed_ms == gpu_ms * billed_pixels // pixels


# --- Rollup buckets: the edges of an hour and a day, in any time zone --------------------------------------------

PLUS_TWO = timezone(timedelta(hours=2))
INDIA = timezone(timedelta(hours=5, minutes=30))
PACIFIC = timezone(timedelta(hours=-8))


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("moment", "hour", "day"),
    [
        (utc(2026, 3, 31, 23, 59, 59, 999_999), utc(2026, 3, 31, 23), utc(2026, 3, 31)),
        (utc(2026, 4, 1, 0, 0, 0), utc(2026, 4, 1, 0), utc(2026, 4, 1)),
        (datetime(2026, 4, 1, 1, 30, tzinfo=PLUS_TWO), utc(2026, 3, 31, 23), utc(2026, 3, 31)),  # 23:30 UTC
        (datetime(2026, 4, 1, 5, 29, 59, 999_999, tzinfo=INDIA), utc(2026, 3, 31, 23), utc(2026, 3, 31)),
        (datetime(2026, 3, 31, 16, 0, tzinfo=PACIFIC), utc(2026, 4, 1, 0), utc(2026, 4, 1)),  # midnight UTC
        (datetime(2026, 3, 31, 15, 59, 59, 999_999, tzinfo=PACIFIC), utc(2026, 3, 31, 23), utc(2026, 3, 31)),
    ],
)
def test_bucket_start_is_the_utc_hour_and_day(moment: datetime, hour: datetime, day: datetime) -> None:
    assert bucket_start(moment, Granularity.HOUR) == hour
    assert bucket_start(moment, Granularity.DAY) == day
    assert bucket_start(moment, Granularity.DAY).utcoffset() == timedelta(0)


def test_usage_at_the_edges_of_an_hour_and_a_day_lands_in_the_right_rows(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization, key = tenant["organization"], tenant["api_key"]

    def record(recorded_at: datetime, *, billable: bool, gpu_ms: int, unbilled: int, cost: int, work: int,
               api_key: ApiKey | None = key) -> None:  # fmt: skip
        add_to_rollups(
            UsageRecord(
                organization=organization, endpoint=builtin_endpoint, api_key=api_key, gpu_class="cpu",
                billable=billable, gpu_ms=gpu_ms, unbilled_gpu_ms=unbilled, cost_micros=cost, work_units=work,
                recorded_at=recorded_at,
            )
        )  # fmt: skip

    record(datetime(2026, 3, 31, 5, 0, tzinfo=UTC), billable=True, gpu_ms=8_000, unbilled=0, cost=800, work=16)
    record(datetime(2026, 3, 31, 23, 59, 59, 999_000, tzinfo=UTC), billable=True, gpu_ms=1_000, unbilled=10, cost=100,
           work=2)  # fmt: skip
    record(datetime(2026, 4, 1, 1, 30, tzinfo=PLUS_TWO), billable=False, gpu_ms=0, unbilled=300, cost=0, work=0)
    record(datetime(2026, 4, 1, 0, 0, tzinfo=UTC), billable=True, gpu_ms=2_000, unbilled=20, cost=200, work=4)
    record(datetime(2026, 4, 1, 5, 29, 59, tzinfo=INDIA), billable=True, gpu_ms=4_000, unbilled=0, cost=400, work=8,
           api_key=None)  # fmt: skip

    def rows(key_id: Any) -> dict[tuple[str, datetime], tuple[int, ...]]:
        return {
            (row.granularity, row.bucket_start): (
                row.attempts, row.billable_attempts, row.gpu_ms, row.unbilled_gpu_ms, row.cost_micros, row.work_units
            )
            for row in UsageRollup.objects.filter(organization=organization, key_id=key_id)
        }  # fmt: skip

    march_31, april_1 = datetime(2026, 3, 31, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    assert rows(key.pk) == {
        ("hour", march_31.replace(hour=5)): (1, 1, 8_000, 0, 800, 16),
        ("hour", march_31.replace(hour=23)): (2, 1, 1_000, 310, 100, 2),  # 23:59:59.999 and 01:30+02:00
        ("hour", april_1): (1, 1, 2_000, 20, 200, 4),
        ("day", march_31): (3, 2, 9_000, 310, 900, 18),
        ("day", april_1): (1, 1, 2_000, 20, 200, 4),
    }
    assert rows(NO_KEY) == {  # usage without a key rolls up under the all-zeros key
        ("hour", march_31.replace(hour=23)): (1, 1, 4_000, 0, 400, 8),
        ("day", march_31): (1, 1, 4_000, 0, 400, 8),
    }


# --- The ledger's guards on who pays ------------------------------------------------------------------------------


def test_an_idempotency_key_of_one_organization_never_moves_another_organizations_credit(
    tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    mine, theirs = tenant["organization"], other_tenant["organization"]
    entry = grant_credits(organization=mine, amount_micros=5, reason="promo", idempotency_key="promo-x")
    with pytest.raises(BillingError, match="different movement"):
        grant_credits(organization=theirs, amount_micros=5, reason="promo", idempotency_key="promo-x")
    assert books(theirs).balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS
    assert books(mine).balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS + 5
    [audit] = AuditEvent.objects.filter(action=AuditAction.CREDITS_GRANTED, target_id=str(entry.pk))
    assert audit.metadata == {"amount_micros": 5, "reason": "promo"}
    adjustment = grant_credits(organization=mine, amount_micros=-5, reason="oops", kind=EntryKind.ADJUSTMENT)
    assert AuditEvent.objects.filter(action=AuditAction.CREDITS_ADJUSTED, target_id=str(adjustment.pk)).count() == 1


def test_every_debit_and_only_a_debit_checks_for_an_automatic_top_up(
    tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[int] = []
    monkeypatch.setattr(topups, "schedule_if_low", lambda account: checked.append(account.balance_micros))
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=1, reason="test")
    assert checked == []
    grant_credits(organization=organization, amount_micros=-1, reason="test", kind=EntryKind.ADJUSTMENT)
    assert checked == [settings.BILLING_SIGNUP_CREDITS_MICROS]  # the smallest debit, with the balance after it


def test_a_job_cancelled_in_the_queue_is_never_billed_even_after_its_organizations_other_jobs_ran(
    two_organizations: dict[str, Any], per_image: Endpoint
) -> None:
    a, b, a1, b1 = (two_organizations[name] for name in ("a", "b", "a1", "b1"))
    queued = submit(a, per_image, api_key=a1, num_images=2)
    run_images(b, per_image, b1, 1)
    assert closing.cancel_job(job=Job.objects.get(pk=queued.pk)) == "CANCELLATION_REQUESTED"
    assert not UsageRecord.objects.filter(job=queued).exists()
    assert (books(a).balance_micros, books(a).held_micros) == (settings.BILLING_SIGNUP_CREDITS_MICROS, 0)
    assert Job.objects.get(pk=queued.pk).status == JobStatus.CANCELLED


def test_grants_are_checked_and_their_reason_kept_to_300_characters(tenant: dict[str, Any]) -> None:
    organization = tenant["organization"]
    for arguments, message in (
        ({"amount_micros": 5, "kind": EntryKind.USAGE}, "Only grants and adjustments"),
        ({"amount_micros": 5, "kind": EntryKind.REFUND}, "Only grants and adjustments"),
        ({"amount_micros": 0, "kind": EntryKind.ADJUSTMENT}, "positive"),
        ({"amount_micros": 0}, "positive"),
        ({"amount_micros": -1}, "positive"),
        ({"amount_micros": 5, "reason": "   "}, "Say why"),
    ):
        with pytest.raises(BillingError, match=message):
            grant_credits(organization=organization, **{"reason": "test", **arguments})
    assert books(organization).balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS
    before = datetime.now(UTC)
    entry = grant_credits(organization=organization, amount_micros=1, reason="r" * 400)
    assert entry.description == "r" * 300
    assert books(organization).updated_at >= before
    assert entry.created_by is None


def test_an_organization_without_an_account_gets_an_empty_one_and_each_its_own(
    tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    mine, theirs = tenant["organization"], other_tenant["organization"]
    Account.objects.filter(pk=mine.pk).delete()
    created = locked_account(mine.pk)
    assert (created.organization_id, created.balance_micros, created.held_micros) == (mine.pk, 0, 0)
    assert locked_account(mine.pk).pk == mine.pk  # found, not created twice
    assert locked_account(theirs.pk).balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS
    assert account_of(theirs).pk == theirs.pk
    assert Account.objects.filter(pk__in=[mine.pk, theirs.pk]).count() == 2


def test_a_requeue_holds_once_whether_the_earlier_hold_was_released_or_left_open(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization, key = tenant["organization"], tenant["api_key"]
    Organization.objects.filter(pk=organization.pk).update(concurrency_limit=1_000)
    job = finish(start(submit(organization, builtin_endpoint, api_key=key)), AttemptOutcome.FAILED, gpu_ms=400)
    waiting = submit(organization, builtin_endpoint, api_key=key)  # another open hold beside it
    beside = Hold.objects.get(job=waiting).amount_micros
    assert books(organization).held_micros == beside

    assert requeue.requeue_job(job=job)  # its hold was released when it failed: opened again, counted once
    hold = Hold.objects.get(job=job)
    assert hold.released_at is None
    assert books(organization).held_micros == beside + hold.amount_micros
    closing.cancel_job(job=Job.objects.get(pk=job.pk))
    assert books(organization).held_micros == beside

    # Books that reconciliation flags (a final job still holding 777): a requeue replaces that hold, never adds to it.
    Hold.objects.filter(job=job).update(released_at=None, amount_micros=777)
    Account.objects.filter(pk=organization.pk).update(held_micros=beside + 777)
    assert requeue.requeue_job(job=job)
    hold = Hold.objects.get(job=job)
    assert hold.amount_micros != 777
    assert books(organization).held_micros == beside + hold.amount_micros
    assert Hold.objects.get(job=waiting).amount_micros == beside


def test_a_free_price_holds_nothing_extends_nothing_and_bills_nothing(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    free = Price.objects.create(gpu_class="cpu", unit_price_micros=0)
    job = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    assert Hold.objects.get(job=job).amount_micros == 0
    assert attempts.reserve_work(job=job, gpu_ms=10**9) == Reservation(covered_gpu_ms=None)
    finish(job, gpu_ms=5_000)
    record = UsageRecord.objects.get(job=job)
    assert (record.price_id, record.gpu_ms, record.cost_micros, record.unbilled_gpu_ms) == (free.pk, 5_000, 0, 0)
    assert not CreditEntry.objects.filter(usage_record=record).exists()
    assert books(organization).balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS
    # Once it has ended its hold is released: nothing is left to extend, and nothing more will be billed.
    assert attempts.reserve_work(job=job, gpu_ms=10**9) == Reservation(covered_gpu_ms=None)


def test_the_rounding_rule_with_a_denominator_of_one_and_dollars_typed_by_a_person() -> None:
    assert [divide_half_up(numerator, 1) for numerator in (7, 0, -1, -7)] == [7, 0, -1, -7]
    assert [divide_half_up(numerator, 2) for numerator in (1, -1, -3)] == [1, -1, -2]  # halves away from zero
    assert format_micros(-1) == "-$0.000001"
    assert dollars_to_micros(Decimal("12.345678")) == 12_345_678
    assert dollars_to_micros(Decimal("0.0000019")) == 1  # finer than a micro-dollar: dropped
    assert dollars_to_micros(Decimal("-2.5")) == -2_500_000


def test_a_hold_is_released_once(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    organization = tenant["organization"]
    job = submit(organization, builtin_endpoint, api_key=tenant["api_key"])
    held = Hold.objects.get(job=job).amount_micros
    assert holds.release(job_id=job.pk) == held
    assert books(organization).held_micros == held  # the account is the caller's to move
    holds.take_off_held(organization_id=organization.pk, amount_micros=held)
    assert books(organization).held_micros == 0
    assert holds.release(job_id=job.pk) == 0  # nothing open any more
    holds.take_off_held(organization_id=organization.pk, amount_micros=0)
    assert books(organization).held_micros == 0


def test_a_balance_at_or_below_zero_settles_at_no_cost_and_never_lower(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, per_image: Endpoint
) -> None:
    organization, key = tenant["organization"], tenant["api_key"]
    Organization.objects.filter(pk=organization.pk).update(concurrency_limit=1_000)
    timed = start(submit(organization, builtin_endpoint, api_key=key))
    imaged = start(submit(organization, per_image, api_key=key, num_images=2))
    Price.objects.create(gpu_class="cpu", unit_price_micros=0)  # from now on (the first job started before)
    free = start(submit(organization, builtin_endpoint, api_key=key))
    set_balance(organization, 0)  # a lost dispute took it all while the three ran
    finish(timed, gpu_ms=3_000, reserve=False)
    record = UsageRecord.objects.get(job=timed)
    assert (record.cost_micros, record.gpu_ms, record.unbilled_gpu_ms) == (0, 4, 2_996)  # 4 ms round to 0 µ$
    assert books(organization).balance_micros == 0
    set_balance(organization, -5)  # and more: below zero (only a dispute or a refunded purchase does that)
    closing.cancel_job(job=imaged)
    finish(imaged, AttemptOutcome.CANCELLED, gpu_ms=900, error="Cancelled by request.", error_type="cancelled")
    record = UsageRecord.objects.get(job=imaged)
    assert (record.billable, record.cost_micros, record.gpu_ms) == (True, 0, 900)  # no image, nothing owed
    finish(free, gpu_ms=8_000, reserve=False)
    assert UsageRecord.objects.get(job=free).cost_micros == 0
    assert (books(organization).balance_micros, books(organization).held_micros) == (-5, 0)


def test_priced_work_whose_estimate_rounds_to_nothing_still_needs_a_micro_dollar(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    organization, key = tenant["organization"], tenant["api_key"]
    # 1 ms a work unit measured: 2 units x 1 ms x 120% = 2 ms, 0.2 µ$ at 100 µ$/s, which rounds to 0.
    monkeypatch.setattr(pricing, "ms_per_work_unit", lambda endpoint: 1.0)
    assert admitted(organization, builtin_endpoint, key) == 1
    set_balance(organization, 0)
    assert refused(organization, builtin_endpoint, key).error_type == "insufficient_credits"
    Price.objects.create(gpu_class="cpu", unit_price_micros=0)
    assert admitted(organization, builtin_endpoint, key) == 0  # free work needs no credit


def test_the_usage_of_a_job_whose_last_attempt_was_not_billed_shows_the_price_it_was_billed_at(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    job = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    closing.cancel_job(job=job)
    finish(job, AttemptOutcome.CANCELLED, gpu_ms=500, error="Cancelled by request.", error_type="cancelled")
    Price.objects.create(gpu_class="cpu", unit_price_micros=1_000)
    assert requeue.requeue_job(job=job)
    finish(start(Job.objects.get(pk=job.pk)), AttemptOutcome.ERRORED, gpu_ms=3_000, error="CUDA out of memory")
    assert usage_of(job) == {
        "gpu_class": "cpu", "gpu_ms": 500, "billable_units": 0.5, "unit": "gpu_second", "unit_price_micros": 100,
        "cost_micros": 50,
    }  # fmt: skip


def test_a_request_not_finished_is_not_refunded(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    """Refunded while requeued and running again, the usage of its new run could never be refunded (its one refund
    spent): a refund waits for the request's end, and then gives back every run's cost."""
    job = start(submit(tenant["organization"], builtin_endpoint, api_key=tenant["api_key"]))
    closing.cancel_job(job=job)
    finish(job, AttemptOutcome.CANCELLED, gpu_ms=500, error="Cancelled by request.", error_type="cancelled")
    assert requeue.requeue_job(job=job)
    job = start(Job.objects.get(pk=job.pk))
    with pytest.raises(BillingError, match="has not finished"):
        refund_job(job=job)
    assert not CreditEntry.objects.filter(kind=EntryKind.REFUND, job=job).exists()
    finish(job, gpu_ms=1_000)
    billed = sum(UsageRecord.objects.filter(job=job).values_list("cost_micros", flat=True))
    assert refund_job(job=job).amount_micros == billed > 0
    with pytest.raises(BillingError, match="already been refunded"):
        refund_job(job=job)


@pytest.mark.parametrize("credit_after", [None, 12_000])
def test_a_per_output_price_raised_while_the_job_waits_is_held_at_the_start(
    tenant: dict[str, Any], per_image: Endpoint, credit_after: int | None
) -> None:
    """Settlement bills at the price in force when the job started, capped at its hold: held at the admission's
    lower price, three images delivered were billed as one. The hold grows to the asked outputs' cost at the start's
    price before any work, within the credit; where the credit does not cover it, the job stops before it runs."""
    organization, key = tenant["organization"], tenant["api_key"]
    job = submit(organization, per_image, api_key=key, num_images=3)
    assert Hold.objects.get(job=job).amount_micros == 3 * IMAGE_PRICE
    Price.objects.create(endpoint=per_image, unit=PriceUnit.IMAGE, unit_price_micros=2 * IMAGE_PRICE,
                         effective_from=datetime.now(UTC))  # fmt: skip
    job = start(job)
    if credit_after is not None:
        set_balance(organization, credit_after)  # less than three images at the new price
        answer = attempts.reserve_work(job=job, gpu_ms=1)
        assert isinstance(answer, Refusal)
        assert answer.error_type == "insufficient_credits"
        assert Hold.objects.get(job=job).amount_micros == 3 * IMAGE_PRICE  # unchanged: nothing ran
        return
    assert attempts.reserve_work(job=job, gpu_ms=1) == Reservation(covered_gpu_ms=None)
    assert Hold.objects.get(job=job).amount_micros == 6 * IMAGE_PRICE
    assert books(organization).held_micros == 6 * IMAGE_PRICE
    finish(job, gpu_ms=1_800, reserve=False)
    record = UsageRecord.objects.get(job=job)
    assert (record.billable_units, record.cost_micros) == (Decimal(3), 6 * IMAGE_PRICE)
    assert books(organization).held_micros == 0
