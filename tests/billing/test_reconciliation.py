"""Reconciliation: clean books report no drift; each kind of corruption is found and reported with its rows."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from datetime import UTC, timedelta
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import F
from django.utils import timezone

from accounts.models import Organization
from billing import receipts, reconciliation
from billing.ledger import grant_credits, post_entry, refund_job
from billing.locks import locked_account
from billing.models import (
    Account,
    CreditEntry,
    EntryKind,
    Granularity,
    Hold,
    Payment,
    PaymentKind,
    PaymentStatus,
    ReconciliationRun,
    UsageRecord,
    UsageRollup,
)
from inference import closing
from inference.models import ACTIVE_STATUSES, ActiveJobCount, AttemptOutcome, Endpoint, Job, JobAttempt, JobStatus
from tests.lifecycle import finish, run, start, submit

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("quiet_books")]


@pytest.fixture
def books(tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint) -> dict[str, Any]:
    """Two organizations' worth of every path: billed, retried, failed, cancelled running and queued, refunded."""
    organization = tenant["organization"]
    Organization.objects.filter(pk__in=[organization.pk, other_tenant["organization"].pk]).update(concurrency_limit=50)
    # Its cold start and its part of its batch's wasted time recorded with it, unbilled.
    billed = run(organization, builtin_endpoint, gpu_ms=1_235, cold_start_ms=300, wasted_ms=45)
    retried = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    finish(retried, AttemptOutcome.ERRORED, gpu_ms=700, wasted_ms=20, error="out of memory", retry=True)
    retried = finish(start(retried), gpu_ms=2_000)
    failed = run(organization, builtin_endpoint, outcome=AttemptOutcome.FAILED, gpu_ms=400, error="bad input")
    running = start(submit(organization, builtin_endpoint))
    closing.cancel_job(job=running)
    cancelled_running = finish(running, AttemptOutcome.CANCELLED, gpu_ms=900)
    cancelled_queued = submit(organization, builtin_endpoint)
    closing.cancel_job(job=cancelled_queued)
    still_running = start(submit(other_tenant["organization"], builtin_endpoint))
    grant_credits(organization=organization, amount_micros=5_000_000, reason="goodwill")
    refund_job(job=billed, reason="the output was wrong")
    return {
        "organization": organization,
        "billed": billed,
        "retried": retried,
        "failed": failed,
        "cancelled_running": cancelled_running,
        "cancelled_queued": cancelled_queued,
        "still_running": still_running,
    }


def kinds(run_: ReconciliationRun) -> set[str]:
    return {f"{item['check']}.{item['kind']}" for item in run_.drift}


def drift_of(run_: ReconciliationRun, kind: str) -> dict[str, Any]:
    [item] = [item for item in run_.drift if f"{item['check']}.{item['kind']}" == kind]
    return item


def completed_without_attempt(books: dict[str, Any]) -> Job:
    """A job marked completed that never ran an attempt (nothing billed it)."""
    return Job.objects.create(
        organization=books["organization"],
        endpoint=books["billed"].endpoint,
        gpu_class="cpu",
        input={},
        status=JobStatus.COMPLETED,
        finished_at=timezone.now(),
    )


def test_clean_books_have_no_drift_and_stripe_is_recorded_as_skipped(books: dict[str, Any]) -> None:
    run_ = reconciliation.run_reconciliation()
    assert run_.drift == []
    assert run_.ok
    assert run_.finished_at is not None
    checked = run_.checked
    assert set(checked) == {
        "jobs", "attempts", "usage_records", "usage_debits", "balances", "ledger_chain", "holds", "active_jobs",
        "rollups", "end_user_rollups", "refunded_rollups",
        "payments", "receipts", "statements", "stripe",
    }  # fmt: skip
    assert all(summary["drift"] == 0 for summary in checked.values())
    # 4 final jobs that ran, 1 cancelled in the queue (never started, never billed).
    assert checked["jobs"]["checked"] == 5
    assert checked["jobs"]["unbilled_never_started"] == 1
    assert checked["attempts"]["checked"] == 5  # the retried job closed two attempts; the running one none
    assert checked["usage_records"]["checked"] == 5
    assert checked["rollups"]["checked"] > 5
    assert checked["stripe"]["skipped"].startswith("STRIPE_SECRET_KEY is not set")
    assert ReconciliationRun.objects.get() == run_
    # The first run ever checks everything, and proves the books up to its start.
    assert (run_.scope, run_.since, run_.watermark) == ("full", None, run_.started_at)


def test_a_completed_job_without_an_attempt(books: dict[str, Any]) -> None:
    job = completed_without_attempt(books)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"jobs.completed_without_attempt"}
    assert drift_of(run_, "jobs.completed_without_attempt")["examples"][0]["id"] == str(job.pk)
    assert not run_.ok
    assert run_.checked["jobs"]["drift"] == 1


