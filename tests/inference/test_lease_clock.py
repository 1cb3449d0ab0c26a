"""Leases and start deadlines go by the database's clock, whatever the clocks of the machines that write and read
them: a GPU worker's clock behind the housekeeping host's must not get its live jobs reaped (paid work thrown away
and run again), nor one ahead keep a dead worker's job; a start deadline means the same to the worker that claims,
the worker that fails an attempt, the sweep and the reaper, and it is written by the database's clock too: a web host
behind the database must not submit a request that can never start, nor one ahead give it longer than it asked, and a
dispatcher's clock must not send jobs no worker may claim, nor hold back jobs that could still start.

Each machine's clock is ``django.utils.timezone.now`` as the calls it makes see it, set off from the true time by a
skew; the database's is the true time (the tests' database runs on this machine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any
from unittest import mock

import pytest
from django.db.models.functions import Now
from django.utils import timezone
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from accounts import statements
from config import metrics
from inference import attempts, closing, dispatch, submission
from inference.models import AttemptOutcome, Endpoint, Job, JobAttempt, JobStatus
from tests.lifecycle import SMALL, finish, submit_as
from tests.waiting import wait_until

pytestmark = [
    # No transaction of the test's around the calls: a worker's claim then takes its one query (PostgreSQL).
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("priced_without_broker"),
]

_true_now = timezone.now
SKEWS = st.integers(-300, 300)
PROPERTY = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@contextmanager
def clock(skew_seconds: float) -> Iterator[None]:
    """The calls made inside run on a machine whose clock is ``skew_seconds`` off the true time."""

    def skewed() -> datetime:
        return _true_now() + timedelta(seconds=skew_seconds)

    with mock.patch.object(timezone, "now", skewed):
        yield


@contextmanager
def worker(skew_seconds: float, *, one_query: bool) -> Iterator[None]:
    """A GPU worker's calls: its clock, and its claim in one query (PostgreSQL) or in a transaction (as SQLite's, or
    a claim made inside a caller's transaction). A web host's submissions and a dispatcher's dispatch likewise."""
    with clock(skew_seconds):
        if one_query:
            yield
            return
        with mock.patch.object(statements, "in_one_query", return_value=False):
            yield


def claimed(job: Job, worker_name: str = "gpu-1") -> Job:
    running = attempts.claim_job(job_id=str(job.pk), attempt=job.attempt, worker=worker_name)
    assert running is not None
    return running


def beat(job: Job, step: int) -> None:
    answer = attempts.heartbeat(job_id=str(job.pk), attempt=job.attempt, step=step, total=10, gpu_ms=step * 100)
    assert answer.keep_going, answer


def reaped(job: Job) -> bool:
    """Whether the job's attempt was taken from its worker (closed LOST by the reaper)."""
    return JobAttempt.objects.get(job_id=job.pk, number=job.attempt).outcome == AttemptOutcome.LOST


# How long a wait for the database's clock to pass a moment may take: the moment is a second or two away, but a
# loaded machine may pause the test for longer than that (a wait that gave up a few seconds past it, without a last
# look, failed a test whose moment had passed).
WAIT_SECONDS = 60


def lapsed_by_the_database(job: Job) -> None:
    """Waits for the database's clock to pass the job's lease."""
    wait_until(
        lambda: Job.objects.filter(pk=job.pk, lease_expires_at__lt=Now()).exists(),
        timeout=WAIT_SECONDS,
        message=lambda: f"the database's clock to pass the lease, {Job.objects.get(pk=job.pk).lease_expires_at}",
    )


@PROPERTY
@given(worker_skew=SKEWS, housekeeping_skew=SKEWS, beats=st.integers(0, 3), one_query=st.booleans())
@example(worker_skew=-60, housekeeping_skew=0, beats=1, one_query=True)
@example(worker_skew=60, housekeeping_skew=0, beats=1, one_query=False)
@example(worker_skew=0, housekeeping_skew=60, beats=0, one_query=True)
def test_a_worker_that_beats_on_time_is_never_reaped_whatever_the_clocks(
    dispatched: Callable[[], Job], worker_skew: int, housekeeping_skew: int, beats: int, one_query: bool
) -> None:
    job = dispatched()
    with worker(worker_skew, one_query=one_query):
        running = claimed(job)
    for step in range(beats + 1):
        with clock(housekeeping_skew):
            closing.reap_expired_leases()
        assert not reaped(running), (worker_skew, housekeeping_skew, step)
        assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING
        with worker(worker_skew, one_query=one_query):
            beat(running, step + 1)
    with worker(worker_skew, one_query=one_query):
        assert finish(running).status == JobStatus.COMPLETED  # paid work delivered, billed once


