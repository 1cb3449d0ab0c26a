"""What a GPU worker does with a job: claim it, keep its lease, run the engine, store, finish.

A job may take compatible dispatched jobs of its endpoint along into one pipeline call (the endpoint's
optimization profile says how many images and how long to wait for them). Each job of such a batch
keeps everything it has alone: its own claim, lease, heartbeat, cancel and final transaction.

GPU time is measured here with a monotonic clock, in milliseconds, from the moment the pipeline
starts to the moment the outputs are stored (docs/lifecycle.md); in a batch each job gets its share
(`inference.engine.batch_shares`): the time of its own rows. Time no job's work used (the rows of a job that left
while the engine computes them on) is wasted, recorded unbilled with the jobs still in; shares and waste add up to
exactly the batch's time. Loading a model (and compiling it) is cold-start time, recorded apart and never billed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections, connection

from accounts.errors import AppError
from inference import attempts, closing, files
from inference.batch_pace import ArrivalPace
from inference.engine import (
    AnyEngine,
    BatchMeter,
    Cancelled,
    GenerationRequest,
    GenerationResult,
    LoadOptions,
    MeterReading,
    ModelSourceError,
    ModuleOptimizations,
    OptimizationProfile,
    PipelineCache,
    Preview,
    PreviewOptions,
    ProfileError,
    RunOptions,
    batch_key,
    configure_compile_cache,
    default_device,
    encode_audio,
    encode_image,
    encode_video,
    resolve,
    video_poster,
)
from inference.hooks import Refusal
from inference.inputs import image_pixels_problem, output_size_for_image
from inference.job_events import publish
from inference.job_logs import log_job
from inference.media_inputs import video_size_for_image
from inference.models import IMAGE_INPUT_KINDS, AttemptOutcome, Endpoint, Job, PipelineKind
from inference.presenters import planned_steps
from inference.previews import PREVIEWS_FLAG, publish_preview

logger = logging.getLogger(__name__)

# Decoding and storing a job's images, after its last step, reserved as this many steps' time.
FINISHING_STEPS = 2
# "Step k/n" log lines per attempt, at most (and one more for the last step): every step of a short job, every
# n/20th of a long one, so a job of thousands of steps writes about 20 rows, not thousands. They are written by the
# heartbeat thread, so also at most one per heartbeat (four a second), never by the engine between steps.
STEP_LOG_LINES = 20
# The time one image's denoising step last took here, per (endpoint, width, height): a job's first step is
# reserved from it (from the admission estimate alone on a worker that never ran that shape).
_step_ms_per_image: dict[tuple[Any, Any, Any], float] = {}

# How fast requests reach this worker against how long its pipeline calls take, per endpoint: whether a job waits for
# company (`gather_companions`).
_pace = ArrivalPace()

_cache: PipelineCache | None = None
_cache_lock = threading.Lock()


def pipeline_cache() -> PipelineCache:
    """One warm cache per worker process: pipelines stay loaded across jobs."""
    global _cache
    with _cache_lock:
        if _cache is None:
            apply_thread_policy()
            _cache = PipelineCache(budget_bytes=settings.WORKER_PIPELINE_CACHE_BYTES)
        return _cache


def apply_thread_policy() -> None:
    """The worker's intra-op threads for torch: ``WORKER_TORCH_THREADS`` (0: torch's own default, one per core).

    One by default. A worker runs one job at a time, and on a CPU shares its cores with the web and housekeeping
    processes (and, in a shared machine, with anyone else's): OpenMP's spinning threads then wait on a peer the
    system has put to sleep. Measured on two shared cores (README, engine benchmark), every model ran 2.5-7x slower
    on two threads than on one: the small image model's 20 steps 7.6 s against 1.05 s, the tiny video 2.8 s against
    1.06 s. On a GPU the CPU only feeds the device.
    """
    import torch

    if settings.WORKER_TORCH_THREADS:
        torch.set_num_threads(settings.WORKER_TORCH_THREADS)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def weights_source(endpoint: Endpoint) -> str:
    """``builtin:<name>`` as is; a relative folder name is looked up under MODELS_DIR."""
    if endpoint.weights.startswith("builtin:"):
        return endpoint.weights
    path = Path(endpoint.weights)
    return str(path if path.is_absolute() else Path(settings.MODELS_DIR) / path)


class InputProblem(AppError):
    """The request's own input made the job fail (for example an image URL that cannot be read)."""

    status_code = 422

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message, error_type=error_type)


