"""fal's queue and sync APIs, and the platform's /v1/models and /v1/requests.

Submit, status, result and cancel are short DRF views. The two that wait (the status stream and
the sync run) are async views, so a waiting client holds no worker thread.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.db.models.functions import Now
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, serializers
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import authenticate_token
from accounts.errors import InvalidInput, problem
from accounts.models import ApiKey, Scope
from accounts.outages import OUTAGES, RETRY_AFTER_SECONDS, on_a_new_connection
from accounts.permissions import HasScope, request_api_key
from accounts.schema import ApiAutoSchema, error, validation_error
from config.request_threads import hand_back
from inference import endpoints, files, job_events, stream_limits
from inference.closing import cancel_job, expire_unstarted
from inference.files import MAX_RETENTION_SECONDS
from inference.hooks import hooks
from inference.inputs import InputError, input_schema, lifecycle_header_object
from inference.models import Endpoint, Job, JobStatus
from inference.presenters import (
    FAL_STATUS,
    base_url,
    handle_urls,
    logs_after,
    queue_position,
    result_error,
    status_payload,
    usage_of,
)
from inference.submission import END_USER_RULE, SubmissionRefused, submit_job, valid_end_user

T = TypeVar("T")

logger = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255
STREAM_KEEP_ALIVE_SECONDS = 15.0


class EndpointNotFound(exceptions.NotFound):
    default_code = "endpoint_not_found"


class RequestNotFound(exceptions.NotFound):
    default_detail = "Request not found."
    default_code = "request_not_found"


def find_endpoint(owner: str, model: str, path: str = "") -> Endpoint:
    """The active endpoint served at ``owner/model[/path]``, from this process's memory while no endpoint changed."""
    endpoint = endpoints.active_by_path(owner, model, path)
    if endpoint is None:
        name = f"{owner}/{model}" + (f"/{path}" if path else "")
        raise EndpointNotFound(f"Unknown endpoint {name}.")
    return endpoint


def find_job(organization_id: uuid.UUID, owner: str, model: str, request_id: str) -> Job:
    """A request of this organization on this app, or 404 (never 403: ids do not leak)."""
    try:
        job_id = uuid.UUID(request_id)
    except ValueError:
        raise RequestNotFound() from None
    job = (
        Job.objects.select_related("endpoint")
        .filter(pk=job_id, organization_id=organization_id, endpoint__owner=owner, endpoint__name=model)
        .first()
    )
    if job is None:
        raise RequestNotFound()
    return job


def lifecycle_seconds(header: str | None) -> int | None:
    """fal's ``X-Fal-Object-Lifecycle-Preference: {"expiration_duration_seconds": N}``."""
    if not header:
        return None
    try:
        seconds = lifecycle_header_object(header).get("expiration_duration_seconds")
    except ValueError as refusal:
        raise InputError(
            [{"loc": ["header", "X-Fal-Object-Lifecycle-Preference"], "msg": str(refusal), "type": "json"}]
        ) from None
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 60 <= seconds <= MAX_RETENTION_SECONDS:
        raise InputError(
            [
                {
                    "loc": ["header", "X-Fal-Object-Lifecycle-Preference", "expiration_duration_seconds"],
                    "msg": f"Should be an integer from 60 to {MAX_RETENTION_SECONDS} seconds.",
                    "type": "out_of_range",
                }
            ]
        )
    return seconds


MIN_START_TIMEOUT_SECONDS = 0.1
MAX_START_TIMEOUT_SECONDS = 24 * 3600


def start_timeout_seconds(header: str | None) -> float | None:
    """fal's ``X-Fal-Request-Timeout: N``: the request must start within N seconds (queue wait included)."""
    if header is None or not header.strip():
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not MIN_START_TIMEOUT_SECONDS < seconds <= MAX_START_TIMEOUT_SECONDS:  # also refuses nan and inf
        raise InputError(
            [
                problem(
                    ["header", "X-Fal-Request-Timeout"],
                    f"Should be a number of seconds above {MIN_START_TIMEOUT_SECONDS} and at most "
                    f"{MAX_START_TIMEOUT_SECONDS}.",
                    "out_of_range",
                )
            ]
        )
    return seconds


END_USER_HEADER = "X-Fal-End-User"


