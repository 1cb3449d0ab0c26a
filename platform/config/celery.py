"""The Celery app: GPU workers and the scheduler. A message carries only ids; the database is the truth."""

from __future__ import annotations

import os
import select
from typing import Any

from celery import Celery
from celery.signals import task_prerun
from django.db import close_old_connections, connection

from config import scheduled_runs  # noqa: F401  (its signal handlers record each scheduled task's runs)
from config.broker import AMQP

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# AMQP: the broker publishes through one Redis client per channel, not one per message (config/broker.py).
app = Celery("platform", amqp=AMQP)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# Modules beside an app's tasks.py that hold tasks of their own (imported by name, not by tasks.py).
app.autodiscover_tasks(["billing"], related_name="reconciliation_tasks")


@task_prerun.connect(dispatch_uid="platform-connection-from-the-pool")
def connection_from_the_pool(sender: Any = None, **_: Any) -> None:
    """Each task a worker runs starts on a working connection from psycopg's pool, which keeps its connections between
    tasks (``CELERY_DB_REUSE_MAX`` in settings): the one the last task held goes back to the pool (Django's
    ``CONN_MAX_AGE`` is 0 with the pool), and the task takes one now, checked without a round trip
    (``_ended_by_the_server``). After a database restart, a failover or an idle timeout the task's first statement
    would otherwise fail on a connection that died while idle; one that did is discarded and the next taken (a new one
    once the idle ones run out). Checking every idle connection with an empty query, as ``pool.check()`` does, cost
    each job about 2.5 ms between its message and its start. A task run eagerly, in its caller's process and
    transaction, keeps its caller's connection (as Celery's fixup does)."""
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    close_old_connections()
    pool = getattr(connection, "pool", None)  # PostgreSQL with psycopg's pool
    if pool is None or pool.closed:
        return
    for _taken in range(pool.max_size + 1):  # every idle connection may have been ended, and one more is new
        connection.ensure_connection()
        if not _ended_by_the_server():
            return
        connection.close()  # back to the pool, which discards a broken connection and opens another


def _ended_by_the_server() -> bool:
    """Whether the server ended the connection Django holds while it was idle. A connection the server ends (a
    restart's shutdown, ``pg_terminate_backend``, ``idle_session_timeout``) is sent a last message and closed, so its
    socket turns readable, while an idle connection's socket has nothing to read: a poll that does not wait, and an
    empty round trip (``is_usable``) only when the poll finds something."""
    poll = select.poll()
    poll.register(connection.connection.pgconn.socket, select.POLLIN)
    return bool(poll.poll(0)) and not connection.is_usable()
