"""Nobody pays for another request's rows: a batch's GPU time as the worker bills it, against the rows it computed.

A request that leaves its batch early (cancelled at a step, refused its next step, failed) is closed with its share so
far. Where the engine drops its rows (a row-independent scheduler), the batch gets smaller; where it cannot (a captured
CUDA graph's fixed shapes, a scheduler with per-row history, every video and audio call), the rows run on, unused, to
the end of the call. Their time is nobody's: not the request that left (it is closed), nor its companions (they did
not ask for it). It is recorded on the companions' attempts as wasted, unbilled, so the batch's time is still whole.

The worker runs the real engine on the tiny model, with the batch meter's clock moved by the work itself: each UNet
call takes ``ROW_MS`` per row it is given plus ``CALL_MS`` for the call, the decode ``DECODE_ROW_MS`` per row. So
what each request's own rows cost is known exactly, and its bill is checked against it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from billing.models import UsageRecord
from inference import worker
from inference.engine import BatchMeter
from inference.engine import engine as engine_module
from inference.models import AttemptOutcome, Job, JobAttempt, JobStatus

pytestmark = pytest.mark.django_db(transaction=True)

ROW_MS = 7.8125  # a UNet call, per row of its input (two rows per image when guided)
CALL_MS = 3.90625  # a UNet call, whatever its rows: shared by the requests it serves
DECODE_ROW_MS = 15.625  # the VAE, per image row decoded


class Clock:
    """The batch meter's clock, moved by the work only (seconds, as `time.perf_counter`)."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.spent_ms = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1000
        self.spent_ms += ms


@dataclass
class Work:
    """What the engine computed: each UNet call (its step and its rows) and each decode (its rows)."""

    clock: Clock = field(default_factory=Clock)
    calls: list[tuple[int, int]] = field(default_factory=list)
    decoded_rows: list[int] = field(default_factory=list)


@contextmanager
def metered_work(*, keep_rows: bool) -> Iterator[Work]:
    """The worker's batch meters on a clock that the engine's UNet calls and decodes move by their rows.

    ``keep_rows``: the engine keeps a leaving request's rows in the batch, as it must with a captured CUDA graph or a
    scheduler with per-row history (here with DDIM, whose rows could be dropped, told it cannot).
    """
    work = Work()
    real_predict, real_decode = engine_module.Engine.predict_noise, engine_module._TextToImageRun._decode

    def predict_noise(self: Any, model_input: Any, *args: Any, step_index: int, **kwargs: Any) -> Any:
        work.calls.append((step_index, int(model_input.shape[0])))
        work.clock.spend(ROW_MS * int(model_input.shape[0]) + CALL_MS)
        return real_predict(self, model_input, *args, step_index=step_index, **kwargs)

    def decode(self: Any, latents: Any, generators: Any) -> Any:
        work.decoded_rows.append(int(latents.shape[0]))
        work.clock.spend(DECODE_ROW_MS * int(latents.shape[0]))
        return real_decode(self, latents, generators)

    with ExitStack() as patches:
        patches.enter_context(mock.patch.object(worker, "BatchMeter", functools.partial(BatchMeter, clock=work.clock)))
        patches.enter_context(mock.patch.object(engine_module.Engine, "predict_noise", predict_noise))
        patches.enter_context(mock.patch.object(engine_module._TextToImageRun, "_decode", decode))
        if keep_rows:
            patches.enter_context(mock.patch.object(engine_module, "ROW_INDEPENDENT_SCHEDULERS", frozenset()))
        yield work


@contextmanager
def leaving(plan: dict[str, tuple[int, str]]) -> Iterator[None]:
    """Jobs (by id) that leave their batch after so many steps: cancelled by request, or a fault of their own
    (billing could not be asked for their next step: closed ERRORED, the platform's fault)."""
    real_should_cancel = worker.Heartbeat.should_cancel

    def should_cancel(self: worker.Heartbeat, index: int) -> bool:
        member = self.members[index]
        if member.job_id in plan and plan[member.job_id][0] == member.step:
            if plan[member.job_id][1] == "fault":
                member.fault = RuntimeError("the hold could not be extended")
            else:
                member.stop_reason, member.stop_error_type = "Cancelled by request.", "cancelled"
            return True
        return real_should_cancel(self, index)

    with mock.patch.object(worker.Heartbeat, "should_cancel", should_cancel):
        yield


@dataclass(frozen=True)
class Own:
    """What one request's own work cost, exactly."""

    rows_ms: float  # its rows of every UNet call it was in, and of the decode if it got that far
    calls_ms: float  # its part, by images among the requests still in, of those calls' fixed cost


