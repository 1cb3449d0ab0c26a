"""A database connection that dies at the moment a test names, as it does in a failover, a pooler's restart or a
server that ends the backend: on PostgreSQL the request's own backend is ended (``pg_terminate_backend``, so what
reaches the code is the error psycopg raises on a dead connection); on SQLite, where no connection can be killed, the
OperationalError SQLite raises for a disk with no room is raised at the same seam."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from django.db import OperationalError, connections

KILL_MYSELF = "SELECT pg_terminate_backend(pg_backend_pid())"


def lose_the_connection() -> None:
    """Kills this thread's connection now and raises what the code then sees."""
    wrapper = connections["default"]
    if wrapper.vendor == "postgresql":
        with wrapper.wrap_database_errors:
            wrapper.connection.execute(KILL_MYSELF)
    raise OperationalError("database or disk is full")


@contextmanager
def commit_lost(monkeypatch: pytest.MonkeyPatch, wrote: Callable[[], bool], *, after_commit: bool) -> Iterator[None]:
    """The COMMIT of the first transaction for which ``wrote()`` (a query inside it) is true: the connection dies just
    before it (rolled back) or just after it (committed, its answer lost). Other commits go through."""
    wrapper = connections["default"]
    real = wrapper._commit

    def commit() -> Any:
        if not wrote():
            return real()
        monkeypatch.setattr(wrapper, "_commit", real)  # once
        if after_commit:
            real()
        lose_the_connection()
        return None

    monkeypatch.setattr(wrapper, "_commit", commit)
    yield
    monkeypatch.setattr(wrapper, "_commit", real)


@contextmanager
def queries_fail() -> Iterator[None]:
    """Every statement on this thread's connection fails as on a database that cannot be reached: PostgreSQL's
    backend is ended first (so the error is psycopg's own on the next statement), SQLite's disk is "full"."""
    wrapper = connections["default"]
    wrapper.ensure_connection()
    if wrapper.vendor == "postgresql":
        with suppress(OperationalError):
            lose_the_connection()
        wrapper.ensure_connection = _refused
        try:
            yield
        finally:
            del wrapper.ensure_connection  # the class's again
            wrapper.close()
        return

    def full(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        raise OperationalError("database or disk is full")

    with wrapper.execute_wrapper(full):
        yield


def _refused() -> None:
    raise OperationalError('connection to server at "127.0.0.1", port 5432 failed: Connection refused')
