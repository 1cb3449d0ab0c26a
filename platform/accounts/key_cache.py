"""Verified API keys kept for a short time, so an authenticated request costs no database query.

A key's row (with its organization, its maker and the maker's current role) is kept in this process's memory and
in the shared cache for ``API_KEY_CACHE_SECONDS``. Every entry is stamped with the **generation**: a random token
in the shared cache that every change touching authentication replaces (a key revoked, edited or deleted; an
organization suspended; a member removed or given another role; a person deactivated: ``forget_all``, called on
commit by accounts.signals and the services), and publishes the new one on Redis. Each process hears it on one
subscription (a daemon thread) and drops what it kept at once, so a request reads the generation from memory, with
no round trip, and uses an entry only if it carries the current one: a change stops the old answer on every process
as soon as the message arrives (Redis delivers it to every subscriber on publish), not when a TTL runs out. While a
process is not subscribed (starting, or its subscription lost) each request reads the generation from the cache
instead, one round trip; on subscribing it starts again with nothing kept. A random token, not a counter: after the
cache loses it (a restart), no old entry can match a new one.

The caller still checks everything that can change with time alone on the kept row (the secret's hash, expiry).

Keys are kept only where the cache is shared between processes (Redis) and answering: a per-process cache (local
memory), or Redis during an outage (config/cache.py answers from process memory then), could not carry another
process's change, so then every request reads the database. A change made during an outage cannot be announced
then; every process that saw the outage replaces the generation at its first request once Redis answers again, so
an entry kept from before the outage is used again only by a process that saw no request during it, and then for
at most ``API_KEY_CACHE_SECONDS`` after it was kept.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import secrets
import threading
import time
import uuid
from typing import Any, cast
from urllib.parse import urlsplit

import redis
from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.redis import RedisCache
from django.db import transaction

from accounts.models import ApiKey

logger = logging.getLogger(__name__)

GENERATION_KEY = "apikeys:generation"
# The process's copy only has to serve hot keys: when it grows past this it starts again empty.
LOCAL_MAX_ENTRIES = 10_000

# Pickled, as in the shared cache: each request gets its own objects, which it may change without touching another's.
_local: dict[uuid.UUID, tuple[str, float, bytes]] = {}
_local_lock = threading.Lock()
# This process saw the shared cache down, or could not replace the generation: it replaces it once it answers.
_announce_pending = False


# Each function takes the default cache from its caller where it can: finding it (a per-request lookup under ASGI)
# several times over was a tenth of what authenticating a request costs.


def _shared(default: Any) -> bool:
    return settings.API_KEY_CACHE_SECONDS > 0 and isinstance(default, RedisCache)


def _enabled(default: Any = None) -> bool:
    default = caches["default"] if default is None else default
    if not _shared(default):
        return False
    # FailSoftRedisCache answers from process memory while Redis is down.
    return not getattr(default, "redis_unavailable", False)


class _Subscription(threading.Thread):
    """This process's ear for generation changes: ``current`` is the generation while ``live``."""

    def __init__(self, location: str, channel: str, cache: Any) -> None:
        super().__init__(name="api-key-generations", daemon=True)
        self.location, self.channel = location, channel
        self.cache = cache  # the cache object it was started for: the same one again needs no comparing
        self.pid = os.getpid()
        self.connected = False  # subscribed: any change from now on arrives as a message
        self.live = False  # connected, and holding the generation
        self.current: str | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        backoff = 0.1
        while not self.stopped.is_set():
            try:
                client = redis.Redis.from_url(self.location, socket_connect_timeout=0.5, health_check_interval=15)
                pubsub = client.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(self.channel)
                if pubsub.get_message(ignore_subscribe_messages=False, timeout=5.0) is None:  # the confirmation
                    raise TimeoutError("no subscription confirmation")
                self.connected = True
                self.refresh()  # subscribed first, then read: a change after the read arrives as a message
                backoff = 0.1
                while not self.stopped.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self.refresh()
            except Exception as exc:  # Redis down or gone: requests read the generation from the cache meanwhile
                if not self.stopped.is_set():
                    logger.info("API key generation subscription lost: %s", exc)
            with _local_lock:
                self.connected = self.live = False
                self.current = None
                _local.clear()
            self.stopped.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def refresh(self) -> None:
        """Holds the generation the cache has now. A message only says it changed: reading it, rather than taking
        the message's token, keeps the latest when two processes' changes cross."""
        current = cache.get(GENERATION_KEY)
        self.adopt(None if current is None else str(current))

    def adopt(self, current: str | None) -> None:
        with _local_lock:
            if current != self.current:
                _local.clear()
            self.current = current
            self.live = self.connected and current is not None


_subscription: _Subscription | None = None
_subscription_lock = threading.Lock()


@atexit.register
def stop_listening() -> None:
    """Stops this process's subscription (at exit, before the streams its logging writes to are closed)."""
    if _subscription is not None:
        _subscription.stopped.set()


def _channel(default: Any = None) -> str:
    # Channels are server-wide, not per database: the database number keeps deployments sharing a server apart.
    default = caches["default"] if default is None else default
    servers = getattr(default, "_servers", None) or [""]
    database = urlsplit(str(servers[0])).path.strip("/") or "0"
    return f"{default.make_key(GENERATION_KEY)}:changed:{database}"