@dataclass(eq=False)
class Member:
    """One job of the batch a worker runs (a batch of one is a job run alone)."""

    index: int
    job: Job
    attempt: int
    # Cold start paid while this job waited for its model: only the job that loaded it.
    cold_start_ms: int = 0
    step: int = 0
    # The steps the job will take: planned from its input until the engine reports its count.
    total: int = -1
    stop_reason: str = ""
    stop_error_type: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    # Billing's reserve of its next step raised (a statement timeout, a lost deadlock): it leaves the batch ERRORED
    # and runs again, and the error stays its own, not its companions' (`Heartbeat.should_cancel`).
    fault: Exception | None = None
    # Nothing more for this worker to close: its attempt is closed, or left to the reaper (a lost lease, a close
    # that raised).
    settled: bool = False
    # GPU time the job's hold covers (None: no limit; -1: not asked yet). See `Heartbeat.covers_next_step`.
    covered_ms: int | None = -1
    # The latest preview not yet published (streamed jobs only), and the last step written to the job's logs.
    pending_preview: Preview | None = None
    logged_step: int = 0
    log_lock: threading.Lock = field(default_factory=threading.Lock)
    # When its lease was last renewed, by this process's monotonic clock: its claim (the member is made just after),
    # then each heartbeat that went through, from when it was asked. Each member's own: one job's failing heartbeats
    # must not make its companions' leases look lapsed (`Heartbeat._beat`).
    renewed_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.total < 0:
            self.total = planned_steps(self.job.input)

    @property
    def wants_previews(self) -> bool:
        return bool(self.job.input.get(PREVIEWS_FLAG))

    @property
    def job_id(self) -> str:
        return str(self.job.pk)

    @property
    def images(self) -> int:
        """How many outputs (images, videos, clips) the job makes: its weight in the batch."""
        return len(self.job.input.get("seeds") or ()) or 1