def test_a_closed_attempt_without_its_usage_record(books: dict[str, Any]) -> None:
    JobAttempt.objects.create(job=books["failed"], number=7, outcome=AttemptOutcome.ERRORED, gpu_ms=5)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"attempts.closed_attempt_without_usage"}
    [example] = drift_of(run_, "attempts.closed_attempt_without_usage")["examples"]
    assert (example["job_id"], example["number"], example["outcome"]) == (str(books["failed"].pk), 7, "errored")


def test_a_final_job_whose_attempt_is_still_open(books: dict[str, Any]) -> None:
    JobAttempt.objects.filter(job=books["failed"]).update(outcome=AttemptOutcome.RUNNING)
    run_ = reconciliation.run_reconciliation()
    # Its usage record now belongs to no closed attempt either.
    assert kinds(run_) == {"jobs.final_job_with_open_attempt", "usage_records.usage_without_closed_attempt"}


def test_a_usage_record_without_its_attempt(books: dict[str, Any]) -> None:
    JobAttempt.objects.filter(job=books["failed"]).delete()
    run_ = reconciliation.run_reconciliation()
    # The job has no attempt left, so it also reads as never started: a failed job, which would be fine alone.
    assert kinds(run_) == {"usage_records.usage_without_closed_attempt"}
    assert run_.checked["jobs"]["unbilled_never_started"] == 2


def test_a_usage_record_that_disagrees_with_its_attempt(books: dict[str, Any]) -> None:
    JobAttempt.objects.filter(job=books["retried"], number=2).update(gpu_ms=F("gpu_ms") + 1)
    JobAttempt.objects.filter(job=books["retried"], number=1).update(outcome=AttemptOutcome.LOST)
    JobAttempt.objects.filter(job=books["failed"]).update(wasted_ms=F("wasted_ms") + 1)  # time the record lost
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"usage_records.usage_disagrees_with_attempt"}
    item = drift_of(run_, "usage_records.usage_disagrees_with_attempt")
    assert item["count"] == 3
    assert {
        (e["attempt_number"], e["attempt_outcome"], e["attempt_gpu_ms"], e["attempt_wasted_ms"])
        for e in item["examples"]
    } == {(1, "lost", 700, 20), (2, "succeeded", 2_001, 0), (1, "failed", 400, 1)}


def test_billable_usage_without_its_debit(books: dict[str, Any]) -> None:
    record = UsageRecord.objects.get(job=books["failed"])
    CreditEntry.objects.filter(usage_record=record).delete()
    # Keep the balance true to the remaining entries: only the missing debit is wrong.
    Account.objects.filter(pk=record.organization_id).update(balance_micros=F("balance_micros") + record.cost_micros)
    _rechain(record.organization_id)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"usage_debits.billable_usage_without_debit", "usage_debits.organization_usage_not_debited"}
    [example] = drift_of(run_, "usage_debits.organization_usage_not_debited")["examples"]
    assert example["difference_micros"] == record.cost_micros == 40


def test_a_debit_that_differs_from_its_records_cost(books: dict[str, Any]) -> None:
    record = UsageRecord.objects.get(job=books["failed"])
    CreditEntry.objects.filter(usage_record=record).update(amount_micros=-41)
    Account.objects.filter(pk=record.organization_id).update(balance_micros=F("balance_micros") - 1)
    _rechain(record.organization_id)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"usage_debits.debit_differs_from_cost", "usage_debits.organization_usage_not_debited"}
    [example] = drift_of(run_, "usage_debits.debit_differs_from_cost")["examples"]
    assert (example["amount_micros"], example["cost_micros"]) == (-41, 40)


def test_a_cached_balance_that_is_not_the_ledger(books: dict[str, Any]) -> None:
    Account.objects.filter(pk=books["organization"].pk).update(balance_micros=F("balance_micros") + 1)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"balances.balance_not_sum_of_entries", "balances.balance_not_last_balance_after"}
    [example] = drift_of(run_, "balances.balance_not_sum_of_entries")["examples"]
    assert example["balance_micros"] == example["entries_micros"] + 1


def test_a_broken_balance_after_chain(books: dict[str, Any]) -> None:
    entries = CreditEntry.objects.filter(organization=books["organization"]).order_by("id")
    middle = entries[2]
    CreditEntry.objects.filter(pk=middle.pk).update(balance_after_micros=F("balance_after_micros") + 10)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"ledger_chain.balance_after_breaks_the_chain"}
    item = drift_of(run_, "ledger_chain.balance_after_breaks_the_chain")
    # The corrupted entry, and the next one, which no longer follows from it.
    assert [example["id"] for example in item["examples"]] == [middle.pk, entries[3].pk]


