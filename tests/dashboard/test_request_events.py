"""The dashboard's status stream of a request (``/dashboard/requests/{id}/events``), served as the web process serves
it (the ASGI application behind ``config.request_threads.RequestThreads``): while it waits for the request's next move
it holds no database connection and no request thread, as the queue API's status stream does
(inference/api.py, config/request_threads.py). Transactional: the stream looks at the job from other threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.test import Client

from billing.ledger import grant_credits
from config.asgi import django_application
from config.request_threads import RequestThreads, ThreadPool
from inference.closing import cancel_job
from inference.models import Endpoint, Job
from tests.lifecycle import submit_as
from tests.test_request_threads import http_scope
from tests.waiting import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("priced_without_broker")]

APP = "platform/tiny-sd"
TIMEOUT = 30


class Opened:
    """The database connections opened by threads other than the test's own while it is active (Django's
    ``connection_created``), each with the name of the thread that opened it."""

    def __init__(self) -> None:
        self.connections: list[tuple[str, BaseDatabaseWrapper]] = []
        self._test_thread = threading.get_ident()

    def __call__(self, sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
        if threading.get_ident() != self._test_thread:
            self.connections.append((threading.current_thread().name, connection))

    def held(self) -> list[str]:
        """The threads whose connection is still open (not closed, nor given back to the pool)."""
        return [thread for thread, wrapper in self.connections if wrapper.connection is not None]


@pytest.fixture
def opened() -> Iterator[Opened]:
    opened = Opened()
    connection_created.connect(opened, weak=False)
    try:
        yield opened
    finally:
        connection_created.disconnect(opened)


def cancel(job: Job) -> None:
    """Cancels the job (a queued one ends at once), from a thread of the event loop's executor."""
    try:
        cancel_job(job=job)
    finally:
        connection.close()


def stream_while_waiting(path: str, headers: list[tuple[bytes, bytes]], job: Job, opened: Opened) -> dict[str, Any]:
    """Opens the stream at ``path``, and once its first event has come and it waits for the job's next move, checks
    that it holds no request thread and that every database connection it opened is closed again (each look at the
    job opens one for a moment). Then cancels the job, which ends the stream. What was seen."""
    pool = ThreadPool()
    app = RequestThreads(django_application, pool)
    sent: list[dict[str, Any]] = []
    received: list[int] = []
    first_event = asyncio.Event()
    seen: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        received.append(1)
        if len(received) == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays until the stream ends
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if b"data: " in message.get("body", b""):
            first_event.set()

    def holds_nothing() -> bool:
        return pool.started > 0 and pool.idle == pool.started and not opened.held()

    async def scenario() -> None:
        streaming = asyncio.ensure_future(app(http_scope(path, headers, host="testserver"), receive, send))
        await asyncio.wait_for(first_event.wait(), TIMEOUT)
        # Between two looks at the job the stream holds nothing; a stream that kept its thread or its connection
        # would hold it for as long as it stays open.
        await asyncio.to_thread(
            wait_until,
            holds_nothing,
            timeout=TIMEOUT,
            message=lambda: (
                f"the open stream to hold nothing: {pool.started - pool.idle} thread(s) held, "
                f"connections held by {opened.held()}"
            ),
        )
        seen["open"] = not streaming.done()
        assert opened.connections, "the request opened no connection: nothing was measured"
        await sync_to_async(cancel, thread_sensitive=False)(job)
        await asyncio.wait_for(streaming, TIMEOUT)

    asyncio.run(scenario())
    seen["status"] = next(message["status"] for message in sent if message["type"] == "http.response.start")
    seen["body"] = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    # The stream's end gives its thread back (Django's request_finished closes the connection there first).
    wait_until(lambda: pool.idle == pool.started, timeout=TIMEOUT, message="the thread back once the stream ended")
    return seen


@pytest.fixture
def queued_job(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> Job:
    """A request that waits in its queue (no broker: nothing moves it on)."""
    grant_credits(organization=tenant["organization"], amount_micros=10_000_000, reason="Stream tests")
    return submit_as(tenant, builtin_endpoint)


def test_an_open_dashboard_stream_holds_no_connection_and_no_thread(
    tenant: dict[str, Any], queued_job: Job, opened: Opened
) -> None:
    browser = Client()
    browser.force_login(tenant["user"])
    cookie = f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}"
    seen = stream_while_waiting(
        f"/dashboard/requests/{queued_job.pk}/events", [(b"cookie", cookie.encode())], queued_job, opened
    )
    assert seen["open"]
    assert seen["status"] == 200
    assert b'"status":"IN_QUEUE"' in seen["body"]
    assert b'"error_type":"cancelled"' in seen["body"]  # the stream followed the request to its end


def test_an_open_api_status_stream_holds_no_connection_and_no_thread(
    tenant: dict[str, Any], queued_job: Job, opened: Opened
) -> None:
    authorization = f"Key {tenant['token']}".encode()
    seen = stream_while_waiting(
        f"/queue/{APP}/requests/{queued_job.pk}/status/stream", [(b"authorization", authorization)], queued_job, opened
    )
    assert seen["open"]
    assert seen["status"] == 200
    assert b'"status":"IN_QUEUE"' in seen["body"]
    assert b'"error_type":"cancelled"' in seen["body"]
