"""The hot tenant: one organization's submits and finishes per second against as many organizations' at once.

    DATABASE_URL=postgres://... python -m tests.bench.hot_tenant [--processes 4] [--seconds 15] [--rounds 2]
        [--warmup 2] [--concurrency-limit 1000000] [--sample-ms 50]

Against PostgreSQL only (a scratch database named after DATABASE_URL's, dropped at the end), with billing installed
as in production: the opening rate card in force, every organization granted far more credit than the run uses, and
a concurrency limit high enough that dispatch never holds a job back (``--concurrency-limit 2``, the platform's
default, measures a tenant's real limit instead). REDIS_URL, when set, is the cache and the job-events channel as
in production; nothing reaches a broker.

``--processes`` N submitting processes call ``inference.submission.submit_job`` in a loop (the insert, billing's
admission, COMMIT, then the organization's dispatch, in one query), and N finishing processes do what a GPU worker
does with each message: ``inference.attempts.claim_message`` (which waits for the submission of a message sent
ahead of its commit), one ``reserve_work`` and ``inference.closing.finish_attempt`` with a small result (billing's
settlement inside). ``inference.dispatch.send_run_message`` and ``send_ahead_message`` are patched in every process
to put the message on an in-memory queue of the organization (a multiprocessing queue standing in for the broker)
and answer True. Two configurations, ``--seconds``
counted for each:

- one organization: every process works for it;
- N organizations: submitter i and finisher i work for organization i.

The time is split into ``--rounds`` windows per configuration, in the order one, N, N, one... (so a load that grows
or fades on a shared machine weighs on both alike), each after ``--warmup`` seconds not counted, each with
organizations and message queues of its own. It prints submits/s and finishes/s of each configuration and the ratio
one / N (each ratio from this one run), then where the time goes, so the profile says why one tenant is slower:

- per call, measured in each process: milliseconds in each kind of statement (a row lock by table, an upsert, ...),
  in COMMIT, and outside the database (Python, the pool, the queue);
- the organization's own rows (its account, the organization, its usage rollups): how long each transaction held
  the lock, from the answer of the statement that took it (a locking read, or the UPDATE or upsert that wrote the
  row) to its COMMIT's, the row's locked time per job and the share of the time it was locked; an exclusive lock
  held that long per job caps one organization at 1000 / (ms per job) jobs/s;
- per process, sampled from ``pg_stat_activity`` every ``--sample-ms``: the share of time its backend waited on a
  row lock (by the table its waiting statement names), worked in PostgreSQL, waited on PostgreSQL itself (WAL,
  I/O, LWLocks), or sat idle inside a transaction (locks held while the client runs Python) or outside one.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.bench.queue_overhead import drop_postgres
from tests.waiting import pace, wait_until

REPO = Path(__file__).resolve().parents[2]
APP_PREFIX = "hot-tenant-"  # application_name of every benchmark process's connections
CREDIT_MICROS = 10**12  # a million dollars each: admission never refuses for credit
GPU_MS = 1_000  # what each finished attempt reports, within the hold admission placed
SMALL = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
RESULT = {"images": [{"url": "x", "width": 64, "height": 64}], "seed": 1}
ROLES = ("submit", "finish")
# Tables with one row per organization that a job's transactions lock: every job of a tenant meets on these rows
# (the usage rollups: one hour row and one day row per organization, endpoint, key and GPU class, which is one pair
# per organization here).
ORGANIZATION_ROWS = ("billing_account", "accounts_organization", "billing_usagerollup")


@dataclass(frozen=True)
class Tenant:
    organization_id: str
    api_key_id: str


@dataclass(frozen=True)
class Phase:
    """What one process does in a phase: work for ``tenant``, its messages on queue ``queue_index``."""

    tenant: Tenant
    endpoint_id: str
    queue_index: int
    begin: float  # time.monotonic(): the window counted (one clock for every process on Linux)
    end: float
    start: float  # when the warm-up begins


@dataclass
class Report:
    """What one process measured in a phase's window."""

    role: str
    slot: int
    calls: int = 0
    call_ms: list[float] = field(default_factory=list)
    busy_s: float = 0.0  # inside calls
    waiting_s: float = 0.0  # a finisher waiting for a message
    statement_s: dict[str, float] = field(default_factory=dict)  # by kind of statement, COMMIT included
    statements: int = 0
    held_s: dict[str, float] = field(default_factory=dict)  # by table: from its row lock to the COMMIT
    holds: dict[str, int] = field(default_factory=dict)  # by table: transactions that locked one of its rows
    lock_races: int = 0  # statements PostgreSQL killed for a deadlock or serialization failure (retried)
    lost_claims: int = 0
    errors: int = 0
    first_error: str = ""
    prepared: dict[str, str] = field(default_factory=dict)  # the kinds of the statements it prepared, by name


