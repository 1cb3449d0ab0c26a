"""Sweeps: scheduled tasks that act on many rows (statements, receipts, payments left pending). One row that raises
(a bug, a row no one foresaw, a service refusing it) must not keep the rows after it waiting forever: each is done
apart (``each_apart``), its failure logged with its traceback, and the rest go on. The task still fails at its end
(``SweepIncomplete``), so the failure is not swallowed: the worker records it (``config.scheduled_runs``), and a task
that has not succeeded for a few intervals raises the ``PlatformScheduledTaskLate`` alert.

The task's soft time limit (``SoftTimeLimitExceeded``) is never caught: it stops the sweep, and the next run goes on
where it left off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from celery.exceptions import SoftTimeLimitExceeded

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SweepIncomplete(Exception):
    """Some items of a sweep failed (each logged where it failed); every other item was done."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        shown = ", ".join(failures[:5]) + (f" and {len(failures) - 5} more" if len(failures) > 5 else "")
        super().__init__(f"{len(failures)} failed, the rest done: {shown}")


def each_apart(items: Iterable[T], act: Callable[[T], object], *, name: Callable[[T], str]) -> int:
    """Calls ``act`` on each item, each apart: one that raises is logged (``name`` says which) and the others go on.
    Answers how many calls answered a true value; raises ``SweepIncomplete`` at the end if any raised."""
    done = 0
    failures: list[str] = []
    for item in items:
        try:
            done += bool(act(item))
        except SoftTimeLimitExceeded:
            raise
        except Exception:
            logger.exception("%s failed; the sweep goes on with the rest", name(item))
            failures.append(name(item))
    if failures:
        raise SweepIncomplete(failures)
    return done


def all_parts(parts: dict[str, Callable[[], int]]) -> dict[str, int]:
    """Runs each part of a task (each a sweep of its own) whatever the others did: one that raises is logged and the
    next runs. Answers each part's count; raises ``SweepIncomplete`` at the end, naming the parts that failed."""
    counts: dict[str, int] = {}
    failures: list[str] = []
    for part, run in parts.items():
        try:
            counts[part] = run()
        except SoftTimeLimitExceeded:
            raise
        except SweepIncomplete as incomplete:  # its failures logged with their tracebacks where they failed
            logger.error("the %s part did not finish: %s; the task goes on with the rest", part, incomplete)
            failures.append(part)
        except Exception:
            logger.exception("the %s part failed; the task goes on with the rest", part)
            failures.append(part)
    if failures:
        raise SweepIncomplete(failures)
    return counts
