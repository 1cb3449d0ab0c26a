"""The cache's Redis connections are shared by the whole process, not opened per request.

Django makes a cache object per thread and, under ASGI, per request; each used to bring its own connection pool, so
every authenticated API request (its rate limit is a Redis round trip) connected to Redis anew. The server's own
count: ``tests/e2e/test_sync_waits.py``.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.cache import caches

pytestmark = pytest.mark.skipif(not settings.REDIS_URL, reason="Redis is the cache only with REDIS_URL")


def test_cache_objects_of_one_location_share_one_client() -> None:
    first, second = caches.create_connection("default"), caches.create_connection("default")
    assert first is not second
    assert first._cache.get_client(write=True) is second._cache.get_client(write=True)  # type: ignore[attr-defined]
