"""The Celery app: GPU workers and the scheduler. A message carries only ids; the database is the truth."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("platform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# Modules beside an app's tasks.py that hold tasks of their own (imported by name, not by tasks.py).
app.autodiscover_tasks(["billing"], related_name="reconciliation_tasks")
