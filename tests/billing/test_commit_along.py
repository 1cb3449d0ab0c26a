"""A finish at the top of an action (a worker's, a reap) sends its COMMIT in the query of its last statement, the
debit that locks the organization's account, on PostgreSQL (``accounts.statements.commits_along``): the account's
lock is free again when that query answers, before the process has read the answer. What it writes is what the
finish that commits on its own writes, whatever the balance, the hold and the outcome; a debit the balance no longer
covers fails that query and the finish runs again, deciding under the account's lock.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from django.db import connection, transaction
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts import statements
from accounts.services import set_concurrency_limit
from billing import metering, pricing, topups
from billing.ledger import grant_credits
from billing.models import Account, CreditEntry, EndUserRollup, EntryKind, Granularity, Hold, UsageRecord, UsageRollup
from billing.money import cost_within
from inference import attempts, closing
from inference.models import AttemptOutcome, Endpoint, Job, JobStatus
from tests import lifecycle

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("quiet_books")]


@pytest.fixture(autouse=True)
def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("SQLite: one statement per query, and Django's COMMIT")


@pytest.fixture
def funded(tenant: dict[str, Any]) -> dict[str, Any]:
    grant_credits(organization=tenant["organization"], amount_micros=10**9, reason="commit along test")
    set_concurrency_limit(organization=tenant["organization"], limit=1000)
    return tenant


def _committing(sent: CaptureQueriesContext) -> list[str]:
    return [query["sql"] for query in sent.captured_queries if query["sql"].rstrip().endswith("; COMMIT")]


def _set_balance(organization_id: Any, balance: int) -> None:
    organization = Account.objects.get(pk=organization_id).organization
    current = Account.objects.get(pk=organization_id).balance_micros
    if balance != current:
        grant_credits(
            organization=organization, amount_micros=balance - current, reason="set up", kind=EntryKind.ADJUSTMENT
        )


class Outsider:
    """Another connection, asked from inside the finish's transaction (right after its debit's query answered) what
    it can do with the organization's account: lock it within a short lock timeout, and see the job's end."""

    def __init__(self, organization_id: Any, job_id: Any) -> None:
        settings_dict = connection.settings_dict
        self.dsn = (
            f"host={settings_dict['HOST']} port={settings_dict['PORT'] or 5432} dbname={settings_dict['NAME']} "
            f"user={settings_dict['USER']} password={settings_dict['PASSWORD'] or ''}"
        )
        self.organization_id, self.job_id = organization_id, job_id
        self.seen: dict[str, Any] = {}

    def look(self) -> None:
        def run() -> None:
            with psycopg.connect(self.dsn, autocommit=True) as other:
                other.execute("SET lock_timeout = '3s'")
                try:
                    other.execute(
                        "UPDATE billing_account SET updated_at = updated_at WHERE organization_id = %s",
                        [self.organization_id],
                    )
                    self.seen["locked"] = True
                except psycopg.errors.LockNotAvailable:
                    self.seen["locked"] = False
                row = other.execute("SELECT status FROM inference_job WHERE id = %s", [self.job_id]).fetchone()
                self.seen["status"] = row[0]

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()


@pytest.fixture
def outsider(monkeypatch: pytest.MonkeyPatch) -> list[Outsider]:
    """Outsiders that look from ``topups.schedule_if_low``, which the debit calls as soon as its query answered."""
    waiting: list[Outsider] = []
    schedule = topups.schedule_if_low

    def looking(account: Account) -> bool:
        for one in waiting:
            one.look()
        return schedule(account)

    monkeypatch.setattr(topups, "schedule_if_low", looking)
    return waiting


def test_a_finish_commits_with_its_debit_and_frees_the_account_before_it_returns(
    funded: dict[str, Any], builtin_endpoint: Endpoint, outsider: list[Outsider]
) -> None:
    organization = funded["organization"]
    set_concurrency_limit(organization=organization, limit=1)
    job = lifecycle.start(lifecycle.submit_as(funded, builtin_endpoint))
    waiting = lifecycle.submit_as(funded, builtin_endpoint)  # behind the concurrency limit
    assert Job.objects.get(pk=waiting.pk).status == JobStatus.QUEUED
    before = Account.objects.get(pk=organization.pk)
    attempts.reserve_work(job=job, gpu_ms=2_000)
    looking = Outsider(organization.pk, job.pk)
    outsider.append(looking)

    with CaptureQueriesContext(connection) as sent:
        lifecycle.finish(job, gpu_ms=2_000, reserve=False)

    # Inside the finish, its debit answered: another connection locks the account at once and sees the job ended.
    assert looking.seen == {"locked": True, "status": JobStatus.COMPLETED.value}
    assert len(_committing(sent)) == 1
    assert "billing_account" in _committing(sent)[0]
    # Nothing is sent between it and the end of the transaction (Django logs its COMMIT, which psycopg skips).
    logged = [query["sql"] for query in sent.captured_queries]
    assert logged[logged.index(_committing(sent)[0]) + 1] == "COMMIT"
    record = UsageRecord.objects.get(job=job)
    assert record.cost_micros > 0
    after = Account.objects.get(pk=organization.pk)
    assert after.balance_micros == before.balance_micros - record.cost_micros
    assert (
        after.held_micros
        == Hold.objects.filter(organization=organization, released_at=None).aggregate(total=Sum("amount_micros"))[
            "total"
        ]
    )
    assert list(CreditEntry.objects.filter(usage_record=record).values_list("amount_micros", flat=True)) == [
        -record.cost_micros
    ]
    # What waits for the COMMIT ran: the slot the job freed went to the request behind it.
    assert Job.objects.get(pk=waiting.pk).status == JobStatus.DISPATCHED


def test_what_waits_for_the_commit_runs_when_the_finish_raises_after_its_debit_committed(
    funded: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A time limit or a signal raised between the debit's query and the end of the transaction: the job's end and
    its money are committed, and what waits for that commit (the freed slot's dispatch, the webhook) still runs."""
    set_concurrency_limit(organization=funded["organization"], limit=1)
    job = lifecycle.start(lifecycle.submit_as(funded, builtin_endpoint))
    waiting = lifecycle.submit_as(funded, builtin_endpoint)

    def interrupted(account: Account) -> bool:
        raise RuntimeError("soft time limit")

    monkeypatch.setattr(topups, "schedule_if_low", interrupted)
    with pytest.raises(RuntimeError, match="soft time limit"):
        lifecycle.finish(job, gpu_ms=1_000)
    assert Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED
    assert UsageRecord.objects.get(job=job).cost_micros > 0
    assert Job.objects.get(pk=waiting.pk).status == JobStatus.DISPATCHED