class Heartbeat(threading.Thread):
    """Renews the leases, reports progress and hears about cancels for every job of a batch while the engine works.

    One thread (and one database connection) for the whole batch. Runs beside the pipeline so a long step or model
    load never lets a lease lapse. Progress is flushed at most every ``JOB_HEARTBEAT_SECONDS``, or sooner when a
    step ends.
    """

    def __init__(self, members: list[Member]) -> None:
        super().__init__(name=f"heartbeat-{members[0].job_id}", daemon=True)
        self.members: list[Member] = []
        # Each job's share of the batch's GPU time (none before the work starts), for the spend check and its bill.
        self.meter = BatchMeter()
        # What the jobs had been charged when the batch's last step ended: from there on it is decoded.
        self.denoised: MeterReading | None = None
        self._members_lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self.add(members)

    def add(self, members: list[Member]) -> None:
        for member in members:
            self.meter.join(member.index, member.images)
        with self._members_lock:
            self.members.extend(members)

    def progress(self, step: int, total: int) -> None:
        for member in self.members:
            member.step, member.total = step, total
        if step == total:
            self.denoised = self.meter.reading()
        self._wake.set()

    def decode_again(self, exc: Exception) -> bool:
        """Asked by the engine when an exception cuts short the decoding of the batch, past its last step: Celery's
        soft time limit is answered yes, anything else goes on up.

        The work is done, and the hard limit a minute away: it is decoded again and delivered rather than thrown
        away, as outputs are stored again (`_store_or_fail`). The decode that was cut short did nothing anyone
        receives: its time is wasted, recorded with the jobs and billed to none of them.
        """
        if not isinstance(exc, SoftTimeLimitExceeded):
            return False
        leader = self.members[0].job_id
        logger.warning("job %s: the soft time limit came while its batch was decoded; decoded again", leader)
        if self.denoised is not None:
            self.meter.write_off(self.denoised)
        return True

    def preview(self, index: int, preview: Preview) -> None:
        """A job's latest preview, from the engine's thread: encoded and published on this one (a newer preview
        replaces one still waiting)."""
        self.members[index].pending_preview = preview
        self._wake.set()

    def log_steps(self, member: Member) -> None:
        """Writes "Step k/n" to the job's logs when k has passed the next mark (`STEP_LOG_LINES`) or is the last."""
        with member.log_lock:
            step, total = member.step, member.total
            if not total or step <= member.logged_step:
                return
            stride = max(1, math.ceil(total / STEP_LOG_LINES))
            if step < total and step // stride == member.logged_step // stride:
                return
            member.logged_step = step
            log_job(member.job.id, f"Step {step}/{total}", source="worker")

    def report(self, member: Member) -> None:
        """What a stream shows of a job between heartbeats: its latest preview and its step log lines."""
        preview, member.pending_preview = member.pending_preview, None
        try:
            if preview is not None:
                publish_preview(member.job_id, preview.as_json())
            self.log_steps(member)
        except Exception:
            # Progress reports must never cost the job its heartbeat.
            logger.exception("progress report of job %s failed", member.job_id)

    def should_cancel(self, index: int) -> bool:
        """Asked by the engine before each further step of a job: stop it here?

        An error asking billing (a statement timeout, a deadlock lost after the retries, a bug in one tenant's
        account) is that job's alone: it stops here and leaves the batch as a refusal would, closed ERRORED and run
        again (`_close_cancelled`), while its companions go on. Celery's soft time limit is the whole task's: it
        goes on up.
        """
        member = self.members[index]
        if member.cancelled.is_set():
            return True
        try:
            return not self.covers_next_step(member)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            logger.exception("job %s attempt %s: its next step could not be reserved", member.job_id, member.attempt)
            member.fault = exc
            _recover_connection()
            return True

    def covers_next_step(self, member: Member) -> bool:
        """Is the job's next step paid for? Work is reserved before it is done (docs/money.md).

        The next step is projected from the job's own time per step so far (its share, in a batch); the last step
        also carries decoding and storing, which cannot be stopped once the last step is done. When the hold falls
        short, billing is asked to extend it (for the rest of the job when credit allows, the next step at least);
        refused, the job stops before the step and is billed for what it used.
        """
        used_ms = self.meter.running_ms(member.index)
        steps_done = member.step
        images = member.images
        shape = (member.job.endpoint_id, member.job.input.get("width"), member.job.input.get("height"))
        if steps_done:
            per_step = used_ms / steps_done
            _step_ms_per_image[shape] = per_step / images
        else:
            # Before the first step: as long as a step of this shape last took on this worker (0 if never seen).
            per_step = _step_ms_per_image.get(shape, 0.0) * images
        planned = member.total or int(member.job.input.get("num_inference_steps") or 1)
        left = max(1, planned - steps_done)
        projected = math.ceil(used_ms + per_step * (1 + (FINISHING_STEPS if left == 1 else 0)))
        # The first call always asks (is anything covered, is the account in credit); later ones when short.
        if member.covered_ms != -1 and (member.covered_ms is None or projected <= member.covered_ms):
            return True
        ahead = math.ceil(per_step * (left + FINISHING_STEPS))
        answer = attempts.reserve_work(job=member.job, gpu_ms=projected, ahead_ms=ahead)
        if isinstance(answer, Refusal):
            member.stop_reason, member.stop_error_type = answer.detail, answer.error_type
            return False
        member.covered_ms = answer.covered_gpu_ms
        return True

    def release(self, member: Member) -> None:
        """This job is finished: no more heartbeats for it."""
        member.done = True

    def gpu_ms(self, member: Member) -> int:
        return self.meter.running_ms(member.index)

    def run(self) -> None:
        interval = settings.JOB_HEARTBEAT_SECONDS
        try:
            for member in list(self.members):
                publish(member.job_id)  # claimed: its waiters see it running, told here while the work starts
            while not self._done.is_set():
                self._wake.wait(interval)
                self._wake.clear()
                if self._done.is_set():
                    break
                with self._members_lock:
                    members = [member for member in self.members if not member.done]
                for member in members:
                    self._beat(member)
                    self.report(member)
                # Progress may come faster than the database needs it: at most one write per 0.25 s.
                # (Waiting on the stop event, not sleeping, so a finished job frees the worker at once.)
                self._done.wait(min(interval, 0.25))
        finally:
            connection.close()

    def _beat(self, member: Member) -> None:
        asked = time.monotonic()
        try:
            answer = attempts.heartbeat(
                job_id=member.job_id,
                attempt=member.attempt,
                step=member.step,
                total=member.total,
                gpu_ms=self.gpu_ms(member),
            )
        except Exception:
            # A passing database hiccup must not orphan the job; but once the lease has surely
            # lapsed the reaper owns it, and this attempt stops rather than run as a twin.
            logger.exception("heartbeat of job %s failed", member.job_id)
            connection.close()
            if time.monotonic() - member.renewed_at <= settings.JOB_LEASE_SECONDS:
                return
            answer = attempts.HeartbeatAnswer(False, "The lease could not be renewed.", "lost")
        else:
            member.renewed_at = asked
        if not answer.keep_going and not member.cancelled.is_set():
            member.stop_reason, member.stop_error_type = answer.reason, answer.error_type
            member.cancelled.set()

    def stop(self) -> None:
        self._done.set()
        self._wake.set()
        self.join(timeout=10)


