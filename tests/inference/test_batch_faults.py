"""A fault of one job of a batch is that job's alone: its companions keep their work, their attempt and their bill.

And work that is done is delivered: past the batch's last step every job is stored, whatever stop comes meanwhile.
Transactional: the heartbeat renews leases from its own thread and database connection, which must see the jobs.
"""

from __future__ import annotations

import functools
import json
import math
import time
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_kl_ltx import AutoencoderKLLTXVideo
from diffusers.models.autoencoders.autoencoder_oobleck import AutoencoderOobleck
from django.db import OperationalError

from billing.models import UsageRecord
from inference import attempts, closing, worker
from inference import dispatch as dispatching
from inference.dispatch import dispatch_organization
from inference.engine import BatchMeter
from inference.engine import engine as engine_module
from inference.models import AttemptOutcome, Endpoint, Job, JobAttempt, JobStatus
from tests.inference.test_batch_vacated_rows import Clock, metered_work
from tests.inference.test_media_endpoints import png_data_uri
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

REQUEUED = (JobStatus.QUEUED, JobStatus.DISPATCHED)


def states(jobs: list[Job]) -> list[tuple[str, str, list[str]]]:
    """Each job's status, error type and its attempts' outcomes."""
    return [
        (str(job.status), job.error_type, [a.outcome for a in JobAttempt.objects.filter(job=job).order_by("number")])
        for job in (Job.objects.get(pk=job.pk) for job in jobs)
    ]


def assert_billed_once(jobs: list[Job]) -> None:
    for job in jobs:
        [record] = UsageRecord.objects.filter(job=job)
        assert record.billable
        assert record.gpu_ms == Job.objects.get(pk=job.pk).gpu_ms > 0


