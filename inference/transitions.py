"""Which of a job's columns each move of its lifecycle writes, declared once; the modules named
after them make the moves (submission, dispatch, attempts, closing, requeue).

Every column of ``Job`` belongs to exactly one group (tests/inference/test_transitions.py checks it), so a new
column must say here how the moves treat it:

- ``REQUEST``: what was asked, by whom and when. Fixed at submission; no move writes it.
- ``COUNTERS``: ``attempt``, ``max_attempts`` and ``cold_start_ms`` follow their own rules (dispatch counts
  attempts, an operator's requeue grants one more, every attempt adds its cold start) and are never cleared.
- ``LEASE``: the worker holding the job and until when. Cleared whenever an attempt closes.
- ``DISPATCH``: when the job was last dispatched and its message last sent. Cleared when it goes back to the queue
  (a retry after the platform's failure, an operator's requeue); kept when it ends.
- ``PROGRESS``: the step the running attempt reached, reset when an attempt starts; kept when the job ends (the
  last step reached), cleared by an operator's requeue.
- ``RUN``: the run as a whole: when it first started (the price it is billed at is the one in force then) and the
  customer's cancel request (once accepted, every later move honours it). Cleared only by an operator's requeue,
  which starts a new run.
- ``OUTCOME``: how the job ended. Every end writes all of it (``ended``); an operator's requeue clears it.
- ``ARCHIVE``: when the request's input was cut to its settings after its retention period (inference/archive.py).
  Written once, by the archive; an archived job never runs again, so no move clears it.
- ``status``: every move sets it.
"""

from __future__ import annotations

from typing import Any

from inference.models import Job, JobStatus

REQUEST = frozenset(
    {
        "id",
        "organization",
        "endpoint",
        "api_key",
        "gpu_class",
        "input",
        "webhook_url",
        "end_user",
        "idempotency_key",
        "request_fingerprint",
        "start_deadline",
        "base_url",
        "created_at",
    }
)
COUNTERS = frozenset({"attempt", "max_attempts", "cold_start_ms"})
ARCHIVE = frozenset({"archived_at"})
LEASE: dict[str, Any] = {"worker": "", "lease_expires_at": None}
DISPATCH: dict[str, Any] = {"dispatched_at": None, "sent_at": None}
PROGRESS: dict[str, Any] = {"progress_step": 0, "progress_total": 0}
RUN: dict[str, Any] = {"started_at": None, "cancel_requested_at": None}
OUTCOME: dict[str, Any] = {
    "result": None,
    "error": "",
    "error_type": "",
    "gpu_ms": 0,
    "finished_at": None,
    "outputs_expire_at": None,
}


def retried() -> dict[str, Any]:
    """An attempt the platform failed, with attempts left and no cancel request: the job waits for dispatch again.
    Its run goes on (first start, cancel request) and it has no outcome yet."""
    return {"status": JobStatus.QUEUED, **LEASE, **DISPATCH}


def requeued() -> dict[str, Any]:
    """A failed or cancelled job an operator puts back in the queue: a new run, with no trace of the last one but
    its counters."""
    return {"status": JobStatus.QUEUED, **LEASE, **DISPATCH, **PROGRESS, **RUN, **OUTCOME}


def ended(status: JobStatus, **outcome: Any) -> dict[str, Any]:
    """A job reaching a final state: no worker holds it any more, and every outcome column is written (those not
    given take their empty value)."""
    unknown = outcome.keys() - OUTCOME.keys()
    if unknown:
        raise TypeError(f"Not outcome columns of a job: {', '.join(sorted(unknown))}")
    return {"status": status, **LEASE, **OUTCOME, **outcome}


def assign(job: Job, values: dict[str, Any]) -> list[str]:
    """Sets ``values`` on the loaded ``job``; returns their names, for ``save(update_fields=...)``."""
    for name, value in values.items():
        setattr(job, name, value)
    return list(values)