LEASE_SECONDS = 0.3


@PROPERTY
@given(worker_skew=SKEWS, housekeeping_skew=SKEWS, beats=st.integers(0, 2), one_query=st.booleans())
@example(worker_skew=60, housekeeping_skew=0, beats=1, one_query=True)
@example(worker_skew=-60, housekeeping_skew=0, beats=1, one_query=False)
@example(worker_skew=0, housekeeping_skew=-60, beats=0, one_query=True)
def test_a_worker_that_stopped_beating_is_reaped_once_its_lease_lapses_by_the_database_clock(
    dispatched: Callable[[], Job],
    settings: Any,
    worker_skew: int,
    housekeeping_skew: int,
    beats: int,
    one_query: bool,
) -> None:
    settings.JOB_LEASE_SECONDS = LEASE_SECONDS
    job = dispatched()
    with worker(worker_skew, one_query=one_query):
        running = claimed(job)
        for step in range(beats):
            beat(running, step + 1)
    # The worker died here. Its lease runs out LEASE_SECONDS later by the database's clock, whatever the worker's.
    lapsed_by_the_database(running)
    with clock(housekeeping_skew):
        closing.reap_expired_leases()
    assert reaped(running), (worker_skew, housekeeping_skew)
    again = Job.objects.get(pk=job.pk)
    assert (again.status, again.attempt) == (JobStatus.DISPATCHED, 2)  # queued again and sent at once


def test_the_lease_is_the_lease_length_past_the_database_s_clock(dispatched: Callable[[], Job], settings: Any) -> None:
    """Written by the claim and by each heartbeat, on either path, from the database's clock: a worker's clock an
    hour off moves it not at all."""
    lease = timedelta(seconds=settings.JOB_LEASE_SECONDS)
    for one_query in (True, False):
        for skew in (-3600, 3600):
            job = dispatched()
            before = Job.objects.annotate(now=Now()).values_list("now", flat=True).get(pk=job.pk)
            with worker(skew, one_query=one_query):
                running = claimed(job)
            after = Job.objects.annotate(now=Now()).values_list("now", flat=True).get(pk=job.pk)
            assert before + lease <= Job.objects.get(pk=job.pk).lease_expires_at <= after + lease
            with worker(skew, one_query=one_query):
                beat(running, 1)
            renewed = Job.objects.get(pk=job.pk).lease_expires_at
            assert after + lease <= renewed <= Job.objects.annotate(now=Now()).get(pk=job.pk).now + lease
            with worker(skew, one_query=one_query):
                finish(running)


# How far the start deadline is from the true time (the database's), before or after it.
MARGINS = st.integers(5, 300)
DEADLINE_PROPERTY = given(
    worker_skew=SKEWS, housekeeping_skew=SKEWS, margin=MARGINS, passed=st.booleans(), one_query=st.booleans()
)
# A retried request is queued again, and sent at once where its dispatch (which reads the start deadline by the
# database's clock too, ``inference.dispatch``) finds its deadline to come.
RETRIED = (JobStatus.QUEUED, JobStatus.DISPATCHED)


def with_start_deadline(job: Job, *, margin: int, passed: bool) -> Job:
    """The job's start deadline ``margin`` seconds before or after the true time, as a web host on it wrote it."""
    Job.objects.filter(pk=job.pk).update(start_deadline=_true_now() + timedelta(seconds=-margin if passed else margin))
    job.refresh_from_db()
    return job


def out_of_later_sweeps(job: Job) -> None:
    Job.objects.filter(pk=job.pk).update(start_deadline=None)


