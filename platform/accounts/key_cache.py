"""Verified API keys kept for a short time, so an authenticated request costs no database query.

A key's row (with its organization, its maker and the maker's current role) is kept in this process's memory and
in the shared cache for ``API_KEY_CACHE_SECONDS``. Every entry is stamped with the **generation**: a random token
in the shared cache that every change touching authentication replaces (a key revoked, edited or deleted; an
organization suspended; a member removed or given another role; a person deactivated: ``forget_all``, called on
commit by accounts.signals and the services). Each request reads the generation (one cache round trip) and uses an
entry only if it carries the current one, so a change stops the old answer on every process at its very next
request, not when a TTL runs out. A random token, not a counter: after the cache loses it (a restart), no old entry
can match a new one.

The caller still checks everything that can change with time alone on the kept row (the secret's hash, expiry).

Keys are kept only where the cache is shared between processes (Redis) and answering: a per-process cache (local
memory), or Redis during an outage (config/cache.py answers from process memory then), could not carry another
process's change, so then every request reads the database. A change made during an outage cannot be announced
then; every process that saw the outage replaces the generation at its first request once Redis answers again, so
an entry kept from before the outage is used again only by a process that saw no request during it, and then for
at most ``API_KEY_CACHE_SECONDS`` after it was kept.
"""

from __future__ import annotations

import logging
import pickle
import secrets
import threading
import time
import uuid
from typing import Any, cast

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


def _shared() -> bool:
    return settings.API_KEY_CACHE_SECONDS > 0 and isinstance(caches["default"], RedisCache)


def _enabled() -> bool:
    if not _shared():
        return False
    # FailSoftRedisCache answers from process memory while Redis is down.
    return not getattr(caches["default"], "redis_unavailable", False)


def generation() -> str | None:
    """The current generation, or None when keys may not be kept now (no shared cache, or it is not answering)."""
    global _announce_pending
    if not _enabled():
        # Another process may change a key while Redis is down and be unable to say so: once Redis is back, the
        # first request of every process that saw the outage replaces the generation.
        _announce_pending = _shared()
        return None
    if _announce_pending and not _new_generation():
        return None
    try:
        current = cache.get(GENERATION_KEY)
        if current is None:
            cache.add(GENERATION_KEY, secrets.token_hex(8), timeout=None)
            current = cache.get(GENERATION_KEY)
    except Exception as exc:  # the cache failing costs a database read, never the request
        logger.warning("API key cache unavailable: %s", exc)
        return None
    # An answer from process memory (Redis went down during the call) cannot carry another process's change.
    return str(current) if current is not None and _enabled() else None


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


def _new_generation() -> bool:
    """Replaces the generation; False when the shared cache did not take it (then it is replaced when it answers)."""
    global _announce_pending
    with _local_lock:
        _local.clear()
    try:
        if _enabled():
            cache.set(GENERATION_KEY, secrets.token_hex(8), timeout=None)
            if _enabled():
                _announce_pending = False
                return True
    except Exception as exc:
        logger.warning("API key cache generation not replaced: %s", exc)
    _announce_pending = _shared()
    return False


def _keep_locally(key_id: uuid.UUID, current: str, api_key: ApiKey) -> None:
    with _local_lock:
        if len(_local) >= LOCAL_MAX_ENTRIES:
            _local.clear()
        _local[key_id] = (current, time.monotonic() + settings.API_KEY_CACHE_SECONDS, pickle.dumps(api_key))


def _shared_key(key_id: Any, current: str) -> str:
    return f"apikeys:{current}:{key_id}"
