"""Bounds on the event streams a caller holds open: how many at once, and for how long each.

Every open stream (the queue API's status stream, the run stream, the dashboard's status stream) waits on the event
loop of a web process and looks at its job every few seconds: one API key opening thousands would starve the web
processes for everyone. So:

- **A cap on the streams open at once** per API key (``STREAMS_PER_API_KEY``, status and run streams together) and
  per dashboard user (``STREAMS_PER_DASHBOARD_USER``). One more is answered 429 ``too_many_streams`` with
  ``Retry-After``, before anything is submitted or sent, as the API's other limits answer.
- **A longest life** (``STREAM_MAX_SECONDS``): past it the stream ends with one last event, ``event: reconnect``,
  whose data is ``{"type": "reconnect", "reason": "stream_max_duration", "detail", ...the request's status object}``
  (its ``status_url`` and ``response_url`` among it). The request goes on: the client opens the stream again or polls.
  A browser's ``EventSource`` reconnects by itself when a stream ends (a named event does not reach ``onmessage``);
  fal's clients read any ``data:`` line, so ``type`` tells them the stream ended without an end of the request.
- **An outage ends it too**: a database or Redis that fails under one of its looks ends the stream with
  ``event: error``, data ``{"type": "error", "detail", "error_type": "service_unavailable", "request_id"}``; the
  request goes on.

The slots are kept in Redis, shared by every web process: one sorted set per key or user, of the stream ids open
under it, each scored with the moment its slot lapses, by Redis's own clock (``TIME``, read inside the scripts): web
hosts whose clocks disagree would otherwise take each other's live slots for lapsed, or keep dead ones. An open stream
moves that moment on as it runs (at its first event once a quarter of ``SLOT_SECONDS`` has passed: a stream sends one
every keep-alive at least, 10 to 15 s), and gives its slot back when it ends, whichever way (its end, the client gone,
the lifetime); a slot whose process died lapses by itself after ``SLOT_SECONDS``. Taking a slot is one Lua script (drop
lapsed slots, count, add), so two processes never both take the last one.

A slot is given back once, when its request ends, however it ends: a slot taken is handed to the request's end
(``config.request_threads.at_request_end``), which the web process's outermost ASGI layer runs whatever became of the
response. That covers a response Django's handler never gets, which nothing else could close: a client gone while it
passes back through the session and messages middleware (their thread hops after the view; the handler cancels the
view's task there and drops what the hop returns), a middleware raising on it (an error page answered instead), the
application's task cancelled. Each way a stream ends gives it back as it happens too, the request's end then finding
it given back:

- the body's end, or the client gone while it runs (Django cancels the body): ``bounded``'s ``finally``;
- gone before the body's first event (Django's handler cancels its send of the answer's start, and never starts the
  body's iterator, so nothing inside the body runs): when Django's handler closes the response (``EventStream.close``);
- gone while the slot is being taken (in a thread; the run stream takes it in its submission's thread): the view is
  cancelled but the thread goes on, so the taking is shielded from the cancellation and what it took is given back
  as it returns (``finish_or_undo``; a take that ends after its request is given back by ``at_request_end`` at once);
- gone while the slot is renewed: the release waits for the renewal in flight, and a renewal only moves the lapse of
  a slot still in its set (as ``ZADD XX``), so a renewal never takes a given-back slot again.

While Redis cannot be reached (or without ``REDIS_URL``) the slots are kept in this process's memory, as the rate limit
counts there (``accounts.limits``): a stream still opens, and a key is held to the cap per process (counting the streams
this process opened or renewed meanwhile, never more than Redis would) rather than not at all; the outage is logged.
Chosen over refusing every stream (failing closed) and over lifting the cap at once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from rest_framework import exceptions, status

from accounts.models import ApiKey
from accounts.outages import OUTAGES
from config.request_threads import at_request_end
from inference.models import Job
from inference.presenters import status_payload

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A slot its stream has not renewed for this long is free again: the stream's process died without giving it back.
# A stream renews it at a quarter of this, between two of its events (keep-alives come every 10 to 15 s).
SLOT_SECONDS = 60.0
ERROR_TYPE = "too_many_streams"
END_REASON = "stream_max_duration"
# After a failed call Redis is not asked again for this long (then one call tries it), as the cache's breaker.
BREAKER_SECONDS = 1.5
LOG_EVERY_SECONDS = 30.0
_SOCKET_SECONDS = 0.5

# The scripts score slots by Redis's clock, the one every web host reads alike (a number: Lua would cut an integer
# reply's fraction, so the seconds until a lapse come back as a string).
_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
"""

