"""fal's streaming API: ``POST /run/{owner}/{model}[/{path}]/stream``, and the same under ``/queue/``.

fal's clients call it with ``fal_client.stream(...)`` (Python: ``https://{FAL_RUN_HOST}/{app}/stream``) and
``fal.stream(...)`` (JavaScript: ``https://fal.run/{app}/stream``, through the proxy). The request is submitted as the
queue and sync APIs submit it, by the same DRF view work (the key, its scope and rate limit, the input, idempotency,
credit): every refusal is the usual JSON error with its status, answered before any event. Then the answer is
server-sent events, one JSON object per ``data:`` line, until the request is final:

- ``{"type": "status", ...fal's status object}``: whenever the status, queue position or progress changes or new log
  lines come, with only the lines new since the event before (the worker writes "Step k/n" lines as it goes);
- ``{"type": "preview", "request_id", "status": "IN_PROGRESS", "progress": {"step", "total"}, "images": [...]}``:
  every ``STREAM_PREVIEW_EVERY_STEPS`` steps, a picture of each image's latents (``inference.engine.previews``) as
  fal image objects with JPEG data URIs. Previews travel through the shared cache (``inference.previews``): without
  Redis a stream has status events and the output, but no previews;
- last, for a request that produced its output, a ``status`` event saying COMPLETED and then the output exactly as
  the result URL renders it (with its ``usage``): what ``fal.stream(...).done()`` resolves to, and the last event
  ``fal_client.stream`` yields;
- or, for a request that ended without an output (failed, cancelled, timed out), one last event
  ``{"type": "error", ...the COMPLETED status object (error, error_type, usage), "detail", "status_code"}``, with the
  body and HTTP status its result URL answers. Neither client raises on an event: a caller checks ``type``.

A key holds at most ``STREAMS_PER_API_KEY`` streams open at once (this and the status stream together): one more is
refused 429 ``too_many_streams`` before its request is submitted. A stream open for ``STREAM_MAX_SECONDS`` ends with
one last event, ``{"type": "reconnect", ...the status object}``, its request going on (``inference.stream_limits``).

A client that disconnects leaves the request running (and billed, as a sync run's is); its result stays at its
queue URLs. The view waits without holding a thread: it looks at the job at each of its moves (``job_events``), on the
event loop's shared threads (``inference.api.run_before_waiting``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Any

from django.db import connection
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.views.decorators.csrf import csrf_exempt
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.permissions import request_api_key
from inference import job_events, stream_limits
from inference.api import (
    SubmitView,
    find_endpoint,
    handle_payload,
    key_still_accepted,
    look_in_shared_threads,
    result_body,
    run_before_waiting,
    submit_from_request,
    with_request_id,
)
from inference.models import Job, JobStatus
from inference.presenters import logs_after, progress_of, status_payload, usage_of
from inference.previews import latest_preview

KEEP_ALIVE_SECONDS = 10.0


class JsonWhateverAccepted(DefaultContentNegotiation):
    """The stream's submission answers JSON (its refusals are what the client sees) whatever ``Accept`` says: the
    clients ask for ``text/event-stream`` alone, which no DRF renderer serves."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


class StreamSubmitView(SubmitView):
    """The queue API's submission, for a request whose progress is streamed: the worker draws its previews."""

    content_negotiation_class = JsonWhateverAccepted

    def post(self, request: Request, owner: str, model: str, path: str = "") -> HttpResponse:
        endpoint = find_endpoint(owner, model, path)
        api_key = request_api_key(request)
        # Before anything is submitted: a stream refused for the key's cap leaves no request running unwatched.
        slot = stream_limits.take_slot(stream_limits.api_key_holder(api_key))
        try:
            job, created = submit_from_request(request, api_key, endpoint, request.data, previews=True)
            response = Submitted(handle_payload(job, request), slot=slot)
        except BaseException:
            slot.release()
            raise
        if not created:
            response["Idempotent-Replayed"] = "true"
        return with_request_id(response, job)


class Submitted(Response):
    """The stream's submission, with the slot its stream holds under the key's cap."""

    def __init__(self, data: dict[str, Any], *, slot: stream_limits.Slot) -> None:
        super().__init__(data)
        self.slot = slot


def _release_slot_of(submitted: HttpResponseBase) -> None:
    """A submission whose stream will never be sent (its client went while it ran) gives its slot back."""
    if isinstance(submitted, Submitted):
        submitted.slot.release()


