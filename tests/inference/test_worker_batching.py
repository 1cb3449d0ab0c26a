"""The worker running the engine: compatible dispatched jobs share a pipeline call, each keeping its own lifecycle.

Transactional: the heartbeat renews leases from its own thread and database connection, which must see the jobs.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from inference import attempts, closing, worker
from inference.engine import BatchMeter
from inference.models import AttemptOutcome, Endpoint, Job, JobAttempt, JobStatus

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def meters(monkeypatch: pytest.MonkeyPatch) -> list[BatchMeter]:
    """Every batch meter the worker makes, to compare the jobs' GPU time with their batch's."""
    made: list[BatchMeter] = []

    class RecordedMeter(BatchMeter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(worker, "BatchMeter", RecordedMeter)
    return made


def attempt_of(job: Job) -> JobAttempt:
    return JobAttempt.objects.get(job=job)


def test_compatible_jobs_run_as_one_batch_and_their_gpu_time_adds_up(dispatch: Any, meters: list[BatchMeter]) -> None:
    first, second, third = (dispatch(seed=seed) for seed in (1, 2, 3))
    four_images = dispatch(seed=4, num_images=2)  # with the others it would make five images: over the batch size
    other_size = dispatch(seed=5, image_size={"width": 72, "height": 64})
    assert {job.status for job in (first, second, third, four_images, other_size)} == {JobStatus.DISPATCHED}

    worker.execute(str(first.id), first.attempt)

    batch = [Job.objects.get(pk=job.pk) for job in (first, second, third)]
    assert [job.status for job in batch] == [JobStatus.COMPLETED] * 3
    assert Job.objects.get(pk=four_images.pk).status == JobStatus.DISPATCHED
    assert Job.objects.get(pk=other_size.pk).status == JobStatus.DISPATCHED
    attempts = [attempt_of(job) for job in batch]
    assert [attempt.outcome for attempt in attempts] == [AttemptOutcome.SUCCEEDED] * 3
    assert all(attempt.gpu_ms > 0 for attempt in attempts)
    [meter] = meters
    assert meter.active == []
    assert sum(attempt.gpu_ms for attempt in attempts) == meter.total_ms()
    assert [job.gpu_ms for job in batch] == [attempt.gpu_ms for attempt in attempts]
    # Only the job that waited for the model paid its cold start.
    assert [attempt.cold_start_ms for attempt in attempts[1:]] == [0, 0]
    for job in batch:
        assert [(image["width"], image["height"]) for image in job.result["images"]] == [(64, 64)]
        assert job.logs.filter(message__contains="Shared a pipeline call with 2 other request(s)").exists()

    # The companions' own messages arrive later and find their jobs taken: nothing runs twice.
    worker.execute(str(second.id), second.attempt)
    assert JobAttempt.objects.filter(job=second).count() == 1
    assert Job.objects.get(pk=second.pk).gpu_ms == attempts[1].gpu_ms

    worker.execute(str(other_size.id), other_size.attempt)
    alone = Job.objects.get(pk=other_size.pk)
    assert alone.status == JobStatus.COMPLETED
    assert alone.gpu_ms == meters[-1].total_ms()
    assert (alone.result["images"][0]["width"], alone.result["images"][0]["height"]) == (72, 64)


def test_a_job_cancelled_inside_a_batch_stops_and_pays_its_share(
    dispatch: Any, meters: list[BatchMeter], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [dispatch(seed=seed, num_inference_steps=12) for seed in (1, 2, 3)]
    real_claim = attempts.claim_batch_companions

    def claim_then_cancel_one(**kwargs: Any) -> list[Job]:
        companions = real_claim(**kwargs)
        for companion in companions:
            if companion.pk == jobs[1].pk:
                assert closing.cancel_job(job=companion) == "CANCELLATION_REQUESTED"
        return companions

    monkeypatch.setattr(attempts, "claim_batch_companions", claim_then_cancel_one)
    worker.execute(str(jobs[0].id), jobs[0].attempt)

    cancelled = Job.objects.get(pk=jobs[1].pk)
    assert cancelled.status == JobStatus.CANCELLED
    assert cancelled.error_type == "cancelled"
    assert "Stopped after step" in cancelled.error
    assert "of 12." in cancelled.error
    assert attempt_of(cancelled).outcome == AttemptOutcome.CANCELLED
    assert cancelled.gpu_ms == attempt_of(cancelled).gpu_ms > 0  # billed for the steps it used
    finished = [Job.objects.get(pk=jobs[index].pk) for index in (0, 2)]
    assert [job.status for job in finished] == [JobStatus.COMPLETED] * 2
    [meter] = meters
    assert sum(attempt_of(job).gpu_ms for job in jobs) == meter.total_ms()
    # It left the batch early: it paid less than those that ran to the end.
    assert cancelled.gpu_ms < min(job.gpu_ms for job in finished)


def test_an_endpoint_without_batching_runs_its_jobs_one_by_one(dispatch: Any, builtin_endpoint: Endpoint) -> None:
    Endpoint.objects.filter(pk=builtin_endpoint.pk).update(optimization_profile={"max_batch_size": 1})
    first, second = dispatch(seed=1), dispatch(seed=2)
    worker.execute(str(first.id), first.attempt)
    assert Job.objects.get(pk=first.pk).status == JobStatus.COMPLETED
    assert Job.objects.get(pk=second.pk).status == JobStatus.DISPATCHED


def test_an_invalid_stored_profile_fails_the_job_unbilled(dispatch: Any, builtin_endpoint: Endpoint) -> None:
    # Saved around the admin's checks (straight into the table): the worker checks again.
    Endpoint.objects.filter(pk=builtin_endpoint.pk).update(optimization_profile={"turbo": True})
    job = dispatch(seed=1)
    worker.execute(str(job.id), job.attempt)
    job.refresh_from_db()
    assert (job.status, job.error_type, job.gpu_ms) == (JobStatus.FAILED, "model_unavailable", 0)
    assert attempt_of(job).outcome == AttemptOutcome.ERRORED


def test_a_job_stops_before_the_step_its_credit_cannot_pay_for_and_is_billed_within_its_hold(
    dispatch: Any, tenant: dict[str, Any], priced_without_broker: None
) -> None:
    from billing.ledger import grant_credits
    from billing.models import Account, EntryKind, Hold, UsageRecord

    job = dispatch(seed=1, num_inference_steps=12)
    # A hold from an estimate far below what the job will take (1 µ$: about 14 ms at a CPU-second's price), and
    # no credit left beside it.
    organization = tenant["organization"]
    Hold.objects.filter(job=job).update(amount_micros=1)
    Account.objects.filter(pk=organization.pk).update(held_micros=1)
    books = Account.objects.get(pk=organization.pk)
    grant_credits(
        organization=organization,
        amount_micros=-(books.balance_micros - 1),
        reason="spent elsewhere",
        kind=EntryKind.ADJUSTMENT,
    )

    worker.execute(str(job.id), job.attempt)

    stopped = Job.objects.get(pk=job.pk)
    assert (stopped.status, stopped.error_type) == (JobStatus.CANCELLED, "insufficient_credits")
    assert "Credits ran out while this request ran. Stopped after step" in stopped.error
    assert "of 12." in stopped.error
    assert "step 12 of 12" not in stopped.error
    record = UsageRecord.objects.get(job=job)
    assert record.cost_micros <= 1  # never more than the hold
    assert record.unbilled_gpu_ms >= attempt_of(stopped).gpu_ms - record.gpu_ms  # the rest recorded unbilled
    books = Account.objects.get(pk=organization.pk)
    assert (books.balance_micros, books.held_micros) == (1 - record.cost_micros, 0)


def test_a_job_whose_hold_falls_short_grows_it_before_each_step_and_completes(
    dispatch: Any, tenant: dict[str, Any], priced_without_broker: None
) -> None:
    from billing.models import Account, Hold, UsageRecord

    job = dispatch(seed=1, num_inference_steps=12)
    organization = tenant["organization"]
    Hold.objects.filter(job=job).update(amount_micros=1)  # an estimate far below what the job takes
    Account.objects.filter(pk=organization.pk).update(held_micros=1)

    worker.execute(str(job.id), job.attempt)

    done = Job.objects.get(pk=job.pk)
    assert done.status == JobStatus.COMPLETED
    record = UsageRecord.objects.get(job=job)
    # Reserved ahead of the work: the whole measured time was covered, so all of it is billed.
    assert record.gpu_ms == attempt_of(done).gpu_ms > 0
    assert record.cost_micros > 1
    assert Account.objects.get(pk=organization.pk).held_micros == 0


def test_a_stop_that_arrives_after_the_last_step_still_delivers_the_output(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = dispatch(seed=1, num_inference_steps=4)
    real_progress = worker.Heartbeat.progress

    def cancel_at_the_last_step(self: worker.Heartbeat, step: int, total: int) -> None:
        real_progress(self, step, total)
        if step == total:
            assert closing.cancel_job(job=job) == "CANCELLATION_REQUESTED"
            for member in self.members:  # as the heartbeat does when it hears of the cancel
                member.stop_reason, member.stop_error_type = "Cancelled by request.", "cancelled"
                member.cancelled.set()

    monkeypatch.setattr(worker.Heartbeat, "progress", cancel_at_the_last_step)
    worker.execute(str(job.id), job.attempt)

    delivered = Job.objects.get(pk=job.pk)
    assert delivered.status == JobStatus.COMPLETED
    assert delivered.cancel_requested_at is not None
    assert len(delivered.result["images"]) == 1
    assert attempt_of(delivered).outcome == AttemptOutcome.SUCCEEDED


def test_a_job_whose_model_was_loaded_takes_along_what_was_dispatched_meanwhile(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its claim saw no other job and its endpoint is quiet, but the model took time to load: it looks again (without
    waiting) and takes the job dispatched during the load."""
    first = dispatch(seed=1)
    worker.execute(str(first.id), first.attempt)  # the model is loaded, and the endpoint's pace is known
    pace = worker._pace
    pace.ran(first.endpoint_id, 60_000)  # its calls take a minute...
    pace.arrived(first.endpoint_id, Job.objects.get(pk=first.pk).created_at + timedelta(hours=5))  # ...hours apart
    alone, meanwhile = dispatch(seed=2), []
    real_cache = worker.pipeline_cache()

    class Reloading:
        """The pipeline cache, as if it had evicted the model and loaded it again while a job was dispatched."""

        def get(self, *args: Any, **kwargs: Any) -> Any:
            meanwhile.append(dispatch(seed=3))
            return dataclasses.replace(real_cache.get(*args, **kwargs), cache_hit=False)

    monkeypatch.setattr(worker, "pipeline_cache", Reloading)
    assert not pace.company_expected(first.endpoint_id)
    worker.execute(str(alone.id), alone.attempt)  # its claim sees no other job dispatched
    [companion] = meanwhile
    assert Job.objects.get(pk=companion.pk).status == JobStatus.COMPLETED
    assert Job.objects.get(pk=alone.pk).logs.filter(message__contains="Shared a pipeline call with 1 other").exists()