@functools.cache
def _keep_compiled_code(folder: Path) -> None:
    """Once per folder and process: what it sets stays in the environment for every later compile."""
    configure_compile_cache(folder)


def endpoint_profile(endpoint: Endpoint) -> OptimizationProfile:
    """The endpoint's profile on this worker's device. Raises ProfileError for a stored profile that is invalid."""
    return resolve(endpoint.optimization_profile, device=default_device())


def load_options(profile: OptimizationProfile) -> LoadOptions:
    return LoadOptions(device=default_device(), dtype=profile.precision, optimizations=ModuleOptimizations.of(profile))


def execute(job_id: str, attempt: int, *, ahead: float | bool = False) -> None:
    """Runs one dispatched attempt, with any compatible dispatched jobs as company in the same pipeline call.

    Safe to call twice with the same message: only one claim wins. ``ahead``: the message was sent before its job's
    submission committed, at that time (``attempts.claim_message``).
    """
    close_old_connections()
    job = attempts.claim_message(job_id=job_id, attempt=attempt, worker=worker_name(), ahead=ahead, tell_waiters=False)
    if job is None:
        logger.info("job %s attempt %s was not ours to run (claimed, cancelled or stale)", job_id, attempt)
        return
    leader = Member(index=0, job=job, attempt=attempt)
    heartbeat = Heartbeat([leader])
    heartbeat.start()
    try:
        _run(leader, heartbeat)
    finally:
        heartbeat.stop()


def _finish(member: Member, heartbeat: Heartbeat, outcome: AttemptOutcome, **fields: Any) -> None:
    """Closes the member's attempt with its share of the batch's GPU time, and stops its heartbeat."""
    _finish_all([member], heartbeat, outcome, **fields)


def _finish_all(
    members: list[Member],
    heartbeat: Heartbeat,
    outcome: AttemptOutcome,
    *,
    gpu_ms: int | None = None,
    rows_stay: bool = False,
    **fields: Any,
) -> None:
    """Closes every job still open at once: they leave the batch together and share what is left of its time.

    `gpu_ms`: record this instead of their shares (0 when the failure is no GPU work's fault). `rows_stay`: the
    engine computes their rows on, unused (`Cancelled.rows_stay`): that time is its companions' waste, not their bill.
    """
    open_members = [member for member in members if not member.settled]
    # One that left the meter already (a soft time limit cut its close short) keeps the share it was given then.
    still_in = set(heartbeat.meter.active)
    heartbeat.meter.leave((member.index for member in open_members if member.index in still_in), rows_stay=rows_stay)
    shares, wasted = heartbeat.meter.allocated, heartbeat.meter.wasted
    for member in open_members:
        heartbeat.release(member)
        _close_once(
            member,
            functools.partial(
                closing.finish_attempt,
                job_id=member.job_id,
                attempt=member.attempt,
                outcome=outcome,
                gpu_ms=shares[member.index] if gpu_ms is None else gpu_ms,
                wasted_ms=wasted[member.index] if gpu_ms is None else 0,
                cold_start_ms=member.cold_start_ms,
                **fields,
            ),
        )
        member.settled = True


def _close_once(member: Member, close: Callable[[], object]) -> None:
    """A member's close (``closing.finish_attempt``), sent again on a fresh connection where the connection failed
    under it (a server restart or failover, a statement timeout, a deadlock: ``OperationalError``,
    ``InterfaceError``).

    A close that raised went to the reaper (``_leave_to_the_reaper``) or, for a job whose outputs were stored, to the
    store's failure (``_fail_store``): closed unbilled and run again, or failed with its attempts spent, the finished
    work thrown away and a cancel or a credit stop undone. Sending it again is safe whether the lost one committed or
    not: an attempt closes once (``closing.finish_attempt`` answers None for one already closed). Tried until the
    job's lease, last renewed before its close began (its heartbeat is released), has surely lapsed: by then the
    reaper owns it, and the error goes on as before. Any other error (the close's own data) is raised at once."""
    wait = 0.25
    while True:
        try:
            close()
            return
        except (OperationalError, InterfaceError):
            if _close_clock() + wait - member.renewed_at > settings.JOB_LEASE_SECONDS:
                raise
            logger.warning("job %s attempt %s: closing it failed; closing it again", member.job_id, member.attempt,
                           exc_info=True)  # fmt: skip
            _recover_connection()
            _close_pause(wait)
            wait = min(wait * 2, 2.0)