def test_a_debit_the_balance_no_longer_covers_is_decided_again_under_the_lock(
    funded: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refund took the credit back while the job ran: the query that would have committed fails, nothing of the
    first run stays, and the second bills what the balance covers, never below zero, in one transaction with the
    job's end (no one sees the job ended or its record before the debit decided under the lock is in)."""
    organization = funded["organization"]
    job = lifecycle.start(lifecycle.submit_as(funded, builtin_endpoint))
    attempts.reserve_work(job=job, gpu_ms=30_000)
    held = Hold.objects.get(job=job).amount_micros
    _set_balance(organization.pk, held // 3)
    looking = Outsider(organization.pk, job.pk)
    settle = metering._settle_on_the_locked_account

    def watched(*args: Any, **kwargs: Any) -> Account:
        looking.look()  # before this transaction takes the account's lock: the outsider's own lock is granted
        return settle(*args, **kwargs)

    monkeypatch.setattr(metering, "_settle_on_the_locked_account", watched)
    with CaptureQueriesContext(connection) as sent:
        lifecycle.finish(job, gpu_ms=30_000, reserve=False)
    assert looking.seen == {"locked": True, "status": JobStatus.RUNNING.value}
    assert len(_committing(sent)) == 1  # the first run's, which failed
    record = UsageRecord.objects.get(job=job)  # one record: the first run's was rolled back
    assert record.cost_micros == held // 3
    account = Account.objects.get(pk=organization.pk)
    assert account.balance_micros == 0
    assert CreditEntry.objects.filter(job=job, kind=EntryKind.USAGE).count() == 1
    assert Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED
    assert not Hold.objects.filter(job=job, released_at=None).exists()


def test_a_settlement_that_costs_nothing_commits_with_the_account_and_the_rollups(
    funded: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = lifecycle.start(lifecycle.submit_as(funded, builtin_endpoint))
    with CaptureQueriesContext(connection) as sent:
        closing.finish_attempt(
            job_id=str(job.pk), attempt=1, outcome=AttemptOutcome.FAILED, gpu_ms=0, error="bad input",
            error_type="validation",
        )  # fmt: skip
    committing = _committing(sent)
    assert len(committing) == 1
    assert "billing_account" in committing[0]
    assert "billing_usagerollup" in committing[0]
    assert UsageRecord.objects.get(job=job).cost_micros == 0
    assert Account.objects.get(pk=funded["organization"].pk).held_micros == 0
    assert Job.objects.get(pk=job.pk).status == JobStatus.FAILED


def test_inside_a_callers_transaction_the_finish_commits_nothing_of_its_own(
    funded: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = lifecycle.start(lifecycle.submit_as(funded, builtin_endpoint))
    with CaptureQueriesContext(connection) as sent, transaction.atomic():
        lifecycle.finish(job, gpu_ms=1_000)
        transaction.set_rollback(True)
    assert not _committing(sent)
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING
    assert not UsageRecord.objects.filter(job=job).exists()


def test_a_reap_commits_with_its_settlement(funded: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    job = lifecycle.start(lifecycle.submit_as(funded, builtin_endpoint))
    Job.objects.filter(pk=job.pk).update(lease_expires_at=job.started_at)
    with CaptureQueriesContext(connection) as sent:
        assert closing.reap_expired_leases() == 1
    assert len(_committing(sent)) == 1
    assert Job.objects.get(pk=job.pk).status == JobStatus.DISPATCHED  # retried
    assert UsageRecord.objects.get(job=job).billable is False


_FINISHES = st.fixed_dictionaries(
    {
        "balance": st.one_of(
            st.tuples(st.just("the cost plus"), st.integers(-3, 3)),
            st.tuples(st.just("any"), st.integers(-(10**6), 10**6)),
        ),
        "gpu_ms": st.integers(0, 60_000),
        "reserved_ms": st.integers(0, 60_000),
        "outcome": st.sampled_from(
            [AttemptOutcome.SUCCEEDED, AttemptOutcome.FAILED, AttemptOutcome.ERRORED, AttemptOutcome.CANCELLED]
        ),
        "retry": st.booleans(),
        "end_user": st.sampled_from(["", "customer-7"]),
        # Admission's estimate (GPU ms per work unit) of both jobs: drawn, not measured, since the measurement moves
        # as earlier examples record usage (an estimate read again between the two submissions held the jobs apart).
        "estimate": st.sampled_from([0.0, 1.0, 37.5, 100.0, 5_000.0]),
    }
)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(finish=_FINISHES)
def test_a_finish_that_commits_along_writes_what_one_committing_on_its_own_writes(
    funded: dict[str, Any], builtin_endpoint: Endpoint, finish: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs in the same state, the same balance set before each finish: one finished at the top of the action
    (its COMMIT with its last statement), one with that refused (``no_commit_along``, the way it went before)."""
    organization = funded["organization"]
    monkeypatch.setattr(pricing, "ms_per_work_unit", lambda endpoint: finish["estimate"])
    _set_balance(organization.pk, 10**9)  # an earlier example may have left it at anything
    jobs = [
        lifecycle.start(
            lifecycle.submit(organization, builtin_endpoint, api_key=funded["api_key"], end_user=finish["end_user"])
        )
        for _ in range(2)
    ]
    for job in jobs:
        attempts.reserve_work(job=job, gpu_ms=finish["reserved_ms"])
    hold, other_hold = (Hold.objects.get(job=job).amount_micros for job in jobs)
    assert hold == other_hold  # the same state: what the two finishes write may differ only by how they commit
    price = pricing.price_for(builtin_endpoint, jobs[0].started_at, organization.pk).unit_price_micros
    priced = cost_within(
        unit="gpu_second", unit_price_micros=price, gpu_ms=finish["gpu_ms"], images=0, pixels=0, ceiling_micros=hold
    )[1]
    kind, amount = finish["balance"]
    results = []
    for job, along in ((jobs[0], True), (jobs[1], False)):
        _set_balance(organization.pk, priced + amount if kind == "the cost plus" else amount)
        before = Account.objects.get(pk=organization.pk)
        rolled_before = _rolled_up(organization.pk)
        with CaptureQueriesContext(connection) as sent:
            if along:
                _finish(job, finish)
            else:
                with statements.no_commit_along():
                    _finish(job, finish)
        after = Account.objects.get(pk=organization.pk)
        record = UsageRecord.objects.get(job=job)
        stored = Job.objects.get(pk=job.pk)
        results.append(
            {
                "job": (stored.status, stored.gpu_ms, stored.error_type, stored.attempt),
                "record": (record.billable, record.gpu_ms, record.unbilled_gpu_ms, record.cost_micros),
                "entries": list(
                    CreditEntry.objects.filter(usage_record=record).values_list("amount_micros", flat=True)
                ),
                "balance": after.balance_micros - before.balance_micros,
                "held": after.held_micros - before.held_micros,
                "rolled_up": [now - then for now, then in zip(_rolled_up(organization.pk), rolled_before, strict=True)],
                "hold_open": Hold.objects.filter(job=job, released_at=None).exists(),
                "committed_along": bool(_committing(sent)),
            }
        )
        books = Account.objects.get(pk=organization.pk)
        open_holds = Hold.objects.filter(organization=organization, released_at=None).aggregate(
            total=Sum("amount_micros")
        )["total"]
        assert books.held_micros == (open_holds or 0)
        assert (
            books.balance_micros
            == CreditEntry.objects.filter(organization=organization).aggregate(total=Sum("amount_micros"))["total"]
        )
    along, alone = results
    assert not alone.pop("committed_along")
    committed_along = along.pop("committed_along")
    assert along == alone
    assert committed_along  # the first path always sends the COMMIT along (a run that failed and ran again too)
    # Any job still running (a retry) is left for the next example's tidy books; none is billed below zero.
    assert along["record"][3] <= max(hold, 0)


def _finish(job: Job, finish: dict[str, Any]) -> None:
    outcome = finish["outcome"]
    fields: dict[str, Any] = {"retry": finish["retry"]}
    if outcome == AttemptOutcome.SUCCEEDED:
        fields["result"] = {"images": [{"url": "x", "width": 64, "height": 64}], "seed": 1}
    else:
        fields |= {"error": "it broke", "error_type": "internal_error"}
    closed = closing.finish_attempt(
        job_id=str(job.pk), attempt=job.attempt, outcome=outcome, gpu_ms=finish["gpu_ms"], **fields
    )
    assert closed is not None


def _rolled_up(organization_id: Any) -> tuple[int, ...]:
    """The day's rollups and end users' day rows of the organization, summed."""
    totals = []
    for rows in (
        UsageRollup.objects.filter(organization_id=organization_id, granularity=Granularity.DAY),
        EndUserRollup.objects.filter(organization_id=organization_id),
    ):
        summed = rows.aggregate(attempts=Sum("attempts"), gpu_ms=Sum("gpu_ms"), cost=Sum("cost_micros"))
        totals += [int(summed["attempts"] or 0), int(summed["gpu_ms"] or 0), int(summed["cost"] or 0)]
    return tuple(totals)


def test_only_the_top_of_an_action_lets_a_statement_carry_the_commit() -> None:
    """``retrying_atomic``'s own transaction (which runs again where the statement's condition is unmet), not a plain
    atomic block, nor a savepoint inside one, nor the second run."""
    assert not statements.commits_along(connection)  # no transaction open
    with transaction.atomic(), statements.last_of_the_transaction():
        assert not statements.commits_along(connection)  # a plain atomic block cannot run again
        with statements.at_the_top():
            assert statements.commits_along(connection)
            with statements.no_commit_along():
                assert not statements.commits_along(connection)
            with transaction.atomic():
                assert not statements.commits_along(connection)  # a savepoint
    with transaction.atomic(), statements.at_the_top():
        assert not statements.commits_along(connection)  # not declared the last writes
