"""The billing core through its public surface: prices, holds, the usage ledger, spend control, the API."""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts import key_cache
from accounts import statements as prepared
from accounts.models import AuditEvent, Scope
from billing import controls
from billing.ledger import BillingError, grant_credits, refund_job
from billing.models import (
    Account,
    CreditEntry,
    EntryKind,
    Granularity,
    Hold,
    KeySpendLimit,
    Price,
    PriceUnit,
    UsageRecord,
    UsageRollup,
)
from billing.money import gpu_ms_within
from inference import attempts, closing, endpoints, submission
from inference.hooks import Refusal, Reservation
from inference.models import AttemptOutcome, Endpoint, Job, JobStatus
from tests.lifecycle import SMALL, finish, run_as, start, submit_as

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]

CPU_PRICE = 100  # the opening rate card: micro-dollars per CPU-second


def account(tenant: dict[str, Any]) -> Account:
    return Account.objects.get(pk=tenant["organization"].pk)


def ledger_sum(tenant: dict[str, Any]) -> int:
    return sum(CreditEntry.objects.filter(organization=tenant["organization"]).values_list("amount_micros", flat=True))


def test_a_new_organization_starts_with_its_free_credits(tenant: dict[str, Any]) -> None:
    [grant] = CreditEntry.objects.filter(organization=tenant["organization"])
    assert (grant.kind, grant.amount_micros) == (EntryKind.GRANT, settings.BILLING_SIGNUP_CREDITS_MICROS)
    assert account(tenant).balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS == grant.balance_after_micros


