"""Per-key request rate limits (a sliding-window counter in the shared cache).

While Redis is down the cache counts in each process's memory (config/cache.py), so the limit
still holds, per web process: a key gets at most (processes x limit) requests a minute until Redis
is back. Chosen over failing closed (an outage would refuse every request) and over failing open
(an outage would lift every limit at once). Any other cache error fails open for that request.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from django.core.cache import cache
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from accounts.models import ApiKey

if TYPE_CHECKING:
    from rest_framework.views import APIView

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60


def check_rate(*, bucket: str, limit: int, now: float | None = None) -> float:
    """Counts one request against ``limit`` per minute; returns 0 if allowed, else seconds to wait.

    Sliding-window counter: this minute's count plus the previous minute's, weighted by how much of
    it still lies inside the last 60 seconds. Refused requests are not counted, so a client that
    backs off as told by ``Retry-After`` gets through.
    """
    now = time.time() if now is None else now
    window = int(now // WINDOW_SECONDS)
    elapsed = now - window * WINDOW_SECONDS
    current_key = f"ratelimit:{bucket}:{window}"
    previous_key = f"ratelimit:{bucket}:{window - 1}"
    try:
        # One round trip on the platform's Redis cache; three calls on any other.
        counting = getattr(cache, "count_in_window", None)
        if counting is not None:
            count, previous = counting(current_key, previous_key, 2 * WINDOW_SECONDS)
        else:
            cache.add(current_key, 0, timeout=2 * WINDOW_SECONDS)
            count = cache.incr(current_key)
            previous = int(cache.get(previous_key, 0))
        weight = (WINDOW_SECONDS - elapsed) / WINDOW_SECONDS
        if previous * weight + count <= limit:
            return 0.0
        cache.decr(current_key)
    except Exception as exc:
        # Not an outage (the cache answers those from process memory) but, say, a counter added in
        # Redis just before the cache switched to process memory, where incr finds no key.
        logger.warning("rate limit not checked for %s: %s", bucket, exc)
        return 0.0
    count -= 1
    if count >= limit:
        # This window is full: wait for the next one, and then until this window's weight in it
        # has shrunk enough for one more request: count * (1 - t/60) + 1 <= limit.
        return (WINDOW_SECONDS - elapsed) + (1 - (limit - 1) / count) * WINDOW_SECONDS
    # The previous window's weight must shrink until one more request fits.
    needed_weight = (limit - count - 1) / previous
    return max((1 - needed_weight) * WINDOW_SECONDS - elapsed, 0.001)


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
