"""Whoever waits on a job hears of its moves at once: one Redis message per move, published on commit.

A message only says "look now": waiters (the sync run, the status and streaming event streams) still
read the job from the database, which stays the truth. So a lost message, a Redis outage or a
process without Redis costs latency, never correctness: a waiter also looks every ``FALLBACK_SECONDS``
while it hears messages, and polls on a short, growing interval when it cannot listen at all.

Publishing: ``publish_on_commit(job_id)`` from every move that a waiter can see (a log line, which
every move writes; a heartbeat's progress). It is one ``PUBLISH`` on a pooled connection; after a
failure, publishing is skipped for ``BREAKER_SECONDS`` so an outage costs a move nothing.

Listening: one connection per web process and event loop, ``PSUBSCRIBE job-events:*``, and a table
of local waiters. Every web process hears every job's moves: a few bytes per move, and no subscribe
traffic per waiter however many requests wait. Waiting holds no thread: it is an ``asyncio.Event``.

Cancelling a waiter (its client hung up) or the listener (its event loop closing) ends it wherever the cancellation
lands. On Python 3.11, ``asyncio.wait_for`` loses a cancellation that arrives after the awaitable it wraps has finished
but before the waiting task runs again (CPython gh-86296, fixed in 3.12 only), so nothing here waits through it: waits
are bounded with ``asyncio.timeout``, and the listener's connection has no socket timeout, under which redis-py 8 wraps
every write in ``wait_for`` (``Connection.send_packed_command``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis
from django.conf import settings
from django.db import transaction
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "job-events:"
# While listening, a waiter reads the job at least this often anyway (a lost message, a listener reconnecting).
FALLBACK_SECONDS = 2.0
# Without a listener (no Redis, or it is down): the first look soon, then less often.
POLL_FIRST_SECONDS = 0.02
POLL_MAX_SECONDS = 0.25
BREAKER_SECONDS = 1.5
_SOCKET_SECONDS = 0.5
# The listener's longest read (it reads again after it), and the most its connect and subscribe may take, together.
_READ_SECONDS = 30.0
_CONNECT_SECONDS = 5.0


def channel_of(job_id: uuid.UUID | str) -> str:
    return f"{CHANNEL_PREFIX}{job_id}"


# Publishing (any process: web, workers, housekeeping).

_publisher_lock = threading.Lock()
_publisher: redis.Redis | None = None
_skip_until = 0.0


def publishing_client() -> redis.Redis | None:
    """The process's Redis client for short signals, made on first use: job events, and the end of a submission whose
    job's message went ahead (``inference.dispatch.end_ahead``). Its reads and connects give up after half a second.
    None without ``REDIS_URL``."""
    global _publisher
    if not settings.REDIS_URL:
        return None
    if _publisher is None:
        with _publisher_lock:
            if _publisher is None:
                _publisher = redis.Redis.from_url(
                    settings.REDIS_URL, socket_connect_timeout=_SOCKET_SECONDS, socket_timeout=_SOCKET_SECONDS
                )
    return _publisher


def publish(job_id: uuid.UUID | str) -> None:
    """Tells the waiters of this job to look at it now; never raises."""
    global _skip_until
    client = publishing_client()
    if client is None or time.monotonic() < _skip_until:
        return
    try:
        client.publish(channel_of(job_id), b"1")
    except (redis.RedisError, OSError) as exc:
        _skip_until = time.monotonic() + BREAKER_SECONDS
        logger.info("job events not published for %s s: %s", BREAKER_SECONDS, exc)


def publish_on_commit(job_id: uuid.UUID | str) -> None:
    transaction.on_commit(lambda: publish(job_id), robust=True)


# Listening (web processes, inside their event loop).


class _Listener:
    """One pattern subscription per event loop, and the local waiters of each job."""

    def __init__(self) -> None:
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.live = False  # subscribed now: waiters can rely on messages (plus the fallback look)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            # A context of its own: the listener outlives the request that started it (and that request's thread).
            self._task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            _raise_if_cancelled()
            client = aioredis.Redis.from_url(
                str(settings.REDIS_URL),
                socket_connect_timeout=_SOCKET_SECONDS,
                socket_timeout=None,  # bounded below with asyncio.timeout instead (see the module's docstring)
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),  # this loop reconnects, and has the waiters poll meanwhile
                client_name=listener_client_name(),
            )
            pubsub = client.pubsub()
            try:
                async with asyncio.timeout(_CONNECT_SECONDS):
                    await pubsub.psubscribe(f"{CHANNEL_PREFIX}*")
                _raise_if_cancelled()
                self.live = True
                backoff = 0.1
                self._wake_all()  # anything published while we were not listening: look now
                while True:
                    # A read that fails reconnects once inside redis-py before it raises: bounded as a connect.
                    async with asyncio.timeout(_READ_SECONDS + _CONNECT_SECONDS):
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_READ_SECONDS)
                    _raise_if_cancelled()
                    if message is None:
                        continue
                    channel = message["channel"]
                    name = channel.decode() if isinstance(channel, bytes) else str(channel)
                    for event in self.waiters.get(name, ()):
                        event.set()
            except Exception as exc:  # Redis down or gone: waiters poll until we are back
                if self.live:
                    logger.info("job events listener lost Redis: %s", exc)
                self.live = False
                self._wake_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.live = False
                # Bounded: when the loop itself is closing (a per-call loop of async_to_sync), this task is
                # cancelled, and a close that waits on the cancelled read must not hold the loop's shutdown. The
                # socket is closed before the close's first wait, so an interrupted close still lets go of it.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_SOCKET_SECONDS):
                        await _close(pubsub, client)

    def _wake_all(self) -> None:
        for events in self.waiters.values():
            for event in events:
                event.set()


def listener_client_name() -> str:
    """The name of this process's listener connections, as Redis lists them (``CLIENT LIST``)."""
    return f"job-events-listener-{os.getpid()}"


