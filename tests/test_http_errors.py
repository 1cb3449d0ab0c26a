"""Every answer of the API is JSON ``{detail, error_type}`` with the right status, and never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from rest_framework.test import APIClient

from accounts.models import ApiKey, Scope
from config.asgi import BodyLimit
from config.request_threads import RequestThreads

pytestmark = pytest.mark.django_db


# (method, path) of every endpoint; {key} is a key of the tenant other than the one making the request.
ENDPOINTS = [
    ("GET", "/v1/me"),
    ("GET", "/v1/keys"),
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys/{key}"),
    ("DELETE", "/v1/keys/{key}"),
]
# What each answers to a request it accepts.
SUCCESS = {"GET": 200, "POST": 201, "DELETE": 200}


def endpoint_path(path: str, tenant: dict[str, Any], make_key: Any) -> str:
    if "{key}" not in path:
        return path
    other, _ = make_key(tenant["organization"], scopes=[Scope.INFERENCE])
    return path.format(key=other.id)


def authed_client(tenant: dict[str, Any]) -> APIClient:
    # A new client builds its own middleware chain, so it sees settings overridden before its first request.
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {tenant['token']}")
    return client


def assert_json_error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"detail", "error_type"}
    assert body["error_type"] == error_type
    assert body["detail"]
    return body


@pytest.mark.parametrize(
    "body",
    [b'{"name": ', b'{"name": "x",}', b"{'name': 'x'}", b'{"name": NaN}', b"\xff\xfe{}", b"nul"],
    ids=["truncated", "trailing-comma", "single-quotes", "nan", "not-utf8", "bare-word"],
)
def test_malformed_json_is_400(tenant: dict[str, Any], body: bytes) -> None:
    before = ApiKey.objects.count()
    response = tenant["client"].generic("POST", "/v1/keys", body, content_type="application/json")
    assert_json_error(response, 400, "invalid_json")
    assert ApiKey.objects.count() == before


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_a_malformed_body_never_makes_a_500(tenant: dict[str, Any], make_key: Any, method: str, path: str) -> None:
    url = endpoint_path(path, tenant, make_key)
    response = tenant["client"].generic(method, url, b'{"name": ', content_type="application/json")
    if method == "POST":
        assert_json_error(response, 400, "invalid_json")
    else:  # the body is never read
        assert response.status_code == SUCCESS[method], response.content


def test_deeply_nested_json_is_400_not_500(tenant: dict[str, Any]) -> None:
    response = tenant["client"].generic("POST", "/v1/keys", b"[" * 100_000, content_type="application/json")
    assert_json_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=xyz", "application/xml"],
)
def test_a_body_that_is_not_json_is_415(tenant: dict[str, Any], content_type: str) -> None:
    response = tenant["client"].generic("POST", "/v1/keys", b"name=x", content_type=content_type)
    assert_json_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_a_non_json_content_type_never_makes_a_500(
    tenant: dict[str, Any], make_key: Any, method: str, path: str
) -> None:
    url = endpoint_path(path, tenant, make_key)
    response = tenant["client"].generic(method, url, b"name=x", content_type="text/plain")
    if method == "POST":
        assert_json_error(response, 415, "unsupported_media_type")
    else:
        assert response.status_code == SUCCESS[method], response.content


@pytest.mark.parametrize(("method", "path"), [*ENDPOINTS, ("POST", "/v1/nothing-here")])
def test_a_declared_body_over_the_limit_is_413(tenant: dict[str, Any], make_key: Any, method: str, path: str) -> None:
    url = endpoint_path(path, tenant, make_key)
    before = ApiKey.objects.usable().count()
    with override_settings(MAX_REQUEST_BODY_BYTES=2048):
        body = json.dumps({"name": "x", "padding": "p" * 2048}).encode()
        response = authed_client(tenant).generic(method, url, body, content_type="application/json")
    body_json = assert_json_error(response, 413, "payload_too_large")
    assert "2048" in body_json["detail"]
    assert ApiKey.objects.usable().count() == before  # nothing created, nothing revoked


def test_a_body_exactly_at_the_limit_is_accepted(tenant: dict[str, Any]) -> None:
    limit = 2048
    body = json.dumps({"name": "x", "padding": ""}).encode()
    body = json.dumps({"name": "x", "padding": "p" * (limit - len(body))}).encode()
    assert len(body) == limit
    with override_settings(MAX_REQUEST_BODY_BYTES=limit):
        response = authed_client(tenant).generic("POST", "/v1/keys", body, content_type="application/json")
    assert response.status_code == 201, response.content


def test_a_real_body_over_the_default_limit_is_413(tenant: dict[str, Any]) -> None:
    body = b'{"name": "' + b"x" * settings.MAX_REQUEST_BODY_BYTES + b'"}'
    response = tenant["client"].generic("POST", "/v1/keys", body, content_type="application/json")
    assert_json_error(response, 413, "payload_too_large")


def test_an_unreadable_content_length_is_400(tenant: dict[str, Any]) -> None:
    response = tenant["client"].generic(
        "POST", "/v1/keys", b'{"name": "x"}', content_type="application/json", CONTENT_LENGTH="lots"
    )
    assert_json_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/nothing-here",
        "/v1/me/",
        "/v1/keys/",
        "/v1/keys/a/b",
        "/v1/",
        "/queue/acme",
        "/run/acme",
        "/queue/a/b/c/d/e",
    ],
)
@pytest.mark.parametrize("authenticated", [True, False])
def test_unknown_api_paths_are_json_404(tenant: dict[str, Any], path: str, authenticated: bool) -> None:
    client = tenant["client"] if authenticated else APIClient()
    for method in ("GET", "POST"):
        response = client.generic(method, path, b"{}", content_type="application/json")
        assert response.json() == {"detail": "Not found.", "error_type": "not_found"}
        assert_json_error(response, 404, "not_found")


def test_other_unknown_paths_are_json_404_when_json_is_asked_for(db: None) -> None:
    client = APIClient()
    assert client.get("/nothing-here").status_code == 404
    assert "text/html" in client.get("/nothing-here")["Content-Type"]
    assert_json_error(client.get("/nothing-here", HTTP_ACCEPT="application/json"), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/me"),
        ("PUT", "/v1/me"),
        ("PATCH", "/v1/me"),
        ("DELETE", "/v1/me"),
        ("PUT", "/v1/keys"),
        ("PATCH", "/v1/keys"),
        ("DELETE", "/v1/keys"),
        ("POST", "/v1/keys/{key}"),
        ("PUT", "/v1/keys/{key}"),
        ("PATCH", "/v1/keys/{key}"),
    ],
)
def test_wrong_methods_are_json_405(tenant: dict[str, Any], make_key: Any, method: str, path: str) -> None:
    url = endpoint_path(path, tenant, make_key)
    before = ApiKey.objects.usable().count()
    response = tenant["client"].generic(method, url, b'{"name": "x"}', content_type="application/json")
    assert_json_error(response, 405, "method_not_allowed")
    assert method not in response["Allow"]
    assert ApiKey.objects.usable().count() == before


# config.asgi.BodyLimit: the bound on bodies in front of Django, chunked ones included.

Message = dict[str, Any]
LIMIT = 1000


class RecordingApp:
    """An inner ASGI app that reads the whole body and answers 200."""

    def __init__(self) -> None:
        self.called = False
        self.messages: list[Message] = []

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        self.called = True
        while True:
            message = await receive()
            self.messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    @property
    def body(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.messages)


def http_scope(headers: list[tuple[bytes, bytes]]) -> Message:
    return {"type": "http", "method": "POST", "path": "/v1/keys", "headers": headers}


def run_asgi(app: Any, scope: Message, chunks: list[bytes]) -> tuple[list[Message], int]:
    """Feeds ``chunks`` as http.request messages; returns what was sent and how many messages were read."""
    incoming = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    sent: list[Message] = []
    reads = 0

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, reads


def assert_refused(sent: list[Message]) -> None:
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 413
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body["error_type"] == "payload_too_large"
    assert str(LIMIT) in body["detail"]
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(sent[1]["body"])).encode()


def test_a_declared_length_over_the_limit_is_refused_before_the_app_runs() -> None:
    inner = RecordingApp()
    sent, reads = run_asgi(BodyLimit(inner, LIMIT), http_scope([(b"content-length", b"1001")]), [b"x" * 1001])
    assert_refused(sent)
    assert not inner.called
    assert reads == 0


def test_a_declared_length_under_the_limit_goes_through() -> None:
    inner = RecordingApp()
    sent, _ = run_asgi(BodyLimit(inner, LIMIT), http_scope([(b"content-length", b"1000")]), [b"x" * 1000])
    assert sent[0]["status"] == 200
    assert inner.body == b"x" * 1000


def test_a_chunked_body_over_the_limit_is_refused_as_soon_as_it_passes_it() -> None:
    inner = RecordingApp()
    chunks = [b"a" * 400] * 10
    sent, reads = run_asgi(BodyLimit(inner, LIMIT), http_scope([(b"transfer-encoding", b"chunked")]), chunks)
    assert_refused(sent)
    assert not inner.called
    assert reads == 3  # 1,200 bytes read: the other 2,800 never are


def test_a_chunked_body_under_the_limit_is_replayed_whole_to_the_app() -> None:
    inner = RecordingApp()
    chunks = [b"first-", b"second-", b"", b"third"]
    sent, _ = run_asgi(BodyLimit(inner, LIMIT), http_scope([(b"transfer-encoding", b"chunked")]), chunks)
    assert sent[0]["status"] == 200
    assert inner.body == b"first-second-third"
    assert [message.get("more_body") for message in inner.messages] == [True, True, True, False]


def test_a_chunked_body_exactly_at_the_limit_goes_through() -> None:
    inner = RecordingApp()
    chunks = [b"z" * 500, b"z" * 500]
    sent, _ = run_asgi(BodyLimit(inner, LIMIT), http_scope([(b"transfer-encoding", b"chunked")]), chunks)
    assert sent[0]["status"] == 200
    assert inner.body == b"z" * LIMIT


def test_a_chunked_body_is_bounded_whatever_the_case_of_the_header_value() -> None:
    inner = RecordingApp()
    chunks = [b"a" * 400] * 10
    sent, _ = run_asgi(BodyLimit(inner, LIMIT), http_scope([(b"transfer-encoding", b"Chunked")]), chunks)
    assert not inner.called
    assert_refused(sent)


def test_other_scopes_pass_through_untouched() -> None:
    seen: list[str] = []

    async def inner(scope: Message, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    async def never(*_: Any) -> Message:
        raise AssertionError("BodyLimit must not read a non-HTTP connection")

    asyncio.run(BodyLimit(inner, LIMIT)({"type": "lifespan"}, never, never))
    asyncio.run(BodyLimit(inner, LIMIT)({"type": "websocket", "headers": []}, never, never))
    assert seen == ["lifespan", "websocket"]


def test_the_served_asgi_application_bounds_chunked_bodies_at_the_setting() -> None:
    from config.asgi import application

    assert isinstance(application, RequestThreads)  # in front of everything (config/request_threads.py)
    assert isinstance(application.app, BodyLimit)
    assert application.app.limit == settings.MAX_REQUEST_BODY_BYTES
    chunk = b"x" * (1024 * 1024)
    chunks = [chunk] * (settings.MAX_REQUEST_BODY_BYTES // len(chunk) + 2)
    sent, reads = run_asgi(application, http_scope([(b"transfer-encoding", b"chunked")]), chunks)
    assert sent[0]["status"] == 413
    assert reads < len(chunks)