# --- Kinds of statement ------------------------------------------------------------------------------------

_TABLE_AFTER = re.compile(r'(?:FROM|UPDATE|INTO)\s+"?(\w+)"?')
# The tables a query writes with an UPDATE or an upsert (INSERT … ON CONFLICT … DO UPDATE), in any of its parts.
_WRITTEN = re.compile(r'\bUPDATE\s+"?(\w+)"?|\bINSERT\s+INTO\s+"?(\w+)"?(?:(?!\bINSERT\b)[^;])*?\bON\s+CONFLICT')


# The kinds of the statements prepared by name (``accounts.statements.in_turn``'s plan_once), by that name: each
# process learns its own from the PREPAREs it sends, and the parent from the processes' reports.
PREPARED: dict[str, str] = {}
_EXECUTED = re.compile(r"EXECUTE\s+(\w+)")


def statement_kind(sql: str) -> str:
    """``lock billing_account``, ``upsert billing_usagerollup``, ``select inference_job``, ``SAVEPOINT``...; a query
    of prepared statements, the kinds of its parts (``insert inference_job + update billing_account``)."""
    text = sql.lstrip()
    if text.startswith("EXECUTE "):
        parts = dict.fromkeys(PREPARED.get(name, "EXECUTE") for name in _EXECUTED.findall(text))
        return " + ".join(parts)
    verb = text.split(None, 1)[0].upper() if text else ""
    if verb == "WITH" and "(" in text:  # named by the statement of its first part, such as an UPDATE
        verb = text.split("(", 1)[1].split(None, 1)[0].upper()
    match = _TABLE_AFTER.search(text)
    table = match.group(1) if match else ""
    if " FOR NO KEY UPDATE" in text or " FOR UPDATE" in text or " FOR KEY SHARE" in text:
        return f"lock {table}"
    if verb == "INSERT" and "ON CONFLICT" in text and "DO UPDATE" in text:
        return f"upsert {table}"
    if verb in ("SELECT", "INSERT", "UPDATE", "DELETE") and table:
        return f"{verb.lower()} {table}"
    return verb or "?"


def _overlap(start: float, end: float, begin: float, finish: float) -> float:
    return max(0.0, min(end, finish) - max(start, begin))


# --- The benchmark's processes ------------------------------------------------------------------------------