def own_work(
    work: Work, job_id: str, *, weight: dict[str, int], present_at: list[set[str]], rows_per_image: int, decoded: bool
) -> Own:
    rows_ms = calls_ms = 0.0
    for present in present_at:
        if job_id in present:
            rows_ms += ROW_MS * rows_per_image * weight[job_id]
            calls_ms += CALL_MS * weight[job_id] / sum(weight[other] for other in present)
    if decoded:
        rows_ms += DECODE_ROW_MS * weight[job_id]
    return Own(rows_ms, calls_ms)


@settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    images=st.lists(st.integers(min_value=1, max_value=3), min_size=2, max_size=4).filter(
        lambda sizes: sum(sizes) <= 4
    ),
    steps=st.integers(min_value=2, max_value=5),
    guided=st.booleans(),
    keep_rows=st.booleans(),
    # Whether each job leaves, after how many of its steps (as a fraction of them), and why.
    departures=st.lists(
        st.none()
        | st.tuples(st.floats(min_value=0, max_value=1, exclude_max=True), st.sampled_from(["cancel", "fault"])),
        min_size=4,
        max_size=4,
    ),
)
# A companion cancelled halfway whose rows the engine keeps; another whose step its hold could not cover.
@example(images=[1, 2], steps=4, guided=True, keep_rows=True, departures=[None, (0.5, "cancel"), None, None])
@example(images=[2, 1, 1], steps=3, guided=False, keep_rows=True, departures=[None, None, (0.4, "fault"), None])
def test_each_request_pays_for_its_own_rows_and_the_batch_time_is_whole(
    dispatch: Any,
    images: list[int],
    steps: int,
    guided: bool,
    keep_rows: bool,
    departures: list[tuple[float, str] | None],
) -> None:
    jobs = [
        dispatch(seed=seed, num_images=count, num_inference_steps=steps, guidance_scale=7.5 if guided else 1.0)
        for seed, count in enumerate(images, start=1)
    ]
    # A faulty job is not run again: every example's batch is exactly its own jobs.
    Job.objects.filter(pk__in=[job.pk for job in jobs]).update(max_attempts=1)
    plan = {
        str(job.pk): (math.floor(departure[0] * steps), departure[1])
        for job, departure in zip(jobs, departures, strict=False)
        if departure is not None
    }
    note(f"jobs of {images} images, {steps} steps, leaving (after step, why): {list(plan.values())}")

    with metered_work(keep_rows=keep_rows) as work, leaving(plan):
        worker.execute(str(jobs[0].pk), jobs[0].attempt)

    weight = {str(job.pk): count for job, count in zip(jobs, images, strict=True)}
    left_after = {job_id: step for job_id, (step, _) in plan.items()}
    # The requests still in the batch at each UNet call: one leaving after step s was in its first s calls.
    present_at = [{job_id for job_id in weight if left_after.get(job_id, steps) > step} for step, _ in work.calls]
    rows_per_image = 2 if guided else 1
    stayed = [job_id for job_id in weight if job_id not in plan]
    # The rows the engine computed for requests that had left: no one's work.
    vacated_ms = sum(
        ROW_MS * (rows - rows_per_image * sum(weight[job_id] for job_id in present))
        for (_, rows), present in zip(work.calls, present_at, strict=True)
    ) + sum(DECODE_ROW_MS * (rows - sum(weight[job_id] for job_id in stayed)) for rows in work.decoded_rows)
    recorded_ms = wasted_ms = 0
    for job in jobs:
        job_id = str(job.pk)
        attempt, record = JobAttempt.objects.get(job=job), UsageRecord.objects.get(job=job)
        if job_id in plan:
            assert Job.objects.get(pk=job.pk).status in (JobStatus.CANCELLED, JobStatus.FAILED)
        else:
            assert (Job.objects.get(pk=job.pk).status, attempt.outcome) == (
                JobStatus.COMPLETED,
                AttemptOutcome.SUCCEEDED,
            )
        own = own_work(
            work, job_id, weight=weight, present_at=present_at, rows_per_image=rows_per_image, decoded=job_id in stayed
        )
        # Its share: at least its own rows, at most its own rows and its part of the calls' fixed cost (within the
        # whole-millisecond rounding of the batch's shares: under a millisecond per request of the batch).
        assert own.rows_ms - len(jobs) <= attempt.gpu_ms <= own.rows_ms + own.calls_ms + len(jobs), (job_id, own)
        if attempt.billable:
            assert record.gpu_ms == attempt.gpu_ms
        # Its usage record: billed and unbilled, its whole time, cold start apart.
        recorded_ms += record.gpu_ms + record.unbilled_gpu_ms - attempt.cold_start_ms
        wasted_ms += record.unbilled_gpu_ms - attempt.cold_start_ms - (0 if attempt.billable else attempt.gpu_ms)
    # The vacated rows' time is recorded as wasted, unbilled; none where there was none.
    assert wasted_ms >= vacated_ms - len(jobs)
    if not vacated_ms:
        assert wasted_ms == 0
    # Billed and unbilled, the batch's time is all there, to the millisecond.
    assert recorded_ms == math.ceil(work.clock.spent_ms)