# The clock (``time.monotonic``, as ``Member.renewed_at``) and the pause of ``_close_once``: a test runs out a lease
# with its own, without waiting for it.
_close_clock: Callable[[], float] = time.monotonic
_close_pause: Callable[[float], None] = time.sleep


def _run(leader: Member, heartbeat: Heartbeat) -> None:
    job = leader.job
    members = [leader]
    try:
        profile = endpoint_profile(job.endpoint)
        options = load_options(profile)
        if profile.compile != "off" or profile.small_head_attention:
            # Compiled code, and the attention kernel built beside it, kept with the platform's data.
            _keep_compiled_code(Path(settings.DATA_DIR) / "compile-cache")
        loaded = pipeline_cache().get(weights_source(job.endpoint), job.endpoint.kind, options=options)
        leader.cold_start_ms = loaded.load_ms
        if not loaded.cache_hit:
            leader.cold_start_ms += warm_up(loaded.engine, job.endpoint, profile)
            log_job(job.id, f"Model loaded in {leader.cold_start_ms} ms (cold start).", source="worker")
            job.company_waiting = True  # the claim's look is older than the load: look again (without a wait)
        requests = [generation_request(job)]
        _pace.arrived(job.endpoint_id, arrival(job))
        members += gather_companions(job, requests[0], profile)
        heartbeat.add(members[1:])
        requests += [generation_request(member.job) for member in members[1:]]
        if len(members) > 1:
            log_job(job.id, f"Running in a batch of {len(members)} requests.", source="worker")
        heartbeat.meter.start()

        def on_cancelled(index: int, cancelled: Cancelled) -> None:
            _leave_batch(members[index], heartbeat, cancelled)

        called = time.monotonic()
        outcomes = loaded.engine.run_batch(
            requests,
            options=RunOptions.of(profile),
            on_step=heartbeat.progress,
            should_cancel=heartbeat.should_cancel,
            on_cancelled=on_cancelled,
            previews=preview_options(members, heartbeat),
            decode_again=heartbeat.decode_again,
        )
        ran_ms = (time.monotonic() - called) * 1000
        heartbeat.meter.free_rows()  # the rows of jobs that left run no more
        # Past the last step every job's work is done and in memory: each is stored whatever stop comes now (a soft
        # time limit leaves a minute before the hard one, time enough to store), each on its own.
        timed_out = False
        for member, outcome in zip(members, outcomes, strict=True):
            if isinstance(outcome, GenerationResult):
                timed_out = _store_or_fail(member, outcome, heartbeat, batch_size=len(members)) or timed_out
        if timed_out:
            logger.warning("job %s: the soft time limit came while the batch's outputs were stored; stored", job.id)
        _pace.ran(job.endpoint_id, ran_ms)
    except InputProblem as problem:
        _finish_all(members, heartbeat, AttemptOutcome.FAILED, error=str(problem), error_type=problem.error_type)
    except SoftTimeLimitExceeded:
        _finish_all(
            members,
            heartbeat,
            AttemptOutcome.ERRORED,
            error="The request ran past the worker's time limit.",
            error_type="timeout",
        )
    except ProfileError as exc:
        logger.error("job %s: endpoint %s has an invalid optimization profile: %s", job.id, job.endpoint, exc)
        _finish_all(
            members,
            heartbeat,
            AttemptOutcome.ERRORED,
            gpu_ms=0,
            error="The model of this endpoint is misconfigured on the platform.",
            error_type="model_unavailable",
        )
    except ModelSourceError as exc:
        # A registry entry whose weights cannot be loaded: retrying will not help.
        logger.error("job %s: model %s cannot be loaded: %s", job.id, job.endpoint.weights, exc)
        _finish_all(
            members,
            heartbeat,
            AttemptOutcome.ERRORED,
            gpu_ms=0,
            error="The model of this endpoint is not available on the worker.",
            error_type="model_unavailable",
        )
    except Exception as exc:
        logger.exception("job %s attempt %s failed", job.id, leader.attempt)
        _finish_all(members, heartbeat, AttemptOutcome.ERRORED, **_platform_fault(exc))


def preview_options(members: list[Member], heartbeat: Heartbeat) -> PreviewOptions | None:
    """Previews every `STREAM_PREVIEW_EVERY_STEPS` steps for the jobs submitted through a stream; none for others."""
    every = settings.STREAM_PREVIEW_EVERY_STEPS
    wanted = frozenset(member.index for member in members if member.wants_previews)
    if not every or not wanted:
        return None
    return PreviewOptions(every=every, members=wanted, on_preview=heartbeat.preview)


