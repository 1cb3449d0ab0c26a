"""Per-key request rate limits (a sliding-window counter in the shared cache, leased to each process).

Every request is counted against the key's limit in Redis, shared by every web process, but not one round trip per
request: a process takes a lease of requests from the window's counter (one Lua script: the counter grows by the
lease, only as far as the limit allows) and answers the next requests of that key from it in memory. A lease starts
at one request and doubles, up to ``MOST_LEASED``, while the process spends each lease within ``LEASE_SECONDS``, so a
key sending a request now and then is counted one by one and a busy key costs one round trip per 16 requests (the
round trip was a fifth of an authenticated request's CPU). No lease takes more than a 64th of the room left under the
limit (``config.cache.LEASE_SHARE``), so below 128 left leases are of one request and every process still gets its
share: a key whose client sends exactly its limit, each request to any of up to 32 processes, is refused none of it.

What leases change: a key is never let past its limit (every request served is one the counter granted, checked
against the limit when it was granted, and the window only frees room as time passes). A lease a process does not
spend before the minute ends counts as used, so a key that sends a burst and stops may be refused a few requests
sooner than by an exact count: at most a 64th of the room left per process.
A key's new limit applies from its next lease.

While Redis is down the cache counts in each process's memory (config/cache.py), so the limit
still holds, per web process: a key gets at most (processes x limit) requests a minute until Redis
is back. Chosen over failing closed (an outage would refuse every request) and over failing open
(an outage would lift every limit at once). Any other cache error fails open for that request.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from django.core.cache import cache
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from accounts.models import ApiKey
from config.cache import lease_size, room_in_window

if TYPE_CHECKING:
    from rest_framework.views import APIView

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60
# The most requests one lease takes, and how soon a lease must be spent for the next one to be twice as big.
MOST_LEASED = 16
LEASE_SECONDS = 1.0
# Leases a process keeps: past it, those of past windows go, or all but the newest if this window's alone are many.
LEASES_KEPT = 10_000


@dataclasses.dataclass
class Lease:
    """Requests of one bucket this process may still serve in ``window`` under ``limit``."""

    window: int
    limit: int
    left: int
    size: int
    taken_at: float


class Limiter:
    """One process's view of the rate limits: the leases it holds (one per bucket), shared by its threads."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def check(self, *, bucket: str, limit: int, now: float) -> float:
        """``check_rate`` for this process."""
        window = int(now // WINDOW_SECONDS)
        with self._lock:
            lease = self._leases.get(bucket)
            want = 1
            if lease is not None and lease.window == window and lease.limit == limit:
                if lease.left > 0:
                    lease.left -= 1
                    return 0.0
                if now - lease.taken_at < LEASE_SECONDS:
                    want = min(2 * lease.size, MOST_LEASED)  # spent within a second of being taken: twice as many
        elapsed = now - window * WINDOW_SECONDS
        weight = (WINDOW_SECONDS - elapsed) / WINDOW_SECONDS
        current_key = f"ratelimit:{bucket}:{window}"
        previous_key = f"ratelimit:{bucket}:{window - 1}"
        try:
            count, previous, granted = _lease(current_key, previous_key, limit=limit, weight=weight, want=want)
        except Exception as exc:
            # Not an outage (the cache answers those from process memory) but an error of the cache itself: the
            # request goes through uncounted rather than fail.
            logger.warning("rate limit not checked for %s: %s", bucket, exc)
            return 0.0
        if granted:
            self._keep(bucket, Lease(window=window, limit=limit, left=granted - 1, size=granted, taken_at=now))
            return 0.0
        if count >= limit:
            # This window is full: wait for the next one, and then until this window's weight in it
            # has shrunk enough for one more request: count * (1 - t/60) + 1 <= limit.
            return (WINDOW_SECONDS - elapsed) + (1 - (limit - 1) / count) * WINDOW_SECONDS
        # The previous window's weight must shrink until one more request fits.
        needed_weight = (limit - count - 1) / previous
        return max((1 - needed_weight) * WINDOW_SECONDS - elapsed, 0.001)

    def forget(self) -> None:
        with self._lock:
            self._leases.clear()

    def unspent(self, bucket: str, window: int) -> int:
        """Requests of ``bucket`` leased in ``window`` this process has not served yet."""
        with self._lock:
            lease = self._leases.get(bucket)
            return lease.left if lease is not None and lease.window == window else 0

    def _keep(self, bucket: str, lease: Lease) -> None:
        with self._lock:
            kept = self._leases.get(bucket)
            if kept is not None and kept.window == lease.window and kept.limit == lease.limit:
                lease.left += kept.left  # another thread's lease of the same window, not yet spent
            self._leases[bucket] = lease
            if len(self._leases) > LEASES_KEPT:
                # Past windows' leases are spent or void; if all are this window's, all go (what they held unspent
                # counts as used, as at a minute's end). Either way the next prune is thousands of leases away.
                stale = [name for name, kept in self._leases.items() if kept.window < lease.window]
                if len(self._leases) - len(stale) > LEASES_KEPT // 2:
                    stale = [name for name in self._leases if name != bucket]
                for name in stale:
                    del self._leases[name]


_limiter = Limiter()


def forget_leases() -> None:
    """Drops this process's leases (a test that clears the counters they were taken from)."""
    _limiter.forget()


def check_rate(*, bucket: str, limit: int, now: float | None = None) -> float:
    """Counts one request against ``limit`` per minute; returns 0 if allowed, else seconds to wait.

    Sliding-window counter: this minute's count plus the previous minute's, weighted by how much of
    it still lies inside the last 60 seconds. Refused requests are not counted, so a client that
    backs off as told by ``Retry-After`` gets through. Served from this process's lease while it lasts.
    """
    return _limiter.check(bucket=bucket, limit=limit, now=time.time() if now is None else now)


def _lease(current: str, previous: str, *, limit: int, weight: float, want: int) -> tuple[int, int, int]:
    """The count before the lease, the previous window's count and the requests granted: one round trip on the
    platform's Redis cache; on any other cache, three calls and a lease of one."""
    timeout = 2 * WINDOW_SECONDS
    leasing = getattr(cache, "lease_in_window", None)
    if leasing is not None:
        return leasing(current, previous, timeout=timeout, limit=limit, weight=weight, want=want)
    cache.add(current, 0, timeout=timeout)
    count = cache.incr(current) - 1
    earlier = int(cache.get(previous, 0))
    if lease_size(room=room_in_window(count=count, previous=earlier, limit=limit, weight=weight), want=1):
        return count, earlier, 1
    cache.decr(current)
    return count, earlier, 0


class ApiKeyRateThrottle(BaseThrottle):
    def __init__(self) -> None:
        self._wait = 0.0

    def allow_request(self, request: Request, view: APIView) -> bool:
        api_key = request.auth
        if not isinstance(api_key, ApiKey):
            return True
        self._wait = check_rate(bucket=f"key:{api_key.pk}", limit=api_key.rate_limit_per_minute)
        return self._wait == 0.0

    def wait(self) -> float:
        # Whole seconds, rounded up: Retry-After is an integer and must not invite an early retry.
        return float(math.ceil(self._wait))
