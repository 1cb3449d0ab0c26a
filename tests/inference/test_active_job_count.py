"""An organization's active jobs as the dispatch reads them: on PostgreSQL the sum of the rows the jobs table's
triggers keep (``inference.models.ActiveJobCount``), which must be the jobs counted whatever way a job moves."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.db.models import ProtectedError
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.services import set_concurrency_limit
from billing.ledger import grant_credits
from inference import active_jobs, attempts, closing, dispatch
from inference.models import ACTIVE_STATUSES, ActiveJobCount, AttemptOutcome, Endpoint, Job, JobStatus
from inference.requeue import requeue_job
from tests import sessions
from tests.lifecycle import finish, submit_as, summed_active
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]


@pytest.fixture(autouse=True)
def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the jobs table's triggers keep the count on PostgreSQL; SQLite counts the jobs")


def counted(organization_id: Any) -> int:
    return Job.objects.filter(organization_id=organization_id, status__in=ACTIVE_STATUSES).count()


def _pick(organization_id: Any, statuses: tuple[str, ...], index: int) -> Job | None:
    jobs = list(Job.objects.filter(organization_id=organization_id, status__in=statuses).order_by("created_at", "id"))
    return jobs[index % len(jobs)] if jobs else None


def _claimed(job: Job) -> None:
    attempts.claim_job(job_id=str(job.pk), attempt=job.attempt, worker="worker-1")


def _reaped(job: Job) -> None:
    Job.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    closing.reap_expired_leases()


def _expired(job: Job) -> None:
    Job.objects.filter(pk=job.pk).update(start_deadline=timezone.now() - timedelta(seconds=1))
    closing.expire_unstarted(job_id=job.pk)


def _deleted(job: Job) -> None:
    """Deleted as an operator would (its organization's deletion cascades the same way), unless the books keep it."""
    try:
        with transaction.atomic():
            Job.objects.filter(pk=job.pk).delete()
    except ProtectedError:
        pass  # billed: its usage record keeps it


# Each step: what it does, and the statuses of the job it picks (none: it picks no job).
STEPS: dict[str, tuple[tuple[str, ...], Any]] = {
    "submit": ((), None),
    "dispatch": ((), None),
    "claim": ((JobStatus.DISPATCHED,), _claimed),
    "finish": ((JobStatus.RUNNING,), lambda job: finish(job)),
    "fail and retry": ((JobStatus.RUNNING,), lambda job: finish(job, AttemptOutcome.FAILED, retry=True)),
    "fail": ((JobStatus.RUNNING,), lambda job: finish(job, AttemptOutcome.FAILED, error_type="internal_error")),
    "cancel": ((JobStatus.QUEUED, JobStatus.DISPATCHED, JobStatus.RUNNING), lambda job: closing.cancel_job(job=job)),
    "reap": ((JobStatus.RUNNING,), _reaped),
    "back to the queue": ((JobStatus.DISPATCHED,), lambda job: dispatch._back_to_queue(str(job.pk), job.attempt)),
    "start deadline": ((JobStatus.QUEUED, JobStatus.DISPATCHED), _expired),
    "operator requeue": ((JobStatus.FAILED, JobStatus.CANCELLED), lambda job: requeue_job(job=job)),
    "deleted": (tuple(JobStatus.values), _deleted),
    "status written by hand": (tuple(JobStatus.values), None),
    "moved to the other organization": (tuple(JobStatus.values), None),
    "inserted as it is": (tuple(JobStatus.values), None),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from([*sorted(STEPS), "submit", "dispatch", "claim", "claim", "finish"]),  # the common ones more
            st.integers(0, 1),  # which organization
            st.integers(0, 50),  # which of its jobs
            st.sampled_from(list(JobStatus.values)),  # the status written by hand
        ),
        max_size=40,
    ),
    limits=st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
def test_the_sum_is_the_count_whatever_way_jobs_move(
    steps: list[tuple[str, int, int, str]],
    limits: tuple[int, int],
    tenant: dict[str, Any],
    other_tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
) -> None:
    """Submitted, dispatched, claimed, finished, failed and retried, cancelled, reaped, put back, expired, requeued
    by an operator, deleted, or given a status by hand (an operator's SQL): after every step each organization's sum
    is its jobs counted, and a dispatch never takes an organization past its limit."""
    with transaction.atomic():  # each example from the fixtures' state: rolled back at its end
        _run(steps, limits, (tenant, other_tenant), builtin_endpoint)
        transaction.set_rollback(True)


