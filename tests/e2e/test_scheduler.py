"""Beat's schedule as the stack runs it (a real beat, real workers on every queue, the broker, the database): every
periodic task is sent, consumed and succeeds, and /metrics says when, which its alert reads (config.scheduled_runs).

A safety net that never ran is the failure this guards against: a task routed to a queue no process consumes, beat
not started, a message expiring unrun. Each shows here as a task with no success."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone

from accounts.models import ScheduledTask
from config import metrics, scheduled_runs
from tests.e2e.conftest import Stack
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Beat sends every interval entry as it starts; the longest of them takes seconds on a test database.
RUN_WAIT_SECONDS = 120


def test_a_starting_beat_runs_every_interval_task_on_the_workers_and_metrics_say_so(stack: Stack) -> None:
    interval_tasks = {
        task for task, seconds in scheduled_runs.scheduled_tasks().items() if seconds <= 3600
    }  # the nightly ones (reconciliation, statements) wait for their hour
    assert {"inference.sweep", "billing.stripe_sweep", "inference.archive_old_jobs"} <= interval_tasks
    started = timezone.now()
    with stack.restarted("housekeeping"):  # a fresh beat: every interval entry is due at once

        def not_yet() -> set[str]:
            done = ScheduledTask.objects.filter(name__in=interval_tasks, last_succeeded_at__gte=started)
            return interval_tasks - set(done.values_list("name", flat=True))

        wait_until(
            lambda: not not_yet(),
            timeout=RUN_WAIT_SECONDS,
            message=lambda: (
                f"every interval task to succeed; still none for {sorted(not_yet())}\n{stack.log_tail('housekeeping')}"
            ),
        )
        rows = {row.name: row for row in ScheduledTask.objects.all()}
        # Beat said since when it schedules each task, the nightly ones included.
        assert set(rows) >= set(scheduled_runs.scheduled_tasks())
        assert all(rows[name].scheduled_since is not None for name in scheduled_runs.scheduled_tasks())
        assert not any(rows[name].last_failed_at for name in interval_tasks), {
            name: rows[name].last_error for name in interval_tasks if rows[name].last_error
        }

    served: dict[str, Any] = {}
    for family in metrics.collect(timezone.now()).collect():
        if family.name == "platform_scheduled_task_last_success_timestamp_seconds":
            served = {sample.labels["task"]: sample.value for sample in family.samples}
    assert all(served[name] >= started.timestamp() for name in interval_tasks), served
