"""A database session of a test's own, beside Django's: to hold a lock, leave a change uncommitted, or watch
``pg_stat_activity`` from outside the transaction under test (PostgreSQL)."""

from __future__ import annotations

from typing import Any


def conninfo() -> dict[str, Any]:
    """The test database's connection parameters as psycopg takes them (``psycopg.connect(**conninfo())``)."""
    from django.db import connection

    params = connection.get_connection_params()
    return {key: params[key] for key in ("dbname", "user", "password", "host", "port") if params.get(key)}