def _subscribed(default: Any = None) -> _Subscription | None:
    """This process's subscription to the current cache's generation channel, started on first use."""
    global _subscription
    default = caches["default"] if default is None else default
    current = _subscription
    if current is not None and current.cache is default and current.pid == os.getpid():
        return current  # the platform's cache is one object per process (config/cache.py)
    servers = getattr(default, "_servers", None)  # Django's RedisCache: the first is the primary
    if not isinstance(servers, list | tuple) or not servers:
        return None
    location = str(servers[0])
    channel = _channel(default)
    if current is not None and (current.pid, current.location, current.channel) == (os.getpid(), location, channel):
        return current
    with _subscription_lock:
        if _subscription is not None and (_subscription.pid, _subscription.location, _subscription.channel) == (
            os.getpid(), location, channel,
        ):  # fmt: skip
            return _subscription
        if _subscription is not None:
            _subscription.stopped.set()
        _subscription = _Subscription(location, channel, default)
        _subscription.start()
        return _subscription


def generation() -> str | None:
    """The current generation, or None when keys may not be kept now (no shared cache, or it is not answering)."""
    global _announce_pending
    default = caches["default"]
    if not _enabled(default):
        # Another process may change a key while Redis is down and be unable to say so: once Redis is back, the
        # first request of every process that saw the outage replaces the generation.
        _announce_pending = _shared(default)
        return None
    if _announce_pending and not _new_generation():
        return None
    heard = _subscribed(default)
    if heard is not None and heard.live and heard.current is not None:
        return heard.current
    try:
        current = cache.get(GENERATION_KEY)
        if current is None:
            cache.add(GENERATION_KEY, secrets.token_hex(8), timeout=None)
            current = cache.get(GENERATION_KEY)
    except Exception as exc:  # the cache failing costs a database read, never the request
        logger.warning("API key cache unavailable: %s", exc)
        return None
    # An answer from process memory (Redis went down during the call) cannot carry another process's change.
    if current is None or not _enabled(default):
        return None
    if heard is not None and heard.connected and not heard.live:
        heard.adopt(str(current))  # read after subscribing: whatever changes next arrives as a message
    return str(current)


def lookup(key_id: uuid.UUID, current: str) -> ApiKey | None:
    """The key's row kept under ``current``, from this process or the shared cache; None if not kept."""
    now = time.monotonic()
    entry = _local.get(key_id)
    if entry is not None and entry[0] == current and entry[1] > now:
        return cast(ApiKey, pickle.loads(entry[2]))  # noqa: S301 - bytes this process pickled itself
    try:
        shared = cache.get(_shared_key(key_id, current))
    except Exception as exc:
        logger.warning("API key cache unavailable: %s", exc)
        return None
    if isinstance(shared, ApiKey):
        _keep_locally(key_id, current, shared)
        return shared
    return None


def keep(api_key: ApiKey, current: str) -> None:
    """Keeps a key just read from the database under the generation read before that read."""
    try:
        cache.set(_shared_key(api_key.pk, current), api_key, timeout=settings.API_KEY_CACHE_SECONDS)
    except Exception as exc:
        logger.warning("API key cache unavailable: %s", exc)
        return
    _keep_locally(api_key.pk, current, api_key)


def forget_all() -> None:
    """Every kept key stops being used at the next request, on every process: call when something authentication
    reads has changed. Inside a transaction it acts now and again on commit, so no request can keep the state of
    before the change (read between the two) for longer than the change takes to commit."""
    _new_generation()
    if transaction.get_connection().in_atomic_block:
        transaction.on_commit(_new_generation)


def changed_in_this_transaction() -> bool:
    """Whether the transaction in progress on this thread's connection changed something ``forget_all`` announces:
    what it reads now may be rolled back, so nothing read now may be kept under any generation."""
    connection = transaction.get_connection()
    return connection.in_atomic_block and any(entry[1] is _new_generation for entry in connection.run_on_commit)


def _new_generation() -> bool:
    """Replaces the generation; False when the shared cache did not take it (then it is replaced when it answers)."""
    global _announce_pending
    with _local_lock:
        _local.clear()
    try:
        if _enabled():
            token = secrets.token_hex(8)
            cache.set(GENERATION_KEY, token, timeout=None)
            if _enabled():
                _announce_pending = False
                _publish(token)
                return True
    except Exception as exc:
        logger.warning("API key cache generation not replaced: %s", exc)
    _announce_pending = _shared(caches["default"])
    return False


def _publish(token: str) -> None:
    """Tells every process's subscription (this one's at once); a process that misses it reads the cache."""
    heard = _subscribed()
    if heard is not None and heard.connected:
        heard.refresh()
    try:
        client = caches["default"]._cache.get_client(write=True)  # type: ignore[attr-defined]
        client.publish(_channel(), token)
    except Exception as exc:
        # Subscribed processes did not hear it: this process replaces (and publishes) it again at its next request.
        global _announce_pending
        _announce_pending = True
        logger.warning("API key generation not published: %s", exc)


def _keep_locally(key_id: uuid.UUID, current: str, api_key: ApiKey) -> None:
    with _local_lock:
        if len(_local) >= LOCAL_MAX_ENTRIES:
            _local.clear()
        _local[key_id] = (current, time.monotonic() + settings.API_KEY_CACHE_SECONDS, pickle.dumps(api_key))


def _shared_key(key_id: Any, current: str) -> str:
    return f"apikeys:{current}:{key_id}"
