"""The streaming API (`inference.streaming`), the status stream's log lines, and what a stream shows of a job: its
progress from the claim on, "Step k/n" log lines and previews from the worker, its queue position.

The streams are read event by event while the test moves the job along through inference's services, as a worker
would (no broker: dispatch only records). Transactional: the stream looks at the job from other threads.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import AsyncClient, Client
from django.urls import resolve

from accounts.models import Organization, Scope
from billing.ledger import account_of, grant_credits
from billing.models import EntryKind
from inference import attempts, closing, streaming, worker
from inference.closing import cancel_job
from inference.dispatch import dispatch_organization
from inference.job_logs import log_job
from inference.models import AttemptOutcome, Endpoint, Job, JobStatus
from inference.presenters import logs_of
from inference.previews import PREVIEWS_FLAG, latest_preview, publish_preview
from tests.lifecycle import SMALL, submit_as

pytestmark = pytest.mark.django_db(transaction=True)

APP = "platform/tiny-sd"
EVENT_TIMEOUT = 30


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_broker(priced_without_broker: None, tenant: dict[str, Any]) -> None:
    """Dispatch marks jobs DISPATCHED and sends nothing; the tenant can pay for a few requests at once."""
    grant_credits(organization=tenant["organization"], amount_micros=50_000_000, reason="Streaming tests")
    Organization.objects.filter(pk=tenant["organization"].pk).update(concurrency_limit=20)


def auth(tenant: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Key {tenant['token']}", "Accept": "text/event-stream"}


class Events:
    """A server-sent event stream read one ``data:`` event at a time, each within ``EVENT_TIMEOUT``."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        self._chunks = aiter(content)
        self._pending = b""
        self.seen: list[dict[str, Any]] = []

    async def next(self) -> dict[str, Any]:
        while b"\n\n" not in self._pending:
            self._pending += await asyncio.wait_for(anext(self._chunks), EVENT_TIMEOUT)
        block, self._pending = self._pending.split(b"\n\n", 1)
        lines = [line for line in block.decode().splitlines() if line.startswith("data:")]
        if not lines:  # a keep-alive comment
            return await self.next()
        event: dict[str, Any] = json.loads("".join(line.removeprefix("data:") for line in lines))
        self.seen.append(event)
        return event

    async def until(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The next event ``wanted`` accepts (events before it are kept in ``seen``)."""
        while not wanted(event := await self.next()):
            pass
        return event

    async def end(self) -> None:
        """The stream ends after its last event."""
        rest = b""
        async for chunk in self._chunks:
            rest += chunk
        assert not rest.strip(b": keep-alive\n"), rest


def logged(events: list[dict[str, Any]]) -> list[str]:
    return [line["message"] for event in events for line in (event.get("logs") or [])]


@sync_to_async
def db(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    finally:
        connection.close()


def claim(job_id: str) -> Job:
    job = Job.objects.get(pk=job_id)
    claimed = attempts.claim_job(job_id=job_id, attempt=job.attempt, worker="worker-1")
    assert claimed is not None
    return claimed


def result_of(tenant: dict[str, Any], job_id: str) -> tuple[int, dict[str, Any]]:
    response = Client().get(f"/queue/{APP}/requests/{job_id}", headers={"Authorization": f"Key {tenant['token']}"})
    return response.status_code, response.json()


# Routes and the answers before any event.


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        (f"/run/{APP}/stream", {"owner": "platform", "model": "tiny-sd"}),
        (f"/run/{APP}/image-to-image/stream", {"owner": "platform", "model": "tiny-sd", "path": "image-to-image"}),
        (f"/queue/{APP}/stream", {"owner": "platform", "model": "tiny-sd"}),
        (f"/queue/{APP}/image-to-image/stream", {"owner": "platform", "model": "tiny-sd", "path": "image-to-image"}),
    ],
)
def test_stream_routes_come_before_sub_paths(url: str, kwargs: dict[str, str]) -> None:
    match = resolve(url)
    assert match.func is streaming.run_stream
    assert match.kwargs == kwargs


def test_no_endpoint_can_take_stream_as_its_sub_path(builtin_endpoint: Endpoint) -> None:
    endpoint = Endpoint(owner="acme", name="model", path="stream", kind="text-to-image", weights="builtin:tiny-sd")
    with pytest.raises(ValidationError) as refused:
        endpoint.full_clean()
    assert "path" in refused.value.message_dict


def test_refusals_are_json_errors_with_their_status_before_any_event(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, make_key: Any
) -> None:
    client = Client()
    headers = auth(tenant)

    def post(url: str, body: Any, **extra: str) -> Any:
        response = client.post(url, json.dumps(body), content_type="application/json", headers={**headers, **extra})
        assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
        assert not response.streaming
        return response

    anonymous = client.post(f"/run/{APP}/stream", SMALL, content_type="application/json")
    assert anonymous.status_code == 401
    assert anonymous.json()["error_type"]
    unknown = post("/run/platform/no-such-model/stream", SMALL)
    assert (unknown.status_code, unknown.json()["error_type"]) == (404, "endpoint_not_found")
    invalid = post(f"/run/{APP}/stream", {"num_inference_steps": 10_000})
    assert invalid.status_code == 422
    assert {tuple(item["loc"]) for item in invalid.json()["detail"]} >= {
        ("body", "prompt"),
        ("body", "num_inference_steps"),
    }
    _, read_only = make_key(tenant["organization"], scopes=[Scope.USAGE_READ])
    forbidden = post(f"/run/{APP}/stream", SMALL, Authorization=f"Key {read_only}")
    assert forbidden.status_code == 403
    grant_credits(
        organization=tenant["organization"],
        amount_micros=-account_of(tenant["organization"]).available_micros,
        reason="test: no credit left",
        kind=EntryKind.ADJUSTMENT,
    )
    broke = post(f"/run/{APP}/stream", SMALL)
    assert (broke.status_code, broke.json()["error_type"]) == (402, "insufficient_credits")
    assert not Job.objects.exists()


# A stream from submission to output.


@pytest.mark.anyio
async def test_a_stream_shows_status_new_log_lines_previews_and_ends_with_the_output(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    body = {**SMALL, "num_inference_steps": 6, "seed": 3}
    response = await AsyncClient().post(
        f"/run/{APP}/stream", body, content_type="application/json", headers=auth(tenant)
    )
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    job_id = response["x-fal-request-id"]
    events = Events(response.streaming_content)

    first = await events.next()
    assert (first["type"], first["status"], first["request_id"]) == ("status", "IN_QUEUE", job_id)
    assert first["queue_position"] == 0
    assert logged([first]) == [f"Request queued for {APP}."]
    job = await db(Job.objects.get, pk=job_id)
    assert job.input[PREVIEWS_FLAG] is True  # the worker draws previews for this one

    await db(claim, job_id)
    started = await events.until(lambda event: event["status"] == "IN_PROGRESS")
    # The steps are known from the claim on, before the worker reports any.
    assert started["progress"] == {"step": 0, "total": 6}

    await db(attempts.heartbeat, job_id=job_id, attempt=1, step=2, total=6, gpu_ms=10)
    await db(log_job, job_id, "Step 2/6", source="worker")
    await events.until(lambda event: "Step 2/6" in logged([event]))
    assert any(event.get("progress") == {"step": 2, "total": 6} for event in events.seen)

    preview = {"step": 2, "total": 6, "images": [{"url": "data:image/jpeg;base64,AAAA", "width": 64, "height": 64}]}
    await db(publish_preview, job_id, preview)
    shown = await events.until(lambda event: event["type"] == "preview")
    assert shown == {
        "type": "preview",
        "request_id": job_id,
        "status": "IN_PROGRESS",
        "progress": {"step": 2, "total": 6},
        "images": preview["images"],
    }

    running = await db(Job.objects.get, pk=job_id)
    await db(
        closing.finish_attempt,
        job_id=job_id,
        attempt=1,
        outcome=AttemptOutcome.SUCCEEDED,
        gpu_ms=900,
        result={"images": [{"url": "data:image/png;base64,AAAA", "width": 64, "height": 64}], "seed": 3},
    )
    completed = await events.until(lambda event: event.get("status") == "COMPLETED")
    assert completed["type"] == "status"
    output = await events.next()
    await events.end()
    status_code, result = await db(result_of, tenant, job_id)
    assert status_code == 200
    assert output == result  # the last event is the output as the result URL renders it
    assert output["usage"]["gpu_ms"] == 900
    # Every log line once, in order, across the events; no preview once the stream has moved past its step.
    all_lines = await db(lambda: [line["message"] for line in logs_of(running)])
    assert logged(events.seen) == all_lines
    assert [event.get("type") for event in events.seen].count("preview") == 1


@pytest.mark.anyio
async def test_a_request_that_ends_without_output_ends_its_stream_with_an_error_event(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    response = await AsyncClient().post(
        f"/run/{APP}/stream", SMALL, content_type="application/json", headers=auth(tenant)
    )
    job_id = response["x-fal-request-id"]
    events = Events(response.streaming_content)
    await events.next()
    job = await db(claim, job_id)
    await events.until(lambda event: event["status"] == "IN_PROGRESS")
    assert await db(cancel_job, job=job) == "CANCELLATION_REQUESTED"
    await db(
        closing.finish_attempt,
        job_id=job_id,
        attempt=1,
        outcome=AttemptOutcome.CANCELLED,
        gpu_ms=300,
        error="Cancelled by request. Stopped after step 1 of 2.",
        error_type="cancelled",
    )
    last = await events.until(lambda event: event.get("status") == "COMPLETED")
    await events.end()
    status_code, body = await db(result_of, tenant, job_id)
    assert last["type"] == "error"
    assert (last["status_code"], last["detail"], last["error_type"]) == (status_code, body["detail"], "cancelled")
    assert last["error"] == body["detail"]
    assert last["usage"]["gpu_ms"] == 300  # billed for the time it ran


@pytest.mark.anyio
async def test_an_idempotent_replay_of_a_finished_request_streams_its_output_at_once(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    client = AsyncClient()
    headers = {**auth(tenant), "Idempotency-Key": "stream-once"}
    first = await client.post(f"/run/{APP}/stream", SMALL, content_type="application/json", headers=headers)
    job_id = first["x-fal-request-id"]
    await db(claim, job_id)
    await db(
        closing.finish_attempt,
        job_id=job_id, attempt=1, outcome=AttemptOutcome.SUCCEEDED, gpu_ms=500, result={"images": [], "seed": 1},
    )  # fmt: skip
    replay = await client.post(f"/run/{APP}/stream", SMALL, content_type="application/json", headers=headers)
    assert replay["x-fal-request-id"] == job_id
    assert replay["Idempotent-Replayed"] == "true"
    events = Events(replay.streaming_content)
    assert (await events.next())["status"] == "COMPLETED"
    output = await events.next()
    await events.end()
    assert output == (await db(result_of, tenant, job_id))[1]
    assert await db(Job.objects.count) == 1


# The status stream and the polled status.


@pytest.mark.anyio
async def test_status_stream_events_carry_only_new_log_lines_and_the_polled_status_all(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    job = await db(submit_as, tenant, builtin_endpoint)
    await db(dispatch_organization, tenant["organization"].pk)
    headers = {"Authorization": f"Key {tenant['token']}"}
    response = await AsyncClient().get(f"/queue/{APP}/requests/{job.id}/status/stream?logs=1", headers=headers)
    events = Events(response.streaming_content)
    await events.next()
    await db(claim, str(job.id))
    await events.until(lambda event: event["status"] == "IN_PROGRESS")
    for step in (1, 2):
        await db(log_job, job.id, f"Step {step}/2", source="worker")
        await events.until(lambda event, step=step: f"Step {step}/2" in logged([event]))
    await db(
        closing.finish_attempt, job_id=str(job.id), attempt=1, outcome=AttemptOutcome.SUCCEEDED, gpu_ms=100,
        result={"images": [], "seed": 1},
    )  # fmt: skip
    await events.until(lambda event: event["status"] == "COMPLETED")
    await events.end()
    everything = await db(lambda: [line["message"] for line in logs_of(job)])
    assert logged(events.seen) == everything  # appended as fal's JavaScript client does: each line once
    polled = await db(Client().get, f"/queue/{APP}/requests/{job.id}/status?logs=1", headers=headers)
    assert [line["message"] for line in polled.json()["logs"]] == everything


# What a worker shows of a job.


def test_submission_and_status_agree_on_the_queue_position_of_an_idle_platform(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    client = Client()
    headers = {"Authorization": f"Key {tenant['token']}"}
    submitted = client.post(f"/queue/{APP}", SMALL, content_type="application/json", headers=headers)
    handle = submitted.json()
    assert Job.objects.get(pk=handle["request_id"]).status == JobStatus.DISPATCHED  # dispatched before the answer
    assert (handle["status"], handle["queue_position"]) == ("IN_QUEUE", 0)
    status = client.get(handle["status_url"].split("testserver", 1)[-1], headers=headers).json()
    assert (status["status"], status["queue_position"]) == ("IN_QUEUE", 0)
    # A second request waits behind the first.
    second = client.post(f"/queue/{APP}", {**SMALL, "seed": 2}, content_type="application/json", headers=headers)
    assert second.json()["queue_position"] == 1


@pytest.mark.parametrize(
    ("payload", "path", "total"),
    [({"num_inference_steps": 8}, "", 8), ({"num_inference_steps": 8, "strength": 0.5}, "image-to-image", 4)],
)
def test_a_running_request_reports_its_steps_from_the_claim_on(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, payload: dict[str, Any], path: str, total: int
) -> None:
    endpoint = Endpoint.objects.get(owner="platform", name="tiny-sd", path=path)
    if path:
        payload = {**payload, "image_url": "https://example.com/input.png"}
    job = submit_as(tenant, endpoint, **payload)
    dispatch_organization(tenant["organization"].pk)
    claim(str(job.id))
    status = Client().get(f"/queue/{APP}/requests/{job.id}/status", headers={"Authorization": f"Key {tenant['token']}"})
    assert status.json()["progress"] == {"step": 0, "total": total}


def run_on_worker(tenant: dict[str, Any], endpoint: Endpoint, *, previews: bool, **payload: Any) -> Job:
    """A request submitted (through a stream when ``previews``) and run by the worker, here, on the tiny model."""
    from inference.submission import submit_job

    job, _ = submit_job(
        organization=tenant["organization"],
        api_key=tenant["api_key"],
        endpoint=endpoint,
        payload={**SMALL, **payload},
        previews=previews,
    )
    dispatch_organization(tenant["organization"].pk)
    job.refresh_from_db()
    worker.execute(str(job.id), job.attempt)
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    return job


def step_lines(job: Job) -> list[tuple[int, int]]:
    found = [re.fullmatch(r"Step (\d+)/(\d+)", line["message"]) for line in logs_of(job)]
    return [(int(match[1]), int(match[2])) for match in found if match]


@pytest.mark.parametrize(("total", "expected"), [(8, list(range(1, 9))), (1000, list(range(50, 1001, 50)))])
def test_step_log_lines_follow_every_step_of_a_short_job_and_twenty_of_a_long_one(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, total: int, expected: list[int]
) -> None:
    member = worker.Member(index=0, job=submit_as(tenant, builtin_endpoint), attempt=1)
    heartbeat = worker.Heartbeat([member])  # not started: its reports are called here, as its thread calls them
    for step in range(1, total + 1):
        heartbeat.progress(step, total)
        heartbeat.log_steps(member)
        heartbeat.log_steps(member)  # asked twice (the heartbeat and the worker at the end): written once
    assert step_lines(member.job) == [(step, total) for step in expected]


def test_a_streamed_request_on_the_worker_gets_previews_and_step_lines(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any
) -> None:
    settings.STREAM_PREVIEW_EVERY_STEPS = 2
    steps = 16
    streamed = run_on_worker(tenant, builtin_endpoint, previews=True, num_inference_steps=steps)
    preview = latest_preview(streamed.id)
    assert preview is not None
    assert preview["total"] == steps
    assert preview["step"] % 2 == 0
    assert 0 < preview["step"] < steps
    [image] = preview["images"]
    assert image["url"].startswith("data:image/jpeg;base64,")
    assert (image["width"], image["height"]) == (64, 64)
    # The heartbeat writes the steps it sees (at most four a second), the worker the last one before completing.
    lines = step_lines(streamed)
    assert [step for step, _ in lines] == sorted({step for step, _ in lines})
    assert lines[-1] == (steps, steps)
    messages = [line["message"] for line in logs_of(streamed)]
    completed = next(index for index, message in enumerate(messages) if message.startswith("Completed"))
    assert messages.index(f"Step {steps}/{steps}") < completed


def test_a_request_nobody_streams_gets_no_previews(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    quiet = run_on_worker(tenant, builtin_endpoint, previews=False, num_inference_steps=8)
    assert PREVIEWS_FLAG not in quiet.input
    assert latest_preview(quiet.id) is None
    assert step_lines(quiet)[-1] == (8, 8)


def test_no_previews_when_the_setting_is_zero(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any
) -> None:
    settings.STREAM_PREVIEW_EVERY_STEPS = 0
    job = run_on_worker(tenant, builtin_endpoint, previews=True, num_inference_steps=8)
    assert latest_preview(job.id) is None
