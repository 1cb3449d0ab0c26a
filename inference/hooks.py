"""What inference asks of the layers above it, without knowing them.

``inference`` knows nothing of money. ``billing`` registers these hooks when its app is ready;
until then (or in a deployment without billing) every answer is permissive and free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

if TYPE_CHECKING:
    from inference.models import Endpoint, Job, JobAttempt


@dataclass(frozen=True)
class Refusal:
    """Why new work may not start (or go on): answered to the client as ``{detail, error_type}``."""

    detail: str
    error_type: str
    status_code: int = 402


class Usage(TypedDict):
    """What a finished request cost: the ``usage`` object of its status, result and webhook."""

    gpu_class: str
    gpu_ms: int
    billable_units: float
    unit: str
    unit_price_micros: int
    cost_micros: int


class ListedPrice(TypedDict):
    """An endpoint's price in force now, as /v1/models shows it; per-output prices may have resolution tiers
    (``[{max_short_side, unit_price_micros}]``, smallest first; larger outputs pay ``unit_price_micros``)."""

    unit: str
    unit_price_micros: int
    currency: str
    effective_from: str | None
    resolution_tiers: list[dict[str, int]]


@dataclass(frozen=True)
class Reservation:
    """How much GPU time a running job's hold now covers, in total; None: no limit (priced per output, held whole)."""

    covered_gpu_ms: int | None


class AdmissionCheck(Protocol):
    """``new``: the job's row was inserted by the caller's transaction (a submission), so nothing of it can exist
    yet in the layers above (no hold to look for); False for a job that has been queued before (a requeue)."""

    def __call__(self, job: Job, /, *, new: bool = False) -> Refusal | None: ...


# A statement and its parameters (``accounts.statements.Statement``).
Statement = tuple[str, "Sequence[Any] | Mapping[str, Any]"]
AdmissionStatements = Callable[["Job"], "list[Statement] | None"]
ReserveWork = Callable[["Job", int, int], "Reservation | Refusal"]
HeartbeatCheck = Callable[["Job", int], "Refusal | None"]
AttemptFinished = Callable[["Job", "JobAttempt"], object]  # what it answers is not read
EndedUnstarted = Callable[["Job"], None]
JobUsage = Callable[["Job"], "Usage | None"]
EndpointPrice = Callable[["Endpoint"], "ListedPrice | None"]


@dataclass
class Hooks:
    # May this job (its organization, key, endpoint, input) be queued to run? Called inside the transaction that
    # queues it: a submission's, just after the job's row is inserted, and an operator's requeue, just after a failed
    # or cancelled job is moved back to QUEUED. A refusal rolls that transaction back (no job, or the job as it was).
    admit: AdmissionCheck | None = None
    # A new job's admission as statements the submission sends in its own one-query transaction (PostgreSQL), after
    # the job's insert: the last fails that query with ``accounts.statements.UNMET_SQLSTATE`` where ``admit`` has to
    # decide (a refusal, or a limit read under a lock); the submission then runs again in a transaction with
    # ``admit``. None: ``admit`` decides this job. Only where ``admit`` is set too.
    admit_in_query: AdmissionStatements | None = None
    # Before further work of a running job: extend its hold to cover ``gpu_ms`` of GPU time in total (and, credit
    # allowing, ``ahead_ms`` more, so the next steps need no call). A refusal stops the job before that work.
    reserve: ReserveWork | None = None
    # May this running job go on, having used ``gpu_ms`` so far? Called at each heartbeat.
    may_continue: HeartbeatCheck | None = None
    # This attempt is final; called inside the transaction that moves the job to its final state.
    attempt_finished: AttemptFinished | None = None
    # This job reached a final state without any attempt (cancelled in the queue); inside that transaction.
    ended_unstarted: EndedUnstarted | None = None
    # What did this job cost (the ``usage`` object of status and result), or None.
    usage: JobUsage | None = None
    # The price shown for an endpoint in /v1/models, or None.
    price: EndpointPrice | None = None


hooks = Hooks()


def register(
    *,
    admit: AdmissionCheck | None = None,
    admit_in_query: AdmissionStatements | None = None,
    reserve: ReserveWork | None = None,
    may_continue: HeartbeatCheck | None = None,
    attempt_finished: AttemptFinished | None = None,
    ended_unstarted: EndedUnstarted | None = None,
    usage: JobUsage | None = None,
    price: EndpointPrice | None = None,
) -> None:
    """Sets the hooks given (``Hooks`` says when each is called); one left out keeps what it was."""
    given = {
        "admit": admit,
        "admit_in_query": admit_in_query,
        "reserve": reserve,
        "may_continue": may_continue,
        "attempt_finished": attempt_finished,
        "ended_unstarted": ended_unstarted,
        "usage": usage,
        "price": price,
    }
    for name, implementation in given.items():
        if implementation is not None:
            setattr(hooks, name, implementation)
