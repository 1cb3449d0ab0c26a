"""Rows every request reads and that seldom change (an endpoint, a price line), kept in this process's memory.

A request that submits a job reads its endpoint and its price; both change a few times a month, by an operator.
A ``GenerationMemo`` keeps what a lookup answered, stamped with the platform's cache **generation**
(accounts/key_cache.py): the token every change that a kept answer could miss replaces, on commit, and publishes on
Redis. A process hears the new token on its subscription and stops using every stamped answer at once, so a change
(an endpoint disabled, a price added) reaches every process as soon as the message does, not when a TTL runs out;
the TTL (``seconds``) only bounds what a change no signal sees (a data migration, a raw SQL edit) can leave behind.
The callers' models announce their changes through ``key_cache.forget_all`` (``post_save``/``post_delete``
receivers, and the few queryset ``update()`` calls by hand).

Nothing is kept where the generation is not shared and answering (a local-memory cache, Redis down), nor by a
transaction that has itself changed a row the memos keep (it may roll back, and what it read must not outlive it):
then every call reads the database. Values are kept pickled, so each caller gets objects of its own that
it may change without touching another request's.
"""

from __future__ import annotations

import pickle
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from accounts import key_cache

Value = TypeVar("Value")

_memos: weakref.WeakSet[GenerationMemo[Any]] = weakref.WeakSet()


def clear_all() -> None:
    """Empties every memo of this process (a test that starts from empty tables)."""
    for memo in list(_memos):
        memo.clear()


class GenerationMemo(Generic[Value]):
    """Answers of one lookup by key, kept while the generation stays the same (and ``seconds`` at most)."""

    def __init__(self, name: str, *, seconds: float = 60.0, max_entries: int = 10_000) -> None:
        self.name = name
        self.seconds = seconds
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[str, float, bytes]] = {}
        self._lock = threading.Lock()
        _memos.add(self)

    def get(
        self, key: Hashable, load: Callable[[bool], Value], *, valid: Callable[[Value], bool] | None = None
    ) -> Value:
        """The answer kept for ``key`` under the current generation, else ``load(kept)``'s, kept for the next call.

        ``load`` is told whether its answer will be kept (False: nothing can be kept now, so it need not work out
        how long its answer holds). ``valid``: whether a kept answer still applies to this call (a price line kept for
        one period of time, asked about another moment); an answer it refuses is loaded again and replaces it.
        """
        current = key_cache.generation()
        if current is None or key_cache.changed_in_this_transaction():
            # Not shared, or read in a transaction that changed a kept row: what it reads may never commit.
            return load(False)
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[0] == current and entry[1] > now:
            value: Value = pickle.loads(entry[2])  # noqa: S301 - bytes this process pickled itself
            if valid is None or valid(value):
                return value
        value = load(True)
        kept = (current, now + self.seconds, pickle.dumps(value))
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[key] = kept
        return value

    def forget(self, key: Hashable) -> None:
        """Drops what is kept for ``key``: the next call loads it."""
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
