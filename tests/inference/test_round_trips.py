"""Statements per job: what each step of one job's life sends to the database on the fast path, with billing on.

Every statement is a round trip on top of the model's time, on every request. Each step's count may only go down:
the ceilings are the counts measured when this test was written; lower one when a change saves a statement.

The test runs inside pytest-django's transaction, so each top-level transaction of a step is a savepoint and its
release here, where production sends BEGIN and COMMIT: the same number of round trips. The shared cache starts
empty: admission reads the endpoint's measured GPU time from the rollups (production reads it once a minute per
endpoint once the endpoint has usage, and once a second per process before it has any).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts import statements as prepared
from billing.ledger import grant_credits
from billing.models import Hold, UsageRecord
from billing.money import gpu_ms_within
from billing.pricing import price_for
from inference import active_jobs, attempts, closing, submission
from inference.hooks import Reservation
from inference.models import AttemptOutcome, Endpoint, Job, JobStatus
from tests.lifecycle import SMALL

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]

STEPS = ("submit", "dispatch", "claim", "heartbeat", "reserve", "finish")

# The most statements each step may send on PostgreSQL: the counts measured, a transaction's savepoint and release
# included.
CEILINGS = {
    # The job's insert with its log line (one statement); admission: the endpoint's measured GPU time (the cache is
    # cold), then one query: the key's share lock, the hold's insert (a new job has no earlier hold to look for) and
    # the account's conditional UPDATE (the one statement that locks it), which also checks the key has no limit.
    "submit": 6,
    # One query: the organization's lock, then its active jobs counted, the queued ones that fit picked, moved to
    # DISPATCHED and returned.
    "dispatch": 3,
    # The conditional UPDATE, the attempt row with its log line (one statement); then the job read with its endpoint.
    # (With no transaction open, one statement: tests/inference/test_claim_in_one_query.py.)
    "claim": 5,
    # The attempt's heartbeat time, the lease renewed and the job as written (one statement); billing's look at the
    # balance.
    "heartbeat": 2,
    # The job's open hold, the account's balance and holds, the price in force when the job started.
    "reserve": 3,
    # The job's lock with its organization's retention setting and the attempt's close (one statement: the job's lock
    # a subquery the attempt's UPDATE waits for), the endpoint (kept in memory between transactions that change none:
    # read here, in the test's), the job's update with its log line (one statement); settlement: the price, the hold
    # released, then one statement: the usage record, the account's conditional debit (which locks it), the debit's
    # entry and the rollups; on commit, one read that finds no waiting job to dispatch.
    "finish": 9,
}
# SQLite (one writer at a time) has no data-modifying WITH and takes no row locks: a log line is a statement of its
# own (submit, claim, finish), so are the hold's insert, the attempt's close, the heartbeat's two writes and the
# settlement's debit, its entry and the rollups; admission sends no share lock on the key, dispatch no lock on the
# organization.
SQLITE_CEILINGS = {**CEILINGS, "submit": 8, "claim": 6, "heartbeat": 4, "finish": 14}


def test_each_step_of_a_job_sends_no_more_statements_than_it_does_today(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    organization, api_key = tenant["organization"], tenant["api_key"]
    # Whatever earlier tests in this database recorded for the endpoint, admission can hold its estimate.
    grant_credits(organization=organization, amount_micros=100_000_000, reason="Round trip test")
    active_jobs.kept()  # whether the dispatch reads the active jobs' sum: looked up once per process, not per job
    statements: dict[str, list[str]] = {}

    @contextmanager
    def counted(step: str) -> Iterator[None]:
        """Counts the statements of the step's call and of what it runs once it commits."""
        with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=True):
            yield
        # A statement planned once (accounts.statements.in_turn's plan_once) is prepared the first time a connection
        # sends it: once per connection, not per job.
        sent = [query["sql"] for query in queries.captured_queries]
        statements[step] = [sql for sql in sent if not prepared.is_preparation(sql)]

    # Submit: the insert and billing's admission (the hold) in one transaction; on commit it dispatches.
    with django_capture_on_commit_callbacks() as on_submit_commit, CaptureQueriesContext(connection) as submit:
        job, created = submission.submit_job(
            organization=organization, api_key=api_key, endpoint=builtin_endpoint, payload=SMALL
        )
    statements["submit"] = [query["sql"] for query in submit.captured_queries]
    assert created
    assert Hold.objects.get(job=job).released_at is None

    # Dispatch: what the submission runs once it commits (the organization's dispatch; the broker is patched out).
    with counted("dispatch"):
        for callback in on_submit_commit:
            callback()
    job.refresh_from_db()
    assert (job.status, job.attempt) == (JobStatus.DISPATCHED, 1)

    # Claim: the worker's conditional UPDATE, its attempt row and log line, then the job it runs.
    with counted("claim"):
        claimed = attempts.claim_job(job_id=str(job.pk), attempt=1, worker="worker-1")
    assert claimed is not None
    assert claimed.status == JobStatus.RUNNING

    quote = price_for(builtin_endpoint, claimed.started_at, organization.pk)
    assert quote.unit_price_micros
    covered = gpu_ms_within(Hold.objects.get(job=job).amount_micros, quote.unit_price_micros)

    # One heartbeat: the lease renewed, progress, and whether it may go on.
    with counted("heartbeat"):
        answer = attempts.heartbeat(job_id=str(job.pk), attempt=1, step=1, total=2, gpu_ms=covered // 2)
    assert answer.keep_going

    # One reservation that the admission's hold already covers (the fast path: no lock, no write).
    with counted("reserve"):
        reservation = attempts.reserve_work(job=claimed, gpu_ms=covered)
    assert reservation == Reservation(covered_gpu_ms=covered)

    # Finish: the attempt closed, the job completed and billing's settlement, then what runs once it commits.
    with counted("finish"):
        finished = closing.finish_attempt(
            job_id=str(job.pk), attempt=1, outcome=AttemptOutcome.SUCCEEDED, gpu_ms=covered,
            result={"images": [{"url": "x", "width": 64, "height": 64}], "seed": 1},
        )  # fmt: skip
    assert finished is not None
    assert finished.status == JobStatus.COMPLETED
    assert UsageRecord.objects.get(job=job).cost_micros > 0
    assert Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED

    counts = {step: len(statements[step]) for step in STEPS}
    print(f"\nstatements per step on {connection.vendor}: {counts}, {sum(counts.values())} in all")
    ceilings = CEILINGS if connection.vendor == "postgresql" else SQLITE_CEILINGS
    for step in STEPS:
        assert counts[step] <= ceilings[step], (
            f"{step} sends {counts[step]} statements, more than its {ceilings[step]}:\n" + "\n".join(statements[step])
        )