@PROPERTY
@DEADLINE_PROPERTY
@example(worker_skew=60, housekeeping_skew=0, margin=30, passed=False, one_query=True)
@example(worker_skew=-60, housekeeping_skew=0, margin=30, passed=True, one_query=False)
def test_a_worker_claims_a_request_before_its_start_deadline_only_whatever_its_clock(
    dispatched: Callable[[], Job], worker_skew: int, housekeeping_skew: int, margin: int, passed: bool, one_query: bool
) -> None:
    waiting = with_start_deadline(dispatched(), margin=margin, passed=passed)
    with worker(worker_skew, one_query=one_query):
        started = attempts.claim_job(job_id=str(waiting.pk), attempt=1, worker="gpu-1")
    assert (started is None) == passed, (worker_skew, margin, passed)
    if started is not None:
        with worker(worker_skew, one_query=one_query):
            finish(started)
    out_of_later_sweeps(waiting)


@PROPERTY
@DEADLINE_PROPERTY
@example(worker_skew=0, housekeeping_skew=60, margin=30, passed=False, one_query=True)
@example(worker_skew=0, housekeeping_skew=-60, margin=30, passed=True, one_query=True)
def test_the_sweep_ends_an_unstarted_request_once_its_start_deadline_passed_whatever_its_clock(
    dispatched: Callable[[], Job], worker_skew: int, housekeeping_skew: int, margin: int, passed: bool, one_query: bool
) -> None:
    unstarted = with_start_deadline(dispatched(), margin=margin, passed=passed)
    with clock(housekeeping_skew):
        closing.expire_unstarted()
    unstarted.refresh_from_db()
    assert unstarted.status == (JobStatus.CANCELLED if passed else JobStatus.DISPATCHED), (housekeeping_skew, margin)
    if passed:
        assert unstarted.error_type == "timeout"
    out_of_later_sweeps(unstarted)


@PROPERTY
@DEADLINE_PROPERTY
@example(worker_skew=60, housekeeping_skew=0, margin=30, passed=False, one_query=True)
@example(worker_skew=-60, housekeeping_skew=0, margin=30, passed=True, one_query=False)
def test_a_worker_s_failed_attempt_runs_again_before_the_start_deadline_only_whatever_its_clock(
    dispatched: Callable[[], Job], worker_skew: int, housekeeping_skew: int, margin: int, passed: bool, one_query: bool
) -> None:
    with worker(worker_skew, one_query=one_query):
        failing = claimed(dispatched())
    failing = with_start_deadline(failing, margin=margin, passed=passed)
    with worker(worker_skew, one_query=one_query):
        finish(failing, AttemptOutcome.ERRORED, reserve=False, error="worker lost its GPU", retry=True)
    failing.refresh_from_db()
    assert failing.status in ((JobStatus.FAILED,) if passed else RETRIED), (worker_skew, margin, passed)
    out_of_later_sweeps(failing)


@PROPERTY
@DEADLINE_PROPERTY
@example(worker_skew=0, housekeeping_skew=60, margin=30, passed=False, one_query=True)
@example(worker_skew=0, housekeeping_skew=-60, margin=30, passed=True, one_query=False)
def test_a_reaped_attempt_runs_again_before_the_start_deadline_only_whatever_the_clocks(
    dispatched: Callable[[], Job], worker_skew: int, housekeeping_skew: int, margin: int, passed: bool, one_query: bool
) -> None:
    with worker(worker_skew, one_query=one_query):
        lost = claimed(dispatched())
    lost = with_start_deadline(lost, margin=margin, passed=passed)
    Job.objects.filter(pk=lost.pk).update(lease_expires_at=_true_now() - timedelta(seconds=1))  # its worker died
    with clock(housekeeping_skew):
        closing.reap_expired_leases()
    assert reaped(lost)
    lost.refresh_from_db()
    assert lost.status in ((JobStatus.FAILED,) if passed else RETRIED), (housekeeping_skew, margin, passed)
    out_of_later_sweeps(lost)


def database_now() -> datetime:
    """A reading of the database's clock (``Now()``)."""
    return Endpoint.objects.annotate(now=Now()).values_list("now", flat=True)[:1].get()


