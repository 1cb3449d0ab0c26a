"""The races, one round at a time: set the rows up through the services, release the actors, check the contract.

The checks state the contract of docs/lifecycle.md and docs/money.md, not what the code happens to do:

- a cancel is recorded whatever state the job is in, and honoured by every path that closes, requeues or resumes it:
  once a cancel has answered (CANCELLATION_REQUESTED, or ALREADY_COMPLETED because the job had ended), the job is
  never QUEUED or DISPATCHED again; an accepted cancel sets ``cancel_requested_at`` and the job ends CANCELLED, or
  COMPLETED when it was past its last step (work that is done is delivered); ALREADY_COMPLETED is only true of a job
  that has ended;
- a transaction that loses a deadlock or serialization race is retried, never dropped: no 40P01 or 40001 reaches a
  caller, nor is one caught and logged in place of the work (one run again is counted, as ``retried``, not failed);
  every ``finish_attempt`` that answered committed its job's final state with its usage record;
- a tenant never has more jobs dispatched or running than its concurrency limit;
- admissions never hold credit twice: with no credit taken back, what is held never exceeds the balance; a key's new
  spending limit holds for every admission that began after it was set;
- the books agree: a final job's hold is released (once), the account's ``held_micros`` is the sum of its open
  holds and its balance the sum of its ledger entries, and ``billing.reconciliation`` finds no new drift.

Each round makes a new organization (``new_organization``, from the tests' fixtures), so one round's leftovers
never cause the next round's findings; reconciliation runs over the whole database, so only drift it had not
reported before the round counts.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db.models import Sum
from django.utils import timezone
from standardwebhooks import Webhook

from accounts.models import Organization, Role, Scope
from accounts.services import add_member, create_api_key, set_concurrency_limit, sign_up
from billing import controls, end_users, reconciliation
from billing.admission import (
    END_USER_OVER_LIMIT,
    INSUFFICIENT,
    OVER_LIMIT,
    member_held,
    member_spent_this_month,
    month_start,
    spent_this_month,
)
from billing.ledger import grant_credits
from billing.models import Account, CreditEntry, EntryKind, Hold, SpendAlert, UsageRecord
from inference import attempts, closing, dispatch
from inference.dispatch import dispatch_organization
from inference.models import FINAL_STATUSES, AttemptOutcome, Endpoint, Job, JobStatus, WebhookDelivery
from inference.webhooks import deliver, webhook_secret_for
from tests.concurrency.harness import (
    CONCURRENCY_SQLSTATES,
    DEADLOCK,
    SERIALIZATION_FAILURE,
    ActorPool,
    Call,
    Outcome,
)
from tests.inference.local_http import LocalServer
from tests.lifecycle import active_counts, counted_active, run, start, submit
from tests.waiting import wait_until

SPEND_REFUSALS = (INSUFFICIENT, OVER_LIMIT)
END_USER = "reseller-customer-7"
CANCELLATION_REQUESTED = "CANCELLATION_REQUESTED"
ALREADY_COMPLETED = "ALREADY_COMPLETED"
WAITING_TO_RUN = (JobStatus.QUEUED, JobStatus.DISPATCHED)
EXAMPLES_KEPT = 12

NewOrganization = Callable[[], Organization]


@dataclass
class RoundReport:
    """What one round broke, each item a sentence about one finding (``retried``: a count, not a finding)."""

    deadlocks: list[str] = field(default_factory=list)  # 40P01 raised to an actor, or logged in place of work
    serialization_failures: list[str] = field(default_factory=list)  # 40001, likewise
    other_errors: list[str] = field(default_factory=list)  # any other exception, refusal or error logged and dropped
    lost_cancels: list[str] = field(default_factory=list)
    lost_work: list[str] = field(default_factory=list)  # finishes that raised, or answered but did not commit
    over_limit: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    retried: int = 0  # statements PostgreSQL killed (40P01, 40001) whose call ran its transaction again and answered

    def record_errors(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            lost_races = 0
            for swallowed in outcome.swallowed:
                line = (
                    f"{outcome.actor}{outcome.arguments} logged and dropped {swallowed['error']} "
                    f"[{swallowed['sqlstate'] or 'no sqlstate'}] ({swallowed['logger']}: {swallowed['message']})"
                )
                self._file(swallowed["sqlstate"], line)
                lost_races += swallowed["sqlstate"] in CONCURRENCY_SQLSTATES
            if not outcome.ok:
                self._file(outcome.sqlstate, outcome.describe())
                lost_races += outcome.sqlstate in CONCURRENCY_SQLSTATES
            self.retried += max(0, len(outcome.lock_races) - lost_races)

    def _file(self, sqlstate: str, line: str) -> None:
        if sqlstate == DEADLOCK:
            self.deadlocks.append(line)
        elif sqlstate == SERIALIZATION_FAILURE:
            self.serialization_failures.append(line)
        else:
            self.other_errors.append(line)


@dataclass
class Tally:
    """One race over its repetitions: how many rounds (or findings) of each kind, and the first few examples."""

    race: str
    repetitions: int = 0
    deadlocks: int = 0  # transactions killed by the deadlock detector whose work was lost (raised or dropped)
    serialization_failures: int = 0
    lost_cancels: int = 0  # rounds in which an answered cancel was not honoured
    lost_work: int = 0  # finish_attempt calls whose work did not commit
    over_limit: int = 0  # rounds in which the concurrency limit was exceeded
    drift: int = 0  # rounds after which the books disagreed
    other_errors: int = 0
    retried: int = 0  # lock races the code survived by running its transaction again: not a finding
    examples: list[str] = field(default_factory=list)

    COUNTERS = (
        "deadlocks",
        "serialization_failures",
        "lost_cancels",
        "lost_work",
        "over_limit",
        "drift",
        "other_errors",
    )

    def add(self, report: RoundReport) -> None:
        self.repetitions += 1
        self.deadlocks += len(report.deadlocks)
        self.serialization_failures += len(report.serialization_failures)
        self.retried += report.retried
        self.lost_cancels += bool(report.lost_cancels)
        self.lost_work += len(report.lost_work)
        self.over_limit += bool(report.over_limit)
        self.drift += bool(report.drift)
        self.other_errors += len(report.other_errors)
        for kind in self.COUNTERS:
            for line in getattr(report, kind):
                if len(self.examples) < EXAMPLES_KEPT:
                    self.examples.append(f"round {self.repetitions}, {kind}: {line}")

    @property
    def findings(self) -> int:
        return sum(getattr(self, kind) for kind in self.COUNTERS)

    def summary(self) -> str:
        counts = ", ".join(f"{kind}={getattr(self, kind)}" for kind in self.COUNTERS)
        examples = "".join(f"\n  - {example}" for example in self.examples)
        return f"{self.race}: {self.repetitions} rounds, {counts}, retried={self.retried}{examples}"

    def as_json(self) -> dict[str, Any]:
        return {
            "race": self.race,
            "repetitions": self.repetitions,
            **{kind: getattr(self, kind) for kind in self.COUNTERS},
            "retried": self.retried,
            "examples": self.examples,
        }

    def write_report(self) -> None:
        """Appends this tally to the JSON-lines file named by ``RACE_REPORT`` (the ``run`` command's table)."""
        path = os.environ.get("RACE_REPORT")
        if path:
            with open(path, "a", encoding="utf-8") as report:
                report.write(json.dumps(self.as_json()) + "\n")


# --- Checks shared by the races ------------------------------------------------------------------------------


class Books:
    """The books of the round's organizations, and any reconciliation drift not reported before."""

    def __init__(self) -> None:
        self._reported: dict[str, int] = {}

    def problems(self, organization_ids: list[uuid.UUID]) -> list[str]:
        found = []
        for account in Account.objects.filter(pk__in=organization_ids):
            open_holds = Hold.objects.filter(organization_id=account.pk, released_at=None)
            held = int(open_holds.aggregate(total=Sum("amount_micros"))["total"] or 0)
            if account.held_micros != held:
                found.append(f"held_micros is {account.held_micros} but the open holds add up to {held}")
            entries = CreditEntry.objects.filter(organization_id=account.pk)
            ledger = int(entries.aggregate(total=Sum("amount_micros"))["total"] or 0)
            if account.balance_micros != ledger:
                found.append(f"balance_micros is {account.balance_micros} but the ledger adds up to {ledger}")
        for organization_id in organization_ids:
            summed, counted = active_counts(organization_id)
            if summed != counted:
                found.append(f"the dispatch reads {summed} active jobs where {counted} are")
        for drift in reconciliation.run_reconciliation(full=True).drift:
            kind = f"{drift['check']}.{drift['kind']}"
            if drift["count"] > self._reported.get(kind, 0):
                found.append(f"reconciliation: {kind} x{drift['count']}: {drift['examples'][:2]}")
                self._reported[kind] = drift["count"]
        return found


def hold_problems(job: Job) -> list[str]:
    """A job holds credit from admission until it is final, and then holds none."""
    hold = Hold.objects.filter(job=job).first()
    if hold is None:
        return [f"job {job.pk} has no hold"]
    if job.status in FINAL_STATUSES and hold.released_at is None:
        return [f"job {job.pk} is {job.status} and still holds {hold.amount_micros} µ$"]
    if job.status not in FINAL_STATUSES and hold.released_at is not None:
        return [f"job {job.pk} is {job.status} but its hold was released"]
    return []


def cancel_problems(job: Job, cancels: list[Outcome], *, must_end: bool) -> list[str]:
    """How the cancels that answered were not honoured (``job`` read after the round).

    ``must_end``: everything else that acts on this job in the round answered (its worker's finish, the reaper), so
    with a cancel answered the job has reached its end: CANCELLED, or COMPLETED when it was past its last step.
    """
    found: list[str] = []
    answered = [outcome for outcome in cancels if outcome.ok]
    for outcome in answered:
        seen = outcome.answer
        answer, seen_status, seen_attempt = seen["answer"], seen["seen_status"], seen["seen_attempt"]
        if answer not in (CANCELLATION_REQUESTED, ALREADY_COMPLETED):
            found.append(f"a cancel answered {answer!r}")
        elif answer == ALREADY_COMPLETED and seen_status not in FINAL_STATUSES:
            found.append(f"a cancel answered ALREADY_COMPLETED and right after the job was {seen_status}")
        elif answer == CANCELLATION_REQUESTED and seen_status in WAITING_TO_RUN:
            found.append(f"a cancel answered CANCELLATION_REQUESTED and right after the job was {seen_status}")
        elif answer == CANCELLATION_REQUESTED and not seen["seen_cancel_requested"]:
            found.append(f"a cancel answered CANCELLATION_REQUESTED and right after the job was {seen_status} unmarked")
        if job.attempt > seen_attempt:
            found.append(
                f"the job was dispatched again (attempt {job.attempt}) after a cancel answered {answer} "
                f"at attempt {seen_attempt}"
            )
    accepted = [outcome for outcome in answered if outcome.answer["answer"] == CANCELLATION_REQUESTED]
    if answered and job.status in WAITING_TO_RUN:
        answers = sorted({outcome.answer["answer"] for outcome in answered})
        found.append(f"the job is {job.status} (attempt {job.attempt}) after cancels answered {answers}")
    if accepted and job.cancel_requested_at is None:
        found.append("a cancel was accepted but cancel_requested_at is not set")
    if must_end and answered:
        if job.status not in FINAL_STATUSES:
            found.append(f"the job is {job.status}, not ended, after the cancels and its worker or reaper answered")
        elif accepted and job.status not in (JobStatus.CANCELLED, JobStatus.COMPLETED):
            found.append(f"a cancel was accepted and the job ended {job.status}")
    return list(dict.fromkeys(found))


def claim_problems(job: Job, claims: list[Outcome]) -> list[str]:
    """One message claimed twice, racing cancels (``job`` read after the round): at most one claim wins; the job runs
    on the winner's worker with one attempt, or it was cancelled before any claim and nothing of one was written."""
    found: list[str] = []
    won = [outcome.answer["worker"] for outcome in claims if outcome.ok and outcome.answer["claimed"]]
    started = list(job.attempts.values_list("worker", flat=True))
    lines = job.logs.filter(message__startswith="Attempt ").count()
    if len(won) > 1:
        found.append(f"two workers claimed job {job.pk}: {won}")
    if started != won[:1] or lines != len(started):
        found.append(f"job {job.pk}: claims won by {won}, attempts {started}, {lines} start line(s)")
    if won and (job.status != JobStatus.RUNNING or job.worker != won[0]):
        found.append(f"job {job.pk} was claimed by {won[0]} and is {job.status} on {job.worker!r}")
    if not won and job.status != JobStatus.CANCELLED:
        found.append(f"job {job.pk} was claimed by no one and is {job.status}, not cancelled")
    return found


def finish_problems(job: Job, outcome: Outcome) -> list[str]:
    """A worker's successful ``finish_attempt`` of a job nothing else closes: it answers, and the job's output is
    delivered (COMPLETED, whatever cancel arrived meanwhile) with its usage record, all committed."""
    attempt = outcome.arguments["attempt"]
    if not outcome.ok:
        return [f"finish_attempt of job {job.pk} raised {outcome.error}: the finished work was rolled back"]
    if not outcome.answer["closed"]:
        return [f"finish_attempt of job {job.pk} found its attempt {attempt} already closed"]
    if job.status != JobStatus.COMPLETED:
        return [f"finish_attempt of job {job.pk} answered {outcome.answer['status']} but the job is {job.status}"]
    if not UsageRecord.objects.filter(job=job, attempt_number=attempt).exists():
        return [f"finish_attempt of job {job.pk} answered but attempt {attempt} has no usage record"]
    return []


# --- a. Cancel against finish, fail-and-retry and reap -------------------------------------------------------

CANCELLERS = 3
CANCEL_RIVALS = ("finish", "retry", "reap", "claim")


def cancel_round(
    pool: ActorPool,
    books: Books,
    *,
    new_organization: NewOrganization,
    endpoint: Endpoint,
    rival: str,
    inside_rival: bool = False,
) -> RoundReport:
    """Three cancels of a running job against its worker finishing it (``finish``), its worker failing with a retry
    (``retry``), or the reaper taking it back after its lease expired (``reap``); or of a dispatched job against two
    workers claiming it (``claim``: its message delivered twice).

    ``inside_rival``: the cancels start once the rival's transaction has locked rows, so they meet it open (the
    interleaving that lost cancels); otherwise all four start together and the machine decides the order.
    """
    organization = new_organization()
    if rival == "claim":
        job = submit(organization, endpoint)
        dispatch_organization(organization.pk)
        job.refresh_from_db()
        assert job.status == JobStatus.DISPATCHED, "setup: the job is not dispatched"
    else:
        job = start(submit(organization, endpoint))
    job_id = str(job.pk)
    if rival == "reap":
        # Its worker died: the lease ran out without a heartbeat.
        Job.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    rival_call = {
        "finish": Call("finish", {"job_id": job_id, "attempt": job.attempt}),
        "retry": Call(
            "finish", {"job_id": job_id, "attempt": job.attempt, "outcome": AttemptOutcome.ERRORED.value, "retry": True}
        ),
        "reap": Call("reap"),
        "claim": Call("claim", {"job_id": job_id, "attempt": job.attempt, "worker": "worker-a"}),
    }[rival]
    rival_call = replace(rival_call, signals_lock=inside_rival)
    cancel_call = Call("cancel", {"job_id": job_id}, awaits_lock=inside_rival)
    rival_calls = [rival_call]
    if rival == "claim":  # the same message taken by a second worker, free to run when it will
        rival_calls.append(Call("claim", {"job_id": job_id, "attempt": job.attempt, "worker": "worker-b"}))
    outcomes = pool.run_round([cancel_call] * CANCELLERS + rival_calls)
    report = RoundReport()
    report.record_errors(outcomes)
    cancels, rival_outcome = outcomes[:CANCELLERS], outcomes[CANCELLERS]
    if rival == "claim":
        job.refresh_from_db()
        report.lost_cancels += cancel_problems(job, cancels, must_end=False)  # no worker runs it to its end here
        report.other_errors += claim_problems(job, outcomes[CANCELLERS:])
        report.drift += hold_problems(job) + books.problems([organization.pk])
        return report
    if rival == "reap":
        # The next sweep: takes the job back if the racing reaper dropped it (reported as an error).
        closing.reap_expired_leases()
    job.refresh_from_db()
    report.lost_cancels += cancel_problems(job, cancels, must_end=rival_outcome.ok)
    if rival == "finish":
        report.lost_work += finish_problems(job, rival_outcome)
    elif rival == "retry" and rival_outcome.ok and not rival_outcome.answer["closed"]:
        report.other_errors.append(f"finish_attempt (retry) of job {job_id} found its attempt already closed")
    report.drift += hold_problems(job) + books.problems([organization.pk])
    return report


# --- b. Submit, dispatch, finish and cancel on one organization ---------------------------------------------

LIFECYCLE_ROLES = ("finish", "submit", "cancel", "dispatch")
CANCEL_TARGETS = ("queued", "running", "dispatched")
SETUP_CREDITS_MICROS = 100_000_000


def lifecycle_round(
    pool: ActorPool, books: Books, *, new_organization: NewOrganization, endpoint: Endpoint, actors: int
) -> RoundReport:
    """``actors`` processes on one organization at its concurrency limit: workers finishing their jobs, clients
    submitting and cancelling (queued, running and dispatched jobs), dispatchers."""
    roles = [LIFECYCLE_ROLES[index % len(LIFECYCLE_ROLES)] for index in range(actors)]
    targets = [CANCEL_TARGETS[index % len(CANCEL_TARGETS)] for index in range(roles.count("cancel"))]
    running = roles.count("finish") + targets.count("running")
    limit = running + targets.count("dispatched")
    waiting = targets.count("queued") + 1  # one more than the cancels take, waiting for a freed slot

    organization = new_organization()
    set_concurrency_limit(organization=organization, limit=limit)
    organization.refresh_from_db()
    grant_credits(organization=organization, amount_micros=SETUP_CREDITS_MICROS, reason="race setup")
    jobs = [submit(organization, endpoint) for _ in range(limit + waiting)]  # each dispatches on commit
    for job in jobs:
        job.refresh_from_db()
    dispatched = [job for job in jobs if job.status == JobStatus.DISPATCHED]
    queued = [job for job in jobs if job.status == JobStatus.QUEUED]
    assert (len(dispatched), len(queued)) == (limit, waiting), "setup: the organization is not at its limit"
    started = [start(job) for job in dispatched[:running]]
    still_dispatched = dispatched[running:]

    to_finish = started[: roles.count("finish")]
    cancel_targets = {"running": started[roles.count("finish") :], "dispatched": still_dispatched, "queued": queued}
    calls: list[Call] = []
    cancelled: list[tuple[Job, str]] = []
    for role in roles:
        if role == "finish":
            job = to_finish.pop()
            calls.append(Call("finish", {"job_id": str(job.pk), "attempt": job.attempt}))
        elif role == "cancel":
            target = targets[len(cancelled)]
            job = cancel_targets[target].pop()
            cancelled.append((job, target))
            calls.append(Call("cancel", {"job_id": str(job.pk)}))
        elif role == "submit":
            calls.append(Call("submit", {"organization_id": str(organization.pk), "endpoint_id": endpoint.pk}))
        else:
            calls.append(Call("dispatch", {"organization_id": str(organization.pk)}))

    outcomes = pool.run_round(calls)
    report = RoundReport()
    report.record_errors(outcomes)
    cancel_outcomes = iter([outcome for outcome in outcomes if outcome.actor == "cancel"])
    for job, target in cancelled:
        job.refresh_from_db()
        # A running job with no worker in the round stays RUNNING, its cancel recorded for the next heartbeat.
        report.lost_cancels += cancel_problems(job, [next(cancel_outcomes)], must_end=target != "running")
    for outcome in outcomes:
        if outcome.actor == "finish":
            report.lost_work += finish_problems(Job.objects.get(pk=outcome.arguments["job_id"]), outcome)
        elif outcome.actor == "submit" and outcome.ok and "refused" in outcome.answer:
            report.other_errors.append(f"a submission was refused: {outcome.answer['refused']}")
    seen_active = [
        outcome.answer["active_after"] for outcome in outcomes if outcome.ok and isinstance(outcome.answer, dict)
    ]
    seen_active.append(counted_active(organization.pk))
    if max(seen_active) > limit:
        report.over_limit.append(f"{max(seen_active)} jobs dispatched or running at once, limit {limit}")
    report.drift += books.problems([organization.pk])
    return report


# --- c. A refund against settlements and a grant ------------------------------------------------------------

REFUNDERS = 2
SETTLERS = 2
GRANT_MICROS = 1_000_000


def refund_round(
    pool: ActorPool, books: Books, *, new_organization: NewOrganization, endpoint: Endpoint
) -> RoundReport:
    """Two refunds of a finished request against two other requests of the organization settling and a grant."""
    organization = new_organization()
    set_concurrency_limit(organization=organization, limit=SETTLERS + 1)
    grant_credits(organization=organization, amount_micros=SETUP_CREDITS_MICROS, reason="race setup")
    paid = run(organization, endpoint, gpu_ms=2_000)
    running = [start(submit(organization, endpoint)) for _ in range(SETTLERS)]
    balance_before = Account.objects.get(pk=organization.pk).balance_micros

    calls = [Call("refund", {"job_id": str(paid.pk)})] * REFUNDERS
    calls += [Call("finish", {"job_id": str(job.pk), "attempt": job.attempt}) for job in running]
    calls.append(Call("grant", {"organization_id": str(organization.pk), "amount_micros": GRANT_MICROS}))
    outcomes = pool.run_round(calls)
    report = RoundReport()
    report.record_errors(outcomes)

    cost = int(paid.usage_records.filter(billable=True).aggregate(total=Sum("cost_micros"))["total"] or 0)
    refunds = [outcome for outcome in outcomes if outcome.actor == "refund" and outcome.ok]
    made = [outcome for outcome in refunds if outcome.answer["refunded"]]
    entries = list(CreditEntry.objects.filter(job=paid, kind=EntryKind.REFUND).values_list("amount_micros", flat=True))
    if len(refunds) == REFUNDERS and len(made) != 1:
        report.drift.append(f"{len(made)} of {REFUNDERS} refunds answered that they refunded")
    if entries != [cost]:
        report.drift.append(f"the refund entries of a request that cost {cost} µ$ are {entries}")
    for outcome in outcomes:
        if outcome.actor == "finish":
            report.lost_work += finish_problems(Job.objects.get(pk=outcome.arguments["job_id"]), outcome)
    granted = sum(outcome.answer["amount_micros"] for outcome in outcomes if outcome.actor == "grant" and outcome.ok)
    settled = int(
        UsageRecord.objects.filter(job__in=running, billable=True).aggregate(total=Sum("cost_micros"))["total"] or 0
    )
    expected = balance_before + granted + sum(entries) - settled
    balance = Account.objects.get(pk=organization.pk).balance_micros
    if balance != expected:
        report.drift.append(
            f"balance {balance} µ$, expected {expected} ({balance_before} + grant {granted} + refunds {sum(entries)} "
            f"- settled {settled})"
        )
    report.drift += books.problems([organization.pk])
    return report


# --- d. Admissions at the edge of the credit and of a key's new limit -------------------------------------

ADMITTERS = 5
CREDIT_FOR_JOBS = 3  # the available credit covers this many more estimates, and half of one


def admission_round(
    pool: ActorPool, books: Books, *, new_organization: NewOrganization, endpoint: Endpoint, limit_first: bool
) -> RoundReport:
    """Five submissions under one API key of an organization whose available credit covers three and a half of their
    estimates, against the settlement of the key's running job (which gives credit back) and a new monthly limit on
    the key that leaves room for one and a half more.

    Admission holds credit with one conditional UPDATE of the account and no lock before it, so the five meet on the
    account's row: however they interleave, the credit is never held twice (``held <= balance``: no credit is taken
    back here) and the books agree. ``limit_first``: the submissions start once the limit's transaction has locked
    the key, so each reads the limit (it waits for the key while the limit is uncommitted) and the key's spend and
    holds stay within it; otherwise all start together, and those that read no limit committed before it did.
    """
    organization = new_organization()
    set_concurrency_limit(organization=organization, limit=ADMITTERS + 2)
    api_key, _ = create_api_key(organization=organization, scopes=[Scope.ADMIN], name="race", created_by=None)
    queued = submit(organization, endpoint, api_key=api_key)
    estimate = Hold.objects.get(job=queued).amount_micros  # every submission of SMALL holds as much
    running = start(queued)
    attempts.reserve_work(job=running, gpu_ms=1_500)  # what its worker reserves before finishing (actors.finish)
    account = Account.objects.get(pk=organization.pk)
    wanted = account.held_micros + CREDIT_FOR_JOBS * estimate + estimate // 2
    if wanted != account.balance_micros:
        grant_credits(organization=organization, amount_micros=wanted - account.balance_micros, reason="race setup",
                      kind=EntryKind.ADJUSTMENT)  # fmt: skip
    key_spent = spent_this_month(organization_id=organization.pk, key_id=api_key.pk)
    limit = key_spent + Hold.objects.get(job=running).amount_micros + estimate + estimate // 2

    submission = Call("submit", {"organization_id": str(organization.pk), "endpoint_id": endpoint.pk,
                                 "api_key_id": str(api_key.pk)}, awaits_lock=limit_first)  # fmt: skip
    calls = [submission] * ADMITTERS
    calls.append(Call("finish", {"job_id": str(running.pk), "attempt": running.attempt}))
    calls.append(
        Call("key_limit", {"api_key_id": str(api_key.pk), "monthly_limit_micros": limit}, signals_lock=limit_first)
    )
    outcomes = pool.run_round(calls)
    report = RoundReport()
    report.record_errors(outcomes)
    for outcome in outcomes:
        if outcome.actor == "submit" and outcome.ok and outcome.answer.get("refused") not in (None, *SPEND_REFUSALS):
            report.other_errors.append(f"a submission was refused: {outcome.answer['refused']}")
        elif outcome.actor == "finish":
            report.lost_work += finish_problems(Job.objects.get(pk=running.pk), outcome)
    account = Account.objects.get(pk=organization.pk)
    if account.held_micros > account.balance_micros:
        admitted = sum(1 for outcome in outcomes if outcome.actor == "submit" and "job_id" in (outcome.answer or {}))
        report.drift.append(
            f"{account.held_micros} µ$ held against a balance of {account.balance_micros} ({admitted} of "
            f"{ADMITTERS} admitted, credit for {CREDIT_FOR_JOBS}.5 estimates of {estimate} and the settlement's)"
        )
    key_held = int(
        Hold.objects.filter(api_key=api_key, released_at=None).aggregate(total=Sum("amount_micros"))["total"] or 0
    )
    key_total = spent_this_month(organization_id=organization.pk, key_id=api_key.pk) + key_held
    if limit_first and key_total > limit:
        report.drift.append(f"the key spent and holds {key_total} µ$, over the limit of {limit} set before")
    report.drift += books.problems([organization.pk])
    return report


# --- e. Admissions at the edge of an end user's new limit ---------------------------------------------------


def end_user_admission_round(
    pool: ActorPool, books: Books, *, new_organization: NewOrganization, endpoint: Endpoint, limit_first: bool
) -> RoundReport:
    """Five submissions tagged with one end user against the settlement of the tag's running job and a new monthly
    limit on the tag that leaves room for one and a half more of their estimates.

    A tag has no row of its own: admission reads its limit behind a share lock on the organization's row, which the
    new limit takes exclusively. ``limit_first``: the submissions start once the limit's transaction has locked the
    organization, so each reads the limit and the tag's spend plus holds stay within it; otherwise all start
    together, and those that read no limit committed before the limit did.
    """
    organization = new_organization()
    set_concurrency_limit(organization=organization, limit=ADMITTERS + 2)
    grant_credits(organization=organization, amount_micros=SETUP_CREDITS_MICROS, reason="race setup")
    queued = submit(organization, endpoint, end_user=END_USER)
    estimate = Hold.objects.get(job=queued).amount_micros
    running = start(queued)
    attempts.reserve_work(job=running, gpu_ms=1_500)  # what its worker reserves before finishing (actors.finish)
    spent = end_users.spent_in_month(organization_id=organization.pk, end_user=END_USER, month=month_start())
    limit = spent + Hold.objects.get(job=running).amount_micros + estimate + estimate // 2

    submission = Call("submit", {"organization_id": str(organization.pk), "endpoint_id": endpoint.pk,
                                 "end_user": END_USER}, awaits_lock=limit_first)  # fmt: skip
    calls = [submission] * ADMITTERS
    calls.append(Call("finish", {"job_id": str(running.pk), "attempt": running.attempt}))
    limit_call = {"organization_id": str(organization.pk), "end_user": END_USER, "monthly_limit_micros": limit}
    calls.append(Call("end_user_limit", limit_call, signals_lock=limit_first))
    outcomes = pool.run_round(calls)
    report = RoundReport()
    report.record_errors(outcomes)
    for outcome in outcomes:
        refused = (outcome.answer or {}).get("refused") if outcome.actor == "submit" and outcome.ok else None
        if refused not in (None, END_USER_OVER_LIMIT):
            report.other_errors.append(f"a submission was refused: {refused}")
        elif outcome.actor == "finish":
            report.lost_work += finish_problems(Job.objects.get(pk=running.pk), outcome)
    # The month admission counts now: a round that crossed a month's end counts only the new month's spend (the
    # limit bounds each month's), not the settlement made the month before.
    total = end_users.spent_in_month(organization_id=organization.pk, end_user=END_USER, month=month_start())
    total += end_users.held(organization.pk, END_USER)
    if limit_first and total > limit:
        report.drift.append(f"the end user spent and holds {total} µ$, over the limit of {limit} set before")
    report.drift += books.problems([organization.pk])
    return report


# --- e'. Admissions under several keys of one member at the edge of the member's new limit ------------------

MEMBER_KEYS = 3
MEMBER_ADMITTERS = 6


def member_admission_round(
    pool: ActorPool, books: Books, *, new_organization: NewOrganization, endpoint: Endpoint, limit_first: bool
) -> RoundReport:
    """Six submissions spread over three API keys one developer made (a job of the first key already running), a
    billing manager lowering the developer's monthly limit (shared by every key they made) from room for three and a
    half more estimates to room for one and a half, and the developer making a fourth key and submitting through it.
    Nothing settles (a settlement gives back what its hold held beyond its cost, which would blunt the bound).

    The limit is read by admission behind the share lock of the job's key; the change locks the organization, then
    every key of the member, and the making of a key locks the organization: so every admission that read the old
    limit commits before the change, and every one after it (through a key made after it too) reads the new one.
    The member's spend this month plus open holds therefore never pass the old limit, never pass the new one once an
    admission that started after the change committed was admitted (each admission that read it committed within it,
    and every one after reads it too), and, ``limit_first`` (the submissions and the new key wait until the change
    has locked rows), stay within the new one. No deadlock or serialization failure escapes; the books agree.
    """
    organization = new_organization()
    set_concurrency_limit(organization=organization, limit=MEMBER_ADMITTERS + 3)
    grant_credits(organization=organization, amount_micros=SETUP_CREDITS_MICROS, reason="race setup")
    developer = sign_up(email=f"race-dev-{uuid.uuid4().hex[:10]}@example.com", password=None)
    add_member(organization=organization, user=developer, role=Role.DEVELOPER)
    keys = [
        create_api_key(organization=organization, name=f"dev {n}", scopes=[Scope.INFERENCE], created_by=developer)[0]
        for n in range(MEMBER_KEYS)
    ]
    queued = submit(organization, endpoint, api_key=keys[0])
    estimate = Hold.objects.get(job=queued).amount_micros
    running = start(queued)
    spent = member_spent_this_month(organization_id=organization.pk, user_id=developer.pk)
    base = spent + Hold.objects.get(job=running).amount_micros
    old_limit = base + 3 * estimate + estimate // 2
    new_limit = base + estimate + estimate // 2
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=old_limit)

    calls = [
        Call(
            "submit",
            {
                "organization_id": str(organization.pk),
                "endpoint_id": endpoint.pk,
                "api_key_id": str(keys[n % MEMBER_KEYS].pk),
            },
            awaits_lock=limit_first,
        )
        for n in range(MEMBER_ADMITTERS)
    ]
    limit_call = {"organization_id": str(organization.pk), "user_id": developer.pk, "monthly_limit_micros": new_limit}
    calls.append(Call("member_limit", limit_call, signals_lock=limit_first))
    new_key = {"organization_id": str(organization.pk), "endpoint_id": endpoint.pk, "user_id": developer.pk}
    calls.append(Call("new_key_submit", new_key, awaits_lock=limit_first))
    outcomes = pool.run_round(calls)
    report = RoundReport()
    report.record_errors(outcomes)
    changed = next(outcome for outcome in outcomes if outcome.actor == "member_limit")
    admitted_after_change = 0
    for outcome in outcomes:
        if outcome.actor in ("submit", "new_key_submit") and outcome.ok:
            refused = outcome.answer.get("refused")
            if refused not in (None, *SPEND_REFUSALS):
                report.other_errors.append(f"a submission was refused: {refused}")
            admitted_after_change += refused is None and changed.ok and outcome.started > changed.ended
    total = member_spent_this_month(organization_id=organization.pk, user_id=developer.pk)
    total += member_held(organization_id=organization.pk, user_id=developer.pk)
    admitted = Job.objects.filter(organization=organization, api_key__created_by=developer).exclude(pk=running.pk)
    seen = f"{admitted.count()} of {MEMBER_ADMITTERS + 1} admitted, estimates of {estimate} µ$"
    if total > old_limit:
        report.drift.append(f"the member spent and holds {total} µ$, over the old limit of {old_limit} ({seen})")
    if (limit_first or admitted_after_change) and total > new_limit:
        report.drift.append(f"the member spent and holds {total} µ$, over the new limit of {new_limit} ({seen})")
    report.drift += books.problems([organization.pk])
    return report