class _Meter:
    """Times every statement and COMMIT of this process's connection, by kind, for the call under way, and how long
    each transaction held the row locks it took (from the locking statement's answer to the COMMIT's)."""

    def __init__(self) -> None:
        self.pending: dict[str, float] = defaultdict(float)
        self.count = 0
        self.races = 0
        self.locked_at: dict[str, float] = {}  # by table, in the transaction under way
        self.held: dict[str, float] = defaultdict(float)
        self.holds: Counter[str] = Counter()

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        from tests.concurrency.harness import CONCURRENCY_SQLSTATES, sqlstate_of

        if sql.startswith("PREPARE "):
            name, _, body = sql.removeprefix("PREPARE ").partition(" AS ")
            PREPARED[name] = statement_kind(body)
        kind = statement_kind(sql)
        started = time.perf_counter()
        try:
            result = execute(sql, params, many, context)
        except Exception as exc:
            if sqlstate_of(exc) in CONCURRENCY_SQLSTATES:
                self.races += 1
            raise
        finally:
            ended = time.perf_counter()
            self.pending[kind] += ended - started
            self.count += 1
        # A row lock is taken by a locking read, or by an UPDATE or upsert that writes the row, in any statement or
        # data-modifying WITH of the query (a settlement's debit locks the account and its rollups).
        verb, _, table = kind.partition(" ")
        locked = {table} if verb == "lock" else set()
        locked |= {update or upsert for update, upsert in _WRITTEN.findall(sql)} & set(ORGANIZATION_ROWS)
        if sql.rstrip().endswith("; COMMIT"):
            # The COMMIT sent along (accounts.statements.commits_along): its locks were held within the query, at
            # most from its start.
            for table in locked:
                self.locked_at.setdefault(table, started)
            self.released(ended)
        elif context["connection"].in_atomic_block:
            for table in locked:
                self.locked_at.setdefault(table, ended)
        return result

    def released(self, at: float) -> None:
        """The transaction under way committed at ``at``: the locks it held were held until then."""
        for table, locked_at in self.locked_at.items():
            self.held[table] += at - locked_at
            self.holds[table] += 1
        self.locked_at.clear()

    @contextmanager
    def installed(self) -> Iterator[None]:
        from django.db import connections

        wrapper = connections["default"]
        commit, rollback = wrapper.commit, wrapper.rollback

        def timed_commit() -> None:
            started = time.perf_counter()
            try:
                commit()
            finally:
                ended = time.perf_counter()
                self.pending["COMMIT"] += ended - started
                self.released(ended)

        def forgetting_rollback() -> None:
            self.locked_at.clear()  # a lost lock race: its transaction runs again and is timed then
            rollback()

        # This process's only connection: its transactions end through these two.
        wrapper.commit = timed_commit  # type: ignore[method-assign]
        wrapper.rollback = forgetting_rollback  # type: ignore[method-assign]
        try:
            with wrapper.execute_wrapper(self):
                yield
        finally:
            del wrapper.commit, wrapper.rollback

    def close_call(self, report: Report, counted: bool) -> None:
        if counted:
            for kind, seconds in self.pending.items():
                report.statement_s[kind] = report.statement_s.get(kind, 0.0) + seconds
            report.statements += self.count
            report.lock_races += self.races
            for table, seconds in self.held.items():
                report.held_s[table] = report.held_s.get(table, 0.0) + seconds
                report.holds[table] = report.holds.get(table, 0) + self.holds[table]
        self.pending.clear()
        self.held.clear()
        self.holds.clear()
        self.count = self.races = 0


