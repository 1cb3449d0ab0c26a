"""Whether every task of beat's schedule runs: the record the worker and beat keep (config.scheduled_runs), what
/metrics makes of it, and the alert that reads it. The end-to-end stack's beat and workers fill it for real
(tests/e2e/test_scheduler.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery.schedules import crontab
from django.utils import timezone

from accounts.models import ScheduledTask
from config import scheduled_runs
from tests.test_metrics import TOKEN, by, families

pytestmark = pytest.mark.django_db

DAY = 86400.0


def test_every_scheduled_task_has_the_longest_it_may_wait() -> None:
    from django.conf import settings

    intervals = scheduled_runs.scheduled_tasks()
    assert set(intervals) == {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert intervals["inference.sweep"] == float(settings.JOB_SWEEP_SECONDS)
    assert intervals["billing.stripe_sweep"] == 60.0
    # Two crontab entries, weeknights and Saturday plus Sunday: every night together.
    assert intervals["billing.reconcile"] == DAY
    assert intervals["billing.issue_statements"] == DAY


def test_crontab_entries_of_one_task_are_taken_together() -> None:
    schedule = {
        "weeknights": {"task": "nightly", "schedule": crontab(hour=3, minute=0, day_of_week="mon-sat")},
        "sundays": {"task": "nightly", "schedule": crontab(hour=3, minute=0, day_of_week="sun")},
        "weekdays": {"task": "weekdays", "schedule": crontab(hour=3, minute=0, day_of_week="mon-fri")},
        "quarter": {"task": "quarter", "schedule": crontab(minute="*/15")},
        "twice": {"task": "twice", "schedule": crontab(hour="1,13", minute=30)},
        "every": {"task": "every", "schedule": timedelta(minutes=2)},
    }
    assert scheduled_runs.scheduled_tasks(schedule) == {
        "nightly": DAY,
        "weekdays": 3 * DAY,  # Friday 03:00 to Monday 03:00
        "quarter": 900.0,
        "twice": DAY / 2,
        "every": 120.0,
    }


def test_beat_records_since_when_it_schedules_and_keeps_the_first_moment() -> None:
    first = timezone.now() - timedelta(days=3)
    scheduled_runs.record_scheduled(["inference.sweep"], now=first)
    scheduled_runs.record_run("billing.stripe_sweep")  # a worker ran one before any beat recorded it
    scheduled_runs.record_scheduled(["inference.sweep", "billing.stripe_sweep"])

    assert ScheduledTask.objects.get(name="inference.sweep").scheduled_since == first
    stripe = ScheduledTask.objects.get(name="billing.stripe_sweep")
    assert stripe.scheduled_since is not None
    assert stripe.last_succeeded_at is not None


def test_a_run_records_its_success_or_its_failure() -> None:
    earlier = timezone.now() - timedelta(minutes=5)
    scheduled_runs.record_run("inference.sweep", now=earlier)
    scheduled_runs.record_run("inference.sweep", error="OperationalError: the database went away")

    row = ScheduledTask.objects.get(name="inference.sweep")
    assert row.last_succeeded_at == earlier  # a failure leaves the last success as it was
    assert row.last_failed_at is not None
    assert row.last_failed_at > earlier
    assert row.last_error == "OperationalError: the database went away"


@pytest.fixture
def metrics_on(settings: Any) -> None:
    settings.METRICS_TOKEN = TOKEN


def test_metrics_serve_every_scheduled_task_whether_it_ran_or_not(client: Any, metrics_on: None) -> None:
    """No beat ever: every task at 0, so the alert fires. Scheduled and never run: from when it was scheduled.
    Succeeded: when. Failed: when, apart."""
    found = families(client)
    intervals = scheduled_runs.scheduled_tasks()
    assert by("task", found["platform_scheduled_task_last_success_timestamp_seconds"]) == dict.fromkeys(intervals, 0)
    assert by("task", found["platform_scheduled_task_interval_seconds"]) == intervals

    since = timezone.now() - timedelta(hours=2)
    succeeded = timezone.now() - timedelta(seconds=30)
    failed = timezone.now() - timedelta(seconds=10)
    scheduled_runs.record_scheduled(intervals, now=since)
    scheduled_runs.record_run("inference.sweep", now=succeeded)
    scheduled_runs.record_run("inference.archive_old_jobs", error="RuntimeError: a bad row", now=failed)
    scheduled_runs.record_run("inference.old_name_no_longer_scheduled")  # not a series: beat sends it no more

    found = families(client)
    last_success = by("task", found["platform_scheduled_task_last_success_timestamp_seconds"])
    assert set(last_success) == set(intervals)
    assert last_success["inference.sweep"] == succeeded.timestamp()
    assert last_success["inference.archive_old_jobs"] == since.timestamp()
    assert last_success["billing.reconcile"] == since.timestamp()
    last_failure = by("task", found["platform_scheduled_task_last_failure_timestamp_seconds"])
    assert last_failure["inference.archive_old_jobs"] == failed.timestamp()
    assert last_failure["inference.sweep"] == 0


def test_the_alert_compares_each_task_with_its_own_interval() -> None:
    """The rule's threshold, as Prometheus evaluates it on the series above: three intervals and ten minutes."""
    from tests.deploy.test_monitoring import alert_rules

    (rule,) = [rule for rule in alert_rules() if rule["alert"] == "PlatformScheduledTaskLate"]
    expression = " ".join(rule["expr"].split())
    assert expression == (
        "time() - platform_scheduled_task_last_success_timestamp_seconds > 3 * platform_scheduled_task_interval_seconds"
        " + 600"
    )
    assert rule["labels"]["severity"] == "critical"
