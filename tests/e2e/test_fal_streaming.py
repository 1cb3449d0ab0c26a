"""Streaming through the official fal-client, unmodified (its hosts from FAL_RUN_HOST and FAL_QUEUE_RUN_HOST alone):
``stream`` against ``/run/{app}/stream``, and ``subscribe`` with logs, over HTTPS with the real worker.

Previews travel through the shared cache: when the stack runs on Redis (REDIS_URL set, as in CI) a stream must carry
them; on SQLite with no Redis each process has its own memory, and the stream has status events and the output only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
import re
from typing import Any

import fal_client
import httpx_sse
import pytest
from PIL import Image

from inference.models import Job
from tests.e2e.conftest import Stack
from tests.e2e.test_fal_client import fetch_image

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

APP = "platform/tiny-sd"
# Steps long enough (attention over 32x32 latents: a few hundred ms each on a CPU) that the stream, which looks at the
# job ten times a second, and the worker's heartbeat, which publishes at most four times a second, see most of them.
STEPS = 6
STREAMED = {"prompt": "a lighthouse at dusk", "image_size": {"width": 256, "height": 256}, "num_inference_steps": STEPS}
SHARED_CACHE = bool(os.environ.get("REDIS_URL"))


@pytest.fixture
def fal(e2e_tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    monkeypatch.setenv("FAL_KEY", e2e_tenant["key"])
    return fal_client.SyncClient(key=e2e_tenant["key"])


def log_lines(events: list[dict[str, Any]]) -> list[str]:
    return [line["message"] for event in events for line in (event.get("logs") or [])]


def test_stream_yields_progress_step_logs_previews_and_the_output_last(
    stack: Stack, fal: fal_client.SyncClient
) -> None:
    events = list(fal.stream(APP, arguments={**STREAMED, "seed": 11}))
    output = events[-1]
    assert "type" not in output
    assert output["seed"] == 11
    [image] = output["images"]
    assert (image["width"], image["height"]) == (256, 256)
    assert fetch_image(stack, image["url"]).size == (256, 256)
    assert output["usage"]["gpu_ms"] > 0

    updates = events[:-1]
    assert {event["type"] for event in updates} <= {"status", "preview"}
    request_id = updates[0]["request_id"]
    assert all(event["request_id"] == request_id for event in updates)
    phases = [event["status"] for event in updates if event["type"] == "status"]
    assert phases[-1] == "COMPLETED"
    assert "IN_PROGRESS" in phases
    progress = [event["progress"] for event in updates if event["status"] == "IN_PROGRESS"]
    assert all(entry["total"] == STEPS for entry in progress)  # never 0/0, from the first IN_PROGRESS on
    # Each log line comes once, and the steps are among them.
    lines = log_lines(updates)
    assert len(lines) == len(set(lines)), lines
    steps = [int(match[1]) for line in lines if (match := re.fullmatch(rf"Step (\d+)/{STEPS}", line))]
    assert steps == sorted(set(steps))
    assert steps[-1] == STEPS
    completed = next(index for index, line in enumerate(lines) if line.startswith("Completed"))
    assert lines.index(f"Step {STEPS}/{STEPS}") < completed

    previews = [event for event in updates if event["type"] == "preview"]
    if SHARED_CACHE:
        assert previews, [(event["type"], event.get("progress"), log_lines([event])) for event in updates]
    for preview in previews:
        assert 0 < preview["progress"]["step"] < STEPS
        for shown in preview["images"]:
            header, data = shown["url"].split(",", 1)
            assert header == "data:image/jpeg;base64"
            assert Image.open(io.BytesIO(base64.b64decode(data))).size == (shown["width"], shown["height"])
    preview_steps = [preview["progress"]["step"] for preview in previews]
    assert preview_steps == sorted(set(preview_steps))


def test_a_cancelled_stream_ends_with_an_error_event(stack: Stack, fal: fal_client.SyncClient) -> None:
    long = {**STREAMED, "num_inference_steps": 50}
    events: list[dict[str, Any]] = []
    for event in fal.stream(APP, arguments=long):
        events.append(event)
        if event.get("status") == "IN_PROGRESS" and len([e for e in events if e.get("status") == "IN_PROGRESS"]) == 1:
            fal.cancel(APP, event["request_id"])
    last = events[-1]
    assert last["type"] == "error"
    assert (last["status"], last["error_type"], last["status_code"]) == ("COMPLETED", "cancelled", 400)
    assert last["error"].startswith("Cancelled by request.")
    with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
        fal.result(APP, last["request_id"])  # the result URL answers the same error
    assert raised.value.status_code == last["status_code"]


def test_stream_refusals_come_before_any_event(
    stack: Stack, fal: fal_client.SyncClient, e2e_tenant: dict[str, Any]
) -> None:
    # A JSON error, not a stream: fal's Python client reports it as a response that is not an event stream.
    with pytest.raises(httpx_sse.SSEError, match="application/json"):
        list(fal.stream(APP, arguments={"prompt": "x", "num_inference_steps": 10_000}))
    stranger = fal_client.SyncClient(key=f"{fal.key.split(':')[0]}:wrong")
    with pytest.raises(httpx_sse.SSEError, match="application/json"):
        list(stranger.stream(APP, arguments=STREAMED))
    assert not Job.objects.filter(organization=e2e_tenant["organization"]).exists()
    # What the client does not show: the status and the body.
    with stack.client(fal.key) as client:
        refused = client.post(f"/run/{APP}/stream", json={"num_inference_steps": 10_000})
    assert refused.status_code == 422
    assert ["body", "prompt"] in [item["loc"] for item in refused.json()["detail"]]
    with stack.client(stranger.key) as client:
        unauthorized = client.post(f"/run/{APP}/stream", json=STREAMED)
    assert (unauthorized.status_code, unauthorized.json()["error_type"]) == (401, "invalid_api_key")


def test_the_async_client_streams_too(stack: Stack, fal: fal_client.SyncClient) -> None:
    async def scenario() -> list[dict[str, Any]]:
        client = fal_client.AsyncClient(key=fal.key)
        return [event async for event in client.stream(APP, arguments={**STREAMED, "seed": 4})]

    events = asyncio.run(scenario())
    assert events[-1]["seed"] == 4
    assert events[-2]["status"] == "COMPLETED"


def test_subscribe_with_logs_shows_the_steps(stack: Stack, fal: fal_client.SyncClient) -> None:
    updates: list[fal_client.Status] = []
    steps = 8
    arguments = {**STREAMED, "num_inference_steps": steps}
    result = fal.subscribe(APP, arguments=arguments, with_logs=True, on_queue_update=updates.append)
    assert len(result["images"]) == 1
    in_progress = [update for update in updates if isinstance(update, fal_client.InProgress)]
    assert in_progress
    # Each poll answers every line so far (fal's InProgress keeps only logs): the steps show there.
    last_logs = [line["message"] for line in in_progress[-1].logs or []]
    assert len(last_logs) == len(set(last_logs))
    seen_steps = {
        line["message"] for update in in_progress for line in update.logs or [] if line["message"].startswith("Step ")
    }
    assert seen_steps
    assert all(re.fullmatch(rf"Step \d+/{steps}", line) for line in seen_steps)
    for earlier, later in itertools.pairwise(in_progress):
        before = [line["message"] for line in earlier.logs or []]
        assert [line["message"] for line in later.logs or []][: len(before)] == before
    positions = [update.position for update in updates if isinstance(update, fal_client.Queued)]
    assert positions == sorted(positions, reverse=True)
