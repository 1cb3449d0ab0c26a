"""Every entry of CELERY_BEAT_SCHEDULE can be sent the way ``celery beat`` sends it, whatever the global time limits,
to a queue some process consumes: the long periodic tasks to ``batch``, the frequent safety nets to ``default`` with an
expiry, so one never waits behind the other, nor runs back to back after a stall.

Beat merges an entry's options with its task's own options and the app's defaults, and Celery refuses to
send a task whose soft time limit is above its hard one; beat then logs "Couldn't apply scheduled task"
and skips the entry, every time it comes due, while nothing else fails. So each check runs in a fresh
process: Celery fills a task's unset limits from the settings once, when the task is bound, and a fresh
process reads the settings module from the environment alone, as production does (no test overrides).
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_APPS = ("billing.", "dashboard.", "inference.")
LIMIT_VARIABLES = ("CELERY_TASK_TIME_LIMIT", "CELERY_TASK_SOFT_TIME_LIMIT")
# The long periodic tasks: minutes to an hour each, all due at about the same time. On the batch worker, one at a time.
LONG_TASKS = {
    "billing.reconcile",
    "billing.issue_statements",
    "billing.create_partitions_ahead",
    "inference.purge_expired_outputs",
    "inference.prune_job_logs",
    "inference.archive_old_jobs",
}
# What must never wait behind them: the lease reaper and dispatcher's sweep, webhooks, Stripe, alert emails.
SAFETY_NETS = {
    "inference.sweep",
    "inference.deliver_due_webhooks",
    "inference.deliver_webhook",
    "inference.sync_models",
    "billing.process_stripe_event",
    "billing.stripe_sweep",
    "billing.auto_top_up",
    "billing.send_alert_email",
    "billing.send_due_alert_emails",
}
# Stand-in for celery on PATH: prints the command line deploy/entrypoint.sh would run.
STAND_IN = """#!{python}
import json, sys
print(json.dumps(sys.argv[1:]))
"""


def beat_report() -> None:
    """Run in the child process: sends every beat entry through ``Scheduler.apply_async`` to an in-memory
    broker, reads each message back, and prints what happened as JSON."""
    from datetime import datetime

    import django

    django.setup()
    from celery.beat import Scheduler
    from celery.schedules import schedule as interval
    from django.utils import timezone
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
            outcome: dict[str, Any] = {
                "task": entry.task,
                "registered": entry.task in app.tasks,
                "error": None,
                "queue": queue.name,
                # Seconds between runs of an interval entry; None for a crontab's.
                "every": entry.schedule.run_every.total_seconds() if isinstance(entry.schedule, interval) else None,
            }
            try:
                scheduler.apply_async(entry, producer=scheduler.producer, advance=False)
            except Exception as exc:
                outcome["error"] = f"{type(exc).__name__}: {exc}"
            else:
                message = queue(connection.default_channel).get(no_ack=True)
                outcome["message_task"] = message.headers["task"] if message else None
                outcome["timelimit"] = message.headers.get("timelimit") if message else None
                # The expiry the worker reads, in seconds from now (a message older than that is dropped unrun).
                expires = message.headers.get("expires") if message else None
                outcome["expires_in"] = (
                    (datetime.fromisoformat(expires) - timezone.now()).total_seconds() if expires else None
                )
            entries[name] = outcome
    limits = {
        name: [task.time_limit, task.soft_time_limit]
        for name, task in sorted(app.tasks.items())
        if name.startswith(OUR_APPS)
    }
    queues = {
        name: app.amqp.router.route({}, name)["queue"].name for name in sorted(app.tasks) if name.startswith(OUR_APPS)
    }
    print(
        json.dumps(
            {
                "entries": entries,
                "task_limits": limits,
                "task_queues": queues,
                "beat_schedule": sorted(app.conf.beat_schedule),
                "visibility_timeout": app.conf.broker_transport_options.get("visibility_timeout"),
                # What a task without limits of its own is given (run_job): the app's defaults.
                "default_limits": [app.conf.task_time_limit, app.conf.task_soft_time_limit],
            }
        )
    )


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

    # A message is unacknowledged while its task runs (late acks); Redis gives one back to the queue once it has been
    # out longer than the visibility timeout, and a second worker runs it beside the first. No task may run that long.
    longest = max(hard for hard, _ in [*task_limits.values(), report["default_limits"]])
    assert longest >= settings.LONGEST_OWN_TASK_LIMIT_SECONDS
    assert report["visibility_timeout"] >= longest + 600, (
        f"the broker gives a running task's message to another worker after {report['visibility_timeout']} s, "
        f"and a task may run {longest} s"
    )


# Queues: which process runs what.


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """What beat sends and where each task goes, with the settings' defaults, as production runs them."""
    return run_beat_report({})


