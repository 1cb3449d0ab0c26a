"""A worker's tasks keep the database pool's connections between them, and each starts on one from the pool."""

from __future__ import annotations

import pytest
from celery.signals import task_prerun
from django.conf import settings
from django.db import connection

from config.celery import app


def test_celery_s_django_fixup_keeps_the_pool_between_tasks() -> None:
    # Without a reuse count the fixup closes the connections, and under prefork psycopg's pool, before and after every
    # task: each task then waited for a new PostgreSQL connection (settings.CELERY_DB_REUSE_MAX).
    assert app.conf.get("CELERY_DB_REUSE_MAX") == settings.CELERY_DB_REUSE_MAX > 0


@pytest.mark.django_db(transaction=True)
def test_a_task_starts_by_giving_the_last_task_s_connection_back() -> None:
    connection.ensure_connection()
    held = connection.connection
    assert held is not None
    task_prerun.send(sender=None, task_id="t", task=None, args=(), kwargs={})  # a worker's task
    # Given back (to the pool on PostgreSQL, where CONN_MAX_AGE is 0; closed on SQLite, as every task did before).
    assert connection.connection is None
    with connection.cursor() as cursor:  # the next statement takes a connection again
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


@pytest.mark.django_db
def test_a_task_run_eagerly_keeps_its_caller_s_connection() -> None:
    from billing.tasks import create_partitions_ahead

    connection.ensure_connection()
    held = connection.connection
    create_partitions_ahead.apply()  # in the caller's transaction (the test's)
    assert connection.connection is held


@pytest.mark.django_db(transaction=True)
def test_a_task_after_the_database_dropped_the_pool_s_idle_connection_runs() -> None:
    # A database restart, a failover or an idle timeout ends the connections the pool keeps between tasks: the next
    # task's first statement still works (the pool's idle connections are checked at the task's start).
    if connection.vendor != "postgresql":
        pytest.skip("psycopg's pool: PostgreSQL")
    import psycopg

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (held,) = cursor.fetchone()
    task_prerun.send(sender=None, task_id="t1", task=None, args=(), kwargs={})  # back to the pool, idle
    params = connection.get_connection_params()
    conninfo = {key: params[key] for key in ("dbname", "user", "password", "host", "port") if params.get(key)}
    # Every connection this process's pool keeps idle, and only those: other processes (a test's servers) share the
    # database. (The pool's own list of idle connections: psycopg_pool has no public one.)
    ended = {idle.info.backend_pid for idle in connection.pool._pool}
    assert held in ended
    with psycopg.connect(**conninfo, autocommit=True) as admin:
        for pid in ended:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    task_prerun.send(sender=None, task_id="t2", task=None, args=(), kwargs={})  # the next task
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (now,) = cursor.fetchone()
    assert now not in ended
