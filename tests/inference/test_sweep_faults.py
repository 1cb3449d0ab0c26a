"""The sweep where rows are odd or time runs out: dispatched jobs that never said when their message went, and
Celery's soft time limit arriving in the middle of a row."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from inference import closing, dispatch, sweep
from inference.models import Endpoint, Job, JobStatus

pytestmark = pytest.mark.django_db


def dispatched_without_sent_at(tenant: dict[str, Any], endpoint: Endpoint, **times: Any) -> Job:
    """A job set DISPATCHED as an operator's SQL (or a row older than ``sent_at``) leaves it: no ``sent_at``."""
    job = Job.objects.create(
        organization=tenant["organization"], endpoint=endpoint, gpu_class="cpu", input={"prompt": "x"},
        status=JobStatus.DISPATCHED, attempt=1,
    )  # fmt: skip
    Job.objects.filter(pk=job.pk).update(sent_at=None, **times)
    return Job.objects.get(pk=job.pk)


def test_a_dispatched_job_with_no_sent_at_is_sent_again(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[tuple[str, int, str]], settings: Any
) -> None:
    long_ago = timezone.now() - timedelta(seconds=settings.JOB_REDISPATCH_AFTER_SECONDS + 60)
    lost = dispatched_without_sent_at(tenant, builtin_endpoint, dispatched_at=long_ago)

    assert sweep.sweep()["resent"] == 1

    assert sent == [(str(lost.pk), 1, "cpu")]
    after = Job.objects.get(pk=lost.pk)
    assert (after.status, after.dispatched_at) == (JobStatus.DISPATCHED, long_ago)  # its place in line kept
    assert after.sent_at is not None  # from now on it counts from this message
    assert sweep.sweep()["resent"] == 0


def test_with_neither_time_it_counts_from_its_submission(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[tuple[str, int, str]], settings: Any
) -> None:
    long_ago = timezone.now() - timedelta(seconds=settings.JOB_REDISPATCH_AFTER_SECONDS + 60)
    old = dispatched_without_sent_at(tenant, builtin_endpoint, dispatched_at=None, created_at=long_ago)
    dispatched_without_sent_at(tenant, builtin_endpoint, dispatched_at=timezone.now())  # its message may be on its way
    dispatched_without_sent_at(tenant, builtin_endpoint, dispatched_at=None)  # submitted just now

    assert dispatch.redispatch_stale() == 1
    assert sent == [(str(old.pk), 1, "cpu")]


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's plan")
@pytest.mark.parametrize("look", [dispatch.redispatch_stale, closing.reap_expired_leases], ids=["resend", "reap"])
def test_the_sweep_reads_its_jobs_through_the_index_by_status(look: Any, sent: list[tuple[str, int, str]]) -> None:
    """The dispatched jobs not claimed, and the running ones whose lease lapsed: a range of the index that starts
    with the status (few rows, whatever the table holds), none of its own on ``sent_at`` or ``lease_expires_at``."""
    with CaptureQueriesContext(connection) as queries:
        look()
    (look,) = [query["sql"] for query in queries.captured_queries if query["sql"].startswith("SELECT")]
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # the table is nearly empty: only a usable index is taken
        cursor.execute(f"EXPLAIN {look}")
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "job_status_class_dispatched" in plan, plan
    assert "Seq Scan" not in plan, plan


def test_the_soft_time_limit_stops_the_sweep(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    Job.objects.create(
        organization=tenant["organization"], endpoint=builtin_endpoint, gpu_class="cpu", input={"prompt": "x"}
    )
    rows: list[Any] = []

    def out_of_time(organization_id: Any) -> int:
        rows.append(organization_id)
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(sweep, "dispatch_organization", out_of_time)
    with pytest.raises(SoftTimeLimitExceeded):
        sweep.sweep()
    assert rows == [tenant["organization"].pk]


def test_any_other_error_of_one_organization_is_logged_and_the_sweep_goes_on(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
) -> None:  # fmt: skip
    for owner in (tenant, other_tenant):
        Job.objects.create(
            organization=owner["organization"], endpoint=builtin_endpoint, gpu_class="cpu", input={"prompt": "x"}
        )
    rows: list[Any] = []

    def broken(organization_id: Any) -> int:
        rows.append(organization_id)
        raise RuntimeError("a bad row")

    monkeypatch.setattr(sweep, "dispatch_organization", broken)
    with caplog.at_level(logging.ERROR, logger="inference.sweep"):
        assert sweep.sweep()["dispatched"] == 0
    assert set(rows) == {tenant["organization"].pk, other_tenant["organization"].pk}
    assert len([record for record in caplog.records if "could not dispatch" in record.getMessage()]) == 2


@pytest.mark.parametrize("net", ["reap", "expire"])
def test_the_soft_time_limit_stops_the_reaper_and_the_expiry(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, net: str
) -> None:
    """The reaper's and the start deadline's loops let one bad row go by, but not the task's time running out."""
    now = timezone.now()
    for _ in range(2):
        Job.objects.create(
            organization=tenant["organization"], endpoint=builtin_endpoint, gpu_class="cpu", input={"prompt": "x"},
            status=JobStatus.RUNNING if net == "reap" else JobStatus.QUEUED, attempt=1,
            lease_expires_at=now - timedelta(seconds=1), start_deadline=now - timedelta(seconds=1),
        )  # fmt: skip
    rows: list[Any] = []

    def out_of_time(job_id: Any, *_: Any) -> int:
        rows.append(job_id)
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(closing, "_reap" if net == "reap" else "_expire", out_of_time)
    with pytest.raises(SoftTimeLimitExceeded):
        closing.reap_expired_leases() if net == "reap" else closing.expire_unstarted()
    assert len(rows) == 1  # stopped at the first row, not carried on to the next


def test_a_job_sent_again_waits_twice_as_long_before_the_next_copy(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[tuple[str, int, str]], settings: Any
) -> None:
    """A message waiting behind a worker's backlog is not lost: a copy every minute would grow the queue KEDA scales
    on by the backlog each minute. Sent again after 1, 2, 4, 8... times the first wait, at most 16 times it."""
    after = timedelta(seconds=settings.JOB_REDISPATCH_AFTER_SECONDS)
    now = timezone.now()

    def waiting(dispatched_ago: timedelta, sent_ago: timedelta) -> Job:
        job = dispatched_without_sent_at(tenant, builtin_endpoint, dispatched_at=now - dispatched_ago)
        Job.objects.filter(pk=job.pk).update(sent_at=now - sent_ago)
        return job

    first = waiting(after + timedelta(seconds=5), after + timedelta(seconds=5))  # sent once, a first wait ago: due
    twice = waiting(after * 2, after)  # sent again after one wait, one wait ago: due (waits 1, then 1)
    doubled = waiting(after * 3, after)  # sent again after two waits: waits two before the next copy
    halfway = waiting(after * 8, after * 3)  # sent again after five waits, three ago: waits five
    capped = waiting(after * 100, after * 16)  # sent again after 84 waits: the next copy after 16, not 84
    not_yet = waiting(after * 100, after * 15)

    assert dispatch.redispatch_stale() == 3
    assert {job_id for job_id, _, _ in sent} == {str(first.pk), str(twice.pk), str(capped.pk)}
    assert {doubled.pk, halfway.pk, not_yet.pk}.isdisjoint({job_id for job_id, _, _ in sent})
