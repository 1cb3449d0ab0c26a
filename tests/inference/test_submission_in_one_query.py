"""A submission with no transaction open is one query on PostgreSQL, its own transaction (the job's insert and
billing's admission), then the dispatch's own query. Where billing must decide under a lock, nothing of the first
query stays and the submission runs again in a transaction, deciding exactly as it did before.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db import DatabaseError, connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts import statements
from accounts.models import Organization
from accounts.services import set_concurrency_limit
from billing import controls, pricing
from billing.ledger import grant_credits
from billing.models import Account, EntryKind, Hold
from inference import dispatch, job_events, submission
from inference.models import Endpoint, Job, JobLog, JobStatus
from tests import sessions
from tests.lifecycle import SMALL, on_postgresql_in_transactions, submit_as

pytestmark = on_postgresql_in_transactions("SQLite submits in a transaction of Django's (one writer at a time)")


@pytest.fixture
def queries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, str]]:
    """Each one-query transaction a submission sends (its own, then the dispatch's): whether it was sent with no
    transaction open, and how it ended."""
    sent: list[tuple[bool, str]] = []
    in_turn = statements.in_turn

    def recorded(cursor: Any, first: Any, *then: Any, **kwargs: Any) -> None:
        in_autocommit = connection.get_autocommit()
        try:
            in_turn(cursor, first, *then, **kwargs)
        except DatabaseError as error:
            sent.append((in_autocommit, "unmet" if statements.was_unmet(error) else type(error).__name__))
            raise
        sent.append((in_autocommit, "committed" if in_autocommit else "in a transaction"))

    monkeypatch.setattr(statements, "in_turn", recorded)
    return sent


def _held(organization: Organization) -> int:
    return Account.objects.get(pk=organization.pk).held_micros


def test_a_submission_is_one_query_committed_before_its_message_goes(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, queries: list[tuple[bool, str]], monkeypatch: Any,
    settings: Any,
) -> None:  # fmt: skip
    """Where its message does not go ahead (an organization with no room last time, or switched off: tests of that
    in test_message_ahead.py), the message goes once the dispatch has committed."""
    import psycopg

    settings.JOB_MESSAGE_AHEAD = False
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=100_000_000, reason="one query test")
    held_before = _held(organization)
    seen: list[tuple[str, int, int, int]] = []

    def sent(job_id: str, attempt: int, queue: str) -> bool:
        # What another connection sees as the message goes out: all of the submission, and no lock left held.
        with psycopg.connect(**sessions.conninfo(), autocommit=True) as other:
            status = other.execute(f"SELECT status FROM {Job._meta.db_table} WHERE id = %s", [job_id]).fetchone()  # noqa: S608
            holds = other.execute(f"SELECT count(*) FROM {Hold._meta.db_table} WHERE job_id = %s", [job_id]).fetchone()  # noqa: S608
            unlocked = []
            for table, column, key in (
                (Organization._meta.db_table, "id", organization.pk),
                (Account._meta.db_table, Account._meta.pk.column, organization.pk),
            ):
                lock_sql = f"SELECT 1 FROM {table} WHERE {column} = %s FOR UPDATE SKIP LOCKED"  # noqa: S608
                unlocked.append(len(other.execute(lock_sql, [key]).fetchall()))
        assert status is not None
        assert holds is not None
        seen.append((status[0], holds[0], *unlocked))
        return True

    monkeypatch.setattr(dispatch, "send_run_message", sent)
    told: list[Any] = []
    monkeypatch.setattr(job_events, "publish", told.append)
    job = submit_as(tenant, builtin_endpoint)
    assert told == []  # no one can wait on a job whose id is not answered yet: no Redis round trip for it
    # One query, the dispatch's transaction after the submission's: sent with no BEGIN before it nor COMMIT after it.
    assert queries == [(True, "committed")]
    assert seen == [(JobStatus.DISPATCHED, 1, 1, 1)]
    job.refresh_from_db()
    assert (job.status, job.attempt) == (JobStatus.DISPATCHED, 1)
    hold = Hold.objects.get(job=job)
    assert _held(organization) == held_before + hold.amount_micros > held_before
    assert list(JobLog.objects.filter(job=job).values_list("message", flat=True)) == [
        f"Request queued for {builtin_endpoint.endpoint_id}."
    ]


def test_a_submission_refused_for_credit_stores_nothing(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, queries: list[tuple[bool, str]]
) -> None:
    organization = tenant["organization"]
    account = Account.objects.get(pk=organization.pk)
    grant_credits(organization=organization, amount_micros=-account.balance_micros, reason="none left",
                  kind=EntryKind.ADJUSTMENT)  # fmt: skip
    before = Account.objects.values_list("balance_micros", "held_micros").get(pk=organization.pk)
    with pytest.raises(submission.SubmissionRefused) as refused:
        submit_as(tenant, builtin_endpoint)
    assert refused.value.error_type == "insufficient_credits"
    assert "Not enough credits" in str(refused.value.detail)
    # The one query ended unmet, rolled back whole; then decided under the account's lock in a transaction.
    assert queries[0] == (True, "unmet")
    assert not Job.objects.filter(organization=organization).exists()
    assert not Hold.objects.filter(organization_id=organization.pk).exists()
    assert Account.objects.values_list("balance_micros", "held_micros").get(pk=organization.pk) == before


def set_limit(tenant: dict[str, Any], limit: str, micros: int) -> None:
    if limit == "key":
        controls.set_key_limit(api_key=tenant["api_key"], monthly_limit_micros=micros)
    elif limit == "member":  # on the person who made the key
        controls.set_member_limit(organization=tenant["organization"], user=tenant["user"], monthly_limit_micros=micros)
    else:
        controls.set_monthly_budget(organization=tenant["organization"], budget_micros=micros)


@pytest.mark.parametrize("limit", ["key", "member", "budget"])
def test_a_key_s_limit_its_maker_s_or_a_budget_is_decided_under_the_lock(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, queries: list[tuple[bool, str]], limit: str
) -> None:
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=100_000_000, reason="limit test")
    set_limit(tenant, limit, 50_000_000)
    held_before = _held(organization)
    job = submit_as(tenant, builtin_endpoint)
    assert queries[0] == (True, "unmet")
    assert _held(organization) == held_before + Hold.objects.get(job=job).amount_micros
    job.refresh_from_db()
    assert job.status == JobStatus.DISPATCHED  # the transaction's dispatch, once it committed
    assert Job.objects.filter(organization=organization).count() == 1
    # Over the limit: refused, nothing stored.
    set_limit(tenant, limit, 0)
    with pytest.raises(submission.SubmissionRefused) as refused:
        submit_as(tenant, builtin_endpoint)
    assert refused.value.error_type == "spend_limit_exceeded"
    assert Job.objects.filter(organization=organization).count() == 1


def test_a_reused_idempotency_key_answers_the_first_job(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, queries: list[tuple[bool, str]]
) -> None:
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=100_000_000, reason="idempotency test")
    arguments = {"organization": organization, "api_key": tenant["api_key"], "endpoint": builtin_endpoint,
                 "payload": dict(SMALL), "idempotency_key": "same"}  # fmt: skip
    first, new = submission.submit_job(**arguments)
    assert new
    held = _held(organization)
    # Another request with the key that did not see the first (the race the unique key settles): its one query fails
    # on the key, and nothing of it stays.
    real_same_key = submission._same_key
    looked: list[int] = []

    def not_yet(*args: Any) -> Job | None:
        looked.append(1)
        return None if len(looked) == 1 else real_same_key(*args)

    submission._same_key = not_yet  # type: ignore[assignment]
    try:
        again, new = submission.submit_job(**arguments)
    finally:
        submission._same_key = real_same_key  # type: ignore[assignment]
    assert (again.pk, new) == (first.pk, False)
    assert queries[-1] == (True, "IntegrityError")
    assert Job.objects.filter(organization=organization).count() == 1
    assert Hold.objects.filter(organization_id=organization.pk).count() == 1
    assert _held(organization) == held


def test_jobs_over_the_concurrency_limit_are_admitted_and_wait(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, queries: list[tuple[bool, str]]
) -> None:
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=100_000_000, reason="limit test")
    set_concurrency_limit(organization=organization, limit=2)
    jobs = [submit_as(tenant, builtin_endpoint) for _ in range(3)]
    assert queries == [(True, "committed")] * 3
    statuses = [Job.objects.get(pk=job.pk).status for job in jobs]
    assert statuses == [JobStatus.DISPATCHED, JobStatus.DISPATCHED, JobStatus.QUEUED]
    assert Hold.objects.filter(job__in=jobs, released_at=None).count() == 3


def _submit_all(organization: Organization, api_key: Any, endpoint: Endpoint, sizes: list[int]) -> list[str]:
    outcomes = []
    for steps in sizes:
        try:
            submission.submit_job(organization=organization, api_key=api_key, endpoint=endpoint,
                                  payload={**SMALL, "num_inference_steps": steps})  # fmt: skip
        except submission.SubmissionRefused as refused:
            outcomes.append(refused.error_type)
        else:
            outcomes.append("queued")
    return outcomes


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    credit=st.integers(0, 40_000),
    budget=st.one_of(st.none(), st.integers(0, 40_000)),
    key_limit=st.one_of(st.none(), st.integers(0, 40_000)),
    member_limit=st.one_of(st.none(), st.integers(0, 40_000)),
    with_key=st.booleans(),
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=6),
)
def test_one_query_decides_every_submission_as_the_transaction_does(
    make_user: Any, make_key: Any, builtin_endpoint: Endpoint, credit: int, budget: int | None,
    key_limit: int | None, member_limit: int | None, with_key: bool, sizes: list[int],
) -> None:  # fmt: skip
    """The same submissions against two organizations with the same books, one submitted in one query where it can
    and the other always in a transaction: the same answers, the same holds, the same held amounts."""
    pricing.forget_measurement(builtin_endpoint.pk)
    books = []
    for _ in range(2):
        user = make_user(email=f"books-{uuid.uuid4().hex[:10]}@example.com")
        organization = Organization.objects.get(memberships__user=user, is_personal=True)
        key, _ = make_key(organization, created_by=user)
        account = Account.objects.get(pk=organization.pk)
        grant_credits(organization=organization, amount_micros=credit - account.balance_micros, reason="start",
                      kind=EntryKind.ADJUSTMENT)  # fmt: skip
        controls.set_monthly_budget(organization=organization, budget_micros=budget)
        controls.set_key_limit(api_key=key, monthly_limit_micros=key_limit)
        controls.set_member_limit(organization=organization, user=user, monthly_limit_micros=member_limit)
        books.append((organization, key if with_key else None))
    (one_query, one_key), (in_transaction, transaction_key) = books
    answers = _submit_all(one_query, one_key, builtin_endpoint, sizes)
    real = submission._admission_in_query
    submission._admission_in_query = lambda job: None  # type: ignore[assignment]
    try:
        expected = _submit_all(in_transaction, transaction_key, builtin_endpoint, sizes)
    finally:
        submission._admission_in_query = real  # type: ignore[assignment]
    assert answers == expected

    def state(organization: Organization) -> tuple[int, int, list[int]]:
        account = Account.objects.get(pk=organization.pk)
        holds = Hold.objects.filter(organization_id=organization.pk, released_at=None).order_by("created_at")
        amounts = list(holds.values_list("amount_micros", flat=True))
        assert account.held_micros == sum(amounts)  # what is held is the sum of the open holds
        assert account.held_micros <= account.balance_micros  # no credit was taken back: never over the balance
        return account.balance_micros, account.held_micros, amounts

    assert state(one_query) == state(in_transaction)
    assert Job.objects.filter(organization=one_query).count() == answers.count("queued")

    def statuses(organization: Organization) -> list[str]:
        return list(
            Job.objects.filter(organization=organization).order_by("created_at").values_list("status", flat=True)
        )

    assert statuses(one_query) == statuses(in_transaction)  # dispatched in the query as after the transaction


def _failing_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatch's statements in the submission's query fail, after its COMMIT (a lost lock race, a timeout)."""
    real = dispatch.dispatch_statements

    def failing(organization_id: Any) -> Any:
        *before, _lock, update = real(organization_id)
        return *before, ("SELECT 1 / 0", ()), update

    monkeypatch.setattr(submission, "dispatch_statements", failing)


def test_a_dispatch_that_fails_in_the_submission_s_query_is_sent_again_on_its_own(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch,
    queries: list[tuple[bool, str]],
) -> None:  # fmt: skip
    sent: list[str] = []
    monkeypatch.setattr(dispatch, "send_run_message", lambda job_id, attempt, queue: sent.append(job_id) or True)
    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="dispatch failure test")
    _failing_dispatch(monkeypatch)
    job = submit_as(tenant, builtin_endpoint)
    # The submission's query failed after its COMMIT, and was not run again (one job, one hold); the dispatch's own.
    assert queries == [(True, "DataError"), (True, "committed")]
    job.refresh_from_db()
    assert (job.status, sent) == (JobStatus.DISPATCHED, [str(job.pk)])
    assert Job.objects.filter(organization=tenant["organization"]).count() == 1
    assert Hold.objects.filter(job=job, released_at=None).count() == 1