def test_a_database_error_reserving_one_companions_step_fails_that_one_alone(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [dispatch(seed=seed, num_inference_steps=6) for seed in (1, 2, 3)]
    real_reserve, asked = attempts.reserve_work, {"n": 0}

    def reserve(*, job: Job, gpu_ms: int, ahead_ms: int = 0) -> Any:
        if job.pk == jobs[1].pk:
            asked["n"] += 1
            if asked["n"] == 2:
                raise OperationalError("canceling statement due to statement timeout")
        return real_reserve(job=job, gpu_ms=gpu_ms, ahead_ms=ahead_ms)

    real_covers = worker.Heartbeat.covers_next_step

    def covers(self: worker.Heartbeat, member: worker.Member) -> bool:
        if member.covered_ms != -1:
            member.covered_ms = 0  # the hold falls short every step: billing is asked before each
        return real_covers(self, member)

    monkeypatch.setattr(attempts, "reserve_work", reserve)
    monkeypatch.setattr(worker.Heartbeat, "covers_next_step", covers)
    worker.execute(str(jobs[0].id), jobs[0].attempt)

    healthy = [jobs[0], jobs[2]]
    assert states(healthy) == [(JobStatus.COMPLETED, "", [AttemptOutcome.SUCCEEDED])] * 2
    assert_billed_once(healthy)
    # The faulty one leaves the batch ERRORED (not cancelled), unbilled, and is queued to run again.
    [(status, _, outcomes)] = states([jobs[1]])
    assert (status in REQUEUED, outcomes) == (True, [AttemptOutcome.ERRORED])
    [record] = UsageRecord.objects.filter(job=jobs[1])
    assert not record.billable


def test_a_soft_time_limit_reserving_a_step_still_stops_the_whole_batch(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [dispatch(seed=seed, num_inference_steps=4) for seed in (1, 2)]
    real_reserve = attempts.reserve_work

    def reserve(*, job: Job, gpu_ms: int, ahead_ms: int = 0) -> Any:
        if job.pk == jobs[1].pk:
            raise SoftTimeLimitExceeded()
        return real_reserve(job=job, gpu_ms=gpu_ms, ahead_ms=ahead_ms)

    monkeypatch.setattr(attempts, "reserve_work", reserve)
    worker.execute(str(jobs[0].id), jobs[0].attempt)

    assert [state[1:] for state in states(jobs)] == [("timeout", [AttemptOutcome.ERRORED])] * 2


@pytest.mark.parametrize("lost_closes", [2, None], ids=["twice, then closed", "until its lease lapsed"])
def test_a_failing_close_of_a_cancelled_companion_is_sent_again_then_left_to_the_reaper(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch, lost_closes: int | None
) -> None:
    """A close whose connection fails is sent again on a fresh one (``worker._close_once``): the cancel stands, as
    it was asked. One that keeps failing until the job's lease has lapsed is left to the reaper."""
    jobs = [dispatch(seed=seed, num_inference_steps=8) for seed in (1, 2, 3)]
    waited = [0.0]  # the pauses between tries, on a clock of the test's own: the lease runs out without waiting
    monkeypatch.setattr(worker, "_close_clock", lambda: time.monotonic() + waited[0])
    monkeypatch.setattr(worker, "_close_pause", lambda seconds: waited.__setitem__(0, waited[0] + seconds))
    real_claim, real_finish, real_heartbeat = (
        attempts.claim_batch_companions,
        closing.finish_attempt,
        attempts.heartbeat,
    )
    beats: list[str] = []
    closes_tried: list[int] = []

    def claim_then_cancel_one(**kwargs: Any) -> list[Job]:
        companions = real_claim(**kwargs)
        for companion in companions:
            if companion.pk == jobs[1].pk:
                assert closing.cancel_job(job=companion) == "CANCELLATION_REQUESTED"
        return companions

    def finish(**kwargs: Any) -> Any:
        if kwargs["job_id"] == str(jobs[1].pk) and (lost_closes is None or len(closes_tried) < lost_closes):
            closes_tried.append(len(beats))
            raise OperationalError("server closed the connection unexpectedly")
        return real_finish(**kwargs)

    def heartbeat(**kwargs: Any) -> Any:
        beats.append(kwargs["job_id"])
        return real_heartbeat(**kwargs)

    monkeypatch.setattr(attempts, "claim_batch_companions", claim_then_cancel_one)
    monkeypatch.setattr(closing, "finish_attempt", finish)
    monkeypatch.setattr(attempts, "heartbeat", heartbeat)
    worker.execute(str(jobs[0].id), jobs[0].attempt)

    healthy = [jobs[0], jobs[2]]
    assert states(healthy) == [(JobStatus.COMPLETED, "", [AttemptOutcome.SUCCEEDED])] * 2
    assert_billed_once(healthy)
    assert str(jobs[1].pk) not in beats[closes_tried[0] :]  # no heartbeat of it once its close began
    if lost_closes is not None:
        assert len(closes_tried) == lost_closes
        assert states([jobs[1]]) == [(JobStatus.CANCELLED, "cancelled", [AttemptOutcome.CANCELLED])]
        assert UsageRecord.objects.filter(job=jobs[1]).count() == 1
        return
    # Still running, its attempt open: its lease is no longer renewed, so it runs out and the reaper takes it.
    assert len(closes_tried) > 1  # sent again, until the lease (on the test's clock) had lapsed
    assert states([jobs[1]]) == [(JobStatus.RUNNING, "", [AttemptOutcome.RUNNING])]
    assert not UsageRecord.objects.filter(job=jobs[1]).exists()


@pytest.mark.parametrize("fires", [1, 2], ids=["once", "again on the second try"])
def test_a_soft_time_limit_while_one_member_stores_keeps_its_companions_finished_outputs(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch, fires: int
) -> None:
    jobs = [dispatch(seed=seed, num_inference_steps=4) for seed in (1, 2, 3)]
    real_encoded, fired = worker._encoded_output, {"n": 0}

    def encoded(job: Job, result: Any) -> dict[str, Any]:
        if job.pk == jobs[0].pk and fired["n"] < fires:
            fired["n"] += 1
            raise SoftTimeLimitExceeded()
        return real_encoded(job, result)

    monkeypatch.setattr(worker, "_encoded_output", encoded)
    worker.execute(str(jobs[0].id), jobs[0].attempt)

    assert states(jobs[1:]) == [(JobStatus.COMPLETED, "", [AttemptOutcome.SUCCEEDED])] * 2
    assert_billed_once(jobs[1:])
    if fires == 1:
        # Its work was done: it is stored again, and delivered.
        assert states(jobs[:1]) == [(JobStatus.COMPLETED, "", [AttemptOutcome.SUCCEEDED])]
        assert_billed_once(jobs[:1])
    else:
        # Its store could not be completed: the platform's fault, unbilled, and run again.
        [(status, _, outcomes)] = states(jobs[:1])
        assert (status in REQUEUED, outcomes) == (True, [AttemptOutcome.ERRORED])
        assert not UsageRecord.objects.get(job=jobs[0]).billable


@pytest.mark.parametrize("interrupted", [1, 2], ids=["once", "again on the second try"])
def test_a_soft_time_limit_while_the_batch_is_decoded_still_delivers_its_finished_work(
    dispatch: Any, interrupted: int
) -> None:
    """Past its last step a batch's work is done. Celery's soft time limit landing in the VAE decode, a minute before
    the hard one, ended every job of the batch as a timeout, undelivered and unbilled: the work thrown away. It is
    decoded again and delivered, each job billed its own work; the decode the limit cut short did nothing anyone
    receives, so its time is wasted, recorded unbilled with the jobs (the batch meter's clock here moves by the
    work alone: `metered_work`)."""
    jobs = [dispatch(seed=seed, num_inference_steps=3) for seed in (1, 2, 3)]
    cut_short_ms = 62.5

    with metered_work(keep_rows=False) as work:
        metered_decode, tries = engine_module._TextToImageRun._decode, [0]

        def decode(self: Any, latents: Any, generators: Any) -> Any:
            tries[0] += 1
            if tries[0] <= interrupted:
                work.clock.spend(cut_short_ms)
                raise SoftTimeLimitExceeded()
            return metered_decode(self, latents, generators)

        with mock.patch.object(engine_module._TextToImageRun, "_decode", decode):
            worker.execute(str(jobs[0].id), jobs[0].attempt)

    if interrupted == 2:
        # Celery sends its soft limit once; anything that cuts the second decode short ends the batch as before.
        assert [state[1:] for state in states(jobs)] == [("timeout", [AttemptOutcome.ERRORED])] * 3
        return
    assert states(jobs) == [(JobStatus.COMPLETED, "", [AttemptOutcome.SUCCEEDED])] * 3
    assert_billed_once(jobs)
    assert [len(Job.objects.get(pk=job.pk).result["images"]) for job in jobs] == [1, 1, 1]
    closed = [JobAttempt.objects.get(job=job) for job in jobs]
    # The batch's time is all there: billed, and the decode that was cut short wasted, a third to each job (within
    # the rounding of whole milliseconds: under one for each job of the batch).
    assert sum(attempt.gpu_ms + attempt.wasted_ms for attempt in closed) == math.ceil(work.clock.spent_ms)
    assert abs(sum(attempt.wasted_ms for attempt in closed) - cut_short_ms) < len(jobs)
    assert all(abs(attempt.wasted_ms - cut_short_ms / len(jobs)) < 2 for attempt in closed)
    for job, attempt in zip(jobs, closed, strict=True):
        record = UsageRecord.objects.get(job=job)
        assert record.unbilled_gpu_ms == attempt.cold_start_ms + attempt.wasted_ms


# Every other kind the platform serves: the endpoint, a job's input, the VAE that decodes the batch, how many jobs share
# one call (image to image and image to video run alone), and where a job's output is in its result.
DECODED_KINDS: dict[str, tuple[str, dict[str, Any], type[Any], int, str]] = {
    "text-to-video": (
        "tiny-ltx-video",
        {"prompt": "a lighthouse", "num_frames": 5, "num_inference_steps": 2},
        AutoencoderKLLTXVideo,
        2,
        "video",
    ),
    "image-to-video": (
        "tiny-ltx-video/image-to-video",
        {"prompt": "a lighthouse", "image_url": png_data_uri((64, 64)), "num_frames": 5, "num_inference_steps": 2},
        AutoencoderKLLTXVideo,
        1,
        "video",
    ),
    "text-to-audio": (
        "tiny-stable-audio",
        {"prompt": "rain", "seconds_total": 0.5, "steps": 2},
        AutoencoderOobleck,
        2,
        "audio_file",
    ),
    "image-to-image": (
        "tiny-sd/image-to-image",
        {"prompt": "a red fox", "image_url": png_data_uri((64, 64)), "num_inference_steps": 4, "strength": 0.5},
        AutoencoderKL,
        1,
        "images",
    ),
}
STEP_MS = 31.25  # a denoising step of the whole batch, on the batch meter's clock
DECODE_MS = 15.625  # a whole decode


@pytest.mark.parametrize("interrupted", [1, 2], ids=["once", "again on the second try"])
@pytest.mark.parametrize("kind", list(DECODED_KINDS))
def test_a_soft_time_limit_while_a_video_audio_or_image_to_image_batch_is_decoded_still_delivers_it(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch, kind: str, interrupted: int
) -> None:
    """As an image batch: these pipelines decoded inside diffusers' own call, where a decode cut short could not start
    over, so Celery's soft time limit landing in the VAE after the last step ended every job as a timeout, its work
    thrown away unbilled. The engine decodes their latents itself now: decoded again and delivered, each job billed
    its own work, the decode cut short wasted (the batch meter's clock moves by the steps and the decodes alone)."""
    path, payload, vae_class, batch_size, output = DECODED_KINDS[kind]
    monkeypatch.setattr(dispatching, "send_run_message", lambda *message: True)
    organization = tenant["organization"]
    type(organization).objects.filter(pk=organization.pk).update(concurrency_limit=20)
    jobs = []
    for seed in range(1, batch_size + 1):
        response = tenant["client"].post(
            f"/queue/platform/{path}", data=json.dumps({**payload, "seed": seed}), content_type="application/json"
        )
        assert response.status_code == 200, response.content
        jobs.append(Job.objects.get(pk=response.json()["request_id"]))
    dispatch_organization(organization.pk)
    clock, cut_short_ms, tries = Clock(), 62.5, [0]
    real_progress, real_decode = worker.Heartbeat.progress, vae_class.decode

    def progress(self: worker.Heartbeat, step: int, total: int) -> None:
        clock.spend(STEP_MS)
        real_progress(self, step, total)

    def decode(self: Any, *args: Any, **kwargs: Any) -> Any:
        tries[0] += 1
        if tries[0] <= interrupted:
            clock.spend(cut_short_ms)
            raise SoftTimeLimitExceeded()
        clock.spend(DECODE_MS)
        return real_decode(self, *args, **kwargs)

    monkeypatch.setattr(worker, "BatchMeter", functools.partial(BatchMeter, clock=clock))
    monkeypatch.setattr(worker.Heartbeat, "progress", progress)
    monkeypatch.setattr(vae_class, "decode", decode)
    worker.execute(str(jobs[0].id), jobs[0].attempt)

    assert tries == [2]  # decoded again once, whatever cuts the second decode short
    if interrupted == 2:
        # Celery sends its soft limit once; anything that cuts the second decode short ends the batch as before.
        assert [state[1:] for state in states(jobs)] == [("timeout", [AttemptOutcome.ERRORED])] * batch_size
        assert not any(UsageRecord.objects.get(job=job).billable for job in jobs)
        return
    assert states(jobs) == [(JobStatus.COMPLETED, "", [AttemptOutcome.SUCCEEDED])] * batch_size
    assert_billed_once(jobs)
    assert all(Job.objects.get(pk=job.pk).result[output] for job in jobs)
    closed = [JobAttempt.objects.get(job=job) for job in jobs]
    # The batch's time is all there: billed, and the decode that was cut short wasted, shared by the jobs by images.
    assert sum(attempt.gpu_ms + attempt.wasted_ms for attempt in closed) == math.ceil(clock.spent_ms)
    assert abs(sum(attempt.wasted_ms for attempt in closed) - cut_short_ms) < batch_size
    assert all(abs(attempt.wasted_ms - cut_short_ms / batch_size) < 2 for attempt in closed)
    for job, attempt in zip(jobs, closed, strict=True):
        assert UsageRecord.objects.get(job=job).unbilled_gpu_ms == attempt.cold_start_ms + attempt.wasted_ms


def test_a_soft_time_limit_in_the_last_step_still_ends_the_batch_as_a_timeout(dispatch: Any) -> None:
    """Until its last step is done a batch's work is not: the time limit ends it there, as ever."""
    jobs = [dispatch(seed=seed, num_inference_steps=3) for seed in (1, 2)]
    real_predict = engine_module.Engine.predict_noise

    def predict_noise(self: Any, *args: Any, step_index: int, **kwargs: Any) -> Any:
        if step_index == 2:
            raise SoftTimeLimitExceeded()
        return real_predict(self, *args, step_index=step_index, **kwargs)

    with mock.patch.object(engine_module.Engine, "predict_noise", predict_noise):
        worker.execute(str(jobs[0].id), jobs[0].attempt)

    assert [state[1:] for state in states(jobs)] == [("timeout", [AttemptOutcome.ERRORED])] * 2
    assert not any(UsageRecord.objects.get(job=job).billable for job in jobs)


def test_a_soft_time_limit_cutting_short_a_single_jobs_close_still_closes_it(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = dispatch(seed=1, num_inference_steps=4)
    real_finish, fired = closing.finish_attempt, {"n": 0}

    def finish(**kwargs: Any) -> Any:
        if not fired["n"]:
            fired["n"] += 1
            raise SoftTimeLimitExceeded()  # after the job left its batch's meter, before its attempt closed
        return real_finish(**kwargs)

    monkeypatch.setattr(closing, "finish_attempt", finish)
    worker.execute(str(job.id), job.attempt)

    assert states([job]) == [(JobStatus.COMPLETED, "", [AttemptOutcome.SUCCEEDED])]
    assert_billed_once([job])


def test_one_members_failing_heartbeats_do_not_make_its_companions_leases_look_lapsed(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """Each member's lease is its own: one job whose heartbeat keeps failing (its row locked by an operator's
    statement, a bug in one tenant's account) is stopped once its own lease has surely lapsed, while a companion
    renewed a few seconds ago rides out a passing hiccup. With the batch's one "last renewed" clock, held back by the
    failing job, the companion's hiccup as that lease lapsed stopped its paid work as lost."""
    settings.JOB_HEARTBEAT_SECONDS = 0.01
    settings.JOB_LEASE_SECONDS = 30
    failing, healthy = (worker.Member(index=index, job=dispatch(seed=index + 1), attempt=1) for index in range(2))
    start = time.monotonic()
    clock = {"now": start}  # the worker's clock, and only the worker's: five seconds a round of heartbeats
    monkeypatch.setattr(worker, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    healthy_beats: list[bool] = []

    def beat(*, job_id: str, **_: Any) -> attempts.HeartbeatAnswer:
        if job_id == failing.job_id:
            raise OperationalError("could not obtain lock on row")
        clock["now"] += 5
        # Two hiccups as the failing job's lease lapses, 30 s on: the healthy job's was renewed 5 s before.
        went_through = clock["now"] - start <= settings.JOB_LEASE_SECONDS or healthy_beats.count(False) >= 2
        healthy_beats.append(went_through)
        if not went_through:
            raise OperationalError("server closed the connection unexpectedly")
        return attempts.HeartbeatAnswer(True, "", "")

    monkeypatch.setattr(attempts, "heartbeat", beat)
    heartbeat = worker.Heartbeat([failing, healthy])
    heartbeat.start()
    try:
        wait_until(
            lambda: failing.cancelled.is_set() and healthy_beats[-2:] == [True, True],
            timeout=30,
            message=lambda: f"the failing member stopped, the healthy one through its hiccups: {healthy_beats}",
        )
    finally:
        heartbeat.stop()
    assert failing.stop_error_type == "lost"
    assert not healthy.cancelled.is_set(), healthy.stop_reason


@pytest.mark.parametrize("fails", ["a companion's claim", "the look for company"])
def test_a_database_error_gathering_company_runs_the_job_with_those_claimed_so_far(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """Company is an optimization: an error claiming the second companion (a lost deadlock after the retries, a
    statement timeout) or looking for company used to fail the whole job ERRORED, and left the companions it had
    claimed RUNNING with no heartbeat, for the reaper to find a lease later, an attempt of theirs spent."""
    leader, first, second = (dispatch(seed=seed) for seed in (1, 2, 3))
    timeout = OperationalError("canceling statement due to statement timeout")
    if fails == "a companion's claim":
        real_claim = attempts.claim_job

        def claim(*, job_id: str, **kwargs: Any) -> Any:
            if job_id == str(second.pk):
                raise timeout
            return real_claim(job_id=job_id, **kwargs)

        monkeypatch.setattr(attempts, "claim_job", claim)
        ran_along = [first]
    else:

        def look(**kwargs: Any) -> Any:
            raise timeout

        monkeypatch.setattr(attempts, "claim_batch_companions", look)
        ran_along = []

    worker.execute(str(leader.id), leader.attempt)

    ran = [leader, *ran_along]
    assert states(ran) == [(JobStatus.COMPLETED, "", [AttemptOutcome.SUCCEEDED])] * len(ran)
    assert_billed_once(ran)
    for waiting in {first, second} - set(ran):
        assert Job.objects.get(pk=waiting.pk).status == JobStatus.DISPATCHED  # its own message runs it
        assert not JobAttempt.objects.filter(job=waiting).exists()


@pytest.mark.parametrize("committed", [False, True], ids=["before its commit", "after its commit"])
def test_a_connection_lost_closing_a_stored_success_still_delivers_and_bills_it_once(
    dispatch: Any, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """The connection drops as the finished job's close is sent (a server restart, a failover): its outputs are stored
    and its work done, so the close is sent again on a new connection rather than the job thrown back to be run again
    (or failed, its attempts spent). Whether the lost close had committed or not, the job is closed once."""
    jobs = [dispatch(seed=seed, num_inference_steps=4) for seed in (1, 2)]
    real_finish, dropped = closing.finish_attempt, {"n": 0}

    def finish(**kwargs: Any) -> Any:
        if kwargs["job_id"] == str(jobs[0].pk) and kwargs["outcome"] == AttemptOutcome.SUCCEEDED and not dropped["n"]:
            dropped["n"] += 1
            if committed:
                real_finish(**kwargs)
            raise OperationalError("server closed the connection unexpectedly")
        return real_finish(**kwargs)

    monkeypatch.setattr(closing, "finish_attempt", finish)
    worker.execute(str(jobs[0].id), jobs[0].attempt)

    assert dropped["n"] == 1
    assert states(jobs) == [(JobStatus.COMPLETED, "", [AttemptOutcome.SUCCEEDED])] * 2
    assert_billed_once(jobs)
    assert Job.objects.get(pk=jobs[0].pk).result["images"]