def test_a_successful_run_is_billed_once_with_a_debit_and_rollups(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = submit_as(tenant, builtin_endpoint, num_images=2)
    held = account(tenant).held_micros
    assert held > 0
    assert Hold.objects.get(job=job).amount_micros == held

    finish(start(job), gpu_ms=1_235, cold_start_ms=400)

    [record] = UsageRecord.objects.filter(job=job)
    # 1.235 s x 100 µ$/s = 123.5 µ$, rounded half up to 124.
    assert (record.billable, record.gpu_ms, record.cost_micros, record.unit_price_micros) == (True, 1_235, 124, 100)
    assert record.unbilled_gpu_ms == 400  # the cold start: recorded, never billed
    assert record.api_key_id == tenant["api_key"].pk
    debit = CreditEntry.objects.get(usage_record=record)
    assert (debit.kind, debit.amount_micros, debit.idempotency_key) == (EntryKind.USAGE, -124, f"usage-{record.pk}")
    state = account(tenant)
    assert state.held_micros == 0
    assert Hold.objects.get(job=job).released_at is not None
    assert state.balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS - 124 == ledger_sum(tenant)
    for granularity in (Granularity.HOUR, Granularity.DAY):
        rollup = UsageRollup.objects.get(organization=tenant["organization"], granularity=granularity)
        assert (rollup.attempts, rollup.billable_attempts, rollup.gpu_ms, rollup.cost_micros) == (1, 1, 1_235, 124)
        assert rollup.unbilled_gpu_ms == 400
        assert rollup.key_id == tenant["api_key"].pk


# Committed, as a deployed rate card is: a memo keeps nothing a transaction read after changing a kept row (the
# test's own transaction, had the fixtures written the endpoints and prices inside it).
@pytest.mark.django_db(transaction=True)
def test_closing_a_billed_run_sends_a_fixed_number_of_statements(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    django_capture_on_commit_callbacks: Any,
) -> None:
    # Every request ends in this transaction: what it sends is latency on top of the model, on every request.
    job = start(submit_as(tenant, builtin_endpoint))
    # In the test's transaction: a savepoint and its release; the job's lock with its organization's retention
    # setting and the attempt's close (one statement on PostgreSQL, two on SQLite); the job with its log line (one
    # statement on PostgreSQL, two on SQLite); the hold released; the usage record and the account's debit (the
    # statement that locks it) with the debit's entry and both rollups, one statement on PostgreSQL and four on SQLite.
    # The endpoint and the price come from memory where the submission's lookups are kept (accounts/memo.py, with a
    # shared cache), else one read each. On commit, one read finds no waiting work and no webhook to send.
    attempts.reserve_work(job=job, gpu_ms=1_235)  # as the worker did before the steps it ran
    endpoints.by_id(builtin_endpoint.pk)  # as a worker that has closed a request to this endpoint before
    statements = (7 if connection.vendor == "postgresql" else 12) + (2 if key_cache.generation() is None else 0)
    with CaptureQueriesContext(connection) as sent, django_capture_on_commit_callbacks(execute=True):
        finish(job, gpu_ms=1_235, reserve=False)
    # Not counted: what a statement planned once sends the first time a connection sends it (accounts.statements).
    per_request = [query["sql"] for query in sent.captured_queries if not prepared.is_preparation(query["sql"])]
    assert len(per_request) == statements, per_request
    assert UsageRecord.objects.get(job=job).cost_micros == 124
    assert account(tenant).held_micros == 0


def test_admission_writes_the_account_with_its_last_statement_and_reads_a_key_limit_only_for_a_key(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    # With no budget and no key limit, the account's lock, which every admission and settlement of the organization
    # waits for, is taken by one conditional UPDATE, the last statement before the transaction ends (on PostgreSQL
    # the last of a query that share-locks the key and inserts the hold first).
    for api_key in (tenant["api_key"], None):
        with CaptureQueriesContext(connection) as captured:
            job, _ = submission.submit_job(
                organization=tenant["organization"], api_key=api_key, endpoint=builtin_endpoint, payload=SMALL
            )
        statements = [query["sql"] for query in captured.captured_queries]
        on_the_account = [index for index, sql in enumerate(statements) if "billing_account" in sql]
        assert on_the_account == [len(statements) - 2], statements  # then the savepoint's release (COMMIT)
        last = statements[on_the_account[0]].split("; ")[-1]
        assert re.fullmatch(r"UPDATE billing_account SET .*", last)
        assert any("billing_keyspendlimit" in sql for sql in statements) == (api_key is not None)
        assert Hold.objects.get(job=job).amount_micros > 0
    assert account(tenant).held_micros == sum(
        Hold.objects.filter(organization=tenant["organization"], released_at=None).values_list(
            "amount_micros", flat=True
        )
    )


def test_platform_failures_are_recorded_unbilled_and_the_retry_is_billed(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = start(submit_as(tenant, builtin_endpoint))
    finish(job, AttemptOutcome.ERRORED, gpu_ms=900, error="CUDA out of memory", retry=True)
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert account(tenant).held_micros > 0  # still held for the retry
    finish(start(job), gpu_ms=2_000)

    first, second = UsageRecord.objects.filter(job=job).order_by("attempt_number")
    assert (first.billable, first.cost_micros, first.unbilled_gpu_ms) == (False, 0, 900)
    assert (second.billable, second.cost_micros) == (True, 200)
    assert not CreditEntry.objects.filter(usage_record=first).exists()
    assert account(tenant).held_micros == 0
    usage = tenant["client"].get(f"/queue/platform/tiny-sd/requests/{job.pk}/status").json()["usage"]
    assert usage == {
        "gpu_class": "cpu", "gpu_ms": 2_000, "billable_units": 2.0, "unit": "gpu_second", "unit_price_micros": 100,
        "cost_micros": 200,
    }  # fmt: skip


def test_a_request_cancelled_in_the_queue_costs_nothing_and_gives_its_hold_back(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = submit_as(tenant, builtin_endpoint)
    assert account(tenant).held_micros > 0
    assert closing.cancel_job(job=job) == "CANCELLATION_REQUESTED"
    assert account(tenant).held_micros == 0
    assert not UsageRecord.objects.filter(job=job).exists()
    assert account(tenant).balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS


def test_a_running_request_cancelled_by_the_user_is_billed_for_the_time_it_ran(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = start(submit_as(tenant, builtin_endpoint))
    closing.cancel_job(job=job)
    finish(job, AttemptOutcome.CANCELLED, gpu_ms=500, error="Cancelled by request.", error_type="cancelled")
    [record] = UsageRecord.objects.filter(job=job)
    assert (record.outcome, record.billable, record.cost_micros) == ("cancelled", True, 50)
    response = tenant["client"].get(f"/queue/platform/tiny-sd/requests/{job.pk}")
    assert response.status_code >= 400
    assert response["x-cost-micros"] == "50"


def test_the_price_in_force_when_the_job_started_applies(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    early = start(submit_as(tenant, builtin_endpoint))
    Price.objects.create(gpu_class="cpu", unit_price_micros=1_000, effective_from=timezone.now())
    late = start(submit_as(tenant, builtin_endpoint))
    finish(early, gpu_ms=1_000)
    finish(late, gpu_ms=1_000)
    assert UsageRecord.objects.get(job=early).cost_micros == 100
    assert UsageRecord.objects.get(job=late).cost_micros == 1_000
    # A price that takes effect later changes nothing now.
    Price.objects.create(gpu_class="cpu", unit_price_micros=5, effective_from=timezone.now() + timedelta(days=1))
    run_as(tenant, builtin_endpoint, gpu_ms=1_000)
    assert UsageRecord.objects.order_by("-id").first().cost_micros == 1_000  # type: ignore[union-attr]


def test_an_endpoint_billed_per_image_overrides_its_class(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    Price.objects.create(endpoint=builtin_endpoint, gpu_class="", unit=PriceUnit.IMAGE, unit_price_micros=3_000)
    job = submit_as(tenant, builtin_endpoint, num_images=3)
    assert Hold.objects.get(job=job).amount_micros == 9_000  # exact: priced by output
    finish(start(job), gpu_ms=5_000)
    record = UsageRecord.objects.get(job=job)
    assert (record.unit, record.billable_units, record.cost_micros) == ("image", 3, 9_000)
    models = tenant["client"].get("/v1/models").json()
    [tiny] = [model for model in models["models"] if model["endpoint_id"] == "platform/tiny-sd"]
    assert tiny["price"]["unit"] == "image"
    assert tiny["price"]["unit_price_micros"] == 3_000


def test_new_work_is_refused_without_credit_and_nothing_is_stored(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    grant_credits(
        organization=tenant["organization"], amount_micros=-settings.BILLING_SIGNUP_CREDITS_MICROS,
        reason="test: empty the balance", kind=EntryKind.ADJUSTMENT,
    )  # fmt: skip
    response = tenant["client"].post("/queue/platform/tiny-sd", SMALL, format="json")
    assert response.status_code == 402, response.content
    assert response.json()["error_type"] == "insufficient_credits"
    assert "Add credits" in response.json()["detail"]
    assert not Job.objects.exists()
    assert not Hold.objects.exists()


def test_holds_count_against_the_balance(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    first = submit_as(tenant, builtin_endpoint)
    hold = Hold.objects.get(job=first).amount_micros
    # Leave exactly one more hold's worth available.
    grant_credits(
        organization=tenant["organization"],
        amount_micros=-(account(tenant).available_micros - hold),
        reason="test", kind=EntryKind.ADJUSTMENT,
    )  # fmt: skip
    submit_as(tenant, builtin_endpoint)
    response = tenant["client"].post("/queue/platform/tiny-sd", SMALL, format="json")
    assert response.status_code == 402
    assert response.json()["error_type"] == "insufficient_credits"


def test_the_monthly_budget_and_a_key_limit_refuse_new_work(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, make_key: Any
) -> None:
    run_as(tenant, builtin_endpoint, gpu_ms=10_000)  # 1,000 µ$ spent this month
    controls.set_monthly_budget(organization=tenant["organization"], budget_micros=1_000)
    refused = tenant["client"].post("/queue/platform/tiny-sd", SMALL, format="json")
    assert refused.status_code == 402
    assert refused.json()["error_type"] == "spend_limit_exceeded"
    assert "monthly budget" in refused.json()["detail"]

    controls.set_monthly_budget(organization=tenant["organization"], budget_micros=None)
    controls.set_key_limit(api_key=tenant["api_key"], monthly_limit_micros=1_000)
    refused = tenant["client"].post("/queue/platform/tiny-sd", SMALL, format="json")
    assert refused.status_code == 402
    assert "API key" in refused.json()["detail"]
    other_key, _ = make_key(tenant["organization"])
    assert submission.submit_job(
        organization=tenant["organization"], api_key=other_key, endpoint=builtin_endpoint, payload=SMALL
    )[1]
    assert AuditEvent.objects.filter(action="billing.limits_changed").count() == 3


def test_a_running_job_grows_its_hold_before_more_work_and_stops_where_credit_or_budget_ends(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = start(submit_as(tenant, builtin_endpoint))
    hold = Hold.objects.get(job=job).amount_micros
    covered = attempts.reserve_work(job=job, gpu_ms=1)
    assert isinstance(covered, Reservation)
    assert covered.covered_gpu_ms == gpu_ms_within(hold, CPU_PRICE)
    available = account(tenant).available_micros
    # More time than the hold and everything still available can pay for: refused, nothing changes.
    too_long = (hold + available + 1) * 1000 // CPU_PRICE + 10
    refused = attempts.reserve_work(job=job, gpu_ms=too_long)
    assert isinstance(refused, Refusal)
    assert refused.error_type == "insufficient_credits"
    assert (Hold.objects.get(job=job).amount_micros, account(tenant).available_micros) == (hold, available)
    # The organization's monthly budget binds first here (spent + held + extra): the hold grows within it, and no
    # further even when asked to look far ahead.
    controls.set_monthly_budget(organization=tenant["organization"], budget_micros=hold + 30)
    within_budget = attempts.reserve_work(job=job, gpu_ms=(hold + 20) * 1000 // CPU_PRICE, ahead_ms=10**9)
    assert isinstance(within_budget, Reservation)
    assert Hold.objects.get(job=job).amount_micros == hold + 30
    refused = attempts.reserve_work(job=job, gpu_ms=(hold + 40) * 1000 // CPU_PRICE)
    assert isinstance(refused, Refusal)
    assert refused.error_type == "spend_limit_exceeded"
    # Without a budget, the available credit binds: the hold grows to all of it and no further.
    controls.set_monthly_budget(organization=tenant["organization"], budget_micros=None)
    grown = attempts.reserve_work(job=job, gpu_ms=(hold + 50) * 1000 // CPU_PRICE, ahead_ms=10**9)
    assert isinstance(grown, Reservation)
    assert Hold.objects.get(job=job).amount_micros == hold + available
    assert account(tenant).available_micros == 0
    assert grown.covered_gpu_ms == gpu_ms_within(hold + available, CPU_PRICE)
    # Settled: never more than the hold, whatever the worker measured.
    finish(job, gpu_ms=10**9, reserve=False)
    assert UsageRecord.objects.get(job=job).cost_micros == hold + available
    assert account(tenant).balance_micros == 0


def test_a_running_job_stops_at_its_heartbeat_when_a_refund_takes_the_balance_below_its_holds(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = start(submit_as(tenant, builtin_endpoint))
    assert attempts.heartbeat(job_id=str(job.pk), attempt=job.attempt, step=1, total=2, gpu_ms=100).keep_going
    books = account(tenant)
    grant_credits(
        organization=tenant["organization"],
        amount_micros=-(books.balance_micros - books.held_micros + 1),
        reason="disputed payment",
        kind=EntryKind.ADJUSTMENT,
    )
    beat = attempts.heartbeat(job_id=str(job.pk), attempt=job.attempt, step=1, total=2, gpu_ms=100)
    assert (beat.keep_going, beat.error_type) == (False, "insufficient_credits")
    refused = attempts.reserve_work(job=job, gpu_ms=1)
    assert isinstance(refused, Refusal)
    assert refused.error_type == "insufficient_credits"


def test_refunding_a_request_credits_its_cost_once_and_is_audited(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = run_as(tenant, builtin_endpoint, gpu_ms=3_000)
    entry = refund_job(job=job, reason="bad output")
    assert (entry.kind, entry.amount_micros) == (EntryKind.REFUND, 300)
    with pytest.raises(BillingError, match="already been refunded"):
        refund_job(job=job)
    assert account(tenant).balance_micros == settings.BILLING_SIGNUP_CREDITS_MICROS == ledger_sum(tenant)
    assert AuditEvent.objects.filter(action="job.refunded", target_id=str(job.pk)).count() == 1


def test_an_idempotency_key_posts_once(tenant: dict[str, Any]) -> None:
    for _ in range(3):
        grant_credits(organization=tenant["organization"], amount_micros=5, reason="promo", idempotency_key="promo-1")
    assert CreditEntry.objects.filter(idempotency_key="promo-1").count() == 1
    with pytest.raises(BillingError, match="different movement"):
        grant_credits(organization=tenant["organization"], amount_micros=6, reason="promo", idempotency_key="promo-1")
    with pytest.raises(BillingError, match="positive"):
        grant_credits(organization=tenant["organization"], amount_micros=-5, reason="no")


# The platform API.


def run_some(tenant: dict[str, Any], endpoint: Endpoint, *gpu_ms: int) -> None:
    for ms in gpu_ms:
        run_as(tenant, endpoint, gpu_ms=ms)


def test_usage_by_day_endpoint_and_key_in_json_and_csv(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, clock_held_in_the_hour: datetime
) -> None:
    # The runs are recorded in one hour, so one day, whenever the test runs (either side of midnight or of the hour,
    # they would be two rows).
    run_some(tenant, builtin_endpoint, 1_000, 2_500)
    run_some(other_tenant, builtin_endpoint, 9_999)
    today = clock_held_in_the_hour.date().isoformat()

    report = tenant["client"].get("/v1/usage", {"group_by": "day,endpoint,key"}).json()
    assert report["totals"]["requests"] == 2
    assert report["totals"]["cost_micros"] == 350
    assert report["totals"]["gpu_seconds"] == 3.5
    [row] = report["data"]
    assert (row["day"], row["endpoint"], row["key_id"], row["key_name"]) == (
        today, "platform/tiny-sd", str(tenant["api_key"].pk), "test key"
    )  # fmt: skip
    assert (row["requests"], row["gpu_ms"], row["cost_micros"]) == (2, 3_500, 350)

    response = tenant["client"].get("/v1/usage", {"group_by": "day", "format": "csv"})
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert rows == [
        {"day": today, "requests": "2", "attempts": "2", "gpu_ms": "3500", "gpu_seconds": "3.5",
         "unbilled_gpu_ms": "0", "cost_micros": "350", "video_seconds": "0.0", "audio_seconds": "0.0"}
    ]  # fmt: skip
    hourly = tenant["client"].get("/v1/usage", {"group_by": "hour"}).json()
    assert len(hourly["data"]) == 1
    assert hourly["data"][0]["hour"].startswith(today)
    empty = tenant["client"].get("/v1/usage", {"start": "2020-01-01", "end": "2020-01-31"}).json()
    assert empty["data"] == []
    assert empty["totals"]["cost_micros"] == 0


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"group_by": "day,hour"}, "group_by"),
        ({"group_by": "colour"}, "group_by"),
        ({"start": "2026-02-01", "end": "2026-01-01"}, "start"),
        ({"start": "2020-01-01", "end": "2026-01-01"}, "end"),
        ({"start": "yesterday"}, "start"),
        ({"format": "xml"}, "format"),
    ],
)
def test_usage_queries_that_make_no_sense_get_422(tenant: dict[str, Any], query: dict[str, str], field: str) -> None:
    response = tenant["client"].get("/v1/usage", query)
    assert response.status_code == 422, response.content
    assert any(item["loc"][-1] == field for item in response.json()["detail"])


def test_billing_reads_need_the_usage_scope(tenant: dict[str, Any], make_key: Any) -> None:
    from rest_framework.test import APIClient

    _, token = make_key(tenant["organization"], scopes=[Scope.INFERENCE])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    for path in ("/v1/usage", "/v1/billing/balance", "/v1/billing/ledger", "/v1/billing/top-up"):
        assert client.get(path).status_code == 403, path
    _, reader = make_key(tenant["organization"], scopes=[Scope.USAGE_READ])
    client.credentials(HTTP_AUTHORIZATION=f"Key {reader}")
    assert client.get("/v1/billing/balance").status_code == 200
    assert client.put("/v1/billing/top-up", {"enabled": False}, format="json").status_code == 403


def test_balance_and_ledger(tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    run_some(tenant, builtin_endpoint, 1_000)
    running = submit_as(tenant, builtin_endpoint)
    balance = tenant["client"].get("/v1/billing/balance").json()
    held = Hold.objects.get(job=running).amount_micros
    assert balance == {
        "balance_micros": settings.BILLING_SIGNUP_CREDITS_MICROS - 100,
        "held_micros": held,
        "available_micros": settings.BILLING_SIGNUP_CREDITS_MICROS - 100 - held,
        "currency": "usd",
    }
    page = tenant["client"].get("/v1/billing/ledger", {"limit": 1}).json()
    [newest] = page["results"]
    assert (newest["kind"], newest["amount_micros"]) == ("usage", -100)
    assert newest["request_id"]
    older = tenant["client"].get(page["next"]).json()["results"]
    assert [entry["kind"] for entry in older] == ["grant"]
    theirs = other_tenant["client"].get("/v1/billing/ledger").json()["results"]
    assert [entry["kind"] for entry in theirs] == ["grant"]


def test_top_up_and_limits_settings(tenant: dict[str, Any], other_tenant: dict[str, Any]) -> None:
    client = tenant["client"]
    assert client.get("/v1/billing/top-up").json() == {
        "enabled": False, "threshold_micros": 5_000_000, "amount_cents": 2_000, "has_payment_method": False,
    }  # fmt: skip
    refused = client.put("/v1/billing/top-up", {"enabled": True}, format="json")
    assert refused.status_code == 409
    assert "Save a card" in refused.json()["detail"]
    changed = client.put("/v1/billing/top-up", {"enabled": False, "amount_cents": 5_000}, format="json").json()
    assert changed["amount_cents"] == 5_000
    assert client.put("/v1/billing/top-up", {"enabled": False, "amount_cents": 1}, format="json").status_code == 422

    key_id = str(tenant["api_key"].pk)
    limits = client.put(
        "/v1/billing/limits",
        {"monthly_budget_micros": 50_000_000, "keys": [{"key_id": key_id, "monthly_limit_micros": 1_000_000}]},
        format="json",
    ).json()
    assert limits["monthly_budget_micros"] == 50_000_000
    assert limits["keys"] == [{"key_id": key_id, "monthly_limit_micros": 1_000_000, "spent_this_month_micros": 0}]
    assert limits["end_users"] == []
    assert KeySpendLimit.objects.get(api_key=tenant["api_key"]).monthly_limit_micros == 1_000_000
    theirs = {"keys": [{"key_id": str(other_tenant["api_key"].pk), "monthly_limit_micros": 1}]}
    assert client.put("/v1/billing/limits", theirs, format="json").status_code == 404
    no_limit = {"keys": [{"key_id": key_id, "monthly_limit_micros": None}]}
    cleared = client.put("/v1/billing/limits", no_limit, format="json")
    assert cleared.json()["keys"] == []