def end_user_tag(header: str | None) -> str:
    """The ``X-Fal-End-User`` header: the end user or project a request is for (empty: untagged).

    A header, not a body field: the body is the model's input, which fal's clients send as it is; every fal client
    can add a header (Python's ``headers=``; JavaScript's ``requestMiddleware``), and fal's server proxy forwards
    ``x-fal-*`` headers only.
    """
    tag = (header or "").strip()
    if tag and not valid_end_user(tag):
        raise InputError([problem(["header", END_USER_HEADER], f"Should be {END_USER_RULE}", "invalid_end_user")])
    return tag


def submit_from_request(
    request: HttpRequest, api_key: ApiKey, endpoint: Endpoint, payload: Any, *, previews: bool = False
) -> tuple[Job, bool]:
    """Shared by the queue, sync and streaming APIs: webhook, idempotency key and retention from the request.
    ``previews``: the worker draws previews of the request while it runs (the streaming API)."""
    if len(request.GET.getlist("fal_webhook")) > 1:
        raise InputError([problem(["query", "fal_webhook"], "Give this parameter once.", "duplicate")])
    webhook_url = request.GET.get("fal_webhook", "")
    webhook_loc: list[str | int] = ["query", "fal_webhook"]
    if isinstance(payload, dict) and "webhook_url" in payload:
        payload = dict(payload)
        body_webhook = payload.pop("webhook_url")
        if not isinstance(body_webhook, str):
            raise InputError([{"loc": ["body", "webhook_url"], "msg": "Should be a URL.", "type": "url_type"}])
        if not webhook_url:
            webhook_url, webhook_loc = body_webhook, ["body", "webhook_url"]
    idempotency_key = request.headers.get("Idempotency-Key") or None
    if idempotency_key and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise InputError(
            [{"loc": ["header", "Idempotency-Key"], "msg": "At most 255 characters.", "type": "string_too_long"}]
        )
    try:
        return submit_job(
            organization=api_key.organization,
            api_key=api_key,
            endpoint=endpoint,
            payload=payload,
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
            retention_seconds=lifecycle_seconds(request.headers.get("X-Fal-Object-Lifecycle-Preference")),
            start_timeout=start_timeout_seconds(request.headers.get("X-Fal-Request-Timeout")),
            base_url=base_url(request),
            previews=previews,
            end_user=end_user_tag(request.headers.get(END_USER_HEADER)),
        )
    except SubmissionRefused as exc:
        if exc.status_code != 422:
            raise
        # The service names the rule; only the request knows where the refused value was written.
        locations: dict[str, list[str | int]] = {
            "invalid_webhook_url": webhook_loc,
            "idempotency_key_reused": ["header", "Idempotency-Key"],
            "invalid_end_user": ["header", END_USER_HEADER],
        }
        loc = locations.get(exc.error_type, ["body"])
        raise InvalidInput([problem(loc, str(exc), exc.error_type)], error_type=exc.error_type) from None


def handle_payload(job: Job, request: HttpRequest) -> dict[str, Any]:
    """The submit answer; an idempotent replay reports the request as it is now. ``gateway_request_id`` is fal's
    id of the request's last try; a retried request keeps its id here, so the two are the same."""
    return {
        "request_id": str(job.id),
        "gateway_request_id": str(job.id),
        **handle_urls(job, request),
        "status": FAL_STATUS[JobStatus(job.status)],
        "queue_position": queue_position(job) if job.position_when_submitted is None else job.position_when_submitted,
    }


def with_request_id(response: HttpResponse, job: Job | None) -> HttpResponse:
    if job is not None:
        response["x-fal-request-id"] = str(job.id)
    return response


class InferenceView(APIView):
    permission_classes = (IsAuthenticated, HasScope)
    required_scope = Scope.INFERENCE
    schema = ApiAutoSchema()


class QueueHandle(serializers.Serializer[Any]):
    request_id = serializers.UUIDField()
    gateway_request_id = serializers.UUIDField()
    response_url = serializers.URLField()
    status_url = serializers.URLField()
    cancel_url = serializers.URLField()
    status = serializers.ChoiceField(choices=["IN_QUEUE", "IN_PROGRESS", "COMPLETED"])
    queue_position = serializers.IntegerField(min_value=0)


