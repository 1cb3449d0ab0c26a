"""Open event streams are bounded (inference/stream_limits.py): one API key holds at most ``STREAMS_PER_API_KEY`` at
once, status and run streams together, and each ends at ``STREAM_MAX_SECONDS`` with a ``reconnect`` event. Unbounded,
one key could open thousands, each looking at the database every few seconds, and starve the web processes.

The streams are served as the web process serves them: the ASGI application (Django's handler behind
``config.request_threads.RequestThreads``) driven as a server drives it, a client that leaves sending
``http.disconnect``. Transactional: the streams look at the jobs from other threads."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from billing.ledger import grant_credits
from config.asgi import django_application
from config.request_threads import RequestThreads
from inference import api, stream_limits, streaming
from inference.models import Endpoint, Job
from tests.lifecycle import submit_as
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("priced_without_broker", "credited")]

APP = "platform/tiny-sd"
TIMEOUT = 30
# The life of a dead stream's slot where a test waits for it to lapse (``stream_limits.SLOT_SECONDS``, a minute as the
# platform runs): the requests the test makes before must fit in it on a loaded machine too (a second's life was
# outlived by a pause of the test, and the slot lapsed before the request it should have refused).
SHORT_SLOT_SECONDS = 4.0
CLOSED_PORT = "redis://127.0.0.1:1/0"


class Stream:
    """One request to a stream through the ASGI application, as a server makes it: ``open`` waits for the answer's
    start, ``leave`` hangs up (``http.disconnect``) and waits for the application to be done with it."""

    def __init__(
        self,
        path: str,
        headers: list[tuple[bytes, bytes]],
        *,
        method: str = "GET",
        body: bytes = b"",
        gone_at_start: bool = False,
    ) -> None:
        self.path, self.headers, self.method, self.body = path, headers, method, body
        self.sent: list[dict[str, Any]] = []
        self.task: asyncio.Task[None] | None = None
        self._gone = asyncio.Event()
        self._started = asyncio.Event()
        self._first_call = True
        # The client hangs up as the answer starts: the server's send of its first message is where it notices.
        self._gone_at_start = gone_at_start

    async def _receive(self) -> dict[str, Any]:
        if self._first_call:
            self._first_call = False
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.start":
            self._started.set()
            if self._gone_at_start:
                self._gone.set()
                await asyncio.Event().wait()  # until the application, told of the hang-up, cancels this send

    def _scope(self) -> dict[str, Any]:
        path, _, query = self.path.partition("?")
        return {
            "type": "http",
            "method": self.method,
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": [(b"host", b"testserver"), *self.headers],
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 1234),
            "scheme": "http",
            "root_path": "",
            "http_version": "1.1",
            "asgi": {"version": "3.0"},
        }

    def start(self) -> None:
        """Sends the request without waiting for anything (the task copies the caller's context: its host)."""
        app = RequestThreads(django_application)
        self.task = asyncio.ensure_future(app(self._scope(), self._receive, self._send))

    async def open(self) -> int:
        self.start()
        await asyncio.wait_for(self._started.wait(), TIMEOUT)
        return self.status

    async def leave(self) -> None:
        self._gone.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, TIMEOUT)

    async def ended(self) -> bytes:
        """Waits for the stream to end by itself; its whole body."""
        assert self.task is not None
        await asyncio.wait_for(asyncio.shield(self.task), TIMEOUT)
        return self.content

    @property
    def status(self) -> int:
        return int(next(message["status"] for message in self.sent if message["type"] == "http.response.start"))

    @property
    def response_headers(self) -> dict[str, str]:
        start = next(message for message in self.sent if message["type"] == "http.response.start")
        return {name.decode().lower(): value.decode() for name, value in start["headers"]}

    @property
    def content(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.sent if message["type"] == "http.response.body")


