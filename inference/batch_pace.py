"""When a job should wait for company: only while requests reach this worker faster than it runs them.

An endpoint's profile lets a job wait up to ``batch_wait_ms`` for compatible requests to join its pipeline call. The
wait pays when a request arrives while the batch would still be running: it would otherwise queue behind the batch
for about a whole run, and joining it costs the batch only a little more time. When requests arrive further apart
than a batch takes to run, the next one finds the worker free anyway, and the wait is latency added to every job for
nothing: one client's requests one after the other, or a quiet endpoint, waited 2 ms (5 on CUDA) on every job, with a
look for company each millisecond (``python -m tests.bench.queue_overhead``: about 3 ms of a job's 18 ms between its
submission and its start of work on this machine).

So a worker keeps, per endpoint, the gap between the arrivals of the requests it takes (when each was dispatched:
a request waiting behind its organization's concurrency limit, or a retry, arrives then, not when it was made), and
the time of its pipeline calls, each as an exponentially weighted mean, and waits only while the gap is shorter than
a call. A gap counts for at most ``CLAMP`` calls, so an hour of quiet weighs no more than a quiet spell of seconds:
one gap that long stops the waits, and four short ones start them again. A request already dispatched when the job
starts is always taken, whatever the pace: only the wait is skipped. A worker that has not yet seen two requests and
a call of the endpoint waits, as the profile says.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# The weight of the newest observation in each mean, and the most a gap counts for, in calls: a quiet spell shows in
# one gap (0.3 x 4 > 1), and a burst after one in four requests (4 x 0.7^4 < 1).
WEIGHT = 0.3
CLAMP = 4

_paces: weakref.WeakSet[ArrivalPace] = weakref.WeakSet()


def forget_all() -> None:
    """Every worker pace of this process forgotten (a test that starts from empty tables)."""
    for pace in list(_paces):
        pace.forget()


@dataclass
class _Pace:
    latest_arrival: datetime | None = None
    gap_ms: float | None = None
    call_ms: float | None = None


class ArrivalPace:
    """The pace of one worker's requests, per endpoint (kept in the worker process's memory)."""

    def __init__(self) -> None:
        self._paces: dict[Any, _Pace] = {}
        self._lock = threading.Lock()
        _paces.add(self)

    def arrived(self, endpoint_id: Any, arrived_at: datetime) -> None:
        """A request this worker took (a batch's first job, or one that joined it), dispatched at ``arrived_at``."""
        with self._lock:
            pace = self._paces.setdefault(endpoint_id, _Pace())
            if pace.latest_arrival is not None:
                # A request older than the latest one taken was waiting behind it: the worker is behind, a gap of 0.
                gap = max(0.0, (arrived_at - pace.latest_arrival).total_seconds() * 1000)
                if pace.call_ms is not None:
                    gap = min(gap, CLAMP * pace.call_ms)
                pace.gap_ms = gap if pace.gap_ms is None else WEIGHT * gap + (1 - WEIGHT) * pace.gap_ms
            if pace.latest_arrival is None or arrived_at > pace.latest_arrival:
                pace.latest_arrival = arrived_at

    def ran(self, endpoint_id: Any, call_ms: float) -> None:
        """A pipeline call of the endpoint took ``call_ms`` on this worker."""
        with self._lock:
            pace = self._paces.setdefault(endpoint_id, _Pace())
            pace.call_ms = call_ms if pace.call_ms is None else WEIGHT * call_ms + (1 - WEIGHT) * pace.call_ms

    def forget(self) -> None:
        with self._lock:
            self._paces.clear()

    def company_expected(self, endpoint_id: Any) -> bool:
        """Whether a request is likely to arrive before a call of the endpoint would end: waiting for company pays."""
        with self._lock:
            pace = self._paces.get(endpoint_id)
            if pace is None or pace.gap_ms is None or pace.call_ms is None:
                return True  # nothing known yet: as the profile says
            return pace.gap_ms < pace.call_ms