def test_a_dispatch_that_fails_after_the_submission_committed_leaves_the_job_to_the_sweep(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job and its hold are committed before the dispatch: a dispatch that fails (a lost connection) must not fail
    # the request, or a client retrying without an Idempotency-Key would pay for two jobs.
    from django.db import OperationalError

    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="dispatch failure test")

    def lost(*args: Any) -> Any:
        raise OperationalError("server closed the connection unexpectedly")

    _failing_dispatch(monkeypatch)
    monkeypatch.setattr(dispatch, "_dispatched_by_one_query", lost)
    job = submit_as(tenant, builtin_endpoint)
    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED
    assert Hold.objects.filter(job=job, released_at=None).exists()
    monkeypatch.undo()
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 1  # what the sweep does


def test_the_submission_is_on_disk_when_it_is_answered_not_before_its_dispatch(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its two transactions commit without waiting for the disk, so the worker can see the dispatch at once; the
    query's last transaction waits for the WAL's flush, which takes both with it, before the query ends."""
    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="durability test")
    in_turn, durable_at = statements.in_turn, []

    def recorded(cursor: Any, *sent: Any, **kwargs: Any) -> None:
        if statements.DURABLE_FROM_HERE in sent:
            commits = [index for index, statement in enumerate(sent) if statement == statements.COMMIT]
            marker = sent.index(statements.DURABLE_FROM_HERE)
            assert sent[0] == statements.NO_WAIT_FOR_DISK  # the submission's own transaction
            assert sent[commits[0] + 1] == statements.NO_WAIT_FOR_DISK  # the dispatch's
            assert marker == commits[-1] + 1  # the last transaction, after both
            kwargs["rows"] = {**kwargs.get("rows", {}), marker: durable_at}
        in_turn(cursor, *sent, **kwargs)

    monkeypatch.setattr(statements, "in_turn", recorded)
    job = submit_as(tenant, builtin_endpoint)
    [(message_lsn,)] = durable_at
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", [message_lsn])
        assert cursor.fetchone() == (True,)
    assert Job.objects.get(pk=job.pk).status == JobStatus.DISPATCHED
