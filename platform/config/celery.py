"""The Celery app: GPU workers and the scheduler. A message carries only ids; the database is the truth."""

from __future__ import annotations

import os

from celery import Celery

from config.broker import AMQP

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# AMQP: the broker publishes through one Redis client per channel, not one per message (config/broker.py).
app = Celery("platform", amqp=AMQP)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# Modules beside an app's tasks.py that hold tasks of their own (imported by name, not by tasks.py).
app.autodiscover_tasks(["billing"], related_name="reconciliation_tasks")
