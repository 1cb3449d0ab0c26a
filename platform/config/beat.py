"""Beat's scheduler (``CELERY_BEAT_SCHEDULER``): Celery's own, with one change, that an interval entry it has never run
is due as beat starts.

Celery dates an entry it has no record of as run just now, so its first run comes a whole interval after beat starts.
Production's beat keeps no record across restarts (its schedule file is on the pod's own volume, deploy/k8s/base/
beat.yaml), so every restart pushed the hourly tasks (the output purge, the log prune, the archive, the partitions)
an hour away again: a beat restarted more often than that (deploys, evictions, a crash loop) never ran them at all.
Here such an entry is dated one interval back, so beat sends it at once and then every interval; an entry in the
record keeps its last run. A crontab entry (the nightly runs) keeps Celery's rule: its next time of day.
"""

from __future__ import annotations

from typing import Any

from celery.beat import PersistentScheduler, ScheduleEntry
from celery.schedules import schedule as interval


class Entry(ScheduleEntry):
    def __init__(self, name: Any = None, task: Any = None, last_run_at: Any = None, *rest: Any, **fields: Any) -> None:
        super().__init__(name, task, last_run_at, *rest, **fields)
        if last_run_at is None and type(self.schedule) is interval:
            every = self.schedule.run_every  # type: ignore[attr-defined]  # celery-types leaves it out
            self.last_run_at = self.last_run_at - every  # never run here: due now


class Scheduler(PersistentScheduler):
    Entry = Entry