class QueueStatus(serializers.Serializer[Any]):
    """fal's status object; ``queue_position`` while queued, ``progress`` while running, ``error`` once done."""

    status = serializers.ChoiceField(choices=["IN_QUEUE", "IN_PROGRESS", "COMPLETED"])
    request_id = serializers.UUIDField()
    response_url = serializers.URLField()
    status_url = serializers.URLField()
    cancel_url = serializers.URLField()
    logs = serializers.ListField(child=serializers.DictField(), allow_null=True)
    usage = serializers.DictField(allow_null=True, help_text="Null until the request has finished.")


class CancelOutcome(serializers.Serializer[Any]):
    status = serializers.ChoiceField(choices=["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"])


SUBMIT_PARAMETERS = [
    OpenApiParameter("fal_webhook", str, OpenApiParameter.QUERY, description="POSTed the result when it is done."),
    OpenApiParameter(
        "Idempotency-Key",
        str,
        OpenApiParameter.HEADER,
        description="A retry with the same key and body answers the first request (at most 255 characters).",
    ),
    OpenApiParameter(
        "X-Fal-Object-Lifecycle-Preference",
        str,
        OpenApiParameter.HEADER,
        description='How long outputs are kept: `{"expiration_duration_seconds": N}`.',
    ),
    OpenApiParameter(
        END_USER_HEADER,
        str,
        OpenApiParameter.HEADER,
        description="The end user or project the request is for (a reseller's own user): usage is grouped and "
        f"exported by it, and held to its monthly limit (402 `end_user_limit_exceeded`). {END_USER_RULE}",
    ),
]
REFUSED = error(
    "Not enough credit (`insufficient_credits`), over a spend limit (`spend_limit_exceeded`), or over the end "
    "user's monthly limit (`end_user_limit_exceeded`)."
)


class SubmitView(InferenceView):
    @extend_schema(
        request={"application/json": OpenApiTypes.OBJECT},
        parameters=SUBMIT_PARAMETERS,
        responses={
            200: QueueHandle,
            402: REFUSED,
            404: error("No such endpoint (`endpoint_not_found`)."),
            413: error("An inline image over the endpoint's limit."),
            422: validation_error("Refused input (the endpoint's `input_schema` at /v1/models), webhook or header."),
        },
        summary="Queue a request (fal's queue API)",
    )
    def post(self, request: Request, owner: str, model: str, path: str = "") -> HttpResponse:
        endpoint = find_endpoint(owner, model, path)
        job, created = submit_from_request(request, request_api_key(request), endpoint, request.data)
        response = Response(handle_payload(job, request))
        if not created:
            response["Idempotent-Replayed"] = "true"
        return with_request_id(response, job)


def wants_logs(request: HttpRequest) -> bool:
    # fal's client sends logs=true/false; the docs say logs=1.
    return request.GET.get("logs", "").lower() in ("1", "true", "yes")


class StatusView(InferenceView):
    @extend_schema(
        parameters=[OpenApiParameter("logs", str, OpenApiParameter.QUERY, description="`1` or `true`: with logs.")],
        responses={200: QueueStatus, 404: error("No such request of this organization (`request_not_found`).")},
        summary="A request's status",
    )
    def get(self, request: Request, owner: str, model: str, request_id: str) -> HttpResponse:
        job = find_job(request_api_key(request).organization_id, owner, model, request_id)
        return with_request_id(Response(status_payload(job, request, with_logs=wants_logs(request))), job)


def result_body(job: Job, request: HttpRequest, usage: Any) -> tuple[int, dict[str, Any]]:
    """What a final request's result URL answers: its HTTP status and body (the output with its ``usage``, or the
    error it ended with)."""
    if job.status != JobStatus.COMPLETED:
        status, body = result_error(job)
        if status == 422:  # the worker could not use an input (image_url): located as every 422 is
            body = {**body, "detail": [problem(["body", "image_url"], body["detail"], body["error_type"])]}
        return status, body
    return 200, {**(files.render_result(job, base_url=base_url(request)) or {}), "usage": usage}


def result_response(job: Job, request: HttpRequest, *, sync_run: bool = False) -> JsonResponse:
    """The result URL's answer; a sync run's timeout also says which request it was (``request_id``), as fal's does."""
    usage = usage_of(job)
    status, body = result_body(job, request, usage)
    if sync_run and job.error_type == "timeout":
        body = {**body, "request_id": str(job.id)}
    response = JsonResponse(body, status=status)
    # A cancelled request is billed for the time it ran: its error answer carries the cost too.
    if usage:
        response["x-fal-billable-units"] = response["x-billable-units"] = str(usage.get("billable_units", ""))
        response["x-cost-micros"] = str(usage.get("cost_micros", ""))
    response["x-gpu-ms"] = str(job.gpu_ms)
    if job.error_type == "timeout":
        # fal's mark of a timeout the caller set (X-Fal-Request-Timeout), which its clients never resend: a retry that
        # missed the deadline too, after an attempt that started, is the caller's timeout as well.
        response["X-Fal-Request-Timeout-Type"] = "user"
    return response