# --- f. Settlements crossing spend alert thresholds together -------------------------------------------------

SETTLEMENTS_CROSSING = 6
ALERT_THRESHOLDS = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def alert_round(
    pool: ActorPool, books: Books, *, new_organization: NewOrganization, endpoint: Endpoint, receiver: LocalServer
) -> RoundReport:
    """Six settlements of one organization released together, whose spend crosses a budget's thresholds (every 10%)
    at once: each commits and looks on commit, in its own process.

    Every threshold the final spend reached is recorded once (none is missed: the last settlement to commit sees
    all of them), with exactly one webhook delivery each; delivered to ``receiver`` (an HTTP server on loopback),
    each arrives once, signed with the organization's Standard Webhooks secret.
    """
    webhook_url = receiver.url("/billing-events")
    organization = new_organization()
    set_concurrency_limit(organization=organization, limit=SETTLEMENTS_CROSSING + 1)
    grant_credits(organization=organization, amount_micros=SETUP_CREDITS_MICROS, reason="race setup")
    run(organization, endpoint, gpu_ms=1_500)  # measured: admission holds a little more than each costs
    running = [start(submit(organization, endpoint)) for _ in range(SETTLEMENTS_CROSSING)]
    per_job = UsageRecord.objects.get(job__organization=organization).cost_micros
    final = per_job * (SETTLEMENTS_CROSSING + 1)
    budget = final + per_job // 3  # 95%-odd once all have settled; what is left covers no request like them
    controls.set_monthly_budget(organization=organization, budget_micros=budget)
    controls.set_alert_settings(organization=organization, budget_thresholds=ALERT_THRESHOLDS, webhook_url=webhook_url)

    calls = [Call("finish", {"job_id": str(job.pk), "attempt": job.attempt}) for job in running]
    outcomes = pool.run_round(calls)
    report = RoundReport()
    report.record_errors(outcomes)
    for outcome in outcomes:
        report.lost_work += finish_problems(Job.objects.get(pk=outcome.arguments["job_id"]), outcome)
    spent = spent_this_month(organization_id=organization.pk)
    expected = sorted(p for p in ALERT_THRESHOLDS if spent * 100 >= p * budget or p >= 100)
    recorded = list(
        SpendAlert.objects.filter(organization=organization).order_by("threshold").values_list("threshold", "pk")
    )
    thresholds = [threshold for threshold, _ in recorded]
    if thresholds != expected:
        report.drift.append(f"alerts at {thresholds}% after spending {spent} of {budget} µ$; expected {expected}")
    deliveries = sorted(WebhookDelivery.objects.filter(organization=organization).values_list("message_id", flat=True))
    wanted = sorted(f"msg_alert_{pk}" for _, pk in recorded)
    if deliveries != wanted:
        report.drift.append(f"webhook deliveries {deliveries} for alerts {wanted}")
    for delivery_id in WebhookDelivery.objects.filter(organization=organization).values_list("pk", flat=True):
        deliver(delivery_id)
    secret = Webhook(webhook_secret_for(organization.pk))
    arrived = []
    for request in receiver.received:
        if request.headers.get("x-fal-webhook-user-id") == str(organization.pk):
            event = secret.verify(request.body, request.headers)
            arrived.append((request.headers["webhook-id"], event["data"]["threshold_percent"]))
    if sorted(arrived) != sorted((f"msg_alert_{pk}", threshold) for threshold, pk in recorded):
        report.drift.append(f"the receiver got {sorted(arrived)} for alerts at {thresholds}%")
    report.drift += books.problems([organization.pk])
    return report