stream_submit_view = StreamSubmitView.as_view()


@csrf_exempt
async def run_stream(request: HttpRequest, owner: str, model: str, path: str = "") -> HttpResponseBase:
    """Submits the request, then streams its progress, previews and output (see the module's docstring)."""
    # The submission takes the stream's slot: a client gone while it runs does not leave the slot held.
    submitted = await stream_limits.finish_or_undo(
        run_before_waiting(stream_submit_view, request, owner=owner, model=model, path=path), undo=_release_slot_of
    )
    if submitted.status_code != 200 or not isinstance(submitted, Submitted):
        return submitted
    job_id = uuid.UUID(submitted.data["request_id"])
    response = stream_limits.EventStream(_events(job_id, request), slot=submitted.slot, job_id=job_id, request=request)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    response["x-fal-request-id"] = str(job_id)
    if submitted.get("Idempotent-Replayed"):
        response["Idempotent-Replayed"] = "true"
    return response


@dataclass
class _Look:
    """What one look at the job found: the events to send, and where the next look starts."""

    events: list[dict[str, Any]]
    last_log_id: int
    state: str
    preview_step: int
    final: bool


def _look(job_id: uuid.UUID, request: HttpRequest, *, last_log_id: int, state: str, preview_step: int) -> _Look:
    """The events since the last look (its log cursor, status and preview step), from one short database visit."""
    try:
        job = Job.objects.select_related("endpoint").get(pk=job_id)
        logs, last_log_id = logs_after(job, last_log_id)
        events: list[dict[str, Any]] = []
        if job.is_final:
            usage = usage_of(job)
            status_code, body = result_body(job, request, usage)
            payload = status_payload(job, request, with_logs=True, logs=logs)
            if job.status == JobStatus.COMPLETED:
                events += [{"type": "status", **payload}, body]
            else:
                events.append({"type": "error", **payload, "detail": body["detail"], "status_code": status_code})
            return _Look(events, last_log_id, state, preview_step, final=True)
        payload = status_payload(job, request, with_logs=True, logs=logs)
        now = json.dumps({**payload, "logs": None}, sort_keys=True)
        if now != state or logs:
            events.append({"type": "status", **payload})
        preview = latest_preview(job.id) if job.status == JobStatus.RUNNING else None
        if preview is not None and int(preview.get("step", 0)) > preview_step:
            preview_step = int(preview["step"])
            progress = {"step": preview_step, "total": int(preview.get("total") or progress_of(job)["total"])}
            events.append(
                {
                    "type": "preview",
                    "request_id": str(job.id),
                    "status": "IN_PROGRESS",
                    "progress": progress,
                    "images": preview.get("images") or [],
                }
            )
        return _Look(events, last_log_id, now, preview_step, final=False)
    finally:
        # A stream looks for a long time: the connection goes back to the pool after each look.
        connection.close()


async def _events(job_id: uuid.UUID, request: HttpRequest) -> AsyncGenerator[bytes, None]:
    async with job_events.watching(job_id) as watch:
        async for event in _looks(job_id, request, watch):
            yield event


async def _looks(job_id: uuid.UUID, request: HttpRequest, watch: job_events.Watch) -> AsyncGenerator[bytes, None]:
    """The stream's events until the request ends; or until the key it was opened with would no longer be let in,
    asked again every ``KEEP_ALIVE_SECONDS`` (``inference.api.status_event_stream``'s ``still_allowed``)."""
    last_log_id, state, preview_step = 0, "", 0
    quiet_since = checked_at = time.monotonic()
    still_allowed = key_still_accepted(request)
    while True:
        if time.monotonic() - checked_at >= KEEP_ALIVE_SECONDS:
            checked_at = time.monotonic()
            if not await look_in_shared_threads(still_allowed)():
                return
        look = await look_in_shared_threads(_look)(
            job_id, request, last_log_id=last_log_id, state=state, preview_step=preview_step
        )
        last_log_id, state, preview_step = look.last_log_id, look.state, look.preview_step
        for event in look.events:
            yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
        if look.events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEP_ALIVE_SECONDS:
            quiet_since = time.monotonic()
            yield b": keep-alive\n\n"
        if look.final:
            return
        await watch.changed(KEEP_ALIVE_SECONDS)