def _run(
    steps: list[tuple[str, int, int, str]],
    limits: tuple[int, int],
    tenants: tuple[dict[str, Any], dict[str, Any]],
    builtin_endpoint: Endpoint,
) -> None:
    for each, limit in zip(tenants, limits, strict=True):
        grant_credits(organization=each["organization"], amount_micros=10**10, reason="active count")
        set_concurrency_limit(organization=each["organization"], limit=limit)
        for _ in range(3):
            submit_as(each, builtin_endpoint)
        dispatch.dispatch_organization(each["organization"].pk)
    by_hand: set[Any] = set()  # jobs given a status by hand: the lifecycle's paths may refuse them from then on
    for name, which, index, status in steps:
        each = tenants[which]
        organization_id = each["organization"].pk
        statuses, act = STEPS[name]
        if name == "submit":
            submit_as(each, builtin_endpoint)
        elif name == "dispatch":
            before = counted(organization_id)
            dispatch.dispatch_organization(organization_id)
            assert counted(organization_id) <= max(before, limits[which])
        else:
            job = _pick(organization_id, statuses, index)
            if job is None:
                continue
            if name == "moved to the other organization":  # an operator's SQL, whatever the job's status
                other = tenants[1 - which]["organization"]
                Job.objects.filter(pk=job.pk).update(organization=other)
                by_hand.add(job.pk)
                continue
            if name == "inserted as it is":  # a copy in the picked job's status, as a restore or a script writes one
                copy = Job.objects.create(
                    organization_id=organization_id, endpoint=job.endpoint, gpu_class=job.gpu_class, input=job.input,
                    status=job.status, attempt=job.attempt,
                )  # fmt: skip
                by_hand.add(copy.pk)
                continue
            if act is None:
                Job.objects.filter(pk=job.pk).update(status=status)
                by_hand.add(job.pk)
                continue
            try:
                with transaction.atomic():
                    act(job)
            except Exception:
                if job.pk not in by_hand:
                    raise
        for other in tenants:
            assert summed_active(other["organization"].pk) == counted(other["organization"].pk), (name, status)


