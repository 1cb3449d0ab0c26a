"""fal's proxy protocol (inference/fal_proxy.py): a fal URL in ``x-fal-target-url`` is served by the platform's own
route, in process, with the key the request carries; anything that is not fal's is refused."""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.http import StreamingHttpResponse
from django.test import AsyncClient, Client
from rest_framework.test import APIClient

from inference.fal_proxy import (
    FAL_HOSTS,
    REALTIME_REFUSAL,
    ProxyTargetRefused,
    find_view,
    local_target,
    request_for,
)
from inference.models import Endpoint, Job, JobStatus
from tests.lifecycle import SMALL, start, submit_as

pytestmark = pytest.mark.django_db

PROXY = "/fal/proxy"
APP = "platform/tiny-sd"


@pytest.fixture(autouse=True)
def _credit(tenant: dict[str, Any]) -> None:
    from billing.ledger import grant_credits

    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="Proxy tests")


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Jobs handed to the broker (none: no broker in unit tests)."""
    from inference import dispatch

    messages: list[str] = []

    def record(job_id: str, attempt: int, queue: str) -> bool:
        messages.append(job_id)
        return True

    monkeypatch.setattr(dispatch, "send_run_message", record)
    return messages


def through_proxy(client: Client, method: str, target: str, body: Any = None, **headers: Any) -> Any:
    data = b"" if body is None else json.dumps(body).encode()
    return client.generic(method, PROXY, data, content_type="application/json", HTTP_X_FAL_TARGET_URL=target, **headers)


# The mapping, as a function.


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("https://queue.fal.run/platform/tiny-sd", "/queue/platform/tiny-sd", ""),
        ("https://queue.fal.run/platform/tiny-sd/image-to-image", "/queue/platform/tiny-sd/image-to-image", ""),
        (
            "https://queue.fal.run/platform/tiny-sd/requests/abc/status?logs=1",
            "/queue/platform/tiny-sd/requests/abc/status",
            "logs=1",
        ),
        ("https://fal.run/platform/tiny-sd", "/run/platform/tiny-sd", ""),
        ("https://fal.run/platform/tiny-sd/stream", "/run/platform/tiny-sd/stream", ""),
        (
            "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
            "/storage/upload/initiate",
            "storage_type=fal-cdn-v3",
        ),
        ("https://rest.alpha.fal.ai/storage/auth/token", "/storage/auth/token", ""),
        ("https://api.fal.ai/v1/models", "/v1/models", ""),
        ("HTTPS://QUEUE.FAL.RUN:443/a/b", "/queue/a/b", ""),
        ("https://fal.run/a/b%20c", "/run/a/b c", ""),
    ],
)
def test_fal_urls_map_onto_the_platforms_paths(target: str, path: str, query: str) -> None:
    mapped = local_target(target)
    assert (mapped.path, mapped.query) == (path, query)
    assert mapped.routes == FAL_HOSTS[target.split("/")[2].split(":")[0].lower()].routes


@pytest.mark.parametrize(
    "target",
    [
        "http://queue.fal.run/platform/tiny-sd",  # fal's client only ever says https
        "https://example.com/platform/tiny-sd",
        "https://queue.fal.run.example.com/platform/tiny-sd",
        "https://evilfal.run/platform/tiny-sd",
        "https://fal.ai/platform/tiny-sd",  # fal's, but nothing the client calls through a proxy
        "https://queue.fal.run:8443/platform/tiny-sd",
        "https://user:secret@queue.fal.run/platform/tiny-sd",
        "https://127.0.0.1/queue/platform/tiny-sd",
        "https://queue.fal.run/../v1/keys",
        "https://queue.fal.run/%2e%2e/v1/keys",
        "https://queue.fal.run:notaport/x",
        "queue.fal.run/platform/tiny-sd",
        "/queue/platform/tiny-sd",
        "https://[::1/x",
    ],
)
def test_other_targets_are_refused(target: str) -> None:
    with pytest.raises(ProxyTargetRefused):
        local_target(target)


# Through HTTP, with Django's test client.


def test_a_queue_round_trip_through_the_proxy(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[str]
) -> None:
    client = tenant["client"]
    submitted = through_proxy(client, "POST", f"https://queue.fal.run/{APP}", SMALL)
    assert submitted.status_code == 200, submitted.content
    handle = submitted.json()
    job = Job.objects.get(pk=handle["request_id"])
    assert job.organization_id == tenant["organization"].pk
    assert job.api_key_id == tenant["api_key"].pk
    assert job.input["prompt"] == SMALL["prompt"]
    assert submitted["x-fal-request-id"] == handle["request_id"]
    assert submitted["Access-Control-Allow-Origin"] == "*"
    base = f"https://queue.fal.run/{APP}/requests/{job.id}"

    # The target's query reaches the view: logs=1 asks for logs (a list), logs=0 for none (null).
    with_logs = through_proxy(client, "GET", f"{base}/status?logs=1").json()
    without_logs = through_proxy(client, "GET", f"{base}/status?logs=0").json()
    assert (with_logs["status"], with_logs["request_id"]) == ("IN_QUEUE", str(job.id))
    assert isinstance(with_logs["logs"], list)
    assert without_logs["logs"] is None

    in_progress = through_proxy(client, "GET", base)
    assert (in_progress.status_code, in_progress.json()["error_type"]) == (400, "request_in_progress")

    cancelled = through_proxy(client, "PUT", f"{base}/cancel")
    assert (cancelled.status_code, cancelled.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert Job.objects.get(pk=job.pk).status == JobStatus.CANCELLED
    assert through_proxy(client, "GET", f"{base}/status").json()["error_type"] == "cancelled"


def test_the_key_the_request_carries_is_the_one_that_counts(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[str]
) -> None:
    job = submit_as(tenant, builtin_endpoint)
    status = f"https://queue.fal.run/{APP}/requests/{job.id}/status"
    assert through_proxy(tenant["client"], "GET", status).status_code == 200
    # Another organization's key finds no such request, as on the queue API itself.
    response = through_proxy(other_tenant["client"], "GET", status)
    assert (response.status_code, response.json()["error_type"]) == (404, "request_not_found")

    for client in (APIClient(), Client()):
        response = through_proxy(client, "POST", f"https://queue.fal.run/{APP}", SMALL)
        assert (response.status_code, response.json()["error_type"]) == (401, "unauthorized")
    bad = through_proxy(
        APIClient(), "POST", f"https://queue.fal.run/{APP}", SMALL, HTTP_AUTHORIZATION="Key 0:not-a-key"
    )
    assert (bad.status_code, bad.json()["error_type"]) == (401, "invalid_api_key")
    assert Job.objects.count() == 1


def test_the_targets_view_gets_no_cookies(tenant: dict[str, Any], rf: Any) -> None:
    """Only the key a request carries authorizes it: a browser's cookies never reach the target's view."""
    request = rf.post(
        PROXY,
        b"{}",
        content_type="application/json",
        HTTP_COOKIE="sessionid=abc; csrftoken=def",
        HTTP_AUTHORIZATION=f"Key {tenant['token']}",
        HTTP_X_FAL_TARGET_URL="https://api.fal.ai/v1/me?x=1",
    )
    # Both cached on the request before the copy is made.
    assert request.COOKIES
    assert request.headers["Cookie"]
    target = local_target(request.headers["x-fal-target-url"])
    match = find_view(target)
    assert match is not None
    inner = request_for(request, target, match)
    assert inner.COOKIES == {}
    assert "Cookie" not in inner.headers
    assert "x-fal-target-url" not in inner.headers
    assert inner.headers["Authorization"] == f"Key {tenant['token']}"
    assert (inner.path, inner.get_full_path(), inner.GET["x"]) == ("/v1/me", "/v1/me?x=1", "1")
    assert (request.path, request.COOKIES["sessionid"]) == (PROXY, "abc")  # the original is as it was


def test_the_platform_api_under_api_fal_ai(tenant: dict[str, Any]) -> None:
    me = through_proxy(tenant["client"], "GET", "https://api.fal.ai/v1/me")
    assert me.status_code == 200, me.content
    assert me.json() == tenant["client"].get("/v1/me").json()


def test_errors_of_the_target_pass_through(tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[str]) -> None:
    client = tenant["client"]
    unknown = through_proxy(client, "POST", "https://queue.fal.run/platform/no-such-model", SMALL)
    assert (unknown.status_code, unknown.json()["error_type"]) == (404, "endpoint_not_found")
    invalid = through_proxy(client, "POST", f"https://queue.fal.run/{APP}", {"prompt": "x", "num_images": "two"})
    assert invalid.status_code == 422
    assert ["body", "num_images"] in [item["loc"] for item in invalid.json()["detail"]]
    wrong_method = through_proxy(client, "DELETE", f"https://queue.fal.run/{APP}")
    assert (wrong_method.status_code, wrong_method.json()["error_type"]) == (405, "method_not_allowed")
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("https://queue.fal.run/platform", "queue.fal.run"),
        ("https://fal.run/", "fal.run"),
        ("https://api.fal.ai/queue/platform/tiny-sd", "api.fal.ai"),  # a route of the platform, not of this host
        ("https://rest.fal.ai/v1/me", "rest.fal.ai"),
        ("https://rest.alpha.fal.ai/storage/nothing", "rest.alpha.fal.ai"),
        ("https://api.fal.ai/dashboard/", "api.fal.ai"),
        ("https://api.fal.ai/fal/proxy", "api.fal.ai"),
    ],
)
def test_fal_targets_with_no_route_here_are_404_saying_what_the_host_serves(
    tenant: dict[str, Any], target: str, host: str
) -> None:
    response = through_proxy(tenant["client"], "POST", target, {})
    assert response.status_code == 404, response.content
    body = response.json()
    assert body["error_type"] == "not_found"
    assert body["detail"].startswith(f"Nothing here serves {target} through the proxy; {host} serves ")
    assert FAL_HOSTS[host].serves in body["detail"]


@pytest.mark.parametrize(
    "target", ["https://rest.fal.ai/tokens/", "https://rest.fal.ai/tokens", "https://rest.alpha.fal.ai/tokens/"]
)
def test_realtime_tokens_are_refused_saying_why(tenant: dict[str, Any], target: str) -> None:
    """What the client asks before ``fal.realtime.connect`` or ``fal.stream(..., {connectionMode: "client"})``: both
    then connect to fal.run past the proxy, so the platform hands out no token and says what to use instead."""
    response = through_proxy(tenant["client"], "POST", target, {"allowed_apps": ["tiny-sd"], "token_expiration": 120})
    assert response.status_code == 501, response.content
    assert response.json() == {"detail": REALTIME_REFUSAL, "error_type": "proxy_target_unsupported"}
    assert 'connectionMode ("server")' in REALTIME_REFUSAL
    assert response["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("route", ["initiate", "initiate-multipart"])
def test_storage_uploads_are_initiated_through_the_proxy(tenant: dict[str, Any], route: str) -> None:
    """``fal.storage.upload`` (and a Blob in ``input``) initiates through the proxy, then PUTs to the platform's own
    URL, which needs no proxy."""
    response = through_proxy(
        tenant["client"],
        "POST",
        f"https://rest.fal.ai/storage/upload/{route}?storage_type=fal-cdn-v3",
        {"content_type": "image/png", "file_name": "photo.png"},
    )
    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["upload_url"].startswith("http://testserver/storage/upload/")
    assert answer["file_url"].startswith("http://testserver/files/uploads/")
    refused = through_proxy(
        tenant["client"],
        "POST",
        f"https://rest.fal.ai/storage/upload/{route}?storage_type=fal-cdn-v3",
        {"content_type": "application/pdf", "file_name": "a.pdf"},
    )
    assert refused.status_code == 422, refused.content


@pytest.mark.parametrize(
    "target", ["https://example.com/platform/tiny-sd", "http://queue.fal.run/platform/tiny-sd", "https://fal.ai/x"]
)
def test_a_target_that_is_not_fals_is_403(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[str], target: str
) -> None:
    response = through_proxy(tenant["client"], "POST", target, SMALL)
    assert response.status_code == 403
    body = response.json()
    assert body["error_type"] == "proxy_target_refused"
    assert "queue.fal.run" in body["detail"]
    assert response["Access-Control-Allow-Origin"] == "*"
    assert not Job.objects.exists()


def test_a_request_without_a_target_is_422_in_the_header(tenant: dict[str, Any]) -> None:
    response = tenant["client"].post(PROXY, {}, format="json")
    assert response.status_code == 422
    assert response.json() == {
        "detail": [{"loc": ["header", "x-fal-target-url"], "msg": "Field required.", "type": "missing"}],
        "error_type": "validation_error",
    }


def test_a_browsers_preflight_is_allowed_from_any_origin(db: None) -> None:
    asked = "authorization, content-type, x-fal-target-url, x-fal-queue-priority"
    response = Client().options(
        PROXY,
        HTTP_ORIGIN="https://app.example.com",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS=asked,
    )
    assert response.status_code == 204
    assert response["Access-Control-Allow-Origin"] == "*"
    assert response["Access-Control-Allow-Headers"] == asked
    assert "PUT" in response["Access-Control-Allow-Methods"]
    # Anything that is not a list of header names gets the fixed list instead of an echo.
    for odd in ("authorization\r\nx: y", "authorization,\nx-y", "a b", ""):
        answer = Client().options(PROXY, HTTP_ACCESS_CONTROL_REQUEST_HEADERS=odd)
        assert answer["Access-Control-Allow-Headers"] == "authorization, content-type, accept, x-fal-target-url"
    assert not response.cookies


# Committed: the stream's view closes its database connection after each look.
@pytest.mark.django_db(transaction=True)
def test_the_status_stream_passes_through_unbuffered(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[str]
) -> None:
    """The first event arrives while the request is still running: the proxy hands on the view's stream."""
    from billing.models import Price
    from billing.rates import ensure_opening_prices

    ensure_opening_prices(Price)
    job = start(submit_as(tenant, builtin_endpoint))
    target = f"https://queue.fal.run/{APP}/requests/{job.id}/status/stream?logs=1"

    async def first_event() -> tuple[StreamingHttpResponse, bytes]:
        headers = {"Authorization": f"Key {tenant['token']}", "x-fal-target-url": target}
        response = await AsyncClient().get(PROXY, headers=headers)
        assert isinstance(response, StreamingHttpResponse)
        events = aiter(response.streaming_content)
        chunk = await anext(events)
        await events.aclose()  # type: ignore[attr-defined]
        return response, bytes(chunk)

    response, chunk = async_to_sync(first_event)()
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    assert response["x-fal-request-id"] == str(job.id)
    assert response["Access-Control-Allow-Origin"] == "*"
    assert chunk.startswith(b"data: ")
    event = json.loads(chunk.removeprefix(b"data: "))
    assert (event["status"], event["request_id"]) == ("IN_PROGRESS", str(job.id))
    assert isinstance(event["logs"], list)
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING  # still running: nothing waited for the end


def test_the_sync_run_through_the_proxy_answers_its_own_errors(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    """``fal.run`` lands on the async sync-run view; an input it refuses answers at once, as the view does."""
    response = through_proxy(tenant["client"], "POST", f"https://fal.run/{APP}", {"num_inference_steps": 10_000})
    assert response.status_code == 422
    assert ["body", "prompt"] in [item["loc"] for item in response.json()["detail"]]


def test_the_mapping_names_only_fals_hosts() -> None:
    assert all(host == "fal.run" or host.endswith((".fal.run", ".fal.ai")) for host in FAL_HOSTS)