# KEYS[1]: the holder's sorted set. ARGV: the slot's life in seconds, the cap, the stream id, the set's own expiry.
# Returns {1} for a slot taken, or {0, the seconds until the first slot lapses} when the cap is reached.
TAKE_SLOT = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, tostring(tonumber(first[2]) - now)}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1}
"""
)

# KEYS[1]: the holder's sorted set. ARGV: the stream id, the slot's life in seconds, the set's own expiry, and "1" to
# add the slot if it is not in the set (one taken in a process's memory while Redis was down).
# Returns 1 when the slot is in the set with its new lapse, 0 when it was not there and is not added: it was given
# back (or lapsed), and a renewal never takes a slot again.
RENEW_SLOT = (
    _NOW
    + """
if ARGV[4] ~= '1' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
)


@dataclass(frozen=True)
class Holder:
    """Whose streams are counted together: one API key, or one dashboard user."""

    bucket: str
    limit: int
    who: str  # for the refusal: "this API key"


def api_key_holder(api_key: ApiKey) -> Holder:
    return Holder(f"key:{api_key.pk}", int(settings.STREAMS_PER_API_KEY), "this API key")


def api_key_holder_of(request: HttpRequest) -> Holder:
    """The holder of a request its DRF view let in with an API key (DRF sets ``auth`` on Django's request too)."""
    api_key = getattr(request, "auth", None)
    if not isinstance(api_key, ApiKey):
        raise TypeError("The request was not let in with an API key.")
    return api_key_holder(api_key)


def dashboard_holder(user_id: Any) -> Holder:
    return Holder(f"user:{user_id}", int(settings.STREAMS_PER_DASHBOARD_USER), "this user")


class TooManyStreams(exceptions.APIException):
    """429 ``too_many_streams``; DRF's handler sends ``wait`` as ``Retry-After``, as it does for the rate limit."""

    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_code = ERROR_TYPE

    def __init__(self, holder: Holder, wait: int) -> None:
        super().__init__(
            f"Too many open streams for {holder.who}: at most {holder.limit} at once. Close one, or poll the "
            f"request's status URL instead; a slot frees within {wait} s.",
            code=ERROR_TYPE,
        )
        self.wait = wait

    def response(self) -> JsonResponse:
        """The refusal as the async views answer it, the same body and header as through DRF."""
        body = {"detail": str(self.detail), "error_type": ERROR_TYPE}
        return JsonResponse(body, status=self.status_code, headers={"Retry-After": str(self.wait)})


@dataclass
class Slot:
    """One open stream's place under its holder's cap."""

    holder: Holder
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    renewed_at: float = field(default_factory=time.monotonic)
    released: bool = False
    # Held through a renewal's round trip: a release waits for the renewal in flight, so the renewal never lands
    # after the release (the stream's end runs in another thread than its renewal, as the client goes mid-renewal).
    _renewing: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def renewal_due(self) -> bool:
        return time.monotonic() - self.renewed_at >= SLOT_SECONDS / 4

    def renew(self) -> None:
        with self._renewing:
            self.renewed_at = time.monotonic()
            if not self.released:
                _slots.renew(self.holder.bucket, self.stream_id)

    def release(self) -> None:
        with self._renewing:
            if self.released:
                return
            self.released = True
        _slots.release(self.holder.bucket, self.stream_id)