def production_queues(tmp_path: Path) -> dict[str, set[str]]:
    """The queues each Celery process type of deploy/entrypoint.sh consumes, read from the command line it runs."""
    from inference.models import GpuClass

    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "celery").write_text(STAND_IN.format(python=sys.executable))
    (folder / "celery").chmod(0o755)
    env = {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}
    process_types = {"housekeeping": ("housekeeping",), "batch": ("batch",)}
    process_types |= {f"worker {gpu_class}": ("worker", gpu_class) for gpu_class in GpuClass.values}
    consumed = {}
    for name, args in process_types.items():
        result = subprocess.run(
            [str(ROOT / "deploy" / "entrypoint.sh"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        argv = json.loads(result.stdout.strip().splitlines()[-1])
        consumed[name] = set(argv[argv.index("--queues") + 1].split(","))
    return consumed


def embedded_queues() -> dict[str, set[str]]:
    """The queues each worker of the embedded run (``manage.py runplatform``) consumes."""
    from accounts.management.commands.runplatform import celery_workers

    return {name: set(argv[argv.index("--queues") + 1].split(",")) for name, argv in celery_workers().items()}


def stack_queues(tmp_path: Path) -> dict[str, set[str]]:
    """The queues each worker of the end-to-end tests' stack (tests/e2e/conftest.py) consumes."""
    from tests.stack_processes import celery_processes

    processes = celery_processes(tmp_path / "beat-schedule")
    return {name: set(argv[argv.index("--queues") + 1].split(",")) for name, argv in processes.items()}


def test_the_processes_consume_default_batch_and_the_gpu_classes(tmp_path: Path) -> None:
    from accounts.management.commands.runplatform import celery_beat, celery_workers
    from inference.models import GpuClass

    production = production_queues(tmp_path)
    assert production["housekeeping"] == {"default"}
    assert production["batch"] == {"batch"}
    for gpu_class in GpuClass.values:
        assert production[f"worker {gpu_class}"] == {gpu_class}
    assert embedded_queues() == {"gpu worker": {"cpu"}, "housekeeping worker": {"default"}, "batch worker": {"batch"}}
    embedded = celery_workers()
    # The scheduler, once, in a process of its own as in production: not a worker's child, which outlived its worker.
    assert not any("--beat" in argv or "-B" in argv for argv in embedded.values())
    assert celery_beat(tmp_path / "celerybeat-schedule")[3:6] == ["--app", "config", "beat"]
    batch = embedded["batch worker"]
    assert batch[batch.index("--concurrency") + 1] == "1"


def test_every_task_and_beat_entry_goes_to_a_queue_that_a_process_consumes(
    report: dict[str, Any], tmp_path: Path
) -> None:
    """In production, in the embedded run and in the end-to-end tests' stack alike: a message on a queue nobody
    consumes waits for ever, unnoticed (and a test of the stack would never see the task run). And only a job goes to a
    GPU class's queue."""
    from inference.models import GpuClass

    for where, consumers in (
        ("production", production_queues(tmp_path)),
        ("the embedded run", embedded_queues()),
        ("the end-to-end tests' stack", stack_queues(tmp_path)),
    ):
        consumed = set().union(*consumers.values())
        routed = {f"task {task}": queue for task, queue in report["task_queues"].items()}
        routed |= {f"beat entry {name}": outcome["queue"] for name, outcome in report["entries"].items()}
        for what, queue in routed.items():
            assert queue in consumed, f"{what} goes to {queue!r}, which no process of {where} consumes"
            if what != "task inference.run_job":
                assert queue not in GpuClass.values, f"{what} goes to {queue!r}, a GPU worker's queue"


def test_long_tasks_go_to_batch_and_the_safety_nets_to_default(report: dict[str, Any]) -> None:
    queues = report["task_queues"]
    assert set(queues) >= LONG_TASKS | SAFETY_NETS, "a task named here is not registered"
    assert {task for task, queue in queues.items() if queue == "batch"} == LONG_TASKS
    for task in SAFETY_NETS:
        assert queues[task] == "default", f"{task} goes to {queues[task]}"
    assert queues["inference.run_job"] == "cpu"  # the fallback: a job's message names its endpoint's class
    # Only beat's periodic tasks wait in line on the batch worker; nothing a request or a person waits on.
    scheduled = {outcome["task"] for outcome in report["entries"].values()}
    assert scheduled >= LONG_TASKS
    for name, outcome in report["entries"].items():
        expected = "batch" if outcome["task"] in LONG_TASKS else "default"
        assert outcome["queue"] == expected, f"{name} is sent to {outcome['queue']}"


def test_exact_task_names_win_over_the_globs_whatever_their_order() -> None:
    """Celery's dict routes look an exact name up before trying the globs (celery.app.routes.MapRoute): a long task
    goes to batch although ``billing.*`` and ``inference.*`` match it too, even with the globs listed first."""
    from celery.app.routes import MapRoute
    from django.conf import settings

    routes = list(settings.CELERY_TASK_ROUTES.items())
    globs = [pattern for pattern, _ in routes if "*" in pattern]
    for task in LONG_TASKS:
        assert any(fnmatch.fnmatchcase(task, pattern) for pattern in globs), f"no glob matches {task}: test nothing"
    for ordering in (routes, routes[::-1], sorted(routes, key=lambda item: "*" not in item[0])):
        route = MapRoute(ordering)
        for task in LONG_TASKS:
            assert route(task) == {"queue": "batch"}
        assert route("inference.sweep") == {"queue": "default"}
        assert route("billing.stripe_sweep") == {"queue": "default"}


def test_frequent_entries_expire_after_their_interval(report: dict[str, Any]) -> None:
    """A message that waited longer than its entry's interval (a stall, a restart, a busy pool) is dropped by the
    worker: the next one is already on its way, so they never run back to back. Every interval entry carries one."""
    frequent = {name for name, outcome in report["entries"].items() if (outcome["every"] or 3600) <= 60}
    assert {"inference-sweep", "inference-webhooks", "billing-stripe-sweep", "billing-alert-emails"} <= frequent
    for name, outcome in report["entries"].items():
        every = outcome["every"]
        if every is None:
            continue  # a crontab entry: daily or nightly, never superseded before it runs
        expires_in = outcome["expires_in"]
        assert expires_in is not None, f"{name} (every {every:g} s) is sent without an expiry"
        # One interval, and never sooner than a minute (a 5 s sweep waiting behind two slow webhook deliveries runs).
        lifetime = max(every, 60.0)
        assert lifetime / 2 < expires_in <= lifetime, f"{name} (every {every:g} s) expires in {expires_in:g} s"
        if name in frequent:
            assert outcome["queue"] == "default", f"{name} runs every {every:g} s on {outcome['queue']}"


def test_a_starting_beat_sends_every_interval_entry_at_once_and_then_keeps_its_record(tmp_path: Path) -> None:
    """Celery dates an entry it has no record of as run just now: with production's schedule file lost at each restart
    (an emptyDir), the hourly tasks came an hour after every restart, and never under frequent ones. Ours are due as a
    fresh beat starts; one recorded as run stays not due after a restart; a crontab entry waits for its time of day."""
    from celery.schedules import crontab
    from django.conf import settings

    from config.beat import Scheduler
    from config.celery import app

    assert settings.CELERY_BEAT_SCHEDULER == "config.beat:Scheduler"
    interval_entries = {
        name for name, entry in settings.CELERY_BEAT_SCHEDULE.items() if not isinstance(entry["schedule"], crontab)
    }
    assert {"inference-archive-jobs", "billing-create-partitions", "inference-sweep"} <= interval_entries
    filename = str(tmp_path / "celerybeat-schedule")

    fresh = Scheduler(app, schedule_filename=filename, lazy=False)
    due = {name for name, entry in fresh.schedule.items() if entry.is_due().is_due}
    assert due & set(settings.CELERY_BEAT_SCHEDULE) == interval_entries
    fresh.reserve(fresh.schedule["inference-archive-jobs"])  # what beat records as it sends one
    fresh.close()

    again = Scheduler(app, schedule_filename=filename, lazy=False)
    try:
        archive = again.schedule["inference-archive-jobs"]
        assert not archive.is_due().is_due
        assert 3500 < archive.is_due().next <= 3600  # next in an hour, from the recorded run
        assert again.schedule["billing-create-partitions"].is_due().is_due  # never recorded as sent: still due
    finally:
        again.close()