def _leave_batch(member: Member, heartbeat: Heartbeat, cancelled: Cancelled) -> None:
    """A job leaving its batch at a step boundary, from inside the engine's loop: an error closing it is its own.

    Its companions go on. It stays RUNNING with no more heartbeats, so its lease runs out and the reaper takes it
    back (`closing.reap_expired_leases`), as it would had this worker died. Celery's soft time limit goes on up.
    """
    try:
        _close_cancelled(member, heartbeat, cancelled)
    except SoftTimeLimitExceeded:
        raise
    except Exception:
        _leave_to_the_reaper(member, heartbeat)


def _leave_to_the_reaper(member: Member, heartbeat: Heartbeat) -> None:
    """A job whose close raised (a dropped connection, a settlement that failed): no more heartbeats for it, so its
    lease runs out and the reaper closes it, unbilled, and runs it again."""
    logger.exception("job %s attempt %s could not be closed; left to the reaper", member.job_id, member.attempt)
    heartbeat.release(member)
    member.settled = True
    _recover_connection()


def _recover_connection() -> None:
    """After a database error of one job: a connection the server dropped is closed, so the next query (its
    companions') opens a new one, as Django does not reconnect by itself (Django's own check: a usable one is kept
    unless past CONN_MAX_AGE, which costs a reconnect)."""
    connection.close_if_unusable_or_obsolete()


def _close_cancelled(member: Member, heartbeat: Heartbeat, cancelled: Cancelled) -> None:
    """A job that left its batch at a step boundary: closed at once with its share of the time so far."""
    rows_stay = cancelled.rows_stay
    if member.fault is not None:
        # Billing could not be asked for its next step: the platform's fault, not billed, and run again.
        _finish(member, heartbeat, AttemptOutcome.ERRORED, rows_stay=rows_stay, **_platform_fault(member.fault))
        return
    error_type = member.stop_error_type or "cancelled"
    reason = member.stop_reason or "Cancelled by request."
    if error_type == "lost":
        logger.warning("job %s attempt %s lost its lease; dropping its work", member.job_id, member.attempt)
        heartbeat.meter.leave([member.index], rows_stay=rows_stay)  # its share goes with its work
        heartbeat.release(member)
        member.settled = True
        return
    _finish(
        member,
        heartbeat,
        AttemptOutcome.CANCELLED,
        rows_stay=rows_stay,
        error=f"{reason} Stopped after step {cancelled.steps_done} of {cancelled.total_steps}.",
        error_type=error_type,
    )


def _store_or_fail(member: Member, result: GenerationResult, heartbeat: Heartbeat, *, batch_size: int) -> bool:
    """Stores one job's images; a failure there fails that job alone (retried), not the rest of its batch.

    Returns whether Celery's soft time limit fired meanwhile. The work is done and the hard limit a minute away:
    the job is stored again rather than thrown away. Storing twice is safe: a second file of the same name gets a
    free name (the purge clears the whole job folder), and an attempt closes once (`closing.finish_attempt`
    answers None for one the limit caught after its commit). If the second try fails too, the job is closed
    ERRORED and run again, as for any store that failed.
    """
    try:
        _store(member, result, heartbeat, batch_size=batch_size)
        return False
    except SoftTimeLimitExceeded:
        logger.warning("job %s attempt %s: the soft time limit came while it was stored", member.job_id, member.attempt)
    except Exception as exc:
        _fail_store(member, heartbeat, exc)
        return False
    try:
        _store(member, result, heartbeat, batch_size=batch_size)
    except Exception as exc:  # a soft time limit included: Celery sends it once, but storing must come to an end
        _fail_store(member, heartbeat, exc)
    return True


def _fail_store(member: Member, heartbeat: Heartbeat, exc: Exception) -> None:
    """Closes a job whose outputs could not be stored as the platform's fault; if even that raises, it is left to
    the reaper rather than fail its companions' outputs, still to be stored."""
    logger.error("job %s attempt %s: its outputs could not be stored", member.job_id, member.attempt, exc_info=exc)
    fault = _platform_fault(exc)
    if isinstance(exc, SoftTimeLimitExceeded):
        fault.update(error="Its outputs could not be stored within the worker's time limit.", error_type="timeout")
    try:
        _finish(member, heartbeat, AttemptOutcome.ERRORED, **fault)
    except Exception:  # a soft time limit included: the others' outputs are still to be stored
        _leave_to_the_reaper(member, heartbeat)


