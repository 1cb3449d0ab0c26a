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