def test_a_dispatch_reads_the_sum_not_the_jobs(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    """The limit is measured against the rows: a count they say is full holds the queue back, whatever the jobs."""
    grant_credits(organization=tenant["organization"], amount_micros=10**9, reason="active count")
    set_concurrency_limit(organization=tenant["organization"], limit=2)
    jobs = [submit_as(tenant, builtin_endpoint) for _ in range(3)]
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 2
    assert summed_active(tenant["organization"].pk) == 2
    ActiveJobCount.objects.filter(organization_id=tenant["organization"].pk, shard=0).update(jobs=0)
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 1  # the rows said none was active
    assert {job.status for job in Job.objects.filter(pk__in=[job.pk for job in jobs])} == {JobStatus.DISPATCHED}


@pytest.mark.django_db(transaction=True)
def test_concurrent_finishes_and_dispatches_keep_the_sum(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    """Finishes of one organization's jobs on four connections at once, and dispatches in between: the rows each
    finish takes one from are its backend's, and every change commits with its job's."""
    organization_id = tenant["organization"].pk
    grant_credits(organization=tenant["organization"], amount_micros=10**10, reason="active count")
    set_concurrency_limit(organization=tenant["organization"], limit=1000)
    for _ in range(24):
        submit_as(tenant, builtin_endpoint)
    assert summed_active(organization_id) == counted(organization_id) == 24  # each submission dispatched itself
    running = list(Job.objects.filter(organization_id=organization_id))
    for job in running:
        _claimed(job)
    errors: list[BaseException] = []

    def finisher(jobs: list[Job]) -> None:
        try:
            for job in jobs:
                job.refresh_from_db()
                finish(job)
                with transaction.atomic():
                    submit_as(tenant, builtin_endpoint)
                dispatch.dispatch_organization(organization_id)
        except BaseException as error:
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=finisher, args=(running[index::4],)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    wait_until(lambda: counted(organization_id) == 24, timeout=30, message="the new submissions dispatched")
    assert summed_active(organization_id) == counted(organization_id) == 24
    shards = set(ActiveJobCount.objects.filter(organization_id=organization_id).values_list("shard", flat=True))
    assert 0 in shards  # the dispatches'
    assert len(shards - {0}) >= 2  # the finishes', on their backends' shards (four connections)


@pytest.mark.django_db(transaction=True)
def test_a_recount_while_a_job_stops_being_active_is_exact(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    """Rows that disagree with the jobs (loaded around the triggers) recounted while another transaction is taking a
    job out of the active ones: the recount waits for it, and the sum is the count once both have committed."""
    import psycopg

    organization_id = tenant["organization"].pk
    grant_credits(organization=tenant["organization"], amount_micros=10**9, reason="active count")
    set_concurrency_limit(organization=tenant["organization"], limit=10)
    jobs = [submit_as(tenant, builtin_endpoint) for _ in range(3)]  # each dispatched as it committed
    assert summed_active(organization_id) == counted(organization_id) == 3
    ActiveJobCount.objects.filter(organization_id=organization_id, shard=0).update(jobs=8)
    conninfo = sessions.conninfo()
    outcome: list[Any] = []

    def recounting() -> None:
        try:
            outcome.append(active_jobs.recount(organization_id))
        except BaseException as error:
            outcome.append(error)
        finally:
            connections.close_all()

    # The watcher reads pg_stat_activity with no transaction open: inside one, PostgreSQL keeps its first snapshot.
    with psycopg.connect(**conninfo) as other, psycopg.connect(**conninfo, autocommit=True) as watcher:
        other.execute("UPDATE inference_job SET status = 'CANCELLED' WHERE id = %s", [jobs[0].pk])  # not committed
        recounter = threading.Thread(target=recounting)
        recounter.start()
        wait_until(
            lambda: (
                watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pg_blocking_pids(pid) @> ARRAY[%s::integer]",
                    [other.info.backend_pid],
                ).fetchone()[0]
                == 1
            ),
            timeout=30,
            message="the recount to wait for the job's row",
        )
        assert not outcome
        other.commit()
    recounter.join(30)
    assert outcome == [(8 - 1, 2)]  # the rows said 8, less the cancel's change; 2 jobs are active
    assert summed_active(organization_id) == counted(organization_id) == 2


def test_without_its_triggers_the_dispatch_counts_and_reconciliation_says_so(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    """A schema whose triggers are gone (built without the migrations, dropped by hand): the dispatch counts the jobs
    instead of reading rows nothing keeps, so the limit holds, and reconciliation reports the triggers missing."""
    from billing import reconciliation

    grant_credits(organization=tenant["organization"], amount_micros=10**9, reason="active count")
    set_concurrency_limit(organization=tenant["organization"], limit=2)
    jobs = [submit_as(tenant, builtin_endpoint) for _ in range(3)]
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 2
    with connection.cursor() as cursor:  # undone with the test's transaction
        cursor.execute("DROP TRIGGER inference_job_active_changed ON inference_job")
        cursor.execute("DELETE FROM inference_activejobcount")
    active_jobs._in_place.clear()
    try:
        assert not active_jobs.kept()
        assert dispatch.dispatch_organization(tenant["organization"].pk) == 0  # two running: the limit
        assert Job.objects.filter(pk__in=[job.pk for job in jobs], status=JobStatus.QUEUED).count() == 1
        run_ = reconciliation.run_reconciliation(full=True)
        assert [(item["check"], item["kind"]) for item in run_.drift] == [("active_jobs", "triggers_missing")]
    finally:
        active_jobs._in_place.clear()


@pytest.mark.django_db(transaction=True)
def test_the_jobs_truncated_leave_no_active_count(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    grant_credits(organization=tenant["organization"], amount_micros=10**9, reason="active count")
    submit_as(tenant, builtin_endpoint)
    dispatch.dispatch_organization(tenant["organization"].pk)
    assert summed_active(tenant["organization"].pk) == 1
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE inference_job CASCADE")
    assert not ActiveJobCount.objects.exists()