class _Slots:
    """The slots of this process's view: in Redis when it answers, else in this process's memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local: dict[str, dict[str, float]] = {}  # bucket -> stream id -> lapse (time.monotonic())
        self._clients: dict[str, redis.Redis] = {}
        self._take_script: Any = None
        self._renew_script: Any = None
        self._skip_until = 0.0
        self._down_since: float | None = None
        self._last_logged = 0.0

    # Redis, with a breaker.

    def _client(self) -> redis.Redis | None:
        url = settings.REDIS_URL
        if not url or time.monotonic() < self._skip_until:
            return None
        client = self._clients.get(url)
        if client is None:
            with self._lock:
                client = self._clients.setdefault(
                    url,
                    redis.Redis.from_url(url, socket_connect_timeout=_SOCKET_SECONDS, socket_timeout=_SOCKET_SECONDS),
                )
        return client

    def _failed(self, operation: str, exc: Exception) -> None:
        now = time.monotonic()
        self._skip_until = now + BREAKER_SECONDS
        if self._down_since is None:
            self._down_since = self._last_logged = now
            logger.warning("stream slots not kept in Redis (%s: %s): kept in this process's memory", operation, exc)
        elif now - self._last_logged >= LOG_EVERY_SECONDS:
            self._last_logged = now
            logger.warning("stream slots still in process memory after %.0f s: %s", now - self._down_since, exc)

    def _answered(self) -> None:
        if self._down_since is not None:
            logger.info("stream slots kept in Redis again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None

    @staticmethod
    def _key(bucket: str) -> str:
        return cache.make_key(f"streams:{bucket}")

    # The operations.

    def take(self, holder: Holder, stream_id: str) -> float:
        """Takes a slot for ``stream_id``; 0 if taken, else the seconds until one lapses (more than 0)."""
        client = self._client()
        if client is not None:
            try:
                if self._take_script is None:
                    self._take_script = client.register_script(TAKE_SLOT)
                answer = self._take_script(
                    keys=[self._key(holder.bucket)],
                    args=[repr(SLOT_SECONDS), holder.limit, stream_id, math.ceil(SLOT_SECONDS) + 1],
                    client=client,
                )
            except (redis.RedisError, OSError) as exc:
                self._failed("take", exc)
            else:
                self._answered()
                return 0.0 if int(answer[0]) else max(float(answer[1]), 0.001)
        return self._take_locally(holder, stream_id)

    def renew(self, bucket: str, stream_id: str) -> None:
        with self._lock:
            # Taken (or renewed) in memory while Redis was down: it is open, so it counts in Redis too once it is back.
            kept_here = stream_id in self._local.get(bucket, {})
        client = self._client()
        if client is not None:
            try:
                if self._renew_script is None:
                    self._renew_script = client.register_script(RENEW_SLOT)
                self._renew_script(
                    keys=[self._key(bucket)],
                    args=[stream_id, repr(SLOT_SECONDS), math.ceil(SLOT_SECONDS) + 1, "1" if kept_here else "0"],
                    client=client,
                )
            except (redis.RedisError, OSError) as exc:
                self._failed("renew", exc)
            else:
                self._answered()
                return
        with self._lock:
            self._local.setdefault(bucket, {})[stream_id] = time.monotonic() + SLOT_SECONDS

    def release(self, bucket: str, stream_id: str) -> None:
        with self._lock:
            held = self._local.get(bucket)
            if held is not None:
                held.pop(stream_id, None)
                if not held:
                    del self._local[bucket]
        client = self._client()
        if client is not None:
            try:
                client.zrem(self._key(bucket), stream_id)
            except (redis.RedisError, OSError) as exc:
                self._failed("release", exc)  # it lapses by itself
            else:
                self._answered()

    def _take_locally(self, holder: Holder, stream_id: str) -> float:
        now = time.monotonic()
        with self._lock:
            held = self._local.setdefault(holder.bucket, {})
            for lapsed in [stream for stream, lapse in held.items() if lapse <= now]:
                del held[lapsed]
            if len(held) >= holder.limit:
                return max(min(held.values()) - now, 0.001)
            held[stream_id] = now + SLOT_SECONDS
            return 0.0

    def forget_local(self) -> None:
        with self._lock:
            self._local.clear()


_slots = _Slots()


def forget_local_slots() -> None:
    """Drops the slots kept in this process's memory (a test that starts from none)."""
    _slots.forget_local()


def take_slot(holder: Holder) -> Slot:
    """A slot under ``holder``'s cap for a stream about to open; raises ``TooManyStreams`` when none is free. The slot
    is given back when the request that takes it ends, at the latest."""
    slot = Slot(holder)
    wait = _slots.take(holder, slot.stream_id)
    if wait > 0:
        raise TooManyStreams(holder, wait=max(1, math.ceil(wait)))
    at_request_end(lambda: slot.release())  # ``Slot.release`` as it is then: a test's dying process stubs it
    return slot


async def open_slot(holder: Holder) -> Slot | JsonResponse:
    """``take_slot`` for an async view: the slot, or the 429 to answer. A view cancelled while the slot is being
    taken (its client gone) leaves no slot held: it is given back as the taking ends (``finish_or_undo``)."""
    try:
        return await finish_or_undo(sync_to_async(take_slot, thread_sensitive=False)(holder), undo=Slot.release)
    except TooManyStreams as refused:
        return refused.response()


