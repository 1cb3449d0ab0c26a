"""Reconciliation: clean books report no drift; each kind of corruption is found and reported with its rows."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import F
from django.utils import timezone

from accounts.models import Organization
from billing import reconciliation
from billing.ledger import grant_credits, locked_account, post_entry, refund_job
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
from inference import services
from inference.models import AttemptOutcome, Endpoint, Job, JobAttempt, JobStatus
from tests.lifecycle import finish, run, start, submit

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("quiet_books")]


@pytest.fixture
def books(tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint) -> dict[str, Any]:
    """Two organizations' worth of every path: billed, retried, failed, cancelled running and queued, refunded."""
    organization = tenant["organization"]
    Organization.objects.filter(pk__in=[organization.pk, other_tenant["organization"].pk]).update(concurrency_limit=50)
    billed = run(organization, builtin_endpoint, gpu_ms=1_235, cold_start_ms=300)
    retried = start(submit(organization, builtin_endpoint, api_key=tenant["api_key"]))
    finish(retried, AttemptOutcome.ERRORED, gpu_ms=700, error="out of memory", retry=True)
    retried = finish(start(retried), gpu_ms=2_000)
    failed = run(organization, builtin_endpoint, outcome=AttemptOutcome.FAILED, gpu_ms=400, error="bad input")
    running = start(submit(organization, builtin_endpoint))
    services.cancel_job(job=running)
    cancelled_running = finish(running, AttemptOutcome.CANCELLED, gpu_ms=900)
    cancelled_queued = submit(organization, builtin_endpoint)
    services.cancel_job(job=cancelled_queued)
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


def test_clean_books_have_no_drift_and_stripe_is_recorded_as_skipped(books: dict[str, Any]) -> None:
    run_ = reconciliation.run_reconciliation()
    assert run_.drift == []
    assert run_.ok
    assert run_.finished_at is not None
    checked = run_.checked
    assert set(checked) == {
        "jobs", "attempts", "usage_records", "usage_debits", "balances", "ledger_chain", "holds", "rollups",
        "payments", "stripe",
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


def test_a_completed_job_without_an_attempt(books: dict[str, Any]) -> None:
    job = Job.objects.create(
        organization=books["organization"],
        endpoint=books["billed"].endpoint,
        gpu_class="cpu",
        input={},
        status=JobStatus.COMPLETED,
        finished_at=timezone.now(),
    )
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
    run_ = reconciliation.run_reconciliation()
    assert kinds(run_) == {"usage_records.usage_disagrees_with_attempt"}
    item = drift_of(run_, "usage_records.usage_disagrees_with_attempt")
    assert item["count"] == 2
    assert {(e["attempt_number"], e["attempt_outcome"], e["attempt_gpu_ms"]) for e in item["examples"]} == {
        (1, "lost", 700),
        (2, "succeeded", 2_001),
    }


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
    assert kinds(run_) == {"rollups.day_rollup_differs_from_usage", "rollups.hour_rollups_differ_from_day"}


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
    from billing import payments

    settings.STRIPE_SECRET_KEY = "sk_test_reconcile"
    missing = {"check": "stripe_payment_missing", "payment_id": None, "payment_intent": "pi_1", "detail": "..."}
    unnamed = {"payment_id": 1, "detail": "amount differs"}
    counts = {"payments": 3, "refunds": 1}
    monkeypatch.setattr(payments, "compare_with_stripe", lambda: (counts, [missing, unnamed, missing]))
    run_ = reconciliation.run_reconciliation()
    assert run_.checked["stripe"] == {"checked": 4, "drift": 3, "counts": counts}
    assert kinds(run_) == {"stripe.stripe_payment_missing", "stripe.differs_from_stripe"}
    assert drift_of(run_, "stripe.stripe_payment_missing")["examples"] == [missing, missing]
    assert drift_of(run_, "stripe.differs_from_stripe")["examples"] == [unnamed]


def test_stripe_that_cannot_be_reached_is_drift_not_a_pass(
    books: dict[str, Any], settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from billing import payments

    def unreachable() -> Any:
        raise ConnectionError("api.stripe.com unreachable")

    settings.STRIPE_SECRET_KEY = "sk_test_reconcile"
    monkeypatch.setattr(payments, "compare_with_stripe", unreachable)
    run_ = reconciliation.run_reconciliation()
    assert not run_.ok
    assert drift_of(run_, "stripe.check_failed")["examples"] == [
        {"error": "ConnectionError: api.stripe.com unreachable"}
    ]


def test_a_check_that_fails_is_drift_and_the_others_still_run(
    books: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> reconciliation.Check:
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
    entry = app.conf.beat_schedule["billing-reconcile"]
    assert entry["task"] == "billing.reconcile"
    assert entry["schedule"] == crontab(hour=3, minute=0)
    assert app.conf.timezone == "UTC"
    result = app.tasks["billing.reconcile"].run()
    assert result == {"run": ReconciliationRun.objects.get().pk, "ok": True, "drift": 0}


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

    def check_isolation() -> reconciliation.Check:
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
