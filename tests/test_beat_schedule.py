"""Every entry of CELERY_BEAT_SCHEDULE can be sent the way ``celery beat`` sends it, whatever the global time limits.

Beat merges an entry's options with its task's own options and the app's defaults, and Celery refuses to
send a task whose soft time limit is above its hard one; beat then logs "Couldn't apply scheduled task"
and skips the entry, every time it comes due, while nothing else fails. So each check runs in a fresh
process: Celery fills a task's unset limits from the settings once, when the task is bound, and a fresh
process reads the settings module from the environment alone, as production does (no test overrides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_APPS = ("billing.", "inference.")
LIMIT_VARIABLES = ("CELERY_TASK_TIME_LIMIT", "CELERY_TASK_SOFT_TIME_LIMIT")


def beat_report() -> None:
    """Run in the child process: sends every beat entry through ``Scheduler.apply_async`` to an in-memory
    broker, reads each message back, and prints what happened as JSON."""
    import django

    django.setup()
    from celery.beat import Scheduler
    from kombu import Queue

    from config.celery import app

    app.conf.broker_url = "memory://"
    # What `celery beat` does before scheduling: the task modules are imported (autodiscovery included).
    app.loader.import_default_modules()
    scheduler = Scheduler(app, lazy=False)  # the settings' entries, plus Celery's own defaults, as beat installs them

    entries: dict[str, Any] = {}
    with app.connection_for_write() as connection:
        for name, entry in sorted(scheduler.schedule.items()):
            queue: Queue = app.amqp.router.route({}, entry.task)["queue"]
            queue(connection.default_channel).declare()
            outcome: dict[str, Any] = {"task": entry.task, "registered": entry.task in app.tasks, "error": None}
            try:
                scheduler.apply_async(entry, producer=scheduler.producer, advance=False)
            except Exception as exc:
                outcome["error"] = f"{type(exc).__name__}: {exc}"
            else:
                message = queue(connection.default_channel).get(no_ack=True)
                outcome["message_task"] = message.headers["task"] if message else None
                outcome["timelimit"] = message.headers.get("timelimit") if message else None
            entries[name] = outcome
    limits = {
        name: [task.time_limit, task.soft_time_limit]
        for name, task in sorted(app.tasks.items())
        if name.startswith(OUR_APPS)
    }
    print(json.dumps({"entries": entries, "task_limits": limits, "beat_schedule": sorted(app.conf.beat_schedule)}))


def run_beat_report(limits: dict[str, str]) -> dict[str, Any]:
    env = {name: value for name, value in os.environ.items() if name not in LIMIT_VARIABLES} | limits
    completed = subprocess.run(
        [sys.executable, "-c", "from tests.test_beat_schedule import beat_report; beat_report()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return report


def consistent(hard: Any, soft: Any) -> bool:
    """Both set, the soft one first: the task gets SoftTimeLimitExceeded (and rolls back) before it is killed."""
    return isinstance(hard, int | float) and isinstance(soft, int | float) and 0 < soft < hard


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param({}, id="production-defaults"),
        pytest.param({"CELERY_TASK_TIME_LIMIT": "120", "CELERY_TASK_SOFT_TIME_LIMIT": "90"}, id="short-globals"),
        pytest.param({"CELERY_TASK_TIME_LIMIT": "7200", "CELERY_TASK_SOFT_TIME_LIMIT": "7000"}, id="long-globals"),
    ],
)
def test_every_beat_entry_is_sent_and_every_task_has_a_soft_limit_below_its_hard_one(limits: dict[str, str]) -> None:
    from django.conf import settings

    report = run_beat_report(limits)
    entries = report["entries"]
    assert set(settings.CELERY_BEAT_SCHEDULE) <= set(entries), "beat did not install every entry of the settings"
    assert report["beat_schedule"] == sorted(settings.CELERY_BEAT_SCHEDULE)
    for name, outcome in entries.items():
        assert outcome["error"] is None, f"beat cannot send {name}: {outcome['error']}"
        # An unregistered name is still sent (by name) and then never consumed: beat would not notice.
        assert outcome["registered"], f"{name} names {outcome['task']}, which no module registers"
        assert outcome["message_task"] == outcome["task"], f"{name}: no message for {outcome['task']} on its queue"
        hard, soft = outcome["timelimit"]
        assert consistent(hard, soft), f"{name} is sent with time limit {hard} and soft time limit {soft}"

    task_limits = report["task_limits"]
    scheduled = {outcome["task"] for outcome in entries.values()}
    assert scheduled & set(task_limits) == {task for task in scheduled if task.startswith(OUR_APPS)}
    assert {"billing.process_stripe_event", "billing.auto_top_up", "inference.run_job"} <= set(task_limits)
    wrong = {name: pair for name, pair in task_limits.items() if not consistent(*pair)}
    assert not wrong, f"tasks whose effective [hard, soft] limits are not ordered: {wrong}"