async def finish_or_undo(work: Awaitable[T], *, undo: Callable[[T], None]) -> T:
    """``await work``; the caller cancelled meanwhile (its client gone), ``work`` is left to end (a thread it runs in
    ends anyway, as ``sync_to_async`` lets it) and ``undo`` is called with what it made, in a thread, as soon as it
    has made it: a slot it took is given back rather than dropped where no one can give it back."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # Also when ``work`` had ended and the cancellation came before the caller ran again: undone at once.
        task.add_done_callback(functools.partial(_undo_when_done, undo))
        raise


def _undo_when_done(undo: Callable[[T], None], task: asyncio.Future[T]) -> None:
    if task.cancelled() or task.exception() is not None:
        return  # nothing made (a refusal, an error): nothing to undo
    made = task.result()
    try:
        task.get_loop().run_in_executor(None, undo, made)
    except RuntimeError:  # the loop's threads are shut down (the process is stopping): undone here
        undo(made)


def _end_event(job_id: uuid.UUID, request: HttpRequest) -> bytes:
    """The last event of a stream that reached its longest life: where its request stands, and to come back."""
    try:
        job = Job.objects.select_related("endpoint").get(pk=job_id)
        payload = status_payload(job, request, with_logs=False)
    finally:
        if not connection.in_atomic_block:
            connection.close()  # as every look of a stream: no connection held once it is done
    event = {
        "type": "reconnect",
        "reason": END_REASON,
        "detail": (
            f"This stream reached its longest life ({settings.STREAM_MAX_SECONDS:g} s); the request goes on. "
            "Open the status stream again, or poll status_url."
        ),
        **payload,
    }
    return f"event: reconnect\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def _unavailable_event(job_id: uuid.UUID) -> bytes:
    """The last event of a stream whose database or Redis failed: ``{type, detail, error_type, request_id}``, written
    from nothing the failed service holds."""
    event = {
        "type": "error",
        "detail": "A service this stream reads could not be reached; the request goes on. Open the stream again "
        "shortly, or poll status_url.",
        "error_type": "service_unavailable",
        "request_id": str(job_id),
    }
    return f"event: error\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


class EventStream(StreamingHttpResponse):
    """A stream's response: ``events`` bounded (``bounded``), its slot given back when Django is done with it.

    Django closes every response it has sent (``close()``, on a request thread), the client gone or not, even one
    whose body it never started: it starts the body only once the answer's start is sent, and a client gone then
    cancels that send. An async generator never started runs nothing, its ``finally`` neither; ``close()`` runs."""

    def __init__(
        self, events: AsyncGenerator[bytes, None], *, slot: Slot, job_id: uuid.UUID, request: HttpRequest
    ) -> None:
        super().__init__(bounded(events, slot=slot, job_id=job_id, request=request), content_type="text/event-stream")
        self.slot = slot

    def close(self) -> None:
        try:
            self.slot.release()  # at once when the body's end gave it back already
        finally:
            super().close()


async def bounded(
    events: AsyncGenerator[bytes, None], *, slot: Slot, job_id: uuid.UUID, request: HttpRequest
) -> AsyncIterator[bytes]:
    """``events`` (a stream's body), ended at ``STREAM_MAX_SECONDS`` with the ``reconnect`` event, its slot renewed
    while it runs and given back when it ends: at its own end, when the client goes (Django cancels the response) or
    at its longest life."""
    ends_at = asyncio.get_running_loop().time() + float(settings.STREAM_MAX_SECONDS)
    try:
        while True:
            try:
                async with asyncio.timeout_at(ends_at) as lifetime:
                    chunk = await anext(events)
            except StopAsyncIteration:
                return
            except OUTAGES as error:
                # The database or Redis failed under a look: the stream ends with an event that says so, not cut
                # off mid-answer; the request goes on, and the client opens the stream again or polls status_url.
                logger.error("stream of %s: a service failed under it: %s", job_id, error, exc_info=error)
                yield _unavailable_event(job_id)
                return
            except TimeoutError:
                if not lifetime.expired():
                    raise
                # The events' wait was cancelled where it stood (its watch unregistered, its look discarded).
                yield await sync_to_async(_end_event, thread_sensitive=False)(job_id, request)
                return
            yield chunk
            if slot.renewal_due:
                await sync_to_async(slot.renew, thread_sensitive=False)()
    finally:
        try:
            await events.aclose()  # suspended at an event when the client went: its watch is let go now
        finally:
            await sync_to_async(slot.release, thread_sensitive=False)()