# --- g. A job's message sent ahead of its submission's commit, taken by workers meanwhile -------------------

AHEAD_WORKERS = 3  # the message delivered to three workers (the broker's redelivery, a duplicate)
AHEAD_CASES = ("room", "full", "refused")


def ahead_round(
    pool: ActorPool, books: Books, *, new_organization: NewOrganization, endpoint: Endpoint, case: str
) -> RoundReport:
    """A submission whose job's message goes ahead of its commit, and three workers taking that message as soon as
    it is sent (the earliest a message can reach one), their claims meeting the submission's query.

    ``room``: the organization is under its limit: exactly one worker runs the job. ``full``: it is at its limit:
    the job waits QUEUED and no worker runs it. ``refused``: it has no credit: nothing is stored and no worker runs
    anything. In every case the submission says it has ended, for a worker that waits."""
    organization = new_organization()
    set_concurrency_limit(organization=organization, limit=1)
    if case == "refused":
        account = Account.objects.get(pk=organization.pk)
        grant_credits(organization=organization, amount_micros=-account.balance_micros, reason="race setup",
                      kind=EntryKind.ADJUSTMENT)  # fmt: skip
    else:
        grant_credits(organization=organization, amount_micros=SETUP_CREDITS_MICROS, reason="race setup")
    if case == "full":
        submit(organization, endpoint)  # dispatched: the one slot taken
    job_id = str(uuid.uuid4())
    calls = [Call("submit_ahead", {"organization_id": str(organization.pk), "endpoint_id": endpoint.pk,
                                   "job_id": job_id}, signals_lock=True)]  # fmt: skip
    calls += [Call("claim_ahead", {"job_id": job_id, "worker": f"worker-{n}"}, awaits_lock=True)
              for n in range(AHEAD_WORKERS)]  # fmt: skip
    outcomes = pool.run_round(calls)
    report = RoundReport()
    report.record_errors(outcomes)
    submitted = next(outcome for outcome in outcomes if outcome.actor == "submit_ahead")
    won = [outcome.answer["worker"] for outcome in outcomes
           if outcome.actor == "claim_ahead" and outcome.ok and outcome.answer["claimed"]]  # fmt: skip
    job = Job.objects.filter(pk=job_id).first()
    answer = submitted.answer or {}
    if case == "refused":
        if answer.get("refused") != INSUFFICIENT or job is not None:
            report.other_errors.append(f"a submission with no credit answered {answer}, its job {job}")
    elif answer.get("job_id") != job_id:
        report.other_errors.append(f"the submission answered {answer}, not job {job_id}")
    if case == "room" and job is not None:
        if len(won) != 1 or job.status != JobStatus.RUNNING or job.worker != won[0] or job.attempts.count() != 1:
            report.lost_work.append(f"job {job_id} with room: claims won by {won}, {job.status} on {job.worker!r}")
    elif won:
        report.over_limit.append(f"job {job_id} ({case}) was claimed by {won}, and is {job and job.status}")
    if case == "full" and job is not None and job.status != JobStatus.QUEUED:
        report.over_limit.append(f"job {job_id} over the limit is {job.status}")
    if settings.REDIS_URL:
        said = redis.Redis.from_url(settings.REDIS_URL)
        try:  # on the submission's message thread, maybe after it answered
            wait_until(lambda: said.exists(dispatch.ahead_end(job_id)), timeout=10, message="the submission's end")
        except AssertionError:
            report.other_errors.append(f"job {job_id}'s submission did not say it had ended")
    report.drift += books.problems([organization.pk])
    return report


# --- Running a race ----------------------------------------------------------------------------------------

# The marks of a module of race tests.
RACE_MARKS = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("priced_without_broker"),
    pytest.mark.skipif(
        settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
        reason="races need PostgreSQL (DATABASE_URL): SQLite runs one writer at a time, so they cannot happen there",
    ),
]


def repetitions() -> int:
    """Rounds per race: ``RACE_REPETITIONS``, 5 unless set (CI); the ``run`` command sets 100."""
    return max(1, int(os.environ.get("RACE_REPETITIONS", "5")))


def lifecycle_actors() -> int:
    """Actor processes in the one-organization race: ``RACE_ACTORS``, 8 unless set."""
    return max(len(LIFECYCLE_ROLES), int(os.environ.get("RACE_ACTORS", "8")))


def run_race(race: str, rounds: int, play_round: Callable[[Books, int], RoundReport]) -> Tally:
    """``rounds`` rounds of one race (``play_round(books, round_number)``), tallied; the tally is written to
    ``RACE_REPORT`` when that is set."""
    tally = Tally(race)
    books = Books()
    for round_number in range(1, rounds + 1):
        tally.add(play_round(books, round_number))
    tally.write_report()
    return tally
