"""The Celery app: GPU workers and the scheduler. A message carries only ids; the database is the truth."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_prerun
from django.db import close_old_connections, connection

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
    ``CONN_MAX_AGE`` is 0 with the pool), and the pool's idle connections are checked (one empty query each, usually
    one), a dead one replaced: after a database restart or failover, the task's first statement would otherwise fail
    on a connection that died while idle. A task run eagerly, in its caller's process and transaction, keeps its
    caller's connection (as Celery's fixup does)."""
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    close_old_connections()
    pool = getattr(connection, "pool", None)  # PostgreSQL with psycopg's pool
    if pool is not None and not pool.closed:
        pool.check()
