"""A stream's slot under its caller's cap (inference/stream_limits.py) is given back when its request ends, however it
ends, at once: not a minute later, when it would lapse by itself. Until then the caller counts one stream more than it
has open, and a person who reloads a page a few times is refused their own streams (429 ``too_many_streams``).

Each request is served as the web process serves it (the ASGI application behind
``config.request_threads.RequestThreads``) and the slots are read from where they are kept (Redis, or this process's
memory without it) as soon as the application is done with the request. Transactional: the streams look at the jobs
from other threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.core.signals import request_finished
from django.http import HttpRequest, HttpResponseBase

from billing.ledger import grant_credits
from config.middleware import ContentSecurityPolicyMiddleware, MessageMiddleware
from inference import stream_limits
from inference.models import Endpoint, Job
from tests.dashboard.test_request_events_limits import page_stream, signed_in
from tests.inference.test_stream_limits import run_stream, set_in_thread, status_stream
from tests.lifecycle import submit_as

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("priced_without_broker")]

TIMEOUT = 30


@pytest.fixture
def queued_job(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> Job:
    grant_credits(organization=tenant["organization"], amount_micros=10_000_000, reason="Stream tests")
    return submit_as(tenant, builtin_endpoint)  # no broker: it waits in its queue for ever


def held(holder: stream_limits.Holder) -> set[str]:
    """The stream ids holding a slot under ``holder``: in Redis's set, or in this process's memory without Redis."""
    if not django_settings.REDIS_URL:
        return set(stream_limits._slots._local.get(holder.bucket, {}))
    with redis.Redis.from_url(django_settings.REDIS_URL) as client:
        return {member.decode() for member in client.zrange(stream_limits._Slots._key(holder.bucket), 0, -1)}


def person(tenant: dict[str, Any]) -> stream_limits.Holder:
    return stream_limits.dashboard_holder(tenant["user"].pk)


def key(tenant: dict[str, Any]) -> stream_limits.Holder:
    return stream_limits.api_key_holder(tenant["api_key"])


class OnItsWayBack:
    """The messages middleware (the first to see the view's response on its way back, on the request's thread) held
    at an event stream until Django's handler has given up on the request (its client gone): the handler has sent
    ``request_finished`` for a request whose view it cancelled, and the response comes back to no one."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.dropped = threading.Event()

    def process_response(self, original: Any) -> Any:
        def process_response(middleware: Any, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
            if isinstance(response, stream_limits.EventStream):
                self.reached.set()
                assert self.dropped.wait(TIMEOUT), "the handler never gave up on the request"
            return original(middleware, request, response)

        return process_response

    async def finished(self, sender: Any, **kwargs: Any) -> None:
        # Async: run on the event loop, while the signal's sync receivers wait for the request's (held) thread.
        self.dropped.set()


@pytest.fixture
def on_its_way_back(monkeypatch: pytest.MonkeyPatch) -> Iterator[OnItsWayBack]:
    hold = OnItsWayBack()
    monkeypatch.setattr(
        MessageMiddleware, "process_response", hold.process_response(MessageMiddleware.process_response)
    )
    request_finished.connect(hold.finished, weak=False)
    try:
        yield hold
    finally:
        request_finished.disconnect(hold.finished)


def test_a_dashboard_client_gone_while_its_stream_passes_back_through_the_middleware_leaves_no_slot_held(
    tenant: dict[str, Any], queued_job: Job, settings: Any, on_its_way_back: OnItsWayBack
) -> None:
    """The view has taken the slot and returned the stream; the session and messages middleware run on the request's
    thread after it, and the client hangs up meanwhile. Django's handler cancels the view's task there and never gets
    the response, so it cannot close it: the request's end gives the slot back."""
    settings.STREAMS_PER_DASHBOARD_USER = 1
    session = signed_in(tenant)

    async def scenario() -> None:
        reload = page_stream(queued_job, session)
        reload.start()
        await set_in_thread(on_its_way_back.reached)
        assert held(person(tenant))  # the view took it
        await reload.leave()
        assert not reload.sent  # the answer never started
        assert not held(person(tenant))  # at once: no waiting for the lapse
        again = page_stream(queued_job, session)
        assert await again.open() == 200, again.content
        await again.leave()

    asyncio.run(scenario())


def fails_on_an_event_stream(original: Any) -> Any:
    def failing(middleware: Any, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if isinstance(response, stream_limits.EventStream):
            raise RuntimeError("a middleware failed on the stream's way back")
        return original(middleware, request, response)

    return failing


@pytest.mark.parametrize("kind", ["dashboard", "status", "run"])
def test_a_stream_a_middleware_fails_on_leaves_no_slot_held(
    kind: str, tenant: dict[str, Any], queued_job: Job, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A middleware that raises on the stream's way back: Django answers 500 in its place, and the stream, dropped,
    is never closed. (On the API's paths the response passes back without leaving the event loop, so no hang-up can
    land there; a failure can.)"""
    settings.STREAMS_PER_DASHBOARD_USER = settings.STREAMS_PER_API_KEY = 1
    monkeypatch.setattr(
        ContentSecurityPolicyMiddleware, "protect", fails_on_an_event_stream(ContentSecurityPolicyMiddleware.protect)
    )
    session = signed_in(tenant)
    streams = {
        "dashboard": lambda: page_stream(queued_job, session),
        "status": lambda: status_stream(tenant, queued_job),
        "run": lambda: run_stream(tenant),
    }
    holder = person(tenant) if kind == "dashboard" else key(tenant)

    async def scenario() -> None:
        failed = streams[kind]()
        assert await failed.open() == 500
        await failed.ended()
        assert not held(holder)
        monkeypatch.undo()
        again = page_stream(queued_job, session) if kind == "dashboard" else status_stream(tenant, queued_job)
        assert await again.open() == 200, again.content
        await again.leave()

    asyncio.run(scenario())


def test_a_stream_whose_request_task_is_cancelled_leaves_no_slot_held(
    tenant: dict[str, Any], queued_job: Job, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server cancels the application's task while the stream runs (as one that stops does). Django's handler is
    cancelled where it waits for its own tasks, which it leaves running: the request has ended for the server, and
    its slot is given back with it."""
    settings.STREAMS_PER_API_KEY = 1

    async def scenario() -> None:
        stream = status_stream(tenant, queued_job)
        assert await stream.open() == 200
        assert held(key(tenant))
        assert stream.task is not None
        stream.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream.task
        assert not held(key(tenant))
        # The response Django's handler left sending runs on, uncounted, until the loop's end cancels it.

    asyncio.run(scenario())
