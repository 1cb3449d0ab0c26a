"""Infrastructure failures on the request path: a database or Redis that cannot be reached, a connection lost, a full
disk. They are answered 503 ``{detail, error_type: "service_unavailable"}`` with ``Retry-After``, logged with their
cause and never shown as a traceback (``accounts.errors.api_exception_handler`` for the API's views,
``config.views.server_error`` for everything else).

A write whose connection fails may have committed all the same (the COMMIT reached the server, its answer did not).
A service that knows its row's key before the insert finds out which on a new connection (``on_a_new_connection``)
and answers what is true: the normal answer when the row is there, a 503 saying nothing was done when it is not
(``inference.submission.submit_job``, ``accounts.services.create_api_key``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connection

from accounts.errors import AppError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What a client is told to wait before trying again: long enough for a failover or a restarted pooler.
RETRY_AFTER_SECONDS = 5
# How long a request looks for a database that answers before it gives up finding out (a failover takes seconds).
LOOK_AGAIN_SECONDS = 3.0


def _outage_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OperationalError, InterfaceError]
    try:
        from redis import exceptions as redis_errors

        types += [redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError]
    except ImportError:  # pragma: no cover - Redis's client is a dependency; without it nothing raises its errors
        pass
    try:
        from kombu.exceptions import OperationalError as BrokerError

        types.append(BrokerError)
    except ImportError:  # pragma: no cover - as for Redis
        pass
    return tuple(types)


# The errors that say a service is out of reach or out of room, not that the request or the code is wrong: Django's
# OperationalError (a server gone, a connection refused or lost, too many connections, SQLite's "database is locked"
# or "database or disk is full", a statement timeout) and InterfaceError (a connection already closed), Redis's
# connection errors and the broker's (kombu's OperationalError).
OUTAGES = _outage_types()


def is_outage(error: BaseException) -> bool:
    return isinstance(error, OUTAGES)


class ServiceUnavailable(AppError):
    """503: a service the request needs could not be reached; the client may try again after ``Retry-After``."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, detail: str, *, retry_after: int = RETRY_AFTER_SECONDS, **extra: Any) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {**super().body(), **self.extra}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


GENERIC_DETAIL = (
    "A service this request needs (the database or the message broker) could not be reached. Try again shortly."
)


def unavailable(error: BaseException, *, where: str) -> ServiceUnavailable:
    """The 503 for ``error`` (an outage) that reached ``where`` (a view's name), logged with its cause."""
    logger.error("%s: %s: %s", where, type(error).__name__, error, exc_info=error)
    return ServiceUnavailable(GENERIC_DETAIL)


def connection_broken() -> bool:
    """Whether this thread's database connection is gone (closed, or lost under a query): nothing more is answered on
    it. Asks the driver's own state, no round trip."""
    raw = connection.connection
    if raw is None:
        return True
    return bool(getattr(raw, "closed", False) or getattr(raw, "broken", False))


def on_a_new_connection(read: Callable[[], T], *, within: float = LOOK_AGAIN_SECONDS) -> T:
    """``read()`` (a short look at the database) over a connection that works, after this thread's failed: the old one
    is dropped (a dead connection answers nothing again, and a pool may hand out another dead one after a restart),
    and the look is tried again while the database does not answer, for ``within`` seconds. Raises the last outage
    when it never answered, and ``DatabaseError`` at once inside a transaction (its connection cannot be replaced:
    the caller's own transaction decides)."""
    deadline = time.monotonic() + within
    pause = 0.05
    while True:
        if connection.in_atomic_block:
            raise DatabaseError("The connection was lost inside a transaction; it cannot be looked at again here.")
        _drop_connection()
        try:
            return read()
        except (OperationalError, InterfaceError) as error:
            if time.monotonic() + pause >= deadline:
                raise
            logger.warning("the database did not answer a look again (%s); trying once more", error)
        time.sleep(pause * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret
        pause = min(pause * 2, 1.0)


def _drop_connection() -> None:
    try:
        connection.close()
    except DatabaseError:  # a dead connection may fail to close: it is gone either way
        connection.connection = None