def test_a_job_that_ran_again_after_its_cancel_was_accepted(books: dict[str, Any]) -> None:
    # The lost-cancel race: the owner's cancel was accepted, then a requeue ran the job once more.
    job = books["cancelled_running"]
    JobAttempt.objects.create(
        job=job, number=job.attempt + 1, worker="w", started_at=job.cancel_requested_at + timedelta(seconds=1)
    )
    run_ = reconciliation.run_reconciliation()
    assert "jobs.ran_after_its_cancel_was_accepted" in kinds(run_)
    [example] = drift_of(run_, "jobs.ran_after_its_cancel_was_accepted")["examples"]
    assert (example["job_id"], example["number"]) == (str(job.pk), job.attempt + 1)


def test_usage_that_took_a_balance_below_zero(books: dict[str, Any]) -> None:
    usage = CreditEntry.objects.filter(organization=books["organization"], kind=EntryKind.USAGE).latest("id")
    CreditEntry.objects.filter(pk=usage.pk).update(balance_after_micros=-1)
    run_ = reconciliation.run_reconciliation()
    assert "ledger_chain.usage_took_the_balance_below_zero" in kinds(run_)
    [example] = drift_of(run_, "ledger_chain.usage_took_the_balance_below_zero")["examples"]
    assert (example["id"], example["balance_after_micros"]) == (usage.pk, -1)


def test_held_credit_that_is_not_the_open_holds(books: dict[str, Any]) -> None:
    Account.objects.filter(pk=books["organization"].pk).update(held_micros=123)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"holds.held_not_sum_of_open_holds"}
    [example] = drift_of(run_, "holds.held_not_sum_of_open_holds")["examples"]
    assert (example["held_micros"], example["open_holds_micros"]) == (123, 0)


def test_an_open_hold_for_a_final_job(books: dict[str, Any]) -> None:
    hold = Hold.objects.get(job=books["billed"])
    Hold.objects.filter(pk=hold.pk).update(released_at=None)
    Account.objects.filter(pk=hold.organization_id).update(held_micros=hold.amount_micros)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"holds.open_hold_for_final_job"}
    [example] = drift_of(run_, "holds.open_hold_for_final_job")["examples"]
    assert (example["job_id"], example["job_status"]) == (str(books["billed"].pk), "COMPLETED")


def test_a_rollup_that_is_not_the_sum_of_raw_usage(books: dict[str, Any]) -> None:
    day = UsageRollup.objects.filter(granularity=Granularity.DAY, organization=books["organization"]).first()
    assert day is not None
    UsageRollup.objects.filter(pk=day.pk).update(cost_micros=F("cost_micros") + 5)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"rollups.day_rollup_differs_from_usage", "rollups.hour_rollups_differ_from_day"}
    [example] = drift_of(run_, "rollups.day_rollup_differs_from_usage")["examples"]
    differences = example["differences"]
    assert list(differences) == ["cost_micros"]
    assert differences["cost_micros"]["day_rollups"] == differences["cost_micros"]["usage_records"] + 5
    assert example["day"] == day.bucket_start.date().isoformat()


def test_an_hour_rollup_moved_to_another_hour_of_the_same_day_is_no_drift(books: dict[str, Any]) -> None:
    hour = UsageRollup.objects.filter(granularity=Granularity.HOUR).first()
    assert hour is not None
    other_hour = hour.bucket_start.replace(hour=(hour.bucket_start.hour + 1) % 24)
    UsageRollup.objects.filter(pk=hour.pk).update(bucket_start=other_hour)
    assert reconciliation.run_reconciliation().ok


def test_a_missing_rollup_row(books: dict[str, Any]) -> None:
    UsageRollup.objects.filter(granularity=Granularity.DAY, organization=books["organization"]).delete()
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {
        "rollups.day_rollup_differs_from_usage",
        "rollups.hour_rollups_differ_from_day",
        # The refunded request's day row went with them, and what its refund gave back there.
        "refunded_rollups.day_rollups_refunded_differ_from_refunds",
        "refunded_rollups.hour_rollups_refunded_differ_from_day",
        "refunded_rollups.organization_refunds_differ_from_rollups",
    }


def test_payments_and_their_credit(books: dict[str, Any]) -> None:
    organization = books["organization"]
    paid = Payment.objects.create(
        organization=organization, kind=PaymentKind.PURCHASE, status=PaymentStatus.SUCCEEDED, amount_cents=2_000
    )
    pending = Payment.objects.create(organization=organization, kind=PaymentKind.PURCHASE, amount_cents=500)
    assert reconciliation.run_reconciliation().checked["payments"] == {"checked": 2, "drift": 1}
    account = locked_account(organization.pk)
    post_entry(account=account, kind=EntryKind.PURCHASE, amount_micros=20_000_000, idempotency_key="p1", payment=paid)
    assert reconciliation.run_reconciliation().ok
    post_entry(account=account, kind=EntryKind.PURCHASE, amount_micros=5_000_000, idempotency_key="p2", payment=pending)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"payments.credit_for_unpaid_payment"}
    [example] = drift_of(run_, "payments.credit_for_unpaid_payment")["examples"]
    assert (example["id"], example["status"], example["credited_micros"]) == (pending.pk, "pending", 5_000_000)


