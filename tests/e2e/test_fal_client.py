"""The official fal-client, unmodified, against the platform over HTTPS with real workers."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from datetime import timedelta
from typing import Any

import fal_client
import httpx
import pytest
from django.db.models import DateTimeField, ExpressionWrapper
from django.db.models.functions import Now
from PIL import Image

from inference.models import Job, JobAttempt
from tests.e2e.conftest import Stack
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

APP = "platform/tiny-sd"
SMALL = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 3}
# How long a sync run's request is kept from starting before its worker resumes. The server answers a run only when
# its request is final (or after SYNC_RUN_TIMEOUT_SECONDS, 300 in the stack): no shorter wait limit hands the client
# a queue handle in place of the output.
WAITED_SECONDS = 5


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


def waited_unstarted(organization: Any, *, seed: int, seconds: float) -> Job | None:
    """The organization's request with this seed, once it has waited ``seconds`` without starting, by the database's
    clock."""
    cutoff = ExpressionWrapper(Now() - timedelta(seconds=seconds), output_field=DateTimeField())
    return Job.objects.filter(
        organization=organization, input__seed=seed, started_at__isnull=True, created_at__lte=cutoff
    ).first()


def set_concurrency_limit(organization: Any, limit: int) -> None:
    organization.concurrency_limit = limit
    organization.save(update_fields=["concurrency_limit"])


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


def test_run_returns_the_output_however_long_the_request_waits(
    stack: Stack, fal: fal_client.SyncClient, e2e_tenant: dict[str, Any]
) -> None:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["output"] = fal.run(APP, arguments={**SMALL, "seed": 21})
        except Exception as error:  # reported by the assertions below
            outcome["error"] = error

    runner = threading.Thread(target=run, daemon=True)
    # No worker takes the request until it has waited: its job stays DISPATCHED (no lease runs out meanwhile).
    with stack.paused("gpu"):
        runner.start()
        waited = wait_until(
            lambda: waited_unstarted(e2e_tenant["organization"], seed=21, seconds=WAITED_SECONDS),
            timeout=60,
            message=f"the run's request to wait {WAITED_SECONDS} s unstarted",
        )
        assert runner.is_alive(), outcome
    runner.join(timeout=120)
    assert not runner.is_alive(), "fal_client.run did not return once the worker resumed"
    assert "error" not in outcome, outcome
    output = outcome["output"]
    # The model's output, not a queue handle standing in for it.
    assert not {"request_id", "status_url", "response_url"} & set(output), output
    assert output["seed"] == 21
    [image] = output["images"]
    assert fetch_image(stack, image["url"]).size == (64, 64)
    job = Job.objects.get(pk=waited.pk)
    assert job.status == "COMPLETED"
    assert (job.finished_at - job.created_at).total_seconds() >= WAITED_SECONDS


def test_start_timeout_ends_a_request_that_could_not_start_unbilled(
    stack: Stack, fal: fal_client.SyncClient, e2e_tenant: dict[str, Any]
) -> None:
    from billing.models import Account, UsageRecord

    organization = e2e_tenant["organization"]
    set_concurrency_limit(organization, 1)
    # With the GPU worker paused, a dispatched request holds the tenant's only slot until it is cancelled: the run
    # waits in the queue behind it past its start timeout, however fast the machine.
    with stack.paused("gpu"):
        blocker = fal.submit(APP, {**SMALL, "seed": 1})
        wait_until(
            lambda: Job.objects.get(pk=blocker.request_id).status == "DISPATCHED",
            timeout=30,
            message="the blocker to take the only slot",
        )
        held_before = Account.objects.get(organization=organization).held_micros
        with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
            fal.run(APP, arguments={**SMALL, "seed": 2}, start_timeout=1.5)
        blocker.cancel()
    error = raised.value
    assert (error.status_code, error.error_type) == (504, "timeout")
    assert "start timeout" in str(error)
    # fal's mark of a timeout the caller set: its clients do not retry it.
    assert error.response.headers["x-fal-request-timeout-type"] == "user"
    job = Job.objects.get(pk=error.response.headers["x-fal-request-id"])
    assert job.input["seed"] == 2
    assert (job.status, job.error_type, job.started_at, job.gpu_ms) == ("CANCELLED", "timeout", None, 0)
    assert not JobAttempt.objects.filter(job=job).exists()
    assert not UsageRecord.objects.filter(job=job).exists()
    assert Account.objects.get(organization=organization).held_micros == held_before
    with pytest.raises(fal_client.client.FalClientHTTPError) as result:
        fal.result(APP, str(job.pk))
    assert (result.value.status_code, result.value.error_type) == (504, "timeout")


@pytest.mark.parametrize(
    ("case", "status", "error_type"),
    [("bad key", 401, "invalid_api_key"), ("unknown app", 404, "endpoint_not_found")],
)
def test_refusals_are_the_clients_http_errors_with_our_body(
    stack: Stack, fal: fal_client.SyncClient, case: str, status: int, error_type: str
) -> None:
    if case == "bad key":
        client, app = fal_client.SyncClient(key=f"{fal.key.split(':')[0]}:wrong"), APP
    else:
        client, app = fal, "platform/no-such-model"
    for call in (lambda: client.submit(app, SMALL), lambda: client.run(app, arguments=SMALL)):
        with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
            call()
        assert (raised.value.status_code, raised.value.error_type) == (status, error_type)
        assert str(raised.value)  # our detail


def test_an_end_user_tag_rides_on_the_clients_own_headers_and_its_limit_refuses_with_our_body(
    stack: Stack, fal: fal_client.SyncClient, e2e_tenant: dict[str, Any]
) -> None:
    """fal's client sends any header it is given (``headers=``), unmodified: the request, its usage and the usage by
    end user carry the tag; a tag over its monthly limit is refused as the client reports any HTTP error."""
    from billing.end_users import set_end_user_limit
    from billing.models import Price, UsageRecord
    from billing.rates import ensure_opening_prices

    ensure_opening_prices(Price)  # a transactional test before this one may have emptied the rate card: work is priced
    headers = {"X-Fal-End-User": "customer-42"}
    handle = fal.submit(APP, arguments=SMALL, headers=headers)
    assert fal.subscribe(APP, arguments=SMALL, headers=headers)["images"]
    assert fal.run(APP, arguments=SMALL, headers=headers)["images"]
    handle.get()
    tagged = Job.objects.filter(end_user="customer-42", organization=e2e_tenant["organization"])
    assert tagged.count() == 3
    assert UsageRecord.objects.filter(job__in=tagged, end_user="customer-42").count() == 3
    with stack.client(e2e_tenant["key"]) as api:
        report = api.get("/v1/usage", params={"group_by": "end_user"}).json()
    assert [(row["end_user"], row["requests"]) for row in report["data"]] == [("customer-42", 3)]

    set_end_user_limit(organization=e2e_tenant["organization"], end_user="customer-42", monthly_limit_micros=0)
    with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
        fal.run(APP, arguments=SMALL, headers=headers)
    assert (raised.value.status_code, raised.value.error_type) == (402, "end_user_limit_exceeded")
    assert fal.run(APP, arguments=SMALL, headers={"X-Fal-End-User": "customer-43"})["images"]
