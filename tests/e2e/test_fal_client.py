"""The official fal-client, unmodified, against the platform over HTTPS with real workers."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import fal_client
import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import Stack
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

APP = "platform/tiny-sd"
SMALL = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 3}


@pytest.fixture
def fal_key(e2e_tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FAL_KEY", e2e_tenant["key"])
    return str(e2e_tenant["key"])


@pytest.fixture
def fal(fal_key: str) -> fal_client.SyncClient:
    """fal's module-level functions keep one client (and its key) for the process, so each test
    takes a client of its own, as an application with several keys would."""
    return fal_client.SyncClient(key=fal_key)


def fetch_image(stack: Stack, url: str) -> Image.Image:
    response = httpx.get(url, verify=stack.ssl_context(), timeout=30)
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_submit_status_and_result(stack: Stack, fal: fal_client.SyncClient) -> None:
    handle = fal.submit(APP, {**SMALL, "seed": 7, "num_images": 2})
    assert handle.request_id

    def completed() -> fal_client.Completed | None:
        status = handle.status(with_logs=True)
        if isinstance(status, fal_client.Queued):
            assert status.position >= 0
        return status if isinstance(status, fal_client.Completed) else None

    status = wait_until(completed, timeout=120, message=lambda: f"the request to complete\n{stack.log_tail('gpu')}")
    assert status.error is None
    assert status.logs
    assert any("Completed" in line["message"] for line in status.logs)
    result = handle.get()
    assert result["seed"] == 7
    assert result["prompt"] == SMALL["prompt"]
    assert len(result["images"]) == 2
    for image in result["images"]:
        assert image["width"] == 64
        assert image["height"] == 64
        assert image["content_type"] == "image/png"
        picture = fetch_image(stack, image["url"])
        assert picture.size == (64, 64)
        assert image["file_size"] > 0


def test_subscribe_with_logs_and_queue_updates(stack: Stack, fal: fal_client.SyncClient) -> None:
    updates: list[Any] = []
    result = fal.subscribe(APP, arguments=SMALL, with_logs=True, on_queue_update=updates.append)
    assert len(result["images"]) == 1
    assert any(isinstance(update, fal_client.InProgress | fal_client.Queued) for update in updates)


def test_run_waits_for_the_result(stack: Stack, fal: fal_client.SyncClient) -> None:
    result = fal.run(APP, arguments={**SMALL, "output_format": "jpeg"})
    image = result["images"][0]
    assert image["content_type"] == "image/jpeg"
    assert fetch_image(stack, image["url"]).format == "JPEG"


def test_sync_mode_returns_data_uris(stack: Stack, fal: fal_client.SyncClient) -> None:
    result = fal.run(APP, arguments={**SMALL, "sync_mode": True, "output_format": "webp"})
    url = result["images"][0]["url"]
    assert url.startswith("data:image/webp;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (64, 64)


def test_image_to_image_from_a_data_uri(stack: Stack, fal: fal_client.SyncClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    result = fal.subscribe(APP, path="image-to-image", arguments={**SMALL, "image_url": data_uri, "strength": 0.5})
    assert result["images"][0]["width"] == 64


def test_cancel_a_running_request(stack: Stack, fal: fal_client.SyncClient) -> None:
    handle = fal.submit(APP, {**SMALL, "num_inference_steps": 50, "image_size": {"width": 256, "height": 256}})
    wait_until(
        lambda: isinstance(handle.status(), fal_client.InProgress),
        timeout=120,
        message=lambda: f"the request to start\n{stack.log_tail('gpu')}",
    )
    handle.cancel()

    def completed() -> fal_client.Completed | None:
        status = handle.status()
        return status if isinstance(status, fal_client.Completed) else None

    status = wait_until(
        completed,
        timeout=120,
        message=lambda: f"the cancelled request to complete\n{stack.log_tail('gpu')}",
    )
    assert status.error_type == "cancelled"
    with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
        handle.get()
    assert raised.value.status_code == 400


def test_the_async_client(stack: Stack, fal: fal_client.SyncClient) -> None:
    async def scenario() -> dict[str, Any]:
        client = fal_client.AsyncClient(key=fal.key)
        handle = await client.submit(APP, arguments=SMALL)
        status = await handle.status(with_logs=True)
        assert isinstance(status, fal_client.Queued | fal_client.InProgress | fal_client.Completed)
        return await handle.get()

    result = asyncio.run(scenario())
    assert len(result["images"]) == 1


def test_invalid_input_is_422_naming_the_field(stack: Stack, fal: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
        fal.submit(APP, {"prompt": "x", "num_inference_steps": 10_000})
    assert raised.value.status_code == 422
    with stack.client(fal.key) as client:
        response = client.post(f"/queue/{APP}", json={"num_images": "two"})
    assert response.status_code == 422
    locations = [item["loc"] for item in response.json()["detail"]]
    assert ["body", "prompt"] in locations
    assert ["body", "num_images"] in locations