def test_a_payments_refunded_and_disputed_totals_are_its_entries(books: dict[str, Any]) -> None:
    organization = books["organization"]
    paid = Payment.objects.create(
        organization=organization, kind=PaymentKind.PURCHASE, status=PaymentStatus.SUCCEEDED, amount_cents=2_000
    )
    account = locked_account(organization.pk)
    post_entry(account=account, kind=EntryKind.PURCHASE, amount_micros=20_000_000, idempotency_key="p", payment=paid)
    post_entry(account=account, kind=EntryKind.REFUND, amount_micros=-5_000_000, idempotency_key="r", payment=paid)
    post_entry(account=account, kind=EntryKind.DISPUTE, amount_micros=-1_000_000, idempotency_key="d", payment=paid)
    Payment.objects.filter(pk=paid.pk).update(amount_refunded_cents=500, amount_disputed_cents=100)
    assert reconciliation.run_reconciliation().ok
    Payment.objects.filter(pk=paid.pk).update(amount_refunded_cents=400, amount_disputed_cents=0)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {
        "payments.refunded_amount_differs_from_entries",
        "payments.disputed_amount_differs_from_entries",
    }
    [example] = drift_of(run_, "payments.refunded_amount_differs_from_entries")["examples"]
    assert (example["amount_refunded_cents"], example["refund_entries_micros"]) == (400, -5_000_000)


