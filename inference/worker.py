"""What a GPU worker does with one job: claim it, keep its lease, run the engine, store, finish.

GPU time is measured here with a monotonic clock, in milliseconds, from the moment the pipeline
starts to the moment the outputs are stored (DESIGN §3). Loading a model is cold-start time,
recorded apart and never billed.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import close_old_connections, connection

from inference import files, services
from inference.engine import (
    Cancelled,
    GenerationRequest,
    ModelSourceError,
    PipelineCache,
    PipelineKind,
    encode_image,
    run_pipeline,
)
from inference.models import AttemptOutcome, Endpoint, Job

logger = logging.getLogger(__name__)

_cache: PipelineCache | None = None
_cache_lock = threading.Lock()


def pipeline_cache() -> PipelineCache:
    """One warm cache per worker process: pipelines stay loaded across jobs."""
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = PipelineCache(budget_bytes=settings.WORKER_PIPELINE_CACHE_BYTES)
        return _cache


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def weights_source(endpoint: Endpoint) -> str:
    """``builtin:<name>`` as is; a relative folder name is looked up under MODELS_DIR."""
    if endpoint.weights.startswith("builtin:"):
        return endpoint.weights
    path = Path(endpoint.weights)
    return str(path if path.is_absolute() else Path(settings.MODELS_DIR) / path)


class InputProblem(Exception):
    """The request's own input made the job fail (for example an image URL that cannot be read)."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class Heartbeat(threading.Thread):
    """Renews the lease, reports progress and hears about cancels while the engine works.

    Runs beside the pipeline so a long step or model load never lets the lease lapse. Progress
    is flushed at most every ``JOB_HEARTBEAT_SECONDS``, or sooner when a step ends.
    """

    def __init__(self, job_id: str, attempt: int) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.job_id = job_id
        self.attempt = attempt
        self.step = 0
        self.total = 0
        self.gpu_started: float | None = None
        self.stop_reason = ""
        self.stop_error_type = ""
        self.cancelled = threading.Event()
        self._wake = threading.Event()
        self._done = threading.Event()

    def progress(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        self._wake.set()

    def should_cancel(self) -> bool:
        return self.cancelled.is_set()

    def gpu_ms(self) -> int:
        return 0 if self.gpu_started is None else math.ceil((time.perf_counter() - self.gpu_started) * 1000)

    def run(self) -> None:
        interval = settings.JOB_HEARTBEAT_SECONDS
        last_renewed = time.monotonic()
        try:
            while not self._done.is_set():
                self._wake.wait(interval)
                self._wake.clear()
                if self._done.is_set():
                    break
                try:
                    answer = services.heartbeat(
                        job_id=self.job_id, attempt=self.attempt, step=self.step, total=self.total, gpu_ms=self.gpu_ms()
                    )
                    last_renewed = time.monotonic()
                except Exception:
                    # A passing database hiccup must not orphan the job; but once the lease has surely
                    # lapsed the reaper owns it, and this attempt stops rather than run as a twin.
                    logger.exception("heartbeat of job %s failed", self.job_id)
                    connection.close()
                    if time.monotonic() - last_renewed > settings.JOB_LEASE_SECONDS:
                        answer = services.HeartbeatAnswer(False, "The lease could not be renewed.", "lost")
                    else:
                        continue
                if not answer.keep_going and not self.cancelled.is_set():
                    self.stop_reason, self.stop_error_type = answer.reason, answer.error_type
                    self.cancelled.set()
                # Progress may come faster than the database needs it: at most one write per 0.25 s.
                # (Waiting on the stop event, not sleeping, so a finished job frees the worker at once.)
                self._done.wait(min(interval, 0.25))
        finally:
            connection.close()

    def stop(self) -> None:
        self._done.set()
        self._wake.set()
        self.join(timeout=10)


def execute(job_id: str, attempt: int) -> None:
    """Runs one dispatched attempt. Safe to call twice with the same message: only one claim wins."""
    close_old_connections()
    job = services.claim_job(job_id=job_id, attempt=attempt, worker=worker_name())
    if job is None:
        logger.info("job %s attempt %s was not ours to run (claimed, cancelled or stale)", job_id, attempt)
        return
    heartbeat = Heartbeat(job_id, attempt)
    heartbeat.start()
    cold_start_ms = 0

    def finish(outcome: AttemptOutcome, *, gpu_ms: int | None = None, **fields: Any) -> None:
        services.finish_attempt(
            job_id=job_id,
            attempt=attempt,
            outcome=outcome,
            gpu_ms=heartbeat.gpu_ms() if gpu_ms is None else gpu_ms,
            cold_start_ms=cold_start_ms,
            **fields,
        )

    try:
        loaded = pipeline_cache().get(weights_source(job.endpoint), job.endpoint.kind)
        cold_start_ms = loaded.load_ms
        if not loaded.cache_hit:
            services.log_job(job.id, f"Model loaded in {cold_start_ms} ms (cold start).", source="worker")
        request = generation_request(job)
        heartbeat.gpu_started = time.perf_counter()
        result = run_pipeline(
            loaded.pipeline, request, on_step=heartbeat.progress, should_cancel=heartbeat.should_cancel
        )
        images = [encode_image(image, job.input["output_format"]) for image in result.images]
        stored = files.inline_outputs(images) if job.input.get("sync_mode") else files.save_outputs(job, images)
        finish(
            AttemptOutcome.SUCCEEDED,
            result={
                "images": stored,
                "seed": job.input["seed"],
                "timings": {"inference": round(result.run_ms / 1000, 4)},
                "has_nsfw_concepts": [False] * len(stored),
                "prompt": job.input["prompt"],
            },
        )
    except Cancelled as cancelled:
        error_type = heartbeat.stop_error_type or "cancelled"
        reason = heartbeat.stop_reason or "Cancelled by request."
        if error_type == "lost":
            logger.warning("job %s attempt %s lost its lease; dropping its work", job_id, attempt)
            return
        finish(
            AttemptOutcome.CANCELLED,
            error=f"{reason} Stopped after step {cancelled.steps_done} of {cancelled.total_steps}.",
            error_type=error_type,
        )
    except InputProblem as problem:
        finish(AttemptOutcome.FAILED, error=str(problem), error_type=problem.error_type)
    except SoftTimeLimitExceeded:
        finish(AttemptOutcome.ERRORED, error="The request ran past the worker's time limit.", error_type="timeout")
    except ModelSourceError as exc:
        # A registry entry whose weights cannot be loaded: retrying will not help.
        logger.error("job %s: model %s cannot be loaded: %s", job_id, job.endpoint.weights, exc)
        finish(
            AttemptOutcome.ERRORED,
            gpu_ms=0,
            error="The model of this endpoint is not available on the worker.",
            error_type="model_unavailable",
        )
    except Exception as exc:
        # The platform's fault (a crash, out of memory): not billed, and retried while attempts remain.
        logger.exception("job %s attempt %s failed", job_id, attempt)
        finish(
            AttemptOutcome.ERRORED,
            error=f"Internal error: {type(exc).__name__}.",
            error_type="internal_error",
            retry=True,
        )
    finally:
        heartbeat.stop()


def generation_request(job: Job) -> GenerationRequest:
    spec: dict[str, Any] = job.input
    init_image = None
    strength = 0.8
    if job.endpoint.kind == PipelineKind.IMAGE_TO_IMAGE:
        init_image = load_input_image(job)
        strength = float(spec["strength"])
    return GenerationRequest(
        prompts=[spec["prompt"]] * len(spec["seeds"]),
        seeds=list(spec["seeds"]),
        width=int(spec["width"]),
        height=int(spec["height"]),
        num_inference_steps=int(spec["num_inference_steps"]),
        guidance_scale=float(spec["guidance_scale"]),
        negative_prompt=spec.get("negative_prompt") or "",
        init_image=init_image,
        strength=strength,
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
    try:
        with Image.open(BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception:  # Pillow raises many kinds for a bad file: all are the input's fault
        raise InputProblem("image_url does not hold a readable image.", "image_load_error") from None
