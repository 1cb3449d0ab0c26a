"""Dispatch reads the organization's limit and suspension from its row, in the statement that follows its lock."""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts import statements
from accounts.models import Organization
from accounts.services import set_concurrency_limit, set_organization_suspended
from billing.ledger import grant_credits
from inference import dispatch, submission
from inference.models import Endpoint, Job, JobStatus
from tests import sessions
from tests.lifecycle import start, submit_as

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]


def _statuses(tenant: dict[str, Any]) -> list[str]:
    return list(
        Job.objects.filter(organization=tenant["organization"]).order_by("created_at").values_list("status", flat=True)
    )


def test_dispatch_sends_the_oldest_queued_jobs_up_to_the_limit_less_those_running(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="dispatch test")
    set_concurrency_limit(organization=tenant["organization"], limit=3)
    running = start(submit_as(tenant, builtin_endpoint))
    jobs = [submit_as(tenant, builtin_endpoint) for _ in range(4)]
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 2  # 3 less the one running
    assert _statuses(tenant) == [JobStatus.RUNNING] + [JobStatus.DISPATCHED] * 2 + [JobStatus.QUEUED] * 2
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 0  # at its limit
    assert running.pk not in {job.pk for job in jobs}


def test_a_suspended_organization_s_queued_jobs_wait_until_it_is_reinstated(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="dispatch test")
    set_concurrency_limit(organization=tenant["organization"], limit=2)
    for _ in range(3):
        submit_as(tenant, builtin_endpoint)
    set_organization_suspended(organization=tenant["organization"], suspended=True)
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 0
    assert _statuses(tenant) == [JobStatus.QUEUED] * 3
    set_organization_suspended(organization=tenant["organization"], suspended=False)
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 2
    assert _statuses(tenant) == [JobStatus.DISPATCHED] * 2 + [JobStatus.QUEUED]


@pytest.mark.django_db(transaction=True)
def test_a_dispatch_outside_a_transaction_is_one_query_committed_as_it_returns(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submission dispatches once it has committed: on PostgreSQL the lock and the dispatch are one query, its own
    transaction, committed (and the organization's lock let go) before the messages go to the broker."""
    if connection.vendor != "postgresql":
        pytest.skip("SQLite dispatches in a transaction of Django's")
    import psycopg

    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="dispatch test")
    set_concurrency_limit(organization=tenant["organization"], limit=2)
    # The submissions' own dispatch left for the test's: they run in a transaction, which dispatches after it.
    with (
        patch.object(submission, "_admission_in_query", return_value=None),
        patch.object(submission, "dispatch_organization"),
    ):
        jobs = [submit_as(tenant, builtin_endpoint) for _ in range(3)]
    conninfo = sessions.conninfo()
    seen_at_send: list[tuple[list[str], int]] = []

    def sent(job_id: str, attempt: int, queue: str) -> bool:
        # What another connection sees when the message goes out: the job dispatched, the organization unlocked.
        with psycopg.connect(**conninfo, autocommit=True) as other:
            job_sql = f"SELECT status FROM {Job._meta.db_table} WHERE id = %s"  # noqa: S608
            status = other.execute(job_sql, [job_id]).fetchone()
            organization_sql = f"SELECT id FROM {Organization._meta.db_table} WHERE id = %s FOR UPDATE SKIP LOCKED"  # noqa: S608
            unlocked = len(other.execute(organization_sql, [tenant["organization"].pk]).fetchall())
        assert status is not None
        seen_at_send.append(([status[0]], unlocked))
        return True

    monkeypatch.setattr(dispatch, "send_run_message", sent)
    in_autocommit: list[bool] = []
    in_turn = statements.in_turn

    def recorded(*args: Any, **kwargs: Any) -> None:
        in_autocommit.append(connection.get_autocommit())  # no BEGIN before it, no COMMIT after it
        in_turn(*args, **kwargs)

    monkeypatch.setattr(statements, "in_turn", recorded)
    with CaptureQueriesContext(connection) as sent_queries:
        assert dispatch.dispatch_organization(tenant["organization"].pk) == 2
    # Besides, the first time this connection sends them, the statements' preparation (statements.in_turn).
    sent_sql = [query["sql"] for query in sent_queries.captured_queries if not statements.is_preparation(query["sql"])]
    assert len(sent_sql) == 1, sent_sql
    assert in_autocommit == [True]
    assert seen_at_send == [([JobStatus.DISPATCHED], 1)] * 2
    assert [Job.objects.get(pk=job.pk).status for job in jobs] == [JobStatus.DISPATCHED] * 2 + [JobStatus.QUEUED]
