"""Whether every task of beat's schedule runs: the record ``/metrics`` reads (``accounts.models.ScheduledTask``).

A safety net can stop without anything failing loudly: beat not started (or started nowhere), its queue consumed by no
process, its message expiring unrun behind a stall, or the task raising on every run. The alerts on the backlogs see
it only once work piles up, so the runs themselves are recorded, by the processes around the tasks rather than by
each task: beat, as it starts, records since when it schedules each task (``beat_init``); the worker that runs one
records when it succeeded or failed (``task_success``, ``task_failure``), once a run, by task name. A task killed at
its hard time limit records nothing, which is what the alert reads: no success.

A failure to record is logged and never fails the task: the record watches the work, it is not part of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import pairwise
from typing import Any

from celery.schedules import crontab
from celery.schedules import schedule as interval
from celery.signals import beat_init, task_failure, task_success
from django.conf import settings
from django.utils import timezone

logger = logging.getLogger(__name__)

# How far ahead a crontab entry's runs are laid out to find its longest gap: two weeks holds any weekly pattern.
CRONTAB_HORIZON = timedelta(days=14)


def scheduled_tasks(beat_schedule: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, float]:
    """Each task name of beat's schedule and the longest it may go between two runs, in seconds: an interval entry's
    interval; for a task due only by crontab, the longest gap between its runs over a fortnight (a task with
    several entries, such as the reconciliation's weeknight and Sunday ones, runs at the union of their times)."""
    schedule = settings.CELERY_BEAT_SCHEDULE if beat_schedule is None else beat_schedule
    intervals: dict[str, list[float]] = {}
    crontabs: dict[str, list[crontab]] = {}
    for entry in schedule.values():
        task, when = str(entry["task"]), entry["schedule"]
        if isinstance(when, int | float | timedelta):
            seconds = when.total_seconds() if isinstance(when, timedelta) else float(when)
            intervals.setdefault(task, []).append(seconds)
        elif isinstance(when, interval):
            intervals.setdefault(task, []).append(_run_every(when).total_seconds())
        elif isinstance(when, crontab):
            crontabs.setdefault(task, []).append(when)
        else:  # a solar schedule or one of a kind this does not know: a day, as the nightly tasks
            intervals.setdefault(task, []).append(timedelta(days=1).total_seconds())
    longest = {task: max(seconds) for task, seconds in intervals.items()}
    for task, entries in crontabs.items():
        if task not in longest:
            longest[task] = _longest_gap(tuple(_fields(entry) for entry in entries))
    return longest


CrontabFields = tuple[frozenset[int], frozenset[int], frozenset[int], frozenset[int], frozenset[int]]


def _run_every(when: interval) -> timedelta:
    every: timedelta = when.run_every  # type: ignore[attr-defined]  # celery-types leaves it out
    return every


def _fields(entry: crontab) -> CrontabFields:
    """The minutes, hours, days of the week (Sunday 0), days of the month and months an entry runs at."""
    parsed: Any = entry  # celery-types leaves out the parsed sets
    sets = (parsed.minute, parsed.hour, parsed.day_of_week, parsed.day_of_month, parsed.month_of_year)
    minute, hour, day_of_week, day_of_month, month = (frozenset(values) for values in sets)
    return minute, hour, day_of_week, day_of_month, month


@cache
def _longest_gap(entries: tuple[CrontabFields, ...]) -> float:
    """The longest time between two consecutive runs of the crontab entries together over ``CRONTAB_HORIZON`` from a
    fixed Monday (UTC, as Celery keeps them)."""
    start = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
    runs = sorted(
        {
            day + timedelta(hours=hour, minutes=minute)
            for day in (start + timedelta(days=number) for number in range(CRONTAB_HORIZON.days))
            for minutes, hours, days_of_week, days_of_month, months in entries
            if day.isoweekday() % 7 in days_of_week and day.day in days_of_month and day.month in months
            for hour in hours  # Celery counts Sunday as day 0 of the week
            for minute in minutes
        }
    )
    if len(runs) < 2:
        return CRONTAB_HORIZON.total_seconds()
    return max((later - earlier).total_seconds() for earlier, later in pairwise(runs))


def scheduled_names() -> set[str]:
    """The task names beat's schedule sends."""
    return {str(entry["task"]) for entry in settings.CELERY_BEAT_SCHEDULE.values()}


def record_scheduled(names: Iterable[str], *, now: datetime | None = None) -> None:
    """Beat starts scheduling ``names``: a row for each it has none for, and the moment for each that has none yet."""
    from accounts.models import ScheduledTask

    now = now or timezone.now()
    names = sorted(names)
    ScheduledTask.objects.bulk_create(
        [ScheduledTask(name=name, scheduled_since=now) for name in names], ignore_conflicts=True
    )
    ScheduledTask.objects.filter(name__in=names, scheduled_since__isnull=True).update(scheduled_since=now)


def record_run(name: str, *, error: str | None = None, now: datetime | None = None) -> None:
    """One run of the scheduled task ``name`` ended: succeeded, or failed with ``error``."""
    from accounts.models import ScheduledTask

    now = now or timezone.now()
    fields: dict[str, Any] = (
        {"last_succeeded_at": now} if error is None else {"last_failed_at": now, "last_error": error[:2000]}
    )
    if ScheduledTask.objects.filter(name=name).update(**fields):
        return
    ScheduledTask.objects.bulk_create([ScheduledTask(name=name, **fields)], ignore_conflicts=True)
    ScheduledTask.objects.filter(name=name).update(**fields)  # a row made meanwhile by beat or another worker


def _task_name(sender: Any) -> str | None:
    name = getattr(sender, "name", None)
    if name is None or name not in scheduled_names():
        return None
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return None  # run in its caller's process and transaction (a test, a command): not the scheduler's run
    return str(name)


@beat_init.connect(dispatch_uid="platform-scheduled-since")
def _beat_started(**_: Any) -> None:
    try:
        record_scheduled(scheduled_names())
    except Exception:
        logger.exception("beat could not record the tasks it schedules")


@task_success.connect(dispatch_uid="platform-scheduled-success")
def _succeeded(sender: Any = None, **_: Any) -> None:
    name = _task_name(sender)
    if name is None:
        return
    try:
        record_run(name)
    except Exception:
        logger.exception("could not record that %s succeeded", name)


@task_failure.connect(dispatch_uid="platform-scheduled-failure")
def _failed(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    name = _task_name(sender)
    if name is None:
        return
    try:
        record_run(name, error=f"{type(exception).__name__}: {exception}")
    except Exception:
        logger.exception("could not record that %s failed", name)