def with_key(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Key {token}".encode())]


def status_stream(tenant: dict[str, Any], job: Job) -> Stream:
    return Stream(f"/queue/{APP}/requests/{job.pk}/status/stream", with_key(tenant["token"]))


def run_stream(tenant: dict[str, Any]) -> Stream:
    body = json.dumps({"prompt": "a lighthouse", "num_inference_steps": 2}).encode()
    headers = [
        *with_key(tenant["token"]),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    return Stream(f"/run/{APP}/stream", headers, method="POST", body=body)


async def leave_all(streams: list[Stream]) -> None:
    for stream in streams:
        if stream.task is not None and not stream.task.done():
            await stream.leave()


def refused_for_too_many(stream: Stream) -> None:
    assert stream.status == 429, stream.content
    body = json.loads(stream.content)
    assert body["error_type"] == "too_many_streams"
    assert "at most" in body["detail"]
    assert 1 <= int(stream.response_headers["retry-after"]) <= stream_limits.SLOT_SECONDS + 1


async def open_refused(stream: Stream) -> None:
    """Opens the stream, which is refused: its key holds all the streams it may."""
    await stream.open()
    refused_for_too_many(stream)


async def open_and_leave(stream: Stream) -> None:
    """Opens the stream, which is let in (its key had a slot free), and hangs up."""
    assert await stream.open() == 200, stream.content
    await stream.leave()


def held_slots(tenant: dict[str, Any]) -> set[str]:
    """The stream ids holding a slot under the tenant's key: in Redis's set, or in this process's memory without
    Redis."""
    bucket = stream_limits.api_key_holder(tenant["api_key"]).bucket
    if not django_settings.REDIS_URL:
        return set(stream_limits._slots._local.get(bucket, {}))
    with redis.Redis.from_url(django_settings.REDIS_URL) as client:
        return {member.decode() for member in client.zrange(stream_limits._Slots._key(bucket), 0, -1)}


async def set_in_thread(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, TIMEOUT)


def events_of(content: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The stream's events: (their name, "message" if none; their data)."""
    found = []
    for block in content.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name = next((line[len("event: ") :] for line in lines if line.startswith("event: ")), "message")
        data = "".join(line[len("data: ") :] for line in lines if line.startswith("data: "))
        found.append((name, json.loads(data)))
    return found


@pytest.fixture(autouse=True)
def _no_slots_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no slot held in this process's memory (those in Redis go with the test's cache keys)."""
    monkeypatch.setattr(stream_limits, "_slots", stream_limits._Slots())


@pytest.fixture
def credited(tenant: dict[str, Any], other_tenant: dict[str, Any]) -> None:
    for each in (tenant, other_tenant):
        grant_credits(organization=each["organization"], amount_micros=10_000_000, reason="Stream tests")


def test_a_key_holds_at_most_its_cap_of_streams_and_a_closed_one_frees_its_slot(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any
) -> None:
    settings.STREAMS_PER_API_KEY = 2
    job = submit_as(tenant, builtin_endpoint)  # no broker: it waits in its queue for ever
    other_job = submit_as(other_tenant, builtin_endpoint)

    async def scenario() -> None:
        streams = [status_stream(tenant, job) for _ in range(2)]
        try:
            assert [await stream.open() for stream in streams] == [200, 200]
            await open_refused(status_stream(tenant, job))
            # A run stream counts against the same cap, and is refused before anything is submitted.
            await open_refused(run_stream(tenant))
            # Another key is not held by this one's streams.
            other = status_stream(other_tenant, other_job)
            streams.append(other)
            assert await other.open() == 200
            # A client that hangs up gives its slot back at once.
            await streams[0].leave()
            again = status_stream(tenant, job)
            streams.append(again)
            assert await again.open() == 200, again.content
        finally:
            await leave_all(streams)

    asyncio.run(scenario())
    assert Job.objects.filter(organization=tenant["organization"]).count() == 1


def test_the_slot_of_a_stream_whose_process_died_lapses_by_itself(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.STREAMS_PER_API_KEY = 1
    monkeypatch.setattr(stream_limits, "SLOT_SECONDS", SHORT_SLOT_SECONDS)
    job = submit_as(tenant, builtin_endpoint)

    async def scenario() -> None:
        dead = status_stream(tenant, job)
        assert await dead.open() == 200
        with monkeypatch.context() as dying:
            # The process dies: nothing gives the slot back, nothing renews it.
            dying.setattr(stream_limits.Slot, "release", lambda self: None)
            dying.setattr(stream_limits.Slot, "renew", lambda self: None)
            await dead.leave()
        await open_refused(status_stream(tenant, job))
        await open_once_lapsed(lambda: status_stream(tenant, job))  # the dead stream's slot lapsed

    asyncio.run(scenario())


async def open_once_lapsed(stream: Callable[[], Stream]) -> None:
    """Opens streams made by ``stream`` until one is let in (a slot that nobody renews lapsed), refused meanwhile for
    too many streams only, and hangs up: a wait on the slot's lapse with a deadline, not a sleep of its life."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        attempt = stream()
        if await attempt.open() == 200:
            await attempt.leave()
            return
        refused_for_too_many(attempt)
        assert time.monotonic() < deadline, f"the slot did not lapse in {TIMEOUT} s"
        await asyncio.sleep(0.2)


def test_an_open_stream_keeps_its_slot_while_it_runs(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream renews its slot as it goes: it does not lapse under a live stream, which would let one more in."""
    settings.STREAMS_PER_API_KEY = 1
    monkeypatch.setattr(stream_limits, "SLOT_SECONDS", 1.0)
    monkeypatch.setattr(api, "STREAM_KEEP_ALIVE_SECONDS", 0.05)  # an event at least every 0.05 s
    job = submit_as(tenant, builtin_endpoint)

    async def scenario() -> None:
        live = status_stream(tenant, job)
        assert await live.open() == 200
        try:
            await asyncio.sleep(2.5)
            await open_refused(status_stream(tenant, job))
        finally:
            await live.leave()

    asyncio.run(scenario())


def test_a_status_stream_ends_at_its_longest_life_telling_the_client_to_come_back(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any
) -> None:
    settings.STREAM_MAX_SECONDS = 1
    settings.STREAMS_PER_API_KEY = 1
    job = submit_as(tenant, builtin_endpoint)

    async def scenario() -> bytes:
        stream = status_stream(tenant, job)
        assert await stream.open() == 200
        content = await stream.ended()
        await open_and_leave(status_stream(tenant, job))  # its slot was given back as it ended
        return content

    events = events_of(asyncio.run(scenario()))
    assert events[0][1]["status"] == "IN_QUEUE"
    name, last = events[-1]
    assert name == "reconnect"
    assert last["type"] == "reconnect"
    assert last["reason"] == "stream_max_duration"
    assert last["status"] == "IN_QUEUE"  # the request goes on
    assert last["request_id"] == str(job.pk)
    assert last["status_url"].endswith(f"/requests/{job.pk}/status")
    job.refresh_from_db()
    assert not job.is_final


def test_a_run_stream_ends_at_its_longest_life_and_its_request_goes_on(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.STREAM_MAX_SECONDS = 1
    monkeypatch.setattr(streaming, "KEEP_ALIVE_SECONDS", 0.05)

    async def scenario() -> bytes:
        stream = run_stream(tenant)
        assert await stream.open() == 200, stream.content
        return await stream.ended()

    events = events_of(asyncio.run(scenario()))
    name, last = events[-1]
    assert (name, last["type"], last["reason"]) == ("reconnect", "reconnect", "stream_max_duration")
    job = Job.objects.get(pk=last["request_id"])
    assert not job.is_final
    assert last["response_url"].endswith(f"/requests/{job.pk}")


def test_streams_still_open_while_redis_is_down(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    settings: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The slots' Redis refusing every connection: the stream opens (the cap is counted in the process's memory,
    as the rate limit is), and the outage is logged."""
    settings.REDIS_URL = CLOSED_PORT
    settings.STREAMS_PER_API_KEY = 1
    caplog.set_level(logging.WARNING, logger="inference.stream_limits")
    job = submit_as(tenant, builtin_endpoint)

    async def scenario() -> None:
        stream = status_stream(tenant, job)
        assert await stream.open() == 200, stream.content
        try:
            await open_refused(status_stream(tenant, job))  # still one per key, in this process
        finally:
            await stream.leave()
        await open_and_leave(status_stream(tenant, job))

    asyncio.run(scenario())
    assert "stream slots not kept in Redis" in caplog.text


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="the slots are shared through Redis")
def test_the_slots_are_shared_by_every_web_process(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot taken by another web process (another process's view: its own memory, the same Redis) counts."""
    settings.STREAMS_PER_API_KEY = 1
    job = submit_as(tenant, builtin_endpoint)
    elsewhere = stream_limits._Slots()
    elsewhere.take(stream_limits.api_key_holder(tenant["api_key"]), "another-process-stream")

    asyncio.run(open_refused(status_stream(tenant, job)))


def slowed(monkeypatch: pytest.MonkeyPatch, operation: str, before: Callable[[], None]) -> threading.Event:
    """``_Slots.<operation>`` with ``before()`` run first in its thread; the event is set once it has returned."""
    done = threading.Event()
    original = getattr(stream_limits._Slots, operation)

    def slow(self: stream_limits._Slots, *args: Any, **kwargs: Any) -> Any:
        before()
        try:
            return original(self, *args, **kwargs)
        finally:
            done.set()

    monkeypatch.setattr(stream_limits._Slots, operation, slow)
    return done


@pytest.mark.parametrize("kind", ["status", "run"])
def test_a_client_gone_while_its_slot_is_taken_leaves_no_slot_held(
    kind: str, tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The view is cancelled at the hang-up while the slot is being taken in a thread (the run stream's submission
    takes it): the take still ends, and its slot is given back at once instead of lapsing a minute later."""
    settings.STREAMS_PER_API_KEY = 1
    job = submit_as(tenant, builtin_endpoint)
    taking = threading.Event()

    def take_slowly() -> None:
        taking.set()
        time.sleep(0.5)

    taken = slowed(monkeypatch, "take", take_slowly)

    async def scenario() -> None:
        stream = status_stream(tenant, job) if kind == "status" else run_stream(tenant)
        stream.start()
        await set_in_thread(taking)
        await stream.leave()
        assert not stream.sent  # gone before any answer
        await set_in_thread(taken)
        await wait_until_async(lambda: not held_slots(tenant), timeout=TIMEOUT, message="the slot given back")
        await open_and_leave(status_stream(tenant, job))

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["status", "run"])
def test_a_client_gone_before_its_stream_sends_an_event_leaves_no_slot_held(
    kind: str, tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any
) -> None:
    """Django's handler is told of the hang-up while it sends the answer's start: the body's iterator never starts,
    so nothing inside it runs (its ``finally`` neither); the handler still closes the response."""
    settings.STREAMS_PER_API_KEY = 1
    job = submit_as(tenant, builtin_endpoint)

    async def scenario() -> None:
        if kind == "status":
            gone = Stream(status_stream(tenant, job).path, with_key(tenant["token"]), gone_at_start=True)
        else:
            template = run_stream(tenant)
            gone = Stream(template.path, template.headers, method="POST", body=template.body, gone_at_start=True)
        assert await gone.open() == 200
        await gone.leave()
        assert not gone.content
        await wait_until_async(lambda: not held_slots(tenant), timeout=TIMEOUT, message="the slot given back")
        await open_and_leave(status_stream(tenant, job))

    asyncio.run(scenario())


def test_a_renewal_racing_the_streams_end_does_not_take_its_slot_again(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client hangs up while the stream renews its slot: the slot given back as the stream ends stays given
    back, even where the renewal reaches the slots after the release."""
    settings.STREAMS_PER_API_KEY = 1
    monkeypatch.setattr(stream_limits, "SLOT_SECONDS", 2.0)  # a renewal due after 0.5 s
    monkeypatch.setattr(api, "STREAM_KEEP_ALIVE_SECONDS", 0.05)  # an event at least every 0.05 s
    job = submit_as(tenant, builtin_endpoint)
    renewing, releasing = threading.Event(), threading.Event()

    def renew_once_the_release_has_begun() -> None:
        renewing.set()
        releasing.wait(1.0)  # where the release waits for the renewal to end, nothing comes

    renewed = slowed(monkeypatch, "renew", renew_once_the_release_has_begun)
    released = slowed(monkeypatch, "release", releasing.set)

    async def scenario() -> None:
        stream = status_stream(tenant, job)
        assert await stream.open() == 200
        await set_in_thread(renewing)
        await stream.leave()
        await set_in_thread(renewed)
        await set_in_thread(released)
        assert not held_slots(tenant)
        await open_and_leave(status_stream(tenant, job))

    asyncio.run(scenario())


HOST_CLOCK_AHEAD: contextvars.ContextVar[float] = contextvars.ContextVar("host_clock_ahead", default=0.0)


@pytest.mark.skipif(not django_settings.REDIS_URL, reason="the slots are shared through Redis")
@pytest.mark.parametrize("ahead", [90.0, -90.0])
def test_web_hosts_whose_clocks_disagree_neither_drop_each_others_slots_nor_pass_the_cap(
    ahead: float, tenant: dict[str, Any], builtin_endpoint: Endpoint, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two web hosts, one's clock ``ahead`` of the other's (each request reads its own host's ``time.time()``),
    serving one key's streams: neither takes the other's live slots for lapsed, and the key stays at its cap."""
    settings.STREAMS_PER_API_KEY = 2
    job = submit_as(tenant, builtin_endpoint)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + HOST_CLOCK_AHEAD.get())

    async def open_on(host_ahead: float) -> Stream:
        stream = status_stream(tenant, job)
        on_host = HOST_CLOCK_AHEAD.set(host_ahead)
        try:
            await stream.open()  # its task, and the threads it calls, keep this host's clock
        finally:
            HOST_CLOCK_AHEAD.reset(on_host)
        return stream

    async def scenario() -> None:
        streams = [await open_on(0.0), await open_on(ahead)]
        try:
            assert [stream.status for stream in streams] == [200, 200]
            for host in (ahead, 0.0):
                over = await open_on(host)
                streams.append(over)
                refused_for_too_many(over)
            assert len(held_slots(tenant)) == 2
        finally:
            await leave_all(streams)

    asyncio.run(scenario())