def _platform_fault(exc: Exception) -> dict[str, Any]:
    """The platform's fault (a crash, out of memory): not billed, and retried while attempts remain."""
    return {"error": f"Internal error: {type(exc).__name__}.", "error_type": "internal_error", "retry": True}


def _store(member: Member, result: GenerationResult, heartbeat: Heartbeat, *, batch_size: int) -> None:
    """Encodes and stores one job's outputs (its own time, not shared) and closes it as succeeded."""
    job = member.job
    if member.index in heartbeat.meter.active:  # (not when a time limit cut its close short after it left)
        heartbeat.meter.exclusive(member.index)
    heartbeat.report(member)  # its last preview and step, before the line that says the job completed
    output = _encoded_output(job, result)
    if batch_size > 1:
        log_job(
            job.id,
            f"Shared a pipeline call with {batch_size - 1} other request(s); "
            f"GPU time is this request's share ({heartbeat.meter.running_ms(member.index)} ms so far).",
            source="worker",
        )
    _finish(member, heartbeat, AttemptOutcome.SUCCEEDED, result=output)


def _encoded_output(job: Job, result: GenerationResult) -> dict[str, Any]:
    """The job's result in fal's shape, its files encoded and stored (images inline instead, with ``sync_mode``).

    Images: ``{images, seed, timings, has_nsfw_concepts, prompt}``. Video (fal's LTX-Video): ``{video, seed,
    timings}``, the video an H.264 MP4 with its poster (the first frame, a JPEG) inside its file object. Audio (fal's
    Stable Audio): ``{audio_file, seed, timings}``, WAV or MP3. Videos and clips are always stored: their inputs
    take no ``sync_mode``, as fal's video and audio endpoints' mostly do not.
    """
    timings = {"inference": round(result.run_ms / 1000, 4)}
    if result.videos:
        frames = result.videos[0]
        stored_video = files.save_output(job, encode_video(frames, result.frame_rate), "0")
        stored_video["poster"] = files.save_output(job, video_poster(frames), "0.poster")
        return {"video": stored_video, "seed": job.input["seed"], "timings": timings}
    if result.audios:
        clip = encode_audio(result.audios[0], result.sample_rate, job.input.get("output_format") or "wav")
        return {"audio_file": files.save_output(job, clip, "0"), "seed": job.input["seed"], "timings": timings}
    images = [encode_image(image, job.input["output_format"]) for image in result.images]
    stored = files.inline_outputs(images) if job.input.get("sync_mode") else files.save_outputs(job, images)
    return {
        "images": stored,
        "seed": job.input["seed"],
        "timings": timings,
        "has_nsfw_concepts": [False] * len(stored),
        "prompt": job.input["prompt"],
    }


def arrival(job: Job) -> datetime:
    """When the job reached the workers: its dispatch (after a wait for its organization's slot, or a retry)."""
    return job.dispatched_at or job.created_at


def gather_companions(job: Job, request: GenerationRequest, profile: OptimizationProfile) -> list[Member]:
    """Compatible dispatched jobs to run with `job`: those dispatched already (if its claim saw any:
    `attempts.claim_job`'s `company_waiting`), and those dispatched within the profile's `batch_wait_ms` while
    requests reach this worker faster than it runs them (`inference.batch_pace`)."""
    key = batch_key(request)
    room = profile.max_batch_size - len(request.seeds)
    if key is None or room <= 0:
        return []
    if _pace.company_expected(job.endpoint_id):
        wait_ms = profile.batch_wait_ms
    elif getattr(job, "company_waiting", True):
        wait_ms = 0  # those dispatched already, no wait
    else:
        return []  # none dispatched when the job was claimed, and none expected soon: not even a look
    deadline = time.monotonic() + wait_ms / 1000

    def compatible(job_input: dict[str, Any]) -> bool:
        try:
            return batch_key(request_from_input(job_input)) == key
        except (KeyError, TypeError, ValueError):
            return False

    companions: list[Job] = []
    while room > 0:
        try:
            found = attempts.claim_batch_companions(job=job, worker=worker_name(), room=room, compatible=compatible)
        except DatabaseError:
            # Company is an optimization: the job (and those claimed already) run without more.
            logger.exception("job %s: looking for company failed; it runs with what it has", job.pk)
            _recover_connection()
            break
        for companion in found:
            _pace.arrived(companion.endpoint_id, arrival(companion))
        companions += found
        room -= sum(len(companion.input["seeds"]) for companion in found)
        remaining = deadline - time.monotonic()
        if room <= 0 or remaining <= 0:
            break
        time.sleep(min(remaining, 0.001))
    return [
        Member(index=index, job=companion, attempt=companion.attempt)
        for index, companion in enumerate(companions, start=1)
    ]