def _raise_if_cancelled() -> None:
    """Ends the listener when a cancellation asked of it was lost below it: the task still counts it
    (``Task.cancelling``), as a library that really meant to suppress one would have taken it back (``uncancel``)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _close(pubsub: aioredis.client.PubSub, client: aioredis.Redis) -> None:
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()


_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Listener] = weakref.WeakKeyDictionary()


def _listener() -> _Listener | None:
    if not settings.REDIS_URL:
        return None
    loop = asyncio.get_running_loop()
    listener = _listeners.get(loop)
    if listener is None:
        listener = _listeners[loop] = _Listener()
    return listener


class Watch:
    """A waiter's subscription to one job: ``await watch.changed(timeout)`` returns at its next move (or the
    timeout, or at once when no listener can tell it)."""

    def __init__(self, job_id: uuid.UUID | str) -> None:
        self.channel = channel_of(job_id)
        self.event = asyncio.Event()
        self.listener = _listener()
        self._poll = POLL_FIRST_SECONDS

    async def changed(self, timeout: float) -> None:
        if timeout <= 0:
            return
        if self.listener is not None:
            self.listener.start()  # started by the first wait, not by a look that needs none
        if self.listener is not None and self.listener.live:
            self._poll = POLL_FIRST_SECONDS
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timeout, FALLBACK_SECONDS)):
                    await self.event.wait()
        else:
            await asyncio.sleep(min(timeout, self._poll))
            self._poll = min(self._poll * 1.5, POLL_MAX_SECONDS)
        self.event.clear()


@contextlib.asynccontextmanager
async def watching(job_id: uuid.UUID | str) -> AsyncIterator[Watch]:
    """Registered before the caller's first read of the job, so no move between that read and the wait is missed."""
    watch = Watch(job_id)
    if watch.listener is not None:
        watch.listener.waiters.setdefault(watch.channel, set()).add(watch.event)
    try:
        yield watch
    finally:
        if watch.listener is not None:
            events = watch.listener.waiters.get(watch.channel)
            if events is not None:
                events.discard(watch.event)
                if not events:
                    del watch.listener.waiters[watch.channel]