def test_stripe_is_compared_when_configured(
    books: dict[str, Any], settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.STRIPE_SECRET_KEY = "sk_test_reconcile"
    missing = {"check": "stripe_payment_missing", "payment_id": None, "payment_intent": "pi_1", "detail": "..."}
    unnamed = {"payment_id": 1, "detail": "amount differs"}
    counts = {"payments": 3, "refunds": 1}
    monkeypatch.setattr(reconciliation, "compare_with_stripe", lambda: (counts, [missing, unnamed, missing]))
    run_ = reconciliation.run_reconciliation()
    assert run_.checked["stripe"] == {"checked": 4, "drift": 3, "counts": counts}
    assert kinds(run_) == {"stripe.stripe_payment_missing", "stripe.differs_from_stripe"}
    assert drift_of(run_, "stripe.stripe_payment_missing")["examples"] == [missing, missing]
    assert drift_of(run_, "stripe.differs_from_stripe")["examples"] == [unnamed]


def test_stripe_that_cannot_be_reached_is_drift_not_a_pass(
    books: dict[str, Any], settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable() -> Any:
        raise ConnectionError("api.stripe.com unreachable")

    settings.STRIPE_SECRET_KEY = "sk_test_reconcile"
    monkeypatch.setattr(reconciliation, "compare_with_stripe", unreachable)
    run_ = reconciliation.run_reconciliation()
    assert not run_.ok
    assert drift_of(run_, "stripe.check_failed")["examples"] == [
        {"error": "ConnectionError: api.stripe.com unreachable"}
    ]


def test_a_check_that_fails_is_drift_and_the_others_still_run(
    books: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(scope: reconciliation.Scope) -> reconciliation.Check:
        Job.objects.raw("SELECT no_such_column FROM no_such_table")[0]  # a real database error
        raise AssertionError("unreachable")

    broken.__name__ = "check_holds"
    checks = tuple(broken if check is reconciliation.check_holds else check for check in reconciliation.DATABASE_CHECKS)
    monkeypatch.setattr(reconciliation, "DATABASE_CHECKS", checks)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"holds.check_failed"}
    assert run_.checked["rollups"]["drift"] == 0  # the checks after it ran on a healthy connection


def test_examples_are_capped_but_the_count_is_whole(books: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconciliation, "EXAMPLES_PER_KIND", 2)
    JobAttempt.objects.bulk_create(
        [JobAttempt(job=books["failed"], number=10 + n, outcome=AttemptOutcome.ERRORED) for n in range(5)]
    )
    item = drift_of(reconciliation.run_reconciliation(), "attempts.closed_attempt_without_usage")
    assert (item["count"], len(item["examples"])) == (5, 2)


def test_the_command_prints_each_check_and_exits_1_on_drift(books: dict[str, Any]) -> None:
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    printed = out.getvalue()
    assert "scope: full: every row" in printed
    assert "rollups" in printed
    assert "stripe" in printed
    assert "skipped: STRIPE_SECRET_KEY is not set" in printed
    assert "no drift" in printed
    Account.objects.filter(pk=books["organization"].pk).update(held_micros=1)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError) as failure:
        call_command("reconcile", stdout=out, stderr=err)
    assert failure.value.returncode == 1
    assert "DRIFT holds.held_not_sum_of_open_holds: 1" in err.getvalue()


def test_the_nightly_task_is_registered_and_scheduled_at_three_utc(books: dict[str, Any]) -> None:
    from celery.schedules import crontab

    from config.celery import app

    app.loader.import_default_modules()
    assert "billing.reconcile" in app.tasks
    nightly, weekly = app.conf.beat_schedule["billing-reconcile"], app.conf.beat_schedule["billing-reconcile-full"]
    assert nightly["task"] == weekly["task"] == "billing.reconcile"
    # Incremental six nights a week, full on the seventh (not both on Sunday).
    assert nightly["schedule"] == crontab(hour=3, minute=0, day_of_week="mon-sat")
    assert "kwargs" not in nightly
    assert weekly["schedule"] == crontab(hour=3, minute=0, day_of_week="sun")
    assert weekly["kwargs"] == {"full": True}
    assert app.conf.timezone == "UTC"
    task = app.tasks["billing.reconcile"]
    first = task.run()  # nothing proven yet: full
    assert first == {"run": ReconciliationRun.objects.get().pk, "scope": "full", "ok": True, "drift": 0}
    assert task.run()["scope"] == "incremental"
    assert task.run(**weekly["kwargs"])["scope"] == "full"


def _rechain(organization_id: Any) -> None:
    """Rewrites balance_after along an organization's entries after a test removed or changed one."""
    balance = 0
    for entry in CreditEntry.objects.filter(organization_id=organization_id).order_by("id"):
        balance += entry.amount_micros
        CreditEntry.objects.filter(pk=entry.pk).update(balance_after_micros=balance)


def test_old_books_are_checked_too(books: dict[str, Any]) -> None:
    """Usage days long past are compared like today's (the nightly run scans the whole history)."""
    old = timezone.now() - timedelta(days=400)
    UsageRecord.objects.filter(job=books["failed"]).update(recorded_at=old)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"rollups.day_rollup_differs_from_usage"}
    assert drift_of(run_, "rollups.day_rollup_differs_from_usage")["count"] == 2  # gone from today, new on that day


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_the_checks_read_one_snapshot(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(tenant["organization"], builtin_endpoint)
    seen: list[Any] = []

    def check_isolation(scope: reconciliation.Scope) -> reconciliation.Check:
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SHOW transaction_isolation")
                seen.append(cursor.fetchone()[0])
        else:
            seen.append(connection.in_atomic_block)  # SQLite: no transaction, so no write lock held
        return reconciliation.Check("isolation")

    monkeypatch.setattr(reconciliation, "DATABASE_CHECKS", (*reconciliation.DATABASE_CHECKS, check_isolation))
    run_ = reconciliation.run_reconciliation()
    assert run_.ok, run_.drift
    assert seen == (["repeatable read"] if connection.vendor == "postgresql" else [False])


# --- Incremental runs: what was written since the last proven run ------------------------------------------


@pytest.fixture
def no_overlap(settings: Any) -> None:
    """The window starts at the last proven run's start exactly: a row written before it is old, after it new."""
    settings.BILLING_RECONCILE_OVERLAP_SECONDS = 0


def rows_checked(run_: ReconciliationRun) -> dict[str, int]:
    return {name: summary["checked"] for name, summary in run_.checked.items() if not summary.get("skipped")}


@pytest.mark.usefixtures("no_overlap")
def test_an_incremental_run_checks_only_what_was_written_since_the_last_proven_run(
    books: dict[str, Any], tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    full = reconciliation.run_reconciliation()
    assert rows_checked(full)["usage_records"] == 5
    new = run(tenant["organization"], builtin_endpoint, gpu_ms=1_000)
    run_ = reconciliation.run_reconciliation()
    assert run_.ok, run_.drift
    assert (run_.scope, run_.since) == ("incremental", full.watermark)
    assert run_.watermark == run_.started_at
    checked = rows_checked(run_)
    # One job, its attempt, its record and its debit; none of the books' rows before it.
    assert (checked["jobs"], checked["attempts"], checked["usage_records"]) == (1, 1, 1)
    assert checked["usage_debits"] == 2
    assert checked["ledger_chain"] == CreditEntry.objects.filter(job=new).count() == 1
    assert checked["balances"] == Account.objects.count()  # every account: one indexed lookup each
    assert checked["payments"] == 0
    # Rollups: the day of the new record, compared whole (the books' records of that day too; the books may be a day
    # older when the test crossed midnight).
    day = UsageRecord.objects.get(job=new).recorded_at.astimezone(UTC).date()
    assert run_.checked["rollups"]["days"] == [day.isoformat()]
    assert checked["rollups"] >= UsageRecord.objects.filter(recorded_at__date=day).count()
    # Nothing written since: nothing to look at but the accounts and what is open.
    quiet = reconciliation.run_reconciliation()
    assert quiet.since == run_.watermark
    expected = {
        "balances": Account.objects.count(),
        "holds": Account.objects.count() + Hold.objects.filter(released_at__isnull=True).count(),
        # The organizations whose dispatch reads a sum of rows (PostgreSQL), every run.
        "active_jobs": ActiveJobCount.objects.values("organization_id").distinct().count(),
    }
    assert {name: count for name, count in rows_checked(quiet).items() if count} == {
        name: count for name, count in expected.items() if count
    }


@pytest.mark.usefixtures("no_overlap")
def test_an_incremental_run_finds_drift_in_new_rows(
    books: dict[str, Any], tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    assert reconciliation.run_reconciliation().ok
    organization = books["organization"]
    before = CreditEntry.objects.filter(organization=organization).latest("id")
    new = run(organization, builtin_endpoint, gpu_ms=1_000)
    JobAttempt.objects.filter(job=new).update(gpu_ms=F("gpu_ms") + 1)
    JobAttempt.objects.create(job=books["failed"], number=9, outcome=AttemptOutcome.ERRORED, finished_at=timezone.now())
    grant = grant_credits(organization=organization, amount_micros=1_000, reason="goodwill")
    CreditEntry.objects.filter(pk=grant.pk).update(balance_after_micros=F("balance_after_micros") + 10)
    Account.objects.filter(pk=organization.pk).update(balance_micros=F("balance_micros") + 10)
    Hold.objects.filter(job=new).update(organization=books["still_running"].organization)
    run_ = reconciliation.run_reconciliation()
    assert run_.scope == "incremental"
    assert kinds(run_) == {
        "usage_records.usage_disagrees_with_attempt",
        "attempts.closed_attempt_without_usage",
        "ledger_chain.balance_after_breaks_the_chain",
        "holds.hold_of_another_organization",
    }
    assert drift_of(run_, "usage_records.usage_disagrees_with_attempt")["examples"][0]["job_id"] == str(new.pk)
    # The new entry is checked against the one before it, which is older than the window.
    [broken] = drift_of(run_, "ledger_chain.balance_after_breaks_the_chain")["examples"]
    assert broken["id"] == grant.pk
    assert broken["previous_balance_after_micros"] == CreditEntry.objects.get(job=new).balance_after_micros
    assert before.pk < CreditEntry.objects.get(job=new).pk < grant.pk
    assert run_.watermark is None  # drift: nothing proven


@pytest.mark.usefixtures("no_overlap")
def test_a_cached_balance_overwritten_without_an_entry_is_found_by_an_incremental_run(books: dict[str, Any]) -> None:
    assert reconciliation.run_reconciliation().ok
    Account.objects.filter(pk=books["organization"].pk).update(balance_micros=F("balance_micros") + 1)
    run_ = reconciliation.run_reconciliation()
    assert run_.scope == "incremental"
    assert kinds(run_) == {"balances.balance_not_last_balance_after"}
    [example] = drift_of(run_, "balances.balance_not_last_balance_after")["examples"]
    assert example["balance_micros"] == example["last_balance_after_micros"] + 1
    assert "entries_micros" not in example  # the sum over every entry is a full run's


@pytest.mark.usefixtures("no_overlap")
def test_drift_in_old_rows_an_incremental_run_cannot_see_is_found_by_the_next_full_run(books: dict[str, Any]) -> None:
    assert reconciliation.run_reconciliation().ok
    # Edits of rows written before the last proven run: no writer does this, but a bad migration or a hand could.
    JobAttempt.objects.filter(job=books["retried"], number=2).update(gpu_ms=F("gpu_ms") + 1)
    goodwill = CreditEntry.objects.filter(organization=books["organization"], kind=EntryKind.GRANT).latest("id")
    CreditEntry.objects.filter(pk=goodwill.pk).update(amount_micros=F("amount_micros") - 3)
    Hold.objects.filter(job=books["billed"]).update(organization=books["still_running"].organization)  # released
    ten_days_ago = (timezone.now() - timedelta(days=10)).replace(hour=0, minute=0, second=0, microsecond=0)
    UsageRollup.objects.create(
        granularity=Granularity.DAY,
        bucket_start=ten_days_ago,
        organization=books["organization"],
        endpoint=books["billed"].endpoint,
        gpu_class="cpu",
        attempts=1,
    )
    incremental = reconciliation.run_reconciliation()
    assert incremental.scope == "incremental"
    assert incremental.ok, incremental.drift
    assert rows_checked(incremental)["usage_records"] == 0
    full = reconciliation.run_reconciliation(full=True)
    assert (full.scope, full.since) == ("full", None)
    assert kinds(full) == {
        "usage_records.usage_disagrees_with_attempt",
        "balances.balance_not_sum_of_entries",
        "ledger_chain.balance_after_breaks_the_chain",
        "rollups.day_rollup_differs_from_usage",
        "rollups.hour_rollups_differ_from_day",
        "holds.hold_of_another_organization",
    }
    assert full.watermark is None
    # The next incremental run starts from the last proven run, not from the full run that found drift.
    assert reconciliation.run_reconciliation().since == incremental.watermark


@pytest.mark.usefixtures("no_overlap")
def test_the_watermark_moves_only_when_a_run_completed_and_proved_the_books(
    books: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    proven = reconciliation.run_reconciliation()

    def broken(scope: reconciliation.Scope) -> reconciliation.Check:
        raise RuntimeError("the database went away")

    broken.__name__ = "check_holds"
    with monkeypatch.context() as patched:
        checks = tuple(broken if c is reconciliation.check_holds else c for c in reconciliation.DATABASE_CHECKS)
        patched.setattr(reconciliation, "DATABASE_CHECKS", checks)
        failed = reconciliation.run_reconciliation()
    assert kinds(failed) == {"holds.check_failed"}
    assert (failed.since, failed.watermark) == (proven.watermark, None)

    @contextlib.contextmanager
    def killed(scope: reconciliation.Scope) -> Iterator[None]:
        raise SystemExit("time limit")  # the worker killed mid-run: nothing is stored
        yield

    with monkeypatch.context() as patched:
        patched.setattr(reconciliation, "_snapshot", killed)
        with pytest.raises(SystemExit):
            reconciliation.run_reconciliation()
    assert ReconciliationRun.objects.count() == 2

    # Drift in a new row: reported, nothing proven, and reported again by the next run until it is corrected.
    job = completed_without_attempt(books)
    for _ in range(2):
        drifted = reconciliation.run_reconciliation()
        assert kinds(drifted) == {"jobs.completed_without_attempt"}
        assert (drifted.since, drifted.watermark) == (proven.watermark, None)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.CANCELLED)
    corrected = reconciliation.run_reconciliation()
    assert corrected.ok
    assert (corrected.since, corrected.watermark) == (proven.watermark, corrected.started_at)
    assert reconciliation.run_reconciliation().since == corrected.watermark


def test_a_proof_older_than_the_longest_window_is_followed_by_a_full_run(books: dict[str, Any], settings: Any) -> None:
    settings.BILLING_RECONCILE_MAX_WINDOW_DAYS = 7
    proven = reconciliation.run_reconciliation()
    ReconciliationRun.objects.filter(pk=proven.pk).update(watermark=timezone.now() - timedelta(days=6, hours=23))
    assert reconciliation.run_reconciliation().scope == "incremental"
    ReconciliationRun.objects.update(watermark=timezone.now() - timedelta(days=7, minutes=1))
    run_ = reconciliation.run_reconciliation()
    assert (run_.scope, run_.since, run_.watermark) == ("full", None, run_.started_at)


def test_the_overlap_catches_a_row_committed_after_the_last_run_with_an_earlier_stamp(
    books: dict[str, Any], settings: Any
) -> None:
    settings.BILLING_RECONCILE_OVERLAP_SECONDS = 3600
    proven = reconciliation.run_reconciliation()
    # Attempts stamped before that run started whose transactions committed after its snapshot: the first within
    # the overlap, the second an hour and a half late (beyond what the overlap tolerates).
    late = JobAttempt.objects.create(
        job=books["failed"],
        number=7,
        outcome=AttemptOutcome.ERRORED,
        finished_at=proven.started_at - timedelta(minutes=30),
    )
    JobAttempt.objects.create(
        job=books["failed"],
        number=8,
        outcome=AttemptOutcome.ERRORED,
        finished_at=proven.started_at - timedelta(minutes=90),
    )
    run_ = reconciliation.run_reconciliation()
    assert run_.since == proven.watermark - timedelta(hours=1)
    item = drift_of(run_, "attempts.closed_attempt_without_usage")
    assert [example["number"] for example in item["examples"]] == [late.number]
    full = reconciliation.run_reconciliation(full=True)
    assert drift_of(full, "attempts.closed_attempt_without_usage")["count"] == 2


@pytest.mark.usefixtures("no_overlap")
def test_an_incremental_run_checks_new_and_pending_payments(books: dict[str, Any]) -> None:
    organization = books["organization"]
    old = Payment.objects.create(
        organization=organization, kind=PaymentKind.PURCHASE, status=PaymentStatus.FAILED, amount_cents=900
    )
    assert reconciliation.run_reconciliation().ok
    pending = Payment.objects.create(organization=organization, kind=PaymentKind.PURCHASE, amount_cents=500)
    paid = Payment.objects.create(
        organization=organization,
        kind=PaymentKind.PURCHASE,
        status=PaymentStatus.SUCCEEDED,
        amount_cents=2_000,
        succeeded_at=timezone.now(),
    )
    receipts.issue_receipt(paid, test_mode=False)  # as the payment's success issues it
    run_ = reconciliation.run_reconciliation()
    assert run_.checked["payments"] == {"checked": 2, "drift": 1}
    assert drift_of(run_, "payments.succeeded_payment_not_credited_its_amount")["examples"][0]["id"] == paid.pk
    # An entry posted since brings its payment into the window, however old the payment.
    account = locked_account(organization.pk)
    post_entry(account=account, kind=EntryKind.PURCHASE, amount_micros=20_000_000, idempotency_key="p", payment=paid)
    post_entry(account=account, kind=EntryKind.PURCHASE, amount_micros=9_000_000, idempotency_key="o", payment=old)
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"payments.credit_for_unpaid_payment"}
    assert drift_of(run_, "payments.credit_for_unpaid_payment")["examples"][0]["id"] == old.pk
    assert run_.checked["payments"]["checked"] == 3  # pending, paid, and old
    assert pending.status == PaymentStatus.PENDING


def test_the_command_and_the_admin_can_ask_for_a_full_run(books: dict[str, Any], admin_user: Any, client: Any) -> None:
    call_command("reconcile", stdout=io.StringIO())
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    assert "scope: incremental: rows written since " in out.getvalue()
    out = io.StringIO()
    call_command("reconcile", "--full", stdout=out)
    assert "scope: full: every row" in out.getvalue()
    client.force_login(admin_user)
    listing = client.get("/admin/billing/reconciliationrun/").content.decode()
    assert "Run a full reconciliation" in listing
    client.post("/admin/billing/reconciliationrun/run/")
    assert ReconciliationRun.objects.latest("started_at").scope == "incremental"
    response = client.post("/admin/billing/reconciliationrun/run/", {"scope": "full"})
    latest = ReconciliationRun.objects.latest("started_at")
    assert latest.scope == "full"
    page = client.get(response["Location"]).content.decode()
    assert "full: every row" in page


def test_the_run_rate_page_says_what_the_latest_runs_covered(
    books: dict[str, Any], admin_user: Any, client: Any
) -> None:
    client.force_login(admin_user)
    full = reconciliation.run_reconciliation()
    Account.objects.filter(pk=books["organization"].pk).update(held_micros=1)
    assert not reconciliation.run_reconciliation(full=True).ok
    Account.objects.filter(pk=books["organization"].pk).update(held_micros=0)
    incremental = reconciliation.run_reconciliation()
    assert incremental.ok
    assert incremental.since == full.watermark - timedelta(hours=1)
    body = client.get("/admin/run-rate/").content.decode()
    assert "incremental: rows written since" in body
    assert "no drift. Latest full run:" in body
    assert "1 drift(s)" in body


def test_active_jobs_the_dispatch_reads_against_the_jobs_and_put_right(books: dict[str, Any]) -> None:
    """A sum of the triggers' rows that is not the jobs counted (rows loaded around the triggers) is drift, and
    ``manage.py recount_active_jobs`` puts it right."""
    if connection.vendor != "postgresql":
        pytest.skip("the sum is kept on PostgreSQL; SQLite's dispatch counts the jobs")
    organization = books["still_running"].organization
    running = Job.objects.filter(organization=organization, status__in=ACTIVE_STATUSES).count()
    assert running == 1
    assert reconciliation.run_reconciliation().ok
    ActiveJobCount.objects.filter(organization_id=organization.pk, shard=0).update(jobs=F("jobs") + 3)
    drifted = reconciliation.run_reconciliation()
    assert kinds(drifted) == {"active_jobs.sum_not_count"}
    assert drift_of(drifted, "active_jobs.sum_not_count")["examples"] == [
        {"organization_id": str(organization.pk), "summed": running + 3, "counted": running}
    ]
    out = io.StringIO()
    call_command("recount_active_jobs", stdout=out)
    assert out.getvalue() == f"{organization.pk}: the dispatch read {running + 3} active jobs, {running} are\n"
    assert list(ActiveJobCount.objects.filter(organization_id=organization.pk).values_list("shard", "jobs")) == [
        (0, running)
    ]
    assert reconciliation.run_reconciliation().ok
    out = io.StringIO()
    call_command("recount_active_jobs", stdout=out)
    assert out.getvalue() == "Every organization's active jobs agree with its jobs.\n"