def submitted_with_timeout(tenant: dict[str, Any], endpoint: Endpoint, start_timeout: float) -> Job:
    job, new = submission.submit_job(
        organization=tenant["organization"], api_key=tenant["api_key"], endpoint=endpoint, payload=dict(SMALL),
        start_timeout=start_timeout,
    )  # fmt: skip
    assert new
    return job


def passed_by_the_database(moment: datetime) -> None:
    """Waits for the database's clock to pass ``moment``."""
    wait_until(lambda: database_now() > moment, timeout=WAIT_SECONDS, message=f"the database's clock to pass {moment}")


WEB_SKEWS = [-40, 40]  # the reviewer's web host, 40 s behind the database; and one as far ahead


@pytest.mark.parametrize("one_query", [True, False], ids=["one query", "in a transaction"])
@pytest.mark.parametrize("web_skew", WEB_SKEWS)
def test_a_submission_s_start_deadline_is_its_timeout_past_the_database_s_clock(
    dispatched: Callable[[], Job], tenant: dict[str, Any], builtin_endpoint: Endpoint, web_skew: int, one_query: bool
) -> None:
    """``X-Fal-Request-Timeout: 30`` from a web host 40 s behind the database wrote a deadline 10 s past already by
    the database's clock: dispatched, never claimable, ended by the sweep as a timeout. Written by the database's
    clock, on either path of the submission, the request has its 30 s whatever the web host's clock, and the job
    the API answers with (and a sync run waits on) holds the deadline the database wrote."""
    timeout = 30
    before = database_now()
    with worker(web_skew, one_query=one_query):  # the web host: its submission, and the dispatch that follows it
        job = submitted_with_timeout(tenant, builtin_endpoint, timeout)
    after = database_now()
    stored = Job.objects.get(pk=job.pk)
    assert job.start_deadline == stored.start_deadline
    assert before + timedelta(seconds=timeout) <= stored.start_deadline <= after + timedelta(seconds=timeout)
    assert (stored.status, stored.attempt) == (JobStatus.DISPATCHED, 1)
    for worker_skew in (0, -web_skew):
        with worker(worker_skew, one_query=one_query):
            assert closing.expire_unstarted() == 0  # the sweep leaves it: by the database's clock it has ~30 s
    with worker(-web_skew, one_query=one_query):
        started = attempts.claim_job(job_id=str(job.pk), attempt=1, worker="gpu-1")
    assert started is not None, (web_skew, stored.start_deadline, database_now())
    with worker(0, one_query=one_query):
        finish(started)


@pytest.mark.parametrize("web_skew", WEB_SKEWS)
def test_a_request_not_started_within_its_timeout_by_the_database_s_clock_is_not_started_and_is_ended(
    dispatched: Callable[[], Job], tenant: dict[str, Any], builtin_endpoint: Endpoint, web_skew: int
) -> None:
    """A web host 40 s ahead wrote a deadline its timeout plus 40 s away: a worker could still start the request 40 s
    after the time it asked for. By the database's clock, once its timeout has passed no worker starts it, whatever
    the worker's clock, and the sweep ends it as a timeout, whatever the sweep host's."""
    timeout = 1.5
    with clock(web_skew):
        job = submitted_with_timeout(tenant, builtin_endpoint, timeout)
    submitted = database_now()  # the insert's reading of the database's clock came before this one
    assert Job.objects.get(pk=job.pk).status == JobStatus.DISPATCHED
    passed_by_the_database(submitted + timedelta(seconds=timeout))
    for worker_skew, one_query in ((0, True), (-web_skew, False), (-web_skew, True)):
        with worker(worker_skew, one_query=one_query):
            assert attempts.claim_job(job_id=str(job.pk), attempt=1, worker="gpu-1") is None, (web_skew, worker_skew)
    with clock(-web_skew):
        assert closing.expire_unstarted() == 1
    ended = Job.objects.get(pk=job.pk)
    assert (ended.status, ended.error_type) == (JobStatus.CANCELLED, "timeout")


