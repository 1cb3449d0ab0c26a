"""The cache's Redis connections are shared by the whole process, not opened per request.

Django makes a cache object per thread and, under ASGI, per request; each used to bring its own connection pool, so
every authenticated API request (its rate limit is a Redis round trip) connected to Redis anew. Now equal settings
make one cache object per process. The server's own count: ``tests/e2e/test_sync_waits.py``.
"""

from __future__ import annotations

import threading

import pytest
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings

pytestmark = pytest.mark.skipif(not settings.REDIS_URL, reason="Redis is the cache only with REDIS_URL")


def test_one_cache_object_per_location_serves_every_thread() -> None:
    first = caches.create_connection("default")
    assert caches.create_connection("default") is first
    found: list[object] = []
    other = threading.Thread(target=lambda: found.append(caches["default"]))
    other.start()
    other.join()
    assert found == [first]
    assert caches["default"] is first
    client = first._cache.get_client(write=True)  # type: ignore[attr-defined]
    assert client is first._cache.get_client(write=False)  # type: ignore[attr-defined]  (one server: one pool)
    assert first.add("test-cache-connections", 1, timeout=5) in (True, False)
    assert first.get("test-cache-connections") == 1


def test_other_settings_make_another_cache_object() -> None:
    first = caches.create_connection("default")
    changed = {**settings.CACHES, "default": {**settings.CACHES["default"], "KEY_PREFIX": "another"}}
    with override_settings(CACHES=changed):
        other = caches.create_connection("default")
        assert other is not first
        assert other.make_key("k") != first.make_key("k")
        assert caches.create_connection("default") is other


def test_a_copy_of_the_cache_is_the_cache() -> None:
    import copy

    first = caches["default"]
    assert copy.copy(first) is first
    assert copy.deepcopy({"cache": first})["cache"] is first
