"""A worker's tasks keep the database pool's connections between them, and each starts on one from the pool."""

from __future__ import annotations

from typing import Any

import pytest
from celery.signals import task_prerun
from django.conf import settings
from django.db import connection

from config.celery import app
from tests import sessions
from tests.waiting import wait_until


def test_celery_s_django_fixup_keeps_the_pool_between_tasks() -> None:
    # Without a reuse count the fixup closes the connections, and under prefork psycopg's pool, before and after every
    # task: each task then waited for a new PostgreSQL connection (settings.CELERY_DB_REUSE_MAX).
    assert app.conf.get("CELERY_DB_REUSE_MAX") == settings.CELERY_DB_REUSE_MAX > 0


@pytest.mark.django_db(transaction=True)
def test_a_task_starts_by_giving_the_last_task_s_connection_back() -> None:
    connection.ensure_connection()
    held = connection.connection
    assert held is not None
    pool = getattr(connection, "pool", None)
    taken = pool.get_stats().get("requests_num", 0) if pool is not None else 0
    task_prerun.send(sender=None, task_id="t", task=None, args=(), kwargs={})  # a worker's task
    if pool is not None:
        # Given back to the pool (CONN_MAX_AGE is 0 with it), and the task's own taken from it.
        assert pool.get_stats()["requests_num"] == taken + 1
    else:
        assert connection.connection is None  # closed on SQLite, as every task did before
    with connection.cursor() as cursor:  # the task's statements run
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


@pytest.mark.django_db
def test_a_task_run_eagerly_keeps_its_caller_s_connection() -> None:
    from billing.tasks import create_partitions_ahead

    connection.ensure_connection()
    held = connection.connection
    create_partitions_ahead.apply()  # in the caller's transaction (the test's)
    assert connection.connection is held


def _last_statement_at(pid: int, admin: Any) -> Any:
    """When the backend ``pid`` was last sent a statement, as the server says."""
    row = admin.execute("SELECT query_start FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row[0]


@pytest.mark.django_db(transaction=True)
def test_a_task_after_the_database_ended_the_pool_s_idle_connections_runs() -> None:
    # A database restart, a failover or an idle timeout ends the connections the pool keeps between tasks: the next
    # task still starts on a working one, however many of the idle ones were ended.
    if connection.vendor != "postgresql":
        pytest.skip("psycopg's pool: PostgreSQL")
    import psycopg

    pool = connection.pool
    taken = [pool.getconn() for _ in range(3)]  # three connections idle in the pool
    for idle in taken:
        pool.putconn(idle)
    task_prerun.send(sender=None, task_id="t1", task=None, args=(), kwargs={})
    connection.close()  # the task's connection back: every connection this process has is idle in the pool
    conninfo = sessions.conninfo()
    # Every connection this process's pool keeps idle, and only those: other processes (a test's servers) share the
    # database. (The pool's own list of idle connections: psycopg_pool has no public one.)
    ended = {idle.info.backend_pid for idle in pool._pool}
    assert len(ended) >= 3
    with psycopg.connect(**conninfo, autocommit=True) as admin:
        for pid in ended:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])

        def gone() -> bool:
            rows = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [list(ended)])
            return rows.fetchone()[0] == 0

        wait_until(gone, timeout=30, message="the ended backends to exit")
    task_prerun.send(sender=None, task_id="t2", task=None, args=(), kwargs={})  # the next task
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (now,) = cursor.fetchone()
    assert now not in ended


@pytest.mark.django_db(transaction=True)
def test_a_task_starts_on_a_live_idle_connection_without_a_round_trip() -> None:
    # The check of the task's connection is a poll of its socket: a live one is handed over with nothing sent.
    if connection.vendor != "postgresql":
        pytest.skip("psycopg's pool: PostgreSQL")
    import psycopg

    connection.ensure_connection()
    task_prerun.send(sender=None, task_id="t1", task=None, args=(), kwargs={})
    connection.close()
    idle = {conn.info.backend_pid for conn in connection.pool._pool}  # psycopg_pool has no public list of them
    conninfo = sessions.conninfo()
    with psycopg.connect(**conninfo, autocommit=True) as admin:
        before = {pid: _last_statement_at(pid, admin) for pid in idle}
        task_prerun.send(sender=None, task_id="t2", task=None, args=(), kwargs={})
        assert connection.connection is not None  # the task's connection, taken and checked
        pid = connection.connection.info.backend_pid
        assert pid in idle
        assert _last_statement_at(pid, admin) == before[pid]