class ResultView(InferenceView):
    @extend_schema(
        responses={
            200: OpenApiResponse(OpenApiTypes.OBJECT, description="The model's output, with its `usage`."),
            400: error("Still in progress (`request_in_progress`), or cancelled (`cancelled`)."),
            402: REFUSED,
            404: error("No such request of this organization (`request_not_found`)."),
            413: error("The request's input image was too large (`image_too_large`)."),
            422: validation_error("The request's input could not be used (`image_load_error`)."),
            500: error("The request failed through the platform's fault (`internal_error`); it was not billed."),
            503: error("The model could not be loaded (`model_unavailable`)."),
            504: error("The request ran past its time limit (`timeout`)."),
        },
        summary="A finished request's output, or the error it ended with",
    )
    def get(self, request: Request, owner: str, model: str, request_id: str) -> HttpResponse:
        job = find_job(request_api_key(request).organization_id, owner, model, request_id)
        if not job.is_final:
            response = JsonResponse(
                {"detail": "The request is still in progress.", "error_type": "request_in_progress"}, status=400
            )
        else:
            response = result_response(job, request)
        return with_request_id(response, job)


class CancelView(InferenceView):
    @extend_schema(
        request=None,
        responses={
            202: OpenApiResponse(
                CancelOutcome,
                description="`CANCELLATION_REQUESTED`, for the first cancel of it and every one after (a retry whose "
                "first answer was lost hears the same).",
            ),
            400: OpenApiResponse(CancelOutcome, description="`ALREADY_COMPLETED`: it ended with no cancel."),
            404: error("`status: NOT_FOUND` for an unknown request, besides `detail` and `error_type`."),
        },
        summary="Cancel a request",
    )
    def put(self, request: Request, owner: str, model: str, request_id: str) -> HttpResponse:
        try:
            job = find_job(request_api_key(request).organization_id, owner, model, request_id)
        except RequestNotFound:
            return JsonResponse(
                {"status": "NOT_FOUND", "detail": "Request not found.", "error_type": "request_not_found"}, status=404
            )
        try:
            outcome = cancel_job(job=job)
        except (OperationalError, InterfaceError):
            if connection.in_atomic_block:
                raise
            # It may have committed with its answer lost: sent again on a new connection, a cancel answers as the
            # first did (``cancel_job``), and does it where the first did not. A database still gone answers 503.
            outcome = on_a_new_connection(lambda: cancel_job(job=job))
        return with_request_id(
            JsonResponse({"status": outcome}, status=202 if outcome == "CANCELLATION_REQUESTED" else 400), job
        )


# The waiting views are async, so a waiting client holds no thread. What they do before they wait is a DRF view's work
# (the API key, its scope and rate limit, parsing, the submit or the lookup, every error answer): they run that view,
# in one hop to the request's thread as Django runs a sync view, and wait only once it has answered 200.
#
# Each request has a thread of its own for its sync calls (config/request_threads.py), kept until the request ends: a
# waiting request would keep one idle thread each. So once the view before the wait has answered, a waiting view hands
# that thread back (``config.request_threads.hand_back``), and its looks at the job run on the event loop's shared
# executor (asyncio's default: at most min(32, cores + 4) threads), each giving its database connection back to the
# pool. Between two looks a waiting request holds no thread and no connection.
submit_view = SubmitView.as_view()
status_view = StatusView.as_view()


def release_connection() -> None:
    """Gives this thread's database connection back (to the pool, or closed), for a view that waits: after each of its
    looks at the database, so that its waiting holds no connection. Inside a transaction (a test's) it stays."""
    if not connection.in_atomic_block:
        connection.close()


async def run_before_waiting(view: Callable[..., Any], request: HttpRequest, **kwargs: str) -> Any:
    """``view(request, **kwargs)`` in the request's thread, then that thread and its connection handed back: the wait
    that follows holds neither. The DRF view's response, rendered later by Django if it is returned as it is."""

    def run() -> Any:
        try:
            return view(request, **kwargs)
        finally:
            release_connection()

    response = await sync_to_async(run)()
    hand_back()
    return response