@pytest.fixture
def queued(tenant: dict[str, Any], builtin_endpoint: Endpoint, room_to_run: None) -> Callable[[], Job]:
    """Jobs submitted and left QUEUED: their submission's own dispatch held back, for the dispatcher under test."""

    def make() -> Job:
        with (
            mock.patch.object(submission, "_admission_in_query", return_value=None),  # submitted in a transaction
            mock.patch.object(submission, "dispatch_organization"),  # whose dispatch, once committed, is held back
        ):
            job = submit_as(tenant, builtin_endpoint)
        assert Job.objects.get(pk=job.pk).status == JobStatus.QUEUED
        return job

    return make


@PROPERTY
@given(dispatcher_skew=SKEWS, margin=MARGINS, one_query=st.booleans())
@example(dispatcher_skew=60, margin=30, one_query=True)
@example(dispatcher_skew=-60, margin=30, one_query=False)
@example(dispatcher_skew=-40, margin=10, one_query=True)
@example(dispatcher_skew=40, margin=10, one_query=False)
def test_a_dispatcher_sends_exactly_the_jobs_whose_start_deadline_is_to_come_by_the_database_s_clock(
    queued: Callable[[], Job], dispatcher_skew: int, margin: int, one_query: bool
) -> None:
    """A dispatcher behind the database sent jobs no worker would claim, each holding a slot of its organization
    until the sweep ended it; one ahead left jobs that could still start QUEUED until they expired."""
    to_come = with_start_deadline(queued(), margin=margin, passed=False)
    passed = with_start_deadline(queued(), margin=margin, passed=True)
    without = queued()
    with worker(dispatcher_skew, one_query=one_query):
        sent = dispatch.dispatch_organization(to_come.organization_id)
    statuses = {job.pk: Job.objects.get(pk=job.pk).status for job in (to_come, passed, without)}
    assert statuses == {
        to_come.pk: JobStatus.DISPATCHED,
        passed.pk: JobStatus.QUEUED,  # the sweep ends it; it took no slot
        without.pk: JobStatus.DISPATCHED,
    }, (dispatcher_skew, margin)
    assert sent == 2
    # Out of the next example's dispatch and of later sweeps.
    Job.objects.filter(pk__in=[to_come.pk, passed.pk, without.pk]).update(status=JobStatus.CANCELLED)


@pytest.mark.parametrize("web_skew", WEB_SKEWS)
def test_a_sync_run_waits_for_its_request_s_start_deadline_by_the_database_s_clock(
    dispatched: Callable[[], Job], tenant: dict[str, Any], settings: Any, web_skew: int
) -> None:
    """A sync run measures the time left to its request's start deadline against the database's clock, which wrote
    it: by its own clock, a web host 40 s ahead would find a 30 s deadline passed at once and end the request."""
    from rest_framework.test import APIClient

    settings.SYNC_RUN_TIMEOUT_SECONDS = 2  # the run's own ceiling, long before the request's deadline
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {tenant['token']}")
    with clock(web_skew):
        response = client.post("/run/platform/tiny-sd", dict(SMALL), format="json", HTTP_X_FAL_REQUEST_TIMEOUT="30")
    assert response.status_code == 504, response.content
    assert "did not finish within the 2 s" in response.json()["detail"], (web_skew, response.json())
    waiting = Job.objects.get(pk=response["x-fal-request-id"])
    assert waiting.status in (JobStatus.QUEUED, JobStatus.DISPATCHED), (web_skew, waiting.status, waiting.error_type)
    out_of_later_sweeps(waiting)


@pytest.mark.parametrize("scrape_skew", [-120, 120])
def test_the_metrics_count_a_lease_lapsed_by_the_database_s_clock(
    dispatched: Callable[[], Job], scrape_skew: int
) -> None:
    live = claimed(dispatched())
    dead = claimed(dispatched())
    Job.objects.filter(pk=dead.pk).update(lease_expires_at=_true_now() - timedelta(seconds=1))
    with clock(scrape_skew):
        families = {family.name: family for family in metrics.job_states(timezone.now())}
    lapsed = {sample.labels["gpu_class"]: sample.value for sample in families["platform_jobs_lease_expired"].samples}
    assert lapsed[live.gpu_class] == 1  # the dead worker's, not the live one's