def warm_up(engine: AnyEngine, endpoint: Endpoint, profile: OptimizationProfile) -> int:
    """Compile (and capture CUDA graphs) for the endpoint's default request before the first real one: cold start."""
    if profile.compile == "off" and not profile.cuda_graphs:
        return 0
    started = time.perf_counter()
    default = {
        "prompt": "warm-up",
        "seeds": [0],
        "width": endpoint.default_width,
        "height": endpoint.default_height,
        "num_inference_steps": 2,
        "guidance_scale": endpoint.default_guidance_scale,
    }
    if endpoint.kind == PipelineKind.TEXT_TO_VIDEO:
        default.update(num_frames=endpoint.default_num_frames, fps=endpoint.default_fps)
    elif endpoint.kind == PipelineKind.TEXT_TO_AUDIO:
        default.update(seconds_total=endpoint.default_audio_seconds)
    elif endpoint.kind != PipelineKind.TEXT_TO_IMAGE:
        return 0  # image to image and to video run diffusers' pipelines at the input's size: nothing to warm
    engine.run(request_from_input(default), options=RunOptions.of(profile))
    return math.ceil((time.perf_counter() - started) * 1000)


def generation_request(job: Job) -> GenerationRequest:
    if job.endpoint.kind in IMAGE_INPUT_KINDS:
        init_image = load_input_image(job)
        if job.input.get("size_from_image"):
            take_size_of_image(job, init_image.size)
        strength = float(job.input.get("strength") or 1.0)
        return request_from_input(job.input, init_image=init_image, strength=strength)
    return request_from_input(job.input)


def take_size_of_image(job: Job, size: tuple[int, int]) -> None:
    """A downloaded input image with no size asked (image to image with no ``image_size``, image to video with
    ``aspect_ratio: auto``): the output takes its size (or its aspect ratio), known only now. The job's input says
    so, and what the job is billed for follows (admission held credit for the endpoint's largest)."""
    if job.endpoint.kind == PipelineKind.IMAGE_TO_VIDEO:
        width, height = video_size_for_image(int(job.input["short_side"]), *size)
        width, height = min(width, job.endpoint.max_width), min(height, job.endpoint.max_height)
    else:
        width, height = output_size_for_image(job.endpoint, *size)
    job.input = {**job.input, "width": width, "height": height}
    Job.objects.filter(pk=job.pk).update(input=job.input)


def request_from_input(spec: dict[str, Any], *, init_image: Any = None, strength: float = 0.8) -> GenerationRequest:
    """The engine's request for a job's validated input (``as_json`` of ``inputs.GenerationInput``,
    ``media_inputs.VideoInput`` or ``media_inputs.AudioInput``)."""
    return GenerationRequest(
        prompts=[spec["prompt"]] * len(spec["seeds"]),
        seeds=list(spec["seeds"]),
        width=int(spec.get("width") or 512),
        height=int(spec.get("height") or 512),
        num_inference_steps=int(spec["num_inference_steps"]),
        guidance_scale=float(spec["guidance_scale"]),
        negative_prompt=spec.get("negative_prompt") or "",
        init_image=init_image,
        strength=strength,
        num_frames=int(spec.get("num_frames") or 0),
        frame_rate=int(spec.get("fps") or 0),
        audio_seconds=float(spec.get("seconds_total") or 0),
    )


def load_input_image(job: Job) -> Any:
    from PIL import Image

    from inference.netguard import TooLarge, UnsafeUrl, fetch_bytes

    if job.input.get("image_path"):
        data = files.read_input(job.input["image_path"])
    else:
        try:
            data, _ = fetch_bytes(job.input["image_url"], max_bytes=job.endpoint.max_input_image_bytes)
        except TooLarge:
            raise InputProblem(
                f"The image at image_url is larger than {job.endpoint.max_input_image_bytes} bytes.", "image_too_large"
            ) from None
        except UnsafeUrl as exc:
            raise InputProblem(f"image_url is not allowed: {exc}", "image_load_error") from None
        except Exception as exc:
            raise InputProblem(f"image_url could not be downloaded: {exc}", "image_load_error") from None
    if problem := image_pixels_problem(data):
        raise InputProblem(problem, "image_too_large")  # known only now: the job fails, unbilled work is none
    try:
        with Image.open(BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception:  # Pillow raises many kinds for a bad file: all are the input's fault
        raise InputProblem("image_url does not hold a readable image.", "image_load_error") from None