def look_in_shared_threads(func: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """``func`` (a short look at the database that gives its connection back) run on the event loop's shared
    executor, not the request's own thread."""
    return sync_to_async(func, thread_sensitive=False)


def _load_job(job_id: uuid.UUID) -> Job:
    """The job, with a reading of the database's clock taken in the same query (``database_now``): its start deadline
    is written and compared by that clock (``inference.submission._start_deadline``), so a wait measures the time
    left to it against that reading, not this host's clock."""
    try:
        return Job.objects.select_related("endpoint").annotate(database_now=Now()).get(pk=job_id)
    finally:
        release_connection()


def _status_now(job: Job, request: HttpRequest, with_logs: bool, last_log_id: int) -> tuple[dict[str, Any], int]:
    """The status object with the log lines written after ``last_log_id`` only, and the id of the last line."""
    try:
        logs, last_log_id = logs_after(job, last_log_id) if with_logs else ([], last_log_id)
        return status_payload(job, request, with_logs=with_logs, logs=logs), last_log_id
    finally:
        release_connection()


def latest_end(job: Job) -> datetime | None:
    """The moment by which the request's own limits have ended it, if they do: None for a request with no start
    deadline, which may wait in its queue for as long as its organization's concurrency keeps it there.

    A request with ``X-Fal-Request-Timeout`` starts its last attempt by its start deadline (an attempt failing after
    it is not retried, a retry not started by then ends as a timeout); an attempt runs at most the worker's hard time
    limit (``CELERY_TASK_TIME_LIMIT``); an attempt whose worker died is closed once its lease lapses and the sweep
    passes (``JOB_LEASE_SECONDS`` + ``JOB_SWEEP_SECONDS``).
    """
    if job.start_deadline is None:
        return None
    run_limit = settings.CELERY_TASK_TIME_LIMIT + settings.JOB_LEASE_SECONDS + settings.JOB_SWEEP_SECONDS
    return job.start_deadline + timedelta(seconds=run_limit)


def wait_deadline(job: Job, ceiling: float) -> float:
    """When a sync run stops waiting for ``job`` (``time.monotonic()``): once the request's own limits have ended it
    (``latest_end``), and at ``ceiling`` (the server's ``SYNC_RUN_TIMEOUT_SECONDS``) at the latest."""
    end = latest_end(job)
    if end is None:
        return ceiling
    return min(ceiling, time.monotonic() + (end - _database_now(job)).total_seconds())


def _database_now(job: Job) -> datetime:
    """The database's clock as ``_load_job`` read it with ``job`` (this host's where it was loaded otherwise)."""
    return getattr(job, "database_now", None) or timezone.now()


async def wait_until_final(job_id: uuid.UUID, ceiling: float) -> Job:
    """The job once it is final, or as it is when its wait deadline passes (``wait_deadline``: its own limits, then
    ``ceiling``, a ``time.monotonic()`` moment).

    It wakes on the job's own moves (``job_events``), so the answer leaves as soon as the job ends, and holds no
    thread while it waits. A request whose start deadline passes while it waits is ended at that moment.
    """
    async with job_events.watching(job_id) as watch:
        job = await look_in_shared_threads(_load_job)(job_id)
        deadline = wait_deadline(job, ceiling)
        while not job.is_final and time.monotonic() < deadline:
            wake_at = deadline
            if job.start_deadline is not None and job.status in (JobStatus.QUEUED, JobStatus.DISPATCHED):
                until_start_deadline = (job.start_deadline - _database_now(job)).total_seconds()
                if until_start_deadline <= 0:
                    await look_in_shared_threads(_expire_now)(job_id)
                    job = await look_in_shared_threads(_load_job)(job_id)
                    continue
                wake_at = min(wake_at, time.monotonic() + until_start_deadline)
            await watch.changed(wake_at - time.monotonic())
            job = await look_in_shared_threads(_load_job)(job_id)
    return job


def _expire_now(job_id: uuid.UUID) -> None:
    try:
        expire_unstarted(job_id=job_id)
    finally:
        release_connection()


def timed_out(job: Job, request: HttpRequest, waited_seconds: float) -> JsonResponse:
    """The sync run's answer when its wait ends first: the request's result (or error) will be at its URL.

    Marked ``X-Fal-Request-Timeout-Type: user``, the one mark fal's clients read as "do not send this again":
    ``@fal-ai/client`` resends any other 504, and since the request goes on, each resend would be a second request,
    run and billed again.
    """
    response = JsonResponse(
        {
            "detail": f"The request did not finish within the {waited_seconds:.0f} s this run waited for it. It goes "
            "on; its result will be at response_url.",
            "error_type": "timeout",
            "request_id": str(job.id),
            **handle_urls(job, request),
        },
        status=504,
    )
    response["X-Fal-Request-Timeout-Type"] = "user"
    return response


@csrf_exempt
async def run_sync(request: HttpRequest, owner: str, model: str, path: str = "") -> HttpResponseBase:
    """``POST /run/{owner}/{model}``: submits as the queue API does, then answers the request's result (or the error
    it ended with) once it is final.

    It never answers a queue handle as if it were the output. It waits for as long as the request's own limits let it
    run (``latest_end``: its ``X-Fal-Request-Timeout`` start deadline plus the longest an attempt may take), at most
    ``SYNC_RUN_TIMEOUT_SECONDS``; a request with no start deadline waits that long. Past it, the answer is 504
    ``{detail, error_type: "timeout", request_id}``: the request goes on, is billed as usual, and its result stays at
    the queue's response URL. A client that disconnects changes nothing either. A request with
    ``X-Fal-Request-Timeout`` that has not started by its deadline ends unbilled. Both 504s carry
    ``X-Fal-Request-Timeout-Type: user``, so fal's clients never resend the request. A database or Redis that fails
    while it waits answers 503 ``service_unavailable`` naming the request, which goes on (``lost_while_waiting``).
    """
    submitted = await run_before_waiting(submit_view, request, owner=owner, model=model, path=path)
    if submitted.status_code != 200:
        return submitted
    began = time.monotonic()
    try:
        job = await wait_until_final(uuid.UUID(submitted.data["request_id"]), began + settings.SYNC_RUN_TIMEOUT_SECONDS)
        if job.is_final:
            response = await look_in_shared_threads(_answer_final)(job, request)
        else:
            response = timed_out(job, request, time.monotonic() - began)
    except OUTAGES as error:
        return lost_while_waiting(submitted.data, error)
    return with_request_id(response, job)


def lost_while_waiting(handle: dict[str, Any], error: BaseException) -> JsonResponse:
    """A sync run's answer when the database or Redis failed while it waited: the request was accepted and goes on
    (billed as usual), so the answer names it and where its result will be, and says not to send it again. 503 with
    ``Retry-After`` for the result URL; it carries ``x-fal-request-id``, which fal's clients read as the server's own
    answer, never resent."""
    logger.error("sync run %s: lost its database while waiting: %s", handle["request_id"], error, exc_info=error)
    response = JsonResponse(
        {
            "detail": "The request was accepted and goes on, but a service this run waits through could not be "
            "reached. Do not send it again: its result will be at response_url.",
            "error_type": "service_unavailable",
            "request_id": handle["request_id"],
            **{name: handle[name] for name in ("response_url", "status_url", "cancel_url")},
        },
        status=503,
    )
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    response["x-fal-request-id"] = handle["request_id"]
    return response


def _answer_final(job: Job, request: HttpRequest) -> JsonResponse:
    try:
        return result_response(job, request, sync_run=True)
    finally:
        release_connection()


@csrf_exempt
async def status_stream(request: HttpRequest, owner: str, model: str, request_id: str) -> HttpResponseBase:
    """Server-sent events: one ``data:`` line of the status object whenever it changes (progress:
    step k of n), until the request is COMPLETED."""
    found = await run_before_waiting(status_view, request, owner=owner, model=model, request_id=request_id)
    if found.status_code != 200:
        return found
    job = await look_in_shared_threads(_load_job)(uuid.UUID(found.data["request_id"]))
    slot = await stream_limits.open_slot(stream_limits.api_key_holder_of(request))
    if not isinstance(slot, stream_limits.Slot):
        return slot  # 429: the key holds its most streams
    return status_event_stream(
        job, request, with_logs=wants_logs(request), still_allowed=key_still_accepted(request), slot=slot
    )


def key_still_accepted(request: HttpRequest) -> Callable[[], bool]:
    """Whether the key the stream was opened with would still be let into the view that opened it: not revoked, not
    expired, its organization not suspended, its maker still a member (``authenticate_token``, from the key cache as
    any request), and the view's ``inference`` scope still granted by its maker's role (a developer made a billing
    member keeps their keys, but not the power to run models or watch requests with them)."""
    token = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")[2]

    def accepted() -> bool:
        try:
            return authenticate_token(token).has_scope(InferenceView.required_scope)
        except exceptions.APIException:
            return False
        finally:
            release_connection()

    return accepted


def status_event_stream(
    job: Job,
    request: HttpRequest,
    *,
    with_logs: bool,
    slot: stream_limits.Slot,
    still_allowed: Callable[[], bool] | None = None,
) -> StreamingHttpResponse:
    """The SSE response of a request's status, shared by the queue API and the dashboard.

    An event is sent when the status changes or new log lines come, and carries only the lines that are new since
    the event before (fal's JavaScript client appends each event's ``logs`` to what it has; the polled status
    endpoint answers all of them).

    The view gives its connection back before it returns this (``release_connection``). The stream hands the
    request's thread back as it begins, once the middleware has run there too (the dashboard's session and messages
    hop to it after the view): while the page stays open it holds neither.

    ``still_allowed``: asked again every ``STREAM_KEEP_ALIVE_SECONDS`` while the stream is open (the caller's key
    or session checked once, at its start, would otherwise go on being answered after it was revoked, for as long
    as the request waits); the stream ends when it says no, and the client's next request is refused as usual.

    ``slot``: the stream's place under its caller's cap of open streams, given back when it ends; it ends at the
    latest at ``STREAM_MAX_SECONDS``, with a ``reconnect`` event (``inference.stream_limits``).
    """

    async def events() -> AsyncGenerator[bytes, None]:
        hand_back()
        async with job_events.watching(job.id) as watch:
            async for event in looks(watch):
                yield event

    async def looks(watch: job_events.Watch) -> AsyncIterator[bytes]:
        last = ""
        last_log_id = 0
        quiet_since = checked_at = time.monotonic()
        current = job
        while True:
            if still_allowed is not None and time.monotonic() - checked_at >= STREAM_KEEP_ALIVE_SECONDS:
                checked_at = time.monotonic()
                if not await look_in_shared_threads(still_allowed)():
                    return
            payload, last_log_id = await look_in_shared_threads(_status_now)(current, request, with_logs, last_log_id)
            state = json.dumps({**payload, "logs": None}, separators=(",", ":"))
            if state != last or payload["logs"]:
                last = state
                quiet_since = time.monotonic()
                yield f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
            elif time.monotonic() - quiet_since > STREAM_KEEP_ALIVE_SECONDS:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            if current.is_final:
                return
            await watch.changed(STREAM_KEEP_ALIVE_SECONDS)
            current = await look_in_shared_threads(_load_job)(current.id)

    response = stream_limits.EventStream(events(), slot=slot, job_id=job.id, request=request)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    response["x-fal-request-id"] = str(job.id)
    return response


# The platform API: the catalogue of models and the organization's requests.


class ModelSummary(serializers.Serializer[Any]):
    endpoint_id = serializers.CharField()
    title = serializers.CharField(allow_blank=True)
    description = serializers.CharField(allow_blank=True)
    kind = serializers.CharField()
    gpu_class = serializers.CharField()
    input_schema = serializers.DictField(help_text="JSON Schema of the input, with this endpoint's limits.")
    price = serializers.DictField(allow_null=True)


class ModelList(serializers.Serializer[Any]):
    models = ModelSummary(many=True)


class ModelsView(APIView):
    permission_classes = (AllowAny,)
    schema = ApiAutoSchema()

    @extend_schema(responses=ModelList, summary="The models this platform serves, with their inputs and prices")
    def get(self, request: Request) -> Response:
        served = Endpoint.objects.active()
        return Response(
            {
                "models": [
                    {
                        "endpoint_id": endpoint.endpoint_id,
                        "title": endpoint.title,
                        "description": endpoint.description,
                        "kind": endpoint.kind,
                        "gpu_class": endpoint.gpu_class,
                        "input_schema": input_schema(endpoint),
                        "price": hooks.price(endpoint) if hooks.price is not None else None,
                    }
                    for endpoint in served
                ]
            }
        )
