"""The dashboard's status stream (``/dashboard/requests/{id}/events``) is bounded as the API's are
(inference/stream_limits.py): at most ``STREAMS_PER_DASHBOARD_USER`` open at once per person, whatever session or tab
opens them, and each ends at ``STREAM_MAX_SECONDS`` with a ``reconnect`` event (a browser's EventSource then opens
it again by itself). Served through the ASGI application as the web process serves it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.test import Client

from billing.ledger import grant_credits
from inference import stream_limits
from inference.models import Endpoint, Job
from tests.inference.test_stream_limits import Stream, events_of, refused_for_too_many, status_stream
from tests.lifecycle import submit_as

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("priced_without_broker")]


@pytest.fixture(autouse=True)
def _no_slots_left(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_limits, "_slots", stream_limits._Slots())


@pytest.fixture
def queued_job(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> Job:
    grant_credits(organization=tenant["organization"], amount_micros=10_000_000, reason="Stream tests")
    return submit_as(tenant, builtin_endpoint)  # no broker: it waits in its queue for ever


def signed_in(tenant: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """A new session of the tenant's person (another browser)."""
    browser = Client()
    browser.force_login(tenant["user"])
    cookie = f"{django_settings.SESSION_COOKIE_NAME}={browser.cookies[django_settings.SESSION_COOKIE_NAME].value}"
    return [(b"cookie", cookie.encode())]


def page_stream(job: Job, session: list[tuple[bytes, bytes]]) -> Stream:
    return Stream(f"/dashboard/requests/{job.pk}/events", session)


def test_a_person_holds_at_most_their_cap_of_dashboard_streams(
    tenant: dict[str, Any], queued_job: Job, settings: Any
) -> None:
    settings.STREAMS_PER_DASHBOARD_USER = 2
    settings.STREAMS_PER_API_KEY = 1

    sessions = [signed_in(tenant) for _ in range(4)]  # a browser each: the cap is the person's, not the session's

    async def scenario() -> None:
        streams = [page_stream(queued_job, session) for session in sessions[:2]]
        try:
            assert [await stream.open() for stream in streams] == [200, 200]
            over = page_stream(queued_job, sessions[2])
            await over.open()
            refused_for_too_many(over)
            assert json.loads(over.content)["detail"].startswith("Too many open streams for this user")
            # The person's API key has a cap of its own.
            api = status_stream(tenant, queued_job)
            streams.append(api)
            assert await api.open() == 200
            await streams[0].leave()
            again = page_stream(queued_job, sessions[3])
            streams.append(again)
            assert await again.open() == 200, again.content
        finally:
            for stream in streams:
                if stream.task is not None and not stream.task.done():
                    await stream.leave()

    asyncio.run(scenario())


def test_a_dashboard_stream_ends_at_its_longest_life(tenant: dict[str, Any], queued_job: Job, settings: Any) -> None:
    settings.STREAM_MAX_SECONDS = 1

    session = signed_in(tenant)

    async def scenario() -> bytes:
        stream = page_stream(queued_job, session)
        assert await stream.open() == 200
        return await stream.ended()

    events = events_of(asyncio.run(scenario()))
    assert events[0] == ("message", events[0][1])
    name, last = events[-1]
    assert (name, last["type"], last["status"]) == ("reconnect", "reconnect", "IN_QUEUE")