def _serve(role: str, slot: int, env: dict[str, str], tasks: Any, results: Any, queues: list[Any]) -> None:
    """One benchmark process: set up as the platform's processes do, then one phase per task until ``None``."""
    os.environ.update(env)
    os.environ["PGAPPNAME"] = f"{APP_PREFIX}{role}-{slot}"  # libpq names every connection of this process
    try:
        import logging

        import django

        django.setup()
        from inference import dispatch

        logging.disable(logging.WARNING)  # lost lock races are counted, not logged one by one
        current: dict[str, Any] = {}

        def send_run_message(job_id: str, attempt: int, queue_name: str) -> bool:
            current["queue"].put((job_id, attempt, False))
            return True

        def send_ahead_message(job_id: str, queue_name: str) -> bool:
            current["queue"].put((job_id, 1, time.time()))  # as publish_run says when it was sent
            return True

        dispatch.send_run_message = send_run_message
        dispatch.send_ahead_message = send_ahead_message
        for messages in queues:
            messages.cancel_join_thread()  # messages left over at the end are dropped, not waited on at exit
    except BaseException as exc:
        results.put(("failed", role, slot, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise
    results.put(("ready", role, slot, ""))
    while (task := tasks.get()) is not None:
        phase = Phase(tenant=Tenant(**task.pop("tenant")), **task)
        current["queue"] = queues[phase.queue_index]
        try:
            report = (_submit if role == "submit" else _finish)(slot, phase, current["queue"])
        except BaseException as exc:
            results.put(("failed", role, slot, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            raise
        report.prepared = dict(PREPARED)
        results.put(("report", role, slot, asdict(report)))


def _start_at(moment: float) -> None:
    pace(moment - time.monotonic())  # the benchmark's start line, shared by every process


def _note_error(report: Report, exc: BaseException) -> None:
    report.errors += 1
    report.first_error = report.first_error or f"{type(exc).__name__}: {str(exc)[:300]}"


def _submit(slot: int, phase: Phase, messages: Any) -> Report:
    from accounts.models import ApiKey, Organization
    from inference.models import Endpoint
    from inference.submission import submit_job

    organization = Organization.objects.get(pk=phase.tenant.organization_id)
    api_key = ApiKey.objects.get(pk=phase.tenant.api_key_id)
    endpoint = Endpoint.objects.get(pk=phase.endpoint_id)
    report, meter = Report(role="submit", slot=slot), _Meter()
    _start_at(phase.start)
    with meter.installed():
        while (started := time.monotonic()) < phase.end:
            try:
                submit_job(organization=organization, api_key=api_key, endpoint=endpoint, payload=SMALL)
            except Exception as exc:
                _note_error(report, exc)
            ended = time.monotonic()
            counted = phase.begin <= ended <= phase.end
            meter.close_call(report, counted)
            report.busy_s += _overlap(started, ended, phase.begin, phase.end)
            if counted:
                report.calls += 1
                report.call_ms.append((ended - started) * 1000)
    return report


def _finish(slot: int, phase: Phase, messages: Any) -> Report:
    from inference import attempts, closing
    from inference.models import AttemptOutcome

    report, meter = Report(role="finish", slot=slot), _Meter()
    _start_at(phase.start)
    with meter.installed():
        while (waited_from := time.monotonic()) < phase.end:
            try:
                job_id, attempt, ahead = messages.get(timeout=min(0.05, phase.end - waited_from))
            except queue.Empty:
                job_id = None
            started = time.monotonic()
            report.waiting_s += _overlap(waited_from, started, phase.begin, phase.end)
            if job_id is None:
                continue
            finished = False
            try:
                job = attempts.claim_message(job_id=job_id, attempt=attempt, worker=f"hot-tenant-{slot}", ahead=ahead)
                if job is None:
                    report.lost_claims += 1
                else:
                    attempts.reserve_work(job=job, gpu_ms=GPU_MS)
                    finished = (
                        closing.finish_attempt(
                            job_id=job_id, attempt=attempt, outcome=AttemptOutcome.SUCCEEDED, gpu_ms=GPU_MS,
                            result=RESULT,
                        )
                        is not None
                    )  # fmt: skip
            except Exception as exc:
                _note_error(report, exc)
            ended = time.monotonic()
            counted = phase.begin <= ended <= phase.end
            meter.close_call(report, counted)
            report.busy_s += _overlap(started, ended, phase.begin, phase.end)
            if counted and finished:
                report.calls += 1
                report.call_ms.append((ended - started) * 1000)
    return report


# --- The parent: the world, the phases, the sampler ---------------------------------------------------------


def scratch_database(url: str) -> tuple[str, str]:
    """A new database named after the one in ``url`` (``<name>_tenants_<pid>``), and its URL."""
    import psycopg

    base = urlsplit(url).path.lstrip("/") or "postgres"
    name = f"{base}_tenants_{os.getpid()}"[:63]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}", name


def make_tenants(count: int, concurrency_limit: int) -> tuple[list[Tenant], str]:
    """``count`` organizations, each with an inference key, plenty of credit and ``concurrency_limit``; the endpoint."""
    from django.utils import timezone

    from accounts.models import Organization
    from accounts.services import create_api_key, sign_up
    from billing.ledger import grant_credits
    from billing.pricing import price_for
    from inference.catalog import ensure_builtin_endpoints
    from inference.models import Endpoint

    ensure_builtin_endpoints(Endpoint)
    endpoint = Endpoint.objects.get(owner="platform", name="tiny-sd", path="")
    if price_for(endpoint, timezone.now()).price is None:
        raise SystemExit("no price in force for platform/tiny-sd: the opening rate card is missing")
    tenants = []
    for number in range(count):
        user = sign_up(email=f"hot-tenant-{number}@example.com", password=None)
        organization = Organization.objects.get(memberships__user=user)
        Organization.objects.filter(pk=organization.pk).update(concurrency_limit=concurrency_limit)
        key, _ = create_api_key(organization=organization, name="bench", scopes=["inference"], created_by=user)
        grant_credits(organization=organization, amount_micros=CREDIT_MICROS, reason="hot tenant benchmark")
        tenants.append(Tenant(organization_id=str(organization.pk), api_key_id=str(key.pk)))
    return tenants, str(endpoint.pk)


class Pool:
    """N submitting and N finishing processes, set up once for both phases."""

    def __init__(self, processes: int, env: dict[str, str], queue_count: int) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._results: Any = self._context.Queue()
        self.queues = [self._context.Queue() for _ in range(queue_count)]
        self._tasks = {(role, slot): self._context.Queue() for role in ROLES for slot in range(processes)}
        self._processes = [
            self._context.Process(target=_serve, args=(role, slot, env, tasks, self._results, self.queues), daemon=True)
            for (role, slot), tasks in self._tasks.items()
        ]

    def start(self, timeout: float = 180) -> None:
        for process in self._processes:
            process.start()
        ready = 0
        deadline = time.monotonic() + timeout
        while ready < len(self._processes):
            kind, role, slot, detail = self.next_result(deadline)
            if kind == "failed":
                raise SystemExit(f"the {role} process {slot} could not set up: {detail}")
            ready += kind == "ready"

    def send(self, role: str, slot: int, phase: Phase) -> None:
        task = asdict(phase)
        self._tasks[(role, slot)].put(task)

    def next_result(self, deadline: float) -> tuple[str, str, int, Any]:
        while True:
            try:
                result: tuple[str, str, int, Any] = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = [process.name for process in self._processes if not process.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise SystemExit(f"benchmark processes died or fell silent: {dead}") from None
                continue
            return result

    def poll(self) -> tuple[str, str, int, Any] | None:
        try:
            result: tuple[str, str, int, Any] = self._results.get_nowait()
        except queue.Empty:
            return None
        return result

    def close(self) -> None:
        for tasks in self._tasks.values():
            tasks.put(None)
        for process in self._processes:
            process.join(20)
            if process.is_alive():
                process.terminate()
                process.join(10)


@dataclass
class PhaseResult:
    """One configuration (one organization, or N), summed over its windows."""

    name: str
    organizations: int
    seconds: float = 0.0
    reports: list[Report] = field(default_factory=list)
    # By role: a state, or a lock wait's (query, the role and query of the backend it waits for): ``waiting_label``.
    samples: dict[str, Counter[Any]] = field(default_factory=lambda: {role: Counter() for role in ROLES})

    def of(self, role: str) -> list[Report]:
        return [report for report in self.reports if report.role == role]

    def rate(self, role: str) -> float:
        return sum(report.calls for report in self.of(role)) / self.seconds


def sample_state(
    state: str, wait_type: str | None, wait_event: str | None, query: str, blocker: tuple[str, str] | None = None
) -> str | tuple[str, str, str]:
    """What a backend was doing at one sample: ``PostgreSQL working``...; waiting on a lock, its query and the first
    backend it waits for (its role, its query), named once every process has said what its prepared statements are
    (``waiting_label``)."""
    if state == "active":
        if wait_type == "Lock":
            return (query, *(blocker or ("", "")))
        if wait_type:
            return f"PostgreSQL waiting on itself ({wait_type})"
        return "PostgreSQL working"
    if state.startswith("idle in transaction"):
        return "client inside a transaction (locks held)"
    return "client outside a transaction"


def waiting_label(sample: str | tuple[str, str, str]) -> str:
    if isinstance(sample, str):
        return sample
    query, role, held_by = sample
    holder = f", behind a {role} ({statement_kind(held_by)})" if role else ""
    return f"waiting on a lock: {statement_kind(query)}{holder}"


def run_window(
    pool: Pool,
    into: PhaseResult,
    assignments: list[tuple[Tenant, int]],
    endpoint_id: str,
    seconds: float,
    args: argparse.Namespace,
    url: str,
) -> None:
    """One window of ``seconds`` after the warm-up, added to ``into``: each process pair works for its tenant
    (``assignments[slot]`` is the tenant of pair ``slot`` and the queue its messages go on)."""
    import psycopg

    start = time.monotonic() + 1.0
    begin = start + args.warmup
    end = begin + seconds
    for slot, (tenant, queue_index) in enumerate(assignments):
        for role in ROLES:
            pool.send(role, slot, Phase(tenant, endpoint_id, queue_index, begin=begin, end=end, start=start))
    samples, reports = into.samples, into.reports
    expected = len(reports) + len(assignments) * len(ROLES)

    def in_window() -> bool:
        return begin <= time.monotonic() <= end

    with psycopg.connect(url, autocommit=True) as sampler:

        def all_reported() -> bool:
            """Samples what the backends are doing (in the window), then takes the reports in; True once all are."""
            if in_window():
                rows = sampler.execute(
                    "SELECT a.application_name, a.state, a.wait_event_type, a.wait_event, a.query,"
                    " b.application_name, b.query FROM pg_stat_activity a LEFT JOIN LATERAL (SELECT * FROM"
                    " pg_stat_activity h WHERE a.wait_event_type = 'Lock' AND h.pid = (pg_blocking_pids(a.pid))[1])"
                    " b ON true WHERE a.datname = current_database() AND a.application_name LIKE %s",
                    (f"{APP_PREFIX}%",),
                ).fetchall()
                for application, state, wait_type, wait_event, query_text, holder, held_by in rows:
                    role = application.removeprefix(APP_PREFIX).split("-")[0]
                    blocker = None if holder is None else (holder.removeprefix(APP_PREFIX).split("-")[0], held_by)
                    sample = sample_state(state or "", wait_type, wait_event, query_text or "", blocker)
                    samples[role][sample] += 1
            while (result := pool.poll()) is not None:
                kind, role, slot, payload = result
                if kind == "failed":
                    raise SystemExit(f"the {role} process {slot} failed: {payload}")
                reports.append(Report(**payload))
                PREPARED.update(payload.get("prepared", {}))
            return len(reports) >= expected

        wait_until(
            all_reported,
            timeout=end + 120 - time.monotonic(),
            message=lambda: f"{into.name}'s reports: {expected - len(reports)} processes never reported",
            interval=lambda: args.sample_ms / 1000 if in_window() else 0.05,
            failure=SystemExit,
        )
    into.seconds += seconds


def check_books(tenants: list[Tenant]) -> list[str]:
    """Each organization's cached balance equals its ledger, its held amount its open holds, and the active jobs its
    dispatch reads its jobs counted (zero drift)."""
    from django.db.models import Sum

    from billing.models import Account, CreditEntry, Hold
    from inference import active_jobs

    drift = [
        row["organization_id"] for row in active_jobs.disagreements([tenant.organization_id for tenant in tenants])
    ]
    for tenant in tenants:
        account = Account.objects.get(pk=tenant.organization_id)
        entries = CreditEntry.objects.filter(organization_id=tenant.organization_id)
        ledger = entries.aggregate(total=Sum("amount_micros"))["total"] or 0
        open_holds = Hold.objects.filter(organization_id=tenant.organization_id, released_at=None)
        held = open_holds.aggregate(total=Sum("amount_micros"))["total"] or 0
        if (account.balance_micros, account.held_micros) != (ledger, held):
            drift.append(tenant.organization_id)
    return drift


# --- What it prints -----------------------------------------------------------------------------------------


def _ms_per_call(reports: list[Report]) -> tuple[dict[str, float], float, float]:
    """Milliseconds per call by kind of statement, the mean call, and the p50 call."""
    calls = sum(report.calls for report in reports) or 1
    by_kind: dict[str, float] = defaultdict(float)
    for report in reports:
        for kind, seconds in report.statement_s.items():
            by_kind[kind] += seconds * 1000 / calls
    durations = [ms for report in reports for ms in report.call_ms]
    mean = sum(durations) / len(durations) if durations else 0.0
    return by_kind, mean, statistics.median(durations) if durations else 0.0


def _mean_hold_ms(phase: PhaseResult, role: str, table: str) -> float:
    reports = phase.of(role)
    holds = sum(report.holds.get(table, 0) for report in reports)
    return sum(report.held_s.get(table, 0.0) for report in reports) * 1000 / holds if holds else 0.0


def _row_ms_per_job(phase: PhaseResult, table: str) -> float:
    """How long one organization's row of ``table`` is locked for each job: by its submit and by its finish."""
    total = 0.0
    for role in ROLES:
        reports = phase.of(role)
        calls = sum(report.calls for report in reports)
        if calls:
            total += sum(report.held_s.get(table, 0.0) for report in reports) * 1000 / calls
    return total


def _row_busy(phase: PhaseResult, table: str) -> float:
    """The share of the time the rows of ``table`` were locked, per organization (an exclusive lock: at most 100%
    for a row only one organization's transactions lock, such as its account)."""
    held = sum(report.held_s.get(table, 0.0) for report in phase.reports)
    return held / (phase.seconds * phase.organizations) if phase.seconds else 0.0


def print_results(one: PhaseResult, many: PhaseResult, args: argparse.Namespace, drift: list[str]) -> None:
    from django.db import connection

    version = connection.pg_version  # type: ignore[attr-defined]
    n = args.processes
    print(
        f"hot tenant: {n} submitting + {n} finishing processes; {args.seconds:g} s counted for each configuration in"
        f" {args.rounds} windows (one org first, then alternating), each after {args.warmup:g} s of warm-up;"
        f" PostgreSQL {version // 10000}.{version % 10000}, billing on (opening rate card, ample credit), concurrency"
        f" limit {args.concurrency_limit:,}; {os.cpu_count()} cores"
    )
    header = f"  {'':22}{'submits/s':>10}{'finishes/s':>12}{'submit ms p50':>15}{'finish ms p50':>15}"
    print(header)
    for phase in (one, many):
        _, _, submit_p50 = _ms_per_call(phase.of("submit"))
        _, _, finish_p50 = _ms_per_call(phase.of("finish"))
        print(
            f"  {phase.name:22}{phase.rate('submit'):10.0f}{phase.rate('finish'):12.0f}"
            f"{submit_p50:15.1f}{finish_p50:15.1f}"
        )
    submit_ratio = one.rate("submit") / max(many.rate("submit"), 1e-9)
    finish_ratio = one.rate("finish") / max(many.rate("finish"), 1e-9)
    print(f"  {'one / ' + str(n) + ' organizations':22}{submit_ratio:9.2f}x{finish_ratio:11.2f}x   (target >= 0.90x)")
    for phase in (one, many):
        problems = []
        for role in ROLES:
            reports = phase.of(role)
            races = sum(report.lock_races for report in reports)
            errors = sum(report.errors for report in reports)
            lost = sum(report.lost_claims for report in reports)
            if races or errors or lost:
                first = next((report.first_error for report in reports if report.first_error), "")
                problems.append(f"{role}: {races} lock races retried, {lost} claims lost, {errors} errors {first}")
        waiting = sum(report.waiting_s for report in phase.of("finish")) / (n * phase.seconds)
        problems.append(f"finishers waited for a message {waiting:.0%} of the time")
        print(f"  {phase.name}: " + "; ".join(problems))
    books = "balance, holds and active jobs match the ledger and the jobs" if not drift else f"DRIFT in {drift}"
    print(f"  books: {books} for every organization")

    print("\nwhere a call's time goes, ms per call (measured in the processes):")
    for role in ROLES:
        one_kinds, one_mean, _ = _ms_per_call(one.of(role))
        many_kinds, many_mean, _ = _ms_per_call(many.of(role))
        print(f"  {role + ' call':36}{'one org':>9}{f'{n} orgs':>9}")
        ranked = sorted(set(one_kinds) | set(many_kinds), key=lambda kind: -one_kinds.get(kind, 0.0))
        shown, rest_one, rest_many = ranked[:8], 0.0, 0.0
        for kind in ranked[8:]:
            rest_one += one_kinds.get(kind, 0.0)
            rest_many += many_kinds.get(kind, 0.0)
        for kind in shown:
            print(f"    {kind:34}{one_kinds.get(kind, 0.0):9.2f}{many_kinds.get(kind, 0.0):9.2f}")
        print(f"    {'other statements':34}{rest_one:9.2f}{rest_many:9.2f}")
        outside_one = one_mean - sum(one_kinds.values())
        outside_many = many_mean - sum(many_kinds.values())
        print(f"    {'outside the database (Python...)':34}{outside_one:9.2f}{outside_many:9.2f}")
        print(f"    {'the whole call (mean)':34}{one_mean:9.2f}{many_mean:9.2f}")

    print(
        "\nrows one per organization: ms each transaction held the lock (to COMMIT), ms per job, share of time locked:"
    )
    print(f"  {'':30}{'one org':>10}{f'{n} orgs':>10}")
    for table in ORGANIZATION_ROWS:
        print(f"  {table}")
        for role in ROLES:
            one_ms, many_ms = _mean_hold_ms(one, role, table), _mean_hold_ms(many, role, table)
            print(f"    {'held by a ' + role:28}{one_ms:10.2f}{many_ms:10.2f}")
        print(f"    {'row time per job, ms':28}{_row_ms_per_job(one, table):10.2f}{_row_ms_per_job(many, table):10.2f}")
        print(f"    {'time the row was locked':28}{_row_busy(one, table):10.0%}{_row_busy(many, table):10.0%}")
    for table in ORGANIZATION_ROWS:
        row_ms = _row_ms_per_job(one, table)
        print(
            f"  {table}: locked {row_ms:.1f} ms per job in the one-org run, it caps one organization at"
            f" {1000 / max(row_ms, 1e-9):.0f} jobs/s at those hold times, however many processes serve it"
        )

    print(f"\nwhat the processes' PostgreSQL backends were doing (pg_stat_activity every {args.sample_ms} ms):")
    for role in ROLES:
        one_samples, many_samples = Counter[str](), Counter[str]()
        for labelled, sampled in ((one_samples, one.samples[role]), (many_samples, many.samples[role])):
            for sample, count in sampled.items():
                labelled[waiting_label(sample)] += count
        one_total = sum(one_samples.values()) or 1
        many_total = sum(many_samples.values()) or 1
        width = max([50, *(len(state) for state in one_samples | many_samples)])
        print(f"  {role + ' processes':{width + 2}}{'one org':>9}{f'{n} orgs':>9}")
        for state in sorted(set(one_samples) | set(many_samples), key=lambda state: -one_samples[state]):
            print(f"    {state:{width}}{one_samples[state] / one_total:9.1%}{many_samples[state] / many_total:9.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=4, help="submitting processes, and as many finishing")
    parser.add_argument("--seconds", type=float, default=15, help="the time counted for each configuration")
    parser.add_argument("--rounds", type=int, default=2, help="windows per configuration, alternating one/N, N/one")
    parser.add_argument("--warmup", type=float, default=2, help="seconds run before each window, not counted")
    parser.add_argument(
        "--concurrency-limit", type=int, default=1_000_000, help="each organization's (2 is the platform's default)"
    )
    parser.add_argument("--sample-ms", type=int, default=50, help="pg_stat_activity sampling interval")
    args = parser.parse_args()

    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        raise SystemExit(
            "the hot tenant benchmark needs PostgreSQL: set DATABASE_URL=postgres://... (SQLite takes one write lock"
            " for the whole file, so every tenant is serialized there and there is nothing to compare)"
        )
    data_dir = Path(tempfile.mkdtemp(prefix="bench-tenants-"))
    scratch_url, scratch_name = scratch_database(url)
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "SECRET_KEY": "bench-only-secret-key",
        "PLATFORM_DATA_DIR": str(data_dir),
        "LOG_LEVEL": "WARNING",
        "STRIPE_SECRET_KEY": "",
        "DATABASE_URL": scratch_url,
        "BROKER_URL": "memory://",  # nothing reaches a broker: the messages go on the pool's queues
        "CACHE_KEY_PREFIX": f"bench-tenants-{os.getpid()}",
    }
    os.environ.update(env)
    pool = None
    try:
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], env=os.environ, cwd=REPO, check=True)
        import django

        django.setup()
        n, rounds = args.processes, args.rounds
        # Fresh organizations and message queues for every window: none inherits another's backlog.
        tenants, endpoint_id = make_tenants(rounds * (1 + n), args.concurrency_limit)
        pool = Pool(n, env, queue_count=len(tenants))
        pool.start()
        one, many = PhaseResult("one organization", 1), PhaseResult(f"{n} organizations", n)
        fresh = iter(range(len(tenants)))
        for number in range(rounds):
            for phase in (one, many) if number % 2 == 0 else (many, one):  # one, N, N, one...: drift cancels
                if phase is one:
                    index = next(fresh)
                    assignments = [(tenants[index], index)] * n
                else:
                    assignments = [(tenants[index], index) for index in (next(fresh) for _ in range(n))]
                run_window(pool, phase, assignments, endpoint_id, args.seconds / rounds, args, scratch_url)
        pool.close()
        pool = None
        print_results(one, many, args, check_books(tenants))
    finally:
        if pool is not None:
            pool.close()
        from django.db import connections

        connections.close_all()
        drop_postgres(url, scratch_name)


if __name__ == "__main__":
    main()
